//! `Idempotency-Key`: one job per key, whatever the timing.

use std::collections::HashSet;

use gpuq_common::job::{JobMessage, now_ms};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::body;
use crate::support::{self, error_of, spawn_app};

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
        "body_hash": gpuq_gateway::idempotency::body_hash(&msg),
        "state": "pending",
        "until_ms": now_ms() - 1,
    });
    let redis_key = format!("{}:idem:{key}", app.settings.queue_prefix);
    let _: () = redis::cmd("SET")
        .arg(&redis_key)
        .arg(entry.to_string())
        .query_async(&mut app.redis)
        .await
        .unwrap();
    (msg, redis_key)
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
