//! The engine registry: states from heartbeats, offline after the TTL, restarts, operator actions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use gpuq_common::engine::{EngineState, GpuHealth};
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, eventually, gpu, heartbeat, spawn_app, worker_token};

#[tokio::test]
async fn heartbeats_make_an_engine_healthy_degraded_or_unhealthy_and_silence_makes_it_offline() {
    let app = spawn_app().await;
    let mut hb = heartbeat(
        "w-a",
        "inst-1",
        vec![gpu(0, GpuHealth::Healthy), gpu(1, GpuHealth::Healthy)],
    );

    let (status, _) = app
        .post(
            "/v1/heartbeats",
            None,
            Some(serde_json::to_value(&hb).unwrap()),
        )
        .await;
    assert_eq!(status, 401, "a heartbeat without a credential is refused");
    let (status, body) = app
        .post(
            "/v1/heartbeats",
            Some("wrong"),
            Some(serde_json::to_value(&hb).unwrap()),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let unknown = app.client().engine("w-a").await.unwrap_err();
    assert_eq!(
        unknown.status(),
        Some(404),
        "an engine never seen is unknown"
    );

    let (status, ack) = app.heartbeat(&hb).await;
    assert_eq!(
        (status, ack["state"].as_str()),
        (200, Some("healthy")),
        "{ack}"
    );
    // Read through the typed client the CLI uses.
    let view = app.client().engine("w-a").await.unwrap();
    assert_eq!(view.state, EngineState::Healthy);
    assert_eq!(view.restarts, 0);
    assert_eq!(view.admin, None);
    assert_eq!(view.heartbeat.unwrap().gpus.len(), 2);

    hb.gpus[1].health = GpuHealth::Degraded;
    assert_eq!(app.heartbeat(&hb).await.1["state"], "degraded");
    assert_eq!(app.get_json("/v1/engines/w-a").await.1["state"], "degraded");
    hb.gpus[0].health = GpuHealth::Unhealthy;
    hb.gpus[1].health = GpuHealth::Unhealthy;
    assert_eq!(app.heartbeat(&hb).await.1["state"], "unhealthy");
    assert_eq!(
        app.get_json("/v1/engines/w-a").await.1["state"],
        "unhealthy"
    );

    // The heartbeats stop: offline within 3 intervals (3 × 300 ms), listed with its last sighting.
    let last = Instant::now();
    let offline_after = eventually(Duration::from_secs(5), "engine offline", || async {
        let (_, v) = app.get_json("/v1/engines/w-a").await;
        (v["state"] == "offline").then(|| last.elapsed())
    })
    .await;
    assert!(
        offline_after <= Duration::from_millis(900 + 600),
        "offline only after {offline_after:?}"
    );
    let (_, list) = app.get_json("/v1/engines").await;
    let listed = &list.as_array().unwrap()[0];
    assert_eq!(
        (listed["id"].as_str(), listed["state"].as_str()),
        (Some("w-a"), Some("offline"))
    );
    assert_eq!(listed["heartbeat"], Value::Null);
    assert!(listed["last_seen_ms"].as_i64().unwrap() > 0);
    let metrics = eventually(Duration::from_secs(3), "offline gauge", || async {
        let (_, m) = app.get_text("/metrics").await;
        m.contains(r#"gpuq_engine_state{engine="w-a",state="offline"} 1"#)
            .then_some(m)
    })
    .await;
    assert!(
        !metrics.contains(r#"gpuq_gpu_utilization_ratio{engine="w-a""#),
        "{metrics}"
    );

    // The worker comes back as a new process: healthy again, one restart counted.
    let old = hb.clone();
    let mut hb = heartbeat("w-a", "inst-2", vec![gpu(0, GpuHealth::Healthy)]);
    hb.started_at_ms = old.started_at_ms + 1000;
    let (_, ack) = app.heartbeat(&hb).await;
    assert_eq!(
        (ack["state"].as_str(), ack["restarts"].as_u64()),
        (Some("healthy"), Some(1))
    );
    let (_, m) = app.get_text("/metrics").await;
    assert!(
        m.contains(r#"gpuq_engine_restarts_total{engine="w-a"} 1"#),
        "{m}"
    );
    // A late heartbeat of the old process is refused and changes nothing.
    let (status, _) = app.heartbeat(&old).await;
    assert_eq!(status, 409);
    let (_, view) = app.get_json("/v1/engines/w-a").await;
    assert_eq!(
        (view["state"].as_str(), view["restarts"].as_u64()),
        (Some("healthy"), Some(1))
    );
    assert_eq!(view["heartbeat"]["instance_id"], "inst-2");

    let mut bad = hb.clone();
    bad.engine_id = "bad id:1".into();
    assert_eq!(app.heartbeat(&bad).await.0, 422);
    app.cleanup().await;
}

#[tokio::test]
async fn cordon_uncordon_and_drain_write_the_admin_key_that_workers_obey() {
    let app = spawn_app().await;
    let key = app.keys.engine_admin("w-b");
    assert_eq!(
        app.post("/v1/engines/w-b/cordon", Some(ADMIN_TOKEN), None)
            .await
            .0,
        404
    );
    app.heartbeat(&heartbeat("w-b", "i1", vec![gpu(0, GpuHealth::Healthy)]))
        .await;
    assert_eq!(app.post("/v1/engines/w-b/cordon", None, None).await.0, 401);
    assert_eq!(app.redis_get(&key).await, None);

    let (status, view) = app
        .post("/v1/engines/w-b/cordon", Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(
        (status, view["state"].as_str(), view["admin"].as_str()),
        (200, Some("cordoned"), Some("cordoned"))
    );
    assert_eq!(app.redis_get(&key).await.as_deref(), Some("cordoned"));
    let (_, ack) = app
        .heartbeat(&heartbeat("w-b", "i1", vec![gpu(0, GpuHealth::Healthy)]))
        .await;
    assert_eq!(
        ack["admin"], "cordoned",
        "the heartbeat answer carries the intent too"
    );

    let (_, view) = app
        .post("/v1/engines/w-b/drain", Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(view["state"], "draining");
    assert_eq!(app.redis_get(&key).await.as_deref(), Some("draining"));
    let (_, m) = app.get_text("/metrics").await;
    assert!(
        m.contains(r#"gpuq_engine_state{engine="w-b",state="draining"} 1"#),
        "{m}"
    );

    let (_, view) = app
        .post("/v1/engines/w-b/uncordon", Some(ADMIN_TOKEN), None)
        .await;
    assert_eq!(
        (view["state"].as_str(), &view["admin"]),
        (Some("healthy"), &Value::Null)
    );
    assert_eq!(app.redis_get(&key).await, None);
    app.cleanup().await;
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, u32, Value)>>>);

async fn fake_fault(
    State(seen): State<Seen>,
    headers: HeaderMap,
    Path(gpu_index): Path<u32>,
    Json(body): Json<Value>,
) -> Json<Value> {
    let auth = headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    seen.0.lock().unwrap().push((auth, gpu_index, body.clone()));
    let mut snap = serde_json::to_value(gpu(gpu_index, GpuHealth::Unhealthy)).unwrap();
    snap["fault"] = body["fault"].clone();
    Json(snap)
}

#[tokio::test]
async fn gpu_faults_are_proxied_to_the_engines_worker_with_the_admin_token() {
    let app = spawn_app().await;
    let seen = Seen::default();
    let worker = axum::Router::new()
        .route("/admin/gpus/{index}/fault", post(fake_fault))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, worker).await });

    let mut hb = heartbeat(
        "w-c",
        "i1",
        vec![gpu(0, GpuHealth::Healthy), gpu(1, GpuHealth::Healthy)],
    );
    hb.admin_url = worker_url;
    app.heartbeat(&hb).await;

    let path = "/v1/engines/w-c/gpus/1/fault";
    assert_eq!(
        app.post(path, None, Some(json!({"fault":"overheat"})))
            .await
            .0,
        401
    );
    assert_eq!(
        app.post(path, Some(ADMIN_TOKEN), Some(json!({"fault":"melt"})))
            .await
            .0,
        422
    );
    assert_eq!(
        app.post(
            "/v1/engines/nope/gpus/1/fault",
            Some(ADMIN_TOKEN),
            Some(json!({"fault":"ecc"}))
        )
        .await
        .0,
        404
    );
    let (status, snap) = app
        .post(path, Some(ADMIN_TOKEN), Some(json!({"fault":"overheat"})))
        .await;
    assert_eq!(status, 200, "{snap}");
    assert_eq!(
        (snap["index"].as_u64(), snap["fault"].as_str()),
        (Some(1), Some("overheat"))
    );
    let calls = seen.0.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![(
            format!("Bearer {ADMIN_TOKEN}"),
            1,
            json!({"fault":"overheat"})
        )]
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_token_is_checked_before_the_body_and_every_refusal_is_json() {
    let app = spawn_app().await;
    let send = |path: &str, bearer: Option<&str>, body: &'static str| {
        let mut req = app
            .http
            .post(app.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        async move {
            let r = req.send().await.expect("POST");
            let status = r.status().as_u16();
            let v: Value = r.json().await.expect("a JSON body");
            (status, v["error"]["code"].as_str().map(str::to_string))
        }
    };
    // Without the token, a malformed body is not even read.
    assert_eq!(
        send("/v1/heartbeats", None, "{not json").await,
        (401, Some("unauthorized".into()))
    );
    assert_eq!(
        send("/v1/engines/w-x/gpus/0/fault", Some("wrong"), "[]").await,
        (401, Some("unauthorized".into()))
    );
    // With it, the body is judged.
    assert_eq!(
        send("/v1/heartbeats", Some(&worker_token("w-x")), "{not json")
            .await
            .0,
        400
    );
    // A GPU index that is no number, and a method a route does not take.
    assert_eq!(
        send(
            "/v1/engines/w-x/gpus/first/fault",
            Some(ADMIN_TOKEN),
            r#"{"fault":"ecc"}"#
        )
        .await,
        (400, Some("bad_request".into()))
    );
    let r = app
        .http
        .delete(app.url("/v1/engines"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let v: Value = r.json().await.expect("a JSON 405");
    assert_eq!(v["error"]["code"], "method_not_allowed");
    app.cleanup().await;
}
