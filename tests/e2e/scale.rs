//! Issue 18's many-engines benchmark: N worker processes × 8 simulated GPUs on the shared stack,
//! the manager watching all of them. Measured, not asserted (timings on a shared 2-core machine
//! are not a pass/fail signal); correctness is asserted: every job final once, none lost.
//!
//! `GPUQ_BENCH_ENGINES=3,10,25,50 [GPUQ_BENCH_MANAGER_NICE=-10] cargo nextest run --workspace --run-ignored only
//!  -E 'test(/budget_bench_engines/)' --no-capture`

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use gpuq_e2e::{Stack, StackOptions};

use crate::pipeline::bench;

const GPUS_PER_ENGINE: usize = 8;

/// CPU seconds (user + system) the process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // In USER_HZ ticks, which are 100 a second on every Linux ABI.
    Some(ticks / 100.0)
}

/// The `p` percentile of sorted latencies in ms (the harness's `percentile`, on whole µs).
fn percentile_ms(sorted: &[f64], p: f64) -> Option<f64> {
    let us: Vec<i64> = sorted.iter().map(|ms| (ms * 1000.0) as i64).collect();
    (!us.is_empty()).then(|| gpuq_e2e::percentile(&us, p) as f64 / 1000.0)
}

/// Polls the manager's `path` every 100 ms until `stop`; answers the latencies in ms.
async fn poll(stack: &Stack, path: &str, stop: tokio::sync::watch::Receiver<bool>) -> Vec<f64> {
    let url = format!("{}{path}", stack.manager_url);
    let mut lat = vec![];
    while !*stop.borrow() {
        let t = Instant::now();
        let r = stack
            .http
            .get(&url)
            .bearer_auth(&stack.read_token)
            .send()
            .await;
        if let Ok(r) = r
            && r.status().is_success()
            && r.bytes().await.is_ok()
        {
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lat.sort_by(f64::total_cmp);
    lat
}

/// The machine's CPU: (busy, total) jiffies over all cores, and the runnable tasks now, from
/// `/proc/stat`.
fn machine_cpu() -> Option<(f64, f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = cpu.iter().take(8).sum();
    // idle and iowait are the 4th and 5th fields.
    let busy = total - cpu.get(3)? - cpu.get(4)?;
    let running = stat
        .lines()
        .find_map(|l| l.strip_prefix("procs_running "))?
        .trim()
        .parse()
        .ok()?;
    Some((busy, total, running))
}

/// Samples the machine every 200 ms until `stop`: the share of both cores busy, and the mean
/// number of runnable tasks (a 2-core machine with more than 2 is queueing for CPU).
async fn sample_machine(stop: tokio::sync::watch::Receiver<bool>) -> Value {
    let (b0, t0, _) = machine_cpu().unwrap_or_default();
    let mut runnable = vec![];
    while !*stop.borrow() {
        if let Some((_, _, r)) = machine_cpu() {
            runnable.push(r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (b1, t1, _) = machine_cpu().unwrap_or_default();
    runnable.sort_by(f64::total_cmp);
    json!({
        "cpu_busy": (b1 - b0) / (t1 - t0).max(1.0),
        "runnable_mean": runnable.iter().sum::<f64>() / (runnable.len().max(1) as f64),
        "runnable_p90": runnable.get(runnable.len() * 9 / 10),
    })
}

/// Ten rounds of 1 s jobs over every slot, submitted as `submit` says, while the manager's
/// overview and its `/healthz` (which does no work: the latency of being scheduled) are polled,
/// the manager's CPU is sampled over the steady part, and the machine's CPU over the whole run.
async fn one_second_rounds(stack: &Stack, slots: usize, submit: &[&str]) -> Value {
    let manager_pid = stack.manager.as_ref().unwrap().pid().await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cpu = async {
        // The steady part of a run of about ten seconds: from its 2nd to its 8th second.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (t0, c0) = (Instant::now(), cpu_seconds(manager_pid));
        tokio::time::sleep(Duration::from_secs(6)).await;
        let c1 = cpu_seconds(manager_pid);
        Some((c1? - c0?) / t0.elapsed().as_secs_f64())
    };
    let jobs = (slots * 10).to_string();
    let args = [&["--jobs", jobs.as_str(), "--duration-ms", "1000"], submit].concat();
    let run = async {
        let r = bench(stack, &args).await;
        stop_tx.send(true).unwrap();
        r
    };
    let (long, overview, healthz, machine, manager_cpu) = tokio::join!(
        run,
        poll(stack, "/v1/overview", stop_rx.clone()),
        poll(stack, "/healthz", stop_rx.clone()),
        sample_machine(stop_rx),
        cpu
    );
    assert_eq!(long["succeeded"], long["submitted"], "{long:#}");
    assert_eq!(long["lost"], 0, "{long:#}");
    assert_eq!(long["duplicates"], 0, "{long:#}");
    assert_eq!(long["slots"], slots, "{long:#}");
    json!({
        "jobs": long["succeeded"],
        "submit_seconds": long["submit_seconds"],
        "wall_s": long["end_to_end_seconds"],
        "slot_utilisation": long["slot_utilisation"],
        "worker_hold_ms": [long["worker_overhead_start_ms"], long["worker_overhead_finish_ms"]],
        "overview_ms": {
            "count": overview.len(),
            "p50": percentile_ms(&overview, 0.5),
            "p99": percentile_ms(&overview, 0.99),
            "max": overview.last(),
        },
        "healthz_ms": {"p50": percentile_ms(&healthz, 0.5), "p99": percentile_ms(&healthz, 0.99)},
        "manager_cpu_of_a_core": manager_cpu,
        "machine": machine,
        "lost": long["lost"],
        "duplicates": long["duplicates"],
    })
}

/// Gives every thread of the process the nice value `nice` (negative: ahead of the workers), as
/// an operator would for the control plane on a machine it shares with workers.
fn renice(pid: u32, nice: i32) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    for task in tasks.flatten() {
        let ok = std::process::Command::new("renice")
            .args(["-n", &nice.to_string(), "-p"])
            .arg(task.file_name())
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "renice {nice} of thread {:?}", task.file_name());
    }
}

/// One engine count: full speed with zero-length jobs, then ten rounds of 1 s jobs over every
/// slot (one request per job, then in batches) while the manager's overview is polled and its
/// CPU sampled. `manager_nice`: the manager's threads reniced first.
async fn measure(engines: usize, manager_nice: Option<i32>) -> Value {
    let slots = engines * GPUS_PER_ENGINE;
    let stack = Stack::start_healthy(StackOptions {
        workers: engines,
        gpus: format!("sim:{GPUS_PER_ENGINE}"),
        // The services' default heartbeat interval, not the harness's quicker one.
        env: vec![("GPUQ_HEARTBEAT_INTERVAL_MS".into(), "2000".into())],
        ..StackOptions::default()
    })
    .await;
    if let Some(nice) = manager_nice {
        renice(stack.manager.as_ref().unwrap().pid().await.unwrap(), nice);
    }
    // The overview's own cost: polled for 3 s with the fleet idle.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopper = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop_tx.send(true).unwrap();
    };
    let (idle, ()) = tokio::join!(poll(&stack, "/v1/overview", stop_rx), stopper);
    bench(&stack, &["--jobs", "300", "--duration-ms", "0"]).await;
    let full = bench(&stack, &["--jobs", "3000", "--duration-ms", "0"]).await;
    assert_eq!(full["succeeded"], full["submitted"], "{full:#}");
    assert_eq!(full["lost"], 0, "{full:#}");
    assert_eq!(full["duplicates"], 0, "{full:#}");
    // One request per job (the CLI's default concurrency), then the same sweep as batches of
    // 500, as a sweep is submitted (`gpuq submit --array`, `POST /v1/jobs/batch`).
    let single = one_second_rounds(&stack, slots, &[]).await;
    let batched = one_second_rounds(&stack, slots, &["--batch", "500"]).await;
    let row = json!({
        "engines": engines,
        "slots": slots,
        "manager_nice": manager_nice,
        "full_speed_jobs_per_second": full["jobs_per_second"],
        "full_speed_worker_hold_ms": [full["worker_overhead_start_ms"], full["worker_overhead_finish_ms"]],
        "overview_idle_ms": {"p50": percentile_ms(&idle, 0.5), "p99": percentile_ms(&idle, 0.99)},
        "one_second_jobs": single,
        "one_second_jobs_batched": batched,
    });
    stack.stop().await;
    row
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run on purpose, alone"]
async fn budget_bench_engines_at_scale() {
    let counts: Vec<usize> = std::env::var("GPUQ_BENCH_ENGINES")
        .unwrap_or_else(|_| "3,10,25,50".into())
        .split(',')
        .map(|n| n.trim().parse().expect("GPUQ_BENCH_ENGINES: numbers"))
        .collect();
    // GPUQ_BENCH_MANAGER_NICE=-10: the manager ahead of the workers in the CPU's queue, to tell
    // the overview's own latency from waiting for one of the 2 cores behind 50 workers.
    let nice = std::env::var("GPUQ_BENCH_MANAGER_NICE")
        .ok()
        .map(|n| n.parse().expect("GPUQ_BENCH_MANAGER_NICE: a number"));
    for n in counts {
        let row = measure(n, nice).await;
        println!("BUDGET engines {row}");
    }
}
