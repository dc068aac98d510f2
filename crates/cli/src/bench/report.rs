//! The bench's numbers, computed from what was submitted and the final records, and their text.

use std::collections::BTreeMap;

use gpuq_common::JobStatus;
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::fleet::CounterDelta;
use crate::load::LoadResult;
use crate::output::fmt_ms;
use crate::stats::Latency;
use crate::wait::WaitOutcome;

pub struct BenchInput<'a> {
    pub args: &'a BenchArgs,
    pub load: &'a LoadResult,
    pub waited: &'a WaitOutcome,
    pub counters: &'a CounterDelta,
    /// GPU slots of the healthy engines serving the run's pool, when the manager said.
    pub slots: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub jobs: u32,
    pub duration_ms: u64,
    pub concurrency: usize,
    /// Jobs per request (`--batch`); absent: one job per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    pub rate: Option<f64>,
    pub submitted: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_reasons: BTreeMap<String, u64>,
    pub submit_seconds: f64,
    /// Submitted jobs per second of submitting.
    pub submit_rate: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    pub cancelled: u64,
    /// Accepted but not final before the timeout.
    pub lost: u64,
    /// From the first submit to the last job's `finished_at`.
    pub end_to_end_seconds: Option<f64>,
    /// Final jobs per end-to-end second.
    pub jobs_per_second: Option<f64>,
    /// Per job, `finished_at − created_at`.
    pub latency: Latency,
    /// Per job, `started_at − created_at` (its last attempt's): the part of the latency spent
    /// before the run — publish, queue, delivery, lease — to tell a slow tail's side.
    pub to_start: Latency,
    /// Results the workers discarded because one was already stored (work done twice);
    /// `None` when no worker's `/metrics` could be read.
    pub duplicates: Option<u64>,
    pub duplicates_suppressed: Option<u64>,
    pub redeliveries: Option<u64>,
    /// Mean ms a worker held a job's delivery before its run and after it (see
    /// `gpuq_job_overhead_seconds`): with prefetch = free GPU slots, each slot's next delivery
    /// waits for this and for the broker's commit of the ack.
    pub worker_overhead_start_ms: Option<f64>,
    pub worker_overhead_finish_ms: Option<f64>,
    /// Sum over the final jobs of `finished_at − started_at` (their last attempt's run, with the
    /// worker's hold after it), in seconds.
    pub busy_seconds: f64,
    /// GPU slots of the healthy engines serving the pool at the start (from the manager).
    pub slots: Option<u32>,
    /// `busy_seconds / (slots × end_to_end_seconds)`: how much of the fleet's GPU time the run
    /// kept busy.
    pub slot_utilisation: Option<f64>,
    pub notes: Vec<String>,
}

impl BenchReport {
    pub fn compute(i: BenchInput<'_>) -> Self {
        let finals: Vec<_> = i.waited.finals.values().collect();
        let count = |s: JobStatus| finals.iter().filter(|r| r.status == s).count() as u64;
        let latency = Latency::from_samples(
            finals
                .iter()
                .filter_map(|r| r.finished_at.map(|f| f - r.created_at))
                .collect(),
        );
        let to_start = Latency::from_samples(
            finals
                .iter()
                .filter_map(|r| Some(r.started_at? - r.created_at))
                .collect(),
        );
        let last_final = finals.iter().filter_map(|r| r.finished_at).max();
        let end_to_end = match (i.load.first_submit_ms, last_final) {
            (Some(first), Some(last)) => Some(((last - first).max(1)) as f64 / 1000.0),
            _ => None,
        };
        let submit_seconds = i.load.wall.as_secs_f64();
        let busy_ms: i64 = finals
            .iter()
            .filter_map(|r| Some(r.finished_at? - r.started_at?))
            .map(|ms| ms.max(0))
            .sum();
        let busy_seconds = busy_ms as f64 / 1000.0;
        let slot_utilisation = match (i.slots, end_to_end) {
            (Some(n), Some(e)) if n > 0 => Some(busy_seconds / (f64::from(n) * e)),
            _ => None,
        };
        let mut notes = i.counters.notes();
        if !i.waited.missing.is_empty() {
            notes.push(format!(
                "{} accepted jobs are unknown to the gateway (404)",
                i.waited.missing.len()
            ));
        }
        Self {
            jobs: i.args.jobs,
            duration_ms: i.args.duration_ms,
            concurrency: i.args.concurrency,
            batch: i.args.batch,
            rate: i.args.rate,
            submitted: i.load.submitted,
            accepted: i.load.accepted.len() as u64,
            rejected: i.load.rejected_total(),
            rejected_reasons: i.load.rejected.clone(),
            submit_seconds,
            submit_rate: i.load.submitted as f64 / submit_seconds.max(1e-9),
            succeeded: count(JobStatus::Succeeded),
            failed: count(JobStatus::Failed),
            dead_lettered: count(JobStatus::DeadLettered),
            cancelled: count(JobStatus::Cancelled),
            lost: i.waited.pending.len() as u64,
            end_to_end_seconds: end_to_end,
            jobs_per_second: end_to_end.map(|s| finals.len() as f64 / s),
            latency,
            to_start,
            duplicates: i.counters.results_discarded,
            duplicates_suppressed: i.counters.duplicates_suppressed,
            redeliveries: i.counters.redeliveries,
            worker_overhead_start_ms: i.counters.overhead_start_ms,
            worker_overhead_finish_ms: i.counters.overhead_finish_ms,
            busy_seconds,
            slots: i.slots,
            slot_utilisation,
            notes,
        }
    }

    pub fn render(&self) -> String {
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into());
        let ms = |v: Option<i64>| v.map(fmt_ms).unwrap_or_else(|| "-".into());
        let mut pace = match self.rate {
            Some(r) => format!("at {r}/s"),
            None => format!("{} in flight", self.concurrency),
        };
        if let Some(n) = self.batch {
            pace.push_str(&format!(", {n} jobs a request (batch)"));
        }
        let mut s = format!(
            "jobs         {} × simulate {} ms, {pace}\n",
            self.jobs, self.duration_ms
        );
        s.push_str(&format!(
            "submitted    {} in {:.2}s = {:.1}/s (accepted {}, rejected {})\n",
            self.submitted, self.submit_seconds, self.submit_rate, self.accepted, self.rejected
        ));
        for (reason, n) in &self.rejected_reasons {
            s.push_str(&format!("  rejected   {n} × {reason}\n"));
        }
        s.push_str(&format!(
            "final        {} succeeded, {} failed, {} dead-lettered, {} cancelled\n",
            self.succeeded, self.failed, self.dead_lettered, self.cancelled
        ));
        match (self.end_to_end_seconds, self.jobs_per_second) {
            (Some(e), Some(r)) => s.push_str(&format!(
                "end to end   {:.2}s from the first submit to the last result = {r:.1} jobs/s\n",
                e
            )),
            _ => s.push_str("end to end   -\n"),
        }
        s.push_str(&format!(
            "latency      p50 {}  p95 {}  p99 {}  max {}  (submit → final, {} jobs)\n",
            ms(self.latency.p50_ms),
            ms(self.latency.p95_ms),
            ms(self.latency.p99_ms),
            ms(self.latency.max_ms),
            self.latency.count
        ));
        s.push_str(&format!(
            "  to start   p50 {}  p95 {}  p99 {}  max {}  (submit → run start)\n",
            ms(self.to_start.p50_ms),
            ms(self.to_start.p95_ms),
            ms(self.to_start.p99_ms),
            ms(self.to_start.max_ms),
        ));
        s.push_str(&format!("lost         {}\n", self.lost));
        s.push_str(&format!(
            "duplicates   {} (results discarded: work done twice)  suppressed {}  redeliveries {}\n",
            opt(self.duplicates),
            opt(self.duplicates_suppressed),
            opt(self.redeliveries)
        ));
        if let (Some(a), Some(b)) = (
            self.worker_overhead_start_ms,
            self.worker_overhead_finish_ms,
        ) {
            s.push_str(&format!(
                "worker hold  {a:.2} ms before the run + {b:.2} ms after it (lease; result, done marker, ack), mean per job\n"
            ));
        }
        if let (Some(n), Some(u)) = (self.slots, self.slot_utilisation) {
            s.push_str(&format!(
                "GPU slots    {n}, busy {:.1} s of {:.1} s = {:.1}% utilised\n",
                self.busy_seconds,
                f64::from(n) * self.end_to_end_seconds.unwrap_or(0.0),
                u * 100.0
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::tests::record;
    use crate::load::Accepted;
    use std::time::Duration;

    #[test]
    fn throughput_and_latency_come_from_the_store_stamps() {
        let args = BenchArgs {
            jobs: 3,
            rate: None,
            duration_ms: 0,
            concurrency: 64,
            batch: None,
            pool: None,
            timeout: Duration::from_secs(1),
            json: false,
        };
        let jobs = [
            record(JobStatus::Succeeded, 1_000, Some(1_001), Some(1_010)),
            record(JobStatus::Succeeded, 1_002, Some(1_003), Some(1_030)),
            record(JobStatus::DeadLettered, 1_004, Some(1_008), Some(2_000)),
        ];
        let mut waited = WaitOutcome::default();
        for j in &jobs {
            waited.finals.insert(j.id, j.clone());
        }
        let load = LoadResult {
            submitted: 4,
            accepted: jobs
                .iter()
                .map(|j| Accepted {
                    id: j.id,
                    submit_ms: j.created_at,
                })
                .collect(),
            rejected: BTreeMap::from([("503 unavailable".to_string(), 1)]),
            first_submit_ms: Some(1_000),
            wall: Duration::from_millis(500),
            ..LoadResult::default()
        };
        let counters = CounterDelta {
            results_discarded: Some(0),
            overhead_start_ms: Some(0.75),
            overhead_finish_ms: Some(1.5),
            ..CounterDelta::default()
        };
        let r = BenchReport::compute(BenchInput {
            args: &args,
            load: &load,
            waited: &waited,
            counters: &counters,
            slots: Some(2),
        });
        assert_eq!((r.accepted, r.rejected, r.lost), (3, 1, 0));
        assert_eq!((r.succeeded, r.dead_lettered), (2, 1));
        assert_eq!(r.submit_rate, 8.0);
        assert_eq!(r.end_to_end_seconds, Some(1.0));
        assert_eq!(r.jobs_per_second, Some(3.0));
        assert_eq!(r.latency.p50_ms, Some(28));
        assert_eq!(r.latency.max_ms, Some(996));
        assert_eq!((r.to_start.p50_ms, r.to_start.max_ms), (Some(1), Some(4)));
        let text = r.render();
        assert!(text.contains("to start   p50 1ms"), "{text}");
        assert!(text.contains("= 3.0 jobs/s"), "{text}");
        assert!(text.contains("rejected   1 × 503 unavailable"));
        assert!(text.contains("duplicates   0 ") && text.contains("suppressed n/a"));
        assert!(
            text.contains("worker hold  0.75 ms before the run + 1.50 ms after it"),
            "{text}"
        );
        // Runs of 9, 27 and 992 ms over 2 slots for 1 s.
        assert!((r.busy_seconds - 1.028).abs() < 1e-9);
        assert!((r.slot_utilisation.unwrap() - 0.514).abs() < 1e-9);
        assert!(
            text.contains("GPU slots    2, busy 1.0 s of 2.0 s = 51.4% utilised"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["latency"]["p99_ms"], 996);
        assert_eq!(json["duplicates"], 0);
    }
}
