//! Per-tenant admission: a token bucket of submissions per second, and a cap on the tenant's jobs
//! not final yet (queued or running). Both are checked before anything is stored, so a refused
//! submission costs nothing but this check.
//!
//! The bucket lives in this gateway's memory: with several gateways a tenant's rate is per
//! gateway. The count of a tenant's unfinished jobs comes from the store (`count_active_by_tenant`,
//! for all tenants at once, every `REFRESH`: SQLite reads its maintained counters, MongoDB groups
//! the unfinished jobs only, found through the status index), plus the submissions this gateway
//! accepted since: it may lag the truth by one refresh, never by more.
//!
//! The GPU quota (`max_gpus`) is not enforced here: it travels with each job and the workers
//! apply it at placement (`coord::quota`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpuq_common::store::JobStore;
use gpuq_common::tenancy::{Limits, Tenants};
use tokio_util::sync::CancellationToken;

/// How often the counts of unfinished jobs are read from the store.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Why a submission is refused, and when to try again.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Rate { per_s: f64, retry_after: Duration },
    Queued { max: u64 },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Rate { .. } => "rate",
            Refusal::Queued { .. } => "max_queued",
        }
    }

    pub fn retry_after_s(&self) -> u64 {
        match self {
            Refusal::Rate { retry_after, .. } => retry_after.as_secs_f64().ceil() as u64,
            Refusal::Queued { .. } => REFRESH.as_secs().max(1),
        }
    }

    pub fn message(&self, tenant: &str) -> String {
        match self {
            Refusal::Rate { per_s, .. } => {
                format!("tenant {tenant} is over its rate of {per_s} submissions per second")
            }
            Refusal::Queued { max } => {
                format!("tenant {tenant} has {max} unfinished jobs, its limit")
            }
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct Active {
    /// Unfinished jobs per tenant at the last refresh.
    counted: HashMap<String, u64>,
    /// Submissions accepted here since.
    since: HashMap<String, u64>,
}

pub struct Quotas {
    tenants: Tenants,
    buckets: Mutex<HashMap<String, Bucket>>,
    active: Mutex<Active>,
}

impl Quotas {
    pub fn new(tenants: Tenants) -> Self {
        Self {
            tenants,
            buckets: Mutex::new(HashMap::new()),
            active: Mutex::new(Active::default()),
        }
    }

    pub fn tenants(&self) -> &Tenants {
        &self.tenants
    }

    pub fn limits(&self, tenant: &str) -> Limits {
        self.tenants.limits(tenant)
    }

    /// Admits one submission of `tenant` now, or says why not. An admitted one counts as
    /// unfinished at once.
    pub fn admit(&self, tenant: &str) -> Result<(), Refusal> {
        self.admit_many(tenant, 1)
    }

    /// Admits `n` submissions of `tenant` together (a batch), or none of them. A batch larger
    /// than the tenant's burst is never admitted: the caller refuses it first.
    pub fn admit_many(&self, tenant: &str, n: u32) -> Result<(), Refusal> {
        self.admit_at(tenant, n, Instant::now())
    }

    fn admit_at(&self, tenant: &str, n: u32, now: Instant) -> Result<(), Refusal> {
        let limits = self.tenants.limits(tenant);
        let mut active = self.active.lock().expect("quota lock");
        let unfinished = active.counted.get(tenant).copied().unwrap_or(0)
            + active.since.get(tenant).copied().unwrap_or(0);
        if let Some(max) = limits.max_queued
            && unfinished + u64::from(n) > max
        {
            return Err(Refusal::Queued { max });
        }
        self.take_tokens(tenant, &limits, f64::from(n), now)?;
        *active.since.entry(tenant.to_string()).or_default() += u64::from(n);
        Ok(())
    }

    fn take_tokens(
        &self,
        tenant: &str,
        limits: &Limits,
        n: f64,
        now: Instant,
    ) -> Result<(), Refusal> {
        let mut buckets = self.buckets.lock().expect("quota lock");
        let burst = f64::from(limits.burst);
        let b = buckets.entry(tenant.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limits.rate_per_s).min(burst);
        b.at = now;
        if b.tokens >= n {
            b.tokens -= n;
            return Ok(());
        }
        Err(Refusal::Rate {
            per_s: limits.rate_per_s,
            retry_after: Duration::from_secs_f64((n - b.tokens) / limits.rate_per_s),
        })
    }

    /// A submission admitted but not enqueued (refused by the broker, a store error): it does
    /// not count as unfinished.
    pub fn forget(&self, tenant: &str) {
        self.forget_many(tenant, 1);
    }

    /// `forget` for `n` submissions admitted together.
    pub fn forget_many(&self, tenant: &str, n: u32) {
        let mut active = self.active.lock().expect("quota lock");
        if let Some(since) = active.since.get_mut(tenant) {
            *since = since.saturating_sub(u64::from(n));
        }
    }

    /// Takes the store's counts of unfinished jobs per tenant.
    pub fn refresh(&self, counted: HashMap<String, u64>) {
        let mut active = self.active.lock().expect("quota lock");
        active.counted = counted;
        active.since.clear();
    }

    /// Reads the counts from the store every `REFRESH` until `stop`; a failed read keeps the
    /// last counts (and the submissions since) rather than letting every tenant through.
    pub async fn refresh_loop(self: Arc<Self>, store: Arc<dyn JobStore>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match store.count_active_by_tenant().await {
                Ok(counts) => self.refresh(counts.into_iter().collect()),
                Err(e) => tracing::warn!(
                    error.message = %e,
                    "cannot count unfinished jobs per tenant; keeping the last counts"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(limits: &str) -> Quotas {
        Quotas::new(Tenants::parse("", limits).unwrap())
    }

    #[test]
    fn a_burst_above_the_rate_is_refused_until_tokens_come_back() {
        let q = quotas("a:rate=10:burst=5");
        let t0 = Instant::now();
        for _ in 0..5 {
            q.admit_at("a", 1, t0).unwrap();
        }
        let refused = q.admit_at("a", 1, t0).unwrap_err();
        assert_eq!(refused.reason(), "rate");
        assert_eq!(refused.retry_after_s(), 1);
        // Another tenant has its own bucket.
        q.admit_at("b", 1, t0).unwrap();
        // 100 ms at 10/s is one token.
        q.admit_at("a", 1, t0 + Duration::from_millis(100)).unwrap();
        assert!(q.admit_at("a", 1, t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn a_batch_is_admitted_whole_or_not_at_all() {
        let q = quotas("a:rate=10:burst=100:max_queued=150");
        let t0 = Instant::now();
        q.admit_at("a", 60, t0).unwrap();
        // 40 tokens left: a batch of 50 takes none of them.
        assert_eq!(q.admit_at("a", 50, t0).unwrap_err().reason(), "rate");
        q.admit_at("a", 40, t0).unwrap();
        // A second later 10 tokens are back, but 100 + 51 unfinished would pass max_queued.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            q.admit_at("a", 51, t1).unwrap_err(),
            Refusal::Queued { max: 150 }
        );
        q.forget_many("a", 100);
        q.admit_at("a", 10, t1).unwrap();
    }

    #[test]
    fn unfinished_jobs_are_capped_from_the_store_counts_and_the_submissions_since() {
        let q = quotas("a:max_queued=3");
        let now = Instant::now();
        q.refresh(HashMap::from([("a".to_string(), 2)]));
        q.admit_at("a", 1, now).unwrap();
        assert_eq!(
            q.admit_at("a", 1, now).unwrap_err(),
            Refusal::Queued { max: 3 }
        );
        // One was refused by the broker: room again.
        q.forget("a");
        q.admit_at("a", 1, now).unwrap();
        // The store says the tenant's jobs finished.
        q.refresh(HashMap::new());
        for _ in 0..3 {
            q.admit_at("a", 1, now).unwrap();
        }
        assert!(q.admit_at("a", 1, now).is_err());
        q.admit_at("b", 1, now).unwrap();
    }
}
