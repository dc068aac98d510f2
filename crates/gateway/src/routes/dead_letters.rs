//! `/v1/dead-letters`: jobs the broker gave up on, and their re-drive.

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use gpuq_common::http::{ApiError, ErrorBody};
use gpuq_common::job::JobStatus;
use gpuq_common::store::{JobPage, ListQuery};
use gpuq_common::tenancy::Principal;
use serde::Deserialize;
use utoipa::IntoParams;

use super::jobs::SubmitResponse;
use super::{ApiQuery, parse_cursor, parse_id, parse_limit, parse_pool};
use crate::state::SharedState;

/// Filters of `GET /v1/dead-letters`; newest first.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterParams {
    pub pool: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Dead-lettered jobs, with the reason in `error`.
#[utoipa::path(
    get, path = "/v1/dead-letters", tag = "dead letters",
    params(DeadLetterParams),
    responses(
        (status = 200, body = JobPage),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_dead_letters(
    State(state): State<SharedState>,
    Extension(who): Extension<Principal>,
    ApiQuery(p): ApiQuery<DeadLetterParams>,
) -> Result<Json<JobPage>, ApiError> {
    let query = ListQuery {
        tenant: who.scope().map(str::to_string),
        status: Some(JobStatus::DeadLettered),
        pool: parse_pool(p.pool)?,
        array: None,
        limit: parse_limit(p.limit)?,
        cursor: parse_cursor(p.cursor.as_deref())?,
    };
    Ok(Json(state.store.list(&query).await?))
}

/// Re-drives a dead-lettered job under its own id; 202 once the broker confirmed it.
#[utoipa::path(
    post, path = "/v1/dead-letters/{id}/retry", tag = "dead letters",
    params(("id" = String, Path, description = "Job id (UUID)")),
    responses(
        (status = 202, description = "Queued again and confirmed by the broker", body = SubmitResponse),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The job is not dead-lettered", body = ErrorBody),
        (status = 422, description = "No worker serves the job's pool any more", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn retry_dead_letter(
    State(state): State<SharedState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<SubmitResponse>), ApiError> {
    let id = parse_id(&id)?;
    let id = crate::jobs::retry_dead_letter(&state, &who, id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(SubmitResponse {
            id,
            status: JobStatus::Queued,
        }),
    ))
}
