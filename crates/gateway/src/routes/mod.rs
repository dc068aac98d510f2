//! The HTTP surface: `/v1` behind bearer keys, the ops routes, `/openapi.json`, and JSON
//! answers for everything else (unknown route 404, wrong method 405, bad query 400).

pub mod batch;
pub mod dead_letters;
pub mod events;
pub mod health;
pub mod jobs;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use gpuq_common::coord::idempotency::IdempotencyError;
pub use gpuq_common::http::ApiQuery;
use gpuq_common::http::{ApiError, bearer_token, service_router};

use crate::jobs::JobError;
use gpuq_common::job::JobId;
use utoipa::OpenApi;

use crate::openapi::ApiDoc;
use crate::state::SharedState;

pub use health::Readiness;
pub use jobs::{IDEMPOTENT_REPLAYED, SubmitResponse};

/// The routes served by `gpuq_common::http::service_router` on every service.
pub const COMMON_ROUTES: &[(&str, &str)] = &[("get", "/healthz"), ("get", "/metrics")];

/// Every route of the gateway's own: (method, path, handler). `router` serves exactly these
/// (the `/v1` ones behind the API keys), and the OpenAPI document must list exactly these plus
/// `COMMON_ROUTES` (a test in `openapi` compares them).
fn routes() -> Vec<(&'static str, &'static str, MethodRouter<SharedState>)> {
    vec![
        ("post", "/v1/jobs", post(jobs::submit_job)),
        (
            "post",
            "/v1/jobs/batch",
            post(batch::submit_batch).layer(DefaultBodyLimit::max(batch::BATCH_MAX_BODY_BYTES)),
        ),
        ("get", "/v1/jobs", get(jobs::list_jobs)),
        ("get", "/v1/jobs/{id}", get(jobs::get_job)),
        ("post", "/v1/jobs/{id}/cancel", post(jobs::cancel_job)),
        ("get", "/v1/jobs/{id}/events", get(events::job_events)),
        (
            "get",
            "/v1/dead-letters",
            get(dead_letters::list_dead_letters),
        ),
        (
            "post",
            "/v1/dead-letters/{id}/retry",
            post(dead_letters::retry_dead_letter),
        ),
        ("get", "/readyz", get(health::readyz)),
        ("get", "/openapi.json", get(openapi_json)),
    ]
}

/// (method, path) of every route `router` serves.
pub fn served_routes() -> Vec<(&'static str, &'static str)> {
    routes()
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .chain(COMMON_ROUTES.iter().copied())
        .collect()
}

/// The gateway's whole HTTP application.
pub fn router(state: SharedState) -> Router {
    let (v1, open): (Vec<_>, Vec<_>) = routes()
        .into_iter()
        .partition(|(_, path, _)| path.starts_with("/v1/"));
    let v1 = v1
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .route_layer(from_fn_with_state(state.clone(), require_api_key));
    let app = open
        .into_iter()
        .fold(Router::new().merge(v1), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .with_state(state.clone())
        .layer(DefaultBodyLimit::max(state.max_body_bytes));
    service_router(app, state.registry.clone(), state.http_metrics.clone())
}

async fn openapi_json() -> impl IntoResponse {
    static DOC: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serializes")
    });
    ([(header::CONTENT_TYPE, "application/json")], DOC.as_str())
}

/// Finds whom the bearer key speaks for and hands it to the handler as a `Principal`
/// extension; no key, or an unknown one, is a 401 before anything else is read.
async fn require_api_key(
    State(state): State<SharedState>,
    mut req: Request,
    next: Next,
) -> Response {
    let principal =
        bearer_token(req.headers()).and_then(|t| state.quotas.tenants().authenticate(t));
    match principal {
        Some(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        None => ApiError::Unauthorized.into_response(),
    }
}

/// A job id from the path; 400 when it is not a UUID.
pub fn parse_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a job id (a UUID)")))
}

/// Checks a page size: 1 to 1000, 100 when absent.
pub fn parse_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=gpuq_common::store::MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::BadRequest(format!(
            "limit must be 1 to {}",
            gpuq_common::store::MAX_PAGE
        ))),
    }
}

/// Checks a cursor: the last id of the previous page.
pub fn parse_cursor(cursor: Option<&str>) -> Result<Option<JobId>, ApiError> {
    cursor
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse().map_err(|_| {
                ApiError::BadRequest("cursor must be a job id from next_cursor".into())
            })
        })
        .transpose()
}

/// Checks an optional pool filter.
pub fn parse_pool(pool: Option<String>) -> Result<Option<String>, ApiError> {
    match pool.filter(|p| !p.is_empty()) {
        None => Ok(None),
        Some(p) => gpuq_common::job::validate_pool(&p)
            .map(|()| Some(p))
            .map_err(|m| ApiError::BadRequest(format!("pool: {m}"))),
    }
}

/// The HTTP answer to each way a job operation fails.
impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Invalid(_) | JobError::NoWorkerForPool(_) => {
                ApiError::Unprocessable(e.to_string())
            }
            JobError::NotFound(_) => ApiError::NotFound(e.to_string()),
            JobError::Throttled {
                message,
                retry_after_s,
            } => ApiError::TooManyRequests {
                message,
                retry_after_s,
            },
            JobError::AlreadyFinal { .. } | JobError::NotDeadLettered { .. } => {
                ApiError::Conflict(e.to_string())
            }
            JobError::NotAccepted { .. }
            | JobError::BatchNotAccepted { .. }
            | JobError::Coordination { .. } => ApiError::Unavailable(e.to_string()),
            JobError::Idempotency(e) => match e {
                IdempotencyError::BadKey => ApiError::BadRequest(e.to_string()),
                IdempotencyError::BodyMismatch => ApiError::Unprocessable(e.to_string()),
                IdempotencyError::InProgress => ApiError::Conflict(e.to_string()),
                IdempotencyError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
                IdempotencyError::Corrupt => ApiError::Internal(e.into()),
            },
            JobError::Store(e) => e.into(),
            JobError::Internal(e) => ApiError::Internal(e),
        }
    }
}
