//! What the manager's handlers and loops share (`AppState`): the engine registry, the store,
//! metrics and gauges, the queue poller, the throughput tracker. `app` builds it; the handlers
//! (`api`, `overview`) read it from here, so no module needs `app`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gpuq_common::JobStore;
use gpuq_common::config::ManagerConfig;
use gpuq_common::metrics::{HttpMetrics, ManagerMetrics};
use tokio_util::sync::CancellationToken;

use crate::fleet::FleetGauges;
use crate::queues::QueuePoller;
use crate::throughput::ThroughputTracker;
use gpuq_common::coord::registry::Registry;

pub(crate) struct Inner {
    pub(crate) config: ManagerConfig,
    pub(crate) registry: Registry,
    pub(crate) store: Arc<dyn JobStore>,
    pub(crate) metrics: ManagerMetrics,
    pub(crate) prometheus: prometheus::Registry,
    pub(crate) http_metrics: Arc<HttpMetrics>,
    pub(crate) gauges: FleetGauges,
    pub(crate) queues: QueuePoller,
    pub(crate) throughput: ThroughputTracker,
    pub(crate) http: reqwest::Client,
    pub(crate) broker_connected: Arc<AtomicBool>,
    pub(crate) shutdown: CancellationToken,
    /// The overview every event stream shares.
    pub(crate) feed: crate::overview::Feed,
    /// The engines' views the overview shows.
    pub(crate) engine_views: crate::overview::EngineViews,
}

/// Shared state of every handler and loop; cheap to clone.
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Inner>);

impl AppState {
    pub fn config(&self) -> &ManagerConfig {
        &self.0.config
    }
    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }
    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.0.store
    }
    pub fn metrics(&self) -> &ManagerMetrics {
        &self.0.metrics
    }
    pub fn gauges(&self) -> &FleetGauges {
        &self.0.gauges
    }
    pub fn queues(&self) -> &QueuePoller {
        &self.0.queues
    }
    pub fn engine_views(&self) -> &crate::overview::EngineViews {
        &self.0.engine_views
    }
    pub fn throughput(&self) -> &ThroughputTracker {
        &self.0.throughput
    }
    pub fn http(&self) -> &reqwest::Client {
        &self.0.http
    }
    pub fn broker_connected(&self) -> bool {
        self.0.broker_connected.load(Ordering::Relaxed)
    }
    /// Cancelled when the manager shuts down (ends event streams).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.0.shutdown.clone()
    }
}
