//! The live status page (`GET /ui`): one self-contained HTML file (CSS and vanilla JS inline,
//! no build step, no network) compiled into the binary. It follows `/v1/events` and falls back
//! to polling `/v1/overview`.

use axum::http::header;
use axum::response::IntoResponse;

/// The page, embedded at compile time.
pub const PAGE: &str = include_str!("ui/index.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
