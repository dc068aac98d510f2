//! HTTP pieces every gpuq service shares: the JSON error shape, a JSON extractor that answers
//! bad bodies in that shape, bearer-token checks, request metrics by matched route, and
//! `/healthz` + `/metrics`; `serve` is the server they all run.

mod serve;

pub use serve::{Limits, serve};

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::Registry;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower_http::trace::TraceLayer;
use utoipa::ToSchema;

use crate::config::Secret;
use crate::metrics::HttpMetrics;

/// `{"error":{"code":"…","message":"…"}}`
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Every error an HTTP handler answers, each mapped to one status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("{0}")]
    Unprocessable(String),
    /// A tenant's rate limit or quota; `retry_after_s` goes into `Retry-After`.
    #[error("{message}")]
    TooManyRequests { message: String, retry_after_s: u64 },
    /// A dependency (broker, store, Redis) cannot serve the request now; safe to retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure; the body says nothing internal.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Unprocessable(_) => "invalid_job",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(e) => {
                tracing::error!(error.cause_chain = ?e, error.message = %e, "internal error")
            }
            ApiError::Unavailable(m) => {
                tracing::warn!(error.message = %m, "dependency unavailable")
            }
            _ => {}
        }
        let mut resp = (
            self.status(),
            Json(ErrorBody {
                error: ErrorDetail {
                    code: self.code().into(),
                    message: self.to_string(),
                },
            }),
        )
            .into_response();
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("header"));
        }
        let retry_after = match &self {
            ApiError::Unavailable(_) => Some(1),
            ApiError::TooManyRequests { retry_after_s, .. } => Some((*retry_after_s).max(1)),
            _ => None,
        };
        if let Some(s) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        resp
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            // The cause (a host name, a driver's message) goes to the log, not to the client.
            crate::store::StoreError::Unavailable(m) => {
                tracing::warn!(error.message = %m, "the job store is unavailable");
                ApiError::Unavailable("the job store is unavailable; retry later".into())
            }
            crate::store::StoreError::Conflict(id) => {
                ApiError::Conflict(format!("job {id} exists"))
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

/// Redis away or too slow: the request may be retried.
impl From<crate::coord::CoordError> for ApiError {
    fn from(e: crate::coord::CoordError) -> Self {
        tracing::warn!(error.message = %e, "Redis is unavailable");
        ApiError::Unavailable("Redis is unavailable; retry later".into())
    }
}

/// `Json<T>` whose rejections use the gpuq error shape: malformed JSON 400, wrong types or
/// unknown fields 422, wrong content type 415 as 400, too large 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(match rejection {
                JsonRejection::JsonDataError(e) => ApiError::Unprocessable(e.body_text()),
                JsonRejection::JsonSyntaxError(e) => ApiError::BadRequest(e.body_text()),
                JsonRejection::MissingJsonContentType(_) => {
                    ApiError::BadRequest("expected Content-Type: application/json".into())
                }
                JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    ApiError::PayloadTooLarge
                }
                other => ApiError::BadRequest(other.body_text()),
            }),
        }
    }
}

/// The token of an `Authorization: Bearer …` header, if the request has one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Constant-time comparison of a bearer token against the accepted ones.
pub fn check_bearer(headers: &HeaderMap, accepted: &[Secret]) -> Result<(), ApiError> {
    let token = bearer_token(headers).ok_or(ApiError::Unauthorized)?;
    let ok = accepted
        .iter()
        .filter(|k| !k.is_empty())
        .fold(false, |acc, k| {
            acc | constant_time_eq(token.as_bytes(), k.expose().as_bytes())
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The longest a request may take until its answer's head, body upload included: above the
/// longest `?wait=` (55 s), under the servers' idle timeout. A stream (SSE) answers its head at
/// once and is not limited by it.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Answers 503 (JSON, `Retry-After`) for a request whose handler is not done within `limit`,
/// dropping the handler's work: a dependency that hangs costs a client a bounded wait.
pub async fn request_timeout(
    State(limit): State<std::time::Duration>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Unavailable(format!(
            "the request took longer than {}s",
            limit.as_secs_f64()
        ))
        .into_response(),
    }
}

/// Middleware recording `gpuq_http_requests_total` and latency by matched route.
pub async fn track_metrics(
    State(m): State<Arc<HttpMetrics>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    m.requests
        .with_label_values(&[&route, &method, &status])
        .inc();
    m.duration
        .with_label_values(&[&route, &method])
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// The tail every gpuq service puts on its router: `/healthz` and `/metrics` ([`ops_routes`]),
/// the JSON 404 and 405 fallbacks, the request metrics, and one tracing span per request
/// (method and matched route; `ApiError` logs its own failures, once).
pub fn service_router(app: Router, registry: Registry, http_metrics: Arc<HttpMetrics>) -> Router {
    app.merge(ops_routes(registry))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(REQUEST_TIMEOUT, request_timeout))
        .layer(from_fn_with_state(http_metrics, track_metrics))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let route = req
                        .extensions()
                        .get::<MatchedPath>()
                        .map_or("unmatched", MatchedPath::as_str);
                    tracing::info_span!("http", method = %req.method(), route)
                })
                .on_failure(()),
        )
}

/// `/healthz` (the process answers) and `/metrics` (the registry), for any service.
pub fn ops_routes(registry: Registry) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/metrics",
            get(move || {
                let r = registry.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        crate::metrics::encode(&r),
                    )
                }
            }),
        )
}

/// Falls back to a JSON 404 for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// A JSON 405 for a known route called with a method it does not take.
pub async fn method_not_allowed() -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: "method_not_allowed".into(),
            message: "this route does not take that method".into(),
        },
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// `Path<T>` whose rejections use the gpuq error shape (400), e.g. a GPU index that is no number.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// `Query<T>` whose rejections use the gpuq error shape (400).
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|r| ApiError::BadRequest(r.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_over_the_time_limit_gets_a_503_json_error() {
        use tower::ServiceExt;
        let app = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .route("/fast", get(|| async { "ok" }))
            .layer(from_fn_with_state(
                std::time::Duration::from_millis(100),
                request_timeout,
            ));
        let call = |path: &'static str| {
            app.clone()
                .oneshot(Request::get(path).body(axum::body::Body::empty()).unwrap())
        };
        let started = Instant::now();
        let slow = call("/slow").await.unwrap();
        assert_eq!(slow.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert!(slow.headers().contains_key(header::RETRY_AFTER));
        let body = axum::body::to_bytes(slow.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "unavailable", "{v}");
        assert_eq!(call("/fast").await.unwrap().status(), StatusCode::OK);
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let keys = vec![Secret::new("k1"), Secret::new("k2")];
        let mut h = HeaderMap::new();
        assert!(check_bearer(&h, &keys).is_err());
        h.insert(header::AUTHORIZATION, "Bearer k2".parse().unwrap());
        assert!(check_bearer(&h, &keys).is_ok());
        h.insert(header::AUTHORIZATION, "Bearer k3".parse().unwrap());
        assert!(check_bearer(&h, &keys).is_err());
        assert!(check_bearer(&h, &[Secret::new("")]).is_err());
    }
}
