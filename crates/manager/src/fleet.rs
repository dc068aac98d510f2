//! Fleet gauges: each engine's state, running jobs and GPU readings on `/metrics`. Refreshed on
//! every heartbeat and by a background loop (which is what turns a silent engine `offline`);
//! series of GPUs that disappeared are removed rather than left at their last value, and so are
//! all the series of an engine the registry forgot.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use gpuq_common::engine::{EngineState, EngineView, GpuHealth};
use gpuq_common::metrics::ManagerMetrics;

const MIB: f64 = 1024.0 * 1024.0;

/// Writes engine and GPU views into the manager's gauges.
pub struct FleetGauges {
    metrics: ManagerMetrics,
    /// GPU indices exported per engine, to remove the series of GPUs that went away.
    exported: Mutex<HashMap<String, BTreeSet<u32>>>,
}

impl FleetGauges {
    pub fn new(metrics: ManagerMetrics) -> Self {
        Self {
            metrics,
            exported: Mutex::new(HashMap::new()),
        }
    }

    pub fn observe_all(&self, views: &[EngineView]) {
        for v in views {
            self.observe(v);
        }
    }

    /// Sets one engine's gauges from its view (an offline engine exports no GPU series).
    pub fn observe(&self, view: &EngineView) {
        let m = &self.metrics;
        let engine = view.id.as_str();
        for s in EngineState::ALL {
            m.engine_state
                .with_label_values(&[engine, s.as_str()])
                .set(i64::from(s == view.state));
        }
        let hb = view.heartbeat.as_ref();
        let running = hb.map_or(0, |h| h.running_jobs.len());
        m.engine_running_jobs
            .with_label_values(&[engine])
            .set(i64::try_from(running).unwrap_or(i64::MAX));

        let gpus: BTreeSet<u32> = hb
            .map(|h| h.gpus.iter().map(|g| g.index).collect())
            .unwrap_or_default();
        let gone: Vec<u32> = {
            let mut exported = self.exported.lock().expect("gauge lock");
            let before = exported
                .insert(engine.to_string(), gpus.clone())
                .unwrap_or_default();
            before.difference(&gpus).copied().collect()
        };
        for index in gone {
            self.remove_gpu(engine, &index.to_string());
        }
        for g in hb.map(|h| h.gpus.as_slice()).unwrap_or_default() {
            let gpu = g.index.to_string();
            let labels = [engine, gpu.as_str()];
            m.gpu_utilization
                .with_label_values(&labels)
                .set(f64::from(g.utilization_pct.min(100)) / 100.0);
            m.gpu_memory_used
                .with_label_values(&labels)
                .set(g.memory_used_mb as f64 * MIB);
            m.gpu_memory_total
                .with_label_values(&labels)
                .set(g.memory_total_mb as f64 * MIB);
            m.gpu_temperature
                .with_label_values(&labels)
                .set(f64::from(g.temperature_c));
            m.gpu_power.with_label_values(&labels).set(g.power_w);
            for h in GpuHealth::ALL {
                m.gpu_health
                    .with_label_values(&[engine, gpu.as_str(), h.as_str()])
                    .set(i64::from(h == g.health));
            }
        }
    }

    /// Removes every series of an engine the registry forgot (offline too long), so its labels
    /// do not stay on `/metrics` forever.
    pub fn forget(&self, engine: &str) {
        let m = &self.metrics;
        for s in EngineState::ALL {
            let _ = m.engine_state.remove_label_values(&[engine, s.as_str()]);
        }
        let _ = m.engine_running_jobs.remove_label_values(&[engine]);
        let gpus = self
            .exported
            .lock()
            .expect("gauge lock")
            .remove(engine)
            .unwrap_or_default();
        for index in gpus {
            self.remove_gpu(engine, &index.to_string());
        }
    }

    fn remove_gpu(&self, engine: &str, gpu: &str) {
        let m = &self.metrics;
        let labels = [engine, gpu];
        for family in [
            &m.gpu_utilization,
            &m.gpu_memory_used,
            &m.gpu_memory_total,
            &m.gpu_temperature,
            &m.gpu_power,
        ] {
            let _ = family.remove_label_values(&labels);
        }
        for h in GpuHealth::ALL {
            let _ = m.gpu_health.remove_label_values(&[engine, gpu, h.as_str()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuq_common::engine::{GpuSnapshot, Heartbeat};
    use gpuq_common::metrics::{encode, new_registry};

    fn gpu(index: u32, health: GpuHealth) -> GpuSnapshot {
        GpuSnapshot {
            index,
            uuid: format!("GPU-{index}"),
            name: "sim".into(),
            health,
            reasons: vec![],
            utilization_pct: 50,
            memory_used_mb: 1024,
            memory_total_mb: 2048,
            temperature_c: 60,
            power_w: 120.5,
            ecc_errors: 0,
            job: None,
            fault: None,
        }
    }

    fn view(gpus: Vec<GpuSnapshot>, state: EngineState) -> EngineView {
        EngineView {
            id: "w1".into(),
            restart_requested: false,
            state,
            admin: None,
            restarts: 0,
            last_seen_ms: Some(1),
            heartbeat: Some(Heartbeat {
                engine_id: "w1".into(),
                instance_id: "i".into(),
                version: "0".into(),
                gpu_backend: "sim".into(),
                pools: vec!["default".into()],
                gpus,
                running_jobs: vec![],
                consuming: true,
                jobs_processed: 0,
                jobs_failed: 0,
                avg_job_ms: 0.0,
                admin_url: String::new(),
                started_at_ms: 0,
                sent_at_ms: 0,
                heartbeat_interval_ms: 1000,
                fault_injection: false,
            }),
        }
    }

    #[test]
    fn gpus_that_disappear_lose_their_series() {
        let r = new_registry("test");
        let g = FleetGauges::new(ManagerMetrics::new(&r));
        g.observe(&view(
            vec![gpu(0, GpuHealth::Healthy), gpu(1, GpuHealth::Degraded)],
            EngineState::Degraded,
        ));
        let text = encode(&r);
        assert!(
            text.contains(r#"gpuq_gpu_utilization_ratio{engine="w1",gpu="1"} 0.5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gpuq_gpu_memory_total_bytes{engine="w1",gpu="0"} 2147483648"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gpuq_gpu_health{engine="w1",gpu="1",state="degraded"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gpuq_engine_state{engine="w1",state="degraded"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gpuq_engine_state{engine="w1",state="healthy"} 0"#),
            "{text}"
        );

        g.observe(&view(
            vec![gpu(0, GpuHealth::Healthy)],
            EngineState::Healthy,
        ));
        let text = encode(&r);
        assert!(!text.contains(r#"gpu="1""#), "{text}");
        assert!(
            text.contains(r#"gpuq_engine_state{engine="w1",state="healthy"} 1"#),
            "{text}"
        );

        let mut offline = view(vec![], EngineState::Offline);
        offline.heartbeat = None;
        g.observe(&offline);
        let text = encode(&r);
        assert!(!text.contains("gpuq_gpu_utilization_ratio{"), "{text}");
        assert!(
            text.contains(r#"gpuq_engine_state{engine="w1",state="offline"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn a_forgotten_engine_loses_every_series() {
        let r = new_registry("test");
        let g = FleetGauges::new(ManagerMetrics::new(&r));
        g.observe(&view(
            vec![gpu(0, GpuHealth::Healthy), gpu(1, GpuHealth::Healthy)],
            EngineState::Healthy,
        ));
        let mut other = view(vec![gpu(0, GpuHealth::Healthy)], EngineState::Healthy);
        other.id = "w2".into();
        g.observe(&other);
        assert!(encode(&r).contains(r#"engine="w1""#));
        g.forget("w1");
        let text = encode(&r);
        assert!(!text.contains(r#"engine="w1""#), "{text}");
        assert!(
            text.contains(r#"gpuq_gpu_utilization_ratio{engine="w2",gpu="0"} 0.5"#),
            "{text}"
        );
    }
}
