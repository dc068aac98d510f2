//! Submitting many jobs: paced at a rate or as fast as a number of requests in flight allows,
//! one job a request or a batch of them (`POST /v1/jobs/batch`), over one keep-alive client,
//! recording each accepted id and when it was submitted.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use gpuq_common::job::now_ms;
use indicatif::ProgressBar;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use gpuq_client::endpoint::ClientError;
use gpuq_client::gateway::{Gateway, SubmitBody, Submitted};

#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub jobs: u64,
    /// Submissions per second; `None` = as fast as `concurrency` allows.
    pub rate: Option<f64>,
    pub concurrency: usize,
    /// Retry a transiently refused submission (same Idempotency-Key) for this long.
    pub retry_for: Option<Duration>,
    /// Jobs per request through the batch route; `None`: one job per `POST /v1/jobs`.
    pub batch: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    pub id: Uuid,
    /// When the (first) request for this job was sent, ms since the epoch.
    pub submit_ms: i64,
}

#[derive(Debug, Default)]
pub struct LoadResult {
    /// Jobs asked for in the requests started.
    pub submitted: u64,
    pub accepted: Vec<Accepted>,
    /// Refusals by reason (`503 unavailable`, `transport error`), after retries.
    pub rejected: BTreeMap<String, u64>,
    pub first_submit_ms: Option<i64>,
    /// From the first request to the last answer.
    pub wall: Duration,
    /// Requests repeated after a transient refusal.
    pub retries: u64,
    /// Answers that named an id already seen (an idempotent replay).
    pub replayed: u64,
}

impl LoadResult {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

struct Outcome {
    submit_ms: i64,
    /// The jobs the request asked for.
    jobs: u64,
    /// Every job the gateway answered, in order (one for a single submission).
    result: Result<Vec<Submitted>, ClientError>,
    retries: u64,
}

/// Submits `plan.jobs` copies of `body`, one or a batch a request; stops early when `cancel`
/// fires. `pb` ticks per job answered.
pub async fn submit_many(
    gw: &Gateway,
    body: Arc<SubmitBody>,
    plan: &LoadPlan,
    cancel: &CancellationToken,
    pb: &ProgressBar,
) -> LoadResult {
    let sem = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    let mut set: JoinSet<Outcome> = JoinSet::new();
    let mut out = LoadResult::default();
    let mut seen = HashSet::new();
    let start = Instant::now();
    let per_request = u64::from(plan.batch.unwrap_or(1).max(1));
    let mut i = 0;
    while i < plan.jobs {
        let jobs = per_request.min(plan.jobs - i);
        if let Some(rate) = plan.rate.filter(|r| *r > 0.0) {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = cancel.cancelled() => break,
            }
        }
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p.expect("semaphore open"),
            _ = cancel.cancelled() => break,
        };
        i += jobs;
        out.submitted += jobs;
        let gw = gw.clone();
        let body = body.clone();
        let retry_for = plan.retry_for;
        let batch = plan.batch.is_some();
        let first = now_ms();
        out.first_submit_ms.get_or_insert(first);
        set.spawn(async move {
            let o = submit_one(&gw, &body, batch.then_some(jobs), retry_for).await;
            drop(permit);
            o
        });
        while let Some(done) = set.try_join_next() {
            record(&mut out, &mut seen, done, pb);
        }
    }
    while let Some(done) = set.join_next().await {
        record(&mut out, &mut seen, done, pb);
    }
    out.wall = start.elapsed();
    out
}

fn record(
    out: &mut LoadResult,
    seen: &mut HashSet<Uuid>,
    done: Result<Outcome, tokio::task::JoinError>,
    pb: &ProgressBar,
) {
    let Ok(o) = done else {
        pb.inc(1);
        *out.rejected.entry("client task failed".into()).or_insert(0) += 1;
        return;
    };
    pb.inc(o.jobs);
    out.retries += o.retries;
    match o.result {
        Ok(answered) => {
            for s in answered {
                if seen.insert(s.id) {
                    out.accepted.push(Accepted {
                        id: s.id,
                        submit_ms: o.submit_ms,
                    });
                } else {
                    out.replayed += 1;
                }
            }
        }
        Err(e) => *out.rejected.entry(e.short()).or_insert(0) += o.jobs,
    }
}

/// One request: `body` alone, or a batch of `batch` copies of it.
async fn send(
    gw: &Gateway,
    body: &SubmitBody,
    batch: Option<u64>,
    key: Option<&str>,
) -> Result<Vec<Submitted>, ClientError> {
    match batch {
        None => gw.submit(body, key).await.map(|s| vec![s]),
        Some(n) => {
            let jobs = vec![body.clone(); n as usize];
            gw.submit_batch(&jobs, key).await.map(|b| b.jobs)
        }
    }
}

/// One request (a job, or a batch of `batch`): with `retry_for`, an Idempotency-Key makes
/// retries after a lost answer safe.
async fn submit_one(
    gw: &Gateway,
    body: &SubmitBody,
    batch: Option<u64>,
    retry_for: Option<Duration>,
) -> Outcome {
    let submit_ms = now_ms();
    let jobs = batch.unwrap_or(1);
    let Some(retry_for) = retry_for else {
        return Outcome {
            submit_ms,
            jobs,
            result: send(gw, body, batch, None).await,
            retries: 0,
        };
    };
    let key = Uuid::new_v4().to_string();
    let deadline = Instant::now() + retry_for;
    let mut backoff = Duration::from_millis(100);
    let mut retries = 0;
    loop {
        let result = send(gw, body, batch, Some(&key)).await;
        match &result {
            // 409: an earlier request with this key is still in progress at the gateway.
            Err(e)
                if (e.is_transient() || e.status() == Some(409))
                    && Instant::now() + backoff < deadline =>
            {
                retries += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            _ => {
                return Outcome {
                    submit_ms,
                    jobs,
                    result,
                    retries,
                };
            }
        }
    }
}
