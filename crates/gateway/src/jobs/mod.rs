//! The job operations behind the REST routes: submit (store, then publish, then 202 only after
//! the confirm), cancel, and re-drive a dead letter. Handlers stay thin; the rules live here,
//! with no HTTP type: they fail with a `JobError` (`error.rs`), which the routes map to statuses.

mod array;
mod batch;
mod error;
mod redrive;

pub use array::cancel_array;
pub use batch::{BatchSubmitted, MAX_BATCH, batch_hash, submit_batch};
pub use error::JobError;
pub use redrive::{message_from_record, retry_dead_letter};

use std::time::Duration;

use gpuq_common::job::{
    CommandParams, FinalOutcome, JobId, JobKind, JobMessage, JobPayload, JobRecord, JobStatus,
    SimulateParams, SubmitRequest, ValidationError,
};
use gpuq_common::store::{FinishOutcome, StoreError};
use gpuq_common::tenancy::Principal;
use tracing::{Instrument, Span, instrument};

use crate::broker::PublishError;
use crate::state::SharedState;
use gpuq_common::coord::idempotency::{Claim, Ticket, body_hash};

/// The outcome of an accepted submission.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    /// Stored and confirmed by the broker now.
    Accepted(JobId),
    /// An earlier request with the same `Idempotency-Key` made this job; nothing new enqueued.
    Replayed { id: JobId, status: JobStatus },
}

/// Validates, admits under the tenant's limits, deduplicates by `Idempotency-Key` (per
/// tenant), stores and publishes one job of `who`'s tenant.
#[instrument(skip_all, fields(job_id = tracing::field::Empty, tenant = %who.tenant, pool = %req.pool, kind = req.kind.as_str()))]
pub async fn submit(
    state: &SharedState,
    who: &Principal,
    req: SubmitRequest,
    idempotency_key: Option<String>,
) -> Result<Submitted, JobError> {
    if req.array.is_some() {
        return Err(JobError::Invalid(
            "array: a job array is submitted through POST /v1/jobs/batch".into(),
        ));
    }
    let (payload, placement) = req.validate().map_err(|e| invalid_job(&req, e))?;
    if let Some(knob) = worker_breaking_knob(&payload) {
        require_fault_injection(state, &placement.pool, knob).await?;
    }
    let tenant = who.tenant.as_str();
    let limits = state.quotas.limits(tenant);
    gpu_quota(tenant, placement.gpus, limits.max_gpus)?;
    let msg = JobMessage::new(payload, placement).for_tenant(tenant, limits.max_gpus);
    let counted = |outcome: &str| {
        state
            .metrics
            .tenant_submissions
            .with_label_values(&[tenant, outcome])
            .inc();
    };
    if let Err(refusal) = state.quotas.admit(tenant) {
        counted(refusal.reason());
        return Err(JobError::Throttled {
            message: refusal.message(tenant),
            retry_after_s: refusal.retry_after_s(),
        });
    }
    let outcome = admitted(state, msg, idempotency_key).await;
    match &outcome {
        Ok(Submitted::Accepted(_)) => counted("accepted"),
        // Nothing new was enqueued: it does not count against the tenant's unfinished jobs.
        Ok(Submitted::Replayed { .. }) | Err(_) => state.quotas.forget(tenant),
    }
    outcome
}

async fn admitted(
    state: &SharedState,
    mut msg: JobMessage,
    idempotency_key: Option<String>,
) -> Result<Submitted, JobError> {
    let ticket = match idempotency_key {
        None => None,
        Some(key) => match state
            .idempotency
            .claim(&msg.tenant, &key, &body_hash(&msg), msg.id)
            .await?
        {
            Claim::Replay(id) => {
                Span::current().record("job_id", tracing::field::display(id));
                return replay(state, id, &msg.placement.pool).await;
            }
            Claim::Owned(ticket) => {
                msg.id = ticket.id;
                Some(ticket)
            }
        },
    };
    Span::current().record("job_id", tracing::field::display(msg.id));
    // Once the record is stored, finish in a task of its own: a client that hangs up must not
    // leave a record without a message, or a claimed key that is never released.
    let state = state.clone();
    tokio::spawn(async move { enqueue(&state, msg, ticket).await }.instrument(Span::current()))
        .await
        .map_err(|e| JobError::Internal(anyhow::Error::new(e).context("submit task")))?
}

/// A job asking for more GPUs than its tenant's quota could never run: refused now rather than
/// waiting in the queue until it expires.
pub(super) fn gpu_quota(tenant: &str, gpus: u32, max: Option<u32>) -> Result<(), JobError> {
    match max {
        Some(max) if gpus > max => Err(JobError::Invalid(format!(
            "gpus: {gpus} is more than tenant {tenant}'s GPU quota of {max}"
        ))),
        _ => Ok(()),
    }
}

/// The `simulate` knob, if any, that crashes or hangs the worker running the job.
pub(super) fn worker_breaking_knob(payload: &JobPayload) -> Option<&'static str> {
    match payload {
        JobPayload::Simulate(p) if p.crash_probability > 0.0 => Some("crash_probability"),
        JobPayload::Simulate(p) if p.hang_attempts > 0 => Some("hang_attempts"),
        _ => None,
    }
}

/// Knobs that crash or hang workers are for fault-injection fleets only (the tester, demos): a
/// pool of production workers refuses them with a 422 instead of losing engines to them.
pub(super) async fn require_fault_injection(
    state: &SharedState,
    pool: &str,
    knob: &str,
) -> Result<(), JobError> {
    match state.kv.pool_fault_injection(&state.keys, pool).await {
        Ok(Some(true)) => Ok(()),
        Ok(_) => Err(JobError::Invalid(format!(
            "params.{knob}: crashes or hangs workers; only for a pool whose live workers all run with fault injection (GPUQ_FAULT_INJECTION=true), which pool {pool} has not"
        ))),
        Err(source) => Err(JobError::Coordination {
            action: "check that the pool's workers run with fault injection",
            source,
        }),
    }
}

/// A 422 naming the field at fault. `validate` names only `params` when a parameter has the
/// wrong type; find which one.
pub(super) fn invalid_job(req: &SubmitRequest, e: ValidationError) -> JobError {
    if e.field == "params" && req.params.is_object() {
        let typed = match req.kind {
            JobKind::Simulate => {
                serde_path_to_error::deserialize::<_, SimulateParams>(&req.params).map(|_| ())
            }
            JobKind::Command => {
                serde_path_to_error::deserialize::<_, CommandParams>(&req.params).map(|_| ())
            }
        };
        if let Err(pe) = typed {
            let path = pe.path().to_string();
            if !path.is_empty() && path != "." && path != "?" {
                return JobError::Invalid(format!("params.{path}: {}", pe.inner()));
            }
        }
    }
    JobError::Invalid(e.to_string())
}

async fn enqueue(
    state: &SharedState,
    msg: JobMessage,
    ticket: Option<Ticket>,
) -> Result<Submitted, JobError> {
    let inserted = match store_record(state, &msg, ticket.as_ref()).await {
        Ok(Stored::Inserted) => true,
        Ok(Stored::Adopted) => false,
        Ok(Stored::Seen(status)) => {
            // The request that died stored it, and a worker has seen it: it was enqueued.
            finish_claim(state, ticket.as_ref()).await;
            return Ok(Submitted::Replayed { id: msg.id, status });
        }
        Err(e) => {
            give_up_claim(state, ticket.as_ref(), false).await;
            return Err(e.into());
        }
    };
    let started = std::time::Instant::now();
    match state.broker.publish_job(&msg).await {
        Ok(()) => {
            let pool = msg.placement.pool.as_str();
            state
                .metrics
                .confirm_seconds
                .with_label_values(&[pool])
                .observe(started.elapsed().as_secs_f64());
            count_submitted(state, &msg);
            finish_claim(state, ticket.as_ref()).await;
            tracing::debug!("job accepted");
            Ok(Submitted::Accepted(msg.id))
        }
        Err(e) => {
            count_publish_failure(state, &e);
            // Without a confirm the message may be in the queue and run: its record stays
            // `queued`, so the job is never invisible, and a retry with the key finds it.
            tracing::warn!(
                error.message = %e,
                reason = e.reason(),
                record_kept = e.ambiguous() || !inserted,
                "job not accepted by the broker"
            );
            if !e.ambiguous() && inserted {
                withdraw(state, msg.id, ticket.as_ref()).await;
            }
            give_up_claim(state, ticket.as_ref(), e.ambiguous()).await;
            Err(JobError::not_accepted(
                e,
                msg.id,
                &msg.placement.pool,
                ticket.is_some(),
            ))
        }
    }
}

/// How the submission's record came to be in the store.
enum Stored {
    /// This request inserted it.
    Inserted,
    /// In a takeover: the request that held the claim before stored it, and it is still
    /// `queued`; this request owns it now.
    Adopted,
    /// In a takeover: a worker has seen the job already (running or final).
    Seen(JobStatus),
}

/// Inserts the job's `queued` record, owned by the idempotency claim when there is one. In a
/// takeover the request that held the claim may have stored it already: then it is adopted, so
/// that request (dead, or only slow) can no longer withdraw it.
async fn store_record(
    state: &SharedState,
    msg: &JobMessage,
    ticket: Option<&Ticket>,
) -> Result<Stored, StoreError> {
    let record = JobRecord::queued(msg);
    // An insert and an adopt race only with the one withdrawal of the request taken over from.
    for _ in 0..3 {
        let inserted = match ticket {
            Some(t) => state.store.insert_owned(&record, &t.owner).await,
            None => state.store.insert(&record).await,
        };
        let owner = match (inserted, ticket) {
            (Ok(()), _) => return Ok(Stored::Inserted),
            (Err(StoreError::Conflict(_)), Some(t)) if t.taken_over => &t.owner,
            (Err(e), _) => return Err(e),
        };
        match state.store.adopt(msg.id, owner).await? {
            Some(JobStatus::Queued) => return Ok(Stored::Adopted),
            Some(status) => return Ok(Stored::Seen(status)),
            // Withdrawn meanwhile by the request taken over from: store it again.
            None => continue,
        }
    }
    Err(StoreError::Unavailable(
        format!(
            "the record of job {} changed under three attempts to store it",
            msg.id
        )
        .into(),
    ))
}

/// Removes the record of a job the broker refused for sure, unless a later request with the
/// same `Idempotency-Key` took the claim over and adopted the record: it relies on it.
pub(super) async fn withdraw(state: &SharedState, id: JobId, ticket: Option<&Ticket>) {
    match state
        .store
        .withdraw(id, ticket.map(|t| t.owner.as_str()))
        .await
    {
        Ok(true) => {}
        Ok(false) => tracing::info!(
            "the record is no longer this request's (a takeover of its idempotency claim adopted it); kept"
        ),
        Err(e) => tracing::error!(
            error.cause_chain = ?e,
            error.message = %e,
            "could not delete the record of a job the broker did not accept"
        ),
    }
}

async fn replay(state: &SharedState, id: JobId, pool: &str) -> Result<Submitted, JobError> {
    let status = state
        .store
        .get(id)
        .await?
        .map_or(JobStatus::Queued, |r| r.status);
    state
        .metrics
        .idempotent_replays
        .with_label_values(&[pool])
        .inc();
    Ok(Submitted::Replayed { id, status })
}

/// Marks the idempotency claim done. The job is enqueued whatever happens here: on failure the
/// claim stays pending and a retry takes it over with the same id, which workers deduplicate.
pub(super) async fn finish_claim(state: &SharedState, ticket: Option<&Ticket>) {
    let Some(ticket) = ticket else { return };
    match state.idempotency.commit(ticket).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!("the idempotency claim was taken over before it was committed"),
        Err(e) => tracing::warn!(
            error.cause_chain = ?e,
            error.message = %e,
            "could not commit the idempotency claim"
        ),
    }
}

/// After a failed submission: the key is released for a fresh job only when no job can exist
/// under its id. After an ambiguous publish, or in a takeover (the request that died may have
/// published), it keeps the id and opens for an immediate takeover, so a retry republishes the
/// same id (workers deduplicate it) instead of making a second job.
pub(super) async fn give_up_claim(
    state: &SharedState,
    ticket: Option<&Ticket>,
    may_be_queued: bool,
) {
    let Some(ticket) = ticket else { return };
    if may_be_queued || ticket.taken_over {
        abandon_claim(state, ticket).await;
    } else {
        release_claim(state, ticket).await;
    }
}

async fn abandon_claim(state: &SharedState, ticket: &Ticket) {
    if let Err(e) = state.idempotency.abandon(ticket).await {
        tracing::warn!(
            error.cause_chain = ?e,
            error.message = %e,
            "could not open the idempotency claim for a retry; it expires into a takeover"
        );
    }
}

async fn release_claim(state: &SharedState, ticket: &Ticket) {
    if let Err(e) = state.idempotency.release(ticket).await {
        tracing::warn!(
            error.cause_chain = ?e,
            error.message = %e,
            "could not release the idempotency claim; it expires into a takeover"
        );
    }
}

pub(super) fn count_submitted(state: &SharedState, msg: &JobMessage) {
    state
        .metrics
        .jobs_submitted
        .with_label_values(&[msg.placement.pool.as_str(), msg.payload.kind().as_str()])
        .inc();
}

pub(super) fn count_publish_failure(state: &SharedState, e: &PublishError) {
    state
        .metrics
        .publish_failures
        .with_label_values(&[e.reason()])
        .inc();
}

fn not_found(id: JobId) -> JobError {
    JobError::NotFound(id)
}

/// The job's record if `who` may see it. Another tenant's job is "not found", exactly like a
/// job that does not exist, so its existence does not leak.
pub async fn visible(
    state: &SharedState,
    who: &Principal,
    id: JobId,
) -> Result<JobRecord, JobError> {
    match state.store.get(id).await? {
        Some(r) if who.sees(&r.tenant) => Ok(r),
        _ => Err(not_found(id)),
    }
}

/// How often a waiting read looks at the record: a final status is answered within this.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// A job's record; with a `wait`, not before it is final or the wait is over.
pub async fn read(
    state: &SharedState,
    who: &Principal,
    id: JobId,
    wait: Duration,
) -> Result<JobRecord, JobError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let record = visible(state, who, id).await?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if record.status.is_final() || left.is_zero() {
            return Ok(record);
        }
        tokio::time::sleep(WAIT_POLL.min(left)).await;
    }
}

/// Cancels a queued or running job: its final status becomes `cancelled` (first final write
/// wins), and a running job's worker is told through Redis to stop it.
#[instrument(skip_all, fields(job_id = %id, tenant = %who.tenant))]
pub async fn cancel(
    state: &SharedState,
    who: &Principal,
    id: JobId,
) -> Result<JobRecord, JobError> {
    let record = visible(state, who, id).await?;
    if record.status.is_final() {
        return Err(JobError::AlreadyFinal {
            id,
            status: record.status,
        });
    }
    if record.status == JobStatus::Running {
        // Without the signal the GPU would keep running a job nobody wants: refuse instead.
        signal_cancel(state, id).await.map_err(|source| {
            tracing::warn!(error.cause_chain = ?source, error.message = %source, "cannot signal the cancel");
            JobError::Coordination {
                action: "stop the running job",
                source,
            }
        })?;
    }
    let outcome = FinalOutcome::cancelled(None, None);
    match state.store.finish(id, &outcome).await? {
        FinishOutcome::Stored => {}
        FinishOutcome::AlreadyFinal(status) => {
            return Err(JobError::AlreadyFinal { id, status });
        }
        FinishOutcome::NotFound => return Err(not_found(id)),
        // Only a drive-conditional write (`finish_drive`) answers this.
        FinishOutcome::Superseded => {
            return Err(JobError::Internal(anyhow::anyhow!(
                "the store answered `superseded` to a plain final write of job {id}"
            )));
        }
    }
    if record.status == JobStatus::Queued
        && let Err(e) = signal_cancel(state, id).await
    {
        // It was queued when we looked; should it have started since, its result is
        // discarded by the store (the cancel was the first final write), only not stopped early.
        tracing::warn!(error.cause_chain = ?e, error.message = %e, "cancel signal not set");
    }
    tracing::info!("job cancelled");
    state.store.get(id).await?.ok_or_else(|| not_found(id))
}

async fn signal_cancel(
    state: &SharedState,
    id: JobId,
) -> Result<(), gpuq_common::coord::CoordError> {
    state
        .kv
        .signal_cancel(&state.keys, id, state.cancel_ttl_s)
        .await
}
