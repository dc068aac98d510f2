//! `GET /v1/jobs/{job}`: one job as the status page's job view shows it — its summary, its
//! latest progress and its event log after `from` (attempts, progress with metrics, notices, the
//! final status). Output lines are what the job printed, which belongs to whoever submitted it:
//! only the admin token sees them; with the read token they are left out (their offsets too).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use gpuq_common::JobSummary;
use gpuq_common::events::{EventKind, JobEvent, Progress};
use gpuq_common::http::{ApiError, ApiQuery, check_bearer};
use gpuq_common::store::read_log;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::state::AppState;

/// Events in one answer at most.
const PAGE: u32 = 500;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobViewParams {
    /// Events after this offset (0: from the start).
    pub from: Option<u64>,
}

/// A job for the status page.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub job: JobSummary,
    pub progress: Option<Progress>,
    /// The log after `from` (at most 500 events); output lines only for the admin token.
    pub events: Vec<JobEvent>,
    /// Pass as `from` to get what came next.
    pub next_from: u64,
    /// Whether output lines are included (the admin token).
    pub output_shown: bool,
}

/// One job's summary, progress and events (output lines with the admin token only).
#[utoipa::path(get, path = "/v1/jobs/{job}", tag = "jobs",
    params(("job" = String, Path, description = "Job id (UUID)"), JobViewParams),
    security(("read_token" = []), ("admin_token" = [])),
    responses((status = 200, body = JobView), (status = 400), (status = 401), (status = 404), (status = 503)))]
pub async fn job_view(
    State(state): State<AppState>,
    Path(job): Path<String>,
    ApiQuery(p): ApiQuery<JobViewParams>,
    headers: HeaderMap,
) -> Result<Json<JobView>, ApiError> {
    let id: uuid::Uuid = job
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{job:?} is not a job id (a UUID)")))?;
    let record = state
        .store()
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let from = p.from.unwrap_or(0);
    let (events, _) = read_log(state.store().as_ref(), &record, from, PAGE).await?;
    let next_from = events.last().map_or(from, |e| e.offset);
    let admin = std::slice::from_ref(&state.config().admin_token);
    let output_shown = check_bearer(&headers, admin).is_ok();
    let events = events
        .into_iter()
        .filter(|e| output_shown || e.kind != EventKind::Output)
        .collect();
    Ok(Json(JobView {
        job: JobSummary::from(&record),
        progress: record.progress.clone(),
        events,
        next_from,
        output_shown,
    }))
}
