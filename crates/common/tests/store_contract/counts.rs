//! The counts (`count_by_status`, `count_active_by_tenant`) stay exactly what the records say
//! through every write path — inserts of every kind, attempts, errors, final writes won and
//! lost, re-drives, withdrawals, retention — and under concurrent writers. The truth they are
//! checked against is the store's own listing of every record.

use std::collections::BTreeMap;
use std::sync::Arc;

use gpuq_common::job::{AttemptInfo, now_ms};
use gpuq_common::store::{JobStore, ListQuery};
use gpuq_common::topology::FIRST_DRIVE;
use gpuq_common::{JobRecord, JobStatus};

use super::{new_job, outcome};

/// The counts as the records say, from listing every job.
async fn tallied(store: &dyn JobStore) -> (BTreeMap<JobStatus, u64>, BTreeMap<String, u64>) {
    let (mut by_status, mut active) = (BTreeMap::new(), BTreeMap::new());
    let mut cursor = None;
    loop {
        let page = store
            .list(&ListQuery {
                limit: 1000,
                cursor,
                ..Default::default()
            })
            .await
            .unwrap();
        for j in &page.jobs {
            *by_status.entry(j.status).or_insert(0) += 1;
            if !j.status.is_final() {
                *active.entry(j.tenant.clone()).or_insert(0) += 1;
            }
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return (by_status, active),
        }
    }
}

/// Asserts that the counts agree with the records, after `step`.
async fn assert_exact(store: &dyn JobStore, step: &str) {
    let (by_status, active) = tallied(store).await;
    assert_eq!(
        store.count_by_status().await.unwrap(),
        by_status,
        "counts by status after {step}"
    );
    assert_eq!(
        store.count_active_by_tenant().await.unwrap(),
        active,
        "unfinished jobs per tenant after {step}"
    );
    // A status page's view: the same counts, and the newest jobs as the listing has them.
    let view = store.status_view(5, 3).await.unwrap();
    assert_eq!(view.counts, by_status, "status view's counts after {step}");
    let ids = |jobs: &[JobRecord]| jobs.iter().map(|j| j.id).collect::<Vec<_>>();
    let listed = |status, limit| ListQuery {
        status,
        limit,
        ..Default::default()
    };
    let recent = store.list(&listed(None, 5)).await.unwrap();
    let dead = store
        .list(&listed(Some(JobStatus::DeadLettered), 3))
        .await
        .unwrap();
    assert_eq!(ids(&view.recent), ids(&recent.jobs), "recent after {step}");
    assert_eq!(
        ids(&view.dead),
        ids(&dead.jobs),
        "dead letters after {step}"
    );
}

fn of(tenant: &str, pool: &str) -> JobRecord {
    let mut j = new_job(pool);
    j.tenant = tenant.to_string();
    j
}

fn running(job: &JobRecord, worker: &str) -> JobRecord {
    let mut r = job.clone();
    r.status = JobStatus::Running;
    r.attempts += 1;
    r.worker = Some(worker.into());
    r.started_at = Some(now_ms());
    r
}

/// Walks jobs of a fresh tenant through every write path, checking the counts after each.
pub async fn counts(store: &Arc<dyn JobStore>, pool: &str) {
    let t = format!("c{}", uuid::Uuid::new_v4().simple());
    let s = store.as_ref();
    assert_exact(s, "the contract so far").await;
    let (a, b, c, d) = (of(&t, pool), of(&t, pool), of(&t, pool), of(&t, pool));
    s.insert(&a).await.unwrap();
    s.insert_owned(&b, "claim-b").await.unwrap();
    let existed = s
        .insert_many(&[c.clone(), d.clone(), a.clone()], Some("claim-cd"))
        .await
        .unwrap();
    assert_eq!(existed, vec![a.id]);
    assert_exact(s, "insert, insert_owned, insert_many with an existing id").await;

    s.start_attempt(&running(&a, "w1")).await.unwrap();
    let orphan = of(&t, pool);
    s.start_attempt(&running(&orphan, "w1")).await.unwrap();
    s.record_error(a.id, 1, "boom").await.unwrap();
    assert_exact(s, "start_attempt (stored and unseen jobs), record_error").await;

    s.finish(a.id, &outcome(JobStatus::Succeeded, "w1"))
        .await
        .unwrap();
    s.finish(a.id, &outcome(JobStatus::Failed, "w2"))
        .await
        .unwrap();
    s.start_attempt(&running(&a, "w3")).await.unwrap();
    let mut quick = outcome(JobStatus::Failed, "w1");
    quick.attempt = Some(AttemptInfo {
        attempts: 1,
        gpus: vec![0],
        started_at: now_ms(),
    });
    s.finish(orphan.id, &quick).await.unwrap();
    assert_exact(s, "finish won and lost, start of a final job").await;

    let dead = outcome(JobStatus::DeadLettered, "manager");
    s.finish_drive(c.id, FIRST_DRIVE, &dead).await.unwrap();
    assert!(s.reset_for_retry(c.id, "drive-2").await.unwrap());
    s.finish_drive(c.id, FIRST_DRIVE, &dead).await.unwrap();
    assert_exact(
        s,
        "finish_drive, reset_for_retry, a superseded finish_drive",
    )
    .await;
    s.finish_drive(c.id, "drive-2", &dead).await.unwrap();

    assert!(!s.withdraw(b.id, Some("someone")).await.unwrap());
    s.adopt(d.id, "claim-d2").await.unwrap();
    assert!(s.withdraw(b.id, Some("claim-b")).await.unwrap());
    s.finish(d.id, &gpuq_common::job::FinalOutcome::cancelled(None, None))
        .await
        .unwrap();
    assert_exact(s, "withdraw refused and done, adopt, cancel").await;

    // Retention: old final jobs go, an old unfinished one stays.
    let old: Vec<JobRecord> = (0..5)
        .map(|i| {
            let mut j = of(&t, pool);
            j.created_at = 10 + i;
            j
        })
        .collect();
    s.insert_many(&old, None).await.unwrap();
    for j in &old[..4] {
        s.finish(j.id, &outcome(JobStatus::Succeeded, "w"))
            .await
            .unwrap();
    }
    assert_exact(s, "old jobs stored").await;
    assert_eq!(s.delete_final_before(100, 3).await.unwrap(), 3);
    assert_exact(s, "a retention batch").await;
    assert_eq!(s.delete_final_before(100, 3).await.unwrap(), 1);
    assert!(s.get(old[4].id).await.unwrap().is_some());
    s.finish(old[4].id, &outcome(JobStatus::Succeeded, "w"))
        .await
        .unwrap();
    assert_eq!(s.delete_final_before(100, 3).await.unwrap(), 1);
    assert_exact(s, "retention").await;

    concurrent_writers(store, pool, &t).await;
    assert_exact(s, "concurrent writers").await;
}

/// Eight writers at once, each inserting, starting and finishing jobs (some twice over, some
/// re-driven), while retention deletes.
async fn concurrent_writers(store: &Arc<dyn JobStore>, pool: &str, tenant: &str) {
    let mut tasks = vec![];
    for w in 0..8 {
        let (store, pool, tenant) = (store.clone(), pool.to_string(), tenant.to_string());
        tasks.push(tokio::spawn(async move {
            for i in 0..15 {
                let j = of(&tenant, &pool);
                store.insert(&j).await.unwrap();
                if i % 5 == 4 {
                    continue; // stays queued
                }
                store.start_attempt(&running(&j, "w")).await.unwrap();
                let status = if i % 3 == 0 {
                    JobStatus::DeadLettered
                } else {
                    JobStatus::Succeeded
                };
                store
                    .finish(j.id, &outcome(status, &format!("w{w}")))
                    .await
                    .unwrap();
                store
                    .finish(j.id, &outcome(JobStatus::Failed, "late"))
                    .await
                    .unwrap();
                if status == JobStatus::DeadLettered && i % 2 == 0 {
                    store.reset_for_retry(j.id, "again").await.unwrap();
                }
            }
        }));
    }
    let old: Vec<JobRecord> = (0..40)
        .map(|i| {
            let mut j = of(tenant, pool);
            j.created_at = 20 + i;
            j.status = JobStatus::Succeeded;
            j
        })
        .collect();
    store.insert_many(&old, None).await.unwrap();
    let deleting = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut gone = 0;
            while gone < 40 {
                gone += store.delete_final_before(100, 7).await.unwrap();
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    deleting.await.unwrap();
}

/// One write of the property test, on the `n`th job made so far (modulo).
#[derive(Debug, Clone)]
enum Write {
    Insert { tenant: u8, old: bool },
    InsertMany { tenant: u8, n: u8 },
    Start(usize),
    Error(usize),
    Finish(usize, u8),
    Redrive(usize),
    Withdraw(usize),
    Delete(u32),
}

fn write() -> impl proptest::strategy::Strategy<Value = Write> {
    use proptest::prelude::*;
    prop_oneof![
        (0..3u8, any::<bool>()).prop_map(|(tenant, old)| Write::Insert { tenant, old }),
        (0..3u8, 1..4u8).prop_map(|(tenant, n)| Write::InsertMany { tenant, n }),
        any::<usize>().prop_map(Write::Start),
        any::<usize>().prop_map(Write::Error),
        (any::<usize>(), 0..4u8).prop_map(|(i, s)| Write::Finish(i, s)),
        any::<usize>().prop_map(Write::Redrive),
        any::<usize>().prop_map(Write::Withdraw),
        (1..5u32).prop_map(Write::Delete),
    ]
}

/// Applies `w`; `made` is every job made so far (gone or not).
async fn apply(store: &dyn JobStore, made: &mut Vec<JobRecord>, w: &Write) {
    let tenants = ["default", "team-a", "team-b"];
    let pick = |i: usize| made.get(i % made.len().max(1)).cloned();
    match w {
        Write::Insert { tenant, old } => {
            let mut j = of(tenants[*tenant as usize], "default");
            if *old {
                j.created_at = 10;
            }
            store.insert(&j).await.unwrap();
            made.push(j);
        }
        Write::InsertMany { tenant, n } => {
            let mut jobs: Vec<JobRecord> = (0..*n)
                .map(|_| of(tenants[*tenant as usize], "default"))
                .collect();
            // One of them stored already, when there is one.
            jobs.extend(made.last().cloned());
            store.insert_many(&jobs, None).await.unwrap();
            made.extend(jobs.into_iter().take(*n as usize));
        }
        Write::Start(i) => {
            if let Some(j) = pick(*i) {
                store.start_attempt(&running(&j, "w")).await.unwrap();
            }
        }
        Write::Error(i) => {
            if let Some(j) = pick(*i) {
                store.record_error(j.id, 1, "boom").await.unwrap();
            }
        }
        Write::Finish(i, s) => {
            if let Some(j) = pick(*i) {
                let status = [
                    JobStatus::Succeeded,
                    JobStatus::Failed,
                    JobStatus::DeadLettered,
                    JobStatus::Cancelled,
                ][*s as usize];
                store.finish(j.id, &outcome(status, "w")).await.unwrap();
            }
        }
        Write::Redrive(i) => {
            if let Some(j) = pick(*i) {
                store.reset_for_retry(j.id, "d2").await.unwrap();
            }
        }
        Write::Withdraw(i) => {
            if let Some(j) = pick(*i) {
                store.withdraw(j.id, None).await.unwrap();
            }
        }
        Write::Delete(limit) => {
            store.delete_final_before(100, *limit).await.unwrap();
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
    /// Whatever sequence of writes a SQLite store takes, its counters say what its records say.
    #[test]
    fn the_sqlite_counts_match_the_records_after_any_sequence_of_writes(
        writes in proptest::collection::vec(write(), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
            let store = gpuq_common::store::open(&url).await.unwrap();
            let mut made = vec![];
            for w in &writes {
                apply(store.as_ref(), &mut made, w).await;
                assert_exact(store.as_ref(), &format!("{w:?}")).await;
            }
        });
    }
}
