//! Before/after snapshots of the fleet's counters: the workers' duplicate, redelivery and
//! discarded-result counters (from `/metrics`) and the manager's engine restart counts.
//!
//! A worker that crashed comes back with its counters at zero. A changed
//! `process_start_time_seconds` tells us it restarted: then only what it counted since the
//! restart is known, and the verdict says so. Otherwise a worker's delta is max(0, after − before).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::join_all;
use serde::Serialize;
use tokio::time::Instant;

use gpuq_client::manager::Manager;
use gpuq_client::worker::{Worker, WorkerCounters};

/// Each worker's counters, `None` where it could not be read.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub workers: Vec<(String, Option<WorkerCounters>)>,
}

/// Reads every worker's counters in parallel, retrying an unreachable one (restarting, perhaps)
/// every 500 ms for up to `retry_for`.
pub async fn snapshot(workers: &[Worker], retry_for: Duration) -> Snapshot {
    let reads = workers.iter().map(|w| async move {
        let deadline = Instant::now() + retry_for;
        loop {
            match w.counters().await {
                Ok(c) => return (w.name.clone(), Some(c)),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(_) => return (w.name.clone(), None),
            }
        }
    });
    Snapshot {
        workers: join_all(reads).await,
    }
}

/// What the workers counted during a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CounterDelta {
    /// Deliveries of finished jobs acked without running.
    pub duplicates_suppressed: Option<u64>,
    pub redeliveries: Option<u64>,
    /// Runs that finished after another final result was stored: work done twice.
    pub results_discarded: Option<u64>,
    /// Mean time a worker held a delivery before its job ran (placement, lease, store check)
    /// and after (result write, done marker, ack), in ms; `None` when no job ran.
    pub overhead_start_ms: Option<f64>,
    pub overhead_finish_ms: Option<f64>,
    /// Workers whose process restarted during the run.
    pub restarted: Vec<String>,
    /// Workers whose counters could not be read before or after.
    pub unreachable: Vec<String>,
}

impl CounterDelta {
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.restarted.is_empty() {
            notes.push(format!(
                "{} restarted during the run: only what they counted since the restart is included (may undercount)",
                self.restarted.join(", ")
            ));
        }
        if !self.unreachable.is_empty() {
            notes.push(format!(
                "{} unreachable before or after the run: their counters are not included",
                self.unreachable.join(", ")
            ));
        }
        notes
    }
}

pub fn delta(before: &Snapshot, after: &Snapshot) -> CounterDelta {
    let mut d = CounterDelta::default();
    let mut sums: Option<[f64; 3]> = None;
    // (sum, count) of each overhead stage.
    let mut start = (0.0, 0.0);
    let mut finish = (0.0, 0.0);
    for (name, b) in &before.workers {
        let a = after
            .workers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, a)| *a);
        let (Some(b), Some(a)) = (*b, a) else {
            d.unreachable.push(name.clone());
            continue;
        };
        let restarted =
            matches!((b.start_time, a.start_time), (Some(x), Some(y)) if (x - y).abs() > 0.5);
        let base = if restarted {
            d.restarted.push(name.clone());
            WorkerCounters::default()
        } else {
            b
        };
        let s = sums.get_or_insert([0.0; 3]);
        s[0] += (a.duplicates_suppressed - base.duplicates_suppressed).max(0.0);
        s[1] += (a.redeliveries - base.redeliveries).max(0.0);
        s[2] += (a.results_discarded - base.results_discarded).max(0.0);
        for (acc, a, b) in [
            (&mut start, a.overhead_start, base.overhead_start),
            (&mut finish, a.overhead_finish, base.overhead_finish),
        ] {
            acc.0 += (a.0 - b.0).max(0.0);
            acc.1 += (a.1 - b.1).max(0.0);
        }
    }
    let mean_ms = |(sum, count): (f64, f64)| (count >= 1.0).then(|| sum * 1000.0 / count);
    d.overhead_start_ms = mean_ms(start);
    d.overhead_finish_ms = mean_ms(finish);
    if let Some([sup, red, dis]) = sums {
        d.duplicates_suppressed = Some(sup.round() as u64);
        d.redeliveries = Some(red.round() as u64);
        d.results_discarded = Some(dis.round() as u64);
    }
    d
}

/// Engine id → restarts seen by the manager; `None` when the manager cannot be read.
pub async fn engine_restarts(m: &Manager) -> Option<BTreeMap<String, u64>> {
    let engines = m.engines().await.ok()?;
    Some(engines.into_iter().map(|e| (e.id, e.restarts)).collect())
}

/// Restarts counted during the run, over engines known before and after.
pub fn restarts_delta(
    before: &Option<BTreeMap<String, u64>>,
    after: &Option<BTreeMap<String, u64>>,
) -> Option<u64> {
    let (b, a) = (before.as_ref()?, after.as_ref()?);
    Some(
        a.iter()
            .filter_map(|(id, n)| b.get(id).map(|m| n.saturating_sub(*m)))
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(sup: f64, red: f64, dis: f64, start: f64) -> Option<WorkerCounters> {
        Some(WorkerCounters {
            duplicates_suppressed: sup,
            redeliveries: red,
            results_discarded: dis,
            start_time: Some(start),
            ..WorkerCounters::default()
        })
    }

    fn snap(v: Vec<Option<WorkerCounters>>) -> Snapshot {
        Snapshot {
            workers: v
                .into_iter()
                .enumerate()
                .map(|(i, c)| (format!("worker-{}", i + 1), c))
                .collect(),
        }
    }

    #[test]
    fn deltas_are_summed_over_workers() {
        let before = snap(vec![c(1.0, 2.0, 0.0, 100.0), c(0.0, 0.0, 0.0, 100.0)]);
        let after = snap(vec![c(3.0, 5.0, 1.0, 100.0), c(1.0, 1.0, 0.0, 100.0)]);
        let d = delta(&before, &after);
        assert_eq!(d.duplicates_suppressed, Some(3));
        assert_eq!(d.redeliveries, Some(4));
        assert_eq!(d.results_discarded, Some(1));
        assert!(d.notes().is_empty());
    }

    #[test]
    fn overhead_is_the_mean_over_the_run_across_workers() {
        let with = |start: (f64, f64), finish: (f64, f64)| {
            let mut w = c(0.0, 0.0, 0.0, 100.0).unwrap();
            w.overhead_start = start;
            w.overhead_finish = finish;
            Some(w)
        };
        let before = snap(vec![
            with((1.0, 100.0), (2.0, 100.0)),
            with((0.0, 0.0), (0.0, 0.0)),
        ]);
        // worker-1 ran 300 jobs (0.3 s and 0.9 s more), worker-2 100 jobs (0.1 s and 0.3 s).
        let after = snap(vec![
            with((1.3, 400.0), (2.9, 400.0)),
            with((0.1, 100.0), (0.3, 100.0)),
        ]);
        let d = delta(&before, &after);
        assert!((d.overhead_start_ms.unwrap() - 1.0).abs() < 1e-9);
        assert!((d.overhead_finish_ms.unwrap() - 3.0).abs() < 1e-9);
        // No job ran: no mean.
        let d = delta(&before, &before);
        assert_eq!((d.overhead_start_ms, d.overhead_finish_ms), (None, None));
    }

    #[test]
    fn a_restarted_worker_counts_from_zero_and_is_noted() {
        let before = snap(vec![c(10.0, 10.0, 0.0, 100.0)]);
        let after = snap(vec![c(2.0, 3.0, 0.0, 250.0)]);
        let d = delta(&before, &after);
        assert_eq!(d.duplicates_suppressed, Some(2));
        assert_eq!(d.redeliveries, Some(3));
        assert_eq!(d.restarted, vec!["worker-1"]);
        assert!(d.notes()[0].contains("restarted"));
    }

    #[test]
    fn a_counter_that_went_down_without_a_known_restart_counts_zero() {
        let mut a = c(1.0, 1.0, 0.0, 0.0).unwrap();
        a.start_time = None;
        let d = delta(&snap(vec![c(5.0, 5.0, 0.0, 100.0)]), &snap(vec![Some(a)]));
        assert_eq!(d.duplicates_suppressed, Some(0));
    }

    #[test]
    fn unreachable_workers_are_left_out_and_all_unreachable_is_unknown() {
        let d = delta(
            &snap(vec![c(0.0, 0.0, 0.0, 1.0), None]),
            &snap(vec![c(1.0, 0.0, 0.0, 1.0), c(9.0, 9.0, 9.0, 1.0)]),
        );
        assert_eq!(d.duplicates_suppressed, Some(1));
        assert_eq!(d.unreachable, vec!["worker-2"]);
        let d = delta(&snap(vec![None]), &snap(vec![None]));
        assert_eq!(d.results_discarded, None);
    }

    #[test]
    fn restarts_are_counted_for_engines_known_before_and_after() {
        let b = Some(BTreeMap::from([
            ("worker-1".to_string(), 1),
            ("worker-2".to_string(), 0),
        ]));
        let a = Some(BTreeMap::from([
            ("worker-1".to_string(), 2),
            ("worker-2".to_string(), 1),
            ("worker-9".to_string(), 7),
        ]));
        assert_eq!(restarts_delta(&b, &a), Some(2));
        assert_eq!(restarts_delta(&None, &a), None);
    }
}
