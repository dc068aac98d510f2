//! The manager's `/v1` engine API for operators: engine views (read token or admin token, see
//! `auth`) and the actions (cordon, uncordon, drain, restart, GPU faults) behind the admin token.
//! Workers' heartbeats are in `heartbeat`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use gpuq_common::engine::{AdminState, EngineView, GpuFault};
use gpuq_common::http::{ApiError, ApiJson, ApiPath};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Admin;
use crate::state::AppState;

/// The most of a worker's answer the manager reads back from a proxied GPU fault.
pub const MAX_PROXIED_ANSWER: usize = 64 * 1024;
/// How long the manager waits for that answer.
pub const PROXY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Every engine ever seen, offline ones included.
#[utoipa::path(get, path = "/v1/engines", tag = "engines",
    security(("read_token" = []), ("admin_token" = [])),
    responses((status = 200, body = [EngineView]), (status = 401), (status = 503)))]
pub async fn list_engines(
    State(state): State<AppState>,
) -> Result<Json<Vec<EngineView>>, ApiError> {
    Ok(Json(state.registry().all_views().await?))
}

async fn known_view(state: &AppState, id: &str) -> Result<EngineView, ApiError> {
    state
        .registry()
        .view(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("engine {id} was never seen")))
}

#[utoipa::path(get, path = "/v1/engines/{id}", tag = "engines",
    security(("read_token" = []), ("admin_token" = [])),
    params(("id" = String, Path, description = "engine id, e.g. worker-1")),
    responses((status = 200, body = EngineView), (status = 401), (status = 404)))]
pub async fn get_engine(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EngineView>, ApiError> {
    Ok(Json(known_view(&state, &id).await?))
}

async fn set_admin(
    state: AppState,
    id: String,
    admin: Option<AdminState>,
) -> Result<Json<EngineView>, ApiError> {
    known_view(&state, &id).await?;
    state.registry().set_admin(&id, admin).await?;
    let what = admin.map_or("uncordoned", AdminState::as_str);
    tracing::info!(worker_id = %id, admin = what, "operator changed engine intent");
    let view = known_view(&state, &id).await?;
    state.gauges().observe(&view);
    // The overview shows the new intent at once, not at the next refresh.
    let _ = state.engine_views().refresh(state.registry()).await;
    Ok(Json(view))
}

/// The engine takes no new jobs; running ones go on.
#[utoipa::path(post, path = "/v1/engines/{id}/cordon", tag = "engines", security(("admin_token" = [])),
    params(("id" = String, Path)), responses((status = 200, body = EngineView), (status = 401), (status = 403), (status = 404)))]
pub async fn cordon(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<EngineView>, ApiError> {
    set_admin(state, id, Some(AdminState::Cordoned)).await
}

/// Clears a cordon or drain.
#[utoipa::path(post, path = "/v1/engines/{id}/uncordon", tag = "engines", security(("admin_token" = [])),
    params(("id" = String, Path)), responses((status = 200, body = EngineView), (status = 401), (status = 403), (status = 404)))]
pub async fn uncordon(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<EngineView>, ApiError> {
    set_admin(state, id, None).await
}

/// The engine finishes what it runs, then takes nothing.
#[utoipa::path(post, path = "/v1/engines/{id}/drain", tag = "engines", security(("admin_token" = [])),
    params(("id" = String, Path)), responses((status = 200, body = EngineView), (status = 401), (status = 403), (status = 404)))]
pub async fn drain(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<EngineView>, ApiError> {
    set_admin(state, id, Some(AdminState::Draining)).await
}

/// How long a restart request waits for the worker process it names; the worker deletes it when
/// it exits, so this only bounds a request whose process died before it saw it.
const RESTART_REQUEST_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Restarts the engine's worker process: it takes no new jobs, finishes its running ones within
/// its shutdown grace (the rest go back to the queue), exits with code 75, and its supervisor
/// (compose's `restart: always`, `scripts/dev.sh`, systemd) starts it again. The process that
/// replaces it is not affected by the request. 409 when the engine is offline.
#[utoipa::path(post, path = "/v1/engines/{id}/restart", tag = "engines", security(("admin_token" = [])),
    params(("id" = String, Path)), responses((status = 200, body = EngineView), (status = 401), (status = 403), (status = 404), (status = 409)))]
pub async fn restart(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<EngineView>, ApiError> {
    let view = known_view(&state, &id).await?;
    let Some(hb) = view.heartbeat.as_ref() else {
        return Err(ApiError::Conflict(format!(
            "engine {id} is offline: there is no worker process to restart"
        )));
    };
    state
        .registry()
        .request_restart(&id, &hb.instance_id, RESTART_REQUEST_TTL)
        .await?;
    tracing::info!(worker_id = %id, instance = %hb.instance_id, "operator asked the engine to restart");
    let _ = state.engine_views().refresh(state.registry()).await;
    Ok(Json(known_view(&state, &id).await?))
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    pub fault: GpuFault,
}

/// Arms (or clears) a simulated GPU fault on the engine's worker, through the admin URL the
/// engine registered with (http or https, checked when its heartbeat was taken and again here);
/// answers what the worker answered, read up to 64 KiB within 5 s.
#[utoipa::path(post, path = "/v1/engines/{id}/gpus/{gpu}/fault", tag = "engines",
    security(("admin_token" = [])), request_body = FaultRequest,
    params(("id" = String, Path), ("gpu" = u32, Path)),
    responses((status = 200, body = gpuq_common::engine::GpuSnapshot), (status = 401), (status = 403), (status = 404),
        (status = 409, description = "the worker refused (e.g. a real NVML GPU)"),
        (status = 503, description = "the engine is offline, or its worker did not answer (in time, within 64 KiB)")))]
pub async fn gpu_fault(
    State(state): State<AppState>,
    _: Admin,
    ApiPath((id, gpu)): ApiPath<(String, u32)>,
    ApiJson(req): ApiJson<FaultRequest>,
) -> Result<Response, ApiError> {
    let view = known_view(&state, &id).await?;
    let Some(hb) = view.heartbeat else {
        return Err(ApiError::Unavailable(format!("engine {id} is offline")));
    };
    if hb.admin_url.is_empty() || crate::heartbeat::check_admin_url(&hb.admin_url).is_err() {
        return Err(ApiError::Unavailable(format!(
            "engine {id} advertises no usable admin URL"
        )));
    }
    let url = format!(
        "{}/admin/gpus/{gpu}/fault",
        hb.admin_url.trim_end_matches('/')
    );
    let call = async {
        let answer = state
            .http()
            .post(&url)
            .bearer_auth(state.config().admin_token.expose())
            .json(&req)
            .send()
            .await
            .map_err(|e| ApiError::Unavailable(format!("worker {id} did not answer: {e}")))?;
        let status =
            StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        Ok::<_, ApiError>((status, read_bounded(answer, &id).await?))
    };
    let (status, body) = tokio::time::timeout(PROXY_TIMEOUT, call)
        .await
        .map_err(|_| ApiError::Unavailable(format!("worker {id} did not answer within 5 s")))??;
    tracing::info!(worker_id = %id, gpu, fault = ?req.fault, status = status.as_u16(), "GPU fault proxied");
    Ok((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The body of a worker's answer, refused (503) past `MAX_PROXIED_ANSWER` bytes.
async fn read_bounded(mut answer: reqwest::Response, id: &str) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        tracing::warn!(worker_id = %id, limit = MAX_PROXIED_ANSWER, "worker answer too large");
        ApiError::Unavailable(format!("worker {id} answered more than 64 KiB"))
    };
    if answer
        .content_length()
        .is_some_and(|n| n > MAX_PROXIED_ANSWER as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = answer
        .chunk()
        .await
        .map_err(|e| ApiError::Unavailable(format!("worker {id} answer cut short: {e}")))?
    {
        if body.len() + chunk.len() > MAX_PROXIED_ANSWER {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
