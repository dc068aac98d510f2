//! The broker link: replaced when it drops, never a 202 without a confirm, closed on stop.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::body;
use crate::support::{self, TestApp, error_of, spawn_app};

#[tokio::test]
async fn a_dropped_broker_connection_is_replaced_and_submissions_resume() {
    let app = spawn_app().await;
    let before = app.state.broker.current().unwrap().generation;
    close_gateway_connections(&app).await;
    // Until a new link is up, a submission waits for it (up to the confirm timeout).
    let (status, _, resp) = body(app.submit(&json!({"kind":"simulate"})).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    let after = app.state.broker.current().unwrap().generation;
    assert!(
        after > before,
        "a new link ({after}) replaced the closed one ({before})"
    );
    assert_eq!(app.depth("default").await, 1);
}

#[tokio::test]
async fn no_submission_is_answered_202_without_its_message_when_the_connection_drops_mid_flight() {
    let app = spawn_app().await;
    let total = 400;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (http, url, next) = (app.http.clone(), app.url("/v1/jobs"), next.clone());
        tasks.spawn(async move {
            let mut answers = vec![];
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let resp = http
                    .post(&url)
                    .bearer_auth(support::API_KEY)
                    .json(&json!({"kind":"simulate"}))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                let v: Value = resp.json().await.unwrap();
                answers.push((status, v));
            }
            answers
        });
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    close_gateway_connections(&app).await;
    let answers: Vec<(StatusCode, Value)> = tasks.join_all().await.into_iter().flatten().collect();
    let mut accepted = HashSet::new();
    for (status, v) in &answers {
        match *status {
            StatusCode::ACCEPTED => {
                accepted.insert(v["id"].as_str().unwrap().to_string());
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                error_of(v);
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    let mut queued = HashSet::new();
    while let Some(msg) = app.take("default").await {
        let id = msg.delivery.properties.message_id().clone().unwrap();
        queued.insert(id.as_str().to_string());
    }
    println!(
        "{} accepted, {} refused with 503, {} distinct messages queued",
        accepted.len(),
        answers.len() - accepted.len(),
        queued.len()
    );
    let lost: Vec<_> = accepted.difference(&queued).collect();
    assert!(
        lost.is_empty(),
        "answered 202 but not in the queue: {lost:?}"
    );
    assert!(
        accepted.len() > total / 2,
        "most were accepted: {}",
        accepted.len()
    );
}

#[tokio::test]
async fn a_graceful_stop_closes_the_broker_connection() {
    let mut app = spawn_app().await;
    let link = app.state.broker.current().unwrap();
    app.stop().await;
    assert!(app.state.broker.current().is_none());
    assert!(!link.connection.status().connected(), "closed with 200 OK");
    assert!(
        app.http.get(app.url("/healthz")).send().await.is_err(),
        "no longer listening"
    );
}

/// Closes the gateway's broker connection from the broker's side, through the management API
/// (the same thing a node does to its clients when it stops), without touching other clients.
async fn close_gateway_connections(app: &TestApp) {
    let name = format!("gpuq-gateway {}", app.settings.queue_prefix);
    let mgmt = std::env::var("GPUQ_RABBITMQ_MGMT_URLS")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| app.settings.rabbitmq_mgmt_urls.clone());
    let http = gpuq_common::tls::http_client_builder().build().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for base in mgmt.split(',').map(str::trim).filter(|b| !b.is_empty()) {
            let url = reqwest::Url::parse(base).expect("management URL");
            let (user, pass) = (
                url.username().to_string(),
                url.password().unwrap_or("").to_string(),
            );
            let mut root = url.clone();
            let _ = root.set_username("");
            let _ = root.set_password(None);
            let root = root.as_str().trim_end_matches('/').to_string();
            let Ok(resp) = http
                .get(format!(
                    "{root}/api/connections?columns=name,client_properties"
                ))
                .basic_auth(&user, Some(&pass))
                .send()
                .await
            else {
                continue;
            };
            let Ok(conns) = resp.json::<Vec<Value>>().await else {
                continue;
            };
            let ours: Vec<String> = conns
                .iter()
                .filter(|c| c["client_properties"]["connection_name"] == name.as_str())
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect();
            if ours.is_empty() {
                continue;
            }
            for conn in ours {
                let mut target = reqwest::Url::parse(&format!("{root}/api/connections/")).unwrap();
                target
                    .path_segments_mut()
                    .unwrap()
                    .pop_if_empty()
                    .push(&conn);
                let resp = http
                    .delete(target)
                    .basic_auth(&user, Some(&pass))
                    .send()
                    .await
                    .unwrap();
                assert!(
                    resp.status().is_success(),
                    "closing {conn}: {}",
                    resp.status()
                );
            }
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway's connection {name:?} never showed up in the management API at {mgmt}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
