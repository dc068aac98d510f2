//! The delivery protocol's unit tests: every row of the crash table in docs/design.md and every
//! give-back rule, with no network.

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

#[test]
fn a_job_over_its_tenants_gpu_quota_waits_in_its_queue_budget_intact() {
    assert_eq!(tenant_quota(Some(Quota::Granted)), Action::Proceed);
    for answer in [Some(Quota::Full { running: 4 }), None] {
        let a = tenant_quota(answer);
        match a {
            Action::GiveBack {
                delay,
                release_lease,
                ..
            } => {
                assert_eq!(delay, QUOTA_RETRY);
                assert!(release_lease, "{a:?}");
            }
            other => panic!("{answer:?}: {other:?}"),
        }
    }
    assert!(is_give_back(
        &tenant_quota(Some(Quota::Full { running: 1 })),
        "tenant_gpu_quota"
    ));
}
