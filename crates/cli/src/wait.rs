//! Waiting for many jobs to become final without loading the system being measured.
//!
//! While many jobs are pending, each round lists the final statuses newest first and stops paging
//! at the oldest pending id (ids are UUID v7, so pages are in submission order): jobs finish
//! roughly in queue order, so each round reads little more than what finished since the last.
//! Once few remain, each round GETs just those, a few in parallel. Final records never change
//! (the first final result wins), so each is read once.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use gpuq_common::{JobRecord, JobStatus};
use tokio::time::Instant;
use uuid::Uuid;

use gpuq_client::gateway::{Gateway, ListParams};

pub const FINAL_STATUSES: [JobStatus; 4] = [
    JobStatus::Succeeded,
    JobStatus::Failed,
    JobStatus::DeadLettered,
    JobStatus::Cancelled,
];

#[derive(Debug, Clone)]
pub struct WaitOptions {
    /// Give up on jobs not final by then.
    pub timeout: Duration,
    pub min_interval: Duration,
    pub max_interval: Duration,
    /// At or below this many pending jobs, GET each one instead of listing.
    pub get_threshold: usize,
    pub get_concurrency: usize,
}

impl WaitOptions {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            min_interval: Duration::from_millis(100),
            max_interval: Duration::from_millis(1000),
            get_threshold: 64,
            get_concurrency: 8,
        }
    }
}

#[derive(Debug, Default)]
pub struct WaitOutcome {
    /// Final records of the jobs waited for.
    pub finals: HashMap<Uuid, JobRecord>,
    /// Jobs still not final at the deadline, with their last known status (None: never seen).
    pub pending: Vec<(Uuid, Option<JobStatus>)>,
    /// Jobs the gateway answered 404 for on the last look.
    pub missing: BTreeSet<Uuid>,
    pub poll_errors: u64,
    pub last_error: Option<String>,
}

/// Waits until every id is final or the timeout passes; `progress(done, total)` after each round.
pub async fn wait_all(
    gw: &Gateway,
    ids: impl IntoIterator<Item = Uuid>,
    opts: &WaitOptions,
    mut progress: impl FnMut(usize, usize),
) -> WaitOutcome {
    let mut pending: BTreeSet<Uuid> = ids.into_iter().collect();
    let total = pending.len();
    let mut out = WaitOutcome::default();
    let mut last_status: HashMap<Uuid, JobStatus> = HashMap::new();
    let deadline = Instant::now() + opts.timeout;
    let mut interval = opts.min_interval;
    loop {
        if pending.len() > opts.get_threshold {
            let before = pending.len();
            list_round(gw, &mut pending, &mut out).await;
            if pending.len() == before {
                // No progress by listing (long jobs, or an order we did not expect): look at the
                // oldest few directly, so a wrong assumption can cost time but never a job.
                let oldest: Vec<Uuid> = pending.iter().take(opts.get_threshold).copied().collect();
                get_round(gw, oldest, &mut pending, &mut out, &mut last_status, opts).await;
            }
        } else {
            let all: Vec<Uuid> = pending.iter().copied().collect();
            get_round(gw, all, &mut pending, &mut out, &mut last_status, opts).await;
        }
        progress(out.finals.len(), total);
        let now = Instant::now();
        if pending.is_empty() || now >= deadline {
            break;
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 3 / 2).min(opts.max_interval);
    }
    out.pending = pending
        .into_iter()
        .map(|id| (id, last_status.get(&id).copied()))
        .collect();
    out
}

async fn list_round(gw: &Gateway, pending: &mut BTreeSet<Uuid>, out: &mut WaitOutcome) {
    let Some(&oldest) = pending.first() else {
        return;
    };
    for status in FINAL_STATUSES {
        let params = ListParams {
            status: Some(status),
            limit: Some(1000),
            ..ListParams::default()
        };
        match gw.list_all(params, Some(oldest)).await {
            Ok(jobs) => {
                for job in jobs {
                    if job.status.is_final() && pending.remove(&job.id) {
                        out.finals.insert(job.id, job);
                    }
                }
            }
            Err(e) => {
                out.poll_errors += 1;
                out.last_error = Some(format!("{e:#}"));
            }
        }
    }
}

async fn get_round(
    gw: &Gateway,
    ids: Vec<Uuid>,
    pending: &mut BTreeSet<Uuid>,
    out: &mut WaitOutcome,
    last_status: &mut HashMap<Uuid, JobStatus>,
    opts: &WaitOptions,
) {
    let results: Vec<_> = stream::iter(ids)
        .map(|id| async move { (id, gw.job(id).await) })
        .buffer_unordered(opts.get_concurrency.max(1))
        .collect()
        .await;
    for (id, res) in results {
        match res {
            Ok(job) => {
                out.missing.remove(&id);
                last_status.insert(id, job.status);
                if job.status.is_final() {
                    pending.remove(&id);
                    out.finals.insert(id, job);
                }
            }
            Err(e) if e.status() == Some(404) => {
                out.missing.insert(id);
            }
            Err(e) => {
                out.poll_errors += 1;
                out.last_error = Some(format!("{e:#}"));
            }
        }
    }
}

/// How often each id appears in a full listing of the jobs from `oldest` on: a job's record must
/// be listed exactly once.
pub async fn listing_counts(
    gw: &Gateway,
    ids: &BTreeSet<Uuid>,
) -> Result<(HashMap<Uuid, usize>, Vec<JobRecord>), gpuq_client::endpoint::ClientError> {
    let mut counts = HashMap::new();
    let mut ours = Vec::new();
    let Some(&oldest) = ids.first() else {
        return Ok((counts, ours));
    };
    let params = ListParams {
        limit: Some(1000),
        ..ListParams::default()
    };
    for job in gw.list_all(params, Some(oldest)).await? {
        if ids.contains(&job.id) {
            *counts.entry(job.id).or_insert(0) += 1;
            ours.push(job);
        }
    }
    Ok((counts, ours))
}
