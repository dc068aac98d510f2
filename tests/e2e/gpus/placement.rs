//! Where jobs go: only to healthy GPUs of engines the operator lets work (cordon, drain), and
//! a `gpus: n` job to exactly n healthy GPUs, which it alone sees.

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

use std::collections::HashSet;
use std::time::Instant;

use gpuq_common::JobStatus;
use gpuq_e2e::by_status;

use super::*;

/// A `command` job that prints the GPUs it was given.
fn print_gpus_job(gpus: u32) -> Value {
    json!({"kind": "command", "params": {"program": "sh", "args": ["-c", "echo $CUDA_VISIBLE_DEVICES"]}, "gpus": gpus})
}

/// The same, after holding its GPUs for a while.
fn slow_print_gpus_job(gpus: u32) -> Value {
    json!({"kind": "command", "params": {"program": "sh", "args": ["-c", "sleep 0.2; echo $CUDA_VISIBLE_DEVICES"]}, "gpus": gpus})
}

async fn gpu_fault(stack: &Stack, engine: &str, gpu: u32, fault: &str) {
    stack
        .gpu_fault(engine, gpu, fault)
        .await
        .unwrap_or_else(|e| panic!("{fault} on {engine} GPU {gpu}: {e}"));
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
