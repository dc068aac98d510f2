//! Batch submission (`POST /v1/jobs/batch`): up to `MAX_BATCH` jobs, an array counted as its
//! size, validated all or nothing, admitted together under the tenant's limits, stored in one
//! write and published with one wait for all their confirms. One `Idempotency-Key` names the
//! whole batch: a retry with it answers the same jobs and enqueues nothing new.

use std::collections::HashMap;
use std::time::Instant;

use gpuq_common::coord::idempotency::{BatchClaim, Ticket, fingerprint};
use gpuq_common::job::{JobId, JobMessage, JobRecord, JobStatus, SubmitRequest};
use gpuq_common::store::StoreError;
use gpuq_common::tenancy::Principal;
use tracing::{Instrument, Span, instrument};

use super::{
    JobError, count_publish_failure, count_submitted, finish_claim, give_up_claim, gpu_quota,
    invalid_job, require_fault_injection, withdraw, worker_breaking_knob,
};
use crate::state::SharedState;

/// The most jobs one batch makes, its arrays counted whole.
pub const MAX_BATCH: u32 = gpuq_common::job::MAX_ARRAY;

/// The outcome of an accepted batch: its jobs in request order (an array's in index order).
#[derive(Debug, Clone, PartialEq)]
pub enum BatchSubmitted {
    /// Stored and confirmed by the broker now.
    Accepted(Vec<JobId>),
    /// An earlier request with the same `Idempotency-Key` made these jobs; nothing new enqueued.
    Replayed(Vec<(JobId, JobStatus)>),
}

impl BatchSubmitted {
    /// Every job with its status: `queued` for those accepted now.
    pub fn jobs(self) -> Vec<(JobId, JobStatus)> {
        match self {
            BatchSubmitted::Accepted(ids) => {
                ids.into_iter().map(|id| (id, JobStatus::Queued)).collect()
            }
            BatchSubmitted::Replayed(jobs) => jobs,
        }
    }
}

/// Validates every request (a fault is a 422 naming its index), admits the batch's jobs under
/// `who`'s tenant's limits together, deduplicates the batch by `Idempotency-Key` (per tenant),
/// stores and publishes them all.
#[instrument(skip_all, fields(tenant = %who.tenant, jobs = tracing::field::Empty))]
pub async fn submit_batch(
    state: &SharedState,
    who: &Principal,
    reqs: Vec<SubmitRequest>,
    idempotency_key: Option<String>,
) -> Result<BatchSubmitted, JobError> {
    let tenant = who.tenant.as_str();
    let limits = state.quotas.limits(tenant);
    let msgs = expand(state, &reqs, tenant, limits.max_gpus).await?;
    let n = msgs.len() as u32;
    Span::current().record("jobs", n);
    if n > limits.burst {
        // It could never be admitted whole: refused now rather than throttled for ever.
        return Err(JobError::Invalid(format!(
            "jobs: a batch of {n} jobs is more than tenant {tenant}'s burst of {}",
            limits.burst
        )));
    }
    let counted = |outcome: &str| {
        state
            .metrics
            .tenant_submissions
            .with_label_values(&[tenant, outcome])
            .inc_by(u64::from(n));
    };
    if let Err(refusal) = state.quotas.admit_many(tenant, n) {
        counted(refusal.reason());
        return Err(JobError::Throttled {
            message: refusal.message(tenant),
            retry_after_s: refusal.retry_after_s(),
        });
    }
    let outcome = admitted(state, &reqs, msgs, idempotency_key).await;
    match &outcome {
        Ok(BatchSubmitted::Accepted(_)) => counted("accepted"),
        Ok(BatchSubmitted::Replayed(_)) | Err(_) => state.quotas.forget_many(tenant, n),
    }
    outcome
}

/// Every request's jobs, in order, for `tenant`; the first fault found is the answer, its
/// message prefixed with the request's index (`jobs[3].params.duration_ms: …`).
async fn expand(
    state: &SharedState,
    reqs: &[SubmitRequest],
    tenant: &str,
    max_gpus: Option<u32>,
) -> Result<Vec<JobMessage>, JobError> {
    let total: u64 = reqs.iter().map(|r| u64::from(r.job_count())).sum();
    if reqs.is_empty() || total > u64::from(MAX_BATCH) {
        return Err(JobError::Invalid(format!(
            "jobs: a batch makes 1 to {MAX_BATCH} jobs (an array counts as its size), not {total}"
        )));
    }
    let mut msgs = Vec::with_capacity(total as usize);
    let mut breaking = vec![];
    for (i, req) in reqs.iter().enumerate() {
        let jobs = req.expand().map_err(|e| at_index(i, invalid_job(req, e)))?;
        let first = &jobs[0];
        gpu_quota(tenant, first.placement.gpus, max_gpus).map_err(|e| at_index(i, e))?;
        if let Some(knob) = worker_breaking_knob(&first.payload) {
            breaking.push((i, first.placement.pool.clone(), knob));
        }
        msgs.extend(jobs.into_iter().map(|m| m.for_tenant(tenant, max_gpus)));
    }
    for (i, pool, knob) in breaking {
        require_fault_injection(state, &pool, knob)
            .await
            .map_err(|e| at_index(i, e))?;
    }
    Ok(msgs)
}

/// A request's fault, named by its index in the batch.
fn at_index(i: usize, e: JobError) -> JobError {
    match e {
        JobError::Invalid(m) => JobError::Invalid(format!("jobs[{i}].{m}")),
        e => e,
    }
}

/// A fingerprint of what a batch asks for, after defaults are applied (see `body_hash`); it
/// never equals a single submission's.
pub fn batch_hash(reqs: &[SubmitRequest]) -> String {
    let canonical: Vec<_> = reqs.iter().map(|r| (r.validate().ok(), r.array)).collect();
    fingerprint(&serde_json::to_vec(&("batch", canonical)).expect("jobs serialize"))
}

async fn admitted(
    state: &SharedState,
    reqs: &[SubmitRequest],
    mut msgs: Vec<JobMessage>,
    idempotency_key: Option<String>,
) -> Result<BatchSubmitted, JobError> {
    let ticket = match idempotency_key {
        None => None,
        Some(key) => {
            let ids = msgs.iter().map(|m| m.id).collect();
            let tenant = msgs[0].tenant.clone();
            match state
                .idempotency
                .claim_batch(&tenant, &key, &batch_hash(reqs), ids)
                .await?
            {
                BatchClaim::Replay(ids) => {
                    return replay(state, ids, &msgs[0].placement.pool).await;
                }
                BatchClaim::Owned(ticket) => {
                    renumber(&mut msgs, &ticket.batch)?;
                    Some(ticket)
                }
            }
        }
    };
    // Once the records are stored, finish in a task of its own: a client that hangs up must
    // not leave records without messages, or a claimed key that is never released.
    let state = state.clone();
    tokio::spawn(async move { enqueue(&state, msgs, ticket).await }.instrument(Span::current()))
        .await
        .map_err(|e| JobError::Internal(anyhow::Error::new(e).context("batch submit task")))?
}

/// Gives the jobs the ids of the claim (a takeover keeps those of the request that died), an
/// array's members the id of its first job.
fn renumber(msgs: &mut [JobMessage], ids: &[JobId]) -> Result<(), JobError> {
    if ids.len() != msgs.len() {
        return Err(JobError::Internal(anyhow::anyhow!(
            "the idempotency claim names {} jobs for a batch of {}",
            ids.len(),
            msgs.len()
        )));
    }
    let new: HashMap<JobId, JobId> = msgs.iter().map(|m| m.id).zip(ids.iter().copied()).collect();
    for msg in msgs.iter_mut() {
        msg.id = new[&msg.id];
        if let Some(member) = &mut msg.array {
            member.id = new[&member.id];
        }
    }
    Ok(())
}

/// The jobs an earlier request with the key made, with their statuses now.
async fn replay(
    state: &SharedState,
    ids: Vec<JobId>,
    pool: &str,
) -> Result<BatchSubmitted, JobError> {
    let mut jobs = Vec::with_capacity(ids.len());
    for id in ids {
        let status = state
            .store
            .get(id)
            .await?
            .map_or(JobStatus::Queued, |r| r.status);
        jobs.push((id, status));
    }
    state
        .metrics
        .idempotent_replays
        .with_label_values(&[pool])
        .inc();
    Ok(BatchSubmitted::Replayed(jobs))
}

async fn enqueue(
    state: &SharedState,
    msgs: Vec<JobMessage>,
    ticket: Option<Ticket>,
) -> Result<BatchSubmitted, JobError> {
    let ticket = ticket.as_ref();
    if let Err(e) = store_records(state, &msgs, ticket).await {
        give_up_claim(state, ticket, false).await;
        return Err(e.into());
    }
    let started = Instant::now();
    let results = state.broker.publish_jobs(&msgs).await;
    let confirm_s = started.elapsed().as_secs_f64();
    let mut failed = Failed::default();
    for (msg, result) in msgs.iter().zip(results) {
        match result {
            Ok(()) => {
                state
                    .metrics
                    .confirm_seconds
                    .with_label_values(&[msg.placement.pool.as_str()])
                    .observe(confirm_s);
                count_submitted(state, msg);
            }
            Err(e) => {
                count_publish_failure(state, &e);
                if e.ambiguous() {
                    failed.unsure += 1;
                } else {
                    failed.refused += 1;
                    // In a takeover the request that died may have published it: kept.
                    if !ticket.is_some_and(|t| t.taken_over) {
                        withdraw(state, msg.id, ticket).await;
                    }
                }
                failed.first.get_or_insert((e, msg.placement.pool.clone()));
            }
        }
    }
    let Some((source, pool)) = failed.first else {
        finish_claim(state, ticket).await;
        tracing::debug!(jobs = msgs.len(), "batch accepted");
        return Ok(BatchSubmitted::Accepted(
            msgs.iter().map(|m| m.id).collect(),
        ));
    };
    let total = msgs.len();
    let confirmed = total - failed.refused - failed.unsure;
    tracing::warn!(
        error.message = %source,
        reason = source.reason(),
        total,
        confirmed,
        unsure = failed.unsure,
        "batch not accepted whole by the broker"
    );
    // Jobs that may be queued keep their ids: a retry with the key republishes them all
    // (workers deduplicate by id) instead of making new ones.
    give_up_claim(state, ticket, confirmed + failed.unsure > 0).await;
    if failed.refused == total && matches!(source, crate::broker::PublishError::Unroutable) {
        return Err(JobError::NoWorkerForPool(pool));
    }
    Err(JobError::BatchNotAccepted {
        source,
        total,
        confirmed,
        unsure: failed.unsure,
        keyed: ticket.is_some(),
    })
}

#[derive(Default)]
struct Failed {
    refused: usize,
    unsure: usize,
    first: Option<(crate::broker::PublishError, String)>,
}

/// Inserts the batch's `queued` records in one write, owned by the idempotency claim when
/// there is one. In a takeover the request that died may have stored some: they are adopted,
/// so that request (dead, or only slow) can no longer withdraw them.
async fn store_records(
    state: &SharedState,
    msgs: &[JobMessage],
    ticket: Option<&Ticket>,
) -> Result<(), StoreError> {
    let records: Vec<JobRecord> = msgs.iter().map(JobRecord::queued).collect();
    let owner = ticket.map(|t| t.owner.as_str());
    let existed = state.store.insert_many(&records, owner).await?;
    let Some(t) = ticket.filter(|t| t.taken_over) else {
        return match existed.first() {
            None => Ok(()),
            Some(id) => Err(StoreError::Conflict(*id)),
        };
    };
    for id in existed {
        if state.store.adopt(id, &t.owner).await?.is_none() {
            // Withdrawn meanwhile by the request taken over from: stored again.
            let record = records
                .iter()
                .find(|r| r.id == id)
                .expect("a record of the batch");
            match state.store.insert_owned(record, &t.owner).await {
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reqs(body: &str) -> Vec<SubmitRequest> {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn a_taken_over_claims_ids_renumber_the_batch_and_its_arrays() {
        let r =
            reqs(r#"[{"kind":"simulate"},{"kind":"command","params":{"program":"sh"},"array":2}]"#);
        let mut msgs: Vec<JobMessage> = r.iter().flat_map(|r| r.expand().unwrap()).collect();
        let ids: Vec<JobId> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
        renumber(&mut msgs, &ids).unwrap();
        assert_eq!(msgs.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
        assert_eq!(msgs[2].array.unwrap().id, ids[1]);
        assert!(renumber(&mut msgs, &ids[..2]).is_err());
    }

    #[test]
    fn batches_asking_for_the_same_jobs_hash_alike_and_unlike_a_single_job() {
        let a = reqs(
            r#"[{"kind":"simulate","params":{"duration_ms":5}},{"kind":"simulate","array":3}]"#,
        );
        let b = reqs(
            r#"[{"params":{"duration_ms":5},"kind":"simulate","gpus":1},{"kind":"simulate","array":3,"pool":"default"}]"#,
        );
        let c = reqs(
            r#"[{"kind":"simulate","params":{"duration_ms":5}},{"kind":"simulate","array":4}]"#,
        );
        assert_eq!(batch_hash(&a), batch_hash(&b));
        assert_ne!(batch_hash(&a), batch_hash(&c));
        let single = a[0].expand().unwrap().remove(0);
        assert_ne!(
            batch_hash(&a[..1]),
            gpuq_common::coord::idempotency::body_hash(&single)
        );
    }
}
