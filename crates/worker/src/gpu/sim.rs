//! Simulated GPUs for machines without an NVIDIA driver: gauges that follow whether a job runs,
//! and faults an operator injects (overheat, ECC error, memory full, lost) to drill the health
//! gating end to end.

use std::sync::Mutex;

use gpuq_common::config::WorkerConfig;

use super::{GpuBackend, GpuError, GpuFault, GpuReading, Thresholds};

const NAME: &str = "gpuq simulated GPU";
const IDLE_TEMP_C: u32 = 30;
const BUSY_TEMP_C: u32 = 65;
const OVERHEAT_TEMP_C: u32 = 99;
const IDLE_POWER_W: f64 = 25.0;
const BUSY_POWER_W: f64 = 250.0;
const BUSY_UTILIZATION_PCT: u32 = 95;

/// A fixed set of simulated GPUs; thread-safe.
pub struct SimBackend {
    host: String,
    memory_mb: u64,
    busy_temp_c: u32,
    overheat_temp_c: u32,
    gpus: Mutex<Vec<SimGpu>>,
}

#[derive(Debug, Clone, Default)]
struct SimGpu {
    busy: bool,
    overheat: bool,
    ecc: u64,
    oom: bool,
    lost: bool,
}

impl SimBackend {
    /// `count` GPUs named after the worker, sized by `sim_gpu_memory_mb`.
    pub fn from_config(config: &WorkerConfig, count: u32) -> Self {
        Self::new(
            &config.name,
            count,
            config.sim_gpu_memory_mb,
            &config.thresholds,
        )
    }

    /// Busy GPUs stay well under `t`'s degraded temperature; an overheated one reaches its
    /// unhealthy temperature even when that is set above 99 °C.
    pub fn new(host: &str, count: u32, memory_mb: u64, t: &Thresholds) -> Self {
        let host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        Self {
            host: if host.is_empty() {
                "worker".into()
            } else {
                host
            },
            memory_mb,
            busy_temp_c: BUSY_TEMP_C
                .min(t.temp_degraded_c.saturating_sub(10))
                .max(IDLE_TEMP_C),
            overheat_temp_c: OVERHEAT_TEMP_C.max(t.temp_unhealthy_c),
            gpus: Mutex::new(vec![SimGpu::default(); count as usize]),
        }
    }

    fn gpus(&self) -> std::sync::MutexGuard<'_, Vec<SimGpu>> {
        // The state is plain data, valid even if a holder panicked.
        self.gpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reading(&self, index: u32, g: &SimGpu) -> GpuReading {
        let total = self.memory_mb;
        let mut r = GpuReading {
            index,
            uuid: format!("GPU-sim-{}-{index}", self.host),
            name: NAME.into(),
            responding: true,
            utilization_pct: 0,
            memory_used_mb: total / 100,
            memory_total_mb: total,
            temperature_c: IDLE_TEMP_C,
            power_w: IDLE_POWER_W,
            ecc_uncorrected: g.ecc,
            xid_errors: 0,
            hw_slowdown: false,
            fault: None,
        };
        if g.busy {
            r.utilization_pct = BUSY_UTILIZATION_PCT;
            r.memory_used_mb = total / 2;
            r.temperature_c = self.busy_temp_c;
            r.power_w = BUSY_POWER_W;
        }
        if g.overheat {
            r.temperature_c = self.overheat_temp_c;
            r.hw_slowdown = true;
        }
        if g.oom {
            r.memory_used_mb = total;
        }
        if g.lost {
            r.responding = false;
            r.utilization_pct = 0;
            r.memory_used_mb = 0;
            r.temperature_c = 0;
            r.power_w = 0.0;
            r.hw_slowdown = false;
        }
        let faults: Vec<&str> = [
            (g.overheat, GpuFault::Overheat),
            (g.ecc > 0, GpuFault::Ecc),
            (g.oom, GpuFault::Oom),
            (g.lost, GpuFault::Lost),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| f.as_str())
        .collect();
        if !faults.is_empty() {
            r.fault = Some(faults.join(","));
        }
        r
    }
}

impl GpuBackend for SimBackend {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn count(&self) -> u32 {
        self.gpus().len() as u32
    }

    fn sample(&self) -> Vec<GpuReading> {
        self.gpus()
            .iter()
            .enumerate()
            .map(|(i, g)| self.reading(i as u32, g))
            .collect()
    }

    fn inject(&self, index: u32, fault: GpuFault) -> Result<(), GpuError> {
        let mut gpus = self.gpus();
        let g = gpus
            .get_mut(index as usize)
            .ok_or(GpuError::NoSuchGpu(index))?;
        match fault {
            GpuFault::Overheat => g.overheat = true,
            GpuFault::Ecc => g.ecc += 1,
            GpuFault::Oom => g.oom = true,
            GpuFault::Lost => g.lost = true,
            GpuFault::Clear => {
                *g = SimGpu {
                    busy: g.busy,
                    ..SimGpu::default()
                }
            }
        }
        tracing::info!(gpu = index, fault = fault.as_str(), "simulated GPU fault");
        Ok(())
    }

    fn set_busy(&self, index: u32, busy: bool) {
        if let Some(g) = self.gpus().get_mut(index as usize) {
            g.busy = busy;
        }
    }
}

#[cfg(test)]
mod tests {
    use gpuq_common::engine::GpuHealth;

    use super::super::evaluate;
    use super::*;

    fn sim(count: u32) -> SimBackend {
        SimBackend::new("host-a", count, 24_576, &Thresholds::default())
    }

    fn health(b: &SimBackend, index: u32) -> (GpuHealth, Vec<String>) {
        evaluate(&b.sample()[index as usize], &Thresholds::default())
    }

    #[test]
    fn simulated_gpus_have_stable_names_and_start_idle_and_healthy() {
        let b = sim(2);
        let r = b.sample();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].uuid, "GPU-sim-host-a-0");
        assert_eq!(r[1].uuid, "GPU-sim-host-a-1");
        assert_eq!(sim(2).sample()[1].uuid, r[1].uuid);
        assert_eq!(r[0].name, "gpuq simulated GPU");
        assert_eq!(r[0].memory_total_mb, 24_576);
        assert_eq!((r[0].utilization_pct, r[0].temperature_c), (0, 30));
        assert!(r[0].responding && r[0].fault.is_none());
        assert_eq!(health(&b, 0).0, GpuHealth::Healthy);
        let odd = SimBackend::new("a b/c", 1, 1024, &Thresholds::default());
        assert_eq!(odd.sample()[0].uuid, "GPU-sim-a-b-c-0");
    }

    #[test]
    fn a_busy_gpu_shows_load_but_stays_healthy() {
        let b = sim(2);
        let idle = b.sample()[1].clone();
        b.set_busy(1, true);
        let busy = b.sample()[1].clone();
        assert_eq!(busy.utilization_pct, 95);
        assert!(busy.memory_used_mb > idle.memory_used_mb);
        assert!(busy.temperature_c > idle.temperature_c);
        assert!(busy.power_w > idle.power_w);
        assert_eq!(health(&b, 1).0, GpuHealth::Healthy);
        assert_eq!(b.sample()[0], b.sample()[0], "the other GPU is untouched");
        assert_eq!(b.sample()[0].utilization_pct, 0);
        b.set_busy(1, false);
        assert_eq!(b.sample()[1], idle);
        b.set_busy(7, true); // unknown GPUs are ignored
    }

    #[test]
    fn busy_gpus_stay_cool_even_under_a_low_degraded_threshold() {
        let t = Thresholds {
            temp_degraded_c: 60,
            ..Thresholds::default()
        };
        let b = SimBackend::new("h", 1, 1024, &t);
        b.set_busy(0, true);
        assert_eq!(evaluate(&b.sample()[0], &t).0, GpuHealth::Healthy);
    }

    #[test]
    fn overheat_makes_a_gpu_unhealthy_at_99_degrees() {
        let b = sim(1);
        b.inject(0, GpuFault::Overheat).unwrap();
        let r = &b.sample()[0];
        assert_eq!(r.temperature_c, 99);
        assert_eq!(r.fault.as_deref(), Some("overheat"));
        let (h, reasons) = health(&b, 0);
        assert_eq!(h, GpuHealth::Unhealthy);
        assert!(
            reasons.contains(&"temperature 99°C ≥ 92°C".to_string()),
            "{reasons:?}"
        );
    }

    #[test]
    fn ecc_errors_accumulate_and_make_a_gpu_unhealthy_until_cleared() {
        let b = sim(1);
        b.inject(0, GpuFault::Ecc).unwrap();
        b.inject(0, GpuFault::Ecc).unwrap();
        assert_eq!(b.sample()[0].ecc_uncorrected, 2);
        assert_eq!(b.sample()[0].fault.as_deref(), Some("ecc"));
        assert_eq!(health(&b, 0).0, GpuHealth::Unhealthy);
        b.inject(0, GpuFault::Clear).unwrap();
        assert_eq!(b.sample()[0].ecc_uncorrected, 0);
        assert_eq!(health(&b, 0), (GpuHealth::Healthy, vec![]));
    }

    #[test]
    fn oom_fills_memory_and_degrades_a_gpu() {
        let b = sim(1);
        b.inject(0, GpuFault::Oom).unwrap();
        let r = &b.sample()[0];
        assert_eq!(r.memory_used_mb, r.memory_total_mb);
        assert_eq!(r.fault.as_deref(), Some("oom"));
        let (h, reasons) = health(&b, 0);
        assert_eq!(h, GpuHealth::Degraded);
        assert_eq!(reasons, ["memory full: 24576/24576 MB"]);
    }

    #[test]
    fn a_lost_gpu_stops_responding_with_zeroed_gauges() {
        let b = sim(1);
        b.set_busy(0, true);
        b.inject(0, GpuFault::Lost).unwrap();
        let r = &b.sample()[0];
        assert!(!r.responding);
        assert_eq!(
            (r.utilization_pct, r.memory_used_mb, r.temperature_c),
            (0, 0, 0)
        );
        assert_eq!(r.power_w, 0.0);
        assert_eq!(r.uuid, "GPU-sim-host-a-0", "identity survives");
        assert_eq!(r.fault.as_deref(), Some("lost"));
        assert_eq!(
            health(&b, 0),
            (GpuHealth::Unhealthy, vec!["not responding".into()])
        );
    }

    #[test]
    fn clear_recovers_from_every_fault_but_keeps_the_gpu_busy() {
        let b = sim(2);
        b.set_busy(0, true);
        for f in [
            GpuFault::Overheat,
            GpuFault::Ecc,
            GpuFault::Oom,
            GpuFault::Lost,
        ] {
            b.inject(0, f).unwrap();
        }
        assert_eq!(
            b.sample()[0].fault.as_deref(),
            Some("overheat,ecc,oom,lost")
        );
        assert_eq!(health(&b, 0).0, GpuHealth::Unhealthy);
        assert_eq!(health(&b, 1).0, GpuHealth::Healthy, "faults are per GPU");
        b.inject(0, GpuFault::Clear).unwrap();
        let r = &b.sample()[0];
        assert!(r.responding && r.fault.is_none());
        assert_eq!(r.utilization_pct, 95);
        assert_eq!(health(&b, 0), (GpuHealth::Healthy, vec![]));
    }

    #[test]
    fn injecting_into_a_gpu_that_does_not_exist_is_an_error() {
        let b = sim(2);
        assert!(matches!(
            b.inject(2, GpuFault::Lost),
            Err(GpuError::NoSuchGpu(2))
        ));
    }

    #[test]
    fn simulated_gpus_can_be_shared_between_threads() {
        let b = std::sync::Arc::new(sim(4));
        let handles: Vec<_> = (0..4u32)
            .map(|i| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        b.set_busy(i, true);
                        b.inject(i, GpuFault::Ecc).unwrap();
                        let _ = b.sample();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(
            b.sample()
                .iter()
                .all(|r| r.ecc_uncorrected == 100 && r.utilization_pct == 95)
        );
    }
}
