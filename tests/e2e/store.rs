//! Issue 18's store budget on SQLite (the default store): with a million job records, a page of
//! `GET /v1/jobs` (newest, by status, by tenant, by tenant and status, deep by cursor) and the
//! manager's overview stay fast, and retention deletes a day's worth of them while the stack runs
//! at full speed.

use std::time::{Duration, Instant};

use gpuq_common::job::{JobMessage, JobPayload, JobPlacement, SimulateParams, now_ms};
use gpuq_common::store;
use gpuq_common::{JobRecord, JobStatus};
use gpuq_e2e::{Stack, StackOptions, Supervised, bin_dir, percentile, repo_root, sum_metric};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::pipeline::bench;

const RECORDS: usize = 1_000_000;
const DAYS: i64 = 40;
const DAY_MS: i64 = 86_400_000;
/// Requests per kind of page, and overviews.
const REQUESTS: usize = 500;
/// Zero-length jobs in each full-speed run (about 20 s).
const JOBS_PER_RUN: &str = "10000";

/// The `i`th of `RECORDS` synthetic jobs: submitted from `DAYS + 1` to 1 days before `now`
/// in order (ids follow), most final, the newest few hundred queued or running; four tenants,
/// two pools.
fn record(template: &JobRecord, i: usize, now: i64) -> JobRecord {
    let span = DAYS * DAY_MS;
    let created = now - (DAYS + 1) * DAY_MS + (i as i64 * span) / RECORDS as i64;
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        (created / 1000) as u64,
        ((created % 1000) * 1_000_000) as u32,
    );
    let mut j = template.clone();
    j.id = Uuid::new_v7(ts);
    j.created_at = created;
    j.tenant = ["default", "team-a", "team-a", "team-b", "team-c"][i % 5].into();
    j.pool = if i % 10 == 3 { "batch" } else { "default" }.into();
    let left = RECORDS - i;
    j.status = match i % 100 {
        _ if left <= 300 => JobStatus::Queued,
        _ if left <= 600 => JobStatus::Running,
        0..=89 => JobStatus::Succeeded,
        90..=94 => JobStatus::Failed,
        95..=97 => JobStatus::DeadLettered,
        _ => JobStatus::Cancelled,
    };
    if j.status != JobStatus::Queued {
        j.attempts = 1;
        j.worker = Some(format!("worker-{}", i % 3 + 1));
        j.gpus = vec![(i % 2) as u32];
        j.started_at = Some(created + 3);
    }
    if j.status.is_final() {
        j.finished_at = Some(created + 5);
        j.result = Some(json!({"attempt": 1, "steps": 0}));
    }
    if j.status == JobStatus::Failed {
        j.error = Some("simulated failure".into());
    }
    j
}

/// Fills the store at `url` with `RECORDS` jobs, 20,000 a transaction; answers their ids in
/// order and how long it took.
async fn fill(url: &str) -> (Vec<Uuid>, Duration) {
    let store = store::open(url).await.unwrap();
    let msg = JobMessage::new(
        JobPayload::Simulate(SimulateParams::default()),
        JobPlacement {
            gpus: 1,
            min_gpu_memory_mb: None,
            pool: "default".into(),
            ttl_s: None,
        },
    );
    let template = JobRecord::queued(&msg);
    let (now, t0) = (now_ms(), Instant::now());
    let mut ids = Vec::with_capacity(RECORDS);
    for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(20_000) {
        let jobs: Vec<JobRecord> = chunk.iter().map(|&i| record(&template, i, now)).collect();
        ids.extend(jobs.iter().map(|j| j.id));
        let existed = store.insert_many(&jobs, None).await.unwrap();
        assert!(existed.is_empty());
    }
    (ids, t0.elapsed())
}

/// p50, p99 and max (ms, fractional) of `REQUESTS` GETs of what `url_of(i)` names.
async fn latencies(stack: &Stack, bearer: &str, url_of: impl Fn(usize) -> String) -> Value {
    let mut us = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        let t0 = Instant::now();
        let r = stack
            .http
            .get(url_of(i))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        // Timed to the last byte; decoding it is the client's own business.
        let bytes = r.bytes().await.unwrap();
        us.push(t0.elapsed().as_micros() as i64);
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(
            body["jobs"].is_array() || body["job_counts"].is_object(),
            "{body}"
        );
    }
    us.sort_unstable();
    let ms = |p: f64| percentile(&us, p) as f64 / 1000.0;
    json!({"p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0), "requests": REQUESTS})
}

/// The pages `GET /v1/jobs` is measured on, and the overview.
async fn read_latencies(stack: &Stack, ids: &[Uuid]) -> Value {
    let jobs = format!("{}/v1/jobs", stack.gateway_url);
    let admin = stack.api_key.clone();
    let deep = |i: usize| ids[(i * 7919 + 1) * 97 % ids.len()];
    let first = latencies(stack, &admin, |_| jobs.clone()).await;
    let status = latencies(stack, &admin, |i| {
        let s = ["failed", "dead_lettered", "succeeded", "cancelled"][i % 4];
        format!("{jobs}?status={s}")
    })
    .await;
    let tenant = latencies(stack, stack.key_of("team-a"), |_| jobs.clone()).await;
    let tenant_status = latencies(stack, stack.key_of("team-c"), |_| {
        format!("{jobs}?status=failed")
    })
    .await;
    let deep_pages = latencies(stack, &admin, |i| format!("{jobs}?cursor={}", deep(i))).await;
    let deep_tenant = latencies(stack, stack.key_of("team-b"), |i| {
        format!("{jobs}?status=succeeded&pool=batch&cursor={}", deep(i))
    })
    .await;
    let overview = latencies(stack, &stack.read_token, |_| {
        format!("{}/v1/overview", stack.manager_url)
    })
    .await;
    let p99s = [
        &first,
        &status,
        &tenant,
        &tenant_status,
        &deep_pages,
        &deep_tenant,
    ]
    .map(|l| l["p99_ms"].as_f64().unwrap());
    json!({
        "list_p99_ms_worst": p99s.iter().copied().fold(0.0, f64::max),
        "list_first_page": first,
        "list_by_status": status,
        "list_by_tenant": tenant,
        "list_by_tenant_and_status": tenant_status,
        "list_deep_by_cursor": deep_pages,
        "list_deep_by_tenant_status_pool": deep_tenant,
        "overview": overview,
    })
}

/// How the old count (the status index, walked) and the counters compare on this file.
fn count_costs(path: &str) -> Value {
    let c = rusqlite::Connection::open(path).unwrap();
    let time = |sql: &str| {
        let t0 = Instant::now();
        let mut st = c.prepare(sql).unwrap();
        let n = st.query_map([], |_| Ok(())).unwrap().count();
        assert!(n > 0);
        t0.elapsed().as_secs_f64() * 1000.0
    };
    json!({
        "scan_of_status_index_ms": time("SELECT status, count(*) FROM jobs GROUP BY status"),
        "counters_ms": time("SELECT status, sum(n) FROM job_counts GROUP BY status"),
        "active_by_tenant_scan_ms": time(
            "SELECT coalesce(tenant,'default'), count(*) FROM jobs WHERE status IN ('queued','running') GROUP BY 1"
        ),
    })
}

/// Replaces the manager by one keeping `retention_days` (0: forever), in batches of the default
/// size and pause (200, 150 ms: a day of these records then takes about as long as a full-speed
/// run of `JOBS_PER_RUN`). Its first pass starts at once: with `DAYS - k` days it deletes the records of day `k`
/// (the oldest is 0), ~25,000 jobs.
async fn restart_manager(stack: &mut Stack, retention_days: i64) {
    if let Some(mut m) = stack.manager.take() {
        m.stop().await;
    }
    let mut env = stack.env().to_vec();
    env.extend([
        ("GPUQ_RETENTION_DAYS".into(), retention_days.to_string()),
        (
            "GPUQ_MANAGER_BIND".into(),
            stack.manager_url.trim_start_matches("http://").into(),
        ),
        ("GPUQ_WORKER_SECRET".into(), stack.worker_secret.clone()),
    ]);
    stack.manager = Some(
        Supervised::spawn("manager", &bin_dir().join("gpuq-manager"), env, &stack.dir).unwrap(),
    );
    stack.wait_ready().await.unwrap();
}

/// Jobs the manager deleted so far (its `gpuq_jobs_deleted_total`; 0 when it does not answer).
async fn deleted(http: &reqwest::Client, manager_url: &str) -> f64 {
    match http.get(format!("{manager_url}/metrics")).send().await {
        Ok(r) => sum_metric(
            &r.text().await.unwrap_or_default(),
            "gpuq_jobs_deleted_total",
        ),
        Err(_) => 0.0,
    }
}

/// A full-speed run of `jobs` jobs on a manager just restarted with `retention_days`: the run's
/// report with `retention` added: how many jobs were deleted, when the deletion started and
/// ended, and when the run ended (seconds from the run's start).
async fn full_speed_run(stack: &mut Stack, retention_days: i64, jobs: &str) -> Value {
    restart_manager(stack, retention_days).await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let watch = {
        let (http, url, done) = (stack.http.clone(), stack.manager_url.clone(), done.clone());
        tokio::spawn(async move {
            let (mut first, mut last, mut n) = (None, 0.0, 0.0);
            loop {
                let seen = deleted(&http, &url).await;
                let at = t0.elapsed().as_secs_f64();
                if seen > n {
                    first.get_or_insert(at);
                    (last, n) = (at, seen);
                }
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                if finished && (n == 0.0 || at - last > 1.0) {
                    let ended = (n > 0.0).then_some(last);
                    return json!({"deleted": n, "started_s": first, "ended_s": ended});
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut run = bench(stack, &["--jobs", jobs, "--duration-ms", "0"]).await;
    let run_s = t0.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut retention = watch.await.unwrap();
    retention["run_ended_s"] = json!(run_s);
    run["retention"] = retention;
    run
}

/// Alternates full-speed runs without retention (A) and with retention deleting a day's worth
/// (B): A B A B A B A, each B against the mean of its two neighbours. Answers the summary.
async fn retention_under_load(stack: &mut Stack) -> Value {
    let jobs = JOBS_PER_RUN;
    bench(stack, &["--jobs", "500", "--duration-ms", "0"]).await;
    let mut runs = vec![full_speed_run(stack, 0, jobs).await];
    for day in 0..3 {
        runs.push(full_speed_run(stack, DAYS - day, jobs).await);
        runs.push(full_speed_run(stack, 0, jobs).await);
    }
    for r in &runs {
        assert_eq!(r["succeeded"], r["submitted"], "{r:#}");
        assert_eq!(r["lost"], 0, "{r:#}");
        assert_eq!(r["duplicates"], 0, "{r:#}");
    }
    let rate = |i: usize| runs[i]["jobs_per_second"].as_f64().unwrap();
    let mut drops: Vec<f64> = (0..3)
        .map(|k| {
            let without = (rate(2 * k) + rate(2 * k + 2)) / 2.0;
            (without - rate(2 * k + 1)) / without * 100.0
        })
        .collect();
    let runs_json: Vec<Value> = runs
        .iter()
        .map(|r| json!({"jobs_per_second": r["jobs_per_second"], "retention": r["retention"]}))
        .collect();
    drops.sort_by(f64::total_cmp);
    json!({
        "median_drop_percent": drops[1],
        "drops_percent": drops,
        "runs_a_b_a_b_a_b_a": runs_json,
        "jobs_per_run": jobs,
        "retention_batch_and_pause_ms": "defaults: 200, 150",
        "lost": runs.iter().map(|r| r["lost"].clone()).collect::<Vec<_>>(),
        "duplicates": runs.iter().map(|r| r["duplicates"].clone()).collect::<Vec<_>>(),
    })
}

/// The store budget (issue 18 part 4), printed as one `BUDGET` line. Fills a SQLite store with a
/// million jobs (about a minute), starts the stack on it, measures `GET /v1/jobs` and the
/// overview from a client, then full-speed runs alternately without retention and with it
/// deleting a day of the records (~25,000 jobs). Run it on purpose, alone:
/// `cargo nextest run --workspace --run-ignored only -E 'test(/budget_bench_store_million/)' --no-capture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run on purpose, alone"]
async fn budget_bench_store_million() {
    let dir = repo_root()
        .join("target/e2e")
        .join(format!("store-million-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gpuq.db").display().to_string();
    let url = format!("sqlite://{path}");
    let (ids, filled_in) = fill(&url).await;
    let counts = count_costs(&path);
    let mut stack = Stack::start_healthy(StackOptions {
        store_url: Some(url),
        env: vec![("GPUQ_RETENTION_DAYS".into(), "0".into())],
        ..Default::default()
    })
    .await;
    let reads = read_latencies(&stack, &ids).await;
    let retention = retention_under_load(&mut stack).await;
    println!(
        "BUDGET {}",
        json!({
            "records": RECORDS,
            "fill_seconds": filled_in.as_secs_f64(),
            "counts": counts,
            "reads": reads,
            "retention_at_full_speed": retention,
        })
    );
    stack.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
