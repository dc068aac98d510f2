//! Re-driving a dead letter: the job goes back to `queued` under a new drive and its message,
//! rebuilt from the record, is published again with a confirm.

use gpuq_common::job::{
    ArrayMember, FinalOutcome, JobId, JobKind, JobMessage, JobPayload, JobPlacement, JobRecord,
    JobStatus, now_ms,
};
use gpuq_common::tenancy::Principal;
use gpuq_common::topology::{ATTEMPT_OFFSET_HEADER, DRIVE_HEADER};
use lapin::types::{AMQPValue, FieldTable};
use tracing::{Instrument, Span, instrument};

use super::{JobError, count_publish_failure, count_submitted, visible};
use crate::state::SharedState;

/// Re-drives a dead-lettered job: back to `queued` in the store under a new drive id, and a
/// message rebuilt from the record (same id, its attempts so far in `x-gpuq-attempt-offset`, the
/// drive in `x-gpuq-drive`) published with a confirm. When the broker refuses it, the job is
/// dead-lettered again as it was.
#[instrument(skip_all, fields(job_id = %id, tenant = %who.tenant))]
pub async fn retry_dead_letter(
    state: &SharedState,
    who: &Principal,
    id: JobId,
) -> Result<JobId, JobError> {
    let record = visible(state, who, id).await?;
    if record.status != JobStatus::DeadLettered {
        return Err(JobError::NotDeadLettered {
            id,
            status: record.status,
        });
    }
    let max_gpus = state.quotas.limits(&record.tenant).max_gpus;
    let msg = message_from_record(&record)?.for_tenant(&record.tenant, max_gpus);
    // From the reset on, finish in a task of its own: a client that hangs up must not leave the
    // job queued without a message.
    let state = state.clone();
    tokio::spawn(redrive(state, record, msg).instrument(Span::current()))
        .await
        .map_err(|e| JobError::Internal(anyhow::Error::new(e).context("retry task")))?
}

async fn redrive(
    state: SharedState,
    record: JobRecord,
    msg: JobMessage,
) -> Result<JobId, JobError> {
    let id = record.id;
    // A done marker would make workers skip the re-driven job; a dead letter has no result, so
    // one left behind is stale. Needs Redis: without it the re-drive could be silently dropped.
    state.kv.clear_done(&state.keys, id).await.map_err(|source| {
        tracing::warn!(error.cause_chain = ?source, error.message = %source, "cannot clear the done marker");
        JobError::Coordination {
            action: "re-drive the job",
            source,
        }
    })?;
    // The store remembers the drive, so that a late copy of an earlier dead letter of this job
    // cannot undo the re-drive.
    let drive = uuid::Uuid::new_v4().to_string();
    if !state.store.reset_for_retry(id, &drive).await? {
        let status = state
            .store
            .get(id)
            .await?
            .map_or(JobStatus::Queued, |r| r.status);
        return Err(JobError::NotDeadLettered { id, status });
    }
    // Attempt numbers go on from where the dead letter left them; the delivery budget restarts.
    let mut headers = FieldTable::default();
    headers.insert(
        ATTEMPT_OFFSET_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(record.attempts)),
    );
    headers.insert(
        DRIVE_HEADER.into(),
        AMQPValue::LongString(drive.clone().into()),
    );
    match state.broker.publish_job_with_headers(&msg, headers).await {
        Ok(()) => {
            count_submitted(&state, &msg);
            tracing::info!(drive = %drive, "dead letter re-driven");
            Ok(id)
        }
        Err(e) => {
            count_publish_failure(&state, &e);
            tracing::warn!(error.message = %e, "re-drive not accepted by the broker");
            if e.ambiguous() {
                // The message may be queued: a worker must be able to record its result, so the
                // job stays queued (cancel it if it never runs).
                return Err(JobError::NotAccepted {
                    source: e,
                    id,
                    keyed: false,
                    redrive: true,
                });
            }
            // Refused for sure: dead-lettered again, as it was.
            let back = FinalOutcome {
                status: JobStatus::DeadLettered,
                result: record.result.clone(),
                error: record.error.clone(),
                worker: record.worker.clone(),
                finished_at: record.finished_at.unwrap_or_else(now_ms),
                attempt: None,
                events: vec![],
            };
            if let Err(se) = state.store.finish_drive(id, &drive, &back).await {
                tracing::error!(
                    error.cause_chain = ?se,
                    error.message = %se,
                    "could not put the job back to dead_lettered; it stays queued without a message"
                );
            }
            Err(JobError::not_accepted(e, id, &msg.placement.pool, false))
        }
    }
}

/// The message a stored job was made from, under its own id.
pub fn message_from_record(record: &JobRecord) -> Result<JobMessage, JobError> {
    let corrupt = |e: serde_json::Error| {
        JobError::Internal(anyhow::Error::new(e).context(format!("params of job {}", record.id)))
    };
    let payload = match record.kind {
        JobKind::Simulate => {
            JobPayload::Simulate(serde_json::from_value(record.params.clone()).map_err(corrupt)?)
        }
        JobKind::Command => {
            JobPayload::Command(serde_json::from_value(record.params.clone()).map_err(corrupt)?)
        }
    };
    let mut msg = JobMessage::new(
        payload,
        JobPlacement {
            gpus: record.gpus_requested,
            min_gpu_memory_mb: record.min_gpu_memory_mb,
            pool: record.pool.clone(),
            ttl_s: None,
        },
    );
    msg.id = record.id;
    msg.array = record
        .array_id
        .zip(record.array_index)
        .map(|(id, index)| ArrayMember { id, index });
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuq_common::job::SubmitRequest;

    #[test]
    fn a_record_rebuilds_the_message_it_came_from() {
        let req: SubmitRequest = serde_json::from_str(
            r#"{"kind":"command","params":{"program":"train","args":["--x"]},"gpus":2,"pool":"h100","min_gpu_memory_mb":1000}"#,
        )
        .unwrap();
        let (payload, placement) = req.validate().unwrap();
        let original = JobMessage::new(payload, placement);
        let rebuilt = message_from_record(&JobRecord::queued(&original)).unwrap();
        assert_eq!(rebuilt.id, original.id);
        assert_eq!(rebuilt.array, None);
        assert_eq!(rebuilt.payload, original.payload);
        assert_eq!(rebuilt.placement, original.placement);
    }

    #[test]
    fn a_member_of_an_array_is_rebuilt_in_its_array() {
        let req: SubmitRequest =
            serde_json::from_str(r#"{"kind":"command","params":{"program":"sh"},"array":2}"#)
                .unwrap();
        let second = req.expand().unwrap().remove(1);
        let rebuilt = message_from_record(&JobRecord::queued(&second)).unwrap();
        assert_eq!(rebuilt.array, second.array);
        assert_eq!(
            rebuilt.payload, second.payload,
            "the array's variables kept"
        );
    }
}
