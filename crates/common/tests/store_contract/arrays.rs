//! Batches and job arrays in the store: one write stores a batch and answers the ids it found
//! there already; an array's members keep their array and index and are listed by array,
//! within a tenant.

use std::sync::Arc;

use gpuq_common::job::SubmitRequest;
use gpuq_common::store::{JobStore, ListQuery};
use gpuq_common::{JobRecord, JobStatus};
use serde_json::json;

use super::{new_job, outcome};

/// The records of an array of `n` jobs of `tenant` in `pool`, in index order.
fn array(n: u32, pool: &str, tenant: &str) -> Vec<JobRecord> {
    let req: SubmitRequest =
        serde_json::from_value(json!({"kind": "simulate", "pool": pool, "array": n})).unwrap();
    req.expand()
        .unwrap()
        .into_iter()
        .map(|m| JobRecord::queued(&m.for_tenant(tenant, None)))
        .collect()
}

pub async fn arrays(store: &Arc<dyn JobStore>, pool: &str) {
    let tenant = format!("t{}", uuid::Uuid::new_v4().simple());
    let members = array(5, pool, &tenant);
    let array_id = members[0].id;
    let mut batch = members.clone();
    batch.push(new_job(pool));
    let existed = store.insert_many(&batch, Some("claim-1")).await.unwrap();
    assert!(existed.is_empty(), "{existed:?}");
    for (i, m) in members.iter().enumerate() {
        let got = store.get(m.id).await.unwrap().unwrap();
        assert_eq!(got, *m);
        assert_eq!(
            (got.array_id, got.array_index),
            (Some(array_id), Some(i as u32))
        );
    }
    let plain = store.get(batch[5].id).await.unwrap().unwrap();
    assert_eq!((plain.array_id, plain.array_index), (None, None));
    // The batch's owner owns every record it stored.
    assert!(!store.withdraw(batch[5].id, None).await.unwrap());
    assert!(store.withdraw(batch[5].id, Some("claim-1")).await.unwrap());

    // Storing a batch again: the ids there already are answered and left as they were.
    store
        .finish(members[0].id, &outcome(JobStatus::Succeeded, "w"))
        .await
        .unwrap();
    let again = store.insert_many(&batch, Some("claim-2")).await.unwrap();
    let mut expected: Vec<_> = members.iter().map(|m| m.id).collect();
    let mut answered = again.clone();
    expected.sort();
    answered.sort();
    assert_eq!(
        answered, expected,
        "the withdrawn job is stored again, the others existed"
    );
    assert_eq!(
        store.get(members[0].id).await.unwrap().unwrap().status,
        JobStatus::Succeeded
    );
    assert!(store.insert_many(&[], None).await.unwrap().is_empty());

    // An array's listing: its members only, newest first, paged, within the tenant.
    let other = array(2, pool, &tenant);
    store.insert_many(&other, None).await.unwrap();
    let by_array = |tenant: Option<String>, limit, cursor| ListQuery {
        tenant,
        array: Some(array_id),
        limit,
        cursor,
        ..Default::default()
    };
    let first = store
        .list(&by_array(Some(tenant.clone()), 3, None))
        .await
        .unwrap();
    let rest = store
        .list(&by_array(Some(tenant.clone()), 3, first.next_cursor))
        .await
        .unwrap();
    assert!(first.next_cursor.is_some() && rest.next_cursor.is_none());
    let listed: Vec<_> = first.jobs.iter().chain(&rest.jobs).map(|j| j.id).collect();
    let newest_first: Vec<_> = members.iter().rev().map(|m| m.id).collect();
    assert_eq!(listed, newest_first);
    let all_tenants = store.list(&by_array(None, 100, None)).await.unwrap();
    assert_eq!(all_tenants.jobs.len(), 5);
    let stranger = store
        .list(&by_array(Some("someone-else".into()), 100, None))
        .await
        .unwrap();
    assert!(stranger.jobs.is_empty(), "another tenant sees none of it");
    let queued = store
        .list(&ListQuery {
            status: Some(JobStatus::Queued),
            ..by_array(Some(tenant.clone()), 100, None)
        })
        .await
        .unwrap();
    assert_eq!(queued.jobs.len(), 4, "filters combine");
}
