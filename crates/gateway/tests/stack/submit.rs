//! Submissions: 202 only after the confirm, bad inputs enqueue nothing, unknown pools, load.

use std::sync::Arc;
use std::time::Duration;

use gpuq_client::gateway::ListParams;
use gpuq_common::config::GatewayConfig;
use gpuq_common::job::{JobKind, JobMessage, JobStatus};
use gpuq_gateway::AppState;
use gpuq_gateway::broker::Broker;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::doubles::HoldingRelay;
use crate::support::{self, error_of, spawn_app, spawn_app_with};
use crate::{body, keyed_submit, oneshot};

#[tokio::test]
async fn a_submission_is_answered_202_only_once_its_message_is_in_the_queue() {
    let app = spawn_app().await;
    assert_eq!(app.depth("default").await, 0);
    let (status, _, resp) = body(
        app.submit(&json!({"kind":"simulate","params":{"duration_ms":50},"gpus":1,"ttl_s":600}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    assert_eq!(resp["status"], "queued");
    let id = resp["id"].as_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    // Confirmed means stored by the queue: it is there the moment the 202 arrives.
    assert_eq!(app.depth("default").await, 1);

    let msg = app.take("default").await.expect("the job's message");
    let props = &msg.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        Some(id.as_str())
    );
    assert_eq!(props.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(
        props.expiration().as_ref().map(|s| s.as_str()),
        Some("600000")
    );
    let job = JobMessage::from_bytes(&msg.delivery.data).unwrap();
    assert_eq!(job.id.to_string(), id);
    assert_eq!(job.placement.pool, "default");

    // Read back through the typed client the CLI uses.
    let client = app.client();
    let record = client.job(job.id).await.unwrap();
    assert_eq!(record.status, JobStatus::Queued);
    assert_eq!(record.kind, JobKind::Simulate);
    assert_eq!(record.params["duration_ms"], 50);
    let page = client
        .list(&ListParams {
            status: Some(JobStatus::Queued),
            pool: Some("default".into()),
            ..ListParams::default()
        })
        .await
        .unwrap();
    assert_eq!(page.jobs[0].id, job.id);
}

#[tokio::test]
async fn bad_inputs_and_bad_credentials_leave_the_queue_depth_unchanged() {
    let app = spawn_app().await;
    let bad_bodies = [
        json!({"kind":"simulate","gpus":-1}),
        json!({"kind":"simulate","gpus":"one"}),
        json!({"kind":"teleport"}),
        json!({"kind":"simulate","extra":true}),
        json!({"kind":"simulate","ttl_s":0}),
        json!({"kind":"simulate","params":{"duration_ms":1e30}}),
    ];
    for b in &bad_bodies {
        let (status, _, resp) = body(app.submit(b).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{b}: {resp}");
        error_of(&resp);
    }
    let raw = app
        .http
        .post(app.url("/v1/jobs"))
        .bearer_auth(support::API_KEY)
        .header("content-type", "application/json")
        .body("{\"kind\":")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let huge = json!({"kind":"simulate","params":{"x":"a".repeat(app.settings.max_body_bytes)}});
    let (status, _, resp) = body(app.submit(&huge).await).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{resp}");
    for auth in [None, Some("wrong")] {
        let mut req = app
            .http
            .post(app.url("/v1/jobs"))
            .json(&json!({"kind":"simulate"}));
        if let Some(k) = auth {
            req = req.bearer_auth(k);
        }
        let (status, _, resp) = body(req.send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{resp}");
        error_of(&resp);
    }
    assert_eq!(app.depth("default").await, 0, "nothing was enqueued");
    let (_, _, page) = body(app.get("/v1/jobs").await).await;
    assert_eq!(page["jobs"], json!([]), "nothing was stored");
}

#[tokio::test]
async fn a_job_for_a_pool_no_worker_serves_is_refused_with_422_and_not_stored() {
    let app = spawn_app().await;
    let (status, _, resp) = body(
        app.submit(&json!({"kind":"simulate","pool":"nobody-serves-this"}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{resp}");
    let (_, message) = error_of(&resp);
    assert!(message.contains("nobody-serves-this"), "{message}");
    let (_, _, page) = body(app.get("/v1/jobs").await).await;
    assert_eq!(page["jobs"], json!([]));
    // The gateway's link survives an unroutable publish.
    let (status, _, _) = body(app.submit(&json!({"kind":"simulate"})).await).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_job_whose_confirm_never_came_stays_visible_and_a_retry_with_its_key_makes_no_second_job()
{
    let app = spawn_app().await;
    // A second gateway on the same prefix, store and Redis, whose broker link runs through a
    // relay that can hold the broker's answers: its publish reaches the queue, the confirm not.
    let node = reqwest::Url::parse(&app.settings.amqp_url_list()[0]).unwrap();
    let relay = HoldingRelay::start(format!(
        "{}:{}",
        node.host_str().unwrap(),
        node.port().unwrap_or(5672)
    ));
    let mut relayed = node.clone();
    relayed.set_host(Some("127.0.0.1")).unwrap();
    relayed.set_port(Some(relay.addr.port())).unwrap();
    let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
    let broker = Broker::start(
        vec![relayed.to_string()],
        app.topology.clone(),
        Duration::from_millis(500),
        stop.clone(),
        &tracker,
    );
    assert!(broker.wait_connected(Duration::from_secs(10)).await);
    let held = gpuq_gateway::router(Arc::new(AppState::new(
        &GatewayConfig::from_settings(&app.settings).unwrap(),
        app.state.store.clone(),
        broker,
        app.state.kv.clone(),
    )));

    let job = json!({"kind":"simulate","params":{"duration_ms":5}});
    relay.hold(true);
    let (status, resp) = oneshot(&held, keyed_submit(&job, "order-unconfirmed")).await;
    relay.hold(false);
    assert_eq!(status, 503, "{resp}");
    let (_, message) = error_of(&resp);
    assert!(message.contains("may be queued"), "{message}");
    let id = message
        .split_whitespace()
        .find_map(|w| uuid::Uuid::parse_str(w).ok())
        .unwrap_or_else(|| panic!("the answer names the job: {message}"))
        .to_string();
    // The broker did store it: a worker may run it, so the job must not be invisible.
    for _ in 0..100 {
        if app.depth("default").await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.depth("default").await, 1);
    let (status, _, record) = body(app.get(&format!("/v1/jobs/{id}")).await).await;
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(record["status"], "queued");

    // The client retries with the same key: the same job, republished (workers deduplicate
    // the two messages by id), and still one record.
    let (status, _, retried) = body(app.submit_with_key(&job, "order-unconfirmed").await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    assert_eq!(retried["id"], id.as_str());
    let (status, _, again) = body(app.submit_with_key(&job, "order-unconfirmed").await).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], id.as_str());
    let mut ids = vec![];
    while let Some(msg) = app.take("default").await {
        ids.push(
            msg.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .as_str()
                .to_string(),
        );
    }
    assert_eq!(ids, vec![id.clone(), id.clone()]);
    let (_, _, page) = body(app.get("/v1/jobs").await).await;
    let listed: Vec<&Value> = page["jobs"].as_array().unwrap().iter().collect();
    assert_eq!(listed.len(), 1, "{page}");
    assert_eq!(listed[0]["id"], id.as_str());

    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn readyz_is_200_when_broker_store_and_redis_answer() {
    let app = spawn_app().await;
    let (status, _, resp) = body(app.http.get(app.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["checks"]["broker"], "ok");
    assert_eq!(resp["checks"]["store"], "ok");
    assert_eq!(resp["checks"]["redis"], "ok");
}

#[tokio::test]
async fn many_concurrent_submissions_are_all_confirmed_and_enqueued() {
    let app = spawn_app().await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let http = app.http.clone();
        let url = app.url("/v1/jobs");
        tasks.spawn(async move {
            http.post(url)
                .bearer_auth(support::API_KEY)
                .json(&json!({"kind":"simulate"}))
                .send()
                .await
                .unwrap()
                .status()
        });
    }
    let statuses = tasks.join_all().await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::ACCEPTED),
        "{statuses:?}"
    );
    assert_eq!(app.depth("default").await, 200);
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"gpuq_jobs_submitted_total{kind="simulate",pool="default"} 200"#),
        "{metrics}"
    );
}

/// Rough submission throughput (client in the same process); run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn submission_throughput() {
    let app = spawn_app_with(|s| s.max_queue_length = 1_000_000).await;
    let total: usize = std::env::var("GPUQ_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let concurrency = 64;
    let started = std::time::Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, url, next) = (app.http.clone(), app.url("/v1/jobs"), next.clone());
        tasks.spawn(async move {
            let mut ok = 0;
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let resp = http
                    .post(&url)
                    .bearer_auth(support::API_KEY)
                    .json(&json!({"kind":"simulate"}))
                    .send()
                    .await
                    .unwrap();
                if resp.status() == StatusCode::ACCEPTED {
                    ok += 1;
                }
            }
            ok
        });
    }
    let ok: usize = tasks.join_all().await.into_iter().sum();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{ok}/{total} accepted in {secs:.2} s: {:.0} submissions/s",
        ok as f64 / secs
    );
    assert_eq!(ok, total);
    assert_eq!(app.depth("default").await as usize, total);
}
