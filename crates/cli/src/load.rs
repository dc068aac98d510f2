//! Submitting many jobs: paced at a rate or as fast as a number of requests in flight allows,
//! over one keep-alive client, recording each accepted id and when it was submitted.

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
}

#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    pub id: Uuid,
    /// When the (first) request for this job was sent, ms since the epoch.
    pub submit_ms: i64,
}

#[derive(Debug, Default)]
pub struct LoadResult {
    /// Requests started (one per job).
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
    result: Result<Submitted, ClientError>,
    retries: u64,
}

/// Submits `plan.jobs` copies of `body`; stops early when `cancel` fires. `pb` ticks per answer.
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
    for i in 0..plan.jobs {
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
        out.submitted += 1;
        let gw = gw.clone();
        let body = body.clone();
        let retry_for = plan.retry_for;
        let first = now_ms();
        out.first_submit_ms.get_or_insert(first);
        set.spawn(async move {
            let o = submit_one(&gw, &body, retry_for).await;
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
    pb.inc(1);
    let Ok(o) = done else {
        *out.rejected.entry("client task failed".into()).or_insert(0) += 1;
        return;
    };
    out.retries += o.retries;
    match o.result {
        Ok(s) if seen.insert(s.id) => out.accepted.push(Accepted {
            id: s.id,
            submit_ms: o.submit_ms,
        }),
        Ok(_) => out.replayed += 1,
        Err(e) => *out.rejected.entry(e.short()).or_insert(0) += 1,
    }
}

/// One job: with `retry_for`, an Idempotency-Key makes retries after a lost answer safe.
async fn submit_one(gw: &Gateway, body: &SubmitBody, retry_for: Option<Duration>) -> Outcome {
    let submit_ms = now_ms();
    let Some(retry_for) = retry_for else {
        return Outcome {
            submit_ms,
            result: gw.submit(body, None).await,
            retries: 0,
        };
    };
    let key = Uuid::new_v4().to_string();
    let deadline = Instant::now() + retry_for;
    let mut backoff = Duration::from_millis(100);
    let mut retries = 0;
    loop {
        let result = gw.submit(body, Some(&key)).await;
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
                    result,
                    retries,
                };
            }
        }
    }
}
