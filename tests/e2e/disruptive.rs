//! Issue 3's infrastructure faults: a RabbitMQ node and Redis are stopped and started under a
//! running workload. These tests touch the shared local stack, so `scripts/test.sh` runs this
//! binary alone, one test at a time, after every other suite.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use gpuq_common::JobStatus;
use gpuq_e2e::{Stack, StackOptions, by_status, repo_root};
use serde_json::{Value, json};
use uuid::Uuid;

fn stack_script() -> String {
    std::env::var("GPUQ_TEST_STACK_SCRIPT")
        .unwrap_or_else(|_| repo_root().join("scripts/stack.sh").display().to_string())
}

async fn stack_cmd(args: &[&str]) -> String {
    let out = tokio::process::Command::new("bash")
        .arg(stack_script())
        .args(args)
        .output()
        .await
        .expect("stack.sh runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "stack.sh {args:?} failed:\n{text}");
    text
}

/// Submits with an Idempotency-Key, retrying what the gateway could not confirm (503) with the
/// same key, as a careful client does. Returns the job id once accepted.
async fn submit_reliably(stack: &Stack, body: &Value) -> Uuid {
    let key = Uuid::new_v4().to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = stack
            .auth(stack.http.post(format!("{}/v1/jobs", stack.gateway_url)))
            .header("Idempotency-Key", &key)
            .json(body)
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        if let Ok(r) = r {
            let status = r.status().as_u16();
            if status == 202 || status == 200 {
                let v: Value = r.json().await.unwrap();
                return v["id"].as_str().unwrap().parse().unwrap();
            }
            assert!(
                status >= 500 || status == 409 || status == 429,
                "unexpected {status}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never accepted the job"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn submit_paced(stack: &Stack, n: usize, per_second: u64, body: Value) -> Vec<Uuid> {
    use futures_util::StreamExt;
    let start = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let body = body.clone();
            async move {
                let at = start + Duration::from_millis(i as u64 * 1000 / per_second);
                tokio::time::sleep_until(at.into()).await;
                submit_reliably(stack, &body).await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

async fn assert_each_once(stack: &Stack, ids: &[Uuid], timeout: Duration) {
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "ids are unique"
    );
    let records = stack.wait_final(ids, timeout).await.unwrap();
    let counts = by_status(&records);
    assert_eq!(
        counts.get(&JobStatus::Succeeded),
        Some(&ids.len()),
        "{counts:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stack.workers_metric("gpuq_results_discarded_total").await,
        0.0,
        "work recorded twice"
    );
    let total: u64 = stack.store.count_by_status().await.unwrap().values().sum();
    assert_eq!(
        total as usize,
        ids.len(),
        "no job the client does not know of"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_jobs_survive_the_broker_node_the_services_use_being_stopped_and_started() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let body = json!({"kind": "simulate", "params": {"duration_ms": 50}});
    let chaos = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Every service connected to node 1 first (it is first in GPUQ_AMQP_URLS).
        stack_cmd(&["node-stop", "1"]).await;
        tokio::time::sleep(Duration::from_secs(8)).await;
        stack_cmd(&["node-start", "1"]).await;
    };
    let (ids, ()) = tokio::join!(submit_paced(&stack, 500, 40, body), chaos);
    assert_each_once(&stack, &ids, Duration::from_secs(180)).await;
    assert!(
        stack
            .log_lines("gateway")
            .iter()
            .any(|l| l.contains("5673") || l.contains("5674")),
        "the gateway moved to another node"
    );
    stack.stop().await;
    stack_cmd(&["up"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_stopped_for_ten_seconds_mid_run_loses_nothing_and_workers_resume_by_themselves() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let body = json!({"kind": "simulate", "params": {"duration_ms": 100}});
    let first = stack.submit_many(150, 16, &body).await.unwrap();
    stack_cmd(&["redis-stop"]).await;
    let stopped = Instant::now();
    // Submissions without an Idempotency-Key do not need Redis.
    let during = stack.submit_many(50, 8, &body).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed())).await;
    stack_cmd(&["redis-start"]).await;
    let ids: Vec<Uuid> = first.into_iter().chain(during).collect();
    assert_each_once(&stack, &ids, Duration::from_secs(120)).await;
    for w in &stack.workers {
        assert_eq!(w.restarts(), 0, "{} resumed without a restart", w.name);
    }
    assert!(
        stack
            .log_lines("worker-1")
            .iter()
            .chain(stack.log_lines("worker-2").iter())
            .any(|l| l.contains("Redis unreachable")),
        "the workers noticed the outage"
    );
    stack.stop().await;
}

#[tokio::test]
async fn idempotent_submissions_answer_503_while_redis_is_away() {
    let stack = Stack::start(StackOptions {
        workers: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    stack_cmd(&["redis-stop"]).await;
    let r = stack
        .auth(stack.http.post(format!("{}/v1/jobs", stack.gateway_url)))
        .header("Idempotency-Key", "k1")
        .json(&json!({"kind": "simulate"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    stack_cmd(&["redis-start"]).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "unavailable");
    stack.stop().await;
}

#[tokio::test]
async fn the_brokers_consumer_timeout_outlasts_the_longest_job() {
    let out = stack_cmd(&[
        "ctl",
        "1",
        "eval",
        "application:get_env(rabbit, consumer_timeout).",
    ])
    .await;
    let ms: u64 = out
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| s.len() >= 4)
        .find_map(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no consumer_timeout in {out}"));
    let longest_job_ms = gpuq_common::Settings::default().job_timeout_s * 1000;
    assert!(
        ms >= longest_job_ms,
        "consumer_timeout {ms} ms < the longest job {longest_job_ms} ms"
    );
}
