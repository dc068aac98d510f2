//! The real gateway on a random port against the local 3-node RabbitMQ cluster and Redis
//! (`GPUQ_TEST_AMQP_URLS`, `GPUQ_TEST_REDIS_URL`; `scripts/stack.sh up` starts them). Each test
//! has its own queue prefix, SQLite file and port. One test binary, several modules.

#[path = "../support/mod.rs"]
mod support;

mod batch;
mod doubles;
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

/// Sends one request through a router of its own (a second gateway over the test's prefix).
pub async fn oneshot(
    router: &axum::Router,
    req: axum::http::Request<axum::body::Body>,
) -> (u16, Value) {
    use tower::ServiceExt;
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// `POST /v1/jobs` with an `Idempotency-Key`, for `oneshot`.
pub fn keyed_submit(job: &Value, key: &str) -> axum::http::Request<axum::body::Body> {
    axum::http::Request::post("/v1/jobs")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", support::API_KEY))
        .header("idempotency-key", key)
        .body(axum::body::Body::from(job.to_string()))
        .unwrap()
}

pub async fn job_status(app: &TestApp, id: &str) -> String {
    let (status, _, job) = body(app.get(&format!("/v1/jobs/{id}")).await).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    job["status"].as_str().unwrap().to_string()
}
