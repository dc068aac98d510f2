//! The worker's pulse: every second it samples its GPUs and grades their health, refreshes its
//! liveness key, reads operator intent and notices Redis outages; every heartbeat interval it
//! reports to the manager (with its engine's credential, `GPUQ_WORKER_TOKEN`), and says goodbye
//! when it stops; every status interval it logs the original project's status line.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gpuq_common::engine::{GpuHealth, Heartbeat};
use gpuq_common::job::now_ms;

use crate::gpu::snapshot;
use crate::runner::StopReason;
use crate::state::Worker;

pub async fn run(w: Arc<Worker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hb_every = w.config.heartbeat_interval;
    let status_every = w.config.status_interval.max(Duration::from_secs(1));
    let mut last_hb = tokio::time::Instant::now() - hb_every;
    let mut last_status = tokio::time::Instant::now();
    let mut hb_tick = tokio::time::interval(hb_every.min(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = w.shutdown.cancelled() => break,
            _ = tick.tick() => sample(&w).await,
            _ = hb_tick.tick() => {}
        }
        if last_hb.elapsed() >= hb_every {
            last_hb = tokio::time::Instant::now();
            heartbeat(&w).await;
        }
        if last_status.elapsed() >= status_every {
            last_status = tokio::time::Instant::now();
            status_line(&w);
        }
    }
}

async fn sample(w: &Arc<Worker>) {
    let g = w.gpus.clone();
    let Ok(readings) = tokio::task::spawn_blocking(move || g.sample()).await else {
        return;
    };
    let jobs = w.slots.jobs();
    let snaps: Vec<_> = readings
        .iter()
        .map(|r| {
            let mut s = snapshot(r, &w.thresholds);
            s.job = jobs
                .iter()
                .find(|(i, _)| *i == r.index)
                .and_then(|(_, j)| *j);
            s
        })
        .collect();
    let health: Vec<(u32, GpuHealth)> = snaps.iter().map(|s| (s.index, s.health)).collect();
    w.slots.set_health(&health);
    let cap = w.slots.capacity();
    w.metrics
        .slots
        .with_label_values(&["free"])
        .set(i64::from(cap.free));
    w.metrics
        .slots
        .with_label_values(&["busy"])
        .set(i64::from(cap.busy));
    w.metrics
        .slots
        .with_label_values(&["unavailable"])
        .set(i64::from(cap.total - cap.schedulable));
    if !w.config.finish_on_unhealthy {
        let sick = w.slots.jobs_on_unhealthy();
        if !sick.is_empty() {
            tracing::warn!(jobs = ?sick, "stopping jobs on unhealthy GPUs");
            w.stop_jobs(Some(&sick), StopReason::GpuUnhealthy);
        }
    }
    *w.snapshot.lock().expect("snapshot") = snaps;

    // Redis: liveness, operator intent. An outage closes the consumer gate.
    let ok = match w.coord.refresh_alive().await {
        Ok(()) => {
            if let Ok((admin, restart)) = w.coord.intent(&w.engine_id).await {
                if restart && !w.restart.is_cancelled() {
                    tracing::warn!(worker_id = %w.engine_id, "the operator asked for a restart: taking no new jobs, finishing the running ones, then exiting");
                    w.restart.cancel();
                }
                w.admin.send_if_modified(|a| {
                    let changed = *a != admin;
                    if changed {
                        tracing::info!(worker_id = %w.engine_id, admin = ?admin, "operator state changed");
                    }
                    *a = admin;
                    changed
                });
            }
            true
        }
        Err(e) => {
            w.metrics.redis_errors.with_label_values(&["alive"]).inc();
            if *w.redis_ok.borrow() {
                tracing::error!(error.message = %e, "Redis unreachable: taking no new jobs until it is back");
            }
            false
        }
    };
    w.redis_ok.send_if_modified(|r| {
        let changed = *r != ok;
        if changed && ok {
            tracing::info!("Redis is back: taking jobs again");
        }
        *r = ok;
        changed
    });
}

/// The heartbeat this worker would send now.
pub fn current(w: &Worker) -> Heartbeat {
    let processed = w.stats.processed.load(Ordering::Relaxed);
    let total = w.stats.total_ms.load(Ordering::Relaxed);
    Heartbeat {
        engine_id: w.engine_id.clone(),
        instance_id: w.instance_id.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        gpu_backend: w.gpus.kind().into(),
        pools: w.pools.clone(),
        gpus: w.snapshot.lock().expect("snapshot").clone(),
        running_jobs: w.running_jobs(),
        consuming: w.consuming.load(Ordering::Relaxed),
        jobs_processed: processed,
        jobs_failed: w.stats.failed.load(Ordering::Relaxed),
        avg_job_ms: if processed == 0 {
            0.0
        } else {
            total as f64 / processed as f64
        },
        admin_url: w.config.admin_url.clone(),
        started_at_ms: w.started_at_ms,
        sent_at_ms: now_ms(),
        heartbeat_interval_ms: w.config.heartbeat_interval.as_millis() as u64,
        fault_injection: w.config.fault_injection,
    }
}

async fn heartbeat(w: &Worker) {
    if w.config.manager_url.is_empty() {
        return;
    }
    let url = format!("{}/v1/heartbeats", w.config.manager_url);
    let sent = w
        .http
        .post(&url)
        .bearer_auth(w.config.worker_token.expose())
        .json(&current(w))
        .send()
        .await;
    // A refusal changes nothing here: the worker keeps taking jobs and sends the next
    // heartbeat on time. A 409 (the previous process of this engine crashed and its heartbeat
    // has not expired yet) turns into a 200 within a few intervals.
    match sent {
        Ok(r) if r.status().is_success() => {}
        Ok(r) if r.status() == reqwest::StatusCode::CONFLICT => tracing::info!(
            "manager refused the heartbeat: the previous process of this engine is still live there; retrying"
        ),
        Ok(r) => tracing::warn!(
            status = r.status().as_u16(),
            "manager refused the heartbeat (is GPUQ_WORKER_TOKEN this engine's credential?)"
        ),
        Err(e) => tracing::debug!(error.message = %e, "manager unreachable for the heartbeat"),
    }
}

/// Tells the manager this process leaves (graceful stop), so that the engine shows offline at
/// once and the next process of the engine is accepted without waiting for this one's
/// heartbeat to expire. Best effort: without it the successor waits a few intervals.
pub async fn goodbye(w: &Worker) {
    if w.config.manager_url.is_empty() {
        return;
    }
    let url = format!(
        "{}/v1/heartbeats/{}/{}",
        w.config.manager_url, w.engine_id, w.instance_id
    );
    match w
        .http
        .delete(&url)
        .bearer_auth(w.config.worker_token.expose())
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => {
            tracing::info!(worker_id = %w.engine_id, "said goodbye to the manager");
        }
        Ok(r) => tracing::warn!(status = r.status().as_u16(), "manager refused the goodbye"),
        Err(e) => tracing::warn!(error.message = %e, "manager unreachable for the goodbye"),
    }
}

fn status_line(w: &Worker) {
    let processed = w.stats.processed.load(Ordering::Relaxed);
    let total = w.stats.total_ms.load(Ordering::Relaxed);
    let snaps = w.snapshot.lock().expect("snapshot").clone();
    let states: Vec<String> = snaps
        .iter()
        .map(|s| format!("{}:{}", s.index, s.health.as_str()))
        .collect();
    tracing::info!(
        worker_id = %w.engine_id,
        jobs_processed = processed,
        jobs_failed = w.stats.failed.load(Ordering::Relaxed),
        avg_job_ms = if processed == 0 { 0.0 } else { total as f64 / processed as f64 },
        running = w.running_jobs().len(),
        consuming = w.consuming.load(Ordering::Relaxed),
        gpus = %states.join(","),
        "status"
    );
}
