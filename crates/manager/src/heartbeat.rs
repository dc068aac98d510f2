//! Heartbeats from workers (`POST /v1/heartbeats`) and their goodbye
//! (`DELETE /v1/heartbeats/{engine}/{instance}`), each with the credential of the engine it
//! names. A heartbeat is bounded before it is stored (`checked`): its interval is clamped, its
//! lists and strings are limited, its admin URL must be http(s), since the manager later sends
//! the admin token there (GPU faults).

use axum::Json;
use axum::http::StatusCode;
use gpuq_common::coord::registry::{Sighting, validate_engine_id};
use gpuq_common::engine::{AdminState, EngineState, EngineView, Heartbeat, derive_state};
use gpuq_common::http::{ApiError, ApiJson, ApiPath};
use gpuq_common::job::now_ms;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::WorkerBearer;
use crate::state::AppState;
use axum::extract::State;

/// Shortest heartbeat interval taken: a shorter one is raised to this.
pub const MIN_INTERVAL_MS: u64 = 100;
/// Longest heartbeat interval taken: a longer one is lowered to this.
pub const MAX_INTERVAL_MS: u64 = 60_000;
/// Longest text field of a heartbeat (version, backend, pool, GPU name, admin URL, …).
pub const MAX_TEXT: usize = 256;
/// Most GPUs, running jobs, pools and reasons per GPU a heartbeat may list.
pub const MAX_GPUS: usize = 1024;
pub const MAX_RUNNING_JOBS: usize = 1024;
pub const MAX_POOLS: usize = 64;
pub const MAX_REASONS: usize = 32;

/// What the manager answers a heartbeat with.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatAck {
    pub engine: String,
    pub state: EngineState,
    /// Operator intent the worker must obey (it also reads it from Redis).
    pub admin: Option<AdminState>,
    pub restarts: u64,
    /// The interval the manager counts with (the worker's, clamped to 100 ms..60 s).
    pub heartbeat_interval_ms: u64,
}

fn text(field: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_TEXT {
        return Err(format!("{field}: at most {MAX_TEXT} bytes"));
    }
    Ok(())
}

fn at_most(field: &str, len: usize, max: usize) -> Result<(), String> {
    if len > max {
        return Err(format!("{field}: at most {max}"));
    }
    Ok(())
}

/// An admin URL the manager may send the admin token to: empty (none), or http(s) with a host.
pub fn check_admin_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Ok(());
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("admin_url: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err("admin_url: an http:// or https:// URL with a host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("admin_url: no credentials in the URL".into());
    }
    Ok(())
}

/// The heartbeat as the manager stores it: the interval clamped (0 = `default_interval_ms`),
/// everything else within bounds or refused with the field's name.
pub fn checked(mut hb: Heartbeat, default_interval_ms: u64) -> Result<Heartbeat, String> {
    validate_engine_id(&hb.engine_id)?;
    if hb.instance_id.is_empty() || hb.instance_id.len() > 128 {
        return Err("instance_id: 1 to 128 characters".into());
    }
    text("version", &hb.version)?;
    text("gpu_backend", &hb.gpu_backend)?;
    text("admin_url", &hb.admin_url)?;
    check_admin_url(&hb.admin_url)?;
    at_most("pools", hb.pools.len(), MAX_POOLS)?;
    for p in &hb.pools {
        text("pools", p)?;
    }
    at_most("gpus", hb.gpus.len(), MAX_GPUS)?;
    at_most("running_jobs", hb.running_jobs.len(), MAX_RUNNING_JOBS)?;
    for g in &hb.gpus {
        text("gpus.uuid", &g.uuid)?;
        text("gpus.name", &g.name)?;
        text("gpus.fault", g.fault.as_deref().unwrap_or(""))?;
        at_most("gpus.reasons", g.reasons.len(), MAX_REASONS)?;
        for r in &g.reasons {
            text("gpus.reasons", r)?;
        }
    }
    let interval = if hb.heartbeat_interval_ms == 0 {
        default_interval_ms
    } else {
        hb.heartbeat_interval_ms
    };
    hb.heartbeat_interval_ms = interval.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS);
    Ok(hb)
}

/// A worker's heartbeat: stored with a TTL of a few intervals; its expiry makes the engine
/// offline. 409 when another process of the engine is live (it did not say goodbye and its
/// heartbeat has not expired): a process cannot take over a live engine's id.
#[utoipa::path(post, path = "/v1/heartbeats", tag = "engines", request_body = Heartbeat,
    security(("worker_token" = [])),
    responses((status = 200, body = HeartbeatAck), (status = 401), (status = 409), (status = 422)))]
pub async fn post_heartbeat(
    State(state): State<AppState>,
    bearer: WorkerBearer,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    validate_engine_id(&hb.engine_id).map_err(ApiError::Unprocessable)?;
    bearer.check(&state, &hb.engine_id)?;
    let config = state.config();
    let hb = checked(hb, config.heartbeat_interval_ms).map_err(ApiError::Unprocessable)?;
    let interval = hb.heartbeat_interval_ms;
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
        Sighting::Taken => {
            tracing::warn!(worker_id = %hb.engine_id, instance = %hb.instance_id, "heartbeat refused: another process of this engine is live");
            return Err(ApiError::Conflict(format!(
                "another process of engine {} is live; retry once its heartbeat expires",
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
    if receipt.sighting == Sighting::Same {
        state.engine_views().observe(&view);
    } else {
        // A new engine or process shows in the overview at once.
        let _ = state.engine_views().refresh(state.registry()).await;
    }
    Ok(Json(HeartbeatAck {
        engine: view.id,
        state: engine_state,
        admin: receipt.admin,
        restarts: receipt.restarts,
        heartbeat_interval_ms: interval,
    }))
}

/// A worker process leaving on a graceful stop: the engine is offline at once, and the next
/// process of the engine is accepted without waiting for this one's heartbeat to expire. 409
/// when `instance` is not the engine's current process.
#[utoipa::path(delete, path = "/v1/heartbeats/{engine}/{instance}", tag = "engines",
    security(("worker_token" = [])),
    params(("engine" = String, Path), ("instance" = String, Path)),
    responses((status = 204), (status = 401), (status = 409), (status = 422)))]
pub async fn goodbye(
    State(state): State<AppState>,
    bearer: WorkerBearer,
    ApiPath((engine, instance)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    validate_engine_id(&engine).map_err(ApiError::Unprocessable)?;
    bearer.check(&state, &engine)?;
    if state.registry().goodbye(&engine, &instance).await? {
        tracing::info!(worker_id = %engine, instance = %instance, "engine said goodbye");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::Conflict(format!(
            "{instance} is not the current process of engine {engine}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuq_common::engine::{GpuHealth, GpuSnapshot};

    fn hb() -> Heartbeat {
        Heartbeat {
            engine_id: "worker-1".into(),
            instance_id: "worker-1-abc".into(),
            version: "0.1.0".into(),
            gpu_backend: "sim".into(),
            pools: vec!["default".into()],
            gpus: vec![GpuSnapshot {
                index: 0,
                uuid: "GPU-0".into(),
                name: "sim".into(),
                health: GpuHealth::Healthy,
                reasons: vec![],
                utilization_pct: 0,
                memory_used_mb: 0,
                memory_total_mb: 1,
                temperature_c: 40,
                power_w: 0.0,
                ecc_errors: 0,
                job: None,
                fault: None,
            }],
            running_jobs: vec![],
            consuming: true,
            jobs_processed: 0,
            jobs_failed: 0,
            avg_job_ms: 0.0,
            admin_url: "http://127.0.0.1:9001".into(),
            started_at_ms: 0,
            sent_at_ms: 0,
            heartbeat_interval_ms: 1000,
            fault_injection: false,
        }
    }

    fn with(f: impl FnOnce(&mut Heartbeat)) -> Result<Heartbeat, String> {
        let mut h = hb();
        f(&mut h);
        checked(h, 2000)
    }

    #[test]
    fn the_interval_is_clamped_and_zero_means_the_managers_default() {
        let interval = |ms| {
            with(|h| h.heartbeat_interval_ms = ms)
                .unwrap()
                .heartbeat_interval_ms
        };
        assert_eq!(interval(1), MIN_INTERVAL_MS);
        assert_eq!(interval(1000), 1000);
        assert_eq!(interval(u64::MAX), MAX_INTERVAL_MS);
        assert_eq!(interval(0), 2000);
    }

    #[test]
    fn oversized_fields_are_refused_with_their_name() {
        let long = "x".repeat(MAX_TEXT + 1);
        type Edit<'a> = Box<dyn FnOnce(&mut Heartbeat) + 'a>;
        let cases: Vec<(&str, Edit)> = vec![
            ("version", Box::new(|h| h.version = long.clone())),
            ("gpu_backend", Box::new(|h| h.gpu_backend = long.clone())),
            ("pools", Box::new(|h| h.pools = vec![long.clone()])),
            (
                "pools",
                Box::new(|h| h.pools = vec!["p".into(); MAX_POOLS + 1]),
            ),
            ("gpus.name", Box::new(|h| h.gpus[0].name = long.clone())),
            ("gpus.uuid", Box::new(|h| h.gpus[0].uuid = long.clone())),
            (
                "gpus.fault",
                Box::new(|h| h.gpus[0].fault = Some(long.clone())),
            ),
            (
                "gpus.reasons",
                Box::new(|h| h.gpus[0].reasons = vec![long.clone()]),
            ),
            (
                "gpus",
                Box::new(|h| h.gpus = vec![h.gpus[0].clone(); MAX_GPUS + 1]),
            ),
            (
                "running_jobs",
                Box::new(|h| h.running_jobs = vec![uuid::Uuid::nil(); MAX_RUNNING_JOBS + 1]),
            ),
            ("instance_id", Box::new(|h| h.instance_id = "i".repeat(129))),
            ("instance_id", Box::new(|h| h.instance_id.clear())),
            ("engine ids", Box::new(|h| h.engine_id = "w:1".into())),
        ];
        for (field, f) in cases {
            let e = with(f).unwrap_err();
            assert!(e.starts_with(field), "{field}: {e}");
        }
        // At the limits: accepted.
        assert!(with(|h| h.version = "v".repeat(MAX_TEXT)).is_ok());
        assert!(with(|h| h.gpus = vec![h.gpus[0].clone(); MAX_GPUS]).is_ok());
    }

    #[test]
    fn the_admin_url_is_http_or_https_with_a_host_and_no_credentials() {
        for ok in [
            "",
            "http://10.0.0.7:9001",
            "https://worker-1.example/admin-base",
        ] {
            assert!(check_admin_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "file:///etc/passwd",
            "gopher://x",
            "unix:/run/worker.sock",
            "http://user:pw@10.0.0.7:9001",
            "not a url",
            "http://",
        ] {
            assert!(check_admin_url(bad).is_err(), "{bad}");
        }
    }
}
