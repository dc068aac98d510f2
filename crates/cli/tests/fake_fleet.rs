//! The CLI's flows against an in-process fake of the gateway, manager and worker admin APIs (as
//! CONTRACTS.md describes them): the bench, the tester's verdicts, retries with idempotency keys,
//! and the JSON errors that reach the caller.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gpuq_cli::Ctx;
use gpuq_cli::cli::{BenchArgs, ConnArgs};
use gpuq_cli::config::{Config, DevEnv};
use gpuq_cli::tester::run::{RunPlan, run_plan};
use gpuq_cli::tester::scenario::Scenario;
use gpuq_common::job::{JobKind, now_ms};
use gpuq_common::{JobRecord, JobStatus};
use serde_json::{Value, json};
use uuid::Uuid;

/// Every simulated job ends 30 ms after it was created, except every `lose_every`-th one.
#[derive(Default)]
struct Fake {
    jobs: Mutex<BTreeMap<Uuid, (i64, bool)>>,
    idempotency: Mutex<HashMap<String, Uuid>>,
    keys_seen: Mutex<Vec<String>>,
    lose_every: u64,
    refuse_first: AtomicU64,
    submits: AtomicU64,
    suppressed: AtomicU64,
    restarts: AtomicU64,
    lists: AtomicU64,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn authorized(h: &HeaderMap, token: &str) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {token}"))
}

fn record(id: Uuid, created: i64, never_finishes: bool) -> JobRecord {
    let done = !never_finishes && now_ms() - created >= 30;
    JobRecord {
        id,
        tenant: "default".into(),
        kind: JobKind::Simulate,
        params: json!({"duration_ms": 0}),
        pool: "default".into(),
        gpus_requested: 1,
        min_gpu_memory_mb: None,
        status: if done {
            JobStatus::Succeeded
        } else {
            JobStatus::Running
        },
        attempts: 1,
        worker: Some("worker-1".into()),
        gpus: vec![0],
        result: done.then(|| json!({"ok": true})),
        error: None,
        created_at: created,
        started_at: Some(created + 5),
        finished_at: done.then_some(created + 30),
        progress: None,
        array_id: None,
        array_index: None,
    }
}

async fn submit(State(f): State<Arc<Fake>>, h: HeaderMap, Json(_): Json<Value>) -> Response {
    if !authorized(&h, "k") {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid credentials",
        );
    }
    let key = h
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(k) = &key {
        f.keys_seen.lock().unwrap().push(k.clone());
    }
    let refuse = f
        .refuse_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    if refuse.is_ok() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no publisher confirm",
        );
    }
    if let Some(k) = &key
        && let Some(id) = f.idempotency.lock().unwrap().get(k)
    {
        return (
            StatusCode::OK,
            [("idempotent-replayed", "true")],
            Json(json!({"id": id, "status": "queued"})),
        )
            .into_response();
    }
    let n = f.submits.fetch_add(1, Ordering::SeqCst) + 1;
    let id = Uuid::now_v7();
    let lose = f.lose_every > 0 && n % f.lose_every == 0;
    f.jobs.lock().unwrap().insert(id, (now_ms(), lose));
    if let Some(k) = key {
        f.idempotency.lock().unwrap().insert(k, id);
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": "queued"})),
    )
        .into_response()
}

async fn get_job(State(f): State<Arc<Fake>>, Path(id): Path<Uuid>) -> Response {
    match f.jobs.lock().unwrap().get(&id) {
        Some((created, lose)) => Json(record(id, *created, *lose)).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "no such job"),
    }
}

async fn list_jobs(
    State(f): State<Arc<Fake>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    f.lists.fetch_add(1, Ordering::SeqCst);
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(100);
    let cursor: Option<Uuid> = q.get("cursor").and_then(|c| c.parse().ok());
    let status = q.get("status").and_then(|s| JobStatus::parse(s));
    let jobs = f.jobs.lock().unwrap();
    let mut page: Vec<JobRecord> = jobs
        .iter()
        .rev()
        .filter(|(id, _)| cursor.is_none_or(|c| **id < c))
        .map(|(id, (created, lose))| record(*id, *created, *lose))
        .filter(|r| status.is_none_or(|s| r.status == s))
        .take(limit + 1)
        .collect();
    let next = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().unwrap().id
    });
    Json(json!({"jobs": page, "next_cursor": next})).into_response()
}

async fn metrics(State(f): State<Arc<Fake>>) -> String {
    let s = f.suppressed.load(Ordering::SeqCst);
    format!(
        "# TYPE gpuq_duplicates_suppressed_total counter\ngpuq_duplicates_suppressed_total{{pool=\"default\"}} {s}\ngpuq_redeliveries_total{{pool=\"default\"}} {s}\ngpuq_results_discarded_total 0\nprocess_start_time_seconds 1700000000\n"
    )
}

async fn arm(State(f): State<Arc<Fake>>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if !authorized(&h, "t") {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin token required",
        );
    }
    match b["scenario"].as_str() {
        Some("duplicate_after_complete") => {
            f.suppressed.fetch_add(1, Ordering::SeqCst);
        }
        Some("crash_mid_task") => {
            f.restarts.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    }
    Json(json!({"enabled": true, "armed": [{"scenario": b["scenario"], "remaining": b["count"]}]}))
        .into_response()
}

async fn engines(State(f): State<Arc<Fake>>) -> Json<Value> {
    Json(json!([{
        "id": "worker-1", "state": "healthy", "admin": null,
        "restarts": f.restarts.load(Ordering::SeqCst), "last_seen_ms": now_ms(), "heartbeat": null
    }]))
}

async fn spawn(fake: Fake) -> (Arc<Fake>, Ctx) {
    let fake = Arc::new(fake);
    let app = Router::new()
        .route("/v1/jobs", post(submit).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/engines", get(engines))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/admin/faults",
            post(arm).get(|| async { Json(json!({"enabled": true, "armed": []})) }),
        )
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let conn = ConnArgs {
        gateway_url: Some(url.clone()),
        api_key: Some("k".into()),
        manager_url: Some(url.clone()),
        admin_token: Some("t".into()),
        read_token: None,
        worker_urls: Some(url),
        tls_ca_file: None,
    };
    (fake, Ctx::new(Config::resolve(&conn, &DevEnv::default())))
}

fn plan(scenario: Scenario, jobs: u32, timeout: Duration) -> RunPlan {
    RunPlan {
        worker: 1,
        scenario,
        count: 1,
        jobs,
        duration_ms: 0,
        fail_probability: None,
        timeout,
        settle: Duration::ZERO,
        concurrency: 8,
        visible: false,
        quiet: true,
    }
}

#[tokio::test]
async fn the_bench_counts_every_job_and_takes_latency_from_the_store() {
    let (fake, ctx) = spawn(Fake::default()).await;
    let args = BenchArgs {
        jobs: 300,
        rate: None,
        duration_ms: 0,
        concurrency: 16,
        batch: None,
        pool: None,
        timeout: Duration::from_secs(10),
        json: true,
    };
    let r = gpuq_cli::bench::measure(&ctx, &args).await.unwrap();
    assert_eq!(
        (r.submitted, r.accepted, r.rejected, r.lost),
        (300, 300, 0, 0)
    );
    assert_eq!(r.succeeded, 300);
    assert_eq!(r.latency.p50_ms, Some(30));
    assert_eq!(r.latency.p99_ms, Some(30));
    assert_eq!(r.duplicates, Some(0));
    assert!(r.jobs_per_second.unwrap() > 0.0);
    // 300 pending jobs are tracked by listing, not by 300 GETs per round.
    assert!(fake.lists.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn a_run_where_every_job_succeeds_once_passes_and_counts_suppressed_duplicates() {
    let (_fake, ctx) = spawn(Fake::default()).await;
    let v = run_plan(
        &ctx,
        &plan(
            Scenario::DuplicateAfterComplete,
            40,
            Duration::from_secs(10),
        ),
    )
    .await
    .unwrap();
    assert!(v.pass, "{}", v.render());
    assert_eq!(
        (v.accepted, v.succeeded, v.lost, v.stored_twice),
        (40, 40, 0, 0)
    );
    assert_eq!(v.duplicates_suppressed, Some(1));
    assert_eq!(v.redeliveries, Some(1));
    assert_eq!(v.duplicate_results, Some(0));
    assert_eq!(v.worker_restarts, Some(0));
    assert!(
        v.events[0]
            .what
            .starts_with("armed duplicate_after_complete ×1 on worker-1")
    );
}

#[tokio::test]
async fn a_job_that_never_becomes_final_is_lost_and_fails_the_run() {
    let (_fake, ctx) = spawn(Fake {
        lose_every: 10,
        ..Fake::default()
    })
    .await;
    let v = run_plan(
        &ctx,
        &plan(Scenario::CrashMidTask, 20, Duration::from_secs(1)),
    )
    .await
    .unwrap();
    assert!(!v.pass);
    assert_eq!(v.lost, 2);
    assert_eq!(v.lost_jobs[0].last_status, Some(JobStatus::Running));
    assert_eq!(v.worker_restarts, Some(1));
    assert!(v.problems[0].contains("not final"), "{:?}", v.problems);
}

#[tokio::test]
async fn refused_submissions_are_retried_with_the_same_idempotency_key() {
    let (fake, ctx) = spawn(Fake {
        refuse_first: AtomicU64::new(3),
        ..Fake::default()
    })
    .await;
    let v = run_plan(&ctx, &plan(Scenario::Normal, 5, Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(v.pass, "{}", v.render());
    assert_eq!((v.accepted, v.rejected), (5, 0));
    assert_eq!(fake.submits.load(Ordering::SeqCst), 5, "one job per key");
    let keys = fake.keys_seen.lock().unwrap();
    assert_eq!(keys.len(), 8);
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 5);
    assert!(
        v.notes
            .iter()
            .any(|n| n.contains("3 submissions were retried"))
    );
}

#[tokio::test]
async fn submit_and_wait_returns_the_final_record() {
    let (_fake, ctx) = spawn(Fake::default()).await;
    let gw = ctx.gateway();
    let sub = gw
        .submit(&gpuq_client::gateway::SubmitBody::simulate(0), None)
        .await
        .unwrap();
    let rec = gpuq_cli::submit::wait_one(&gw, sub.id, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.status, JobStatus::Succeeded);
    assert!(gpuq_cli::submit::render_outcome(&rec).contains("status:    succeeded\n"));
}

#[tokio::test]
async fn the_gateways_json_error_reaches_the_caller_with_a_hint() {
    let (_fake, ctx) = spawn(Fake::default()).await;
    let mut cfg = ctx.cfg.clone();
    cfg.api_key.value = Some(gpuq_common::config::Secret::new("wrong"));
    let gw = Ctx::new(cfg).gateway();
    let err = gw
        .submit(&gpuq_client::gateway::SubmitBody::simulate(0), None)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert_eq!(
        err.to_string(),
        "the gateway answered 401 unauthorized: missing or invalid credentials"
    );
    assert!(err.hint().unwrap().contains("GPUQ_API_KEY"));
    let missing = ctx.gateway().job(Uuid::now_v7()).await.unwrap_err();
    assert_eq!(missing.status(), Some(404));
    assert!(
        missing.to_string().ends_with("404 not_found: no such job"),
        "{missing}"
    );
}
