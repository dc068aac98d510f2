//! The manager's `/v1` engine API: heartbeats from workers, engine views for everyone, and the
//! operator's actions (cordon, uncordon, drain, GPU faults) behind the admin token.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use gpuq_common::engine::{AdminState, EngineState, EngineView, GpuFault, Heartbeat, derive_state};
use gpuq_common::http::{ApiError, ApiJson, ApiPath, check_bearer};
use gpuq_common::job::now_ms;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::state::AppState;
use gpuq_common::coord::registry::{Sighting, validate_engine_id};

/// Proof that the request carries the admin token. Put it before a body extractor: extractors
/// run in order, so a request without the token gets its 401 before its body is read.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        check_bearer(
            &parts.headers,
            std::slice::from_ref(&state.config().admin_token),
        )?;
        Ok(Admin)
    }
}

/// What the manager answers a heartbeat with.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatAck {
    pub engine: String,
    pub state: EngineState,
    /// Operator intent the worker must obey (it also reads it from Redis).
    pub admin: Option<AdminState>,
    pub restarts: u64,
}

/// A worker's heartbeat: stored with a TTL of a few intervals; its expiry makes the engine offline.
#[utoipa::path(post, path = "/v1/heartbeats", tag = "engines", request_body = Heartbeat,
    security(("admin_token" = [])),
    responses((status = 200, body = HeartbeatAck), (status = 401), (status = 409), (status = 422)))]
pub async fn post_heartbeat(
    State(state): State<AppState>,
    _: Admin,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    validate_engine_id(&hb.engine_id).map_err(ApiError::Unprocessable)?;
    if hb.instance_id.is_empty() || hb.instance_id.len() > 128 {
        return Err(ApiError::Unprocessable(
            "instance_id: 1 to 128 characters".into(),
        ));
    }
    if hb.gpus.len() > 1024 {
        return Err(ApiError::Unprocessable("gpus: at most 1024".into()));
    }
    let config = state.config();
    let interval = if hb.heartbeat_interval_ms > 0 {
        hb.heartbeat_interval_ms
    } else {
        config.heartbeat_interval_ms
    };
    let ttl_ms = interval.saturating_mul(u64::from(config.engine_offline_after_heartbeats));
    let now = now_ms();
    let receipt = state.registry().record_heartbeat(&hb, ttl_ms, now).await?;
    match receipt.sighting {
        Sighting::Stale => {
            return Err(ApiError::Conflict(format!(
                "a newer instance of engine {} is running",
                hb.engine_id
            )));
        }
        Sighting::Restarted => {
            state
                .metrics()
                .engine_restarts
                .with_label_values(&[hb.engine_id.as_str()])
                .inc();
            tracing::warn!(worker_id = %hb.engine_id, instance = %hb.instance_id, restarts = receipt.restarts, "engine restarted");
        }
        Sighting::New => tracing::info!(worker_id = %hb.engine_id, "new engine registered"),
        Sighting::Same => {}
    }
    let engine_state = derive_state(Some(&hb), receipt.admin);
    let view = EngineView {
        id: hb.engine_id.clone(),
        state: engine_state,
        admin: receipt.admin,
        restarts: receipt.restarts,
        last_seen_ms: Some(now),
        heartbeat: Some(hb),
        restart_requested: false,
    };
    state.gauges().observe(&view);
    Ok(Json(HeartbeatAck {
        engine: view.id,
        state: engine_state,
        admin: receipt.admin,
        restarts: receipt.restarts,
    }))
}

/// Every engine ever seen, offline ones included.
#[utoipa::path(get, path = "/v1/engines", tag = "engines",
    responses((status = 200, body = [EngineView]), (status = 503)))]
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
    params(("id" = String, Path, description = "engine id, e.g. worker-1")),
    responses((status = 200, body = EngineView), (status = 404)))]
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
    Ok(Json(view))
}

/// The engine takes no new jobs; running ones go on.
#[utoipa::path(post, path = "/v1/engines/{id}/cordon", tag = "engines", security(("admin_token" = [])),
    params(("id" = String, Path)), responses((status = 200, body = EngineView), (status = 401), (status = 404)))]
pub async fn cordon(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<EngineView>, ApiError> {
    set_admin(state, id, Some(AdminState::Cordoned)).await
}

/// Clears a cordon or drain.
#[utoipa::path(post, path = "/v1/engines/{id}/uncordon", tag = "engines", security(("admin_token" = [])),
    params(("id" = String, Path)), responses((status = 200, body = EngineView), (status = 401), (status = 404)))]
pub async fn uncordon(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<EngineView>, ApiError> {
    set_admin(state, id, None).await
}

/// The engine finishes what it runs, then takes nothing.
#[utoipa::path(post, path = "/v1/engines/{id}/drain", tag = "engines", security(("admin_token" = [])),
    params(("id" = String, Path)), responses((status = 200, body = EngineView), (status = 401), (status = 404)))]
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
    params(("id" = String, Path)), responses((status = 200, body = EngineView), (status = 401), (status = 404), (status = 409)))]
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
    Ok(Json(known_view(&state, &id).await?))
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    pub fault: GpuFault,
}

/// Arms (or clears) a simulated GPU fault on the engine's worker; answers what the worker answered.
#[utoipa::path(post, path = "/v1/engines/{id}/gpus/{gpu}/fault", tag = "engines",
    security(("admin_token" = [])), request_body = FaultRequest,
    params(("id" = String, Path), ("gpu" = u32, Path)),
    responses((status = 200, body = gpuq_common::engine::GpuSnapshot), (status = 401), (status = 404),
        (status = 409, description = "the worker refused (e.g. a real NVML GPU)"),
        (status = 503, description = "the engine is offline or its worker did not answer")))]
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
    if hb.admin_url.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "engine {id} advertises no admin URL"
        )));
    }
    let url = format!(
        "{}/admin/gpus/{gpu}/fault",
        hb.admin_url.trim_end_matches('/')
    );
    let answer = state
        .http()
        .post(&url)
        .bearer_auth(state.config().admin_token.expose())
        .json(&req)
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| ApiError::Unavailable(format!("worker {id} did not answer: {e}")))?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body: Bytes = answer
        .bytes()
        .await
        .map_err(|e| ApiError::Unavailable(format!("worker {id} answer cut short: {e}")))?;
    tracing::info!(worker_id = %id, gpu, fault = ?req.fault, status = status.as_u16(), "GPU fault proxied");
    Ok((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}
