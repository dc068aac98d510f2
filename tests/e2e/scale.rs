//! Issue 18's many-engines benchmark: N worker processes × 8 simulated GPUs on the shared stack,
//! the manager watching all of them. Measured, not asserted (timings on a shared 2-core machine
//! are not a pass/fail signal); correctness is asserted: every job final once, none lost.
//!
//! `GPUQ_BENCH_ENGINES=3,10,25,50 cargo nextest run --workspace --run-ignored only
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

/// Polls the manager's overview every 100 ms until `stop`; answers the latencies in ms.
async fn poll_overview(stack: &Stack, stop: tokio::sync::watch::Receiver<bool>) -> Vec<f64> {
    let url = format!("{}/v1/overview", stack.manager_url);
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

/// One engine count: full speed with zero-length jobs, then ten rounds of 1 s jobs over every
/// slot while the manager's overview is polled and its CPU sampled.
async fn measure(engines: usize) -> Value {
    let slots = engines * GPUS_PER_ENGINE;
    let stack = Stack::start_healthy(StackOptions {
        workers: engines,
        gpus: format!("sim:{GPUS_PER_ENGINE}"),
        // The services' default heartbeat interval, not the harness's quicker one.
        env: vec![("GPUQ_HEARTBEAT_INTERVAL_MS".into(), "2000".into())],
        ..StackOptions::default()
    })
    .await;
    // The overview's own cost: polled for 3 s with the fleet idle.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopper = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop_tx.send(true).unwrap();
    };
    let (idle, ()) = tokio::join!(poll_overview(&stack, stop_rx), stopper);
    bench(&stack, &["--jobs", "300", "--duration-ms", "0"]).await;
    let full = bench(&stack, &["--jobs", "3000", "--duration-ms", "0"]).await;

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
    let run = async {
        let r = bench(&stack, &["--jobs", &jobs, "--duration-ms", "1000"]).await;
        stop_tx.send(true).unwrap();
        r
    };
    let (long, overview, manager_cpu) = tokio::join!(run, poll_overview(&stack, stop_rx), cpu);
    for r in [&full, &long] {
        assert_eq!(r["succeeded"], r["submitted"], "{r:#}");
        assert_eq!(r["lost"], 0, "{r:#}");
        assert_eq!(r["duplicates"], 0, "{r:#}");
    }
    assert_eq!(long["slots"], slots, "{long:#}");
    let row = json!({
        "engines": engines,
        "slots": slots,
        "full_speed_jobs_per_second": full["jobs_per_second"],
        "full_speed_worker_hold_ms": [full["worker_overhead_start_ms"], full["worker_overhead_finish_ms"]],
        "one_second_jobs": long["succeeded"],
        "one_second_wall_s": long["end_to_end_seconds"],
        "slot_utilisation": long["slot_utilisation"],
        "one_second_worker_hold_ms": [long["worker_overhead_start_ms"], long["worker_overhead_finish_ms"]],
        "overview_idle_ms": {"p50": percentile_ms(&idle, 0.5), "p99": percentile_ms(&idle, 0.99)},
        "overview_ms": {
            "count": overview.len(),
            "p50": percentile_ms(&overview, 0.5),
            "p99": percentile_ms(&overview, 0.99),
            "max": overview.last(),
        },
        "manager_cpu_of_a_core": manager_cpu,
        "lost": long["lost"],
        "duplicates": long["duplicates"],
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
    for n in counts {
        let row = measure(n).await;
        println!("BUDGET engines {row}");
    }
}
