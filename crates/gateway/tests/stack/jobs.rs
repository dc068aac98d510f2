//! Cancel and dead-letter re-drive.

use gpuq_common::job::{FinalOutcome, JobMessage, JobStatus, now_ms};
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{error_of, spawn_app};
use crate::{body, job_status};

#[tokio::test]
async fn cancelling_a_job_finishes_it_and_signals_its_worker() {
    let mut app = spawn_app().await;
    let (_, _, resp) = body(
        app.submit(&json!({"kind":"simulate","params":{"duration_ms":60000}}))
            .await,
    )
    .await;
    let id = resp["id"].as_str().unwrap().to_string();
    let (status, _, record) = body(app.post(&format!("/v1/jobs/{id}/cancel")).await).await;
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(record["status"], "cancelled");
    assert!(record["finished_at"].is_i64());
    let key = format!("{}:cancel:{id}", app.settings.queue_prefix);
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut app.redis)
        .await
        .unwrap();
    assert!(ttl > 0, "the cancel signal is set with a TTL ({ttl})");
    let (status, _, again) = body(app.post(&format!("/v1/jobs/{id}/cancel")).await).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert!(error_of(&again).1.contains("cancelled"));
    assert_eq!(job_status(&app, &id).await, "cancelled");
}

#[tokio::test]
async fn retrying_a_dead_letter_republishes_it_under_the_same_id() {
    let app = spawn_app().await;
    let (_, _, resp) = body(
        app.submit(&json!({"kind":"simulate","params":{"always_fail":true},"gpus":2,"min_gpu_memory_mb":512}))
            .await,
    )
    .await;
    let id = resp["id"].as_str().unwrap().to_string();
    let (status, _, conflict) = body(app.post(&format!("/v1/dead-letters/{id}/retry")).await).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a queued job is not a dead letter: {conflict}"
    );

    // What the broker and the manager would do: the message leaves, the record is dead-lettered.
    app.purge("default").await;
    let outcome = FinalOutcome {
        status: JobStatus::DeadLettered,
        result: None,
        error: Some("delivery_limit".into()),
        worker: Some("worker-1".into()),
        finished_at: now_ms(),
        attempt: None,
    };
    let mut running = app
        .state
        .store
        .get(id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    running.attempts = 5;
    running.worker = Some("worker-1".into());
    running.started_at = Some(now_ms());
    app.state.store.start_attempt(&running).await.unwrap();
    app.state
        .store
        .finish(id.parse().unwrap(), &outcome)
        .await
        .unwrap();
    let (_, _, dead) = body(app.get("/v1/dead-letters").await).await;
    assert_eq!(dead["jobs"][0]["id"], id.as_str(), "{dead}");
    assert_eq!(dead["jobs"][0]["error"], "delivery_limit");

    let (status, _, resp) = body(app.post(&format!("/v1/dead-letters/{id}/retry")).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    assert_eq!(resp["id"], id.as_str());
    assert_eq!(app.depth("default").await, 1);
    let msg = app.take("default").await.unwrap();
    let job = JobMessage::from_bytes(&msg.delivery.data).unwrap();
    assert_eq!(job.id.to_string(), id);
    assert_eq!(
        gpuq_common::amqp::header_u64(
            msg.delivery.properties.headers().as_ref(),
            gpuq_common::topology::ATTEMPT_OFFSET_HEADER
        ),
        Some(5),
        "attempt numbers go on from the dead letter's"
    );
    assert_eq!(job.placement.gpus, 2);
    assert_eq!(job.placement.min_gpu_memory_mb, Some(512));
    assert_eq!(
        serde_json::to_value(&job.payload).unwrap()["params"]["always_fail"],
        true
    );
    assert_eq!(job_status(&app, &id).await, "queued");
    let (status, _, _) = body(app.post(&format!("/v1/dead-letters/{id}/retry")).await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (_, _, dead) = body(app.get("/v1/dead-letters").await).await;
    assert_eq!(dead["jobs"], json!([]));
}
