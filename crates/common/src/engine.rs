//! The engine contract between workers and the manager: GPU snapshots, heartbeats, states and
//! the GPU faults an operator can inject.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GpuHealth {
    Healthy,
    Degraded,
    Unhealthy,
}

impl GpuHealth {
    pub const ALL: [GpuHealth; 3] = [
        GpuHealth::Healthy,
        GpuHealth::Degraded,
        GpuHealth::Unhealthy,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            GpuHealth::Healthy => "healthy",
            GpuHealth::Degraded => "degraded",
            GpuHealth::Unhealthy => "unhealthy",
        }
    }
}

/// A GPU fault an operator can inject into a simulated GPU. On the wire (CLI → manager → worker
/// admin API) it is its snake_case name: `{"fault": "ecc"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GpuFault {
    /// Temperature jumps to 99 °C (with hardware thermal slowdown).
    Overheat,
    /// One more uncorrected ECC error; the count stays until `Clear`.
    Ecc,
    /// All memory in use.
    Oom,
    /// The device stops answering.
    Lost,
    /// Removes every fault.
    Clear,
}

impl GpuFault {
    pub const ALL: [GpuFault; 5] = [
        GpuFault::Overheat,
        GpuFault::Ecc,
        GpuFault::Oom,
        GpuFault::Lost,
        GpuFault::Clear,
    ];

    /// Reads the name used by the admin API and the CLI (`overheat`, `ecc`, `oom`, `lost`, `clear`).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GpuFault::Overheat => "overheat",
            GpuFault::Ecc => "ecc",
            GpuFault::Oom => "oom",
            GpuFault::Lost => "lost",
            GpuFault::Clear => "clear",
        }
    }
}

/// The CLI's `gpus fault <FAULT>` argument: the same names, with no per-value help.
impl clap::ValueEnum for GpuFault {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// One GPU as its worker sees it now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GpuSnapshot {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub health: GpuHealth,
    /// Why the GPU is not healthy (empty when it is).
    pub reasons: Vec<String>,
    pub utilization_pct: u32,
    pub memory_used_mb: u64,
    pub memory_total_mb: u64,
    pub temperature_c: u32,
    pub power_w: f64,
    pub ecc_errors: u64,
    /// The job running on this GPU, if any.
    pub job: Option<Uuid>,
    /// A simulated fault armed by an operator (`overheat`, `ecc`, `oom`, `lost`).
    pub fault: Option<String>,
}

/// What a worker reports every heartbeat interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    pub engine_id: String,
    /// One per process start: a restarted worker has a new instance id.
    pub instance_id: String,
    pub version: String,
    /// `nvml` or `sim`.
    pub gpu_backend: String,
    pub pools: Vec<String>,
    pub gpus: Vec<GpuSnapshot>,
    pub running_jobs: Vec<Uuid>,
    /// Whether the worker holds a consumer on its queues right now.
    pub consuming: bool,
    pub jobs_processed: u64,
    pub jobs_failed: u64,
    pub avg_job_ms: f64,
    pub admin_url: String,
    pub started_at_ms: i64,
    pub sent_at_ms: i64,
    pub heartbeat_interval_ms: u64,
    /// The worker takes `simulate` knobs that crash or hang it (`GPUQ_FAULT_INJECTION`).
    #[serde(default)]
    pub fault_injection: bool,
}

/// An engine's state as the manager derives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EngineState {
    Healthy,
    Degraded,
    Unhealthy,
    Offline,
    Cordoned,
    Draining,
}

impl EngineState {
    pub const ALL: [EngineState; 6] = [
        EngineState::Healthy,
        EngineState::Degraded,
        EngineState::Unhealthy,
        EngineState::Offline,
        EngineState::Cordoned,
        EngineState::Draining,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Healthy => "healthy",
            EngineState::Degraded => "degraded",
            EngineState::Unhealthy => "unhealthy",
            EngineState::Offline => "offline",
            EngineState::Cordoned => "cordoned",
            EngineState::Draining => "draining",
        }
    }
}

/// Operator intent stored in Redis (`Keys::engine_admin`) and obeyed by the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    /// Takes no new jobs; running ones go on.
    Cordoned,
    /// Finishes what it runs, then takes nothing (like cordoned, reported until idle).
    Draining,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Cordoned => "cordoned",
            AdminState::Draining => "draining",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cordoned" => Some(AdminState::Cordoned),
            "draining" => Some(AdminState::Draining),
            _ => None,
        }
    }
}

/// An engine as the manager reports it (`GET /v1/engines`), for the CLI and the status page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EngineView {
    pub id: String,
    pub state: EngineState,
    /// Operator intent, if any.
    pub admin: Option<AdminState>,
    /// Worker process restarts seen (a new instance id for this engine).
    pub restarts: u64,
    /// When the manager last received a heartbeat (ms since the epoch).
    pub last_seen_ms: Option<i64>,
    /// The latest heartbeat while it is fresh; `null` once the engine is offline.
    pub heartbeat: Option<Heartbeat>,
    /// An operator asked the running worker process to restart: it takes no new jobs, finishes
    /// its running ones (within its shutdown grace), exits, and its supervisor starts it again.
    #[serde(default)]
    pub restart_requested: bool,
}

/// Derives an engine's state from its last heartbeat (if still fresh) and operator intent.
pub fn derive_state(hb: Option<&Heartbeat>, admin: Option<AdminState>) -> EngineState {
    let Some(hb) = hb else {
        return EngineState::Offline;
    };
    match admin {
        Some(AdminState::Cordoned) => return EngineState::Cordoned,
        Some(AdminState::Draining) => return EngineState::Draining,
        None => {}
    }
    if hb.gpus.is_empty() || hb.gpus.iter().all(|g| g.health == GpuHealth::Unhealthy) {
        EngineState::Unhealthy
    } else if hb.gpus.iter().any(|g| g.health != GpuHealth::Healthy) {
        EngineState::Degraded
    } else {
        EngineState::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_names_round_trip_through_parse_and_serde() {
        for f in GpuFault::ALL {
            assert_eq!(GpuFault::parse(f.as_str()), Some(f));
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.as_str()));
            assert_eq!(serde_json::from_str::<GpuFault>(&json).unwrap(), f);
        }
        assert_eq!(GpuFault::parse(" Overheat "), Some(GpuFault::Overheat));
        assert_eq!(GpuFault::parse("melt"), None);
    }
}
