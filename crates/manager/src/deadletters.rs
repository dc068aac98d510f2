//! Dead-letter bookkeeping: consumes `<prefix>.dead` (manual ack) and records each job as
//! `dead_lettered` with its reason, through the store's conditional final write, before the ack.
//! Dead-lettering is at least once, so a second copy finds the job final and is only acked.
//! When the broker connection dies, it reconnects through another node and resumes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use gpuq_common::amqp::{connect_any, death_reason, header_str};
use gpuq_common::job::{FinalOutcome, JobMessage, JobRecord, JobStatus, now_ms};
use gpuq_common::metrics::ManagerMetrics;
use gpuq_common::store::FinishOutcome;
use gpuq_common::topology::{DRIVE_HEADER, ERROR_HEADER, FIRST_DRIVE, REASON_HEADER, Topology};

use crate::registry::Registry;
use gpuq_common::{JobId, JobStore, StoreError};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Dead letters the manager holds unacked at once.
pub const PREFETCH: u16 = 50;

/// What a dead-lettered message says about its job.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: Option<JobId>,
    pub reason: String,
    /// The last error a worker reported in the message (`x-gpuq-error`).
    pub error: Option<String>,
    /// The queue the job died in (from `x-death`).
    pub queue: Option<String>,
    /// Which drive of the job died (`x-gpuq-drive`; `0` for the first drive).
    pub drive: String,
    pub body: Vec<u8>,
}

impl DeadLetter {
    /// Reads the job id (`message_id`, else the body's `id`), the reason (`x-gpuq-reason`, else
    /// the first `x-death` reason) and the last error.
    pub fn from_message(props: &BasicProperties, body: &[u8]) -> Self {
        let headers = props.headers().as_ref();
        let id = props
            .message_id()
            .as_ref()
            .and_then(|m| m.as_str().parse().ok())
            .or_else(|| {
                serde_json::from_slice::<serde_json::Value>(body)
                    .ok()?
                    .get("id")?
                    .as_str()?
                    .parse()
                    .ok()
            });
        let reason = header_str(headers, REASON_HEADER)
            .filter(|r| !r.is_empty())
            .or_else(|| death_reason(headers))
            .unwrap_or_else(|| "unknown".into());
        Self {
            id,
            reason: label_safe(&reason),
            error: header_str(headers, ERROR_HEADER).filter(|e| !e.is_empty()),
            queue: first_death_queue(headers),
            drive: header_str(headers, DRIVE_HEADER)
                .filter(|d| !d.is_empty() && d.len() <= 64)
                .unwrap_or_else(|| FIRST_DRIVE.into()),
            body: body.to_vec(),
        }
    }
}

/// Reasons become a metric label: keep them to a short plain word.
fn label_safe(reason: &str) -> String {
    let ok = !reason.is_empty()
        && reason.len() <= 32
        && reason
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit());
    if ok {
        reason.to_string()
    } else {
        "other".into()
    }
}

fn first_death_queue(headers: Option<&FieldTable>) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    header_str(Some(first), "queue")
}

/// The outcome of recording one dead letter.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// The job is now `dead_lettered` (count it).
    Stored { id: JobId, reason: String },
    /// The job already had a final status (a second copy, or it succeeded after all).
    AlreadyFinal { id: JobId, status: JobStatus },
    /// A late copy of an earlier drive's dead letter: the job was re-driven since.
    Superseded { id: JobId, drive: String },
    /// Neither the message nor the store tells which job this was: nothing to record.
    Unreadable(String),
}

/// Records one dead letter in the store. The one-step function of this module.
pub async fn record(store: &dyn JobStore, dl: &DeadLetter) -> Result<Recorded, StoreError> {
    let Some(id) = dl.id else {
        return Ok(Recorded::Unreadable(
            "no job id in message_id or body".into(),
        ));
    };
    let last_error = match &dl.error {
        Some(e) => Some(e.clone()),
        None => store.get(id).await?.and_then(|r| r.error),
    };
    let mut result = json!({ "reason": dl.reason });
    if let Some(q) = &dl.queue {
        result["queue"] = json!(q);
    }
    let outcome = FinalOutcome {
        status: JobStatus::DeadLettered,
        result: Some(result),
        error: Some(match &last_error {
            Some(e) => format!("{}: {e}", dl.reason),
            None => dl.reason.clone(),
        }),
        worker: None,
        finished_at: now_ms(),
        attempt: None,
    };
    // Conditional on the drive: after a re-drive, a late copy of an earlier drive's dead letter
    // (mark of it lost with Redis, or never made) finds the job on another drive and is dropped.
    let mut finished = store.finish_drive(id, &dl.drive, &outcome).await?;
    if finished == FinishOutcome::NotFound {
        let msg = match JobMessage::from_bytes(&dl.body) {
            Ok(m) if m.id == id => m,
            Ok(_) => return Ok(Recorded::Unreadable("message_id and body id differ".into())),
            Err(e) => {
                return Ok(Recorded::Unreadable(format!(
                    "unknown job, unreadable body: {e}"
                )));
            }
        };
        match store.insert(&JobRecord::queued(&msg)).await {
            Ok(()) | Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
        // Made from this very message just now: no other drive to yield to.
        finished = store.finish(id, &outcome).await?;
    }
    Ok(match finished {
        FinishOutcome::Stored => Recorded::Stored {
            id,
            reason: dl.reason.clone(),
        },
        FinishOutcome::AlreadyFinal(status) => Recorded::AlreadyFinal { id, status },
        FinishOutcome::Superseded => Recorded::Superseded {
            id,
            drive: dl.drive.clone(),
        },
        FinishOutcome::NotFound => Recorded::Unreadable("job vanished while recording".into()),
    })
}

/// The dead-queue consumer with its reconnect loop.
pub struct DeadLetterConsumer {
    pub amqp_urls: Vec<String>,
    pub topology: Topology,
    pub pools: Vec<String>,
    pub store: Arc<dyn JobStore>,
    pub metrics: ManagerMetrics,
    /// True while a consumer is attached to the dead queue (read by `/readyz`).
    pub connected: Arc<AtomicBool>,
    /// Remembers which drives' dead letters were recorded, so that a second copy (dead-lettering
    /// is at least once) is acked without a store round trip. Only a shortcut: should Redis
    /// forget, the store's drive-conditional write still keeps a late copy from undoing a re-drive.
    pub registry: Registry,
}

impl DeadLetterConsumer {
    /// Connects through any node, declares the topology, consumes; reconnects on failure.
    pub async fn run(self, token: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        while !token.is_cancelled() {
            let name = format!("gpuq-manager/{}", self.topology.prefix);
            match connect_any(&self.amqp_urls, &name).await {
                Ok((conn, _url)) => {
                    let result = self.consume(&conn, &token).await;
                    self.connected.store(false, Ordering::Relaxed);
                    // Unacked dead letters go back to the queue with the channel.
                    let _ = conn.close(200, ShortString::from("OK")).await;
                    if token.is_cancelled() {
                        break;
                    }
                    match result {
                        Ok(()) => tracing::warn!("dead-letter consumer ended; reconnecting"),
                        Err(e) => tracing::warn!(
                            error.cause_chain = ?e, error.message = %e,
                            "dead-letter consumer failed; reconnecting"
                        ),
                    }
                    backoff = Duration::from_millis(250);
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "no broker node reachable");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
        self.connected.store(false, Ordering::Relaxed);
    }

    async fn consume(&self, conn: &Connection, token: &CancellationToken) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let channel = conn.create_channel().await.context("opening a channel")?;
        let mut pools = vec!["default".to_string()];
        pools.extend(self.pools.iter().filter(|p| *p != "default").cloned());
        self.topology
            .declare(&channel, &pools)
            .await
            .context("declaring the topology")?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions { global: false })
            .await
            .context("setting the prefetch")?;
        let mut consumer = channel
            .basic_consume(
                ShortString::from(self.topology.dead_queue()),
                ShortString::from("gpuq-manager-dead"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("consuming the dead queue")?;
        self.connected.store(true, Ordering::Relaxed);
        tracing::info!(queue = %self.topology.dead_queue(), "consuming dead letters");
        loop {
            let delivery = tokio::select! {
                _ = token.cancelled() => return Ok(()),
                d = consumer.next() => d,
            };
            let delivery = match delivery {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e).context("dead-letter delivery"),
                None => return Ok(()),
            };
            let dl = DeadLetter::from_message(&delivery.properties, &delivery.data);
            if let Some(id) = dl.id
                && self
                    .registry
                    .dead_letter_seen(id, &dl.drive)
                    .await
                    .unwrap_or(false)
            {
                tracing::info!(job_id = %id, drive = %dl.drive, "duplicate dead letter of a recorded drive: acked");
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .context("ack")?;
                continue;
            }
            match self.record_with_retry(&dl, token).await {
                Some(Ok(())) => {
                    if let Some(id) = dl.id
                        && let Err(e) = self.registry.mark_dead_letter_seen(id, &dl.drive).await
                    {
                        tracing::warn!(job_id = %id, error.message = %e, "cannot remember the recorded dead letter");
                    }
                    delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .context("ack")?;
                }
                Some(Err(e)) => {
                    tracing::error!(
                        job_id = ?dl.id, error.cause_chain = ?e, error.message = %e,
                        "cannot record dead letter; requeueing it"
                    );
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    let requeue = BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    };
                    delivery.nack(requeue).await.context("nack")?;
                }
                // Shutting down mid-retry: the unacked message goes back with the channel.
                None => return Ok(()),
            }
        }
    }

    /// Records and counts a dead letter. While the store is unavailable the delivery is held
    /// and the write retried, so that an outage burns no delivery count (quorum queues on
    /// RabbitMQ 4 drop a message after 20 requeues, and the dead queue has nowhere further to go).
    /// Other store errors come back for a delayed requeue. `None` means cancelled.
    async fn record_with_retry(
        &self,
        dl: &DeadLetter,
        token: &CancellationToken,
    ) -> Option<Result<(), StoreError>> {
        let mut wait = Duration::from_millis(200);
        loop {
            match record(self.store.as_ref(), dl).await {
                Ok(rec) => {
                    self.note(&rec);
                    return Some(Ok(()));
                }
                Err(StoreError::Unavailable(m)) => {
                    tracing::warn!(job_id = ?dl.id, error.message = %m, "store unavailable; holding the dead letter");
                }
                Err(e) => return Some(Err(e)),
            }
            tokio::select! {
                _ = token.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    fn note(&self, rec: &Recorded) {
        match rec {
            Recorded::Stored { id, reason } => {
                self.metrics
                    .dead_letters
                    .with_label_values(&[reason.as_str()])
                    .inc();
                tracing::info!(job_id = %id, reason = %reason, "job dead-lettered");
            }
            Recorded::AlreadyFinal { id, status } => tracing::info!(
                job_id = %id, status = status.as_str(),
                "dead letter of a job that is already final; acked"
            ),
            Recorded::Superseded { id, drive } => tracing::info!(
                job_id = %id, drive = %drive,
                "late dead letter of a drive the job was re-driven from; acked"
            ),
            Recorded::Unreadable(why) => {
                tracing::error!(error.message = %why, "unreadable dead letter dropped")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    fn props(headers: FieldTable, id: Option<&str>) -> BasicProperties {
        let p = BasicProperties::default().with_headers(headers);
        match id {
            Some(id) => p.with_message_id(ShortString::from(id.to_string())),
            None => p,
        }
    }

    fn x_death(reason: &str, queue: &str) -> FieldTable {
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        death.insert(
            "queue".into(),
            AMQPValue::LongString(LongString::from(queue)),
        );
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        h
    }

    #[test]
    fn the_gpuq_reason_header_wins_over_x_death() {
        let id = uuid::Uuid::now_v7();
        let mut h = x_death("rejected", "p.jobs.default");
        let dl = DeadLetter::from_message(&props(h.clone(), Some(&id.to_string())), b"{}");
        assert_eq!((dl.id, dl.reason.as_str()), (Some(id), "rejected"));
        assert_eq!(dl.queue.as_deref(), Some("p.jobs.default"));
        h.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from("unschedulable")),
        );
        h.insert(
            ERROR_HEADER.into(),
            AMQPValue::LongString(LongString::from("boom")),
        );
        let dl = DeadLetter::from_message(&props(h, Some(&id.to_string())), b"{}");
        assert_eq!(dl.reason, "unschedulable");
        assert_eq!(dl.error.as_deref(), Some("boom"));
    }

    #[tokio::test]
    async fn a_late_dead_letter_of_an_earlier_drive_does_not_undo_a_re_drive() {
        use gpuq_common::job::{JobPayload, JobPlacement, SimulateParams};
        let dir = tempfile::tempdir().unwrap();
        let store = gpuq_common::store::open(&format!(
            "sqlite://{}",
            dir.path().join("jobs.db").display()
        ))
        .await
        .unwrap();
        let msg = JobMessage::new(
            JobPayload::Simulate(SimulateParams::default()),
            JobPlacement {
                gpus: 1,
                min_gpu_memory_mb: None,
                pool: "default".into(),
                ttl_s: None,
            },
        );
        store.insert(&JobRecord::queued(&msg)).await.unwrap();
        let first = DeadLetter::from_message(
            &props(
                x_death("delivery_limit", "p.jobs.default"),
                Some(&msg.id.to_string()),
            ),
            &msg.to_bytes(),
        );
        assert_eq!(first.drive, FIRST_DRIVE);
        assert!(matches!(
            record(store.as_ref(), &first).await.unwrap(),
            Recorded::Stored { .. }
        ));
        // Re-driven by the gateway as drive "d2"; then a second copy of the first dead letter.
        assert!(store.reset_for_retry(msg.id, "d2").await.unwrap());
        assert_eq!(
            record(store.as_ref(), &first).await.unwrap(),
            Recorded::Superseded {
                id: msg.id,
                drive: FIRST_DRIVE.into()
            }
        );
        assert_eq!(
            store.get(msg.id).await.unwrap().unwrap().status,
            JobStatus::Queued
        );
        // The re-drive's own dead letter is recorded.
        let mut h = x_death("delivery_limit", "p.jobs.default");
        h.insert(
            DRIVE_HEADER.into(),
            AMQPValue::LongString(LongString::from("d2")),
        );
        let second =
            DeadLetter::from_message(&props(h, Some(&msg.id.to_string())), &msg.to_bytes());
        assert!(matches!(
            record(store.as_ref(), &second).await.unwrap(),
            Recorded::Stored { .. }
        ));
    }

    #[test]
    fn the_id_falls_back_to_the_body_and_odd_reasons_become_other() {
        let id = uuid::Uuid::now_v7();
        let body = format!(r#"{{"id":"{id}"}}"#);
        let mut h = FieldTable::default();
        h.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from("Bad Reason!")),
        );
        let dl = DeadLetter::from_message(&props(h, None), body.as_bytes());
        assert_eq!(dl.id, Some(id));
        assert_eq!(dl.reason, "other");
        let dl = DeadLetter::from_message(&props(FieldTable::default(), None), b"junk");
        assert_eq!((dl.id, dl.reason.as_str()), (None, "unknown"));
    }
}
