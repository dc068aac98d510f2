//! What each service runs on: the flat `Settings` (one schema for the file and the `GPUQ_*`
//! variables, so one `.env` feeds a whole deployment) parsed once, at load, into a typed section
//! per service — lists split, URLs and program maps checked, durations typed. A service reads
//! only its section; a bad value stops it at start with the variable's name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{ConfigError, Secret, Settings};
use crate::tenancy::Tenants;
use crate::topology::Topology;

/// How a service logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object a line (Loki).
    Json,
    /// For a terminal.
    Pretty,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Pretty => "pretty",
        }
    }
}

/// What every service reads.
#[derive(Debug, Clone)]
pub struct Common {
    /// Every RabbitMQ node; a service connects to any that answers.
    pub amqp_urls: Vec<String>,
    pub redis_url: String,
    /// `sqlite://path` or `mongodb://…`.
    pub store_url: String,
    /// The queue names and arguments under the prefix (also the Redis key prefix).
    pub topology: Topology,
    pub log_format: LogFormat,
    /// A tracing filter, e.g. `info,gpuq_worker=debug`.
    pub log_filter: String,
    pub tls: TlsSettings,
}

/// TLS files (`GPUQ_TLS_*`; see `crate::tls`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// The HTTPS certificate chain and key; `None`: the service serves HTTP.
    pub server: Option<(PathBuf, PathBuf)>,
    /// The CA outgoing TLS connections trust besides the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl TlsSettings {
    fn from_settings(s: &Settings) -> Self {
        let path = |v: &str| Some(PathBuf::from(v.trim())).filter(|p| !p.as_os_str().is_empty());
        Self {
            server: path(&s.tls_cert_file).zip(path(&s.tls_key_file)),
            ca_file: path(&s.tls_ca_file),
        }
    }

    /// The HTTPS listener's acceptor, when the service serves HTTPS.
    pub fn acceptor(&self) -> Result<Option<crate::tls::TlsAcceptor>, crate::tls::TlsError> {
        self.server
            .as_ref()
            .map(|(cert, key)| crate::tls::server_acceptor(cert, key))
            .transpose()
    }
}

/// A `mongodb://` URL that asks for TLS (`tls=true` or `ssl=true`) and names no CA file gets
/// `tlsCAFile=ca_file`; any other URL is left as it is.
fn mongodb_url_with_ca(url: &str, ca_file: Option<&Path>) -> String {
    let Some(ca) = ca_file else {
        return url.to_string();
    };
    let Some((_, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let options: Vec<(String, String)> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_ascii_lowercase()))
        .collect();
    let tls_on = options
        .iter()
        .any(|(k, v)| (k == "tls" || k == "ssl") && v == "true");
    if !url.starts_with("mongodb") || !tls_on || options.iter().any(|(k, _)| k == "tlscafile") {
        return url.to_string();
    }
    // Percent-encoded where a path's character would end the value or mean an escape.
    let ca = ca
        .to_string_lossy()
        .replace('%', "%25")
        .replace('&', "%26")
        .replace(' ', "%20")
        .replace('#', "%23");
    format!("{url}&tlsCAFile={ca}")
}

impl Common {
    pub fn prefix(&self) -> &str {
        &self.topology.prefix
    }
}

/// The gateway's section.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub common: Common,
    pub bind: String,
    /// The `/v1` API's keys, each a tenant's, and every tenant's limits.
    pub tenants: Tenants,
    pub max_body_bytes: usize,
    /// How long a submit waits for the broker's confirm before it answers 503.
    pub confirm_timeout: Duration,
    pub idempotency_ttl_s: u64,
    /// The longest a job may run: how long a cancel signal is kept.
    pub job_timeout_s: u64,
}

/// The manager's section.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub common: Common,
    pub bind: String,
    /// Operator actions, and reads.
    pub admin_token: Secret,
    /// Reads only (`GET /v1/…`): the status page, `gpuq engines`.
    pub read_token: Secret,
    /// The fleet secret worker credentials derive from (`credentials::worker_token`).
    pub worker_secret: Secret,
    /// RabbitMQ management API base URLs (with credentials): queue depths.
    pub rabbitmq_mgmt_urls: Vec<String>,
    /// Pools whose queues the manager declares besides `default`.
    pub pools: Vec<String>,
    /// A heartbeat's interval when it names none.
    pub heartbeat_interval_ms: u64,
    /// Heartbeats missed before an engine counts as offline.
    pub engine_offline_after_heartbeats: u32,
    /// An engine offline this long is forgotten: registry entry and metric series dropped.
    pub engine_forget_after: Duration,
    /// Final jobs older than this are deleted with their logs (`None`: kept forever).
    pub retention: Option<Duration>,
    /// Jobs deleted in one store write, at least 1.
    pub retention_batch: u32,
    /// Between two retention batches.
    pub retention_pause: Duration,
}

/// Which GPUs a worker drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuSource {
    /// NVML when it initialises and reports a device, else simulated GPUs.
    Auto,
    /// NVML or an error.
    Nvml,
    /// This many simulated GPUs.
    Simulated(u32),
}

/// Most simulated GPUs a worker may have.
pub const MAX_SIM_GPUS: u32 = 64;

impl GpuSource {
    /// `auto`, `nvml` or `sim:N` (N 1..=64), in any case.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.trim().to_ascii_lowercase();
        match spec.as_str() {
            "auto" => Ok(GpuSource::Auto),
            "nvml" => Ok(GpuSource::Nvml),
            _ => spec
                .strip_prefix("sim:")
                .and_then(|n| n.trim().parse::<u32>().ok())
                .filter(|n| (1..=MAX_SIM_GPUS).contains(n))
                .map(GpuSource::Simulated)
                .ok_or_else(|| {
                    format!("{spec:?}: use auto, nvml or sim:N with N from 1 to {MAX_SIM_GPUS}")
                }),
        }
    }
}

/// When a GPU counts as degraded or unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuThresholds {
    pub temp_degraded_c: u32,
    pub temp_unhealthy_c: u32,
    /// Memory in use, in percent of total, from which a GPU is degraded (0 = never).
    pub memory_degraded_pct: u32,
    /// Uncorrected ECC errors from which a GPU is unhealthy (0 = never).
    pub ecc_unhealthy: u64,
}

impl Default for GpuThresholds {
    fn default() -> Self {
        WorkerConfig::thresholds(&Settings::default())
    }
}

/// The worker's section.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub common: Common,
    /// The engine's stable name: `worker_id`, else the host name.
    pub name: String,
    pub bind: String,
    /// The admin URL the manager and the CLI call.
    pub admin_url: String,
    /// Pools it consumes (`<prefix>.jobs.<pool>`).
    pub pools: Vec<String>,
    pub gpus: GpuSource,
    pub sim_gpu_memory_mb: u64,
    pub thresholds: GpuThresholds,
    /// Enables `POST /admin/faults`.
    pub fault_injection: bool,
    /// The worker's admin API (the manager and the CLI call it with this token).
    pub admin_token: Secret,
    /// This engine's credential for its heartbeats (derived from the manager's worker secret).
    pub worker_token: Secret,
    pub manager_url: String,
    pub lease_ttl_ms: u64,
    pub running_record_delay: Duration,
    pub heartbeat_interval: Duration,
    pub status_interval: Duration,
    pub shutdown_grace: Duration,
    /// `command` programs: name → absolute path.
    pub programs: BTreeMap<String, String>,
    pub output_tail_bytes: usize,
    /// Upper bound of any job's run time.
    pub job_timeout_s: u64,
    /// Kill an engine that printed nothing for this long (0 = never).
    pub progress_timeout_s: u64,
    /// The box `command` jobs run in (`worker::sandbox`).
    pub job_sandbox: JobSandboxConfig,
    /// Let a GPU that turns unhealthy finish its running job.
    pub finish_on_unhealthy: bool,
}

impl Common {
    pub fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
        let log_format = match s.log_format.as_str() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            _ => return Err(ConfigError::invalid("log_format", "json or pretty")),
        };
        let tls = TlsSettings::from_settings(s);
        Ok(Self {
            amqp_urls: s.amqp_url_list(),
            redis_url: s.redis_url.clone(),
            store_url: mongodb_url_with_ca(&s.store_url, tls.ca_file.as_deref()),
            topology: Topology::from_settings(s),
            log_format,
            log_filter: s.log.clone(),
            tls,
        })
    }
}

impl GatewayConfig {
    pub fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
        Ok(Self {
            common: Common::from_settings(s)?,
            bind: s.gateway_bind.clone(),
            tenants: Tenants::parse(s.api_keys.expose(), &s.tenant_limits)
                .map_err(|m| ConfigError::invalid("api_keys/tenant_limits", &m))?,
            max_body_bytes: s.max_body_bytes,
            confirm_timeout: Duration::from_millis(s.confirm_timeout_ms.max(1)),
            idempotency_ttl_s: s.idempotency_ttl_s,
            job_timeout_s: s.job_timeout_s,
        })
    }
}

impl ManagerConfig {
    pub fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
        Ok(Self {
            common: Common::from_settings(s)?,
            bind: s.manager_bind.clone(),
            admin_token: s.admin_token.clone(),
            read_token: s.read_token.clone(),
            worker_secret: s.worker_secret.clone(),
            rabbitmq_mgmt_urls: s.rabbitmq_mgmt_url_list(),
            pools: s.worker_pool_list(),
            heartbeat_interval_ms: s.heartbeat_interval_ms,
            engine_offline_after_heartbeats: s.engine_offline_after_heartbeats.max(1),
            engine_forget_after: Duration::from_secs(s.engine_forget_after_s.max(1)),
            retention: (s.retention_days > 0.0)
                .then(|| Duration::from_secs_f64(s.retention_days * 86_400.0)),
            retention_batch: s.retention_batch.max(1),
            retention_pause: Duration::from_millis(s.retention_pause_ms),
        })
    }
}

/// The box `command` jobs run in (`GPUQ_JOB_*`); limits of 0 mean none.
#[derive(Debug, Clone)]
pub struct JobSandboxConfig {
    /// The user jobs run as; empty: the worker's own user.
    pub user: String,
    /// Parent of each attempt's private working directory.
    pub dir: std::path::PathBuf,
    pub max_open_files: u64,
    pub max_processes: u64,
    pub max_file_bytes: u64,
    pub memory_bytes: u64,
}

impl WorkerConfig {
    pub fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
        let gpus = GpuSource::parse(&s.gpus).map_err(|m| ConfigError::invalid("gpus", &m))?;
        let programs = s
            .program_map()
            .map_err(|m| ConfigError::invalid("programs", &m))?;
        Ok(Self {
            common: Common::from_settings(s)?,
            name: s.worker_name(),
            bind: s.worker_bind.clone(),
            admin_url: s.worker_admin_url(),
            pools: s.worker_pool_list(),
            gpus,
            sim_gpu_memory_mb: s.sim_gpu_memory_mb,
            thresholds: Self::thresholds(s),
            fault_injection: s.fault_injection,
            admin_token: s.admin_token.clone(),
            worker_token: s.worker_token.clone(),
            manager_url: s.manager_url.trim_end_matches('/').to_string(),
            lease_ttl_ms: s.lease_ttl_ms,
            running_record_delay: Duration::from_millis(s.running_record_delay_ms),
            heartbeat_interval: Duration::from_millis(s.heartbeat_interval_ms),
            status_interval: Duration::from_secs(s.status_interval_s),
            shutdown_grace: Duration::from_secs(s.shutdown_grace_s),
            programs,
            output_tail_bytes: s.output_tail_bytes,
            job_timeout_s: s.job_timeout_s,
            progress_timeout_s: s.progress_timeout_s,
            job_sandbox: JobSandboxConfig {
                user: s.job_user.trim().to_string(),
                dir: if s.job_dir.trim().is_empty() {
                    std::env::temp_dir().join("gpuq-jobs")
                } else {
                    s.job_dir.trim().into()
                },
                max_open_files: s.job_max_open_files,
                max_processes: s.job_max_processes,
                max_file_bytes: s.job_max_file_mb.saturating_mul(1 << 20),
                memory_bytes: s.job_memory_mb.saturating_mul(1 << 20),
            },
            finish_on_unhealthy: s.finish_on_unhealthy,
        })
    }

    fn thresholds(s: &Settings) -> GpuThresholds {
        GpuThresholds {
            temp_degraded_c: s.gpu_temp_degraded_c,
            temp_unhealthy_c: s.gpu_temp_unhealthy_c,
            memory_degraded_pct: s.gpu_memory_degraded_pct,
            ecc_unhealthy: s.gpu_ecc_unhealthy,
        }
    }
}

/// A service's section, as `startup` loads it.
pub trait ServiceConfig: Sized {
    fn from_settings(s: &Settings) -> Result<Self, ConfigError>;
    fn common(&self) -> &Common;
}

macro_rules! service_config {
    ($($t:ty),*) => {$(
        impl ServiceConfig for $t {
            fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
                <$t>::from_settings(s)
            }
            fn common(&self) -> &Common {
                &self.common
            }
        }
    )*};
}
service_config!(GatewayConfig, ManagerConfig, WorkerConfig);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_sources_parse_in_any_case_and_bad_ones_say_what_is_allowed() {
        assert_eq!(GpuSource::parse(" SIM:64 "), Ok(GpuSource::Simulated(64)));
        assert_eq!(GpuSource::parse("auto"), Ok(GpuSource::Auto));
        assert_eq!(GpuSource::parse("NVML"), Ok(GpuSource::Nvml));
        for bad in ["sim:0", "sim:65", "sim:x", "sim:", "sim", "bogus", ""] {
            let e = GpuSource::parse(bad).unwrap_err();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("sim:N"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_mongodb_url_asking_for_tls_trusts_the_ca_file_unless_it_names_one() {
        let ca = Some(Path::new("/etc/gpuq/tls/ca.pem"));
        let with = |url| mongodb_url_with_ca(url, ca);
        assert_eq!(
            with("mongodb://m:27017/gpuq?tls=true"),
            "mongodb://m:27017/gpuq?tls=true&tlsCAFile=/etc/gpuq/tls/ca.pem"
        );
        assert!(
            with("mongodb://m/gpuq?replicaSet=r&SSL=TRUE")
                .ends_with("&tlsCAFile=/etc/gpuq/tls/ca.pem")
        );
        for unchanged in [
            "mongodb://m:27017/gpuq",
            "mongodb://m/gpuq?tls=false",
            "mongodb://m/gpuq?tls=true&tlsCAFile=/other.pem",
            "sqlite://gpuq.db",
        ] {
            assert_eq!(with(unchanged), unchanged);
        }
        assert_eq!(
            mongodb_url_with_ca("mongodb://m/?tls=true", None),
            "mongodb://m/?tls=true"
        );
        assert!(
            mongodb_url_with_ca("mongodb://m/?tls=true", Some(Path::new("/a b&c.pem")))
                .ends_with("tlsCAFile=/a%20b%26c.pem")
        );
    }

    #[test]
    fn https_needs_both_files_and_makes_the_worker_admin_url_https() {
        let s = Settings {
            tls_cert_file: "/tls/server.pem".into(),
            ..Settings::default()
        };
        let env: BTreeMap<String, String> = serde_json::from_value(serde_json::json!({
            "GPUQ_TLS_CERT_FILE": "/tls/server.pem"
        }))
        .unwrap();
        let e = Settings::from_sources(&env).unwrap_err().to_string();
        assert!(e.contains("tls_cert_file/tls_key_file"), "{e}");
        let s = Settings {
            tls_key_file: "/tls/server.key".into(),
            worker_bind: "0.0.0.0:9001".into(),
            ..s
        };
        let w = WorkerConfig::from_settings(&s).unwrap();
        assert_eq!(w.admin_url, "https://127.0.0.1:9001");
        assert_eq!(
            w.common.tls.server,
            Some(("/tls/server.pem".into(), "/tls/server.key".into()))
        );
        assert_eq!(w.common.tls.ca_file, None);
    }

    #[test]
    fn a_bad_worker_setting_fails_the_load_with_its_name() {
        let s = Settings {
            gpus: "sim:100".into(),
            ..Settings::default()
        };
        let e = WorkerConfig::from_settings(&s).unwrap_err().to_string();
        assert!(e.starts_with("gpus:"), "{e}");
        let s = Settings {
            worker_pools: "a, b ,".into(),
            programs: "sh=/bin/sh".into(),
            ..Settings::default()
        };
        let w = WorkerConfig::from_settings(&s).unwrap();
        assert_eq!(w.pools, ["a", "b"]);
        assert_eq!(w.programs["sh"], "/bin/sh");
        assert_eq!(w.common.prefix(), "gpuq");
    }
}
