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
        events: vec![],
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

#[tokio::test]
async fn a_re_drive_names_its_drive_and_one_the_broker_refuses_leaves_the_dead_letter_as_it_was() {
    let app = spawn_app().await;
    // Dead-lettered in a pool that no longer has a queue: the re-drive cannot be routed.
    let req: gpuq_common::job::SubmitRequest =
        serde_json::from_value(json!({"kind":"simulate","pool":"gone-pool"})).unwrap();
    let (payload, placement) = req.validate().unwrap();
    let msg = JobMessage::new(payload, placement);
    let store = &app.state.store;
    store
        .insert(&gpuq_common::job::JobRecord::queued(&msg))
        .await
        .unwrap();
    let dead = FinalOutcome {
        status: JobStatus::DeadLettered,
        result: Some(json!({"reason": "delivery_limit", "queue": "x.jobs.gone-pool"})),
        error: Some("delivery_limit: exit code 3".into()),
        worker: None,
        finished_at: 1_700_000_000_000,
        attempt: None,
        events: vec![],
    };
    store.finish(msg.id, &dead).await.unwrap();
    let before = store.get(msg.id).await.unwrap().unwrap();
    let (status, _, resp) = body(
        app.post(&format!("/v1/dead-letters/{}/retry", msg.id))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{resp}");
    assert_eq!(store.get(msg.id).await.unwrap().unwrap(), before);

    // A routable re-drive carries a fresh drive id each time.
    let (_, _, resp) = body(
        app.submit(&json!({"kind":"simulate","params":{"always_fail":true}}))
            .await,
    )
    .await;
    let id: gpuq_common::JobId = resp["id"].as_str().unwrap().parse().unwrap();
    let mut drives = Vec::new();
    for _ in 0..2 {
        app.purge("default").await;
        store.finish(id, &dead).await.unwrap();
        let (status, _, resp) = body(app.post(&format!("/v1/dead-letters/{id}/retry")).await).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
        let m = app.take("default").await.unwrap();
        let drive = gpuq_common::amqp::header_str(
            m.delivery.properties.headers().as_ref(),
            gpuq_common::topology::DRIVE_HEADER,
        )
        .expect("a re-drive names its drive");
        drives.push(drive);
    }
    assert_ne!(drives[0], drives[1], "{drives:?}");
    // A late dead letter of the first re-drive finds the job on the second.
    assert_eq!(
        store.finish_drive(id, &drives[0], &dead).await.unwrap(),
        gpuq_common::store::FinishOutcome::Superseded
    );
}
