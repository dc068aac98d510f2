//! Building and running the gateway: open the store, start the broker supervisor, prepare Redis,
//! bind (port 0 works), serve until told to stop, then drain requests and close the broker
//! connection cleanly.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gpuq_common::config::GatewayConfig;
use gpuq_common::http::{Limits, serve};
use gpuq_common::tls::TlsAcceptor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::routes::router;
use crate::state::{AppState, SharedState};
use gpuq_common::coord::kv::Kv;

/// How long `build` waits for a first broker link before serving anyway (`/readyz` tells).
const FIRST_LINK_WAIT: Duration = Duration::from_secs(10);

pub struct Application {
    port: u16,
    listener: TcpListener,
    /// Present when the gateway serves HTTPS (`GPUQ_TLS_CERT_FILE` and `GPUQ_TLS_KEY_FILE`).
    tls: Option<TlsAcceptor>,
    state: SharedState,
    shutdown: CancellationToken,
    broker_stop: CancellationToken,
    tracker: TaskTracker,
}

impl Application {
    pub async fn build(config: GatewayConfig) -> anyhow::Result<Self> {
        let common = &config.common;
        let tls = common
            .tls
            .acceptor()
            .context("loading the HTTPS certificate")?;
        let store = gpuq_common::store::open(&common.store_url)
            .await
            .context("opening the store")?;
        let kv = Kv::lazy(&common.redis_url).context("preparing the Redis connection")?;
        let tracker = TaskTracker::new();
        let broker_stop = CancellationToken::new();
        let broker = Broker::start(
            common.amqp_urls.clone(),
            common.topology.clone(),
            config.confirm_timeout,
            broker_stop.clone(),
            &tracker,
        );
        if config.tenants.is_empty() {
            tracing::warn!("GPUQ_API_KEYS is empty: every /v1 request will be refused with 401");
        }
        let listener = TcpListener::bind(&config.bind)
            .await
            .with_context(|| format!("binding {}", config.bind))?;
        let port = listener
            .local_addr()
            .context("reading the bound port")?
            .port();
        if !broker.wait_connected(FIRST_LINK_WAIT).await {
            tracing::warn!("no broker node answered yet; serving anyway, /readyz reports it");
        }
        let state = Arc::new(AppState::new(&config, store, broker, kv));
        tracker.spawn(state.bell.clone().listen(
            common.redis_url.clone(),
            state.keys.clone(),
            broker_stop.clone(),
        ));
        // Counting unfinished jobs costs a store query a second: only when some tenant is capped.
        if state.quotas.tenants().caps_unfinished() {
            tracker.spawn(
                state
                    .quotas
                    .clone()
                    .refresh_loop(state.store.clone(), broker_stop.clone()),
            );
        }
        Ok(Self {
            port,
            listener,
            tls,
            state,
            shutdown: CancellationToken::new(),
            broker_stop,
            tracker,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The state the routes share (tests read the store and the broker link through it).
    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// Cancel it to stop the gateway gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled: stops accepting, lets in-flight requests
    /// finish, then closes the broker connection with `200 OK`.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        tracing::info!(
            port = self.port,
            https = self.tls.is_some(),
            "gateway listening"
        );
        let app = router(self.state.clone());
        let stop = self.shutdown.clone();
        serve(self.listener, app, Limits::default(), self.tls, stop).await;
        tracing::info!("HTTP drained; closing the broker connection");
        self.broker_stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        Ok(())
    }
}
