//! The worker's state and lifecycle: build everything it needs, run the consumer, the GPU
//! monitor and the admin server, and stop them in order on shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use gpuq_common::engine::{AdminState, GpuSnapshot};
use gpuq_common::keys::Keys;
use gpuq_common::metrics::{HttpMetrics, WorkerMetrics, new_registry};
use gpuq_common::redis_conn;
use gpuq_common::topology::Topology;
use gpuq_common::{JobStore, Settings};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::faults::Faults;
use crate::gpu::{GpuBackend, Thresholds};
use crate::lease::Coordinator;
use crate::runner::StopReason;
use crate::slots::Slots;

/// A job running here, and how to stop it.
pub struct Running {
    pub stop: watch::Sender<Option<StopReason>>,
    pub gpus: Vec<u32>,
    pub started: Instant,
    pub pool: String,
}

#[derive(Default)]
pub struct Stats {
    pub processed: AtomicU64,
    pub failed: AtomicU64,
    pub total_ms: AtomicU64,
}

/// Everything the worker's tasks share.
pub struct Worker {
    pub settings: Settings,
    pub engine_id: String,
    /// One per process start; owner of this process's leases.
    pub instance_id: String,
    pub pools: Vec<String>,
    pub topology: Topology,
    pub store: Arc<dyn JobStore>,
    pub coord: Coordinator,
    pub slots: Slots,
    pub gpus: Arc<dyn GpuBackend>,
    pub thresholds: Thresholds,
    pub faults: Faults,
    pub metrics: WorkerMetrics,
    pub http_metrics: Arc<HttpMetrics>,
    pub registry: Registry,
    pub programs: Arc<BTreeMap<String, String>>,
    pub running: Mutex<HashMap<Uuid, Running>>,
    pub stats: Stats,
    pub snapshot: Mutex<Vec<GpuSnapshot>>,
    /// Operator intent from the manager (cordon/drain).
    pub admin: watch::Sender<Option<AdminState>>,
    /// False while Redis does not answer: no job may start without its lease.
    pub redis_ok: watch::Sender<bool>,
    pub consuming: AtomicBool,
    pub broker_connected: AtomicBool,
    pub started_at_ms: i64,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    /// Cancelled when the operator asked this process to restart (through the manager).
    pub restart: CancellationToken,
}

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

impl Worker {
    pub fn running_jobs(&self) -> Vec<Uuid> {
        self.running
            .lock()
            .expect("running")
            .keys()
            .copied()
            .collect()
    }

    /// Asks every running job (or those given) to stop.
    pub fn stop_jobs(&self, jobs: Option<&[Uuid]>, reason: StopReason) {
        for (id, r) in self.running.lock().expect("running").iter() {
            if jobs.is_none_or(|j| j.contains(id)) {
                let _ = r.stop.send(Some(reason));
            }
        }
    }
}

pub struct Application {
    worker: Arc<Worker>,
    listener: TcpListener,
    port: u16,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let engine_id = settings.worker_name();
        let instance_id = format!("{engine_id}-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let gpus = crate::gpu::detect(&settings).context("detecting GPUs")?;
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
        let store = gpuq_common::store::open(&settings.store_url)
            .await
            .context("opening the store")?;
        let conn = redis_conn::connect(
            &settings.redis_url,
            redis_conn::config(Duration::from_secs(2), 1),
        )
        .await
        .context("connecting to Redis")?;
        let keys = Keys::new(&settings.queue_prefix);
        let coord = Coordinator::new(conn, keys, instance_id.clone(), settings.lease_ttl_ms);
        let registry = new_registry("worker");
        let metrics = WorkerMetrics::new(&registry);
        let http_metrics = Arc::new(HttpMetrics::new(&registry));
        let listener = TcpListener::bind(&settings.worker_bind)
            .await
            .with_context(|| format!("binding {}", settings.worker_bind))?;
        let port = listener.local_addr()?.port();
        let programs = Arc::new(settings.program_map().map_err(anyhow::Error::msg)?);
        let worker = Arc::new(Worker {
            engine_id,
            instance_id,
            pools: settings.worker_pool_list(),
            topology: Topology::from_settings(&settings),
            thresholds: Thresholds::from_settings(&settings),
            faults: Faults::new(settings.fault_injection),
            store,
            coord,
            slots,
            gpus,
            metrics,
            http_metrics,
            registry,
            programs,
            running: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            snapshot: Mutex::new(Vec::new()),
            admin: watch::channel(None).0,
            redis_ok: watch::channel(true).0,
            consuming: AtomicBool::new(false),
            broker_connected: AtomicBool::new(false),
            started_at_ms: gpuq_common::job::now_ms(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            shutdown: CancellationToken::new(),
            restart: CancellationToken::new(),
            settings,
        });
        Ok(Self {
            worker,
            listener,
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
        tracker.spawn(async move {
            let served = axum::serve(self.listener, router)
                .with_graceful_shutdown(async move { http_stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error.message = %e, "admin server failed");
            }
        });
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
        let _ = w.coord.forget_alive().await;
        if why == Stopped::Restart {
            let _ = w.coord.clear_restart(&w.engine_id).await;
        }
        tracing::info!(worker_id = %w.engine_id, reason = ?why, "stopped");
        Ok(why)
    }
}

/// Consumers may run only when this is true.
pub fn gate_open(w: &Worker) -> bool {
    !w.shutdown.is_cancelled()
        && *w.redis_ok.borrow()
        && w.admin.borrow().is_none()
        && w.slots.capacity().schedulable > 0
}

/// Records an attempt's run time in the status-line stats.
pub fn record_run(w: &Worker, ms: u64, failed: bool) {
    w.stats.processed.fetch_add(1, Ordering::Relaxed);
    w.stats.total_ms.fetch_add(ms, Ordering::Relaxed);
    if failed {
        w.stats.failed.fetch_add(1, Ordering::Relaxed);
    }
}
