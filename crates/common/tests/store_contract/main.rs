//! One contract for every `JobStore` backend: SQLite on a temporary file, MongoDB on the server
//! `GPUQ_TEST_MONGODB_URL` names (`scripts/test.sh` starts one; without it the MongoDB run fails).

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

use std::collections::HashSet;
use std::sync::Arc;

use gpuq_common::job::{
    AttemptInfo, FinalOutcome, JobMessage, JobPayload, JobPlacement, SimulateParams, now_ms,
};
use gpuq_common::store::{self, FinishOutcome, JobStore, ListQuery, StartOutcome, StoreError};
use gpuq_common::topology::FIRST_DRIVE;
use gpuq_common::{JobRecord, JobStatus};
use serde_json::json;

mod arrays;
mod counts;

fn new_job(pool: &str) -> JobRecord {
    let msg = JobMessage::new(
        JobPayload::Simulate(SimulateParams {
            duration_ms: 5,
            ..Default::default()
        }),
        JobPlacement {
            gpus: 1,
            min_gpu_memory_mb: Some(1024),
            pool: pool.into(),
            ttl_s: None,
        },
    );
    JobRecord::queued(&msg)
}

fn outcome(status: JobStatus, worker: &str) -> FinalOutcome {
    FinalOutcome {
        status,
        result: Some(json!({"by": worker})),
        error: None,
        worker: Some(worker.into()),
        finished_at: now_ms(),
        attempt: None,
        events: vec![],
    }
}

async fn contract(store: Arc<dyn JobStore>) {
    store.ping().await.unwrap();
    let pool = format!("p{}", uuid::Uuid::new_v4().simple());

    // insert, get, conflict
    let job = new_job(&pool);
    store.insert(&job).await.unwrap();
    assert_eq!(store.get(job.id).await.unwrap().unwrap(), job);
    assert!(matches!(
        store.insert(&job).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(store.get(uuid::Uuid::now_v7()).await.unwrap().is_none());

    // start an attempt
    let mut running = job.clone();
    running.status = JobStatus::Running;
    running.attempts = 1;
    running.worker = Some("w1".into());
    running.gpus = vec![0, 1];
    running.started_at = Some(now_ms());
    assert_eq!(
        store.start_attempt(&running).await.unwrap(),
        StartOutcome::Started
    );
    let got = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(got.status, JobStatus::Running);
    assert_eq!(got.gpus, vec![0, 1]);
    assert_eq!(got.attempts, 1);

    store
        .record_error(job.id, 1, "attempt 1 failed")
        .await
        .unwrap();
    assert_eq!(
        store.get(job.id).await.unwrap().unwrap().error.as_deref(),
        Some("attempt 1 failed")
    );
    // a failed attempt's error raises the attempt count (short attempts have no running record)
    store
        .record_error(job.id, 2, "attempt 2 failed")
        .await
        .unwrap();
    let got = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(
        (got.attempts, got.error.as_deref()),
        (2, Some("attempt 2 failed"))
    );

    // the first final result wins, whatever races it
    let mut handles = vec![];
    for i in 0..8 {
        let s = store.clone();
        let id = job.id;
        handles.push(tokio::spawn(async move {
            s.finish(id, &outcome(JobStatus::Succeeded, &format!("w{i}")))
                .await
                .unwrap()
        }));
    }
    let mut stored = 0;
    for h in handles {
        match h.await.unwrap() {
            FinishOutcome::Stored => stored += 1,
            FinishOutcome::AlreadyFinal(s) => assert_eq!(s, JobStatus::Succeeded),
            other => panic!("a plain final write came back {other:?}"),
        }
    }
    assert_eq!(stored, 1, "exactly one final write wins");
    let done = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert!(done.finished_at.is_some());
    assert_eq!(
        store.start_attempt(&running).await.unwrap(),
        StartOutcome::AlreadyFinal(JobStatus::Succeeded)
    );
    assert_eq!(
        store
            .finish(uuid::Uuid::now_v7(), &outcome(JobStatus::Failed, "w"))
            .await
            .unwrap(),
        FinishOutcome::NotFound
    );

    // a short job goes from queued to final in one write that records its attempt
    let quick = new_job(&pool);
    store.insert(&quick).await.unwrap();
    let started = now_ms() - 3;
    let mut o = outcome(JobStatus::Succeeded, "w2");
    o.attempt = Some(AttemptInfo {
        attempts: 3,
        gpus: vec![1],
        started_at: started,
    });
    assert_eq!(
        store.finish(quick.id, &o).await.unwrap(),
        FinishOutcome::Stored
    );
    let got = store.get(quick.id).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.attempts, got.gpus.clone(), got.started_at),
        (JobStatus::Succeeded, 3, vec![1], Some(started))
    );
    assert_eq!(got.worker.as_deref(), Some("w2"));
    // without attempt info (a cancel, a dead letter) the recorded attempt stays as it was
    let mut late = outcome(JobStatus::Cancelled, "gateway");
    late.worker = None;
    assert_eq!(
        store.finish(quick.id, &late).await.unwrap(),
        FinishOutcome::AlreadyFinal(JobStatus::Succeeded)
    );
    assert_eq!(store.get(quick.id).await.unwrap().unwrap(), got);

    // an attempt for a job the store never saw creates it
    let orphan = {
        let mut j = new_job(&pool);
        j.status = JobStatus::Running;
        j.attempts = 1;
        j
    };
    assert_eq!(
        store.start_attempt(&orphan).await.unwrap(),
        StartOutcome::Started
    );
    assert_eq!(
        store.get(orphan.id).await.unwrap().unwrap().status,
        JobStatus::Running
    );

    // dead letters can be re-driven, other statuses cannot
    let dead = new_job(&pool);
    store.insert(&dead).await.unwrap();
    let mut o = outcome(JobStatus::DeadLettered, "manager");
    o.error = Some("delivery_limit: boom".into());
    assert_eq!(
        store.finish(dead.id, &o).await.unwrap(),
        FinishOutcome::Stored
    );
    assert!(!store.reset_for_retry(job.id, "drive-2").await.unwrap());
    assert!(store.reset_for_retry(dead.id, "drive-2").await.unwrap());
    let back = store.get(dead.id).await.unwrap().unwrap();
    assert_eq!(back.status, JobStatus::Queued);
    assert_eq!(back.error.as_deref(), Some("delivery_limit: boom"));

    // A late dead letter of the first drive does not undo the re-drive; the re-drive's own does.
    let mut late = outcome(JobStatus::DeadLettered, "manager");
    late.error = Some("delivery_limit: late copy".into());
    assert_eq!(
        store
            .finish_drive(dead.id, FIRST_DRIVE, &late)
            .await
            .unwrap(),
        FinishOutcome::Superseded
    );
    assert_eq!(store.get(dead.id).await.unwrap().unwrap(), back);
    let redriven = new_job(&pool);
    store.insert(&redriven).await.unwrap();
    let mut second = outcome(JobStatus::DeadLettered, "manager");
    second.error = Some("delivery_limit: again".into());
    assert_eq!(
        store
            .finish_drive(redriven.id, FIRST_DRIVE, &second)
            .await
            .unwrap(),
        FinishOutcome::Stored,
        "a job never re-driven is on its first drive"
    );
    assert_eq!(
        store
            .finish_drive(redriven.id, FIRST_DRIVE, &second)
            .await
            .unwrap(),
        FinishOutcome::AlreadyFinal(JobStatus::DeadLettered)
    );
    assert!(store.reset_for_retry(redriven.id, "drive-2").await.unwrap());
    assert_eq!(
        store
            .finish_drive(redriven.id, "drive-2", &second)
            .await
            .unwrap(),
        FinishOutcome::Stored
    );
    assert!(store.reset_for_retry(redriven.id, "drive-3").await.unwrap());
    assert_eq!(
        store
            .finish_drive(redriven.id, "drive-2", &second)
            .await
            .unwrap(),
        FinishOutcome::Superseded
    );
    // Workers' plain final writes do not look at drives.
    assert_eq!(
        store
            .finish(redriven.id, &outcome(JobStatus::Succeeded, "w"))
            .await
            .unwrap(),
        FinishOutcome::Stored
    );
    assert_eq!(
        store
            .finish_drive(new_job(&pool).id, FIRST_DRIVE, &second)
            .await
            .unwrap(),
        FinishOutcome::NotFound
    );

    // withdraw: a record stored without an owner is withdrawn without one, once
    let gone = new_job(&pool);
    store.insert(&gone).await.unwrap();
    assert!(!store.withdraw(gone.id, Some("a")).await.unwrap());
    assert!(store.withdraw(gone.id, None).await.unwrap());
    assert!(store.get(gone.id).await.unwrap().is_none());
    assert!(!store.withdraw(gone.id, None).await.unwrap());
    assert_eq!(store.adopt(gone.id, "b").await.unwrap(), None);

    // owners: a takeover adopts the record, and the earlier owner can no longer withdraw it
    let owned = new_job(&pool);
    store.insert_owned(&owned, "a").await.unwrap();
    assert_eq!(store.get(owned.id).await.unwrap().unwrap(), owned);
    assert!(matches!(
        store.insert_owned(&owned, "b").await,
        Err(StoreError::Conflict(_))
    ));
    assert!(!store.withdraw(owned.id, None).await.unwrap());
    assert_eq!(
        store.adopt(owned.id, "b").await.unwrap(),
        Some(JobStatus::Queued)
    );
    assert!(!store.withdraw(owned.id, Some("a")).await.unwrap());
    assert_eq!(store.get(owned.id).await.unwrap().unwrap(), owned);
    assert!(store.withdraw(owned.id, Some("b")).await.unwrap());
    assert!(store.get(owned.id).await.unwrap().is_none());
    // Only a queued record is adopted or withdrawn: one a worker has seen answers its status.
    let seen = new_job(&pool);
    store.insert_owned(&seen, "a").await.unwrap();
    let mut started = seen.clone();
    started.status = JobStatus::Running;
    started.attempts = 1;
    started.started_at = Some(now_ms());
    store.start_attempt(&started).await.unwrap();
    assert_eq!(
        store.adopt(seen.id, "b").await.unwrap(),
        Some(JobStatus::Running)
    );
    assert!(!store.withdraw(seen.id, Some("a")).await.unwrap());
    store
        .finish(seen.id, &outcome(JobStatus::Succeeded, "w"))
        .await
        .unwrap();
    assert_eq!(
        store.adopt(seen.id, "b").await.unwrap(),
        Some(JobStatus::Succeeded)
    );

    // listing: newest first, filtered, paged by cursor without gaps or repeats
    let mut ids = HashSet::new();
    for _ in 0..25 {
        let j = new_job(&pool);
        store.insert(&j).await.unwrap();
        ids.insert(j.id);
    }
    let mut seen = HashSet::new();
    let mut cursor = None;
    let mut last = None;
    loop {
        let page = store
            .list(&ListQuery {
                status: Some(JobStatus::Queued),
                pool: Some(pool.clone()),
                limit: 7,
                cursor,
                ..Default::default()
            })
            .await
            .unwrap();
        for j in &page.jobs {
            assert_eq!(j.status, JobStatus::Queued);
            if let Some(prev) = last {
                assert!(j.id < prev, "newest first");
            }
            last = Some(j.id);
            assert!(seen.insert(j.id), "a job appeared twice");
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    ids.insert(dead.id); // re-driven, so queued again
    assert_eq!(seen, ids);
    let counts = store.count_by_status().await.unwrap();
    assert!(counts[&JobStatus::Queued] >= 26);
    assert!(counts[&JobStatus::Succeeded] >= 1);
    tenants(&store, &pool).await;
    arrays::arrays(&store, &pool).await;
    event_log(&store, &pool).await;
    retention(&store, &pool).await;
    counts::counts(&store, &pool).await;
}

/// Retention deletes final jobs submitted before the cutoff, with their logs, in batches; never
/// a job still queued or running, nor a recent one.
async fn retention(store: &Arc<dyn JobStore>, pool: &str) {
    use gpuq_common::events::from_line;
    let old = |n: i64| {
        let mut j = new_job(pool);
        j.created_at = 1_000 + n;
        j
    };
    let (gone1, gone2, still_queued, recent) = (old(1), old(2), old(3), new_job(pool));
    for j in [&gone1, &gone2, &still_queued, &recent] {
        store.insert(j).await.unwrap();
    }
    store
        .append_events(gone1.id, &[from_line("stdout", "x", 1)])
        .await
        .unwrap();
    for j in [&gone1, &gone2, &recent] {
        store
            .finish(j.id, &outcome(JobStatus::Succeeded, "w"))
            .await
            .unwrap();
    }
    assert_eq!(store.delete_final_before(5_000, 1).await.unwrap(), 1);
    assert_eq!(store.delete_final_before(5_000, 100).await.unwrap(), 1);
    assert_eq!(store.delete_final_before(5_000, 100).await.unwrap(), 0);
    for j in [&gone1, &gone2] {
        assert!(store.get(j.id).await.unwrap().is_none());
        assert!(store.events(j.id, 0, 10).await.unwrap().is_empty());
    }
    assert!(store.get(still_queued.id).await.unwrap().is_some());
    assert!(store.get(recent.id).await.unwrap().is_some());
}

/// Events get strictly increasing offsets per job, read back in order after any offset; the
/// last progress is on the record; a stored outcome appends its events and a `final` event.
async fn event_log(store: &Arc<dyn JobStore>, pool: &str) {
    use gpuq_common::events::{EventKind, attempt_event, from_line};
    let job = new_job(pool);
    store.insert(&job).await.unwrap();
    let other = new_job(pool);
    store.insert(&other).await.unwrap();
    let first = vec![
        attempt_event(1, "w1", &[0], 1),
        from_line("stdout", "hello", 2),
        from_line(
            "stdout",
            r#"##gpuq:progress {"fraction": 0.25, "metrics": {"loss": 0.5}}"#,
            3,
        ),
    ];
    assert_eq!(store.append_events(job.id, &first).await.unwrap(), 3);
    assert_eq!(store.append_events(other.id, &first[..1]).await.unwrap(), 1);
    let second = vec![from_line("stderr", "warn", 4)];
    assert_eq!(store.append_events(job.id, &second).await.unwrap(), 4);
    assert_eq!(
        store
            .append_events(uuid::Uuid::now_v7(), &second)
            .await
            .unwrap(),
        0
    );
    let r = store.get(job.id).await.unwrap().unwrap();
    let p = r.progress.expect("progress on the record");
    assert_eq!((p.fraction, p.metrics["loss"]), (Some(0.25), 0.5));
    let mut o = outcome(JobStatus::Succeeded, "w1");
    o.events = vec![from_line("stdout", "bye", 5)];
    assert_eq!(
        store.finish(job.id, &o).await.unwrap(),
        FinishOutcome::Stored
    );
    // A late final write appends nothing.
    let late = outcome(JobStatus::Failed, "w2");
    assert!(matches!(
        store.finish(job.id, &late).await.unwrap(),
        FinishOutcome::AlreadyFinal(_)
    ));
    let all = store.events(job.id, 0, 100).await.unwrap();
    let offsets: Vec<u64> = all.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, vec![1, 2, 3, 4, 5, 6]);
    let kinds: Vec<EventKind> = all.iter().map(|e| e.kind).collect();
    use EventKind::*;
    assert_eq!(
        kinds,
        vec![Attempt, Output, Progress, Output, Output, Final]
    );
    assert_eq!(all[1].data["line"], "hello");
    assert_eq!(all[5].data["status"], "succeeded");
    let page = store.events(job.id, 2, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert!(store.events(job.id, 6, 100).await.unwrap().is_empty());
    assert_eq!(store.events(other.id, 0, 100).await.unwrap().len(), 1);

    // A single quiet attempt (no output, no progress) leaves the log empty: its two events are
    // derived from the record, at offsets 1 and 2.
    let quiet = new_job(pool);
    store.insert(&quiet).await.unwrap();
    let mut o = outcome(JobStatus::Succeeded, "w3");
    o.attempt = Some(gpuq_common::job::AttemptInfo {
        attempts: 1,
        gpus: vec![1],
        started_at: 10,
    });
    o.events = vec![attempt_event(1, "w3", &[1], 10)];
    assert_eq!(
        store.finish(quiet.id, &o).await.unwrap(),
        FinishOutcome::Stored
    );
    assert!(store.events(quiet.id, 0, 100).await.unwrap().is_empty());
    let derived = gpuq_common::events::derived_log(&store.get(quiet.id).await.unwrap().unwrap());
    let kinds: Vec<_> = derived.iter().map(|e| (e.offset, e.kind)).collect();
    assert_eq!(kinds, vec![(1, Attempt), (2, Final)]);
    assert_eq!(derived[0].data["worker"], "w3");
    assert_eq!(derived[1].data["status"], "succeeded");
    // A cancel of a job that never ran logs its final event.
    let never = new_job(pool);
    store.insert(&never).await.unwrap();
    store
        .finish(never.id, &FinalOutcome::cancelled(None, None))
        .await
        .unwrap();
    let log = store.events(never.id, 0, 100).await.unwrap();
    assert_eq!(log.iter().map(|e| e.kind).collect::<Vec<_>>(), vec![Final]);
}

/// Every record keeps its tenant; a tenant's listing shows its jobs only; the counts of
/// unfinished jobs are per tenant.
async fn tenants(store: &Arc<dyn JobStore>, pool: &str) {
    let (a, b) = (
        format!("a{}", uuid::Uuid::new_v4().simple()),
        format!("b{}", uuid::Uuid::new_v4().simple()),
    );
    let mut of_a = vec![];
    for i in 0..5 {
        let mut j = new_job(pool);
        j.tenant = if i < 3 { a.clone() } else { b.clone() };
        store.insert(&j).await.unwrap();
        assert_eq!(store.get(j.id).await.unwrap().unwrap().tenant, j.tenant);
        if i < 3 {
            of_a.push(j.id);
        }
    }
    store
        .finish(of_a[0], &outcome(JobStatus::Succeeded, "w"))
        .await
        .unwrap();
    let page = store
        .list(&ListQuery {
            tenant: Some(a.clone()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut listed: Vec<_> = page.jobs.iter().map(|j| j.id).collect();
    listed.sort();
    assert_eq!(listed, of_a);
    assert!(page.jobs.iter().all(|j| j.tenant == a));
    let active = store.count_active_by_tenant().await.unwrap();
    assert_eq!(active.get(&a), Some(&2), "{active:?}");
    assert_eq!(active.get(&b), Some(&2), "{active:?}");
    // Jobs made before tenants (and every job of a single user) are the default tenant's.
    assert!(new_job(pool).tenant == "default");
}

#[tokio::test]
async fn the_sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
    contract(store::open(&url).await.unwrap()).await;
}

#[tokio::test]
async fn two_sqlite_stores_on_one_file_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
    let a = store::open(&url).await.unwrap();
    let b = store::open(&url).await.unwrap();
    let job = new_job("default");
    a.insert(&job).await.unwrap();
    assert_eq!(
        b.finish(job.id, &outcome(JobStatus::Succeeded, "b"))
            .await
            .unwrap(),
        FinishOutcome::Stored
    );
    assert_eq!(
        a.finish(job.id, &outcome(JobStatus::Failed, "a"))
            .await
            .unwrap(),
        FinishOutcome::AlreadyFinal(JobStatus::Succeeded)
    );
}

/// Needs a MongoDB server, like the end-to-end suites need the local stack: `scripts/test.sh`
/// starts secantusd (a MongoDB stand-in) and names it in `GPUQ_TEST_MONGODB_URL`. Without that
/// variable this test fails rather than passing unchecked.
#[tokio::test]
async fn the_mongodb_store_keeps_the_contract() {
    let url = std::env::var("GPUQ_TEST_MONGODB_URL").unwrap_or_else(|_| {
        panic!(
            "GPUQ_TEST_MONGODB_URL is not set: run the tests through scripts/test.sh (it starts \
             a secantusd server), or point it at a MongoDB server (mongodb://HOST:PORT/DB)"
        )
    });
    contract(store::open(&url).await.unwrap()).await;
}
