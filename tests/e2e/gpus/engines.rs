//! Engines that die, restart or hang: a killed worker goes offline and comes back, a restarted
//! one finishes its job first, a hung one is killed and its job finished elsewhere.

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

use std::time::Instant;

use gpuq_common::JobStatus;
use gpuq_e2e::by_status;
use uuid::Uuid;

use super::*;

const HEARTBEAT: Duration = Duration::from_millis(1000);

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
