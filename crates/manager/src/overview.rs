//! The status page's data: one JSON overview of engines, queues, job counts, throughput and
//! recent jobs, served whole (`GET /v1/overview`) and pushed every ~1.5 s over Server-Sent
//! Events (`GET /v1/events`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use futures_util::StreamExt;
use gpuq_common::engine::EngineView;
use gpuq_common::http::ApiError;
use gpuq_common::job::{JobRecord, JobStatus, now_ms};
use gpuq_common::store::ListQuery;
use serde::Serialize;
use utoipa::ToSchema;

use crate::queues::QueueStats;
use crate::state::AppState;
use crate::throughput::Throughput;

/// How often the event stream sends a fresh overview.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Overview {
    pub generated_at_ms: i64,
    pub engines: Vec<EngineView>,
    pub queues: Vec<QueueStats>,
    /// Whether the RabbitMQ management API answered the last poll.
    pub broker_management_up: bool,
    /// Whether the manager's dead-letter consumer is attached.
    pub broker_connected: bool,
    /// Jobs in the store by status (every status present).
    pub job_counts: BTreeMap<String, u64>,
    pub throughput: Throughput,
    pub recent_jobs: Vec<JobRecord>,
    pub dead_letters: Vec<JobRecord>,
}

/// Gathers the overview from Redis, the store and the last queue poll.
pub async fn build_overview(state: &AppState) -> Result<Overview, ApiError> {
    let store = state.store();
    let recent_q = ListQuery {
        limit: 20,
        ..Default::default()
    };
    let dead_q = ListQuery {
        status: Some(JobStatus::DeadLettered),
        limit: 10,
        ..Default::default()
    };
    let (engines, counts, recent, dead) = tokio::join!(
        state.registry().all_views(),
        store.count_by_status(),
        store.list(&recent_q),
        store.list(&dead_q),
    );
    let engines = engines?;
    let counts = counts?;
    state.throughput().record(&counts);
    let queues = state.queues().snapshot();
    Ok(Overview {
        generated_at_ms: now_ms(),
        engines,
        queues: queues.queues,
        broker_management_up: queues.up,
        broker_connected: state.broker_connected(),
        job_counts: JobStatus::ALL
            .iter()
            .map(|s| (s.as_str().to_string(), counts.get(s).copied().unwrap_or(0)))
            .collect(),
        throughput: state.throughput().rate(),
        recent_jobs: recent?.jobs,
        dead_letters: dead?.jobs,
    })
}

/// Everything the status page shows, in one document.
#[utoipa::path(get, path = "/v1/overview", tag = "status",
    responses((status = 200, body = Overview), (status = 503, body = gpuq_common::http::ErrorBody)))]
pub async fn get_overview(State(state): State<AppState>) -> Result<Json<Overview>, ApiError> {
    Ok(Json(build_overview(&state).await?))
}

/// Server-Sent Events: an `overview` event every ~1.5 s (an `unavailable` event when a
/// dependency fails), with keep-alives; the stream ends when the manager shuts down.
#[utoipa::path(get, path = "/v1/events", tag = "status",
    responses((status = 200, description = "text/event-stream of `overview` events")))]
pub async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stop = state.shutdown_token();
    let ticks = futures_util::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::time::sleep(EVENT_INTERVAL).await;
        }
        let event = match build_overview(&state).await {
            Ok(o) => Event::default()
                .event("overview")
                .json_data(&o)
                .unwrap_or_else(|_| {
                    Event::default()
                        .event("unavailable")
                        .data("encoding failed")
                }),
            Err(e) => Event::default().event("unavailable").data(e.to_string()),
        };
        Some((Ok(event), (state, false)))
    });
    Sse::new(ticks.take_until(stop.cancelled_owned()))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}
