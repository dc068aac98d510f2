//! The worker's lifecycle: build its state (`state.rs`), run the consumer, the GPU
//! monitor and the admin server, and stop them in order on shutdown.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use gpuq_common::config::WorkerConfig;
use gpuq_common::coord::keys::Keys;
use gpuq_common::http::{Limits, serve};
use gpuq_common::metrics::{HttpMetrics, WorkerMetrics, new_registry};
use gpuq_common::tls::TlsAcceptor;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::faults::Faults;
use crate::slots::Slots;
use crate::state::{Stats, Worker};
use gpuq_common::coord::lease::Coordinator;

/// Why the worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The caller's token (SIGTERM, Ctrl-C).
    Requested,
    /// The operator asked for a restart: the process should exit for its supervisor to start
    /// it again (`EXIT_RESTART`).
    Restart,
}

/// The exit code of a worker that stopped for a restart: non-zero so that supervisors which
/// restart only failed processes (`on-failure`) start it again too; 75 is `EX_TEMPFAIL`.
pub const EXIT_RESTART: i32 = 75;

pub struct Application {
    worker: Arc<Worker>,
    listener: TcpListener,
    /// Present when the admin API is served over HTTPS (`GPUQ_TLS_CERT_FILE`, `GPUQ_TLS_KEY_FILE`).
    tls: Option<TlsAcceptor>,
    port: u16,
}

impl Application {
    pub async fn build(config: WorkerConfig) -> anyhow::Result<Self> {
        let common = &config.common;
        let engine_id = config.name.clone();
        if !config.manager_url.is_empty() && config.worker_token.is_empty() {
            tracing::warn!(worker_id = %engine_id, "GPUQ_WORKER_TOKEN is empty: the manager will refuse this engine's heartbeats (gpuq admin worker-token ENGINE_ID makes one)");
        }
        let tls = common
            .tls
            .acceptor()
            .context("loading the HTTPS certificate")?;
        let instance_id = format!("{engine_id}-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let gpus = crate::gpu::detect(&config).context("detecting GPUs")?;
        tracing::info!(worker_id = %engine_id, backend = gpus.kind(), gpus = gpus.count(), "GPUs ready");
        let readings = {
            let g = gpus.clone();
            tokio::task::spawn_blocking(move || g.sample()).await?
        };
        let slots = Slots::new(
            &readings
                .iter()
                .map(|r| (r.index, r.memory_total_mb))
                .collect::<Vec<_>>(),
        );
        let store = gpuq_common::store::open(&common.store_url)
            .await
            .context("opening the store")?;
        let keys = Keys::new(common.prefix());
        let coord = Coordinator::connect(
            &common.redis_url,
            keys,
            instance_id.clone(),
            config.lease_ttl_ms,
        )
        .await
        .context("connecting to Redis")?;
        let registry = new_registry("worker");
        let metrics = WorkerMetrics::new(&registry);
        let http_metrics = Arc::new(HttpMetrics::new(&registry));
        let listener = TcpListener::bind(&config.bind)
            .await
            .with_context(|| format!("binding {}", config.bind))?;
        let port = listener.local_addr()?.port();
        let programs = Arc::new(config.programs.clone());
        crate::sandbox::harden_self();
        let sandbox = Arc::new(crate::sandbox::Sandbox::start(
            &config.job_sandbox,
            &engine_id,
        ));
        let worker = Arc::new(Worker {
            engine_id,
            instance_id,
            pools: config.pools.clone(),
            topology: common.topology.clone(),
            thresholds: config.thresholds,
            faults: Faults::new(config.fault_injection),
            store,
            coord,
            slots,
            gpus,
            metrics,
            http_metrics,
            registry,
            programs,
            sandbox,
            running: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            snapshot: Mutex::new(Vec::new()),
            admin: watch::channel(None).0,
            redis_ok: watch::channel(true).0,
            consuming: AtomicBool::new(false),
            broker_connected: AtomicBool::new(false),
            started_at_ms: gpuq_common::job::now_ms(),
            // Heartbeats to an https:// manager: the process's trust.
            http: gpuq_common::tls::http_client_builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            shutdown: CancellationToken::new(),
            restart: CancellationToken::new(),
            config,
        });
        Ok(Self {
            worker,
            listener,
            tls,
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn worker(&self) -> Arc<Worker> {
        self.worker.clone()
    }

    /// Runs until `stop` is cancelled or the operator asks for a restart, then drains: no new
    /// deliveries, in-flight jobs get the grace period, the rest go back to the queue,
    /// connections close cleanly.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> anyhow::Result<Stopped> {
        let w = self.worker;
        let tracker = TaskTracker::new();
        let _ = w.coord.refresh_alive().await;
        tracker.spawn(crate::monitor::run(w.clone()));
        let consumer = tracker.spawn(crate::consumer::run(w.clone()));
        let router = crate::admin::router(w.clone());
        let http_stop = w.shutdown.clone();
        let tls = self.tls;
        tracker.spawn(serve(
            self.listener,
            router,
            Limits::default(),
            tls,
            http_stop,
        ));
        tracing::info!(worker_id = %w.engine_id, instance = %w.instance_id, port = self.port, "worker running");
        let why = tokio::select! {
            _ = stop.cancelled() => Stopped::Requested,
            _ = w.restart.cancelled() => Stopped::Restart,
        };
        tracing::info!(worker_id = %w.engine_id, reason = ?why, "stopping: no new jobs, draining in-flight ones");
        w.shutdown.cancel();
        let _ = consumer.await;
        tracker.close();
        tracker.wait().await;
        w.sandbox.close();
        crate::monitor::goodbye(&w).await;
        let _ = w.coord.forget_alive().await;
        if why == Stopped::Restart {
            let _ = w.coord.clear_restart(&w.engine_id).await;
        }
        tracing::info!(worker_id = %w.engine_id, reason = ?why, "stopped");
        Ok(why)
    }
}
