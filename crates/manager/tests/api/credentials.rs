//! Worker credentials and the registry's one-process-per-engine rule, against real Redis: a
//! second process of a live engine is refused until the first says goodbye or its heartbeat
//! expires; GPU faults go only to an http(s) admin URL and read a bounded answer.

use std::time::{Duration, Instant};

use axum::routing::post;
use gpuq_common::engine::GpuHealth;
use serde_json::json;

use crate::helpers::{ADMIN_TOKEN, READ_TOKEN, gpu, heartbeat, spawn_app, worker_token};

#[tokio::test]
async fn a_second_process_of_a_live_engine_is_refused_until_the_first_says_goodbye_or_expires() {
    let app = spawn_app().await;
    let first = heartbeat("w-d", "w-d-1", vec![gpu(0, GpuHealth::Healthy)]);
    assert_eq!(app.heartbeat(&first).await.0, 200);
    let mut second = heartbeat("w-d", "w-d-2", vec![gpu(0, GpuHealth::Unhealthy)]);
    second.started_at_ms = first.started_at_ms + 1;
    let (status, body) = app.heartbeat(&second).await;
    assert_eq!(status, 409, "{body}");
    let (_, view) = app.get_json("/v1/engines/w-d").await;
    assert_eq!(
        (
            view["heartbeat"]["instance_id"].as_str(),
            view["state"].as_str()
        ),
        (Some("w-d-1"), Some("healthy"))
    );

    // A goodbye needs the engine's credential and names its current process.
    let bye = |instance: &str, bearer: Option<String>| {
        let mut rb = app
            .http
            .delete(app.url(&format!("/v1/heartbeats/w-d/{instance}")));
        if let Some(b) = bearer {
            rb = rb.bearer_auth(b);
        }
        async move { rb.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(bye("w-d-1", None).await, 401);
    assert_eq!(bye("w-d-1", Some(ADMIN_TOKEN.into())).await, 401);
    assert_eq!(bye("w-d-1", Some(worker_token("w-e"))).await, 401);
    assert_eq!(bye("w-d-2", Some(worker_token("w-d"))).await, 409);
    assert_eq!(app.get_json("/v1/engines/w-d").await.1["state"], "healthy");
    assert_eq!(bye("w-d-1", Some(worker_token("w-d"))).await, 204);
    // Offline at once, and the next process is taken without waiting: one restart counted.
    assert_eq!(app.get_json("/v1/engines/w-d").await.1["state"], "offline");
    let (status, ack) = app.heartbeat(&second).await;
    assert_eq!((status, ack["restarts"].as_u64()), (200, Some(1)), "{ack}");

    // Without a goodbye (a crash), the next process waits for the heartbeat to expire:
    // 3 × 300 ms here.
    let mut third = heartbeat("w-d", "w-d-3", vec![gpu(0, GpuHealth::Healthy)]);
    third.started_at_ms = second.started_at_ms + 1;
    let crashed = Instant::now();
    loop {
        let (status, body) = app.heartbeat(&third).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 409, "{body}");
        assert!(crashed.elapsed() < Duration::from_secs(3), "never taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        crashed.elapsed() >= Duration::from_millis(800),
        "taken over after {:?}, before the old heartbeat expired",
        crashed.elapsed()
    );
    app.cleanup().await;
}

#[tokio::test]
async fn gpu_faults_go_only_to_an_http_admin_url_and_a_huge_answer_is_refused() {
    let app = spawn_app().await;
    let mut hb = heartbeat("w-f", "w-f-1", vec![gpu(0, GpuHealth::Healthy)]);
    hb.admin_url = "file:///etc/passwd".into();
    let (status, body) = app.heartbeat(&hb).await;
    assert_eq!(status, 422, "{body}");

    // A worker that answers 100 KiB.
    let worker = axum::Router::new().route(
        "/admin/gpus/{index}/fault",
        post(|| async { "x".repeat(100 * 1024) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    hb.admin_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, worker).await });
    assert_eq!(app.heartbeat(&hb).await.0, 200);

    let path = "/v1/engines/w-f/gpus/0/fault";
    let (status, body) = app
        .post(path, Some(READ_TOKEN), Some(json!({"fault": "ecc"})))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, body) = app
        .post(path, Some(ADMIN_TOKEN), Some(json!({"fault": "ecc"})))
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("64 KiB"),
        "{body}"
    );
    app.cleanup().await;
}
