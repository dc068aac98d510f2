//! `gpuq tester run`: arm one scenario on one worker, submit short simulate jobs, wait, judge.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Ctx;
use crate::load::{LoadPlan, LoadResult, submit_many};
use crate::output::progress_bar;
use crate::tester::events::{EventLog, watch_workers};
use crate::tester::flow::{self, FinishOptions};
use crate::tester::scenario::Scenario;
use crate::tester::verdict::Verdict;
use gpuq_client::gateway::{Gateway, SubmitBody};
use gpuq_client::worker::Worker;

#[derive(Debug, Clone)]
pub struct RunPlan {
    /// 1-based, as in the menu.
    pub worker: usize,
    pub scenario: Scenario,
    pub count: u32,
    pub jobs: u32,
    pub duration_ms: u64,
    pub fail_probability: Option<f64>,
    pub timeout: Duration,
    pub settle: Duration,
    pub concurrency: usize,
    /// Draw progress bars and print events (false for --json).
    pub visible: bool,
    pub quiet: bool,
}

pub async fn run_plan(ctx: &Ctx, plan: &RunPlan) -> anyhow::Result<Verdict> {
    let workers = ctx.workers();
    let Some(target) = plan
        .worker
        .checked_sub(1)
        .and_then(|i| workers.get(i))
        .cloned()
    else {
        bail!(
            "there is no worker {} (GPUQ_WORKER_URLS names {})",
            plan.worker,
            workers.len()
        );
    };
    if plan.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    if ctx.cfg.admin_token.value.is_none() {
        bail!("arming a fault needs the admin token: set GPUQ_ADMIN_TOKEN or --admin-token");
    }
    let log = EventLog::new(plan.quiet);
    let gw = ctx.gateway();
    let before = flow::before(ctx, &workers).await;

    let armed = target
        .arm(plan.scenario.as_str(), plan.count)
        .await
        .with_context(|| {
            format!(
                "arming {} on {} ({})",
                plan.scenario.as_str(),
                target.name,
                target.base()
            )
        })?;
    if !armed.enabled {
        bail!(
            "{} has fault injection off (start it with GPUQ_FAULT_INJECTION=true)",
            target.name
        );
    }
    log.push(format!(
        "armed {} ×{} on {}: {}",
        plan.scenario.as_str(),
        plan.count,
        target.name,
        plan.scenario.describe()
    ));

    let stop = CancellationToken::new();
    let watcher = watch_workers(workers.clone(), log.clone(), stop.clone());

    let load = submit_jobs(&gw, plan, &log).await;

    let mut v = flow::finish(
        ctx,
        &gw,
        &workers,
        &before,
        &load,
        &log,
        &FinishOptions {
            timeout: plan.timeout,
            settle: plan.settle,
            visible: plan.visible,
            expect_success: true,
        },
    )
    .await;
    stop.cancel();
    let _ = watcher.await;

    clear_leftover_faults(&target, plan, &mut v).await;
    v.mode = "run".into();
    v.scenario = Some(format!("{} ×{}", plan.scenario.as_str(), plan.count));
    v.worker = Some(target.name.clone());
    v.events = log.take();
    Ok(v)
}

/// Submits the plan's short simulate jobs, drawing a progress bar.
async fn submit_jobs(gw: &Gateway, plan: &RunPlan, log: &EventLog) -> LoadResult {
    let mut body = SubmitBody::simulate(plan.duration_ms);
    if let Some(p) = plan.fail_probability {
        body.params = json!({ "duration_ms": plan.duration_ms, "fail_probability": p });
    }
    let load_plan = LoadPlan {
        jobs: plan.jobs.into(),
        rate: None,
        concurrency: plan.concurrency.max(1),
        retry_for: Some(Duration::from_secs(30)),
        batch: None,
    };
    let pb = progress_bar(plan.jobs.into(), "submitted", plan.visible);
    log.attach(&pb);
    let load = submit_many(
        gw,
        Arc::new(body),
        &load_plan,
        &CancellationToken::new(),
        &pb,
    )
    .await;
    pb.finish_and_clear();
    log.push(format!(
        "submitted {}: {} accepted, {} rejected",
        load.submitted,
        load.accepted.len(),
        load.rejected_total()
    ));

    load
}

/// A fault the worker never used would hit the next person's jobs: report it and clear it.
async fn clear_leftover_faults(target: &Worker, plan: &RunPlan, v: &mut Verdict) {
    if let Ok(f) = target.faults().await {
        let left: u32 = f
            .armed
            .iter()
            .filter(|a| a.scenario == plan.scenario.as_str())
            .map(|a| a.remaining)
            .sum();
        if left > 0 && plan.scenario != Scenario::Normal {
            let cleared = target.clear_faults().await.is_ok();
            v.notes.push(format!(
                "{} took fewer faulty jobs than armed: {left} left{}",
                target.name,
                if cleared { ", now cleared" } else { "" }
            ));
        }
    }
}
