//! Metric names and families, once for every service. Prefix `gpuq_`, Prometheus naming rules,
//! and never a job id in a label. Each service builds the families it exports on its own registry.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 1 ms to 1 h: queue waits and GPU jobs span that range.
pub const JOB_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];
pub const HTTP_SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family gpuq defines: what a dashboard or an alert may query, with its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub name: String,
    pub kind: Kind,
    pub labels: Vec<String>,
}

/// Every family registered by this process so far, by name.
fn registered() -> &'static Mutex<BTreeMap<String, Family>> {
    static FAMILIES: OnceLock<Mutex<BTreeMap<String, Family>>> = OnceLock::new();
    FAMILIES.get_or_init(Default::default)
}

/// Registers `c` and notes its family for `catalog`.
fn register<C: Collector + Clone + 'static>(r: &Registry, c: C, kind: Kind) -> C {
    for desc in c.desc() {
        let family = Family {
            name: desc.fq_name.clone(),
            kind,
            labels: desc.variable_labels.clone(),
        };
        registered()
            .lock()
            .expect("metric catalog")
            .insert(family.name.clone(), family);
    }
    r.register(Box::new(c.clone())).expect("register");
    c
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help).expect("metric"), Kind::Gauge)
}
fn gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    register(r, Gauge::new(name, help).expect("metric"), Kind::Gauge)
}
fn int_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        r,
        IntCounter::new(name, help).expect("metric"),
        Kind::Counter,
    )
}
fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
    register(r, c, Kind::Counter)
}
fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("metric");
    register(r, g, Kind::Gauge)
}
fn int_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric");
    register(r, g, Kind::Gauge)
}
fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], b: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(b.to_vec()), labels)
        .expect("metric");
    register(r, h, Kind::Histogram)
}

/// Every metric family any gpuq service exports (built on a throwaway registry), sorted by name:
/// what dashboards and alerts are checked against.
pub fn catalog() -> Vec<Family> {
    let r = new_registry("catalog");
    HttpMetrics::new(&r);
    GatewayMetrics::new(&r);
    WorkerMetrics::new(&r);
    ManagerMetrics::new(&r);
    registered()
        .lock()
        .expect("metric catalog")
        .values()
        .cloned()
        .collect()
}

/// A registry with `gpuq_build_info` and the process collector (start time, RSS, CPU).
pub fn new_registry(service: &str) -> Registry {
    let r = Registry::new();
    let info = int_gauge_vec(
        &r,
        "gpuq_build_info",
        "Build of the running service; the value is always 1.",
        &["service", "version"],
    );
    info.with_label_values(&[service, env!("CARGO_PKG_VERSION")])
        .set(1);
    #[cfg(target_os = "linux")]
    {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        let _ = r.register(Box::new(pc));
    }
    r
}

/// Text exposition of a registry.
pub fn encode(r: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&r.gather(), &mut buf)
        .expect("encode metrics");
    String::from_utf8(buf).expect("utf8 metrics")
}

/// HTTP requests of any gpuq service, by matched route (never the raw URI).
#[derive(Clone)]
pub struct HttpMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
}

impl HttpMetrics {
    pub fn new(r: &Registry) -> Self {
        Self {
            requests: counter(
                r,
                "gpuq_http_requests_total",
                "HTTP requests by matched route, method and status code.",
                &["route", "method", "status"],
            ),
            duration: histogram(
                r,
                "gpuq_http_request_duration_seconds",
                "HTTP request latency by matched route and method.",
                &["route", "method"],
                HTTP_SECONDS_BUCKETS,
            ),
        }
    }
}

/// Gateway: submissions and the broker's confirms.
#[derive(Clone)]
pub struct GatewayMetrics {
    pub jobs_submitted: IntCounterVec,
    pub publish_failures: IntCounterVec,
    pub confirm_seconds: HistogramVec,
    pub idempotent_replays: IntCounterVec,
    pub tenant_submissions: IntCounterVec,
    pub job_events_streamed: IntCounter,
    pub event_streams_open: IntGauge,
}

impl GatewayMetrics {
    pub fn new(r: &Registry) -> Self {
        Self {
            jobs_submitted: counter(
                r,
                "gpuq_jobs_submitted_total",
                "Jobs accepted (confirmed by the broker) by pool and kind.",
                &["pool", "kind"],
            ),
            publish_failures: counter(
                r,
                "gpuq_publish_failures_total",
                "Publishes not confirmed by the broker, by reason.",
                &["reason"],
            ),
            confirm_seconds: histogram(
                r,
                "gpuq_publish_confirm_seconds",
                "Time from publish to the broker's confirm.",
                &["pool"],
                HTTP_SECONDS_BUCKETS,
            ),
            idempotent_replays: counter(
                r,
                "gpuq_idempotent_replays_total",
                "Submissions answered with an existing job because of their Idempotency-Key.",
                &["pool"],
            ),
            tenant_submissions: counter(
                r,
                "gpuq_tenant_submissions_total",
                "Submissions per tenant: accepted, or refused by its rate limit (rate) or its cap on unfinished jobs (max_queued).",
                &["tenant", "outcome"],
            ),
            job_events_streamed: int_counter(
                r,
                "gpuq_job_events_streamed_total",
                "Job events sent to clients over event streams.",
            ),
            event_streams_open: int_gauge(
                r,
                "gpuq_job_event_streams_open",
                "Job event streams (SSE) open now.",
            ),
        }
    }
}

/// Worker: the job path.
#[derive(Clone)]
pub struct WorkerMetrics {
    pub jobs_started: IntCounterVec,
    pub jobs_completed: IntCounterVec,
    pub job_duration: HistogramVec,
    pub job_overhead: HistogramVec,
    pub queue_wait: HistogramVec,
    pub redeliveries: IntCounterVec,
    pub duplicates_suppressed: IntCounterVec,
    pub results_discarded: IntCounterVec,
    pub given_back: IntCounterVec,
    pub lease_contended: IntCounterVec,
    pub lease_takeovers: IntCounterVec,
    pub leases_held: IntGauge,
    pub slots: IntGaugeVec,
    pub consuming: IntGauge,
    pub store_retries: IntCounterVec,
    pub redis_errors: IntCounterVec,
    pub tenant_quota_waits: IntCounterVec,
    pub events: WorkerEventMetrics,
}

/// Worker: the jobs' event logs.
#[derive(Clone)]
pub struct WorkerEventMetrics {
    pub written: IntCounter,
    pub dropped: IntCounter,
}

impl WorkerEventMetrics {
    fn new(r: &Registry) -> Self {
        Self {
            written: int_counter(
                r,
                "gpuq_job_events_written_total",
                "Job events (progress, output, attempts, notices) written to the jobs' logs.",
            ),
            dropped: int_counter(
                r,
                "gpuq_job_events_dropped_total",
                "Job events dropped for being over a job's bounds (rate, burst, per attempt).",
            ),
        }
    }
}

/// A counter by pool: most of the worker's are.
fn per_pool(r: &Registry, name: &str, help: &str) -> IntCounterVec {
    counter(r, name, help, &["pool"])
}

impl WorkerMetrics {
    pub fn new(r: &Registry) -> Self {
        let leases_held = int_gauge(r, "gpuq_leases_held", "Job leases this worker holds now.");
        let consuming = int_gauge(
            r,
            "gpuq_worker_consuming",
            "1 while the worker holds a consumer on its queues, 0 while gated.",
        );
        Self {
            jobs_started: counter(
                r,
                "gpuq_jobs_started_total",
                "Job attempts started on a GPU, by pool and kind.",
                &["pool", "kind"],
            ),
            jobs_completed: counter(
                r,
                "gpuq_jobs_completed_total",
                "Job attempts ended, by pool, kind and outcome (succeeded, failed, retried, cancelled).",
                &["pool", "kind", "outcome"],
            ),
            job_duration: histogram(
                r,
                "gpuq_job_duration_seconds",
                "Run time of job attempts.",
                &["pool", "kind"],
                JOB_SECONDS_BUCKETS,
            ),
            job_overhead: histogram(
                r,
                "gpuq_job_overhead_seconds",
                "Time a worker holds a delivery outside the job's run, by stage: start (delivery to run) and finish (run to ack).",
                &["pool", "stage"],
                HTTP_SECONDS_BUCKETS,
            ),
            queue_wait: histogram(
                r,
                "gpuq_job_queue_wait_seconds",
                "Time from submission to the start of a job's attempt.",
                &["pool"],
                JOB_SECONDS_BUCKETS,
            ),
            redeliveries: per_pool(
                r,
                "gpuq_redeliveries_total",
                "Deliveries the broker marked as redelivered.",
            ),
            duplicates_suppressed: per_pool(
                r,
                "gpuq_duplicates_suppressed_total",
                "Deliveries of already finished jobs, acked without running.",
            ),
            results_discarded: per_pool(
                r,
                "gpuq_results_discarded_total",
                "Runs that finished after another final result was stored: work done twice, recorded once.",
            ),
            given_back: counter(
                r,
                "gpuq_deliveries_given_back_total",
                "Deliveries put back on the queue without burning their delivery budget, by reason.",
                &["pool", "reason"],
            ),
            lease_contended: per_pool(
                r,
                "gpuq_lease_contended_total",
                "Deliveries whose job lease a live worker held; put back without burning the delivery budget.",
            ),
            lease_takeovers: per_pool(
                r,
                "gpuq_lease_takeovers_total",
                "Leases taken over from a worker whose heartbeat was gone.",
            ),
            leases_held,
            slots: int_gauge_vec(
                r,
                "gpuq_worker_gpu_slots",
                "This worker's GPUs by slot state (free, busy, unavailable).",
                &["state"],
            ),
            consuming,
            store_retries: counter(
                r,
                "gpuq_store_write_retries_total",
                "Result writes retried because the store failed.",
                &["op"],
            ),
            redis_errors: counter(
                r,
                "gpuq_redis_errors_total",
                "Redis commands that failed, by operation.",
                &["op"],
            ),
            tenant_quota_waits: counter(
                r,
                "gpuq_tenant_quota_waits_total",
                "Deliveries given back because their tenant ran its GPU quota, by tenant.",
                &["tenant"],
            ),
            events: WorkerEventMetrics::new(r),
        }
    }
}

/// Manager: jobs (and their logs) deleted by retention.
pub fn jobs_deleted(r: &Registry) -> IntCounter {
    int_counter(
        r,
        "gpuq_jobs_deleted_total",
        "Final jobs deleted, with their event logs, past GPUQ_RETENTION_DAYS.",
    )
}

/// Manager: the fleet, the queues, the dead letters.
#[derive(Clone)]
pub struct ManagerMetrics {
    pub dead_letters: IntCounterVec,
    pub dead_letters_unrecorded: IntCounterVec,
    pub engine_state: IntGaugeVec,
    pub engine_restarts: IntCounterVec,
    pub engine_running_jobs: IntGaugeVec,
    pub gpu_utilization: GaugeVec,
    pub gpu_memory_used: GaugeVec,
    pub gpu_memory_total: GaugeVec,
    pub gpu_temperature: GaugeVec,
    pub gpu_power: GaugeVec,
    pub gpu_health: IntGaugeVec,
    pub queue_messages: GaugeVec,
    pub queue_messages_ready: GaugeVec,
    pub queue_messages_unacked: GaugeVec,
    pub queue_consumers: GaugeVec,
    pub broker_up: Gauge,
}

impl ManagerMetrics {
    pub fn new(r: &Registry) -> Self {
        let broker_up = gauge(
            r,
            "gpuq_broker_management_up",
            "1 when the RabbitMQ management API answered the last poll.",
        );
        Self {
            dead_letters: counter(
                r,
                "gpuq_dead_letters_total",
                "Jobs dead-lettered, by reason (delivery_limit, expired, rejected, unschedulable, maxlen).",
                &["reason"],
            ),
            dead_letters_unrecorded: counter(
                r,
                "gpuq_dead_letters_unrecorded_total",
                "Dead letters acked without a record, logged for an operator: unreadable_message (no job id), corrupt_record (the job's stored record cannot be decoded), store_error.",
                &["cause"],
            ),
            engine_state: int_gauge_vec(
                r,
                "gpuq_engine_state",
                "1 for the state each engine is in, 0 for the others.",
                &["engine", "state"],
            ),
            engine_restarts: counter(
                r,
                "gpuq_engine_restarts_total",
                "Worker process restarts seen by the manager (a new instance id for an engine).",
                &["engine"],
            ),
            engine_running_jobs: int_gauge_vec(
                r,
                "gpuq_engine_running_jobs",
                "Jobs running on each engine.",
                &["engine"],
            ),
            gpu_utilization: gauge_vec(
                r,
                "gpuq_gpu_utilization_ratio",
                "GPU utilization in [0, 1].",
                &["engine", "gpu"],
            ),
            gpu_memory_used: gauge_vec(
                r,
                "gpuq_gpu_memory_used_bytes",
                "GPU memory in use.",
                &["engine", "gpu"],
            ),
            gpu_memory_total: gauge_vec(
                r,
                "gpuq_gpu_memory_total_bytes",
                "GPU memory in all.",
                &["engine", "gpu"],
            ),
            gpu_temperature: gauge_vec(
                r,
                "gpuq_gpu_temperature_celsius",
                "GPU temperature.",
                &["engine", "gpu"],
            ),
            gpu_power: gauge_vec(
                r,
                "gpuq_gpu_power_watts",
                "GPU power draw.",
                &["engine", "gpu"],
            ),
            gpu_health: int_gauge_vec(
                r,
                "gpuq_gpu_health",
                "1 for the health state each GPU is in, 0 for the others.",
                &["engine", "gpu", "state"],
            ),
            queue_messages: gauge_vec(
                r,
                "gpuq_queue_messages",
                "Messages in each queue (ready and unacknowledged).",
                &["queue"],
            ),
            queue_messages_ready: gauge_vec(
                r,
                "gpuq_queue_messages_ready",
                "Messages waiting for a consumer in each queue.",
                &["queue"],
            ),
            queue_messages_unacked: gauge_vec(
                r,
                "gpuq_queue_messages_unacked",
                "Messages delivered and not yet acknowledged in each queue.",
                &["queue"],
            ),
            queue_consumers: gauge_vec(
                r,
                "gpuq_queue_consumers",
                "Consumers of each queue.",
                &["queue"],
            ),
            broker_up,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_has_every_family_with_its_labels() {
        let families = catalog();
        let find = |name: &str| families.iter().find(|f| f.name == name).cloned();
        assert_eq!(
            find("gpuq_http_requests_total").map(|f| f.kind),
            Some(Kind::Counter)
        );
        let leases = find("gpuq_leases_held").expect("a plain gauge is listed");
        assert!(leases.labels.is_empty());
        assert!(families.iter().any(|f| f.kind == Kind::Histogram));
        assert!(families.iter().all(|f| f.name.starts_with("gpuq_")));
    }

    #[test]
    fn every_family_registers_once_and_follows_the_naming_rules() {
        let r = new_registry("test");
        HttpMetrics::new(&r);
        GatewayMetrics::new(&r);
        WorkerMetrics::new(&r)
            .jobs_started
            .with_label_values(&["default", "simulate"])
            .inc();
        ManagerMetrics::new(&r);
        let text = encode(&r);
        assert!(text.contains("gpuq_build_info{service=\"test\""));
        for family in r.gather() {
            let name = family.name();
            assert!(
                name.starts_with("gpuq_") || name.starts_with("process_"),
                "{name}"
            );
        }
    }
}
