//! A batch's `Idempotency-Key` left pending by a gateway that died: the retry takes the claim
//! over under every id of the batch, and the jobs the dead request stored become its own.

use gpuq_client::gateway::SubmitBody;
use gpuq_common::job::{JobKind, JobMessage, JobRecord, SubmitRequest, now_ms};
use serde_json::json;
use uuid::Uuid;

use crate::idempotency::leave_claim;
use crate::support::spawn_app;

#[tokio::test]
async fn a_batch_claim_abandoned_by_a_dead_gateway_is_taken_over_under_its_job_ids() {
    let mut app = spawn_app().await;
    let jobs = vec![
        SubmitBody::simulate(5),
        SubmitBody {
            kind: JobKind::Command,
            params: json!({"program": "echo"}),
            array: Some(2),
            ..SubmitBody::simulate(0)
        },
    ];
    let reqs: Vec<SubmitRequest> = jobs
        .iter()
        .map(|j| serde_json::from_value(serde_json::to_value(j).unwrap()).unwrap())
        .collect();
    // What a gateway that died between its claim and the confirms leaves behind: the claim,
    // past its deadline, and the record of one job it had stored.
    let dead: Vec<JobMessage> = reqs.iter().flat_map(|r| r.expand().unwrap()).collect();
    let ids: Vec<Uuid> = dead.iter().map(|m| m.id).collect();
    let entry = json!({
        "id": ids[0],
        "batch": ids,
        "body_hash": gpuq_gateway::jobs::batch_hash(&reqs),
        "state": "pending",
        "until_ms": now_ms() - 1,
    });
    leave_claim(&mut app, "sweep-dead", &entry).await;
    let store = &app.state.store;
    store
        .insert_owned(&JobRecord::queued(&dead[2]), "dead-owner")
        .await
        .unwrap();

    let answer = app
        .client()
        .submit_batch(&jobs, Some("sweep-dead"))
        .await
        .unwrap();
    assert!(!answer.replayed);
    let answered: Vec<Uuid> = answer.jobs.iter().map(|j| j.id).collect();
    assert_eq!(
        answered, ids,
        "the abandoned claim's job ids are kept, in order"
    );
    assert_eq!(app.depth("default").await, 3);
    // The dead request can no longer withdraw the record it stored.
    assert!(!store.withdraw(ids[2], Some("dead-owner")).await.unwrap());
    for (id, index) in [(ids[1], 0), (ids[2], 1)] {
        let member = store.get(id).await.unwrap().unwrap();
        assert_eq!(
            (member.array_id, member.array_index),
            (Some(ids[1]), Some(index))
        );
    }

    let again = app
        .client()
        .submit_batch(&jobs, Some("sweep-dead"))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), ids);
    assert_eq!(app.depth("default").await, 3, "nothing new enqueued");
}
