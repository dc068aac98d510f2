//! Dead-letter bookkeeping: consumes `<prefix>.dead` (manual ack) and records each job as
//! `dead_lettered` with its reason, through the store's conditional final write, before the ack.
//! Dead-lettering is at least once, so a second copy finds the job final and is only acked.
//! A dead letter that cannot be recorded for good (no job id, a corrupt stored record) is acked
//! once, logged with its contents and counted, never requeued; only an unavailable store is waited
//! out. When the broker connection dies, it reconnects through another node and resumes.
//!
//! `letter` reads a dead letter and records it in the store; this module is the consumer around it.

mod letter;

pub use letter::{DeadLetter, Recorded, record};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use gpuq_common::amqp::{Session, Supervisor};
use gpuq_common::metrics::ManagerMetrics;
use gpuq_common::topology::Topology;

use gpuq_common::JobStore;
use gpuq_common::coord::registry::Registry;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use tokio_util::sync::CancellationToken;

/// Dead letters the manager holds unacked at once.
pub const PREFETCH: u16 = 50;

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
    /// Consumes through the broker supervisor (any node, the topology declared on every
    /// connect, reconnecting on failure) until `token`.
    pub async fn run(self, token: CancellationToken) {
        let mut pools = vec!["default".to_string()];
        pools.extend(self.pools.iter().filter(|p| *p != "default").cloned());
        let supervisor = Supervisor {
            urls: self.amqp_urls.clone(),
            name: format!("gpuq-manager/{}", self.topology.prefix),
            topology: self.topology.clone(),
            pools: Vec::new(),
            pools_if_permitted: pools,
        };
        let (this, cancel) = (&self, &token);
        supervisor
            .run(&token, |link| async move {
                let result = this.consume(&link, cancel).await;
                // Unacked dead letters go back to the queue when the supervisor closes the link.
                this.connected.store(false, Ordering::Relaxed);
                result
            })
            .await;
        self.connected.store(false, Ordering::Relaxed);
    }

    async fn consume(&self, link: &Session, token: &CancellationToken) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let channel = &link.channel;
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
                None => anyhow::bail!("the dead-letter consumer was cancelled by the broker"),
            };
            self.handle(delivery, token).await?;
        }
    }

    /// Acks a dead letter once it is recorded (or known to be recorded); returns early, leaving
    /// it unacked, only on shutdown.
    async fn handle(
        &self,
        delivery: lapin::message::Delivery,
        token: &CancellationToken,
    ) -> anyhow::Result<()> {
        use anyhow::Context as _;
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
            return Ok(());
        }
        // Every outcome is acked: one that recorded nothing is parked (logged and counted),
        // since requeueing it would only fail again, in a loop.
        let Some(rec) = self.record_with_retry(&dl, token).await else {
            // Shutting down mid-retry: the unacked message goes back with the channel.
            return Ok(());
        };
        if rec.unrecorded_cause().is_none()
            && let Some(id) = dl.id
            && let Err(e) = self.registry.mark_dead_letter_seen(id, &dl.drive).await
        {
            tracing::warn!(job_id = %id, error.message = %e, "cannot remember the recorded dead letter");
        }
        delivery
            .ack(BasicAckOptions::default())
            .await
            .context("ack")?;
        Ok(())
    }

    /// Records and counts a dead letter. While the store is unavailable the delivery is held
    /// and the write retried, so that an outage burns no delivery count (quorum queues on
    /// RabbitMQ 4 drop a message after 20 requeues, and the dead queue has nowhere further to go).
    /// `record` fails with nothing else. `None` means cancelled.
    async fn record_with_retry(
        &self,
        dl: &DeadLetter,
        token: &CancellationToken,
    ) -> Option<Recorded> {
        let mut wait = Duration::from_millis(200);
        loop {
            match record(self.store.as_ref(), dl).await {
                Ok(rec) => {
                    self.note(dl, &rec);
                    return Some(rec);
                }
                Err(e) => {
                    tracing::warn!(job_id = ?dl.id, error.message = %e, "store unavailable; holding the dead letter");
                }
            }
            tokio::select! {
                _ = token.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    fn note(&self, dl: &DeadLetter, rec: &Recorded) {
        if let Some(cause) = rec.unrecorded_cause() {
            self.metrics
                .dead_letters_unrecorded
                .with_label_values(&[cause])
                .inc();
        }
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
            Recorded::Unreadable(why) => tracing::error!(
                error.message = %why,
                reason = %dl.reason,
                body = %body_excerpt(&dl.body),
                "unreadable dead letter dropped"
            ),
            Recorded::Unrecordable { id, cause, why } => tracing::error!(
                job_id = %id,
                cause = *cause,
                error.message = %why,
                reason = %dl.reason,
                drive = %dl.drive,
                last_error = dl.error.as_deref().unwrap_or(""),
                body = %body_excerpt(&dl.body),
                "dead letter not recorded: the job's record cannot be written; acked, not retried"
            ),
        }
    }
}

/// The start of a message body, for a log line an operator can rebuild the job from.
fn body_excerpt(body: &[u8]) -> String {
    const MAX: usize = 4096;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]).into_owned();
    if body.len() > MAX {
        format!("{text}… ({} bytes)", body.len())
    } else {
        text
    }
}
