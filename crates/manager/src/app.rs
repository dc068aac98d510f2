//! Startup and wiring: `Application::build` connects Redis and the store and binds the port;
//! `run_until_stopped` serves HTTP and runs the background loops (dead letters, fleet gauges,
//! queue polling) until the shutdown token is cancelled.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Json, Redirect, Response};
use axum::routing::{delete, get, post};
use gpuq_common::config::ManagerConfig;
use gpuq_common::coord::keys::Keys;
use gpuq_common::http::{Limits, serve, service_router};
use gpuq_common::metrics::{HttpMetrics, ManagerMetrics, new_registry};
use gpuq_common::tls::TlsAcceptor;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::OpenApi;

use crate::deadletters::DeadLetterConsumer;
use crate::fleet::FleetGauges;
use crate::queues::QueuePoller;
use crate::state::{AppState, Inner};
use crate::throughput::ThroughputTracker;
use crate::{api, auth, heartbeat, overview, ui};
use gpuq_common::coord::registry::Registry;
use gpuq_common::engine::EngineView;
use gpuq_common::job::now_ms;

/// Timings of the background loops (tests shorten them).
#[derive(Debug, Clone)]
pub struct Intervals {
    /// Re-deriving engine states and refreshing gauges.
    pub fleet_refresh: Duration,
    /// Polling the RabbitMQ management API.
    pub queue_poll: Duration,
}

impl Default for Intervals {
    fn default() -> Self {
        Self {
            fleet_refresh: Duration::from_secs(2),
            queue_poll: Duration::from_secs(5),
        }
    }
}

pub struct Application {
    listener: TcpListener,
    /// Present when the manager serves HTTPS (`GPUQ_TLS_CERT_FILE` and `GPUQ_TLS_KEY_FILE`).
    tls: Option<TlsAcceptor>,
    port: u16,
    state: AppState,
    intervals: Intervals,
}

impl Application {
    pub async fn build(config: ManagerConfig) -> anyhow::Result<Self> {
        Self::build_with(config, Intervals::default()).await
    }

    pub async fn build_with(config: ManagerConfig, intervals: Intervals) -> anyhow::Result<Self> {
        let common = &config.common;
        if config.admin_token.is_empty() {
            tracing::warn!("GPUQ_ADMIN_TOKEN is empty: admin actions will be refused");
        }
        if config.worker_secret.is_empty() {
            tracing::warn!("GPUQ_WORKER_SECRET is empty: every heartbeat will be refused");
        }
        let tls = common
            .tls
            .acceptor()
            .context("loading the HTTPS certificate")?;
        let store = gpuq_common::store::open(&common.store_url)
            .await
            .context("opening the job store")?;
        // Lazy: the manager starts (and reports not ready) while Redis is away.
        let registry = Registry::lazy(&common.redis_url, Keys::new(common.prefix()))
            .context("parsing GPUQ_REDIS_URL")?;
        let prometheus = new_registry("manager");
        let metrics = ManagerMetrics::new(&prometheus);
        // No redirects: a GPU fault is sent, with the admin token, to the admin URL the engine
        // registered with and nowhere else. https:// admin URLs: the process's trust.
        let http = gpuq_common::tls::http_client_builder()
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the HTTP client")?;
        let listener = TcpListener::bind(&config.bind)
            .await
            .with_context(|| format!("binding {}", config.bind))?;
        let port = listener.local_addr()?.port();
        let state = AppState(Arc::new(Inner {
            registry,
            store,
            gauges: FleetGauges::new(metrics.clone()),
            queues: QueuePoller::new(
                http.clone(),
                config.rabbitmq_mgmt_urls.clone(),
                common.prefix(),
                metrics.clone(),
            ),
            metrics,
            http_metrics: Arc::new(HttpMetrics::new(&prometheus)),
            prometheus,
            throughput: ThroughputTracker::default(),
            http,
            broker_connected: Arc::new(AtomicBool::new(false)),
            shutdown: CancellationToken::new(),
            feed: crate::overview::Feed::default(),
            engine_views: crate::overview::EngineViews::default(),
            config,
        }));
        Ok(Self {
            listener,
            tls,
            port,
            state,
            intervals,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Cancel it to stop the server and the loops (main wires it to SIGTERM / Ctrl-C).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown_token()
    }

    /// Serves until the shutdown token is cancelled, then stops the loops and waits for them.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            listener,
            tls,
            state,
            intervals,
            ..
        } = self;
        let token = state.shutdown_token();
        let tracker = TaskTracker::new();
        let c = state.config();
        let consumer = DeadLetterConsumer {
            amqp_urls: c.common.amqp_urls.clone(),
            topology: c.common.topology.clone(),
            pools: c.pools.clone(),
            store: state.store().clone(),
            metrics: state.metrics().clone(),
            connected: state.0.broker_connected.clone(),
            registry: state.registry().clone(),
        };
        tracker.spawn(consumer.run(token.child_token()));
        tracker.spawn(crate::overview::Feed::run(
            state.clone(),
            token.child_token(),
        ));
        tracker.spawn(crate::overview::EngineViews::run(
            state.clone(),
            token.child_token(),
        ));
        tracker.spawn(refresh_loop(
            state.clone(),
            intervals.fleet_refresh,
            token.child_token(),
        ));
        let poller_state = state.clone();
        let poll_token = token.child_token();
        tracker.spawn(async move {
            poller_state
                .queues()
                .run(intervals.queue_poll, poll_token)
                .await;
        });
        if let Some(retention) = c.retention {
            tracker.spawn(crate::retention::run(
                state.clone(),
                retention,
                token.child_token(),
            ));
        }
        tracker.close();

        tracing::info!(addr = %listener.local_addr()?, https = tls.is_some(), "manager listening");
        serve(
            listener,
            router(state),
            Limits::default(),
            tls,
            token.clone(),
        )
        .await;
        token.cancel();
        if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("background loops did not stop within 10 s");
        }
        tracing::info!("manager stopped");
        Ok(())
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gpuq manager",
        description = "Engine registry, fleet status and dead-letter bookkeeping"
    ),
    modifiers(&BearerSchemes),
    paths(
        heartbeat::post_heartbeat,
        heartbeat::goodbye,
        api::list_engines,
        api::get_engine,
        api::cordon,
        api::uncordon,
        api::drain,
        api::restart,
        api::gpu_fault,
        overview::get_overview,
        overview::events,
        crate::jobs::job_view,
        readyz,
    ),
    components(schemas(
        gpuq_common::engine::EngineView,
        gpuq_common::engine::Heartbeat,
        gpuq_common::engine::GpuSnapshot,
        gpuq_common::JobSummary,
        crate::jobs::JobView,
        gpuq_common::events::JobEvent,
        gpuq_common::events::EventKind,
        gpuq_common::events::Progress,
        gpuq_common::http::ErrorBody,
        heartbeat::HeartbeatAck,
        api::FaultRequest,
        gpuq_common::engine::GpuFault,
        overview::Overview,
        crate::queues::QueueStats,
    ))
)]
pub struct ApiDoc;

/// The bearer schemes the routes name: `admin_token` (operator actions and reads), `read_token`
/// (reads only), `worker_token` (a worker's own engine: hex HMAC-SHA256 of its id).
struct BearerSchemes;

impl utoipa::Modify for BearerSchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        for name in ["admin_token", "read_token", "worker_token"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
    }
}

/// Ready when the dead-letter consumer is attached and Redis and the store answer.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, description = "ready"), (status = 503, description = "a dependency is down")))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let (redis, store) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(2), state.registry().ping()),
        tokio::time::timeout(Duration::from_secs(2), state.store().ping()),
    );
    let broker = state.broker_connected();
    let redis = matches!(redis, Ok(Ok(())));
    let store = matches!(store, Ok(Ok(())));
    let ready = broker && redis && store;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": { "broker": broker, "redis": redis, "store": store },
    });
    (status, Json(body)).into_response()
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Every route of the manager, with request metrics and tracing by matched route. Every `/v1`
/// route but the heartbeats needs the read or the admin token (one layer, so a route added here
/// is closed by default); the heartbeats need the credential of the engine they name.
pub fn router(state: AppState) -> Router {
    let http_metrics = state.0.http_metrics.clone();
    let prometheus = state.0.prometheus.clone();
    let operators = Router::new()
        .route("/v1/engines", get(api::list_engines))
        .route("/v1/engines/{id}", get(api::get_engine))
        .route("/v1/engines/{id}/cordon", post(api::cordon))
        .route("/v1/engines/{id}/uncordon", post(api::uncordon))
        .route("/v1/engines/{id}/drain", post(api::drain))
        .route("/v1/engines/{id}/restart", post(api::restart))
        .route("/v1/engines/{id}/gpus/{gpu}/fault", post(api::gpu_fault))
        .route("/v1/overview", get(overview::get_overview))
        .route("/v1/events", get(overview::events))
        .route("/v1/jobs/{job}", get(crate::jobs::job_view))
        .route_layer(from_fn_with_state(state.clone(), auth::require_reader));
    let app = Router::new()
        .route("/v1/heartbeats", post(heartbeat::post_heartbeat))
        .route(
            "/v1/heartbeats/{engine}/{instance}",
            delete(heartbeat::goodbye),
        )
        .merge(operators)
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .route("/ui", get(ui::page))
        .route("/", get(|| async { Redirect::temporary("/ui") }))
        .with_state(state);
    service_router(app, prometheus, http_metrics)
}

/// Every `interval`: re-derives every engine's state (expired heartbeats → offline), refreshes the
/// gauges, and samples job counts for the throughput figure.
pub async fn refresh_loop(state: AppState, interval: Duration, token: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            _ = tick.tick() => {}
        }
        // The same read keeps the overview's copy of the engines fresh.
        let views = match state.engine_views().refresh(state.registry()).await {
            Ok(views) => forget_long_offline(&state, views.as_ref().clone()).await,
            Err(e) => Err(e),
        };
        let counts = state.store().count_by_status().await;
        match (&views, &counts) {
            (Ok(views), Ok(counts)) => {
                state.gauges().observe_all(views);
                state.throughput().record(counts);
                if failing {
                    tracing::info!("fleet refresh works again");
                }
                failing = false;
            }
            _ => {
                let message = match (views, counts) {
                    (Err(e), _) => format!("redis: {e}"),
                    (_, Err(e)) => format!("store: {e}"),
                    _ => unreachable!("one of them failed"),
                };
                if !failing {
                    tracing::warn!(error.message = %message, "fleet refresh failed");
                }
                failing = true;
            }
        }
    }
}

/// Drops the engines offline for longer than `engine_forget_after` from the registry and their
/// series from `/metrics`; answers the views of the others.
async fn forget_long_offline(
    state: &AppState,
    views: Vec<EngineView>,
) -> Result<Vec<EngineView>, gpuq_common::coord::CoordError> {
    let forget_after = state.config().engine_forget_after;
    let cutoff =
        now_ms().saturating_sub(i64::try_from(forget_after.as_millis()).unwrap_or(i64::MAX));
    let mut kept = Vec::with_capacity(views.len());
    for v in views {
        let gone = v.heartbeat.is_none() && v.last_seen_ms.unwrap_or(0) <= cutoff;
        if gone && state.registry().forget(&v.id, cutoff).await? {
            state.gauges().forget(&v.id);
            let _ = state
                .metrics()
                .engine_restarts
                .remove_label_values(&[&v.id]);
            tracing::info!(worker_id = %v.id, offline_for_s = forget_after.as_secs(), "engine forgotten: offline too long");
        } else {
            kept.push(v);
        }
    }
    Ok(kept)
}
