//! The status page's data: one JSON overview of engines, queues, job counts, throughput and
//! recent jobs, served whole (`GET /v1/overview`) and pushed every ~1.5 s over Server-Sent
//! Events (`GET /v1/events`). One feed builds the overview for every stream (`Feed`, while at
//! least one client listens), so a thousand open pages cost one build per tick, not a thousand;
//! the number of streams is capped (`MAX_EVENT_CLIENTS`, then 503). Both need the read token
//! (or the admin token) and carry job summaries only (`JobSummary`: no params, env or result).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use futures_util::StreamExt;
use gpuq_common::JobSummary;
use gpuq_common::coord::CoordResult;
use gpuq_common::coord::registry::Registry;
use gpuq_common::engine::EngineView;
use gpuq_common::http::ApiError;
use gpuq_common::job::{JobStatus, now_ms};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::queues::QueueStats;
use crate::state::AppState;
use crate::throughput::Throughput;

/// How often the event stream sends a fresh overview.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(1500);
/// Event streams open at once; one more is answered 503.
pub const MAX_EVENT_CLIENTS: usize = 1000;

/// How often `EngineViews::run` reads the registry.
pub const VIEWS_REFRESH: Duration = Duration::from_millis(500);
/// An overview reads the registry itself when the last read is older than this.
const VIEWS_MAX_AGE: Duration = Duration::from_secs(2);

/// The engines as the overview shows them: read from Redis every `VIEWS_REFRESH` (and after an
/// operator's action) rather than per request. At 50 engines a registry read is 250 commands
/// whose answer waits for Redis to be scheduled; on a loaded host that took up to 200 ms while
/// the store's reads took 15, and a status page polled by many clients multiplied it.
#[derive(Default)]
pub struct EngineViews {
    latest: std::sync::RwLock<Option<(Instant, Arc<Vec<EngineView>>)>>,
}

impl EngineViews {
    /// Reads every engine's view from the registry and keeps it.
    pub async fn refresh(&self, registry: &Registry) -> CoordResult<Arc<Vec<EngineView>>> {
        let views = Arc::new(registry.all_views().await?);
        *self.latest.write().expect("engine views") = Some((Instant::now(), views.clone()));
        Ok(views)
    }

    /// The kept views, or fresh ones when they are older than `VIEWS_MAX_AGE`.
    pub async fn get(&self, registry: &Registry) -> CoordResult<Arc<Vec<EngineView>>> {
        let kept = self.latest.read().expect("engine views").clone();
        match kept {
            Some((at, views)) if at.elapsed() < VIEWS_MAX_AGE => Ok(views),
            _ => self.refresh(registry).await,
        }
    }

    /// Takes a heartbeat's view of a known engine when its state or a GPU's health changed (a
    /// change shows at once; fresh figures wait for the next refresh).
    pub fn observe(&self, view: &EngineView) {
        let mut latest = self.latest.write().expect("engine views");
        let Some((_, views)) = latest.as_mut() else {
            return;
        };
        let Some(i) = views.iter().position(|v| v.id == view.id) else {
            return;
        };
        let health = |v: &EngineView| -> Vec<_> {
            let gpus = v.heartbeat.iter().flat_map(|hb| &hb.gpus);
            gpus.map(|g| (g.index, g.health)).collect()
        };
        let kept = &views[i];
        if kept.state == view.state && health(kept) == health(view) {
            return;
        }
        let restart_requested = kept.restart_requested;
        let views = Arc::make_mut(views);
        views[i] = EngineView {
            restart_requested,
            ..view.clone()
        };
    }

    /// Refreshes the views every `VIEWS_REFRESH` until `stop`.
    pub async fn run(state: AppState, stop: CancellationToken) {
        loop {
            if let Err(e) = state.engine_views().refresh(state.registry()).await {
                tracing::debug!(error.message = %e, "engine views not refreshed");
            }
            tokio::select! {
                () = tokio::time::sleep(VIEWS_REFRESH) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// One tick of the feed: the overview's JSON, or why it could not be built.
pub type Tick = Arc<Result<String, String>>;

/// The overview every event stream shares: built once per tick while a stream listens.
pub struct Feed {
    latest: watch::Sender<Option<Tick>>,
    clients: Arc<Semaphore>,
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            latest: watch::channel(None).0,
            clients: Arc::new(Semaphore::new(MAX_EVENT_CLIENTS)),
        }
    }
}

impl Feed {
    /// Builds the overview every `EVENT_INTERVAL` while at least one stream listens, until
    /// `stop`.
    pub async fn run(state: AppState, stop: CancellationToken) {
        let feed = &state.0.feed;
        loop {
            if feed.latest.receiver_count() > 0 {
                let tick = match build_overview(&state).await {
                    Ok(o) => serde_json::to_string(&o).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                feed.latest.send_replace(Some(Arc::new(tick)));
            }
            tokio::select! {
                () = tokio::time::sleep(EVENT_INTERVAL) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

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
    /// Summaries only: no job's params, env or result leaves through the status views.
    pub recent_jobs: Vec<JobSummary>,
    pub dead_letters: Vec<JobSummary>,
}

/// Gathers the overview from Redis, the store and the last queue poll.
pub async fn build_overview(state: &AppState) -> Result<Overview, ApiError> {
    let (engines, view) = tokio::join!(
        state.engine_views().get(state.registry()),
        state.store().status_view(20, 10),
    );
    let engines = engines?;
    let view = view?;
    let counts = view.counts;
    state.throughput().record(&counts);
    let queues = state.queues().snapshot();
    Ok(Overview {
        generated_at_ms: now_ms(),
        engines: engines.as_ref().clone(),
        queues: queues.queues,
        broker_management_up: queues.up,
        broker_connected: state.broker_connected(),
        job_counts: JobStatus::ALL
            .iter()
            .map(|s| (s.as_str().to_string(), counts.get(s).copied().unwrap_or(0)))
            .collect(),
        throughput: state.throughput().rate(),
        recent_jobs: view.recent.iter().map(JobSummary::from).collect(),
        dead_letters: view.dead.iter().map(JobSummary::from).collect(),
    })
}

/// Everything the status page shows, in one document.
#[utoipa::path(get, path = "/v1/overview", tag = "status",
    security(("read_token" = []), ("admin_token" = [])),
    responses((status = 200, body = Overview), (status = 401, body = gpuq_common::http::ErrorBody),
              (status = 503, body = gpuq_common::http::ErrorBody)))]
pub async fn get_overview(State(state): State<AppState>) -> Result<Json<Overview>, ApiError> {
    Ok(Json(build_overview(&state).await?))
}

/// Server-Sent Events: an `overview` event every ~1.5 s (an `unavailable` event when a
/// dependency fails), with keep-alives; the stream ends when the manager shuts down. 503 when
/// `MAX_EVENT_CLIENTS` streams are open.
#[utoipa::path(get, path = "/v1/events", tag = "status",
    security(("read_token" = []), ("admin_token" = [])),
    responses((status = 200, description = "text/event-stream of `overview` events"),
              (status = 401, body = gpuq_common::http::ErrorBody),
              (status = 503, body = gpuq_common::http::ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let feed = &state.0.feed;
    let permit = feed.clients.clone().try_acquire_owned().map_err(|_| {
        ApiError::Unavailable(format!(
            "{MAX_EVENT_CLIENTS} event streams are open; retry later or poll /v1/overview"
        ))
    })?;
    let mut rx = feed.latest.subscribe();
    // A new stream starts with an overview of its own, not the previous tick's.
    let first = match build_overview(&state).await {
        Ok(o) => serde_json::to_string(&o).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    rx.mark_unchanged();
    let first = futures_util::stream::once(async move { Arc::new(first) });
    let next = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            let tick = rx.borrow_and_update().clone();
            if let Some(tick) = tick {
                return Some((tick, rx));
            }
        }
    });
    let stop = state.shutdown_token();
    let events = first.chain(next).map(move |tick: Tick| {
        let _held = &permit;
        Ok(match tick.as_ref() {
            Ok(json) => Event::default().event("overview").data(json),
            Err(why) => Event::default().event("unavailable").data(why),
        })
    });
    Ok(Sse::new(events.take_until(stop.cancelled_owned()))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10))))
}
