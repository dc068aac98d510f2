//! `gpuq engines [cordon|uncordon|drain|restart ID]` and `gpuq gpus fault ENGINE GPU FAULT`, through the
//! manager.

use gpuq_common::engine::{EngineView, GpuSnapshot};
use gpuq_common::job::now_ms;
use serde_json::Value;

use crate::cli::{EngineAction, EnginesArgs, GpusCmd};
use crate::output::{Table, fmt_age, or_dash};
use crate::{Ctx, Exit};

pub async fn run(ctx: &Ctx, a: &EnginesArgs) -> anyhow::Result<Exit> {
    let m = ctx.manager();
    match &a.action {
        None => {
            let engines = m.engines().await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&engines)?);
            } else {
                print!("{}", render_engines(&engines, now_ms()));
            }
        }
        Some(action) => {
            let (id, verb) = match action {
                EngineAction::Cordon { id } => (id, "cordon"),
                EngineAction::Uncordon { id } => (id, "uncordon"),
                EngineAction::Drain { id } => (id, "drain"),
                EngineAction::Restart { id } => (id, "restart"),
            };
            let answer = m.engine_action(id, verb).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                let state = serde_json::from_value::<EngineView>(answer)
                    .map(|v| format!(": now {}", v.state.as_str()))
                    .unwrap_or_default();
                println!("{id} {verb}: ok{state}");
            }
        }
    }
    Ok(Exit::Ok)
}

pub async fn run_gpus(ctx: &Ctx, cmd: &GpusCmd) -> anyhow::Result<Exit> {
    let GpusCmd::Fault {
        engine,
        gpu,
        fault,
        json,
    } = cmd;
    let name = fault.as_str();
    let answer = ctx.manager().gpu_fault(engine, *gpu, name).await?;
    if *json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!("{}", render_fault_answer(engine, *gpu, name, &answer));
    }
    Ok(Exit::Ok)
}

fn render_fault_answer(engine: &str, gpu: u32, fault: &str, answer: &Value) -> String {
    match serde_json::from_value::<GpuSnapshot>(answer.clone()) {
        Ok(g) => format!(
            "{engine} gpu {gpu} {fault}: now {}{}",
            g.health.as_str(),
            if g.reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", g.reasons.join(", "))
            }
        ),
        Err(_) => format!("{engine} gpu {gpu} {fault}: ok"),
    }
}

/// One row per GPU; the engine's columns are filled on its first row only.
pub fn render_engines(engines: &[EngineView], now: i64) -> String {
    if engines.is_empty() {
        return "(no engines have reported)\n".into();
    }
    let mut t = Table::new(&[
        "ENGINE",
        "STATE",
        "RUNNING",
        "LAST SEEN",
        "RESTARTS",
        "GPU",
        "HEALTH",
        "UTIL",
        "MEMORY",
        "TEMP",
        "JOB",
        "NOTE",
    ]);
    for e in engines {
        let hb = e.heartbeat.as_ref();
        let mut state = e.state.as_str().to_string();
        if let Some(admin) = e.admin
            && admin.as_str() != state
        {
            state = format!("{state} ({})", admin.as_str());
        }
        if e.restart_requested {
            state = format!("{state} (restarting)");
        }
        let head = vec![
            e.id.clone(),
            state,
            hb.map(|h| h.running_jobs.len().to_string())
                .unwrap_or_else(|| "-".into()),
            e.last_seen_ms
                .map(|t| fmt_age(now, t))
                .unwrap_or_else(|| "never".into()),
            e.restarts.to_string(),
        ];
        let gpus = hb.map(|h| h.gpus.as_slice()).unwrap_or_default();
        if gpus.is_empty() {
            let mut row = head;
            row.push("-".into());
            t.row(row);
            continue;
        }
        for (i, g) in gpus.iter().enumerate() {
            let mut row = if i == 0 {
                head.clone()
            } else {
                vec![String::new(); head.len()]
            };
            row.extend(gpu_cells(g));
            t.row(row);
        }
    }
    t.render()
}

fn gpu_cells(g: &GpuSnapshot) -> Vec<String> {
    let mut note: Vec<String> = g.reasons.clone();
    if let Some(f) = &g.fault {
        note.insert(0, format!("fault={f}"));
    }
    vec![
        g.index.to_string(),
        g.health.as_str().into(),
        format!("{}%", g.utilization_pct),
        format!("{}/{} MB", g.memory_used_mb, g.memory_total_mb),
        format!("{}C", g.temperature_c),
        or_dash(g.job.map(|j| short_id(&j.to_string()))),
        if note.is_empty() {
            "-".into()
        } else {
            note.join("; ")
        },
    ]
}

/// The last 12 hex digits of a UUID v7 (the random part), enough to tell jobs apart.
fn short_id(id: &str) -> String {
    let tail = id.len().saturating_sub(12);
    format!("…{}", &id[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuq_common::engine::{AdminState, EngineState, GpuHealth, Heartbeat};

    fn gpu(index: u32, health: GpuHealth) -> GpuSnapshot {
        GpuSnapshot {
            index,
            uuid: format!("GPU-{index}"),
            name: "sim".into(),
            health,
            reasons: if health == GpuHealth::Healthy {
                vec![]
            } else {
                vec!["temperature 95C".into()]
            },
            utilization_pct: 87,
            memory_used_mb: 1200,
            memory_total_mb: 16384,
            temperature_c: 54,
            power_w: 120.0,
            ecc_errors: 0,
            job: None,
            fault: (health != GpuHealth::Healthy).then(|| "overheat".into()),
        }
    }

    fn engine(id: &str, gpus: Vec<GpuSnapshot>) -> EngineView {
        EngineView {
            id: id.into(),
            restart_requested: false,
            state: EngineState::Healthy,
            admin: None,
            restarts: 0,
            last_seen_ms: Some(9_000),
            heartbeat: Some(Heartbeat {
                engine_id: id.into(),
                instance_id: "i".into(),
                version: "0.1.0".into(),
                gpu_backend: "sim".into(),
                pools: vec!["default".into()],
                gpus,
                running_jobs: vec![uuid::Uuid::nil()],
                consuming: true,
                jobs_processed: 3,
                jobs_failed: 0,
                avg_job_ms: 10.0,
                admin_url: "http://127.0.0.1:9001".into(),
                started_at_ms: 0,
                sent_at_ms: 9_000,
                heartbeat_interval_ms: 2_000,
                fault_injection: false,
            }),
        }
    }

    #[test]
    fn engines_render_one_row_per_gpu() {
        let mut sick = engine("worker-2", vec![gpu(0, GpuHealth::Unhealthy)]);
        sick.state = EngineState::Cordoned;
        sick.admin = Some(AdminState::Cordoned);
        let mut gone = engine("worker-3", vec![]);
        gone.state = EngineState::Offline;
        gone.heartbeat = None;
        gone.restarts = 2;
        let out = render_engines(
            &[
                engine(
                    "worker-1",
                    vec![gpu(0, GpuHealth::Healthy), gpu(1, GpuHealth::Healthy)],
                ),
                sick,
                gone,
            ],
            10_000,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(lines[0].starts_with("ENGINE"));
        assert!(lines[1].starts_with("worker-1  healthy"));
        assert!(
            lines[1].contains("1.00s ago")
                && lines[1].contains("87%")
                && lines[1].contains("1200/16384 MB")
                && lines[1].contains("54C")
        );
        assert!(
            lines[2].starts_with(' ') && lines[2].contains(" 1 "),
            "{out}"
        );
        assert!(
            lines[3].contains("cordoned") && lines[3].contains("fault=overheat; temperature 95C")
        );
        assert!(lines[4].starts_with("worker-3  offline") && lines[4].contains(" 2 "));
        assert_eq!(render_engines(&[], 0), "(no engines have reported)\n");
    }

    #[test]
    fn a_fault_answer_says_the_new_health() {
        let g = serde_json::to_value(gpu(1, GpuHealth::Unhealthy)).unwrap();
        assert_eq!(
            render_fault_answer("worker-1", 1, "overheat", &g),
            "worker-1 gpu 1 overheat: now unhealthy (temperature 95C)"
        );
        assert_eq!(
            render_fault_answer("w", 0, "clear", &Value::Null),
            "w gpu 0 clear: ok"
        );
    }
}
