//! The real gateway on a random port against the local 3-node RabbitMQ cluster and Redis
//! (`GPUQ_TEST_AMQP_URLS`, `GPUQ_TEST_REDIS_URL`; `scripts/stack.sh up` starts them). Each test
//! has its own queue prefix, SQLite file and port. One test binary, several modules.

#[path = "../support/mod.rs"]
mod support;

mod failover;
mod idempotency;
mod jobs;
mod submit;

use reqwest::StatusCode;
use serde_json::Value;

use support::TestApp;

pub async fn body(resp: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn job_status(app: &TestApp, id: &str) -> String {
    let (status, _, job) = body(app.get(&format!("/v1/jobs/{id}")).await).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    job["status"].as_str().unwrap().to_string()
}
