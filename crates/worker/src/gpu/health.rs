//! GPU health: turns one reading into healthy / degraded / unhealthy, with short reasons an
//! operator can read in `gpuq engines`. Only healthy GPUs take new jobs.

use gpuq_common::engine::GpuHealth;

use super::GpuReading;

/// The limits past which a GPU is degraded or unhealthy (`GPUQ_GPU_*`), parsed with the
/// worker's configuration.
pub use gpuq_common::config::GpuThresholds as Thresholds;

/// The health of one GPU and why it is not healthy (empty when it is). The worst rule wins.
pub fn evaluate(r: &GpuReading, t: &Thresholds) -> (GpuHealth, Vec<String>) {
    if !r.responding {
        return (GpuHealth::Unhealthy, vec!["not responding".into()]);
    }
    let mut health = GpuHealth::Healthy;
    let mut reasons = Vec::new();
    let mut flag = |h: GpuHealth, reason: String| {
        if rank(h) > rank(health) {
            health = h;
        }
        reasons.push(reason);
    };

    if r.temperature_c >= t.temp_unhealthy_c {
        let (c, limit) = (r.temperature_c, t.temp_unhealthy_c);
        flag(
            GpuHealth::Unhealthy,
            format!("temperature {c}°C ≥ {limit}°C"),
        );
    } else if r.temperature_c >= t.temp_degraded_c {
        let (c, limit) = (r.temperature_c, t.temp_degraded_c);
        flag(
            GpuHealth::Degraded,
            format!("temperature {c}°C ≥ {limit}°C"),
        );
    }
    if t.ecc_unhealthy > 0 && r.ecc_uncorrected >= t.ecc_unhealthy {
        let n = r.ecc_uncorrected;
        flag(
            GpuHealth::Unhealthy,
            format!("{n} uncorrected ECC error(s)"),
        );
    }
    if r.xid_errors > 0 {
        let n = r.xid_errors;
        flag(GpuHealth::Unhealthy, format!("{n} critical XID error(s)"));
    }
    if r.hw_slowdown {
        flag(GpuHealth::Degraded, "hardware slowdown throttling".into());
    }
    if t.memory_degraded_pct > 0
        && r.memory_total_mb > 0
        && r.memory_used_mb * 100 >= u64::from(t.memory_degraded_pct) * r.memory_total_mb
    {
        let (used, total) = (r.memory_used_mb, r.memory_total_mb);
        flag(
            GpuHealth::Degraded,
            format!("memory full: {used}/{total} MB"),
        );
    }
    (health, reasons)
}

fn rank(h: GpuHealth) -> u8 {
    match h {
        GpuHealth::Healthy => 0,
        GpuHealth::Degraded => 1,
        GpuHealth::Unhealthy => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        temp_degraded_c: 83,
        temp_unhealthy_c: 92,
        memory_degraded_pct: 98,
        ecc_unhealthy: 1,
    };

    fn fine() -> GpuReading {
        GpuReading {
            index: 0,
            uuid: "GPU-test-0".into(),
            name: "test".into(),
            responding: true,
            utilization_pct: 50,
            memory_used_mb: 1000,
            memory_total_mb: 10_000,
            temperature_c: 60,
            power_w: 100.0,
            ecc_uncorrected: 0,
            xid_errors: 0,
            hw_slowdown: false,
            fault: None,
        }
    }

    fn health_of(change: impl FnOnce(&mut GpuReading)) -> (GpuHealth, Vec<String>) {
        let mut r = fine();
        change(&mut r);
        evaluate(&r, &T)
    }

    #[test]
    fn a_cool_quiet_gpu_is_healthy_with_no_reasons() {
        assert_eq!(health_of(|_| {}), (GpuHealth::Healthy, vec![]));
    }

    #[test]
    fn a_gpu_that_does_not_answer_is_unhealthy_whatever_its_last_gauges() {
        let (h, reasons) = health_of(|r| {
            r.responding = false;
            r.temperature_c = 99;
        });
        assert_eq!(h, GpuHealth::Unhealthy);
        assert_eq!(reasons, ["not responding"]);
    }

    #[test]
    fn temperature_degrades_then_makes_unhealthy_at_the_thresholds() {
        assert_eq!(health_of(|r| r.temperature_c = 82).0, GpuHealth::Healthy);
        assert_eq!(
            health_of(|r| r.temperature_c = 83),
            (
                GpuHealth::Degraded,
                vec!["temperature 83°C ≥ 83°C".to_string()]
            )
        );
        assert_eq!(health_of(|r| r.temperature_c = 91).0, GpuHealth::Degraded);
        assert_eq!(
            health_of(|r| r.temperature_c = 97),
            (
                GpuHealth::Unhealthy,
                vec!["temperature 97°C ≥ 92°C".to_string()]
            )
        );
    }

    #[test]
    fn uncorrected_ecc_errors_at_the_limit_make_a_gpu_unhealthy() {
        assert_eq!(
            health_of(|r| r.ecc_uncorrected = 1),
            (
                GpuHealth::Unhealthy,
                vec!["1 uncorrected ECC error(s)".to_string()]
            )
        );
        let lenient = Thresholds {
            ecc_unhealthy: 3,
            ..T
        };
        let mut r = fine();
        r.ecc_uncorrected = 2;
        assert_eq!(evaluate(&r, &lenient).0, GpuHealth::Healthy);
        r.ecc_uncorrected = 3;
        assert_eq!(evaluate(&r, &lenient).0, GpuHealth::Unhealthy);
        let off = Thresholds {
            ecc_unhealthy: 0,
            ..T
        };
        assert_eq!(evaluate(&r, &off).0, GpuHealth::Healthy);
    }

    #[test]
    fn any_critical_xid_error_makes_a_gpu_unhealthy() {
        assert_eq!(
            health_of(|r| r.xid_errors = 2),
            (
                GpuHealth::Unhealthy,
                vec!["2 critical XID error(s)".to_string()]
            )
        );
    }

    #[test]
    fn hardware_slowdown_throttling_degrades_a_gpu() {
        assert_eq!(
            health_of(|r| r.hw_slowdown = true),
            (
                GpuHealth::Degraded,
                vec!["hardware slowdown throttling".to_string()]
            )
        );
    }

    #[test]
    fn memory_nearly_full_degrades_a_gpu() {
        assert_eq!(
            health_of(|r| r.memory_used_mb = 9_799).0,
            GpuHealth::Healthy
        );
        assert_eq!(
            health_of(|r| r.memory_used_mb = 9_800),
            (
                GpuHealth::Degraded,
                vec!["memory full: 9800/10000 MB".to_string()]
            )
        );
        // A device that reports no memory total is not judged by memory.
        assert_eq!(
            health_of(|r| {
                r.memory_used_mb = 0;
                r.memory_total_mb = 0;
            })
            .0,
            GpuHealth::Healthy
        );
        let off = Thresholds {
            memory_degraded_pct: 0,
            ..T
        };
        let mut r = fine();
        r.memory_used_mb = r.memory_total_mb;
        assert_eq!(evaluate(&r, &off).0, GpuHealth::Healthy);
    }

    #[test]
    fn the_worst_rule_wins_and_every_reason_is_listed() {
        let (h, reasons) = health_of(|r| {
            r.hw_slowdown = true;
            r.memory_used_mb = r.memory_total_mb;
            r.ecc_uncorrected = 5;
        });
        assert_eq!(h, GpuHealth::Unhealthy);
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        let (h, reasons) = health_of(|r| {
            r.hw_slowdown = true;
            r.temperature_c = 85;
        });
        assert_eq!(h, GpuHealth::Degraded);
        assert_eq!(reasons.len(), 2, "{reasons:?}");
    }

    #[test]
    fn thresholds_come_from_settings() {
        use gpuq_common::config::{Settings, WorkerConfig};
        let s = Settings {
            gpu_temp_degraded_c: 70,
            gpu_temp_unhealthy_c: 80,
            gpu_memory_degraded_pct: 90,
            gpu_ecc_unhealthy: 4,
            ..Settings::default()
        };
        assert_eq!(
            WorkerConfig::from_settings(&s).unwrap().thresholds,
            Thresholds {
                temp_degraded_c: 70,
                temp_unhealthy_c: 80,
                memory_degraded_pct: 90,
                ecc_unhealthy: 4,
            }
        );
        assert_eq!(Thresholds::default(), T);
    }
}
