//! `/readyz`: can the gateway accept jobs now? Broker link, store and Redis, checked at once.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::state::SharedState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `status` is `ready` or `not_ready`; `checks` maps each dependency to `ok` or what failed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub status: String,
    pub checks: BTreeMap<String, String>,
}

/// Ready when the broker link is open and the store and Redis answer.
#[utoipa::path(
    get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, description = "Every dependency answers", body = Readiness),
        (status = 503, description = "At least one dependency failed; `checks` says which", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<SharedState>) -> (StatusCode, Json<Readiness>) {
    let broker = async {
        match state.broker.current() {
            Some(link) if state.broker.is_connected() => Ok(link.generation),
            _ => Err("no open connection to any broker node".to_string()),
        }
    };
    // The answer names no host and no driver message: those go to the log.
    let store = async {
        match tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(error.message = %e, "readiness: the store failed");
                Err("unavailable".to_string())
            }
            Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        }
    };
    let redis = async {
        state.kv.ping().await.map_err(|e| {
            tracing::warn!(error.message = %e, "readiness: Redis failed");
            "unavailable".to_string()
        })
    };
    let (broker, store, redis) = tokio::join!(broker, store, redis);
    let mut checks = BTreeMap::new();
    let mut ready = true;
    let mut note = |name: &str, r: Result<(), String>| {
        ready &= r.is_ok();
        checks.insert(name.to_string(), r.err().unwrap_or_else(|| "ok".into()));
    };
    note("broker", broker.map(|_| ()));
    note("store", store);
    note("redis", redis);
    if !ready {
        tracing::warn!(?checks, "not ready");
    }
    let (code, status) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    (
        code,
        Json(Readiness {
            status: status.into(),
            checks,
        }),
    )
}
