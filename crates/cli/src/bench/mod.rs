//! `gpuq bench`: submit N simulate jobs through the gateway, wait for every one to be final, and
//! report submit rate, end-to-end throughput, latency percentiles, lost and duplicate counts.
//!
//! Times come from the store: a job's latency is its `finished_at − created_at` (both stamped on
//! this machine by the gateway and the worker), and the run ends at the last `finished_at`, so the
//! polling interval does not bias the numbers.

pub mod report;

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio_util::sync::CancellationToken;

use crate::cli::BenchArgs;
use crate::load::{LoadPlan, submit_many};
use crate::output::{progress_bar, show_progress};
use crate::wait::{WaitOptions, wait_all};
use crate::{Ctx, Exit, fleet};
use gpuq_client::endpoint::http_client;
use gpuq_client::gateway::SubmitBody;
use gpuq_common::engine::{EngineState, GpuHealth};

pub use report::{BenchInput, BenchReport};

pub async fn run(ctx: &Ctx, a: &BenchArgs) -> anyhow::Result<Exit> {
    let report = measure(ctx, a).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if report.lost == 0 {
        Exit::Ok
    } else {
        Exit::Failed
    })
}

/// Submits, waits for every accepted job, and computes the report.
pub async fn measure(ctx: &Ctx, a: &BenchArgs) -> anyhow::Result<BenchReport> {
    if a.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let visible = show_progress(a.json);
    let gw = ctx.gateway_with(http_client(a.concurrency));
    let workers = ctx.workers();
    let slots = pool_slots(ctx, a.pool.as_deref()).await;
    let before = fleet::snapshot(&workers, Duration::from_secs(2)).await;

    let mut body = SubmitBody::simulate(a.duration_ms);
    body.pool = a.pool.clone();
    let plan = LoadPlan {
        jobs: a.jobs.into(),
        rate: a.rate,
        concurrency: a.concurrency,
        retry_for: None,
        batch: a.batch,
    };
    let pb = progress_bar(a.jobs.into(), "submitted", visible);
    let load = submit_many(&gw, Arc::new(body), &plan, &CancellationToken::new(), &pb).await;
    pb.finish_and_clear();
    if load.accepted.is_empty() {
        let reasons: Vec<String> = load
            .rejected
            .iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect();
        bail!(
            "the gateway accepted none of the jobs ({})",
            reasons.join(", ")
        );
    }

    let pb = progress_bar(load.accepted.len() as u64, "final", visible);
    let opts = WaitOptions {
        min_interval: Duration::from_millis(200),
        ..WaitOptions::new(a.timeout)
    };
    let waited = wait_all(&gw, load.accepted.iter().map(|j| j.id), &opts, |done, _| {
        pb.set_position(done as u64)
    })
    .await;
    pb.finish_and_clear();
    // Late duplicates show up after the result is stored; give them a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = fleet::snapshot(&workers, Duration::from_secs(5)).await;
    let counters = fleet::delta(&before, &after);

    let mut report = BenchReport::compute(BenchInput {
        args: a,
        load: &load,
        waited: &waited,
        counters: &counters,
        slots,
    });
    if let Some(e) = &waited.last_error {
        report
            .notes
            .push(format!("{} polls failed; last: {e}", waited.poll_errors));
    }
    Ok(report)
}

/// GPU slots of the healthy engines that serve `pool`, as the manager sees them; `None` when
/// no manager is configured or it does not answer.
async fn pool_slots(ctx: &Ctx, pool: Option<&str>) -> Option<u32> {
    let pool = pool.map_or_else(gpuq_common::job::default_pool, str::to_string);
    let engines = ctx.manager().engines().await.ok()?;
    let slots = engines
        .iter()
        .filter(|e| e.state == EngineState::Healthy)
        .filter_map(|e| e.heartbeat.as_ref())
        .filter(|hb| hb.pools.contains(&pool))
        .map(|hb| {
            hb.gpus
                .iter()
                .filter(|g| g.health == GpuHealth::Healthy)
                .count() as u32
        })
        .sum();
    Some(slots)
}
