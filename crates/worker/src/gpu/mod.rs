//! The worker's GPUs: one `GpuBackend` trait over NVML (real devices) and simulated GPUs
//! (machines without a driver, tests, fault drills), plus the health rules that decide which
//! GPUs may take work. `detect` picks the backend from `GPUQ_GPUS`.

mod health;
mod nvml;
mod sim;

use std::sync::Arc;

use gpuq_common::config::{GpuSource, WorkerConfig};
pub use gpuq_common::engine::GpuFault;
use gpuq_common::engine::GpuSnapshot;

pub use health::{Thresholds, evaluate};
pub use nvml::NvmlBackend;
pub use sim::SimBackend;

/// Simulated GPUs `auto` falls back to when NVML is unavailable.
pub const AUTO_SIM_GPUS: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("faults can only be injected into simulated GPUs")]
    NotSimulated,
    #[error("no GPU with index {0}")]
    NoSuchGpu(u32),
    #[error("NVML: {0}")]
    Nvml(String),
}

/// One reading of one GPU (raw facts; health is derived by `evaluate`).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// False when the device did not answer (lost, fallen off the bus, driver error).
    pub responding: bool,
    pub utilization_pct: u32,
    pub memory_used_mb: u64,
    pub memory_total_mb: u64,
    pub temperature_c: u32,
    pub power_w: f64,
    /// Volatile (since the last driver load) uncorrected ECC errors.
    pub ecc_uncorrected: u64,
    /// Critical XID events seen since the worker started (application-caused ones excluded).
    pub xid_errors: u64,
    /// Hardware slowdown throttling (HW, thermal or power-brake) is active.
    pub hw_slowdown: bool,
    /// Simulated faults armed by an operator, comma separated (`overheat`, `ecc`, `oom`, `lost`).
    pub fault: Option<String>,
}

/// A source of GPU readings: real devices through NVML, or simulated ones.
pub trait GpuBackend: Send + Sync + 'static {
    /// `nvml` or `sim`.
    fn kind(&self) -> &'static str;
    fn count(&self) -> u32;
    /// Reads every GPU, in index order. May block briefly: call it from `spawn_blocking`.
    fn sample(&self) -> Vec<GpuReading>;
    /// Arms or clears a fault on a simulated GPU; `NotSimulated` on real ones.
    fn inject(&self, index: u32, fault: GpuFault) -> Result<(), GpuError>;
    /// Tells a simulated GPU whether a job runs on it, so its gauges show load; no-op on NVML.
    fn set_busy(&self, index: u32, busy: bool);
}

/// `Auto`: NVML when it initialises and reports ≥1 device, else simulated (2 GPUs) with an info
/// log saying why; `Nvml`: NVML or an error; `Simulated(n)`: n simulated GPUs.
pub fn detect(config: &WorkerConfig) -> Result<Arc<dyn GpuBackend>, GpuError> {
    match config.gpus {
        GpuSource::Auto => match NvmlBackend::init() {
            Ok(backend) => {
                tracing::info!(gpus = backend.count(), "using NVML");
                Ok(Arc::new(backend))
            }
            Err(e) => {
                tracing::info!(
                    error.message = %e,
                    gpus = AUTO_SIM_GPUS,
                    "NVML unavailable, simulating GPUs"
                );
                Ok(Arc::new(SimBackend::from_config(config, AUTO_SIM_GPUS)))
            }
        },
        GpuSource::Nvml => {
            let backend = NvmlBackend::init()?;
            tracing::info!(gpus = backend.count(), "using NVML");
            Ok(Arc::new(backend))
        }
        GpuSource::Simulated(count) => {
            tracing::info!(gpus = count, "simulating GPUs");
            Ok(Arc::new(SimBackend::from_config(config, count)))
        }
    }
}

/// Snapshot for heartbeats: reading + health + reasons (job filled in by the caller).
pub fn snapshot(reading: &GpuReading, t: &Thresholds) -> GpuSnapshot {
    let (health, reasons) = evaluate(reading, t);
    GpuSnapshot {
        index: reading.index,
        uuid: reading.uuid.clone(),
        name: reading.name.clone(),
        health,
        reasons,
        utilization_pct: reading.utilization_pct,
        memory_used_mb: reading.memory_used_mb,
        memory_total_mb: reading.memory_total_mb,
        temperature_c: reading.temperature_c,
        power_w: reading.power_w,
        ecc_errors: reading.ecc_uncorrected,
        job: None,
        fault: reading.fault.clone(),
    }
}

#[cfg(test)]
mod tests {
    use gpuq_common::engine::GpuHealth;

    use super::*;

    fn settings(gpus: &str) -> WorkerConfig {
        WorkerConfig::from_settings(&gpuq_common::Settings {
            gpus: gpus.into(),
            worker_id: "w1".into(),
            ..gpuq_common::Settings::default()
        })
        .unwrap()
    }

    #[test]
    fn sim_spec_gives_that_many_simulated_gpus() {
        let b = detect(&settings("sim:4")).unwrap();
        assert_eq!(b.kind(), "sim");
        assert_eq!(b.count(), 4);
        let readings = b.sample();
        assert_eq!(
            readings.iter().map(|r| r.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert!(readings.iter().all(|r| r.memory_total_mb == 24 * 1024));
        assert_eq!(detect(&settings(" SIM:64 ")).unwrap().count(), 64);
    }

    #[test]
    fn nvml_without_a_driver_is_a_clean_error() {
        // On a machine with an NVIDIA driver this finds real GPUs instead.
        match detect(&settings("nvml")) {
            Ok(b) => assert!(b.kind() == "nvml" && b.count() >= 1),
            Err(GpuError::Nvml(msg)) => assert!(!msg.is_empty()),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn auto_falls_back_to_two_simulated_gpus_without_a_driver() {
        let b = detect(&settings("auto")).unwrap();
        match b.kind() {
            "sim" => assert_eq!(b.count(), AUTO_SIM_GPUS),
            "nvml" => assert!(b.count() >= 1),
            other => panic!("unknown backend {other}"),
        }
        assert_eq!(b.sample().len(), b.count() as usize);
    }

    #[test]
    fn a_snapshot_carries_the_reading_and_its_health() {
        let b = detect(&settings("sim:1")).unwrap();
        let t = Thresholds::default();
        let healthy = snapshot(&b.sample()[0], &t);
        assert_eq!(healthy.health, GpuHealth::Healthy);
        assert!(healthy.reasons.is_empty() && healthy.fault.is_none() && healthy.job.is_none());
        assert_eq!(healthy.uuid, "GPU-sim-w1-0");

        b.inject(0, GpuFault::Ecc).unwrap();
        let sick = snapshot(&b.sample()[0], &t);
        assert_eq!(sick.health, GpuHealth::Unhealthy);
        assert_eq!(sick.ecc_errors, 1);
        assert_eq!(sick.fault.as_deref(), Some("ecc"));
        assert_eq!(sick.reasons.len(), 1, "{:?}", sick.reasons);
    }
}
