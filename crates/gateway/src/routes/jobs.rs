//! `/v1/jobs`: submit, read, list, cancel.

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use gpuq_common::http::{ApiError, ApiJson, ErrorBody};
use gpuq_common::job::{JobRecord, JobStatus, SubmitRequest};
use gpuq_common::store::{JobPage, ListQuery};
use gpuq_common::tenancy::Principal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiQuery, parse_cursor, parse_id, parse_limit, parse_pool};
use crate::jobs::{self as ops, JobError, Submitted};
use crate::state::SharedState;
use gpuq_common::coord::idempotency::Idempotency;

/// Request header naming a submission so that retries of it enqueue nothing new.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Response header set on a replayed submission.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// `202` (accepted now) or `200` (an idempotent replay) to `POST /v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SubmitResponse {
    pub id: uuid::Uuid,
    pub status: JobStatus,
}

/// Filters of `GET /v1/jobs`; newest first.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// One of queued, running, succeeded, failed, dead_lettered, cancelled.
    pub status: Option<String>,
    pub pool: Option<String>,
    /// Only the jobs of this array (the `array_id` of its jobs: its first job's id).
    pub array: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Query of `GET /v1/jobs/{id}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct GetParams {
    /// Answer as soon as the job is final, or after this long with its status then: `30s`,
    /// `500ms`, or seconds; at most 55 s.
    pub wait: Option<String>,
}

/// Submits a job. Answers 202 only once the broker has confirmed it to a replicated queue.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body = SubmitRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header,
         description = "Up to 200 characters. A retry with the same key and body answers 200 with the same job and enqueues nothing."),
    ),
    responses(
        (status = 202, description = "Stored and confirmed by the broker", body = SubmitResponse),
        (status = 200, description = "Idempotent replay: the job an earlier request with this key made",
         body = SubmitResponse, headers(("Idempotent-Replayed" = String, description = "`true`"))),
        (status = 400, description = "Malformed JSON or Idempotency-Key", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 409, description = "A request with this Idempotency-Key is still in progress", body = ErrorBody),
        (status = 413, description = "Body larger than max_body_bytes", body = ErrorBody),
        (status = 422, description = "Invalid job (the message names the field), unknown pool, or Idempotency-Key reused with another body", body = ErrorBody),
        (status = 429, description = "The tenant is over its rate limit or its cap on unfinished jobs; `Retry-After` says when to try again", body = ErrorBody),
        (status = 503, description = "Broker, store or Redis unavailable. Nothing was enqueued, unless the broker's confirm never came: then the message names the job, which stays queued (retry with the same Idempotency-Key)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn submit_job(
    State(state): State<SharedState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<SubmitRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    Ok(match ops::submit(&state, &who, req, key).await? {
        Submitted::Accepted(id) => accepted(
            false,
            SubmitResponse {
                id,
                status: JobStatus::Queued,
            },
        ),
        Submitted::Replayed { id, status } => accepted(true, SubmitResponse { id, status }),
    })
}

/// The request's `Idempotency-Key`, checked; 400 when malformed.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    Ok(headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| Idempotency::validate_key(v.as_bytes()))
        .transpose()
        .map_err(JobError::from)?)
}

/// A submission's answer: 202, or 200 with `Idempotent-Replayed: true` for a replay.
pub fn accepted(replayed: bool, body: impl Serialize) -> Response {
    if replayed {
        (
            StatusCode::OK,
            [(
                HeaderName::from_static(IDEMPOTENT_REPLAYED),
                HeaderValue::from_static("true"),
            )],
            Json(body),
        )
            .into_response()
    } else {
        (StatusCode::ACCEPTED, Json(body)).into_response()
    }
}

/// A job's status, attempts, placement and result. Another tenant's job is a 404.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id (UUID)"), GetParams),
    responses(
        (status = 200, body = JobRecord),
        (status = 400, description = "Not a UUID, or a bad `wait`", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_job(
    State(state): State<SharedState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<GetParams>,
) -> Result<Json<JobRecord>, ApiError> {
    let id = parse_id(&id)?;
    let wait = p.wait.as_deref().map(parse_wait).transpose()?;
    Ok(Json(
        ops::read(&state, &who, id, wait.unwrap_or_default()).await?,
    ))
}

/// The longest `?wait=`: under the servers' idle timeout, which a silent wait would reach.
pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(55);

/// `30s`, `500ms`, `2m`, or plain seconds, up to `MAX_WAIT`.
pub fn parse_wait(raw: &str) -> Result<std::time::Duration, ApiError> {
    use std::time::Duration;
    let raw = raw.trim();
    let bad = || ApiError::BadRequest(format!("wait: {raw:?} is not a duration like 30s or 500ms"));
    let (number, unit) = raw
        .find(|c: char| !c.is_ascii_digit())
        .map_or((raw, ""), |i| raw.split_at(i));
    let n: u64 = number.parse().map_err(|_| bad())?;
    let wait = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    if wait > MAX_WAIT {
        return Err(ApiError::BadRequest(format!(
            "wait: at most {}s",
            MAX_WAIT.as_secs()
        )));
    }
    Ok(wait)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn waits_read_as_durations_up_to_the_limit() {
        assert_eq!(parse_wait("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_wait("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_wait("12").unwrap(), Duration::from_secs(12));
        assert_eq!(parse_wait("0").unwrap(), Duration::ZERO);
        for bad in ["", "s", "1h", "-1s", "1.5s", "56s", "1m"] {
            assert!(parse_wait(bad).is_err(), "{bad}");
        }
    }
}

/// Jobs, newest first, by status, pool and array; page with `next_cursor`. A `submit` key lists its
/// tenant's jobs only; an `admin` key every tenant's.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs",
    params(ListParams),
    responses(
        (status = 200, body = JobPage),
        (status = 400, description = "Unknown status, bad limit or cursor", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_jobs(
    State(state): State<SharedState>,
    Extension(who): Extension<Principal>,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<Json<JobPage>, ApiError> {
    let status = match p.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            let known: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::BadRequest(format!(
                "unknown status {s:?}; use one of {}",
                known.join(", ")
            ))
        })?),
    };
    let query = ListQuery {
        tenant: who.scope().map(str::to_string),
        status,
        pool: parse_pool(p.pool)?,
        array: p
            .array
            .as_deref()
            .filter(|a| !a.is_empty())
            .map(parse_id)
            .transpose()?,
        limit: parse_limit(p.limit)?,
        cursor: parse_cursor(p.cursor.as_deref())?,
    };
    Ok(Json(state.store.list(&query).await?))
}

/// Query of `POST /v1/jobs/{id}/cancel`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CancelParams {
    /// `true`: `id` names an array (its `array_id`), and every job of it not final yet is
    /// cancelled; the answer is an `ArrayCancelResponse`.
    pub array: Option<bool>,
}

/// The answer to `POST /v1/jobs/{array_id}/cancel?array=true`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ArrayCancelResponse {
    pub array_id: uuid::Uuid,
    /// The array's jobs cancelled by this request.
    pub cancelled: Vec<uuid::Uuid>,
    /// The array's jobs that were final already (and stay as they were).
    pub already_final: u32,
}

/// Cancels a queued or running job, or with `?array=true` every unfinished job of an array; a
/// running job's worker is told to stop it.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "Job id (UUID), or with `array=true` an array's id"), CancelParams),
    responses(
        (status = 200, description = "Cancelled: the job's record, or with `array=true` an `ArrayCancelResponse` (an array whose jobs are all final already answers it too, with nothing cancelled)", body = JobRecord),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such job (or array) of the key's tenant", body = ErrorBody),
        (status = 409, description = "The job already has a final status", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel_job(
    State(state): State<SharedState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<CancelParams>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if p.array == Some(true) {
        let (cancelled, already_final) = ops::cancel_array(&state, &who, id).await?;
        return Ok(Json(ArrayCancelResponse {
            array_id: id,
            cancelled,
            already_final,
        })
        .into_response());
    }
    Ok(Json(ops::cancel(&state, &who, id).await?).into_response())
}
