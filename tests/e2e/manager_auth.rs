//! Issue 15, items 3 and 4, on the real binaries: every manager `/v1` route needs a token (the
//! read token reads, only the admin token acts), the status views carry job summaries without
//! params, env or output; heartbeats need the credential of the engine they name, and no forged
//! one (wrong credential, an operator token, another engine's credential, a second process
//! while the engine is live) changes the real engine; an engine offline past the forget time
//! leaves the registry and `/metrics`.

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

use std::time::{Duration, Instant};

use gpuq_common::JobStatus;
use gpuq_e2e::stack::worker_token;
use gpuq_e2e::{Stack, StackOptions};
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

/// Fields a job may show on the manager's status views.
const SUMMARY_FIELDS: &[&str] = &[
    "id",
    "tenant",
    "kind",
    "status",
    "attempts",
    "worker",
    "gpus",
    "created_at",
    "started_at",
    "finished_at",
    "error",
];

/// A stack of `workers` healthy workers, with `env` for every service.
async fn healthy_stack(workers: usize, env: Vec<(String, String)>) -> Stack {
    let stack = Stack::start(StackOptions {
        workers,
        env,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    stack
        .wait_engines_healthy(workers, Duration::from_secs(30))
        .await
        .unwrap();
    stack
}

/// Sends `method path` with `bearer` (or none) and a JSON body for POSTs; answers the status
/// and the body (JSON, or `Null`). Event streams answer their status without being read.
async fn call(stack: &Stack, method: &Method, path: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut rb = stack
        .http
        .request(method.clone(), format!("{}{path}", stack.manager_url))
        .timeout(Duration::from_secs(10));
    if let Some(b) = bearer {
        rb = rb.bearer_auth(b);
    }
    if method == Method::POST {
        rb = rb.json(&json!({"fault": "clear"}));
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let streaming = r
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"));
    if streaming {
        return (status, Value::Null);
    }
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Every `(method, path)` of the manager's `/v1` API, from its OpenAPI document, with the path
/// parameters filled for engine `worker-1` and job `job`.
async fn v1_routes(stack: &Stack, job: uuid::Uuid) -> Vec<(Method, String)> {
    let doc = stack
        .get_json(&format!("{}/openapi.json", stack.manager_url), None)
        .await;
    let mut routes = vec![];
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/") {
            continue;
        }
        let filled = path
            .replace("{job}", &job.to_string())
            .replace("{id}", "worker-1")
            .replace("{engine}", "worker-1")
            .replace("{gpu}", "0")
            .replace("{instance}", "worker-1-00000000");
        assert!(!filled.contains('{'), "a parameter is left in {filled}");
        for method in ops.as_object().unwrap().keys() {
            routes.push((method.to_uppercase().parse().unwrap(), filled.clone()));
        }
    }
    routes
}

/// The overview's jobs (recent and dead letters) must be summaries.
fn assert_summaries_only(overview: &Value, marker: &str, what: &str) {
    let text = overview.to_string();
    assert!(
        !text.contains(marker),
        "{what} shows a job's params, env or output: {text}"
    );
    for list in ["recent_jobs", "dead_letters"] {
        for job in overview[list].as_array().unwrap() {
            for key in job.as_object().unwrap().keys() {
                assert!(
                    SUMMARY_FIELDS.contains(&key.as_str()),
                    "{what}: {list} has `{key}`: {job}"
                );
            }
        }
    }
}

#[tokio::test]
async fn every_manager_v1_route_needs_a_token_the_read_token_only_reads_and_views_carry_no_job_secrets()
 {
    let stack = healthy_stack(1, vec![]).await;
    let worker1 = worker_token(&stack.worker_secret, "worker-1");
    let job = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 1}}))
        .await
        .unwrap();
    stack.wait_one(job, Duration::from_secs(30)).await.unwrap();
    let routes = v1_routes(&stack, job).await;
    for expected in [
        "GET /v1/engines",
        "GET /v1/engines/worker-1",
        "GET /v1/overview",
        "GET /v1/events",
        "POST /v1/heartbeats",
        "DELETE /v1/heartbeats/worker-1/worker-1-00000000",
        "POST /v1/engines/worker-1/cordon",
        "POST /v1/engines/worker-1/uncordon",
        "POST /v1/engines/worker-1/drain",
        "POST /v1/engines/worker-1/restart",
        "POST /v1/engines/worker-1/gpus/0/fault",
    ] {
        assert!(
            routes.iter().any(|(m, p)| format!("{m} {p}") == expected),
            "the OpenAPI document lacks {expected}: {routes:?}"
        );
    }

    // No token, a wrong one, or a worker's credential: 401 in the JSON error shape, everywhere.
    let wrong = Uuid::new_v4().simple().to_string();
    for (method, path) in &routes {
        let worker_route = path.starts_with("/v1/heartbeats");
        for bearer in [None, Some(wrong.as_str())]
            .into_iter()
            .chain((!worker_route).then_some(Some(worker1.expose())))
        {
            let (status, body) = call(&stack, method, path, bearer).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} with {bearer:?}: {body}"
            );
        }
    }

    // The read token reads every GET route; every action is 403 with it, a heartbeat 401.
    for (method, path) in &routes {
        let (status, body) = call(&stack, method, path, Some(&stack.read_token)).await;
        let want = if method == Method::GET {
            200
        } else if path.starts_with("/v1/heartbeats") {
            401
        } else {
            403
        };
        assert_eq!(status, want, "{method} {path} with the read token: {body}");
        if method == Method::GET {
            let (status, _) = call(&stack, method, path, Some(&stack.admin_token)).await;
            assert_eq!(status, 200, "{method} {path} with the admin token");
        }
    }
    // The admin token acts (and the engine was not cordoned by any refused call above).
    let engine = stack.engine("worker-1").await.unwrap();
    assert_eq!(engine["state"], "healthy", "{engine}");
    let (status, view) = call(
        &stack,
        &Method::POST,
        "/v1/engines/worker-1/cordon",
        Some(&stack.admin_token),
    )
    .await;
    assert_eq!((status, view["state"].as_str()), (200, Some("cordoned")));
    stack.engine_action("worker-1", "uncordon").await.unwrap();
    // Open as before: health, readiness, metrics, the page and its API document.
    for path in ["/healthz", "/readyz", "/metrics", "/ui", "/openapi.json"] {
        let r = stack
            .http
            .get(format!("{}{path}", stack.manager_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    // A command job with a secret in its env that prints it: neither the overview nor the
    // event stream shows it.
    let marker = format!("secret-{}", Uuid::new_v4().simple());
    let id = stack
        .submit_ok(&json!({"kind": "command", "params": {
            "program": "sh", "args": ["-c", "echo \"$TEST_SECRET\""],
            "env": {"TEST_SECRET": marker}}}))
        .await
        .unwrap();
    let record = stack.wait_one(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(record.status, JobStatus::Succeeded, "{record:?}");
    assert!(
        record
            .result
            .as_ref()
            .unwrap()
            .to_string()
            .contains(&marker),
        "the job's owner sees its output: {record:?}"
    );
    let overview = stack.manager_client().overview().await.unwrap();
    let shown = overview["recent_jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id.to_string())
        .unwrap_or_else(|| panic!("job {id} is not among the recent jobs: {overview}"));
    assert_eq!(
        (shown["status"].as_str(), shown["kind"].as_str()),
        (Some("succeeded"), Some("command")),
        "{shown}"
    );
    assert_eq!(shown["worker"], "worker-1", "{shown}");
    assert_summaries_only(&overview, &marker, "the overview");

    let data = stack.first_overview_event(&stack.read_token).await.unwrap();
    assert!(
        data["recent_jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id.to_string()),
        "{data}"
    );
    assert_summaries_only(&data, &marker, "the event stream");
    stack.stop().await;
}

/// Posts `hb` as a heartbeat with `bearer` (or none); answers the status and body.
async fn post_heartbeat(stack: &Stack, hb: &Value, bearer: Option<&str>) -> (u16, Value) {
    let mut rb = stack
        .http
        .post(format!("{}/v1/heartbeats", stack.manager_url))
        .json(hb);
    if let Some(b) = bearer {
        rb = rb.bearer_auth(b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn forged_heartbeats_and_goodbyes_are_refused_and_the_real_engine_stays_healthy_and_busy() {
    let stack = healthy_stack(1, vec![]).await;
    let real = stack.engine("worker-1").await.unwrap();
    let instance = real["heartbeat"]["instance_id"]
        .as_str()
        .unwrap()
        .to_string();
    let restarts = real["restarts"].clone();
    let own = worker_token(&stack.worker_secret, "worker-1");
    let other_engine = worker_token(&stack.worker_secret, "worker-2");
    let other_fleet = worker_token(&Uuid::new_v4().simple().to_string(), "worker-1");

    // A forgery that would make the engine look dead if it were taken: every GPU unhealthy, not
    // consuming, an admin URL of the forger's choosing.
    let mut forged = real["heartbeat"].clone();
    for g in forged["gpus"].as_array_mut().unwrap() {
        g["health"] = json!("unhealthy");
    }
    forged["consuming"] = json!(false);
    forged["admin_url"] = json!("http://127.0.0.1:1");
    forged["sent_at_ms"] = json!(gpuq_common::job::now_ms());
    let wrong = "ab".repeat(32);
    for (what, bearer) in [
        ("no credential", None),
        ("a wrong credential", Some(wrong.as_str())),
        ("the admin token", Some(stack.admin_token.as_str())),
        ("the read token", Some(stack.read_token.as_str())),
        ("another engine's credential", Some(other_engine.expose())),
        ("another fleet's credential", Some(other_fleet.expose())),
    ] {
        let (status, body) = post_heartbeat(&stack, &forged, bearer).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{what}: {body}"
        );
    }
    // The engine's own credential, but a second process while the first is live: 409, however
    // often it tries, and however new it claims to be.
    let mut usurper = forged.clone();
    usurper["instance_id"] = json!(format!(
        "worker-1-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    usurper["started_at_ms"] = json!(gpuq_common::job::now_ms() + 60_000);
    for _ in 0..3 {
        let (status, body) = post_heartbeat(&stack, &usurper, Some(own.expose())).await;
        assert_eq!(status, 409, "{body}");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // Goodbyes for the live process: only its own credential may say it, only for itself.
    let goodbye = format!("/v1/heartbeats/worker-1/{instance}");
    for bearer in [
        None,
        Some(stack.admin_token.as_str()),
        Some(other_engine.expose()),
    ] {
        let (status, body) = call(&stack, &Method::DELETE, &goodbye, bearer).await;
        assert_eq!(status, 401, "goodbye with {bearer:?}: {body}");
    }
    let not_current = format!(
        "/v1/heartbeats/worker-1/{}",
        usurper["instance_id"].as_str().unwrap()
    );
    let (status, body) = call(&stack, &Method::DELETE, &not_current, Some(own.expose())).await;
    assert_eq!(status, 409, "{body}");

    // Over several heartbeat intervals the real process stays the engine, healthy, and busy.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let v = stack.engine("worker-1").await.unwrap();
        assert_eq!(v["state"], "healthy", "{v}");
        assert_eq!(v["heartbeat"]["instance_id"], json!(instance), "{v}");
        assert_eq!(v["heartbeat"]["consuming"], true, "{v}");
        assert_eq!(v["restarts"], restarts, "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ids = stack
        .submit_many(
            4,
            4,
            &json!({"kind": "simulate", "params": {"duration_ms": 50}}),
        )
        .await
        .unwrap();
    let records = stack
        .wait_final(&ids, Duration::from_secs(30))
        .await
        .unwrap();
    for r in &records {
        assert_eq!(
            (r.status, r.worker.as_deref()),
            (JobStatus::Succeeded, Some("worker-1")),
            "{r:?}"
        );
    }
    let metrics = stack.manager_metrics_text().await.unwrap();
    assert!(
        !metrics.contains(r#"gpuq_engine_restarts_total{engine="worker-1"} 1"#),
        "a forged heartbeat counted a restart: {metrics}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_worker_that_stops_says_goodbye_and_an_engine_offline_past_the_forget_time_is_dropped() {
    let forget_after = Duration::from_secs(3);
    let mut stack = healthy_stack(
        2,
        vec![(
            "GPUQ_ENGINE_FORGET_AFTER_S".into(),
            forget_after.as_secs().to_string(),
        )],
    )
    .await;
    let m = stack.manager_metrics_text().await.unwrap();
    assert!(
        m.contains(r#"gpuq_engine_state{engine="worker-2",state="healthy"} 1"#)
            && m.contains(r#"gpuq_gpu_utilization_ratio{engine="worker-2",gpu="1"}"#),
        "{m}"
    );

    // A graceful stop says goodbye: offline at once, not after three missed heartbeats.
    stack.workers[1].stop().await;
    let stopped = Instant::now();
    let v = stack.engine("worker-2").await.unwrap();
    assert_eq!(v["state"], "offline", "no goodbye: {v}");
    assert!(
        stack
            .log_lines("worker-2")
            .iter()
            .any(|l| l.contains("said goodbye to the manager")),
        "worker-2's log does not show its goodbye"
    );

    // Listed while it is offline for less than the forget time, then gone with its series.
    let listed = stack.engines().await.unwrap();
    assert!(listed.iter().any(|e| e["id"] == "worker-2"), "{listed:?}");
    let last_seen = v["last_seen_ms"].as_i64().unwrap();
    let gone_at = loop {
        let engines = stack.engines().await.unwrap();
        if !engines.iter().any(|e| e["id"] == "worker-2") {
            break gpuq_common::job::now_ms();
        }
        assert!(
            stopped.elapsed() < forget_after + Duration::from_secs(10),
            "worker-2 still listed: {engines:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Not before the forget time, counted from its last heartbeat (same host, same clock).
    let offline_for = gone_at - last_seen;
    assert!(
        offline_for >= i64::try_from(forget_after.as_millis()).unwrap(),
        "forgotten {offline_for} ms after its last heartbeat, before the forget time"
    );
    let err = stack.manager_client().engine("worker-2").await.unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");
    let m = stack.manager_metrics_text().await.unwrap();
    assert!(!m.contains(r#"engine="worker-2""#), "{m}");
    assert!(
        m.contains(r#"gpuq_engine_state{engine="worker-1",state="healthy"} 1"#),
        "the live engine keeps its series: {m}"
    );
    let v = stack.engine("worker-1").await.unwrap();
    assert_eq!(v["state"], "healthy", "{v}");
    stack.stop().await;
}
