//! The job contract: what a client submits, what travels through the broker, and what the store
//! keeps. A job id is a UUID v7 made by the gateway; it is the AMQP `message_id`, the Redis key
//! and the store's primary key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

mod array;
pub use array::{ARRAY_ID_ENV, ARRAY_INDEX_ENV, MAX_ARRAY};

pub type JobId = Uuid;

/// Version of the message body; a worker refuses bodies of a version it does not know.
pub const SCHEMA_VERSION: u32 = 1;
pub const MAX_GPUS: u32 = 64;
pub const MAX_TTL_S: u64 = 30 * 24 * 3600;
pub const MAX_SIM_DURATION_MS: u64 = 24 * 3600 * 1000;
pub const MAX_ARGS: usize = 256;
pub const MAX_ARG_BYTES: usize = 16 * 1024;
/// Variables a `command` job may set, and their bytes (names and values) in all.
pub const MAX_ENV: usize = 128;
pub const MAX_ENV_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Built in: sleeps, reports progress, fails on demand. For demos, tests and the tester.
    Simulate,
    /// Runs an allow-listed program on the GPUs it was given.
    Command,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Simulate => "simulate",
            JobKind::Command => "command",
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    DeadLettered,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::DeadLettered,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::DeadLettered => "dead_lettered",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// A final status is never overwritten: the first final result wins.
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }
}

/// Parameters of a `simulate` job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SimulateParams {
    pub duration_ms: u64,
    /// Progress reports spread over the duration.
    pub progress_steps: u32,
    /// Fail the first N attempts, then succeed.
    pub fail_times: u32,
    /// Chance in [0, 1] that an attempt fails.
    pub fail_probability: f64,
    /// Fail every attempt (a poison job).
    pub always_fail: bool,
    /// The first N attempts hang without progress (until the worker's progress watchdog kills them).
    pub hang_attempts: u32,
    /// Chance in [0, 1] that the worker process dies mid-attempt; honoured only by workers
    /// started with fault injection (the original project's crash load test).
    pub crash_probability: f64,
}

/// Parameters of a `command` job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CommandParams {
    /// A program name from the worker's allow-list (`GPUQ_PROGRAMS`), not a path.
    pub program: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Kill the engine after this long (bounded by the worker's `job_timeout_s`).
    pub timeout_s: Option<u64>,
}

/// Typed parameters, tagged by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "params", rename_all = "snake_case")]
pub enum JobPayload {
    Simulate(SimulateParams),
    Command(CommandParams),
}

impl JobPayload {
    pub fn kind(&self) -> JobKind {
        match self {
            JobPayload::Simulate(_) => JobKind::Simulate,
            JobPayload::Command(_) => JobKind::Command,
        }
    }
}

/// The body of `POST /v1/jobs`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub kind: JobKind,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: Value,
    #[serde(default = "one")]
    pub gpus: u32,
    #[serde(default)]
    pub min_gpu_memory_mb: Option<u64>,
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Seconds the job may wait in the queue before it is dead-lettered as `expired`.
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// A job array: this many jobs (1 to 1000) sharing kind, params and placement, each with
    /// its index. Only through `POST /v1/jobs/batch`.
    #[serde(default)]
    pub array: Option<u32>,
}

fn one() -> u32 {
    1
}
/// The pool of a job that names none.
pub fn default_pool() -> String {
    "default".into()
}

/// A submission that breaks the contract, with the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

fn verr(field: &str, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

pub fn validate_pool(pool: &str) -> Result<(), String> {
    if pool.is_empty() || pool.len() > 64 {
        return Err("pool names are 1 to 64 characters".into());
    }
    if !pool
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("pool names use letters, digits, '-' and '_'".into());
    }
    Ok(())
}

impl SubmitRequest {
    /// Checks every field but the params.
    fn check_placement(&self) -> Result<(), ValidationError> {
        if self.gpus == 0 || self.gpus > MAX_GPUS {
            return Err(verr("gpus", format!("must be 1 to {MAX_GPUS}")));
        }
        validate_pool(&self.pool).map_err(|m| verr("pool", m))?;
        if let Some(n) = self.array
            && (n == 0 || n > MAX_ARRAY)
        {
            return Err(verr("array", format!("must be 1 to {MAX_ARRAY}")));
        }
        if let Some(ttl) = self.ttl_s
            && (ttl == 0 || ttl > MAX_TTL_S)
        {
            return Err(verr("ttl_s", format!("must be 1 to {MAX_TTL_S}")));
        }
        if let Some(mem) = self.min_gpu_memory_mb
            && mem > 16 * 1024 * 1024
        {
            return Err(verr("min_gpu_memory_mb", "is larger than any GPU"));
        }
        Ok(())
    }

    /// Checks every field and types the parameters.
    pub fn validate(&self) -> Result<(JobPayload, JobPlacement), ValidationError> {
        self.check_placement()?;
        let params = if self.params.is_null() {
            Value::Object(Default::default())
        } else {
            self.params.clone()
        };
        if !params.is_object() {
            return Err(verr("params", "must be an object"));
        }
        let payload = match self.kind {
            JobKind::Simulate => {
                let p: SimulateParams =
                    serde_json::from_value(params).map_err(|e| verr("params", e.to_string()))?;
                if p.duration_ms > MAX_SIM_DURATION_MS {
                    return Err(verr("params.duration_ms", "is longer than a day"));
                }
                if p.progress_steps > 10_000 {
                    return Err(verr("params.progress_steps", "must be at most 10000"));
                }
                if !(0.0..=1.0).contains(&p.fail_probability) {
                    return Err(verr("params.fail_probability", "must be within [0, 1]"));
                }
                if !(0.0..=1.0).contains(&p.crash_probability) {
                    return Err(verr("params.crash_probability", "must be within [0, 1]"));
                }
                JobPayload::Simulate(p)
            }
            JobKind::Command => {
                let p: CommandParams =
                    serde_json::from_value(params).map_err(|e| verr("params", e.to_string()))?;
                if p.program.is_empty() || p.program.contains(['/', '\0']) || p.program.len() > 128
                {
                    return Err(verr(
                        "params.program",
                        "must name an allow-listed program, not a path",
                    ));
                }
                if p.args.len() > MAX_ARGS
                    || p.args.iter().map(String::len).sum::<usize>() > MAX_ARG_BYTES
                {
                    return Err(verr("params.args", "too many or too long"));
                }
                // A NUL cannot reach exec: refused here rather than failing every attempt.
                if let Some(i) = p.args.iter().position(|a| a.contains('\0')) {
                    return Err(verr(&format!("params.args[{i}]"), "contains a NUL byte"));
                }
                let env_bytes: usize = p.env.iter().map(|(k, v)| k.len() + v.len()).sum();
                if p.env.len() > MAX_ENV || env_bytes > MAX_ENV_BYTES {
                    return Err(verr(
                        "params.env",
                        format!("at most {MAX_ENV} variables and {MAX_ENV_BYTES} bytes"),
                    ));
                }
                if let Some((k, _)) = p.env.iter().find(|(_, v)| v.contains('\0')) {
                    return Err(verr(&format!("params.env.{k}"), "contains a NUL byte"));
                }
                for key in p.env.keys() {
                    if let Some(why) = crate::job_env::refusal(key) {
                        return Err(verr(&format!("params.env.{key}"), format!("{key:?} {why}")));
                    }
                }
                if let Some(t) = p.timeout_s
                    && (t == 0 || t > MAX_TTL_S)
                {
                    return Err(verr("params.timeout_s", "must be 1 to 2592000"));
                }
                JobPayload::Command(p)
            }
        };
        Ok((
            payload,
            JobPlacement {
                gpus: self.gpus,
                min_gpu_memory_mb: self.min_gpu_memory_mb,
                pool: self.pool.clone(),
                ttl_s: self.ttl_s,
            },
        ))
    }
}

/// Where and how long a job may run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobPlacement {
    pub gpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_gpu_memory_mb: Option<u64>,
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
}

/// The AMQP message body (JSON, persistent, `message_id` = `id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    pub schema: u32,
    pub id: JobId,
    #[serde(flatten)]
    pub payload: JobPayload,
    #[serde(flatten)]
    pub placement: JobPlacement,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// The tenant that submitted it.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// The tenant's GPU quota when it was submitted: workers keep the GPUs running the tenant's
    /// jobs at or under it (`coord::quota`); absent, no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_max_gpus: Option<u32>,
    /// The array this job belongs to, and its index there (`array.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<ArrayMember>,
}

/// A job's place in its array: the array's id (its first job's) and the job's index, 0 to N-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayMember {
    pub id: JobId,
    pub index: u32,
}

fn default_tenant() -> String {
    crate::tenancy::DEFAULT_TENANT.to_string()
}

impl JobMessage {
    pub fn new(payload: JobPayload, placement: JobPlacement) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            id: Uuid::now_v7(),
            payload,
            placement,
            created_at_ms: now_ms(),
            tenant: default_tenant(),
            tenant_max_gpus: None,
            array: None,
        }
    }

    /// The same job, submitted by `tenant` under its GPU quota.
    pub fn for_tenant(mut self, tenant: &str, max_gpus: Option<u32>) -> Self {
        self.tenant = tenant.to_string();
        self.tenant_max_gpus = max_gpus;
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("job message serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        match v.get("schema").and_then(Value::as_u64) {
            Some(s) if s == u64::from(SCHEMA_VERSION) => {}
            other => return Err(format!("unsupported schema version {other:?}")),
        }
        serde_json::from_value(v).map_err(|e| e.to_string())
    }
}

/// What the store keeps of a job, and what `GET /v1/jobs/{id}` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobRecord {
    pub id: Uuid,
    /// The tenant that submitted it: only its keys (and admin keys) see the job.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    pub kind: JobKind,
    #[schema(value_type = Object)]
    pub params: Value,
    pub pool: String,
    pub gpus_requested: u32,
    #[serde(default)]
    pub min_gpu_memory_mb: Option<u64>,
    pub status: JobStatus,
    /// Deliveries that started running this job.
    pub attempts: u32,
    pub worker: Option<String>,
    /// GPU indices on `worker` that ran (or run) the job.
    pub gpus: Vec<u32>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The latest progress the job reported (its `progress` events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::events::Progress>,
    /// The array the job belongs to (its first job's id); `GET /v1/jobs?array=` lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array_id: Option<Uuid>,
    /// The job's index in its array, 0 to N-1 (`GPUQ_ARRAY_INDEX` of a `command` job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array_index: Option<u32>,
}

impl JobRecord {
    pub fn queued(msg: &JobMessage) -> Self {
        let params = match &msg.payload {
            JobPayload::Simulate(p) => serde_json::to_value(p),
            JobPayload::Command(p) => serde_json::to_value(p),
        }
        .expect("params serialize");
        Self {
            id: msg.id,
            tenant: msg.tenant.clone(),
            kind: msg.payload.kind(),
            params,
            pool: msg.placement.pool.clone(),
            gpus_requested: msg.placement.gpus,
            min_gpu_memory_mb: msg.placement.min_gpu_memory_mb,
            status: JobStatus::Queued,
            attempts: 0,
            worker: None,
            gpus: vec![],
            result: None,
            error: None,
            created_at: msg.created_at_ms,
            started_at: None,
            finished_at: None,
            progress: None,
            array_id: msg.array.map(|a| a.id),
            array_index: msg.array.map(|a| a.index),
        }
    }
}

/// A final outcome, written once.
#[derive(Debug, Clone, PartialEq)]
pub struct FinalOutcome {
    pub status: JobStatus,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub worker: Option<String>,
    pub finished_at: i64,
    /// The attempt that produced it, recorded with the outcome. A worker sends it because a
    /// short job's `running` record is never written (see the worker's `running_record_delay_ms`).
    pub attempt: Option<AttemptInfo>,
    /// Events of the run not yet in the job's log: appended with the outcome, before its
    /// `final` event (which every stored outcome appends).
    pub events: Vec<crate::events::NewEvent>,
}

impl FinalOutcome {
    /// The outcome of a client's cancel: written by the gateway when the cancel is asked for, or
    /// by the `worker` that saw the cancel before or while it ran the job (`attempt`, when it ran).
    pub fn cancelled(worker: Option<String>, attempt: Option<AttemptInfo>) -> Self {
        Self {
            status: JobStatus::Cancelled,
            result: None,
            error: Some("cancelled by request".into()),
            worker,
            finished_at: now_ms(),
            attempt,
            events: vec![],
        }
    }
}

/// Which attempt ran a job, where, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptInfo {
    pub attempts: u32,
    pub gpus: Vec<u32>,
    pub started_at: i64,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// `GET /v1/jobs` filters. Newest first; `cursor` is the last id of the previous page.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ListQuery {
    /// Only this tenant's jobs (`None`: every tenant's, for admin keys).
    pub tenant: Option<String>,
    pub status: Option<JobStatus>,
    pub pool: Option<String>,
    /// Only the jobs of this array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<uuid::Uuid>,
    pub limit: u32,
    pub cursor: Option<uuid::Uuid>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<JobRecord>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<uuid::Uuid>,
}

#[cfg(test)]
mod tests;
