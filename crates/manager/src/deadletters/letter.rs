//! One dead letter: what its message says about the job (id, reason, error, drive), and how it
//! is recorded in the store — once, through the conditional final write of its drive.

use gpuq_common::amqp::{death_reason, header_str};
use gpuq_common::job::{FinalOutcome, JobMessage, JobRecord, JobStatus, now_ms};
use gpuq_common::store::FinishOutcome;
use gpuq_common::topology::{DRIVE_HEADER, ERROR_HEADER, FIRST_DRIVE, REASON_HEADER};
use gpuq_common::{JobId, JobStore, StoreError};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

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
    /// The job's stored record cannot be decoded, or the store refused the write for good:
    /// nothing was written. Retrying would only fail again, so it is parked: acked, logged with
    /// the dead letter's contents, and counted in `gpuq_dead_letters_unrecorded_total`.
    Unrecordable {
        id: JobId,
        /// `corrupt_record` or `store_error` (the metric's `cause`).
        cause: &'static str,
        why: String,
    },
}

impl Recorded {
    /// The `cause` label of `gpuq_dead_letters_unrecorded_total`, for a dead letter nothing
    /// was recorded for.
    pub fn unrecorded_cause(&self) -> Option<&'static str> {
        match self {
            Recorded::Unreadable(_) => Some("unreadable_message"),
            Recorded::Unrecordable { cause, .. } => Some(*cause),
            _ => None,
        }
    }
}

/// Records one dead letter in the store. The one-step function of this module. Fails only
/// with `StoreError::Unavailable`, which passes; any other failure would repeat on every try and
/// is answered `Unrecordable`.
pub async fn record(store: &dyn JobStore, dl: &DeadLetter) -> Result<Recorded, StoreError> {
    let Some(id) = dl.id else {
        return Ok(Recorded::Unreadable(
            "no job id in message_id or body".into(),
        ));
    };
    match record_job(store, dl, id).await {
        Err(StoreError::Unavailable(m)) => Err(StoreError::Unavailable(m)),
        Err(e) => Ok(Recorded::Unrecordable {
            id,
            cause: match e {
                StoreError::Corrupt(_) => "corrupt_record",
                _ => "store_error",
            },
            why: e.to_string(),
        }),
        recorded => recorded,
    }
}

async fn record_job(
    store: &dyn JobStore,
    dl: &DeadLetter,
    id: JobId,
) -> Result<Recorded, StoreError> {
    let last_error = match &dl.error {
        Some(e) => Some(e.clone()),
        // The error is only a detail: a record that cannot be decoded may still take the
        // status (the write below touches a few fields).
        None => match store.get(id).await {
            Ok(r) => r.and_then(|r| r.error),
            Err(StoreError::Corrupt(why)) => {
                tracing::warn!(job_id = %id, error.message = %why, "the job's record cannot be read; dead-lettering it without its last error");
                None
            }
            Err(e) => return Err(e),
        },
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
        events: vec![],
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
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lapin::types::ShortString;

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
        let (_dir, _path, store, msg) = stored_job().await;
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

    /// A job in a fresh SQLite store, and the store's file.
    async fn stored_job() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        Arc<dyn JobStore>,
        JobMessage,
    ) {
        use gpuq_common::job::{JobPayload, JobPlacement, SimulateParams};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = gpuq_common::store::open(&format!("sqlite://{}", path.display()))
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
        (dir, path, store, msg)
    }

    /// Overwrites one column of a job's row with a value no store write would make.
    fn corrupt(path: &std::path::Path, id: JobId, column: &str, value: &str) {
        let conn = rusqlite::Connection::open(path).unwrap();
        let n = conn
            .execute(
                &format!("UPDATE jobs SET {column} = ?2 WHERE id = ?1"),
                rusqlite::params![id.to_string(), value],
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    fn limit_letter(msg: &JobMessage) -> DeadLetter {
        DeadLetter::from_message(
            &props(
                x_death("delivery_limit", "p.jobs.default"),
                Some(&msg.id.to_string()),
            ),
            &msg.to_bytes(),
        )
    }

    #[tokio::test]
    async fn a_dead_letter_whose_record_has_an_unknown_status_is_unrecordable_not_an_error() {
        let (_dir, path, store, msg) = stored_job().await;
        corrupt(&path, msg.id, "status", "exploded");
        let dl = limit_letter(&msg);
        for _ in 0..2 {
            let rec = record(store.as_ref(), &dl).await.unwrap();
            assert!(
                matches!(&rec, Recorded::Unrecordable { id, cause: "corrupt_record", why }
                    if *id == msg.id && why.contains("exploded")),
                "{rec:?}"
            );
            assert_eq!(rec.unrecorded_cause(), Some("corrupt_record"));
        }
    }

    #[tokio::test]
    async fn a_dead_letter_whose_record_cannot_be_read_is_still_recorded_once() {
        // Bad JSON, and a value of the wrong type (which must not pass for an outage).
        for (column, value) in [("params", "{not json"), ("attempts", "many")] {
            let (_dir, path, store, msg) = stored_job().await;
            corrupt(&path, msg.id, column, value);
            assert!(
                matches!(store.get(msg.id).await, Err(StoreError::Corrupt(_))),
                "{column}"
            );
            let dl = limit_letter(&msg);
            assert!(
                dl.error.is_none(),
                "the last error would come from the record"
            );
            assert_eq!(
                record(store.as_ref(), &dl).await.unwrap(),
                Recorded::Stored {
                    id: msg.id,
                    reason: "delivery_limit".into()
                },
                "{column}"
            );
            assert_eq!(
                record(store.as_ref(), &dl).await.unwrap(),
                Recorded::AlreadyFinal {
                    id: msg.id,
                    status: JobStatus::DeadLettered
                },
                "{column}"
            );
        }
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
