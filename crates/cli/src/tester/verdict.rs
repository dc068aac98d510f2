//! The tester's verdict: what happened to every accepted job, what the fleet counted, and PASS
//! or FAIL. FAIL when a job was lost, a result was stored twice (an id listed more than once, or
//! a final record that changed after it was read), or a job that should have succeeded did not.

use std::collections::HashMap;

use gpuq_common::{JobRecord, JobStatus};
use serde::Serialize;
use uuid::Uuid;

use crate::fleet::CounterDelta;
use crate::output::{fmt_duration, fmt_ms};
use crate::tester::events::Event;

/// Everything observed about one run, before judging.
#[derive(Debug, Default)]
pub struct Observed {
    pub submitted: u64,
    pub accepted: Vec<Uuid>,
    pub rejected: u64,
    /// Final records read while waiting.
    pub finals: HashMap<Uuid, JobRecord>,
    /// Accepted jobs not final at the deadline, with their last known status.
    pub pending: Vec<(Uuid, Option<JobStatus>)>,
    /// How often each accepted id appeared in the full listing, and the records listed;
    /// `None` when the listing could not be read.
    pub listing: Option<(HashMap<Uuid, usize>, Vec<JobRecord>)>,
    pub counters: CounterDelta,
    pub worker_restarts: Option<u64>,
    /// The jobs were plain and should all succeed.
    pub expect_success: bool,
    pub timeout: std::time::Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Recovery {
    /// Jobs that needed more than one attempt (their worker failed or crashed).
    pub redelivered_jobs: u64,
    /// The slowest of those, from submit to final.
    pub max_redelivered_submit_to_final_ms: Option<i64>,
    /// The slowest job overall, from submit to final.
    pub max_submit_to_final_ms: Option<i64>,
    /// The longest final attempt (`finished_at − started_at`).
    pub max_final_attempt_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LostJob {
    pub id: Uuid,
    pub last_status: Option<JobStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    pub mode: String,
    pub scenario: Option<String>,
    pub worker: Option<String>,
    pub seed: Option<u64>,
    pub submitted: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    pub cancelled: u64,
    pub lost: u64,
    /// Accepted ids listed more than once, or whose final record changed.
    pub stored_twice: u64,
    /// Work completed twice whose second result was discarded (`gpuq_results_discarded_total`).
    pub duplicate_results: Option<u64>,
    pub duplicates_suppressed: Option<u64>,
    pub redeliveries: Option<u64>,
    /// Engine restarts the manager saw during the run.
    pub worker_restarts: Option<u64>,
    pub recovery: Recovery,
    pub lost_jobs: Vec<LostJob>,
    pub events: Vec<Event>,
    pub notes: Vec<String>,
    pub problems: Vec<String>,
    pub pass: bool,
}

pub fn judge(o: &Observed) -> Verdict {
    let finals: Vec<&JobRecord> = o.finals.values().collect();
    let count = |s: JobStatus| finals.iter().filter(|r| r.status == s).count() as u64;
    let mut v = Verdict {
        submitted: o.submitted,
        accepted: o.accepted.len() as u64,
        rejected: o.rejected,
        succeeded: count(JobStatus::Succeeded),
        failed: count(JobStatus::Failed),
        dead_lettered: count(JobStatus::DeadLettered),
        cancelled: count(JobStatus::Cancelled),
        lost: o.pending.len() as u64,
        duplicate_results: o.counters.results_discarded,
        duplicates_suppressed: o.counters.duplicates_suppressed,
        redeliveries: o.counters.redeliveries,
        worker_restarts: o.worker_restarts,
        recovery: recovery(&finals),
        lost_jobs: o
            .pending
            .iter()
            .take(20)
            .map(|(id, s)| LostJob {
                id: *id,
                last_status: *s,
            })
            .collect(),
        notes: o.counters.notes(),
        ..Verdict::default()
    };

    match &o.listing {
        Some((counts, listed)) => {
            let twice = o
                .accepted
                .iter()
                .filter(|id| counts.get(id).copied().unwrap_or(0) > 1)
                .count();
            let changed = listed
                .iter()
                .filter(|r| {
                    o.finals
                        .get(&r.id)
                        .is_some_and(|f| changed_after_final(f, r))
                })
                .count();
            v.stored_twice = (twice + changed) as u64;
            let unlisted = o
                .accepted
                .iter()
                .filter(|id| o.finals.contains_key(id) && !counts.contains_key(id))
                .count();
            if unlisted > 0 {
                v.problems.push(format!(
                    "{unlisted} final job(s) missing from the job listing"
                ));
            }
        }
        None => v
            .notes
            .push("the job listing could not be read: stored-twice check skipped".into()),
    }

    if v.lost > 0 {
        v.problems.push(format!(
            "{} accepted job(s) not final within {}",
            v.lost,
            fmt_duration(o.timeout)
        ));
    }
    if v.stored_twice > 0 {
        v.problems.push(format!(
            "{} job(s) with a result stored twice",
            v.stored_twice
        ));
    }
    let unsuccessful = v.failed + v.dead_lettered + v.cancelled;
    if o.expect_success && unsuccessful > 0 {
        v.problems.push(format!(
            "{unsuccessful} job(s) did not succeed ({} failed, {} dead-lettered, {} cancelled)",
            v.failed, v.dead_lettered, v.cancelled
        ));
    }
    v.pass = v.problems.is_empty();
    v
}

/// A final record is written once: a later read that differs means a second final write.
fn changed_after_final(first: &JobRecord, later: &JobRecord) -> bool {
    later.status != first.status
        || later.finished_at != first.finished_at
        || later.worker != first.worker
        || later.result != first.result
}

fn recovery(finals: &[&JobRecord]) -> Recovery {
    let to_final = |r: &&&JobRecord| r.finished_at.map(|f| f - r.created_at);
    Recovery {
        redelivered_jobs: finals.iter().filter(|r| r.attempts > 1).count() as u64,
        max_redelivered_submit_to_final_ms: finals
            .iter()
            .filter(|r| r.attempts > 1)
            .filter_map(|r| to_final(&r))
            .max(),
        max_submit_to_final_ms: finals.iter().filter_map(|r| to_final(&r)).max(),
        max_final_attempt_ms: finals
            .iter()
            .filter_map(|r| Some(r.finished_at? - r.started_at?))
            .max(),
    }
}

impl Verdict {
    pub fn render(&self) -> String {
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into());
        let ms = |v: Option<i64>| v.map(fmt_ms).unwrap_or_else(|| "-".into());
        let what = match (&self.scenario, &self.worker) {
            (Some(s), Some(w)) => format!("{s} on {w}, "),
            (Some(s), None) => format!("{s}, "),
            _ => String::new(),
        };
        let seed = self.seed.map(|s| format!(", seed {s}")).unwrap_or_default();
        let mut s = format!(
            "verdict: {}  ({} {what}{} jobs{seed})\n",
            if self.pass { "PASS" } else { "FAIL" },
            self.mode,
            self.accepted
        );
        let mut line = |k: &str, v: String| s.push_str(&format!("  {k:<22}{v}\n"));
        line(
            "submitted",
            format!(
                "{} (accepted {}, rejected {})",
                self.submitted, self.accepted, self.rejected
            ),
        );
        line(
            "succeeded",
            format!(
                "{}  (failed {}, dead-lettered {}, cancelled {})",
                self.succeeded, self.failed, self.dead_lettered, self.cancelled
            ),
        );
        line("lost", self.lost.to_string());
        line("stored twice", self.stored_twice.to_string());
        line(
            "duplicate results",
            format!(
                "{} (work done twice, second result discarded)",
                opt(self.duplicate_results)
            ),
        );
        line("duplicates suppressed", opt(self.duplicates_suppressed));
        line("redeliveries", opt(self.redeliveries));
        line("worker restarts", opt(self.worker_restarts));
        let r = &self.recovery;
        line(
            "recovery",
            format!(
                "{} job(s) needed more than one attempt; slowest of them {} submit → final",
                r.redelivered_jobs,
                ms(r.max_redelivered_submit_to_final_ms)
            ),
        );
        line(
            "",
            format!(
                "slowest job {} submit → final; longest final attempt {}",
                ms(r.max_submit_to_final_ms),
                ms(r.max_final_attempt_ms)
            ),
        );
        for j in &self.lost_jobs {
            line(
                "lost job",
                format!(
                    "{} (last seen {})",
                    j.id,
                    j.last_status.map(|s| s.as_str()).unwrap_or("never")
                ),
            );
        }
        if !self.events.is_empty() {
            s.push_str("events\n");
            for e in &self.events {
                s.push_str(&format!("  +{:>6.1}s  {}\n", e.t_s, e.what));
            }
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        for p in &self.problems {
            s.push_str(&format!("problem: {p}\n"));
        }
        s
    }
}

#[cfg(test)]
#[path = "verdict_tests.rs"]
mod tests;
