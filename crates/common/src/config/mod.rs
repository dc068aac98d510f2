//! Configuration: defaults in code, overridden by a TOML file (`GPUQ_CONFIG`), overridden by
//! `GPUQ_*` environment variables. One flat `Settings` is the schema of both, so one `.env` can
//! feed a whole deployment; `sections` parses it once into each service's typed section, and
//! `startup` is how every service's `main` loads it.

mod sections;
pub mod startup;

pub use sections::{
    Common, GatewayConfig, GpuSource, GpuThresholds, JobSandboxConfig, LogFormat, MAX_SIM_GPUS,
    ManagerConfig, ServiceConfig, TlsSettings, WorkerConfig,
};

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Environment variables read by clients (the CLI, tests), not by services. They are accepted
/// next to `Settings` fields so that one shell can hold both.
pub const CLIENT_ENV_KEYS: &[&str] = &[
    "GPUQ_CONFIG",
    "GPUQ_GATEWAY_URL",
    "GPUQ_API_KEY",
    "GPUQ_API_KEY_2",
    "GPUQ_WORKER_URLS",
    "GPUQ_BIN_DIR",
    "GPUQ_TEST_AMQP_URLS",
    "GPUQ_TEST_REDIS_URL",
    "GPUQ_TEST_MONGODB_URL",
    "GPUQ_TEST_STACK_SCRIPT",
    "GPUQ_TEST_TLS_CA",
    "GPUQ_TEST_AMQPS_URLS",
    "GPUQ_TEST_REDISS_URL",
    "GPUQ_STACK_SCRIPT",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Toml {
        path: String,
        source: toml::de::Error,
    },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: &str, message: &str) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A string that never reaches a log line.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// Every setting of every service, with its default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    // --- shared ---
    /// Every RabbitMQ node, comma separated; services connect to any that answers.
    pub amqp_urls: String,
    pub redis_url: String,
    /// `sqlite://path[?synchronous=normal]` (embedded) or `mongodb://…` (MongoDB).
    pub store_url: String,
    /// Prefix of every queue, exchange and Redis key, so tests can share one cluster.
    pub queue_prefix: String,
    /// Returns (failed or lost deliveries) a job may have; the next dead-letters it
    /// (`x-delivery-limit`: a limit of 5 allows 6 attempts).
    pub delivery_limit: u32,
    /// Default time a job may wait in its queue before it is dead-lettered as `expired`.
    pub queue_ttl_s: u64,
    /// Queue length past which publishes are refused (`x-overflow: reject-publish`).
    pub max_queue_length: u64,
    /// The gateway's /v1 keys, comma separated: `TENANT:ROLE:KEY`, `TENANT:ROLE:sha256:HEX`, or a
    /// bare `KEY` (the `default` tenant's admin key); see `tenancy`.
    pub api_keys: Secret,
    /// Per-tenant rate limits and quotas: `TENANT:rate=R:burst=B:max_queued=Q:max_gpus=G`, comma
    /// separated, `*` for every tenant's defaults; see `tenancy`.
    pub tenant_limits: String,
    /// Token for admin endpoints (worker faults, engine cordon/drain); also reads the manager.
    pub admin_token: Secret,
    /// Operator read token: the manager's `/v1` reads (engines, overview, events), no actions.
    pub read_token: Secret,
    /// The manager's fleet secret: a worker's credential is HMAC-SHA256(secret, engine id).
    pub worker_secret: Secret,
    /// A worker's credential for its heartbeats (`gpuq admin worker-token ENGINE_ID`).
    pub worker_token: Secret,
    /// `json` (Loki) or `pretty` (a terminal).
    pub log_format: String,
    /// tracing filter, e.g. `info,gpuq_worker=debug`.
    pub log: String,
    /// The service's HTTPS certificate chain and private key (PEM files): with both set it
    /// serves HTTPS instead of HTTP.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// A CA certificate file (PEM) outgoing TLS connections trust besides the system's roots:
    /// `amqps://`, `rediss://`, MongoDB with `tls=true`, `https://` manager and worker URLs.
    pub tls_ca_file: String,

    // --- gateway ---
    pub gateway_bind: String,
    pub max_body_bytes: usize,
    /// How long the gateway waits for the broker's publisher confirm before answering 503.
    pub confirm_timeout_ms: u64,
    pub idempotency_ttl_s: u64,

    // --- worker ---
    /// Stable name of the engine (one per worker process slot, e.g. `worker-1`).
    pub worker_id: String,
    pub worker_bind: String,
    /// URL the manager and the CLI use to reach this worker's admin API (default: from the bind).
    pub worker_advertise_url: String,
    /// Pools this worker consumes, comma separated (`gpuq.jobs.<pool>`).
    pub worker_pools: String,
    /// `auto` (NVML when it initialises, else simulated), `nvml`, or `sim:N`.
    pub gpus: String,
    /// Memory of each simulated GPU.
    pub sim_gpu_memory_mb: u64,
    /// Enables `POST /admin/faults` on the worker (tests, the tester, demos).
    pub fault_injection: bool,
    pub lease_ttl_ms: u64,
    /// A job still running after this long gets its `running` record in the store; a shorter
    /// one is written once, with its final result (one store write per job instead of two).
    pub running_record_delay_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub shutdown_grace_s: u64,
    /// Programs `command` jobs may run: `name=/abs/path` pairs, comma separated.
    pub programs: String,
    /// Bytes of stdout/stderr kept with a command job's result.
    pub output_tail_bytes: usize,
    /// Upper bound for any job's run time; a job's own `timeout_s` may be shorter.
    pub job_timeout_s: u64,
    /// The unprivileged user `command` jobs run as (`worker::sandbox`); empty runs them as the
    /// worker's own user (a single-user machine only: the worker says so at start).
    pub job_user: String,
    /// Where each attempt of a `command` job gets its private working directory (default: the
    /// system's temporary directory, `gpuq-jobs`).
    pub job_dir: String,
    /// Per-job resource limits: open files, processes of the job user, bytes of one file
    /// written (MiB), address space (MiB); 0 = no limit.
    pub job_max_open_files: u64,
    pub job_max_processes: u64,
    pub job_max_file_mb: u64,
    pub job_memory_mb: u64,
    /// Kill an engine that printed nothing for this long (0 = never).
    pub progress_timeout_s: u64,
    /// Interval of the worker's status log line.
    pub status_interval_s: u64,
    pub manager_url: String,
    /// Let a GPU that turns unhealthy finish its running job (else the job is stopped and requeued).
    pub finish_on_unhealthy: bool,
    pub gpu_temp_degraded_c: u32,
    pub gpu_temp_unhealthy_c: u32,
    pub gpu_memory_degraded_pct: u32,
    pub gpu_ecc_unhealthy: u64,

    // --- manager ---
    pub manager_bind: String,
    /// RabbitMQ management API base URLs (with credentials), comma separated: queue depths.
    pub rabbitmq_mgmt_urls: String,
    /// Heartbeats missed before an engine counts as offline.
    pub engine_offline_after_heartbeats: u32,
    /// An engine offline this long is dropped from the registry and from `/metrics`.
    pub engine_forget_after_s: u64,
    /// Final jobs submitted longer ago than this (days, fractions allowed) are deleted, with
    /// their event logs, by the manager; 0 keeps them forever.
    pub retention_days: f64,
    /// Jobs retention deletes in one store write, and the pause between two such writes: the
    /// store's other writers wait behind one batch at most.
    pub retention_batch: u32,
    pub retention_pause_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            amqp_urls: "amqp://guest:guest@127.0.0.1:5672/%2f,amqp://guest:guest@127.0.0.1:5673/%2f,amqp://guest:guest@127.0.0.1:5674/%2f".into(),
            redis_url: "redis://127.0.0.1:6379/0".into(),
            store_url: "sqlite://gpuq.db".into(),
            queue_prefix: "gpuq".into(),
            delivery_limit: 5,
            queue_ttl_s: 24 * 3600,
            max_queue_length: 1_000_000,
            api_keys: Secret::default(),
            tenant_limits: String::new(),
            admin_token: Secret::default(),
            read_token: Secret::default(),
            worker_secret: Secret::default(),
            worker_token: Secret::default(),
            log_format: "json".into(),
            log: "info".into(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_ca_file: String::new(),
            gateway_bind: "0.0.0.0:8080".into(),
            max_body_bytes: 64 * 1024,
            confirm_timeout_ms: 5000,
            idempotency_ttl_s: 24 * 3600,
            worker_id: String::new(),
            worker_bind: "0.0.0.0:9001".into(),
            worker_advertise_url: String::new(),
            worker_pools: "default".into(),
            gpus: "auto".into(),
            sim_gpu_memory_mb: 24 * 1024,
            fault_injection: false,
            lease_ttl_ms: 30_000,
            running_record_delay_ms: 100,
            heartbeat_interval_ms: 2000,
            shutdown_grace_s: 30,
            programs: String::new(),
            output_tail_bytes: 4096,
            job_timeout_s: 24 * 3600,
            job_user: "gpuq-job".into(),
            job_dir: String::new(),
            job_max_open_files: 4096,
            job_max_processes: 4096,
            job_max_file_mb: 0,
            job_memory_mb: 0,
            progress_timeout_s: 0,
            status_interval_s: 10,
            manager_url: String::new(),
            finish_on_unhealthy: true,
            gpu_temp_degraded_c: 83,
            gpu_temp_unhealthy_c: 92,
            gpu_memory_degraded_pct: 98,
            gpu_ecc_unhealthy: 1,
            manager_bind: "0.0.0.0:8090".into(),
            rabbitmq_mgmt_urls: "http://guest:guest@127.0.0.1:15672,http://guest:guest@127.0.0.1:15673,http://guest:guest@127.0.0.1:15674".into(),
            engine_offline_after_heartbeats: 3,
            engine_forget_after_s: 24 * 3600,
            retention_days: 30.0,
            retention_batch: 200,
            retention_pause_ms: 150,
        }
    }
}

impl Settings {
    /// Defaults, then the file named by `GPUQ_CONFIG` (if any), then `GPUQ_*` variables.
    pub fn load() -> Result<Self, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Self::from_sources(&env)
    }

    /// The same layering from an explicit environment (tests, compose validation).
    pub fn from_sources(env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let mut merged = serde_json::to_value(Self::default()).expect("settings serialize");
        let map = merged.as_object_mut().expect("settings are an object");
        if let Some(path) = env.get("GPUQ_CONFIG").filter(|p| !p.is_empty()) {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let table: toml::Table = toml::from_str(&text).map_err(|source| ConfigError::Toml {
                path: path.clone(),
                source,
            })?;
            for (key, value) in table {
                let value = serde_json::to_value(value).map_err(|e| ConfigError::Invalid {
                    key: key.clone(),
                    message: e.to_string(),
                })?;
                map.insert(key, value);
            }
        }
        for (name, raw) in env {
            let Some(key) = name.strip_prefix("GPUQ_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            let Some(default) = map.get(&key) else {
                continue;
            };
            let value = coerce(default, raw).ok_or_else(|| ConfigError::Invalid {
                key: name.clone(),
                message: format!("cannot read {raw:?} as {}", type_name(default)),
            })?;
            map.insert(key, value);
        }
        let settings: Self = serde_json::from_value(merged).map_err(|e| ConfigError::Invalid {
            key: "config".into(),
            message: e.to_string(),
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// `GPUQ_*` names in `env` that no service and no client reads: likely typos.
    pub fn unknown_env_keys<'a>(env: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        let known = serde_json::to_value(Self::default()).expect("settings serialize");
        let known = known.as_object().expect("object");
        env.into_iter()
            .filter(|k| k.starts_with("GPUQ_"))
            // The suites' environment (scripts/test.sh), which spawned services inherit.
            .filter(|k| !k.starts_with("GPUQ_TEST_"))
            .filter(|k| !CLIENT_ENV_KEYS.contains(&k.as_str()))
            .filter(|k| !known.contains_key(&k["GPUQ_".len()..].to_ascii_lowercase()))
            .cloned()
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = ConfigError::invalid;
        if self.amqp_url_list().is_empty() {
            return Err(invalid("amqp_urls", "names no broker"));
        }
        if self.queue_prefix.is_empty()
            || !self
                .queue_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "queue_prefix",
                "use letters, digits, '-', '_', '.'",
            ));
        }
        if self.delivery_limit == 0 {
            return Err(invalid("delivery_limit", "must be at least 1"));
        }
        if !(self.store_url.starts_with("sqlite://") || self.store_url.starts_with("mongodb")) {
            return Err(invalid("store_url", "use sqlite://PATH or mongodb://…"));
        }
        if self.worker_pool_list().is_empty() {
            return Err(invalid("worker_pools", "names no pool"));
        }
        for pool in self.worker_pool_list() {
            crate::job::validate_pool(&pool).map_err(|m| invalid("worker_pools", &m))?;
        }
        if self.tls_cert_file.trim().is_empty() != self.tls_key_file.trim().is_empty() {
            return Err(invalid(
                "tls_cert_file/tls_key_file",
                "set both (HTTPS) or neither (HTTP)",
            ));
        }
        if self.lease_ttl_ms < 1000 || self.heartbeat_interval_ms == 0 {
            return Err(invalid("lease_ttl_ms", "at least 1000, heartbeat above 0"));
        }
        Ok(())
    }

    pub fn amqp_url_list(&self) -> Vec<String> {
        split_list(&self.amqp_urls)
    }
    pub fn worker_pool_list(&self) -> Vec<String> {
        split_list(&self.worker_pools)
    }
    pub fn rabbitmq_mgmt_url_list(&self) -> Vec<String> {
        split_list(&self.rabbitmq_mgmt_urls)
    }
    pub fn api_key_list(&self) -> Vec<Secret> {
        split_list(self.api_keys.expose())
            .into_iter()
            .map(Secret::new)
            .collect()
    }

    /// The allow-list of `command` programs: name → absolute path.
    pub fn program_map(&self) -> Result<BTreeMap<String, String>, String> {
        let mut out = BTreeMap::new();
        for pair in split_list(&self.programs) {
            let (name, path) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not name=/path"))?;
            if !path.starts_with('/') {
                return Err(format!("{name}: {path:?} is not an absolute path"));
            }
            out.insert(name.trim().to_string(), path.trim().to_string());
        }
        Ok(out)
    }

    /// The worker's admin URL as others should call it.
    pub fn worker_admin_url(&self) -> String {
        if !self.worker_advertise_url.is_empty() {
            return self.worker_advertise_url.trim_end_matches('/').to_string();
        }
        let scheme = if self.tls_cert_file.trim().is_empty() {
            "http"
        } else {
            "https"
        };
        format!(
            "{scheme}://{}",
            self.worker_bind.replace("0.0.0.0", "127.0.0.1")
        )
    }

    /// The worker's name: `worker_id`, else the host name.
    pub fn worker_name(&self) -> String {
        if !self.worker_id.is_empty() {
            return self.worker_id.clone();
        }
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|| "worker".into())
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        _ => "a string",
    }
}

/// Reads an environment string as the type of the setting's default.
fn coerce(default: &Value, raw: &str) -> Option<Value> {
    match default {
        Value::Bool(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(Value::Bool(true)),
            "0" | "false" | "no" | "off" => Some(Value::Bool(false)),
            _ => None,
        },
        Value::Number(n) if n.is_f64() => raw
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(Value::from),
        Value::Number(_) => raw.trim().parse::<u64>().ok().map(Value::from),
        _ => Some(Value::String(raw.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gpuq.toml");
        std::fs::write(&file, "delivery_limit = 7\nqueue_prefix = \"fromfile\"\n").unwrap();
        let s = Settings::from_sources(&env(&[
            ("GPUQ_CONFIG", file.to_str().unwrap()),
            ("GPUQ_QUEUE_PREFIX", "fromenv"),
            ("GPUQ_FAULT_INJECTION", "true"),
        ]))
        .unwrap();
        assert_eq!(s.delivery_limit, 7);
        assert_eq!(s.queue_prefix, "fromenv");
        assert!(s.fault_injection);
        assert_eq!(
            s.heartbeat_interval_ms,
            Settings::default().heartbeat_interval_ms
        );
    }

    #[test]
    fn numeric_looking_secrets_stay_strings() {
        let s = Settings::from_sources(&env(&[("GPUQ_API_KEYS", "1234,abcd")])).unwrap();
        assert_eq!(s.api_key_list().len(), 2);
        assert_eq!(format!("{:?}", s.api_keys), "\"***\"");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = Settings::from_sources(&env(&[("GPUQ_DELIVERY_LIMIT", "many")])).unwrap_err();
        assert!(err.to_string().contains("GPUQ_DELIVERY_LIMIT"), "{err}");
        let err = Settings::from_sources(&env(&[("GPUQ_STORE_URL", "postgres://x")])).unwrap_err();
        assert!(err.to_string().contains("store_url"), "{err}");
        let s = Settings::from_sources(&env(&[("GPUQ_PROGRAMS", "sh=bin/sh")])).unwrap();
        let err = WorkerConfig::from_settings(&s).unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
    }

    #[test]
    fn typos_are_reported_but_client_keys_are_not() {
        let keys = [
            "GPUQ_AMQP_URL".to_string(),
            "GPUQ_API_KEY".to_string(),
            "PATH".to_string(),
        ];
        assert_eq!(
            Settings::unknown_env_keys(&keys),
            vec!["GPUQ_AMQP_URL".to_string()]
        );
    }
}
