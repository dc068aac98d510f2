//! The delivery protocol's decisions (docs/design.md, "A job's path" steps 3–8 and "Giving back
//! without burning the delivery budget"), as plain code over facts: the delivery's headers, the
//! placement answer, the lease answer, the stored record, the run's end and the store's answer.
//! Each function returns what to do; `process` does it on RabbitMQ, Redis and the store. Nothing
//! here touches the network, so every row of the crash table is a unit test (`tests.rs`).

use std::time::Duration;

use gpuq_common::JobStatus;

/// Deliveries a job had before a give-back republished it (the broker's count restarts).
pub const PRIOR_DELIVERIES_HEADER: &str = "x-gpuq-prior-deliveries";

pub use gpuq_common::coord::lease::{ALIVE_TTL, Acquire};
pub use gpuq_common::coord::quota::Quota;

/// How long a delivery waits on a lease held by a live owner before it gives the job back.
pub const LEASE_WAIT: Duration = Duration::from_secs(4);
/// Between two tries of a held lease.
pub const LEASE_POLL: Duration = Duration::from_millis(250);
/// Between two tries of the lease while Redis does not answer.
pub const REDIS_POLL: Duration = Duration::from_millis(500);

/// What the broker's and gpuq's headers say about one delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Arrival {
    /// The broker's `redelivered` flag.
    pub redelivered: bool,
    /// `x-delivery-count`: returns of this copy of the message.
    pub delivery_count: u64,
    /// `x-gpuq-prior-deliveries`: returns of earlier copies, carried over by give-backs.
    pub prior_deliveries: u64,
    /// `x-gpuq-attempt-offset`: attempts of earlier drives (a re-driven dead letter).
    pub attempt_offset: u64,
}

impl Arrival {
    /// The attempt number this delivery runs as (1 for the first).
    pub fn attempt(&self) -> u32 {
        (self.attempt_offset + self.returns() + 1) as u32
    }

    /// Returns over every copy of the job in this drive: what a give-back carries forward.
    pub fn returns(&self) -> u64 {
        self.prior_deliveries + self.delivery_count
    }

    /// The first delivery of a freshly submitted job: its record is `queued` in the store, so
    /// the store need not be read before it runs.
    pub fn is_first(&self) -> bool {
        !self.redelivered && self.returns() == 0 && self.attempt_offset == 0
    }

    /// Counted as a redelivery in the metrics.
    pub fn is_redelivery(&self) -> bool {
        self.redelivered || self.delivery_count > 0
    }

    /// A given-back copy whose returns are past the limit: the broker cannot see them, so the
    /// worker applies the broker's rule. A copy never given back is left to the broker.
    pub fn over_budget(&self, delivery_limit: u32) -> bool {
        self.prior_deliveries > 0 && past_delivery_limit(self.returns(), delivery_limit)
    }
}

/// Whether a job returned `returns` times (failed or lost deliveries, over every copy of it) is
/// past its budget. The rule the broker applies to one copy, for copies given back: a quorum
/// queue dead-letters a message once it has been returned *more* times than `x-delivery-limit`,
/// so a limit of 5 allows 6 attempts.
pub fn past_delivery_limit(returns: u64, limit: u32) -> bool {
    returns > u64::from(limit)
}

/// A job's deadline (ms since the epoch): its `ttl_s` after it was made, else the queue's TTL.
/// It is computed from the message body (`created_at_ms`, `ttl_s`), which every copy a
/// give-back makes carries unchanged, so no give-back restarts the job's clock.
pub fn deadline_ms(created_at_ms: i64, ttl_s: Option<u64>, queue_ttl_ms: u64) -> i64 {
    let ttl_ms = ttl_s.map_or(queue_ttl_ms, |s| s.saturating_mul(1000));
    created_at_ms.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
}

/// What is left of a job's time at `now_ms`, as a per-message TTL for a given-back copy (so the
/// broker expires it where it waits); `None` once the deadline passed.
pub fn remaining_ttl_ms(deadline_ms: i64, now_ms: i64) -> Option<u64> {
    u64::try_from(deadline_ms.saturating_sub(now_ms))
        .ok()
        .filter(|ms| *ms > 0)
}

/// A delivery that arrives past its job's deadline: dead-lettered `expired`, not run. (The
/// broker expires a message only when it reaches the head of its queue.)
pub fn arrival(deadline_ms: i64, now_ms: i64) -> Action {
    match remaining_ttl_ms(deadline_ms, now_ms) {
        Some(_) => Action::Proceed,
        None => expired(),
    }
}

/// The dead-letter reason of a job whose deadline passed.
pub const EXPIRED: &str = "expired";

/// Dead-letter `expired`: the job's `ttl_s` (or the queue's TTL) passed before it could run.
pub fn expired() -> Action {
    Action::DeadLetter {
        reason: EXPIRED,
        error: "expired: its ttl passed before it could run".into(),
    }
}

/// What to do with a delivery (or, with `Proceed`, that the next step may run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Go on to the next step of the job's path.
    Proceed,
    /// Ask again after this long.
    Wait(Duration),
    /// The job already has its result: ack without running (a suppressed duplicate).
    Suppress,
    /// A client cancelled it before it started: record `cancelled` (conditional), ack, run
    /// nothing.
    RecordCancelled,
    /// Not the job's fault: republish it (confirmed) with its returns so far, then ack, after
    /// `delay`; `release_lease` when this process holds its lease.
    GiveBack {
        reason: &'static str,
        delay: Duration,
        release_lease: bool,
    },
    /// Nack with requeue: the broker counts it toward the delivery limit.
    Requeue,
    /// Publish to the dead letters with a reason (confirmed), then ack.
    DeadLetter { reason: &'static str, error: String },
}

const fn give_back(reason: &'static str, delay: Duration, release_lease: bool) -> Action {
    Action::GiveBack {
        reason,
        delay,
        release_lease,
    }
}

/// A given-back copy past its budget (`Arrival::over_budget`), given the stored status if the
/// store could be read: a job that already has its result is a duplicate (its ack was lost),
/// not a dead letter.
pub fn over_budget(stored: Option<JobStatus>) -> Action {
    match stored {
        Some(s) if s.is_final() => Action::Suppress,
        _ => Action::DeadLetter {
            reason: "delivery_limit",
            error: "delivery limit reached".into(),
        },
    }
}

/// The answer of the GPU slots to a job's placement (step 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Concrete free healthy GPUs are reserved for it.
    Placed,
    /// This engine could place it, but its GPUs are busy now.
    Busy,
    /// The job already runs in this process (its first delivery's channel dropped).
    AlreadyHere,
    /// This engine can never place it; `pool_can_place` is whether any engine of the pool could
    /// (`None`: unknown, e.g. Redis did not answer).
    Never { pool_can_place: Option<bool> },
}

/// Step 3: where the job runs, or why it does not run here.
pub fn placement(p: Placement, pool: &str, gpus: u32, min_gpu_memory_mb: u64) -> Action {
    match p {
        Placement::Placed => Action::Proceed,
        Placement::Busy => give_back("no_free_gpu", Duration::from_millis(200), false),
        // One run only: the first stores the result and sets the done marker; this copy,
        // given back once the liveness window has passed, is then acked as a duplicate.
        Placement::AlreadyHere => give_back("running_here", ALIVE_TTL, false),
        Placement::Never {
            pool_can_place: Some(false),
        } => Action::DeadLetter {
            reason: "unschedulable",
            error: format!("no engine in pool {pool} has {gpus} GPUs with {min_gpu_memory_mb} MB"),
        },
        // An engine that could place it exists, or may come back: not a dead letter.
        Placement::Never { .. } => give_back("not_placeable_here", Duration::from_secs(1), false),
    }
}

/// Step 4: the lease. `answer` is `None` when Redis did not answer; `waited` is how long this
/// delivery has been asking; `stopping` whether the worker is shutting down.
pub fn lease(answer: Option<Acquire>, waited: Duration, stopping: bool) -> Action {
    match answer {
        // No job runs without a lease: wait for Redis, unless stopping.
        None if stopping => give_back("shutdown", Duration::ZERO, false),
        None => Action::Wait(REDIS_POLL),
        Some(Acquire::Done) => Action::Suppress,
        Some(Acquire::Cancelled) => Action::RecordCancelled,
        // A live owner may be about to finish (or to die): wait briefly, then give it back
        // without burning its budget.
        Some(Acquire::Held) if waited < LEASE_WAIT => Action::Wait(LEASE_POLL),
        Some(Acquire::Held) => give_back("lease_held", Duration::ZERO, false),
        Some(Acquire::Taken | Acquire::TakenOver) => Action::Proceed,
    }
}

/// How long a job over its tenant's GPU quota is held before it goes back to its queue.
pub const QUOTA_RETRY: Duration = Duration::from_secs(1);

/// Step 4b, under the lease, for a job whose tenant has a GPU quota: `answer` is `None` when
/// Redis did not answer. A job over the quota waits in its queue, its budget intact.
pub fn tenant_quota(answer: Option<Quota>) -> Action {
    match answer {
        Some(Quota::Granted) => Action::Proceed,
        Some(Quota::Full { .. }) => give_back("tenant_gpu_quota", QUOTA_RETRY, true),
        // The quota cannot be checked: not the job's fault, and no reason to pass it.
        None => give_back("tenant_gpu_quota_unknown", QUOTA_RETRY, true),
    }
}

/// Step 5, under the lease: `stored` is the job's stored status for a redelivery (`Ok(None)`: no
/// record, `Err`: the store could not be read), ignored for a first delivery.
pub fn before_start(first: bool, stored: Result<Option<JobStatus>, ()>, stopping: bool) -> Action {
    if !first {
        match stored {
            // Its result was stored, but the done marker was lost (with Redis) or never set.
            Ok(Some(s)) if s.is_final() => return Action::Suppress,
            Ok(_) => {}
            Err(()) => return Action::Requeue,
        }
    }
    if stopping {
        // Running jobs get the grace period; a delivery not started yet goes back.
        return give_back("shutdown", Duration::ZERO, true);
    }
    Action::Proceed
}

/// How the engine's run of the job ended (step 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    Succeeded,
    Failed,
    /// A client's cancel stopped it.
    Cancelled,
    /// The attempt failed in a way worth retrying.
    Retry,
    /// The worker stopped it (shutdown grace over, GPU lost, operator restart).
    Interrupted,
}

/// After the run (step 7/8): the final status to store, or what to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterRun {
    /// Store this final status (conditional write), then mark done and ack.
    Store(JobStatus),
    /// Note the attempt's error and nack for a retry (counted toward the delivery limit).
    RecordErrorAndRequeue,
    /// Not the job's fault: drop the lease and give it back.
    Then(Action),
}

pub fn after_run(end: RunEnd) -> AfterRun {
    match end {
        RunEnd::Succeeded => AfterRun::Store(JobStatus::Succeeded),
        RunEnd::Failed => AfterRun::Store(JobStatus::Failed),
        RunEnd::Cancelled => AfterRun::Store(JobStatus::Cancelled),
        RunEnd::Retry => AfterRun::RecordErrorAndRequeue,
        RunEnd::Interrupted => AfterRun::Then(give_back("interrupted", Duration::ZERO, true)),
    }
}

/// The store's answer to the final write (after its retries while unavailable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// This write is the job's result.
    Stored,
    /// Another final result was there first.
    AlreadyFinal(JobStatus),
    /// The store has no record of the job.
    NotFound,
    /// Answered by drive-conditional writes only; never to the worker's plain write.
    Superseded,
    /// The write failed for another reason than an outage.
    Failed,
}

/// What ends a delivery once the final write was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Mark done and ack; the result is this run's.
    Ack,
    /// Mark done and ack; the run was stopped by a cancel already recorded.
    AckCancelled,
    /// Mark done and ack; another final result was first, this one is discarded.
    AckDiscarded,
    /// Recreate the record (`start_attempt`), then write the result again.
    RecreateAndStoreAgain,
    /// Never ack a job whose result is not stored: nack for a retry.
    Requeue,
}

/// Step 7. `ran` is the status this run tried to store; `recreated` whether the record was
/// already recreated once for this delivery.
pub fn after_store(answer: Stored, ran: JobStatus, recreated: bool) -> Finish {
    match answer {
        Stored::Stored => Finish::Ack,
        Stored::AlreadyFinal(JobStatus::Cancelled) if ran == JobStatus::Cancelled => {
            Finish::AckCancelled
        }
        Stored::AlreadyFinal(_) => Finish::AckDiscarded,
        // Lost, or removed by the gateway after a missing confirm the broker did take.
        Stored::NotFound if !recreated => Finish::RecreateAndStoreAgain,
        Stored::NotFound | Stored::Superseded | Stored::Failed => Finish::Requeue,
    }
}

#[cfg(test)]
mod tests;
