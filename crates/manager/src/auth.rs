//! Who may call what on the manager. Operators read every `/v1` route with the read token or
//! the admin token (`require_reader`, one layer over every `/v1` route but the heartbeats, so a
//! new route is closed by default) and act with the admin token only (`Admin`). Workers send
//! heartbeats with their own engine's credential (`WorkerBearer`, checked against the engine
//! the heartbeat names); operator tokens are not worker credentials, nor the reverse.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use gpuq_common::credentials::verify_worker_token;
use gpuq_common::http::{ApiError, bearer_token, check_bearer};

use crate::state::AppState;

/// Layer of the operator routes: the read token or the admin token, else 401.
pub async fn require_reader(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let c = state.config();
    check_bearer(
        req.headers(),
        &[c.admin_token.clone(), c.read_token.clone()],
    )?;
    Ok(next.run(req).await)
}

/// Proof that the request carries the admin token. Put it before a body extractor: extractors
/// run in order, so a request without the token gets its 401 before its body is read. The read
/// token gets a 403: it is known, and only reads.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let c = state.config();
        match check_bearer(&parts.headers, std::slice::from_ref(&c.admin_token)) {
            Ok(()) => Ok(Admin),
            Err(e) => match check_bearer(&parts.headers, std::slice::from_ref(&c.read_token)) {
                Ok(()) => Err(ApiError::Forbidden(
                    "the read token only reads; this action needs the admin token".into(),
                )),
                Err(_) => Err(e),
            },
        }
    }
}

/// The bearer token of a worker's request, to be checked against the engine it speaks for once
/// the body names it (`check`). A request without one, or with one that cannot be a worker
/// credential (64 hex digits), is refused before its body is read.
pub struct WorkerBearer(String);

impl FromRequestParts<AppState> for WorkerBearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        bearer_token(&parts.headers)
            .filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|t| WorkerBearer(t.to_string()))
            .ok_or(ApiError::Unauthorized)
    }
}

impl WorkerBearer {
    /// 401 unless the token is `engine_id`'s credential under the fleet secret.
    pub fn check(&self, state: &AppState, engine_id: &str) -> Result<(), ApiError> {
        if verify_worker_token(&state.config().worker_secret, engine_id, &self.0) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}
