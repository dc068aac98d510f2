//! Issue 4's end-to-end proof on the real cluster: jobs go only to healthy GPUs of engines the
//! operator lets work, `gpus: n` jobs get exactly n concrete GPUs (and see only those), dead and
//! hung engines are noticed, and with a backlog every GPU slot stays busy.

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use gpuq_common::{JobRecord, JobStatus};
use gpuq_e2e::{Stack, StackOptions, by_status, percentile};
use serde_json::{Value, json};
use uuid::Uuid;

const HEARTBEAT: Duration = Duration::from_millis(1000);

/// Workers that ran the given records.
fn workers_of(records: &[JobRecord]) -> BTreeSet<String> {
    records.iter().filter_map(|r| r.worker.clone()).collect()
}

fn short_job(ms: u64) -> Value {
    json!({"kind": "simulate", "params": {"duration_ms": ms}})
}

/// A `command` job that prints the GPUs it was given.
fn print_gpus_job(gpus: u32) -> Value {
    json!({"kind": "command", "params": {"program": "sh", "args": ["-c", "echo $CUDA_VISIBLE_DEVICES"]}, "gpus": gpus})
}

/// The same, after holding its GPUs for a while.
fn slow_print_gpus_job(gpus: u32) -> Value {
    json!({"kind": "command", "params": {"program": "sh", "args": ["-c", "sleep 0.2; echo $CUDA_VISIBLE_DEVICES"]}, "gpus": gpus})
}

/// Starts a stack and waits until every worker's engine is healthy and consuming.
async fn healthy_stack(opts: StackOptions) -> Stack {
    Stack::start_healthy(opts).await
}

async fn gpu_fault(stack: &Stack, engine: &str, gpu: u32, fault: &str) {
    stack
        .gpu_fault(engine, gpu, fault)
        .await
        .unwrap_or_else(|e| panic!("{fault} on {engine} GPU {gpu}: {e}"));
}

async fn engine_action(stack: &Stack, engine: &str, action: &str) -> Value {
    stack
        .engine_action(engine, action)
        .await
        .unwrap_or_else(|e| panic!("{action} {engine}: {e}"))
}

/// Waits until the engine's worker reports (in a heartbeat) that it consumes or does not.
async fn wait_consuming(stack: &Stack, engine: &str, consuming: bool) -> Value {
    stack
        .wait_engine(
            engine,
            Duration::from_secs(15),
            &format!("consuming={consuming}"),
            |v| v["heartbeat"]["consuming"] == consuming,
        )
        .await
        .unwrap()
}

/// The GPU indices a `command` job printed from `CUDA_VISIBLE_DEVICES`.
fn printed_gpus(r: &JobRecord) -> Vec<u32> {
    let out = r
        .result
        .as_ref()
        .and_then(|v| v["stdout_tail"].as_str())
        .unwrap_or_default();
    out.trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("CUDA_VISIBLE_DEVICES={out:?} of {r:?}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_with_unhealthy_gpus_takes_none_of_200_jobs_and_takes_work_after_clear() {
    let stack = healthy_stack(StackOptions::default()).await;
    for gpu in 0..2 {
        gpu_fault(&stack, "worker-2", gpu, "overheat").await;
    }
    let sick = stack
        .wait_engine(
            "worker-2",
            Duration::from_secs(15),
            "unhealthy and idle",
            |v| v["state"] == "unhealthy" && v["heartbeat"]["consuming"] == false,
        )
        .await
        .unwrap();
    let healths: Vec<&Value> = sick["heartbeat"]["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| &g["health"])
        .collect();
    assert_eq!(healths, vec!["unhealthy", "unhealthy"], "{sick}");

    let ids = stack.submit_many(200, 32, &short_job(20)).await.unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(
        by_status(&records).get(&JobStatus::Succeeded),
        Some(&200),
        "{:?}",
        by_status(&records)
    );
    for r in &records {
        let w = r.worker.as_deref().unwrap_or_default();
        assert!(
            w == "worker-1" || w == "worker-3",
            "job {} ran on {w:?}: {r:?}",
            r.id
        );
    }
    assert_eq!(
        workers_of(&records),
        BTreeSet::from(["worker-1".to_string(), "worker-3".to_string()]),
        "both healthy workers shared the load"
    );
    assert_eq!(
        stack.worker_metric(1, "gpuq_jobs_started_total").await,
        Some(0.0),
        "the sick worker started no job at all"
    );
    assert_eq!(
        stack
            .worker_metric(1, "gpuq_deliveries_given_back_total")
            .await,
        Some(0.0),
        "the sick worker's consumer was closed: the broker sent it nothing to give back"
    );

    for gpu in 0..2 {
        gpu_fault(&stack, "worker-2", gpu, "clear").await;
    }
    stack
        .wait_engine(
            "worker-2",
            Duration::from_secs(15),
            "healthy and consuming",
            |v| v["state"] == "healthy" && v["heartbeat"]["consuming"] == true,
        )
        .await
        .unwrap();
    let ids = stack.submit_many(60, 16, &short_job(50)).await.unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(by_status(&records).get(&JobStatus::Succeeded), Some(&60));
    let on_2 = records
        .iter()
        .filter(|r| r.worker.as_deref() == Some("worker-2"))
        .count();
    assert!(
        on_2 > 0,
        "after clear worker-2 takes work again: {:?}",
        workers_of(&records)
    );
    eprintln!("after clear: worker-2 ran {on_2} of 60 jobs");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cordoned_worker_takes_no_new_jobs_a_drained_one_finishes_its_job_first() {
    let stack = healthy_stack(StackOptions::default()).await;

    // Cordon: no new jobs.
    let v = engine_action(&stack, "worker-1", "cordon").await;
    assert_eq!(v["state"], "cordoned", "{v}");
    wait_consuming(&stack, "worker-1", false).await;
    let v = stack.engine("worker-1").await.unwrap();
    assert_eq!(v["state"], "cordoned", "{v}");
    assert_eq!(v["admin"], "cordoned", "{v}");
    let ids = stack.submit_many(60, 16, &short_job(20)).await.unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(by_status(&records).get(&JobStatus::Succeeded), Some(&60));
    assert!(
        !workers_of(&records).contains("worker-1"),
        "a cordoned worker took jobs: {:?}",
        workers_of(&records)
    );

    // Drain: a long job runs on worker-1 (the only worker open), then worker-1 is drained.
    for w in ["worker-2", "worker-3"] {
        engine_action(&stack, w, "cordon").await;
    }
    engine_action(&stack, "worker-1", "uncordon").await;
    for w in ["worker-2", "worker-3"] {
        wait_consuming(&stack, w, false).await;
    }
    wait_consuming(&stack, "worker-1", true).await;
    let long = stack
        .submit_ok(
            &json!({"kind": "simulate", "params": {"duration_ms": 6000, "progress_steps": 12}}),
        )
        .await
        .unwrap();
    let running = stack.wait_running(long, Duration::from_secs(15)).await;
    assert_eq!(running.worker.as_deref(), Some("worker-1"));
    let v = engine_action(&stack, "worker-1", "drain").await;
    let drained_at = gpuq_common::job::now_ms();
    assert_eq!(v["state"], "draining", "{v}");
    for w in ["worker-2", "worker-3"] {
        engine_action(&stack, w, "uncordon").await;
    }
    wait_consuming(&stack, "worker-1", false).await;
    for w in ["worker-2", "worker-3"] {
        wait_consuming(&stack, w, true).await;
    }
    let v = stack.engine("worker-1").await.unwrap();
    assert_eq!(v["state"], "draining", "{v}");
    assert_eq!(v["admin"], "draining", "{v}");
    let ids = stack.submit_many(40, 16, &short_job(20)).await.unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(by_status(&records).get(&JobStatus::Succeeded), Some(&40));
    assert!(
        !workers_of(&records).contains("worker-1"),
        "a draining worker took new jobs"
    );
    let r = stack.wait_one(long, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    assert_eq!(
        r.worker.as_deref(),
        Some("worker-1"),
        "the drained worker finished its job: {r:?}"
    );
    assert_eq!(r.attempts, 1, "it was not interrupted: {r:?}");
    assert!(
        r.finished_at.unwrap() > drained_at,
        "the job was still running when the drain began (finished {:?}, drain {drained_at})",
        r.finished_at
    );
    // Its job done, the drained worker still takes nothing.
    let ids = stack.submit_many(40, 16, &short_job(20)).await.unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(by_status(&records).get(&JobStatus::Succeeded), Some(&40));
    assert!(
        !workers_of(&records).contains("worker-1"),
        "a drained worker took new jobs"
    );
    let v = stack
        .wait_engine("worker-1", Duration::from_secs(15), "idle", |v| {
            v["heartbeat"]["running_jobs"] == json!([])
        })
        .await
        .unwrap();
    assert_eq!(v["heartbeat"]["consuming"], false, "{v}");
    assert!(v["state"] == "draining" || v["state"] == "cordoned", "{v}");

    // Uncordon restores it.
    let v = engine_action(&stack, "worker-1", "uncordon").await;
    assert_eq!(v["admin"], Value::Null, "{v}");
    stack
        .wait_engine(
            "worker-1",
            Duration::from_secs(15),
            "healthy and consuming",
            |v| v["state"] == "healthy" && v["heartbeat"]["consuming"] == true,
        )
        .await
        .unwrap();
    let ids = stack.submit_many(60, 16, &short_job(50)).await.unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(by_status(&records).get(&JobStatus::Succeeded), Some(&60));
    assert!(
        workers_of(&records).contains("worker-1"),
        "uncordoned worker-1 takes jobs again"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_2_gpu_job_sees_exactly_its_gpus_waits_for_2_healthy_ones_64_gpus_is_unschedulable() {
    let stack = healthy_stack(StackOptions::default()).await;

    // CUDA_VISIBLE_DEVICES names exactly the GPUs recorded on the job.
    let id = stack.submit_ok(&print_gpus_job(2)).await.unwrap();
    let r = stack.wait_one(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    assert_eq!(r.gpus_requested, 2);
    assert_eq!(r.gpus.len(), 2, "{r:?}");
    assert_eq!(
        r.gpus.iter().collect::<HashSet<_>>().len(),
        2,
        "distinct GPUs: {r:?}"
    );
    assert_eq!(printed_gpus(&r), r.gpus, "printed vs recorded: {r:?}");
    let v = stack.job(id).await.unwrap();
    assert_eq!(
        v["gpus"],
        json!(r.gpus),
        "the REST view shows the same GPUs: {v}"
    );

    // Only worker-1 has two healthy GPUs: every gpus:2 job runs there, on both.
    for w in ["worker-2", "worker-3"] {
        gpu_fault(&stack, w, 0, "overheat").await;
    }
    for w in ["worker-2", "worker-3"] {
        stack
            .wait_engine(w, Duration::from_secs(15), "degraded", |v| {
                v["state"] == "degraded"
            })
            .await
            .unwrap();
    }
    let ids = stack
        .submit_many(6, 6, &slow_print_gpus_job(2))
        .await
        .unwrap();
    let mut records = stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    for r in &records {
        assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
        assert_eq!(
            r.worker.as_deref(),
            Some("worker-1"),
            "only worker-1 has 2 healthy GPUs: {r:?}"
        );
        assert_eq!(r.gpus, vec![0, 1], "{r:?}");
        assert_eq!(printed_gpus(r), r.gpus, "{r:?}");
        assert_eq!(
            r.attempts, 1,
            "waiting for GPUs did not burn attempts: {r:?}"
        );
    }
    // Each needs both GPUs free: they ran one after another, never two at once.
    records.sort_by_key(|r| r.started_at);
    for pair in records.windows(2) {
        assert!(
            pair[1].started_at.unwrap() >= pair[0].finished_at.unwrap(),
            "two gpus:2 jobs on worker-1 at once: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }

    // One GPU of every worker unhealthy: a gpus:2 job waits, a gpus:1 job still runs.
    gpu_fault(&stack, "worker-1", 1, "overheat").await;
    stack
        .wait_engine("worker-1", Duration::from_secs(15), "degraded", |v| {
            v["state"] == "degraded"
        })
        .await
        .unwrap();
    let pair = stack.submit_ok(&print_gpus_job(2)).await.unwrap();
    let single = stack.submit_ok(&print_gpus_job(1)).await.unwrap();
    let r = stack
        .wait_one(single, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    let healthy_gpu = match r.worker.as_deref() {
        Some("worker-1") => 0,
        _ => 1,
    };
    assert_eq!(
        r.gpus,
        vec![healthy_gpu],
        "a gpus:1 job runs on the healthy GPU: {r:?}"
    );
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(5) {
        let r = stack.store.get(pair).await.unwrap().unwrap();
        assert_eq!(
            r.status,
            JobStatus::Queued,
            "no worker has 2 healthy GPUs, yet: {r:?}"
        );
        assert_eq!(r.started_at, None, "{r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gpu_fault(&stack, "worker-3", 0, "clear").await;
    let r = stack.wait_one(pair, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    assert_eq!(
        r.worker.as_deref(),
        Some("worker-3"),
        "it ran where 2 GPUs became healthy: {r:?}"
    );
    assert_eq!(r.gpus, vec![0, 1], "{r:?}");
    assert_eq!(printed_gpus(&r), r.gpus, "{r:?}");
    assert_eq!(
        r.attempts, 1,
        "waiting for GPUs did not burn attempts: {r:?}"
    );

    // No engine has 64 GPUs: dead-lettered as unschedulable, not looping.
    let huge = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 10}, "gpus": 64}))
        .await
        .unwrap();
    let r = stack.wait_one(huge, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, JobStatus::DeadLettered, "{r:?}");
    assert_eq!(r.attempts, 0, "it never ran: {r:?}");
    let reason = r
        .result
        .as_ref()
        .map(|v| v["reason"].clone())
        .unwrap_or_default();
    let error = r.error.clone().unwrap_or_default();
    assert_eq!(reason, "unschedulable", "{r:?}");
    assert!(error.contains("unschedulable"), "{r:?}");
    eprintln!("gpus:64 job dead-lettered: error {error:?}");
    let v = stack.job(huge).await.unwrap();
    assert_eq!(v["status"], "dead_lettered", "{v}");
    let dead = stack.dead_letters().await.unwrap();
    assert!(
        dead["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == huge.to_string()),
        "{dead}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_is_offline_within_three_heartbeats_and_healthy_again_when_it_returns() {
    let stack = healthy_stack(StackOptions {
        workers: 2,
        ..Default::default()
    })
    .await;
    let state_of = |engines: &[Value], id: &str| {
        engines
            .iter()
            .find(|e| e["id"] == id)
            .map(|e| e["state"].as_str().unwrap_or_default().to_string())
    };
    let mut offline_after = vec![];
    let mut back_after = vec![];
    for trial in 0..3 {
        let restarts_before = stack.engine("worker-2").await.unwrap()["restarts"]
            .as_u64()
            .unwrap();
        stack.workers[1].kill_and_hold().await;
        let killed = Instant::now();
        loop {
            let engines = stack.engines().await.unwrap();
            let state = state_of(&engines, "worker-2");
            if state.as_deref() == Some("offline") {
                offline_after.push(killed.elapsed());
                assert_eq!(
                    state_of(&engines, "worker-1").as_deref(),
                    Some("healthy"),
                    "{engines:?}"
                );
                break;
            }
            assert!(
                state.is_some(),
                "an engine that died stays listed: {engines:?}"
            );
            assert!(
                killed.elapsed() < Duration::from_secs(20),
                "trial {trial}: never offline: {engines:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        stack.workers[1].resume();
        let resumed = Instant::now();
        loop {
            let engines = stack.engines().await.unwrap();
            if state_of(&engines, "worker-2").as_deref() == Some("healthy") {
                back_after.push(resumed.elapsed());
                break;
            }
            assert!(
                resumed.elapsed() < Duration::from_secs(30),
                "trial {trial}: never back: {engines:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let v = stack.engine("worker-2").await.unwrap();
        assert!(
            v["restarts"].as_u64().unwrap() > restarts_before,
            "the restart is counted: {v}"
        );
    }
    eprintln!(
        "BENCH engine-offline-detection: kill -> offline {offline_after:?} (heartbeat {HEARTBEAT:?}); resume -> healthy {back_after:?}"
    );
    // Three heartbeat intervals, plus what polling and a loaded machine add to the measurement.
    let limit = HEARTBEAT * 3 + Duration::from_millis(500);
    for d in &offline_after {
        assert!(
            *d <= limit,
            "offline after {d:?}, more than 3 heartbeats ({offline_after:?})"
        );
    }
    // The job queue goes on with the engine back.
    let ids = stack.submit_many(20, 8, &short_job(50)).await.unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(by_status(&records).get(&JobStatus::Succeeded), Some(&20));
    stack.stop().await;
}

/// The status of `POST /v1/engines/{engine}/restart` on the manager, with the admin token or not.
async fn restart_status(stack: &Stack, engine: &str, token: Option<&str>) -> u16 {
    let mut rb = stack
        .http
        .post(format!("{}/v1/engines/{engine}/restart", stack.manager_url));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    rb.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_worker_finishes_its_job_then_comes_back_as_a_new_process() {
    let stack = healthy_stack(StackOptions {
        workers: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(restart_status(&stack, "worker-2", None).await, 401);
    let token = Some(stack.admin_token.as_str());
    assert_eq!(restart_status(&stack, "worker-9", token).await, 404);

    // A job runs on worker-2 (worker-1 cordoned) when the operator asks worker-2 to restart.
    engine_action(&stack, "worker-1", "cordon").await;
    wait_consuming(&stack, "worker-1", false).await;
    let job = stack
        .submit_ok(
            &json!({"kind": "simulate", "params": {"duration_ms": 3000, "progress_steps": 6}}),
        )
        .await
        .unwrap();
    let running = stack.wait_running(job, Duration::from_secs(15)).await;
    assert_eq!(running.worker.as_deref(), Some("worker-2"));
    let before = stack.engine("worker-2").await.unwrap();
    let instance = before["heartbeat"]["instance_id"].clone();
    assert_eq!(before["restart_requested"], false, "{before}");
    let asked = engine_action(&stack, "worker-2", "restart").await;
    assert_eq!(asked["restart_requested"], true, "{asked}");
    assert_eq!(asked["restarts"], before["restarts"], "{asked}");

    // It stops taking jobs at once, finishes the running one, then exits: its supervisor (the
    // harness's restart loop, as dev.sh's) starts a new process.
    wait_consuming(&stack, "worker-2", false).await;
    let r = stack.wait_one(job, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    assert_eq!(r.worker.as_deref(), Some("worker-2"), "{r:?}");
    assert_eq!(
        r.attempts, 1,
        "the restart did not interrupt the job: {r:?}"
    );
    let after = stack
        .wait_engine("worker-2", Duration::from_secs(30), "a new process", |v| {
            !v["heartbeat"].is_null() && v["heartbeat"]["instance_id"] != instance
        })
        .await
        .unwrap();
    assert_eq!(
        after["restarts"].as_u64(),
        before["restarts"].as_u64().map(|n| n + 1),
        "the manager counts the restart: {after}"
    );
    assert_eq!(
        after["restart_requested"], false,
        "the new process is not asked to restart: {after}"
    );
    assert_eq!(stack.workers[1].restarts(), 1, "one process exit");
    let log = stack.log_lines("worker-2");
    assert!(
        log.iter()
            .any(|l| l.contains("the operator asked for a restart")),
        "the worker says why it stops"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("\"stopped\"") && l.contains("Restart")),
        "it stopped cleanly, for the restart"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("restart 1 ") && l.contains("exit status: 75")),
        "it exited with code 75 (EX_TEMPFAIL), which supervisors restart: {:?}",
        log.iter()
            .filter(|l| l.starts_with("restart"))
            .collect::<Vec<_>>()
    );

    // The new process takes jobs (and only once; it does not restart again).
    let ids = stack.submit_many(20, 8, &short_job(20)).await.unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(by_status(&records).get(&JobStatus::Succeeded), Some(&20));
    assert_eq!(
        workers_of(&records),
        BTreeSet::from(["worker-2".to_string()])
    );
    assert_eq!(
        stack.workers[1].restarts(),
        1,
        "the new process kept running"
    );

    // An engine without a live process cannot be restarted.
    stack.workers[0].kill_and_hold().await;
    stack
        .wait_engine("worker-1", Duration::from_secs(20), "offline", |v| {
            v["state"] == "offline"
        })
        .await
        .unwrap();
    assert_eq!(restart_status(&stack, "worker-1", token).await, 409);
    stack.workers[0].resume();
    stack.stop().await;
}

/// Live processes (not zombies) whose environment holds `GPUQ_JOB_ID=<id>`: (pid, name).
fn job_processes(id: Uuid) -> Vec<(u32, String)> {
    let needle = format!("GPUQ_JOB_ID={id}");
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") || stat.is_empty() {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        out.push((pid, comm.trim().to_string()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_engine_is_killed_and_its_job_requeued_and_finished_elsewhere() {
    let stack = healthy_stack(StackOptions {
        workers: 2,
        // `hang_attempts` is refused on a pool without fault injection.
        fault_injection: true,
        env: vec![("GPUQ_PROGRESS_TIMEOUT_S".into(), "2".into())],
        ..Default::default()
    })
    .await;

    // A simulated engine that hangs silently on its first attempt.
    let hang = json!({"kind": "simulate", "params": {"duration_ms": 100, "hang_attempts": 1}});
    let id = stack.submit_ok(&hang).await.unwrap();
    let first = stack.wait_running(id, Duration::from_secs(15)).await;
    let r = stack.wait_one(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    assert!(r.attempts >= 2, "{r:?}");
    eprintln!(
        "hung simulate job: attempt 1 on {:?}, finished on {:?} at attempt {}",
        first.worker, r.worker, r.attempts
    );

    // The same, with the hung engine's worker cordoned once the job started there, so the
    // requeued job can only finish on the other worker.
    let id = stack.submit_ok(&hang).await.unwrap();
    let first = stack.wait_running(id, Duration::from_secs(15)).await;
    let hung_on = first.worker.clone().unwrap();
    engine_action(&stack, &hung_on, "cordon").await;
    let r = stack.wait_one(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    assert_eq!(r.attempts, 2, "{r:?}");
    assert_ne!(
        r.worker.as_deref(),
        Some(hung_on.as_str()),
        "finished elsewhere: {r:?}"
    );
    let job = id.to_string();
    assert!(
        stack
            .log_lines(&hung_on)
            .iter()
            .any(|l| l.contains(&job) && l.contains("no progress")),
        "{hung_on} logged the hang of {id}"
    );
    engine_action(&stack, &hung_on, "uncordon").await;
    wait_consuming(&stack, &hung_on, true).await;

    // A command engine that sleeps silently on its first attempt: killed with its whole
    // process group (no `sleep` left behind), then retried.
    let script = r#"if [ "$GPUQ_ATTEMPT" = 1 ]; then sleep 30; echo late; else echo "ok attempt $GPUQ_ATTEMPT"; fi"#;
    let id = stack
        .submit_ok(&json!({"kind": "command", "params": {"program": "sh", "args": ["-c", script]}}))
        .await
        .unwrap();
    let seen = Instant::now();
    let sleeper = loop {
        let procs = job_processes(id);
        if let Some(p) = procs.iter().find(|(_, comm)| comm == "sleep") {
            break p.clone();
        }
        assert!(
            seen.elapsed() < Duration::from_secs(15),
            "the engine's sleep never showed up: {procs:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r = stack.wait_one(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    assert!(r.attempts >= 2, "{r:?}");
    let out = r
        .result
        .as_ref()
        .and_then(|v| v["stdout_tail"].as_str())
        .unwrap_or_default();
    assert!(out.contains("ok attempt"), "{r:?}");
    let took = r.finished_at.unwrap() - r.created_at;
    assert!(
        took < 20_000,
        "the silent engine was killed, not waited out: {took} ms"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = job_processes(id);
    assert!(
        left.is_empty(),
        "processes of the job outlived it: {left:?} (sleep was pid {})",
        sleeper.0
    );
    let sleeper_alive = std::fs::read_to_string(format!("/proc/{}/stat", sleeper.0))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false);
    assert!(
        !sleeper_alive,
        "sleep (pid {}) outlived its engine",
        sleeper.0
    );
    eprintln!(
        "hung command job: {took} ms from submit to success, {} attempts, finished on {:?}",
        r.attempts, r.worker
    );
    // Killed engines leave no GPU marked busy.
    for w in ["worker-1", "worker-2"] {
        stack
            .wait_engine(
                w,
                Duration::from_secs(15),
                "idle with every GPU free",
                |v| {
                    v["heartbeat"]["running_jobs"] == json!([])
                        && v["heartbeat"]["gpus"]
                            .as_array()
                            .is_some_and(|g| g.len() == 2 && g.iter().all(|g| g["job"].is_null()))
                },
            )
            .await
            .unwrap();
    }
    stack.stop().await;
}

/// Deliveries the workers gave back to the queue, by reason (`no_free_gpu`, `lease_held`, …).
async fn given_back_by_reason(stack: &Stack) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for url in &stack.worker_urls {
        let Ok(r) = stack.http.get(format!("{url}/metrics")).send().await else {
            continue;
        };
        let text = r.text().await.unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.starts_with("gpuq_deliveries_given_back_total{"))
        {
            let reason = line
                .split("reason=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("?")
                .to_string();
            let n: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
            *out.entry(reason).or_default() += n;
        }
    }
    out.retain(|_, n| *n > 0.0);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_backlog_every_gpu_slot_stays_busy_bench_gpu_slot_gap() {
    let stack = healthy_stack(StackOptions::default()).await;
    // Build the whole backlog first: every worker cordoned while the jobs go in.
    let workers = ["worker-1", "worker-2", "worker-3"];
    for w in workers {
        engine_action(&stack, w, "cordon").await;
    }
    for w in workers {
        wait_consuming(&stack, w, false).await;
    }
    let ids = stack.submit_many(300, 48, &short_job(50)).await.unwrap();
    assert_eq!(
        stack.queue_depth("default").await.unwrap(),
        300,
        "the backlog is queued"
    );
    for w in workers {
        engine_action(&stack, w, "uncordon").await;
    }
    let records = stack
        .wait_final(&ids, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(
        by_status(&records).get(&JobStatus::Succeeded),
        Some(&300),
        "{:?}",
        by_status(&records)
    );

    let mut slots: BTreeMap<(String, u32), Vec<&JobRecord>> = BTreeMap::new();
    for r in &records {
        assert_eq!(r.gpus.len(), 1, "{r:?}");
        slots
            .entry((r.worker.clone().unwrap(), r.gpus[0]))
            .or_default()
            .push(r);
    }
    assert_eq!(
        slots.len(),
        6,
        "every (worker, GPU) slot was used: {:?}",
        slots.keys()
    );
    let mut gaps = vec![];
    for (slot, jobs) in &mut slots {
        jobs.sort_by_key(|r| r.started_at);
        for pair in jobs.windows(2) {
            let gap = pair[1].started_at.unwrap() - pair[0].finished_at.unwrap();
            assert!(
                gap >= 0,
                "two jobs on {slot:?} at once: {:?} and {:?}",
                pair[0],
                pair[1]
            );
            gaps.push(gap);
        }
    }
    gaps.sort_unstable();
    let first = records.iter().filter_map(|r| r.started_at).min().unwrap();
    let last = records.iter().filter_map(|r| r.finished_at).max().unwrap();
    let busy: i64 = records
        .iter()
        .map(|r| r.finished_at.unwrap() - r.started_at.unwrap())
        .sum();
    let per_slot: Vec<usize> = slots.values().map(Vec::len).collect();
    let given_back = given_back_by_reason(&stack).await;
    eprintln!(
        "BENCH gpu-slot-gap: median {} ms, p95 {} ms, max {} ms over {} gaps (3 workers x 2 sim GPUs, 300 jobs x 50 ms); \
         span {} ms, slot utilization {:.0}%, jobs per slot {per_slot:?}, deliveries given back {given_back:?}",
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.95),
        gaps.last().unwrap(),
        gaps.len(),
        last - first,
        100.0 * busy as f64 / (6.0 * (last - first) as f64),
    );
    // Prefetch equals the free healthy slots and every job asks for one GPU: no delivery may
    // arrive that finds no free GPU (each such give-back idles a GPU for 200 ms).
    assert_eq!(
        given_back.get("no_free_gpu"),
        None,
        "deliveries arrived for which no GPU was free"
    );
    stack.stop().await;
}

/// A 2-GPU job while the only 2-GPU engine is down (crashed, restarting): the 1-GPU engine that
/// gets it must not call it unschedulable — it waits, and runs when that engine is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_only_an_absent_engine_can_place_waits_for_it_instead_of_being_dead_lettered() {
    let stack = healthy_stack(StackOptions {
        workers: 2,
        worker_env: HashMap::from([(0, vec![("GPUQ_GPUS".into(), "sim:1".into())])]),
        ..Default::default()
    })
    .await;
    stack.workers[1].kill_and_hold().await;
    stack
        .wait_engine("worker-2", Duration::from_secs(20), "offline", |e| {
            e["state"] == "offline"
        })
        .await
        .unwrap();
    let pair = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 10}, "gpus": 2}))
        .await
        .unwrap();
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(4) {
        let r = stack.store.get(pair).await.unwrap().unwrap();
        assert_eq!(
            r.status,
            JobStatus::Queued,
            "worker-1 has 1 GPU and worker-2, which has 2, is only away: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let given_back = stack
        .worker_metric(0, "gpuq_deliveries_given_back_total")
        .await
        .unwrap();
    assert!(given_back >= 1.0, "worker-1 saw it and gave it back");
    stack.workers[1].resume();
    let r = stack.wait_one(pair, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    assert_eq!(
        (r.worker.as_deref(), r.gpus.as_slice()),
        (Some("worker-2"), &[0, 1][..]),
        "{r:?}"
    );
    assert_eq!(r.attempts, 1, "waiting burnt no attempt: {r:?}");
    stack.stop().await;
}

/// A job only an absent engine can place is given back again and again; its `ttl_s` still
/// counts from its submission across every copy, and once it passes the job ends
/// `dead_lettered` as `expired` instead of circling on.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_ttl_passes_while_it_is_given_back_is_dead_lettered_expired() {
    let stack = healthy_stack(StackOptions {
        workers: 2,
        worker_env: HashMap::from([(0, vec![("GPUQ_GPUS".into(), "sim:1".into())])]),
        ..Default::default()
    })
    .await;
    stack.workers[1].kill_and_hold().await;
    stack
        .wait_engine("worker-2", Duration::from_secs(20), "offline", |e| {
            e["state"] == "offline"
        })
        .await
        .unwrap();
    let submitted = Instant::now();
    let pair = stack
        .submit_ok(&json!({
            "kind": "simulate", "params": {"duration_ms": 10}, "gpus": 2, "ttl_s": 4
        }))
        .await
        .unwrap();
    let r = stack.wait_one(pair, Duration::from_secs(30)).await.unwrap();
    let ended = submitted.elapsed();
    assert_eq!(r.status, JobStatus::DeadLettered, "{r:?}");
    let reason = r.result.as_ref().map(|v| v["reason"].clone());
    assert_eq!(reason, Some(json!("expired")), "{r:?}");
    assert_eq!(r.attempts, 0, "it never ran: {r:?}");
    let given_back = stack
        .worker_metric(0, "gpuq_deliveries_given_back_total")
        .await
        .unwrap();
    assert!(
        given_back >= 2.0,
        "worker-1 gave it back on the way: {given_back}"
    );
    assert!(
        ended >= Duration::from_secs(4) && ended < Duration::from_secs(10),
        "expired {ended:?} after its submission, with a ttl of 4 s"
    );
    stack.workers[1].resume();
    stack.stop().await;
}
