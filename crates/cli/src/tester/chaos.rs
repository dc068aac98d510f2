//! `gpuq tester chaos`: jobs flow at a steady rate while, at random moments, random faults are
//! armed on random workers and (with the stack script) one RabbitMQ node at a time, or Redis, is
//! stopped and started again. Never two nodes at once: a majority of the cluster stays up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Ctx;
use crate::cli::ChaosArgs;
use crate::load::{LoadPlan, submit_many};
use crate::output::{fmt_duration, progress_bar, show_progress};
use crate::tester::events::{EventLog, watch_workers};
use crate::tester::flow::{self, FinishOptions};
use crate::tester::scenario::Scenario;
use crate::tester::verdict::Verdict;
use gpuq_client::gateway::SubmitBody;
use gpuq_client::worker::Worker;

/// SplitMix64: small, seedable, good enough to pick faults and pauses.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// `--stack-script` / `GPUQ_STACK_SCRIPT`, else `scripts/stack.sh` here or in a parent directory.
pub fn stack_script(a: &ChaosArgs, cwd: &Path) -> anyhow::Result<Option<PathBuf>> {
    if a.no_stack {
        return Ok(None);
    }
    if let Some(p) = &a.stack_script {
        if !p.is_file() {
            bail!("stack script {} does not exist", p.display());
        }
        return Ok(Some(p.clone()));
    }
    Ok(cwd
        .ancestors()
        .map(|d| d.join("scripts").join("stack.sh"))
        .find(|p| p.is_file()))
}

pub async fn chaos(ctx: &Ctx, a: &ChaosArgs) -> anyhow::Result<Verdict> {
    if a.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let script = stack_script(a, &cwd)?;
    let seed = a.seed.unwrap_or_else(|| gpuq_common::job::now_ms() as u64);
    let visible = show_progress(a.json);
    let log = EventLog::new(a.json);
    let workers = ctx.workers();
    if workers.is_empty() {
        bail!("GPUQ_WORKER_URLS names no worker");
    }
    let gw = ctx.gateway();
    let before = flow::before(ctx, &workers).await;
    log.push(format!(
        "chaos for {} at {}/s, seed {seed}; {}",
        fmt_duration(a.duration),
        a.rate,
        match &script {
            Some(p) => format!("stack script {}", p.display()),
            None => "worker faults only (no stack script)".into(),
        }
    ));

    let stop = CancellationToken::new();
    let interrupted = CancellationToken::new();
    tokio::spawn(on_ctrl_c(interrupted.clone(), log.clone()));
    let watcher = watch_workers(workers.clone(), log.clone(), stop.clone());
    let faults = tokio::spawn(inject_faults(
        workers.clone(),
        Rng::new(seed),
        log.clone(),
        stop.clone(),
    ));
    let infra = script.map(|s| {
        tokio::spawn(cycle_infra(
            s,
            Rng::new(seed ^ 0xA5A5_A5A5),
            log.clone(),
            stop.clone(),
        ))
    });

    let jobs = (a.duration.as_secs_f64() * a.rate).ceil().max(1.0) as u64;
    let plan = LoadPlan {
        jobs,
        rate: Some(a.rate),
        concurrency: 64,
        retry_for: Some(Duration::from_secs(30)),
        batch: None,
    };
    let pb = progress_bar(jobs, "submitted", visible);
    log.attach(&pb);
    let body = Arc::new(SubmitBody::simulate(a.duration_ms));
    let load = submit_many(&gw, body, &plan, &interrupted, &pb).await;
    pb.finish_and_clear();
    stop.cancel();
    let _ = faults.await;
    if let Some(infra) = infra {
        let _ = infra.await;
    }
    log.push(format!(
        "submitted {}: {} accepted, {} rejected; faults stopped",
        load.submitted,
        load.accepted.len(),
        load.rejected_total()
    ));

    let mut v = flow::finish(
        ctx,
        &gw,
        &workers,
        &before,
        &load,
        &log,
        &FinishOptions {
            timeout: a.timeout,
            settle: a.settle,
            visible,
            expect_success: true,
        },
    )
    .await;
    let _ = watcher.await;
    for w in &workers {
        let _ = w.clear_faults().await;
    }
    v.mode = "chaos".into();
    v.seed = Some(seed);
    v.events = log.take();
    Ok(v)
}

/// The first Ctrl-C stops submitting (the run still waits and judges); a second one exits.
async fn on_ctrl_c(interrupted: CancellationToken, log: EventLog) {
    if tokio::signal::ctrl_c().await.is_ok() {
        log.push("interrupted: no more submissions; waiting for the accepted jobs (Ctrl-C again to quit)");
        interrupted.cancel();
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    }
}

/// Sleeps, unless `stop` fires first; false when stopped.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.cancelled() => false,
    }
}

async fn inject_faults(workers: Vec<Worker>, mut rng: Rng, log: EventLog, stop: CancellationToken) {
    while pause(rng.millis(2_000, 6_000), &stop).await {
        let w = &workers[rng.range(0, workers.len() as u64 - 1) as usize];
        let s = Scenario::ALL[rng.range(1, 4) as usize];
        match w.arm(s.as_str(), 1).await {
            Ok(_) => log.push(format!("armed {} on {}", s.as_str(), w.name)),
            Err(e) => log.push(format!("arming {} on {} failed: {e}", s.as_str(), w.name)),
        }
    }
}

/// One outage at a time: a RabbitMQ node (any of the three, never two at once) or Redis, each
/// brought back before the next; whatever is down when `stop` fires is started again.
async fn cycle_infra(script: PathBuf, mut rng: Rng, log: EventLog, stop: CancellationToken) {
    while pause(rng.millis(4_000, 10_000), &stop).await {
        // Two outages in three are a broker node, one is Redis.
        if rng.range(0, 2) < 2 {
            let node = rng.range(1, 3).to_string();
            if run_script(&script, &["node-stop", &node], &log).await {
                pause(rng.millis(5_000, 12_000), &stop).await;
            }
            run_script(&script, &["node-start", &node], &log).await;
        } else {
            if run_script(&script, &["redis-stop"], &log).await {
                pause(Duration::from_secs(5), &stop).await;
            }
            run_script(&script, &["redis-start"], &log).await;
        }
    }
}

/// Runs the stack script, logs the outcome, and says whether it succeeded.
async fn run_script(script: &Path, args: &[&str], log: &EventLog) -> bool {
    let started = Instant::now();
    let mut cmd = if is_executable(script) {
        tokio::process::Command::new(script)
    } else {
        let mut c = tokio::process::Command::new("bash");
        c.arg(script);
        c
    };
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let what = args.join(" ");
    match tokio::time::timeout(Duration::from_secs(180), cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => {
            log.push(format!("{what}: ok ({})", fmt_duration(started.elapsed())));
            true
        }
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            log.push(format!("{what}: failed ({}): {last}", out.status));
            false
        }
        Ok(Err(e)) => {
            log.push(format!("{what}: could not run {}: {e}", script.display()));
            false
        }
        Err(_) => {
            log.push(format!("{what}: timed out after 180s"));
            false
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rng_is_seeded_and_stays_in_range() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..1000 {
            let x = a.range(1, 3);
            assert_eq!(x, b.range(1, 3));
            assert!((1..=3).contains(&x));
        }
        let mut r = Rng::new(7);
        let hits: std::collections::BTreeSet<u64> = (0..200).map(|_| r.range(1, 4)).collect();
        assert_eq!(hits.len(), 4, "every scenario 1-4 gets picked");
    }
}
