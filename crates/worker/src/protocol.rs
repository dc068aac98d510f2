//! The delivery protocol's decisions (docs/design.md, "A job's path" steps 3–8 and "Giving back
//! without burning the delivery budget"), as plain code over facts: the delivery's headers, the
//! placement answer, the lease answer, the stored record, the run's end and the store's answer.
//! Each function returns what to do; `process` does it on RabbitMQ, Redis and the store. Nothing
//! here touches the network, so every row of the crash table is a unit test below.

use std::time::Duration;

use gpuq_common::JobStatus;

/// Deliveries a job had before a give-back republished it (the broker's count restarts).
pub const PRIOR_DELIVERIES_HEADER: &str = "x-gpuq-prior-deliveries";

pub use gpuq_common::coord::lease::{ALIVE_TTL, Acquire};

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
mod tests {
    use super::*;

    fn redelivery(count: u64) -> Arrival {
        Arrival {
            redelivered: true,
            delivery_count: count,
            ..Default::default()
        }
    }

    fn is_give_back(a: &Action, why: &str) -> bool {
        matches!(a, Action::GiveBack { reason, .. } if *reason == why)
    }

    // --- "What each crash costs" -------------------------------------------------------------

    #[test]
    fn crash_row_worker_mid_job_the_redelivery_takes_over_a_dead_owners_lease_and_reruns() {
        let a = redelivery(1);
        assert!(!a.is_first() && a.is_redelivery());
        assert_eq!(a.attempt(), 2);
        assert_eq!(
            lease(Some(Acquire::TakenOver), Duration::ZERO, false),
            Action::Proceed
        );
        // No result stored yet: it runs.
        assert_eq!(
            before_start(false, Ok(Some(JobStatus::Running)), false),
            Action::Proceed
        );
    }

    #[test]
    fn crash_row_worker_mid_job_a_live_owner_is_waited_on_then_the_job_given_back_not_requeued() {
        assert_eq!(
            lease(Some(Acquire::Held), Duration::from_millis(100), false),
            Action::Wait(LEASE_POLL)
        );
        // Waited past the liveness window of a dead owner: the owner is alive.
        assert!(LEASE_WAIT > ALIVE_TTL);
        let a = lease(Some(Acquire::Held), LEASE_WAIT, false);
        assert!(is_give_back(&a, "lease_held"), "{a:?}");
    }

    #[test]
    fn crash_row_worker_after_storing_before_the_ack_is_acked_without_running() {
        // The done marker was set: suppressed in the lease round trip.
        assert_eq!(
            lease(Some(Acquire::Done), Duration::ZERO, false),
            Action::Suppress
        );
        // The done marker was lost (with Redis): the store shows it final.
        for s in [
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
            JobStatus::DeadLettered,
        ] {
            assert_eq!(before_start(false, Ok(Some(s)), false), Action::Suppress);
        }
    }

    #[test]
    fn crash_row_ack_in_flight_a_redelivered_copy_with_its_result_stored_is_a_duplicate() {
        assert_eq!(
            before_start(false, Ok(Some(JobStatus::Succeeded)), false),
            Action::Suppress
        );
        // Even a given-back copy past its budget: a lost ack is not a dead letter.
        assert_eq!(over_budget(Some(JobStatus::Succeeded)), Action::Suppress);
    }

    #[test]
    fn crash_row_redis_no_job_runs_without_a_lease_and_the_worker_waits_for_redis() {
        assert_eq!(
            lease(None, Duration::from_secs(60), false),
            Action::Wait(REDIS_POLL)
        );
        // Unless it is stopping: then the job goes back, budget intact.
        let a = lease(None, Duration::ZERO, true);
        assert!(is_give_back(&a, "shutdown"), "{a:?}");
    }

    #[test]
    fn crash_row_store_nothing_is_acked_until_stored() {
        // A record that cannot be read before the run: retried later, not run blind.
        assert_eq!(before_start(false, Err(()), false), Action::Requeue);
        // A final write the store refused: never acked.
        assert_eq!(
            after_store(Stored::Failed, JobStatus::Succeeded, false),
            Finish::Requeue
        );
        assert_eq!(
            after_store(Stored::Superseded, JobStatus::Succeeded, false),
            Finish::Requeue
        );
        // A missing record is recreated once, then the result written again.
        assert_eq!(
            after_store(Stored::NotFound, JobStatus::Succeeded, false),
            Finish::RecreateAndStoreAgain
        );
        assert_eq!(
            after_store(Stored::NotFound, JobStatus::Succeeded, true),
            Finish::Requeue
        );
    }

    #[test]
    fn crash_row_a_job_that_keeps_failing_is_retried_then_dead_lettered_with_its_reason() {
        assert_eq!(after_run(RunEnd::Retry), AfterRun::RecordErrorAndRequeue);
        // A given-back copy out of budget, with no result: dead-lettered as delivery_limit.
        let a = Arrival {
            redelivered: true,
            delivery_count: 2,
            prior_deliveries: 4,
            attempt_offset: 0,
        };
        assert!(a.over_budget(5));
        assert_eq!(
            over_budget(Some(JobStatus::Running)),
            Action::DeadLetter {
                reason: "delivery_limit",
                error: "delivery limit reached".into()
            }
        );
        assert_eq!(over_budget(None), over_budget(Some(JobStatus::Queued)));
    }

    // --- "A job's path" ----------------------------------------------------------------------

    #[test]
    fn path_first_delivery_skips_the_store_read_and_runs() {
        let a = Arrival::default();
        assert!(a.is_first() && !a.is_redelivery());
        assert_eq!(a.attempt(), 1);
        // The store is not consulted for a first delivery, whatever it would say.
        assert_eq!(before_start(true, Err(()), false), Action::Proceed);
    }

    #[test]
    fn path_a_re_driven_job_counts_its_earlier_attempts_and_is_never_a_first_delivery() {
        let a = Arrival {
            attempt_offset: 6,
            ..Default::default()
        };
        assert!(!a.is_first());
        assert_eq!(a.attempt(), 7);
    }

    #[test]
    fn path_a_cancel_before_the_start_is_recorded_and_nothing_runs() {
        assert_eq!(
            lease(Some(Acquire::Cancelled), Duration::ZERO, false),
            Action::RecordCancelled
        );
    }

    #[test]
    fn path_placement_busy_gpus_give_back_a_job_no_engine_can_place_is_unschedulable() {
        assert_eq!(placement(Placement::Placed, "p", 1, 0), Action::Proceed);
        let a = placement(Placement::Busy, "p", 1, 0);
        assert!(is_give_back(&a, "no_free_gpu"), "{a:?}");
        let a = placement(Placement::AlreadyHere, "p", 1, 0);
        assert_eq!(a, give_back("running_here", ALIVE_TTL, false));
        let a = placement(
            Placement::Never {
                pool_can_place: Some(false),
            },
            "default",
            64,
            0,
        );
        assert_eq!(
            a,
            Action::DeadLetter {
                reason: "unschedulable",
                error: "no engine in pool default has 64 GPUs with 0 MB".into()
            }
        );
        // Another engine could, or Redis cannot tell: give it back.
        for can in [Some(true), None] {
            let a = placement(
                Placement::Never {
                    pool_can_place: can,
                },
                "p",
                2,
                0,
            );
            assert!(is_give_back(&a, "not_placeable_here"), "{a:?}");
        }
    }

    #[test]
    fn path_stopping_gives_back_a_delivery_not_started_yet_and_releases_its_lease() {
        assert_eq!(
            before_start(true, Ok(None), true),
            give_back("shutdown", Duration::ZERO, true)
        );
    }

    #[test]
    fn path_run_ends_map_to_final_writes_retries_and_give_backs() {
        assert_eq!(
            after_run(RunEnd::Succeeded),
            AfterRun::Store(JobStatus::Succeeded)
        );
        assert_eq!(
            after_run(RunEnd::Failed),
            AfterRun::Store(JobStatus::Failed)
        );
        assert_eq!(
            after_run(RunEnd::Cancelled),
            AfterRun::Store(JobStatus::Cancelled)
        );
        assert_eq!(
            after_run(RunEnd::Interrupted),
            AfterRun::Then(give_back("interrupted", Duration::ZERO, true))
        );
    }

    #[test]
    fn path_first_final_result_wins_and_a_cancel_recorded_meanwhile_is_not_a_discard() {
        assert_eq!(
            after_store(Stored::Stored, JobStatus::Failed, false),
            Finish::Ack
        );
        assert_eq!(
            after_store(
                Stored::AlreadyFinal(JobStatus::Cancelled),
                JobStatus::Cancelled,
                false
            ),
            Finish::AckCancelled
        );
        assert_eq!(
            after_store(
                Stored::AlreadyFinal(JobStatus::Cancelled),
                JobStatus::Succeeded,
                false
            ),
            Finish::AckDiscarded
        );
        assert_eq!(
            after_store(
                Stored::AlreadyFinal(JobStatus::Succeeded),
                JobStatus::Succeeded,
                false
            ),
            Finish::AckDiscarded
        );
    }

    // --- "Giving back without burning the delivery budget" -----------------------------------

    #[test]
    fn give_back_a_given_back_job_gets_the_attempts_the_broker_would_give_it() {
        // Limit 5: the broker delivers a message returned 5 times once more (the 6th
        // attempt, measured on 3.10: an always-failing job ends with attempts 6) and
        // dead-letters it on its 6th return.
        assert!(!past_delivery_limit(5, 5));
        assert!(past_delivery_limit(6, 5));
        assert!(!past_delivery_limit(1, 1));
        assert!(past_delivery_limit(2, 1));
    }

    #[test]
    fn give_back_carries_the_returns_so_far_and_the_attempt_number_continues() {
        // A copy returned twice, given back: the new copy arrives with prior 2, count 0.
        let before = redelivery(2);
        let after = Arrival {
            redelivered: false,
            delivery_count: 0,
            prior_deliveries: before.returns(),
            attempt_offset: 0,
        };
        assert_eq!(after.returns(), 2);
        assert_eq!(after.attempt(), before.attempt());
        // Not a first delivery: its record may be final already.
        assert!(!after.is_first());
    }

    #[test]
    fn give_back_the_broker_judges_copies_never_given_back_the_worker_judges_the_others() {
        // A copy never given back: the broker counts, the worker does not dead-letter it.
        assert!(!redelivery(50).over_budget(5));
        let given_back = |prior, count| Arrival {
            redelivered: count > 0,
            delivery_count: count,
            prior_deliveries: prior,
            attempt_offset: 0,
        };
        assert!(!given_back(3, 2).over_budget(5));
        assert!(given_back(3, 3).over_budget(5));
        assert!(given_back(6, 0).over_budget(5));
    }

    #[test]
    fn give_back_keeps_the_jobs_deadline_and_past_it_the_job_is_expired() {
        // ttl_s 3 from t=1000: the deadline is 4000 whatever the copy.
        let d = deadline_ms(1000, Some(3), 86_400_000);
        assert_eq!(d, 4000);
        // Without ttl_s the queue's TTL applies, from the job's creation, not the copy's.
        assert_eq!(deadline_ms(1000, None, 60_000), 61_000);
        // A copy given back at t=2500 may wait 1500 ms more in the queue, not another 3 s.
        assert_eq!(remaining_ttl_ms(d, 2500), Some(1500));
        assert_eq!(remaining_ttl_ms(d, 4000), None);
        assert_eq!(remaining_ttl_ms(d, 9000), None);
        assert_eq!(arrival(d, 3999), Action::Proceed);
        assert!(matches!(
            arrival(d, 4000),
            Action::DeadLetter {
                reason: "expired",
                ..
            }
        ));
        assert_eq!(
            deadline_ms(i64::MAX - 1, Some(u64::MAX), 0),
            i64::MAX,
            "no overflow"
        );
    }

    #[test]
    fn give_back_contention_capacity_and_shutdown_never_requeue() {
        // Each way a job that is not at fault leaves a worker keeps its budget.
        let not_at_fault = [
            placement(Placement::Busy, "p", 1, 0),
            placement(Placement::AlreadyHere, "p", 1, 0),
            placement(
                Placement::Never {
                    pool_can_place: None,
                },
                "p",
                1,
                0,
            ),
            lease(Some(Acquire::Held), LEASE_WAIT, false),
            lease(None, Duration::ZERO, true),
            before_start(true, Ok(None), true),
        ];
        for a in not_at_fault {
            assert!(matches!(a, Action::GiveBack { .. }), "{a:?}");
        }
        assert!(matches!(
            after_run(RunEnd::Interrupted),
            AfterRun::Then(Action::GiveBack { .. })
        ));
    }
}
