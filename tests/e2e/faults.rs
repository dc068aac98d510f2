//! Issue 3: nothing lost, nothing recorded twice, under every crash the tester can cause.
//! Real worker processes are killed (abort or SIGKILL) and brought back by the restart loop.

use std::time::{Duration, Instant};

use gpuq_common::JobStatus;
use gpuq_common::job::now_ms;
use gpuq_e2e::{Stack, StackOptions, by_status};
use serde_json::{Value, json};

fn fault_stack(workers: usize, delivery_limit: u32) -> StackOptions {
    StackOptions {
        workers,
        fault_injection: true,
        env: vec![("GPUQ_DELIVERY_LIMIT".into(), delivery_limit.to_string())],
        ..Default::default()
    }
}

/// Arms `count` jobs on worker 2 with `scenario`, runs 100 jobs and checks the verdict.
async fn scenario(name: &str, count: u32) -> (Stack, f64) {
    let stack = Stack::start(fault_stack(3, 10)).await.unwrap();
    stack.arm_fault(1, name, count).await.unwrap();
    let body = json!({"kind": "simulate", "params": {"duration_ms": 200}});
    let ids = stack.submit_many(100, 16, &body).await.unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(120))
        .await
        .unwrap();
    let counts = by_status(&records);
    assert_eq!(
        counts.get(&JobStatus::Succeeded),
        Some(&100),
        "{name}: {counts:?}"
    );
    // Settle: late redeliveries of finished jobs must be suppressed, not run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for r in &records {
        let now = stack.store.get(r.id).await.unwrap().unwrap();
        assert_eq!(&now, r, "{name}: job {} changed after it was final", r.id);
    }
    assert_eq!(
        stack.workers_metric("gpuq_results_discarded_total").await,
        0.0,
        "{name}: work recorded twice"
    );
    assert_eq!(stack.queue_depth("default").await.unwrap(), 0);
    let suppressed = stack
        .workers_metric("gpuq_duplicates_suppressed_total")
        .await;
    (stack, suppressed)
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_0_normal_completion_runs_every_job_once() {
    let (stack, _) = scenario("normal", 5).await;
    assert_eq!(stack.workers[1].restarts(), 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_1_an_error_before_the_ack_is_retried_to_success() {
    let (stack, _) = scenario("error_before_ack", 5).await;
    let retried = stack.workers_metric("gpuq_jobs_completed_total").await;
    assert!(
        retried >= 105.0,
        "five failed attempts were counted besides the 100 successes"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_2_a_worker_dying_mid_task_loses_nothing() {
    let (stack, _) = scenario("crash_mid_task", 1).await;
    assert!(
        stack.workers[1].restarts() >= 1,
        "worker-2 crashed and came back"
    );
    assert!(
        stack
            .log_lines("worker-2")
            .iter()
            .any(|l| l.contains("crash_mid_task"))
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_3_a_lost_ack_after_completion_is_suppressed_as_a_duplicate() {
    let (stack, suppressed) = scenario("duplicate_after_complete", 3).await;
    assert!(
        suppressed >= 1.0,
        "redeliveries of finished jobs were suppressed: {suppressed}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_4_a_worker_dying_after_completion_does_not_run_the_job_again() {
    let (stack, suppressed) = scenario("crash_after_complete", 1).await;
    assert!(
        stack.workers[1].restarts() >= 1,
        "worker-2 crashed and came back"
    );
    assert!(
        suppressed >= 1.0,
        "the redelivered finished job was suppressed: {suppressed}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_original_load_test_with_20_percent_errors_and_5_percent_crashes_finishes_every_job_once()
 {
    let stack = Stack::start(fault_stack(3, 20)).await.unwrap();
    let body = json!({"kind": "simulate", "params": {
        "duration_ms": 100, "fail_probability": 0.2, "crash_probability": 0.05
    }});
    let ids = stack.submit_many(100, 16, &body).await.unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(240))
        .await
        .unwrap();
    assert_eq!(
        by_status(&records).get(&JobStatus::Succeeded),
        Some(&100),
        "{:?}",
        by_status(&records)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stack.workers_metric("gpuq_results_discarded_total").await,
        0.0
    );
    let restarts: u32 = stack.workers.iter().map(|w| w.restarts()).sum();
    let retried = records.iter().filter(|r| r.attempts > 1).count();
    eprintln!("load test: {restarts} worker crashes, {retried} jobs needed more than one attempt");
    assert!(retried > 0, "errors were injected");
    stack.stop().await;
}

/// Kills in the recovery test: each costs ~4.5 s (recovery, then the victim's restart), and this
/// test is the longest of the suite.
const TRIALS: u32 = 12;

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_worker_is_killed_mid_task_finishes_on_another_worker_within_ten_seconds() {
    let stack = Stack::start(StackOptions {
        workers: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut recoveries = vec![];
    for trial in 0..TRIALS {
        let id = stack
            .submit_ok(
                &json!({"kind": "simulate", "params": {"duration_ms": 1000, "progress_steps": 10}}),
            )
            .await
            .unwrap();
        let worker = stack
            .wait_running(id, Duration::from_secs(15))
            .await
            .worker
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let victim = &stack.workers[if worker == "worker-1" { 0 } else { 1 }];
        victim.kill_and_hold().await;
        let killed = Instant::now();
        let killed_ms = gpuq_common::job::now_ms();
        let r = stack.wait_one(id, Duration::from_secs(30)).await.unwrap();
        let recovery = killed.elapsed();
        assert_eq!(r.status, JobStatus::Succeeded, "trial {trial}: {r:?}");
        assert_ne!(
            r.worker.as_deref(),
            Some(worker.as_str()),
            "trial {trial}: finished elsewhere"
        );
        assert!(r.finished_at.unwrap() >= killed_ms);
        recoveries.push(recovery);
        victim.resume();
        stack.wait_ready().await.unwrap();
    }
    recoveries.sort();
    let median = recoveries[recoveries.len() / 2];
    let worst = *recoveries.last().unwrap();
    eprintln!("kill → finished elsewhere over {TRIALS} trials: median {median:?}, worst {worst:?}");
    assert!(worst < Duration::from_secs(10), "worst recovery {worst:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_job_is_dead_lettered_with_its_reason_and_can_be_re_driven() {
    let stack = Stack::start(fault_stack(2, 3)).await.unwrap();
    // Fails its first 4 attempts: more than the delivery budget of 3 allows.
    let id = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 10, "fail_times": 4}}))
        .await
        .unwrap();
    let r = stack.wait_one(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.status, JobStatus::DeadLettered, "{r:?}");
    assert!(
        r.error.as_deref().unwrap_or("").contains("delivery_limit"),
        "{r:?}"
    );
    let before = r.attempts;
    let resp = stack
        .auth(
            stack
                .http
                .post(format!("{}/v1/dead-letters/{id}/retry", stack.gateway_url)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{:?}", resp.text().await);
    let r = stack.wait_one(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    assert!(
        r.attempts > before,
        "attempts go on counting: {} then {}",
        before,
        r.attempts
    );
    let again = stack
        .auth(
            stack
                .http
                .post(format!("{}/v1/dead-letters/{id}/retry", stack.gateway_url)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status().as_u16(),
        409,
        "only dead letters can be re-driven"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tester_cli_reports_a_passing_verdict_for_a_crash_scenario() {
    let stack = Stack::start(fault_stack(3, 10)).await.unwrap();
    let stdout = stack
        .cli_ok(&[
            "tester",
            "run",
            "--worker",
            "2",
            "--scenario",
            "crash_mid_task",
            "--jobs",
            "30",
            "--duration-ms",
            "200",
            "--json",
            "--timeout",
            "90s",
        ])
        .await;
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["pass"], true, "{v}");
    assert_eq!(v["lost"], 0);
    assert_eq!(v["succeeded"], 30);
    stack.stop().await;
}

/// The store stops taking writes for 13 s — another process holds SQLite's write lock, longer
/// than the store's own 10 s wait for a lock — while 30 jobs run. Workers keep each result and retry
/// (`gpuq_store_write_retries_total`), ack only once it is stored, and nothing is lost or run
/// twice; a submission during the outage is answered 503 and nothing of it is enqueued.
#[tokio::test(flavor = "multi_thread")]
async fn results_wait_out_a_store_that_takes_no_writes_and_are_stored_once() {
    const OUTAGE: Duration = Duration::from_secs(13);
    // No `running` records (jobs are shorter than the delay): the first write a worker sends
    // during the outage is a result, which must outwait the lock through the retry path.
    let mut opts = fault_stack(3, 10);
    opts.env
        .push(("GPUQ_RUNNING_RECORD_DELAY_MS".into(), "60000".into()));
    let stack = Stack::start(opts).await.unwrap();
    let body = json!({"kind": "simulate", "params": {"duration_ms": 1500}});
    let ids = stack.submit_many(30, 16, &body).await.unwrap();

    let db = stack.dir.join("gpuq.db");
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    let outage = tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locked_tx.send(now_ms()).unwrap();
        std::thread::sleep(OUTAGE);
        conn.execute_batch("ROLLBACK").unwrap();
        now_ms()
    });
    let locked_at = locked_rx.await.unwrap();
    let (status, answer) = stack.submit(&body).await.unwrap();
    assert_eq!(
        status, 503,
        "a submission the store cannot record: {answer}"
    );
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    let released_at = outage.await.unwrap();

    let records = stack
        .wait_final(&ids, Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(by_status(&records).get(&JobStatus::Succeeded), Some(&30));
    let finished_in_outage = records
        .iter()
        .filter(|r| (locked_at..released_at).contains(&r.finished_at.unwrap()))
        .count();
    assert!(
        finished_in_outage > 0,
        "no job finished while the store took no writes: the outage came too late"
    );
    assert!(
        stack.workers_metric("gpuq_store_write_retries_total").await > 0.0,
        "the workers retried their writes"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.assert_each_started_once(30).await;
    assert_eq!(stack.queue_depth("default").await.unwrap(), 0);
    let page = stack
        .store
        .list(&gpuq_common::store::ListQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 30, "the refused submission left no record");
    stack.stop().await;
}

/// The original tester's interactive menu, typed at a real terminal (a pseudo-terminal on the
/// CLI's stdin): a worker number out of range is asked again, then worker 2, scenario 3 (the ack
/// is lost after the job completed), 20 jobs; the verdict passes; `q` at the next menu quits.
#[tokio::test(flavor = "multi_thread")]
async fn the_interactive_tester_menu_runs_a_scenario_typed_at_a_terminal() {
    use std::io::Write;
    let stack = Stack::start(fault_stack(3, 10)).await.unwrap();
    let pty = nix::pty::openpty(None, None).unwrap();
    let child = stack
        .cli()
        .args(["tester", "--duration-ms", "100", "--timeout", "90s"])
        .stdin(std::fs::File::from(pty.slave))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Typed ahead: the terminal keeps the lines until the menu reads them.
    let mut keyboard = std::fs::File::from(pty.master);
    keyboard.write_all(b"9\n2\n3\n20\nq\n").unwrap();
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the tester quits after one scenario")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("choose a worker from 1 to 3, or q"),
        "a wrong worker number is asked again:\n{stdout}"
    );
    assert!(
        stdout.contains("verdict: PASS  (run duplicate_after_complete ×1 on worker-2, 20 jobs)"),
        "{stdout}\n{stderr}"
    );
    assert_eq!(
        stdout.matches("scenarios\n").count(),
        2,
        "the menu comes back after the verdict, and q quits it:\n{stdout}"
    );
    stack.stop().await;
}

/// The channel a running job came on drops (here: the ack of another job is lost), the broker
/// hands the running job to the same worker again, and it must not run a second time beside
/// the first: the copy is given back until the first run has stored its result.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivery_of_a_job_still_running_in_the_same_worker_never_runs_it_twice() {
    let stack = Stack::start(fault_stack(1, 10)).await.unwrap();
    let long = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 3000}}))
        .await
        .unwrap();
    stack.wait_running(long, Duration::from_secs(20)).await;
    stack
        .arm_fault(0, "duplicate_after_complete", 1)
        .await
        .unwrap();
    let short = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 0}}))
        .await
        .unwrap();
    let records = stack
        .wait_final(&[long, short], Duration::from_secs(60))
        .await
        .unwrap();
    for r in &records {
        assert_eq!((r.status, r.attempts), (JobStatus::Succeeded, 1), "{r:?}");
    }
    // Both deliveries of the lost channel came back; the copies are acked once their job is
    // final. Give the given-back copy of the long job time to return and be suppressed.
    gpuq_e2e::eventually("the queue drains", Duration::from_secs(20), || async {
        stack.queue_depth("default").await.unwrap() == 0
            && stack
                .workers_metric("gpuq_duplicates_suppressed_total")
                .await
                >= 2.0
    })
    .await;
    stack.assert_each_started_once(2).await;
    let text = stack.worker_metrics_text(0).await.unwrap();
    assert!(
        text.contains(r#"reason="running_here""#),
        "the long job's redelivery was given back: {text}"
    );
    stack.stop().await;
}
