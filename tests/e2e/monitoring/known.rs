//! What a dashboard or an alert may use: the metric families gpuq registers, the process and
//! RabbitMQ metrics, the labels the Prometheus configs attach, log fields, variables and alerts.

use super::*;

/// Metrics of the Rust prometheus crate's process collector (every gpuq service).
pub(super) const PROCESS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
];
/// Verified on the /metrics endpoint (aggregated) of RabbitMQ 3.10.8's prometheus plugin.
pub(super) const RABBITMQ: &[&str] = &[
    "rabbitmq_alarms_file_descriptor_limit",
    "rabbitmq_alarms_free_disk_space_watermark",
    "rabbitmq_alarms_memory_used_watermark",
    "rabbitmq_build_info",
    "rabbitmq_identity_info",
    "rabbitmq_channels",
    "rabbitmq_connections",
    "rabbitmq_consumers",
    "rabbitmq_queues",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers",
    "rabbitmq_global_consumers",
    "rabbitmq_global_publishers",
    "rabbitmq_global_messages_received_total",
    "rabbitmq_global_messages_routed_total",
    "rabbitmq_global_messages_confirmed_total",
    "rabbitmq_global_messages_delivered_total",
    "rabbitmq_global_messages_redelivered_total",
    "rabbitmq_global_messages_acknowledged_total",
    "rabbitmq_global_messages_dead_lettered_delivery_limit_total",
    "rabbitmq_global_messages_dead_lettered_expired_total",
    "rabbitmq_global_messages_dead_lettered_rejected_total",
    "rabbitmq_global_messages_dead_lettered_maxlen_total",
    "rabbitmq_global_messages_unroutable_dropped_total",
    "rabbitmq_global_messages_unroutable_returned_total",
    "rabbitmq_disk_space_available_bytes",
    "rabbitmq_process_resident_memory_bytes",
    "rabbitmq_resident_memory_limit_bytes",
    "rabbitmq_raft_term_total",
    "rabbitmq_erlang_uptime_seconds",
];
pub(super) const OTHER: &[&str] = &["up"];
/// Attached by the Prometheus configs.
pub(super) const TARGET_LABELS: &[&str] = &["job", "instance", "engine"];
pub(super) const JOBS: &[&str] = &["gpuq-gateway", "gpuq-manager", "gpuq-worker", "rabbitmq"];
/// Fields of gpuq's JSON log lines (crates/common/src/telemetry.rs) that LogQL may filter on.
pub(super) const LOG_FIELDS: &[&str] = &[
    "timestamp",
    "level",
    "service",
    "target",
    "message",
    "job_id",
    "worker_id",
];
pub(super) const ALLOWED_VARS: &[&str] = &[
    "__rate_interval",
    "__interval",
    "engine",
    "pool",
    "worker",
    "job_id",
];
pub(super) const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
];
pub(super) const ALERTS: &[&str] = &[
    "GpuqTargetDown",
    "GpuqEngineOffline",
    "GpuqGpuUnhealthy",
    "GpuqDeadLettersGrowing",
    "GpuqBacklogWithoutConsumers",
    "GpuqJobQueueWaitHigh",
    "GpuqWorkerRestarting",
];

/// What gpuq defines and what the Prometheus and Promtail configs attach.
pub(super) struct Known {
    /// Family name → its labels.
    pub(super) labels_of: BTreeMap<String, BTreeSet<String>>,
    pub(super) histograms: BTreeSet<String>,
    pub(super) stream_labels: BTreeSet<String>,
    pub(super) datasources: BTreeMap<String, String>,
}

impl Known {
    /// The families every gpuq service registers (`metrics::catalog`), with these Promtail
    /// labels and Grafana datasources.
    pub(super) fn of_catalog(
        stream_labels: BTreeSet<String>,
        datasources: BTreeMap<String, String>,
    ) -> Self {
        let families = catalog();
        Self {
            labels_of: families
                .iter()
                .map(|f| (f.name.clone(), f.labels.iter().cloned().collect()))
                .collect(),
            histograms: families
                .iter()
                .filter(|f| f.kind == Kind::Histogram)
                .map(|f| f.name.clone())
                .collect(),
            stream_labels,
            datasources,
        }
    }

    pub(super) fn defined(&self, name: &str) -> bool {
        self.labels_of.contains_key(name)
    }

    /// `x_bucket`, `x_sum`, `x_count` of a histogram `x`.
    pub(super) fn histogram_series(&self, name: &str) -> Option<String> {
        let base = re(r"_(bucket|sum|count)$").replace(name, "").into_owned();
        (base != name && self.histograms.contains(&base)).then_some(base)
    }
}
