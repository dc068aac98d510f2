//! `Idempotency-Key`: one job per key, whatever the timing.

use std::collections::HashSet;
use std::sync::Arc;

use gpuq_common::config::GatewayConfig;
use gpuq_common::job::{JobMessage, now_ms};
use gpuq_gateway::AppState;
use lapin::options::QueueDeleteOptions;
use lapin::types::ShortString;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::doubles::SlowFirstInsert;
use crate::support::{self, error_of, spawn_app, spawn_app_with};
use crate::{body, keyed_submit, oneshot};

/// The pending claim a gateway that died mid-request leaves for `key`, past its deadline: the
/// job it was making, and the Redis key.
async fn leave_expired_claim(
    app: &mut support::TestApp,
    job: &Value,
    key: &str,
) -> (JobMessage, String) {
    let req: gpuq_common::job::SubmitRequest = serde_json::from_value(job.clone()).unwrap();
    let (payload, placement) = req.validate().unwrap();
    let msg = JobMessage::new(payload, placement);
    let entry = json!({
        "id": msg.id,
        "body_hash": gpuq_common::coord::idempotency::body_hash(&msg),
        "state": "pending",
        "until_ms": now_ms() - 1,
    });
    let redis_key = leave_claim(app, key, &entry).await;
    (msg, redis_key)
}

/// Sets `entry` as the claim of `key` (the test app's key is a bare one: the `default`
/// tenant's); answers the Redis key.
pub async fn leave_claim(app: &mut support::TestApp, key: &str, entry: &Value) -> String {
    let redis_key = gpuq_common::coord::keys::Keys::new(&app.settings.queue_prefix)
        .idempotency(gpuq_common::tenancy::DEFAULT_TENANT, key);
    let _: () = redis::cmd("SET")
        .arg(&redis_key)
        .arg(entry.to_string())
        .query_async(&mut app.redis)
        .await
        .unwrap();
    redis_key
}

#[tokio::test]
async fn the_same_idempotency_key_twice_enqueues_one_job() {
    let app = spawn_app().await;
    let job = json!({"kind":"simulate","params":{"duration_ms":10}});
    let (s1, h1, r1) = body(app.submit_with_key(&job, "order-1").await).await;
    assert_eq!(s1, StatusCode::ACCEPTED, "{r1}");
    assert!(h1.get("idempotent-replayed").is_none());
    // The same job spelled differently is the same request.
    let same = json!({"params":{"duration_ms":10},"gpus":1,"pool":"default","kind":"simulate"});
    let (s2, h2, r2) = body(app.submit_with_key(&same, "order-1").await).await;
    assert_eq!(s2, StatusCode::OK, "{r2}");
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(r2["id"], r1["id"]);
    assert_eq!(r2["status"], "queued");
    assert_eq!(app.depth("default").await, 1);

    let other = json!({"kind":"simulate","params":{"duration_ms":11}});
    let (s3, _, r3) = body(app.submit_with_key(&other, "order-1").await).await;
    assert_eq!(s3, StatusCode::UNPROCESSABLE_ENTITY, "{r3}");
    assert!(error_of(&r3).1.contains("different"), "{r3}");
    assert_eq!(app.depth("default").await, 1);

    // Concurrent duplicates: one job, whoever wins.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let http = app.http.clone();
        let url = app.url("/v1/jobs");
        let job = job.clone();
        tasks.spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(support::API_KEY)
                .header("Idempotency-Key", "order-2")
                .json(&job)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let v: Value = resp.json().await.unwrap();
            (status, v["id"].as_str().unwrap_or_default().to_string())
        });
    }
    let results = tasks.join_all().await;
    let ids: HashSet<_> = results.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids.len(), 1, "{results:?}");
    let accepted = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .count();
    let replayed = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!((accepted, replayed), (1, 11), "{results:?}");
    assert_eq!(app.depth("default").await, 2);
}

#[tokio::test]
async fn a_claim_abandoned_by_a_dead_gateway_is_taken_over_under_its_job_id() {
    let mut app = spawn_app().await;
    let job = json!({"kind":"simulate","params":{"duration_ms":5}});
    // What a gateway that died between its claim and the confirm leaves behind.
    let (msg, _) = leave_expired_claim(&mut app, &job, "order-dead").await;
    let (status, _, resp) = body(app.submit_with_key(&job, "order-dead").await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    assert_eq!(
        resp["id"],
        msg.id.to_string(),
        "the abandoned claim's job id is kept"
    );
    assert_eq!(app.depth("default").await, 1);
    let (status, _, again) = body(app.submit_with_key(&job, "order-dead").await).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], msg.id.to_string());
    assert_eq!(app.depth("default").await, 1);
}

#[tokio::test]
async fn a_replay_reports_the_jobs_current_status() {
    let app = spawn_app().await;
    let job = json!({"kind":"simulate"});
    let (_, _, r1) = body(app.submit_with_key(&job, "k-status").await).await;
    let id = r1["id"].as_str().unwrap();
    let (status, _, cancelled) = body(app.post(&format!("/v1/jobs/{id}/cancel")).await).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    let (s2, _, r2) = body(app.submit_with_key(&job, "k-status").await).await;
    assert_eq!(s2, StatusCode::OK);
    assert_eq!(r2["status"], "cancelled");
}

#[tokio::test]
async fn a_taken_over_claim_keeps_its_job_id_when_the_broker_refuses_the_retry() {
    let mut app = spawn_app().await;
    // A pool no queue is bound for: the broker returns the message, a refusal for sure.
    let job = json!({"kind":"simulate","params":{"duration_ms":5},"pool":"nobody-serves-this"});
    // Left by a gateway that died after its publish may have reached a queue.
    let (msg, key) = leave_expired_claim(&mut app, &job, "order-refused").await;
    let (status, _, resp) = body(app.submit_with_key(&job, "order-refused").await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{resp}");
    // Released, the key would let the next request make a second job under a new id.
    let kept: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut app.redis)
        .await
        .unwrap();
    let kept: Value = serde_json::from_str(&kept.expect("the claim is kept")).unwrap();
    assert_eq!(kept["id"], msg.id.to_string(), "{kept}");
    assert_eq!(kept["state"], "pending", "{kept}");
    assert!(
        kept["until_ms"].as_i64().unwrap() <= now_ms(),
        "open for the next request at once: {kept}"
    );
}

#[tokio::test]
async fn a_request_whose_claim_was_taken_over_never_deletes_the_record_its_successor_relies_on() {
    // A pending window of 0.5 s + 2 s.
    let app = spawn_app_with(|s| s.confirm_timeout_ms = 500).await;
    // Request A goes through a second gateway whose store answers its insert late.
    let slow = Arc::new(SlowFirstInsert::new(app.state.store.clone()));
    let gateway_a = gpuq_gateway::router(Arc::new(AppState::new(
        &GatewayConfig::from_settings(&app.settings).unwrap(),
        slow.clone(),
        app.state.broker.clone(),
        app.state.kv.clone(),
    )));
    let job = json!({"kind":"simulate","params":{"duration_ms":5}});
    let a = {
        let (router, req) = (gateway_a.clone(), keyed_submit(&job, "order-slow"));
        tokio::spawn(async move { oneshot(&router, req).await })
    };
    slow.stored.notified().await;
    // B, same key: it waits out A's pending window, takes the claim over, adopts the record A
    // stored and is answered 202.
    let (status, _, b) = body(app.submit_with_key(&job, "order-slow").await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let msg = app.take("default").await.expect("B's message");
    assert_eq!(
        msg.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        id
    );
    // Now A's publish is refused for sure (no queue is bound for the pool any more), and A
    // cleans up after itself.
    app.channel
        .queue_delete(
            ShortString::from(app.topology.pool_queue("default")),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    slow.release();
    let (status, resp) = a.await.unwrap();
    assert_eq!(status, 422, "{resp}");
    // The job B was answered 202 for keeps its record.
    let (status, _, record) = body(app.get(&format!("/v1/jobs/{id}")).await).await;
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(record["status"], "queued");
    let (status, _, again) = body(app.submit_with_key(&job, "order-slow").await).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], id.as_str());
}
