//! What the worker's tasks share: the job-side state (store, coordination, slots, GPUs, the
//! running jobs) and the control-plane state (operator intent, Redis and broker status, GPU
//! snapshot, shutdown and restart). `app` builds it; every other module reads it from here, so
//! no module needs `app`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use gpuq_common::JobStore;
use gpuq_common::config::WorkerConfig;
use gpuq_common::engine::{AdminState, GpuSnapshot};
use gpuq_common::metrics::{HttpMetrics, WorkerMetrics};
use gpuq_common::topology::Topology;
use prometheus::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::faults::Faults;
use crate::gpu::{GpuBackend, Thresholds};
use crate::runner::StopReason;
use crate::slots::Slots;
use gpuq_common::coord::lease::Coordinator;

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
    pub config: WorkerConfig,
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
    /// The box `command` jobs run in.
    pub sandbox: Arc<crate::sandbox::Sandbox>,
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
