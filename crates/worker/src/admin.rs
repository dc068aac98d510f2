//! The worker's HTTP side: health, readiness, metrics, OpenAPI, and the admin API used by the
//! manager, the CLI and the tester (status, fault injection, simulated GPU faults).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gpuq_common::engine::{GpuSnapshot, Heartbeat};
use gpuq_common::http::{ApiError, ApiJson, ErrorBody, check_bearer, service_router};
use serde::Deserialize;
use utoipa::{OpenApi, ToSchema};

use crate::faults::{ArmRequest, FaultsView, Scenario};
use crate::gpu::{GpuError, GpuFault, snapshot};
use crate::state::Worker;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gpuq worker admin API",
        description = "Status, fault injection and simulated GPU faults of one worker."
    ),
    paths(readyz, status, get_faults, arm_faults, clear_faults, gpu_fault),
    components(schemas(
        ErrorBody,
        FaultsView,
        ArmRequest,
        GpuFaultRequest,
        Heartbeat,
        GpuSnapshot,
        Scenario
    ))
)]
struct ApiDoc;

pub fn router(w: Arc<Worker>) -> Router {
    // Every /admin route checks the token before anything reads the request's body.
    let admin = Router::new()
        .route("/admin/status", get(status))
        .route(
            "/admin/faults",
            get(get_faults).post(arm_faults).delete(clear_faults),
        )
        .route("/admin/gpus/{index}/fault", post(gpu_fault))
        .route_layer(from_fn_with_state(w.clone(), require_admin));
    let app = Router::new()
        .merge(admin)
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .with_state(w.clone());
    service_router(app, w.registry.clone(), w.http_metrics.clone())
}

async fn require_admin(State(w): State<Arc<Worker>>, req: Request, next: Next) -> Response {
    match check_bearer(req.headers(), std::slice::from_ref(&w.config.admin_token)) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Ready when the broker connection is up and Redis and the store answer.
#[utoipa::path(get, path = "/readyz", responses((status = 200), (status = 503, body = ErrorBody)))]
async fn readyz(State(w): State<Arc<Worker>>) -> Result<Json<serde_json::Value>, ApiError> {
    if !w.broker_connected.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable("broker: not connected".into()));
    }
    w.coord.ping().await?;
    w.store.ping().await?;
    Ok(Json(
        serde_json::json!({"status": "ready", "consuming": w.consuming.load(Ordering::Relaxed)}),
    ))
}

/// The worker's state as its next heartbeat would report it.
#[utoipa::path(get, path = "/admin/status", responses((status = 200, body = Heartbeat), (status = 401, body = ErrorBody)))]
async fn status(State(w): State<Arc<Worker>>) -> Result<Json<Heartbeat>, ApiError> {
    Ok(Json(crate::monitor::current(&w)))
}

#[utoipa::path(get, path = "/admin/faults", responses((status = 200, body = FaultsView)))]
async fn get_faults(State(w): State<Arc<Worker>>) -> Result<Json<FaultsView>, ApiError> {
    Ok(Json(w.faults.view()))
}

/// Arms the next `count` jobs this worker takes with a tester scenario (0–4 or its name).
#[utoipa::path(post, path = "/admin/faults", request_body = ArmRequest,
    responses((status = 200, body = FaultsView), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn arm_faults(
    State(w): State<Arc<Worker>>,
    ApiJson(req): ApiJson<ArmRequest>,
) -> Result<Json<FaultsView>, ApiError> {
    if !w.faults.enabled() {
        return Err(ApiError::Forbidden(
            "fault injection is off on this worker (GPUQ_FAULT_INJECTION=true enables it)".into(),
        ));
    }
    let name = match &req.scenario {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    let scenario = Scenario::parse(&name)
        .ok_or_else(|| ApiError::Unprocessable(format!("unknown scenario {}", req.scenario)))?;
    if req.count == 0 || req.count > 100_000 {
        return Err(ApiError::Unprocessable("count must be 1 to 100000".into()));
    }
    w.faults.arm(scenario, req.count);
    tracing::warn!(worker_id = %w.engine_id, scenario = scenario.as_str(), count = req.count, "fault armed");
    Ok(Json(w.faults.view()))
}

#[utoipa::path(delete, path = "/admin/faults", responses((status = 200, body = FaultsView)))]
async fn clear_faults(State(w): State<Arc<Worker>>) -> Result<Json<FaultsView>, ApiError> {
    w.faults.clear();
    Ok(Json(w.faults.view()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct GpuFaultRequest {
    /// `overheat`, `ecc`, `oom`, `lost` or `clear`.
    fault: String,
}

/// Injects a fault into a simulated GPU (409 on real GPUs).
#[utoipa::path(post, path = "/admin/gpus/{index}/fault", request_body = GpuFaultRequest,
    responses((status = 200, body = GpuSnapshot), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn gpu_fault(
    State(w): State<Arc<Worker>>,
    Path(index): Path<u32>,
    ApiJson(req): ApiJson<GpuFaultRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let fault = GpuFault::parse(&req.fault)
        .ok_or_else(|| ApiError::Unprocessable(format!("unknown GPU fault {:?}", req.fault)))?;
    match w.gpus.inject(index, fault) {
        Ok(()) => {}
        Err(GpuError::NotSimulated) => {
            return Err(ApiError::Conflict(
                "faults can be injected only into simulated GPUs".into(),
            ));
        }
        Err(GpuError::NoSuchGpu(i)) => {
            return Err(ApiError::NotFound(format!("no GPU {i} on this worker")));
        }
        Err(e) => return Err(ApiError::Internal(e.into())),
    }
    tracing::warn!(worker_id = %w.engine_id, gpu = index, fault = fault.as_str(), "GPU fault injected");
    let g = w.gpus.clone();
    let readings = tokio::task::spawn_blocking(move || g.sample())
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let reading = readings
        .iter()
        .find(|r| r.index == index)
        .ok_or_else(|| ApiError::NotFound(format!("no GPU {index}")))?;
    let snap = snapshot(reading, &w.thresholds);
    // Apply the new health at once rather than at the next monitor tick.
    w.slots.set_health(&[(snap.index, snap.health)]);
    Ok((StatusCode::OK, Json(snap)))
}
