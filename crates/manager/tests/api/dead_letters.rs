//! Dead letters become `dead_lettered` records with their reason, once.

use std::time::Duration;

use gpuq_common::job::{
    FinalOutcome, JobMessage, JobPayload, JobPlacement, JobRecord, JobStatus, SimulateParams,
    now_ms,
};
use gpuq_common::topology::{ERROR_HEADER, REASON_HEADER};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;

use crate::helpers::{eventually, spawn_app};

fn message() -> JobMessage {
    JobMessage::new(
        JobPayload::Simulate(SimulateParams {
            always_fail: true,
            ..Default::default()
        }),
        JobPlacement {
            gpus: 1,
            min_gpu_memory_mb: None,
            pool: "default".into(),
            ttl_s: None,
        },
    )
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn x_death(reason: &str, queue: &str) -> FieldTable {
    let mut death = FieldTable::default();
    death.insert("reason".into(), long(reason));
    death.insert("queue".into(), long(queue));
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    headers
}

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap()))
}

#[tokio::test]
async fn a_dead_letter_becomes_a_dead_lettered_record_with_its_reason_and_a_second_copy_changes_nothing()
 {
    let app = spawn_app().await;
    let store = app.state.store().clone();
    let pool_queue = format!("{}.jobs.default", app.prefix);

    // A: known to the store, dead after its delivery limit; the last error comes from the record.
    let a = message();
    store.insert(&JobRecord::queued(&a)).await.unwrap();
    store.record_error(a.id, 1, "exit code 3").await.unwrap();
    // C: already succeeded (dead-lettered late by an at-least-once duplicate).
    let c = message();
    store.insert(&JobRecord::queued(&c)).await.unwrap();
    let done = FinalOutcome {
        status: JobStatus::Succeeded,
        result: Some(json!({"ok": true})),
        error: None,
        worker: Some("worker-1".into()),
        finished_at: now_ms(),
        attempt: None,
        events: vec![],
    };
    store.finish(c.id, &done).await.unwrap();
    // B: unknown to the store, refused by every worker as unschedulable.
    let b = message();
    let mut b_headers = x_death("rejected", &pool_queue);
    b_headers.insert(REASON_HEADER.into(), long("unschedulable"));
    b_headers.insert(ERROR_HEADER.into(), long("needs 64 GPUs"));

    let a_headers = x_death("delivery_limit", &pool_queue);
    app.publish_dead_letter(&a.id.to_string(), &a.to_bytes(), a_headers.clone())
        .await;
    let first = eventually(Duration::from_secs(15), "job A dead-lettered", || async {
        store
            .get(a.id)
            .await
            .unwrap()
            .filter(|r| r.status == JobStatus::DeadLettered)
    })
    .await;
    assert_eq!(first.error.as_deref(), Some("delivery_limit: exit code 3"));
    assert_eq!(first.result.as_ref().unwrap()["reason"], "delivery_limit");
    assert_eq!(first.result.as_ref().unwrap()["queue"], pool_queue.as_str());

    // The duplicate of A, then C, then B; one consumer takes them in order, so once B is
    // recorded the duplicate and C have been handled too.
    app.publish_dead_letter(&a.id.to_string(), &a.to_bytes(), a_headers)
        .await;
    app.publish_dead_letter(
        &c.id.to_string(),
        &c.to_bytes(),
        x_death("expired", &pool_queue),
    )
    .await;
    app.publish_dead_letter(&b.id.to_string(), &b.to_bytes(), b_headers)
        .await;
    let b_rec = eventually(Duration::from_secs(15), "job B dead-lettered", || async {
        store
            .get(b.id)
            .await
            .unwrap()
            .filter(|r| r.status == JobStatus::DeadLettered)
    })
    .await;
    assert_eq!(b_rec.error.as_deref(), Some("unschedulable: needs 64 GPUs"));
    assert_eq!(b_rec.kind, gpuq_common::job::JobKind::Simulate);
    assert_eq!(b_rec.created_at, b.created_at_ms);

    assert_eq!(
        store.get(a.id).await.unwrap().unwrap(),
        first,
        "the second copy changed A"
    );
    let c_rec = store.get(c.id).await.unwrap().unwrap();
    assert_eq!(c_rec.status, JobStatus::Succeeded);
    assert_eq!(c_rec.result, Some(json!({"ok": true})));

    let (_, metrics) = app.get_text("/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"gpuq_dead_letters_total{reason="delivery_limit"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"gpuq_dead_letters_total{reason="unschedulable"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, r#"gpuq_dead_letters_total{reason="expired"}"#),
        None,
        "{metrics}"
    );

    let (status, overview) = app.get_json("/v1/overview").await;
    assert_eq!(status, 200);
    let dead: Vec<&str> = overview["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert!(
        dead.contains(&a.id.to_string().as_str()) && dead.contains(&b.id.to_string().as_str()),
        "{dead:?}"
    );
    assert_eq!(overview["job_counts"]["dead_lettered"], 2);
    assert_eq!(overview["job_counts"]["succeeded"], 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_dead_letter_whose_record_is_corrupt_is_parked_once_and_never_requeued() {
    let app = spawn_app().await;
    let store = app.state.store().clone();
    let pool_queue = format!("{}.jobs.default", app.prefix);
    let job = message();
    store.insert(&JobRecord::queued(&job)).await.unwrap();
    // A status no store write makes: the record cannot be decoded, or written conditionally.
    let changed = rusqlite::Connection::open(app.store_path())
        .unwrap()
        .execute(
            "UPDATE jobs SET status = 'exploded' WHERE id = ?1",
            [job.id.to_string()],
        )
        .unwrap();
    assert_eq!(changed, 1);
    app.publish_dead_letter(
        &job.id.to_string(),
        &job.to_bytes(),
        x_death("delivery_limit", &pool_queue),
    )
    .await;
    let parked = r#"gpuq_dead_letters_unrecorded_total{cause="corrupt_record"}"#;
    eventually(
        Duration::from_secs(15),
        "the dead letter parked",
        || async { metric_value(&app.get_text("/metrics").await.1, parked) },
    )
    .await;
    // Requeued, it would come back at once and be counted again on every pass.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, metrics) = app.get_text("/metrics").await;
    assert_eq!(metric_value(&metrics, parked), Some(1.0), "{metrics}");

    // The consumer goes on: the next dead letter is recorded.
    let next = message();
    store.insert(&JobRecord::queued(&next)).await.unwrap();
    app.publish_dead_letter(
        &next.id.to_string(),
        &next.to_bytes(),
        x_death("expired", &pool_queue),
    )
    .await;
    eventually(Duration::from_secs(15), "the next dead letter", || async {
        store
            .get(next.id)
            .await
            .unwrap()
            .filter(|r| r.status == JobStatus::DeadLettered)
    })
    .await;
    let (_, metrics) = app.get_text("/metrics").await;
    assert_eq!(metric_value(&metrics, parked), Some(1.0), "{metrics}");
    app.cleanup().await;
}

/// The name the broker gives the manager's connection (`peer -> node`), if it has one now.
async fn manager_connection(app: &crate::helpers::TestApp) -> Option<(String, String)> {
    let wanted = format!("gpuq-manager/{}", app.prefix);
    for base in gpuq_common::Settings::default().rabbitmq_mgmt_url_list() {
        let url = format!("{base}/api/connections?columns=name,client_properties");
        let Ok(r) = app.http.get(url).send().await else {
            continue;
        };
        let Ok(conns) = r.json::<Vec<serde_json::Value>>().await else {
            continue;
        };
        return conns
            .iter()
            .find(|c| c["client_properties"]["connection_name"] == wanted.as_str())
            .and_then(|c| c["name"].as_str())
            .map(|name| (base, name.to_string()));
    }
    None
}

#[tokio::test]
async fn the_dead_letter_consumer_reconnects_after_its_connection_dies_and_resumes() {
    let app = spawn_app().await;
    let (base, killed) = eventually(Duration::from_secs(60), "the manager's connection", || {
        manager_connection(&app)
    })
    .await;
    // Closed from the broker's side, as when a node goes away.
    let mut url = reqwest::Url::parse(&format!("{base}/api/connections/")).unwrap();
    url.path_segments_mut()
        .unwrap()
        .pop_if_empty()
        .push(&killed);
    let closed = app.http.delete(url).send().await.unwrap();
    assert!(
        closed.status().is_success(),
        "closing {killed}: {}",
        closed.status()
    );

    let fresh = eventually(
        Duration::from_secs(30),
        "a new connection of the manager",
        || async {
            manager_connection(&app)
                .await
                .filter(|(_, name)| *name != killed)
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "readyz after the reconnect",
        || async { (app.get_json("/readyz").await.0 == 200).then_some(()) },
    )
    .await;

    let job = message();
    let mut headers = FieldTable::default();
    headers.insert(REASON_HEADER.into(), long("unschedulable"));
    app.publish_dead_letter(&job.id.to_string(), &job.to_bytes(), headers)
        .await;
    let store = app.state.store().clone();
    let rec = eventually(
        Duration::from_secs(15),
        "the dead letter recorded after the reconnect",
        || async {
            store
                .get(job.id)
                .await
                .unwrap()
                .filter(|r| r.status == JobStatus::DeadLettered)
        },
    )
    .await;
    assert_eq!(
        rec.error.as_deref(),
        Some("unschedulable"),
        "recorded over {fresh:?}"
    );
    app.cleanup().await;
}
