use super::*;
use crate::jobs::tests::record;

fn observed(records: Vec<JobRecord>) -> Observed {
    let accepted: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    let counts = accepted.iter().map(|id| (*id, 1)).collect();
    Observed {
        submitted: records.len() as u64,
        accepted,
        finals: records.iter().map(|r| (r.id, r.clone())).collect(),
        listing: Some((counts, records.clone())),
        counters: CounterDelta {
            duplicates_suppressed: Some(1),
            redeliveries: Some(1),
            results_discarded: Some(0),
            ..CounterDelta::default()
        },
        worker_restarts: Some(1),
        expect_success: true,
        timeout: std::time::Duration::from_secs(120),
        ..Observed::default()
    }
}

fn ok(created: i64, finished: i64, attempts: u32) -> JobRecord {
    let mut r = record(
        JobStatus::Succeeded,
        created,
        Some(finished - 100),
        Some(finished),
    );
    r.attempts = attempts;
    r
}

#[test]
fn every_job_succeeding_once_passes() {
    let o = observed(vec![ok(0, 200, 1), ok(10, 4_210, 2), ok(20, 300, 1)]);
    let v = judge(&o);
    assert!(v.pass, "{:?}", v.problems);
    assert_eq!(
        (v.accepted, v.succeeded, v.lost, v.stored_twice),
        (3, 3, 0, 0)
    );
    assert_eq!(v.recovery.redelivered_jobs, 1);
    assert_eq!(v.recovery.max_redelivered_submit_to_final_ms, Some(4_200));
    assert_eq!(v.recovery.max_submit_to_final_ms, Some(4_200));
    assert_eq!(v.recovery.max_final_attempt_ms, Some(100));
    let text = v.render();
    assert!(text.starts_with("verdict: PASS"), "{text}");
    assert!(text.contains("duplicates suppressed 1"));
}

#[test]
fn a_lost_job_fails_the_verdict() {
    let mut o = observed(vec![ok(0, 200, 1)]);
    let lost = Uuid::now_v7();
    o.accepted.push(lost);
    o.pending.push((lost, Some(JobStatus::Running)));
    let v = judge(&o);
    assert!(!v.pass);
    assert_eq!(v.lost, 1);
    assert!(
        v.problems[0].contains("not final within 2m00s"),
        "{:?}",
        v.problems
    );
    assert!(
        v.render()
            .contains(&format!("lost job              {lost} (last seen running)"))
    );
}

#[test]
fn an_id_listed_twice_or_a_final_record_that_changed_fails_the_verdict() {
    let a = ok(0, 200, 1);
    let b = ok(5, 300, 1);
    let mut o = observed(vec![a.clone(), b.clone()]);
    let (counts, listed) = o.listing.as_mut().unwrap();
    counts.insert(a.id, 2);
    let mut overwritten = b.clone();
    overwritten.worker = Some("worker-3".into());
    listed[1] = overwritten;
    let v = judge(&o);
    assert_eq!(v.stored_twice, 2);
    assert!(!v.pass);
    assert!(v.problems.iter().any(|p| p.contains("stored twice")));
}

#[test]
fn jobs_that_did_not_succeed_fail_only_when_success_was_expected() {
    let dead = record(JobStatus::DeadLettered, 0, Some(1), Some(2));
    let mut o = observed(vec![ok(0, 200, 1), dead]);
    assert!(!judge(&o).pass);
    o.expect_success = false;
    let v = judge(&o);
    assert!(v.pass);
    assert_eq!(v.dead_lettered, 1);
}

#[test]
fn discarded_results_are_reported_but_are_not_a_stored_duplicate() {
    let mut o = observed(vec![ok(0, 200, 2)]);
    o.counters.results_discarded = Some(1);
    let v = judge(&o);
    assert!(v.pass);
    assert_eq!(v.duplicate_results, Some(1));
}

#[test]
fn an_unreadable_listing_is_noted_and_a_missing_record_is_a_problem() {
    let mut o = observed(vec![ok(0, 200, 1)]);
    o.listing = None;
    let v = judge(&o);
    assert!(v.pass);
    assert!(
        v.notes
            .iter()
            .any(|n| n.contains("stored-twice check skipped"))
    );

    let mut o = observed(vec![ok(0, 200, 1)]);
    o.listing.as_mut().unwrap().0.clear();
    let v = judge(&o);
    assert!(!v.pass);
    assert!(v.problems[0].contains("missing from the job listing"));
}

#[test]
fn unknown_counters_render_as_not_available() {
    let mut o = observed(vec![ok(0, 200, 1)]);
    o.counters = CounterDelta::default();
    o.worker_restarts = None;
    let text = judge(&o).render();
    assert!(text.contains("redeliveries          n/a"), "{text}");
    assert!(text.contains("worker restarts       n/a"));
}
