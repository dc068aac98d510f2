//! What every handler shares: the store, the broker link, Redis, the tenants' keys and quotas,
//! metrics.

use std::sync::Arc;

use gpuq_common::config::GatewayConfig;
use gpuq_common::coord::keys::Keys;
use gpuq_common::metrics::{GatewayMetrics, HttpMetrics};
use gpuq_common::store::JobStore;
use prometheus::Registry;

use crate::broker::Broker;
use crate::quota::Quotas;
use gpuq_common::coord::idempotency::Idempotency;
use gpuq_common::coord::kv::Kv;

pub type SharedState = Arc<AppState>;

pub struct AppState {
    pub store: Arc<dyn JobStore>,
    pub broker: Broker,
    pub kv: Kv,
    pub idempotency: Idempotency,
    pub keys: Keys,
    /// The tenants' keys, rate limits and quotas.
    pub quotas: Arc<Quotas>,
    pub max_body_bytes: usize,
    /// How long a cancel signal stays in Redis: the longest a job may run.
    pub cancel_ttl_s: u64,
    pub registry: Registry,
    pub metrics: GatewayMetrics,
    /// Job event streams open now (`routes::events`).
    pub open_streams: std::sync::atomic::AtomicUsize,
    /// Wakes a job's event streams when a worker announces its log grew.
    pub bell: Arc<gpuq_common::coord::bell::Bell>,
    pub http_metrics: Arc<HttpMetrics>,
}

impl AppState {
    /// Wires the parts together; the metrics families are registered on a fresh registry.
    pub fn new(config: &GatewayConfig, store: Arc<dyn JobStore>, broker: Broker, kv: Kv) -> Self {
        let registry = gpuq_common::metrics::new_registry("gateway");
        let metrics = GatewayMetrics::new(&registry);
        let http_metrics = Arc::new(HttpMetrics::new(&registry));
        let keys = Keys::new(config.common.prefix());
        let idempotency = Idempotency::new(
            kv.clone(),
            keys.clone(),
            config.idempotency_ttl_s,
            broker.confirm_timeout(),
        );
        Self {
            store,
            broker,
            kv,
            idempotency,
            keys,
            quotas: Arc::new(Quotas::new(config.tenants.clone())),
            max_body_bytes: config.max_body_bytes,
            cancel_ttl_s: config.job_timeout_s.saturating_add(300),
            registry,
            metrics,
            open_streams: std::sync::atomic::AtomicUsize::new(0),
            bell: Arc::default(),
            http_metrics,
        }
    }
}
