//! Deep backlogs (issue 18): a queue at its length limit answers at once (503 with
//! `Retry-After`, nothing stored or enqueued), and the benchmark that fills a queue with
//! 200,000 jobs while no worker runs, then drains it, reporting each RabbitMQ node's memory and
//! the drain rate on the way.
//!
//! `cargo nextest run --workspace --run-ignored only -E 'test(/budget_bench_deep_backlog/)' --no-capture`
//! (`GPUQ_BENCH_BACKLOG=N` for another size).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

use gpuq_common::JobStatus;
use gpuq_e2e::{Stack, StackOptions};

use crate::pipeline::bench;

fn zero_length_jobs(n: usize) -> Value {
    json!({ "jobs": vec![json!({"kind": "simulate", "params": {"duration_ms": 0}}); n] })
}

/// Posts one batch; answers the status, the `Retry-After` header and the body.
async fn post_batch(stack: &Stack, body: &Value) -> (StatusCode, Option<String>, Value) {
    let r = stack
        .http
        .post(format!("{}/v1/jobs/batch", stack.gateway_url))
        .bearer_auth(&stack.api_key)
        .json(body)
        .send()
        .await
        .expect("gateway answers");
    let status = r.status();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_503_with_retry_after_at_once_and_keeps_nothing() {
    let mut stack = Stack::start(StackOptions {
        workers: 0,
        env: vec![("GPUQ_MAX_QUEUE_LENGTH".into(), "100".into())],
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let (status, _, body) = post_batch(&stack, &zero_length_jobs(100)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(stack.queue_depth("default").await.unwrap(), 100);

    // A quorum queue refuses publishes once its length is over the limit: it takes one more.
    let single = json!({"kind": "simulate", "params": {"duration_ms": 0}});
    let (status, body) = stack.submit(&single).await.unwrap();
    let over = match status {
        202 => 1,
        503 => 0,
        _ => panic!("{status} {body}"),
    };
    // Then one job a request, and a batch: refused by the broker at once, not after a timeout.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let (status, body) = stack.submit(&single).await.unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("queue full"), "{body}");
    }
    let t = Instant::now();
    let (status, retry, body) = post_batch(&stack, &zero_length_jobs(10)).await;
    slowest = slowest.max(t.elapsed());
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(retry.is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("nothing was enqueued"), "{body}");
    // A publish confirm waits up to seconds; a nack of a full queue comes back in milliseconds.
    assert!(
        slowest < Duration::from_secs(2),
        "a refusal took {slowest:?}"
    );
    eprintln!("slowest refusal at the queue length limit: {slowest:?}");

    // Nothing refused was kept: the same jobs queued in the broker and in the store.
    let queued = 100 + over;
    assert_eq!(stack.queue_depth("default").await.unwrap(), queued);
    let counts = stack.store.count_by_status().await.unwrap();
    assert_eq!(
        counts.get(&JobStatus::Queued),
        Some(&u64::from(queued)),
        "{counts:?}"
    );

    // A worker drains it; then the queue takes jobs again.
    stack.add_workers(&StackOptions::default()).unwrap();
    gpuq_e2e::eventually("the backlog drains", Duration::from_secs(60), || async {
        let c = stack.store.count_by_status().await.unwrap();
        c.get(&JobStatus::Succeeded) == Some(&u64::from(queued))
    })
    .await;
    let (status, body) = stack
        .submit(&json!({"kind": "simulate", "params": {"duration_ms": 0}}))
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    stack.stop().await;
}

/// Each RabbitMQ node's memory in MB (management API `/api/nodes`, `mem_used`).
async fn node_memory_mb(http: &reqwest::Client) -> Vec<f64> {
    let mut out = vec![];
    for port in [15672, 15673, 15674] {
        let v: Value = match http
            .get(format!("http://127.0.0.1:{port}/api/nodes"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        // Every node lists the cluster; take this port's own node (the one whose name it serves).
        let own = format!("rabbit{}@localhost", port - 15671);
        let mem = v
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["name"] == own.as_str()))
            .and_then(|n| n["mem_used"].as_f64());
        out.push(mem.map_or(f64::NAN, |b| (b / 1e6).round()));
    }
    out
}

/// Fills the default queue with `total` zero-length jobs through the batch API, noting the
/// nodes' memory as the depth passes each of `marks`.
async fn fill(stack: &Stack, total: usize, marks: &[usize]) -> (f64, Vec<Value>) {
    use futures_util::StreamExt;
    let started = Instant::now();
    let mut noted = vec![];
    let mut done = 0usize;
    let batches = futures_util::stream::iter(0..total.div_ceil(1000))
        .map(|i| {
            let n = (total - i * 1000).min(1000);
            async move {
                loop {
                    let (status, retry, body) = post_batch(stack, &zero_length_jobs(n)).await;
                    match status {
                        StatusCode::ACCEPTED => return n,
                        StatusCode::TOO_MANY_REQUESTS => {
                            let s = retry.and_then(|s| s.parse().ok()).unwrap_or(1);
                            tokio::time::sleep(Duration::from_secs(s)).await;
                        }
                        other => panic!("batch {i}: {other} {body}"),
                    }
                }
            }
        })
        .buffer_unordered(4);
    futures_util::pin_mut!(batches);
    while let Some(n) = batches.next().await {
        done += n;
        for &m in marks {
            if done >= m && done - n < m {
                noted.push(
                    json!({"queued": m, "node_memory_mb": node_memory_mb(&stack.http).await}),
                );
            }
        }
    }
    (total as f64 / started.elapsed().as_secs_f64(), noted)
}

/// The drain: every second, the jobs finished and the queue's depth; the drain rate (jobs/s,
/// over 5 s) and the nodes' memory when the depth passes each of `marks`.
async fn drain(stack: &Stack, total: u64, marks: &[usize]) -> (f64, Vec<Value>) {
    let started = Instant::now();
    let succeeded = || async {
        let c = stack.store.count_by_status().await.unwrap();
        c.get(&JobStatus::Succeeded).copied().unwrap_or(0)
    };
    let mut history: Vec<(f64, u64)> = vec![];
    let mut pending: Vec<usize> = marks.to_vec();
    let mut noted = vec![];
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let done = succeeded().await;
        let t = started.elapsed().as_secs_f64();
        history.push((t, done));
        let depth = total - done;
        let window = history.iter().rev().find(|(t0, _)| t - t0 >= 5.0);
        if let Some(&(t0, d0)) = window
            && let Some(pos) = pending.iter().position(|&m| depth as usize <= m)
        {
            let m = pending.remove(pos);
            noted.push(json!({
                "queued": m,
                "drain_jobs_per_second": ((done - d0) as f64 / (t - t0)).round(),
                "node_memory_mb": node_memory_mb(&stack.http).await,
            }));
        }
        if done >= total {
            return (total as f64 / t, noted);
        }
        assert!(Instant::now() < deadline, "not drained: {done} of {total}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Issue 18's deep-backlog budget, measured: fill with no worker, then three workers drain.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run on purpose, alone"]
async fn budget_bench_deep_backlog() {
    let total: usize = std::env::var("GPUQ_BENCH_BACKLOG")
        .map(|v| v.parse().expect("GPUQ_BENCH_BACKLOG: a number"))
        .unwrap_or(200_000);
    let mut stack = Stack::start(StackOptions {
        workers: 0,
        env: vec![(
            "GPUQ_TENANT_LIMITS".into(),
            "*:rate=1000000:burst=1000000".into(),
        )],
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let idle = node_memory_mb(&stack.http).await;
    let marks: Vec<usize> = [10_000, 100_000, 200_000]
        .into_iter()
        .filter(|&m| m <= total)
        .collect();
    let (fill_rate, filled) = fill(&stack, total, &marks).await;
    assert_eq!(stack.queue_depth("default").await.unwrap() as usize, total);

    let workers = StackOptions::default();
    stack.add_workers(&workers).unwrap();
    stack
        .wait_engines_healthy(workers.workers, Duration::from_secs(30))
        .await
        .unwrap();
    let mut drain_marks = marks.clone();
    drain_marks.reverse();
    // The first mark is the whole backlog: its rate is the drain's first five seconds.
    drain_marks[0] = total - 1;
    let (drain_rate, drained) = drain(&stack, total as u64, &drain_marks).await;
    let after = node_memory_mb(&stack.http).await;

    // The same stack with an empty queue, for comparison.
    let fresh = bench(&stack, &["--jobs", "3000", "--duration-ms", "0"]).await;
    let duplicates = stack.workers_metric("gpuq_results_discarded_total").await;
    let counts = stack.store.count_by_status().await.unwrap();
    let succeeded = counts.get(&JobStatus::Succeeded).copied().unwrap_or(0);
    assert_eq!(succeeded as usize, total + 3000, "{counts:?}");
    assert_eq!(duplicates, 0.0);
    println!(
        "BUDGET backlog {}",
        json!({
            "jobs": total,
            "node_memory_mb_idle": idle,
            "fill_jobs_per_second": fill_rate.round(),
            "filling": filled,
            "draining": drained,
            "drain_jobs_per_second_overall": drain_rate.round(),
            "node_memory_mb_drained": after,
            "empty_queue_full_speed_jobs_per_second": fresh["jobs_per_second"],
            "lost": total as u64 + 3000 - succeeded,
            "duplicates": duplicates,
        })
    );
    stack.stop().await;
}
