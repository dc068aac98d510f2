//! `POST /v1/jobs/batch`: many jobs, and job arrays, in one request.

use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::Response;
use gpuq_common::http::{ApiError, ApiJson, ErrorBody};
use gpuq_common::job::SubmitRequest;
use gpuq_common::tenancy::Principal;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::jobs::{SubmitResponse, accepted, idempotency_key};
use crate::jobs::{self as ops, BatchSubmitted};
use crate::state::SharedState;

/// The largest body of a batch: room for 1000 jobs of about 16 KiB each.
pub const BATCH_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The body of `POST /v1/jobs/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Job requests, each as for `POST /v1/jobs`, plus `array`: N jobs sharing its params,
    /// indexed 0 to N-1. At most 1000 jobs in all, an array counted as its size.
    pub jobs: Vec<SubmitRequest>,
}

/// `202` (accepted now) or `200` (an idempotent replay) to `POST /v1/jobs/batch`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    /// Every job, in request order; an array's jobs in index order, the first one's id naming
    /// the array (`array_id` on their records).
    pub jobs: Vec<SubmitResponse>,
}

/// Submits a batch of jobs: validated all or nothing, stored in one write, published with one
/// wait for all their confirms; 202 only once the broker confirmed every one.
#[utoipa::path(
    post, path = "/v1/jobs/batch", tag = "jobs",
    request_body = BatchRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header,
         description = "Names the whole batch. A retry with the same key and body answers 200 with the same jobs and enqueues nothing."),
    ),
    responses(
        (status = 202, description = "Every job stored and confirmed by the broker", body = BatchResponse),
        (status = 200, description = "Idempotent replay: the jobs an earlier request with this key made, with their statuses now",
         body = BatchResponse, headers(("Idempotent-Replayed" = String, description = "`true`"))),
        (status = 400, description = "Malformed JSON or Idempotency-Key", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 409, description = "A request with this Idempotency-Key is still in progress", body = ErrorBody),
        (status = 413, description = "Body larger than 16 MiB", body = ErrorBody),
        (status = 422, description = "An invalid job (the message names it: `jobs[3].params.duration_ms: …`; nothing was enqueued), more than 1000 jobs or the tenant's burst, unknown pool, or Idempotency-Key reused with another body", body = ErrorBody),
        (status = 429, description = "The batch's jobs would put the tenant over its rate limit or its cap on unfinished jobs (every job counts); `Retry-After` says when to try again", body = ErrorBody),
        (status = 503, description = "Broker, store or Redis unavailable. The message says how many of the batch's jobs are or may be queued; with an Idempotency-Key a retry completes the batch with the same jobs", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn submit_batch(
    State(state): State<SharedState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let outcome = ops::submit_batch(&state, &who, req.jobs, key).await?;
    let replayed = matches!(outcome, BatchSubmitted::Replayed(_));
    let body = BatchResponse {
        jobs: outcome
            .jobs()
            .into_iter()
            .map(|(id, status)| SubmitResponse { id, status })
            .collect(),
    };
    Ok(accepted(replayed, body))
}
