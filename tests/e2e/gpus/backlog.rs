//! A backlog keeps every GPU slot busy, and a job only an absent engine can place is given back
//! until that engine returns or its TTL passes.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use gpuq_common::JobStatus;
use gpuq_e2e::{by_status, percentile};

use super::*;

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
