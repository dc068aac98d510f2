//! The steps every tester mode shares: snapshot the fleet's counters before, and after the jobs
//! were submitted: wait for all of them, let late duplicates land, snapshot again, check the
//! listing, and judge.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use uuid::Uuid;

use crate::Ctx;
use crate::fleet::{self, Snapshot};
use crate::load::LoadResult;
use crate::output::progress_bar;
use crate::tester::events::EventLog;
use crate::tester::verdict::{Observed, Verdict, judge};
use crate::wait::{WaitOptions, listing_counts, wait_all};
use gpuq_client::gateway::Gateway;
use gpuq_client::worker::Worker;

pub struct Before {
    counters: Snapshot,
    restarts: Option<BTreeMap<String, u64>>,
}

pub async fn before(ctx: &Ctx, workers: &[Worker]) -> Before {
    let manager = ctx.manager();
    let (counters, restarts) = tokio::join!(
        fleet::snapshot(workers, Duration::from_secs(3)),
        fleet::engine_restarts(&manager)
    );
    Before { counters, restarts }
}

pub struct FinishOptions {
    pub timeout: Duration,
    pub settle: Duration,
    pub visible: bool,
    pub expect_success: bool,
}

/// Waits for the accepted jobs, reads the counters again and judges.
pub async fn finish(
    ctx: &Ctx,
    gw: &Gateway,
    workers: &[Worker],
    before: &Before,
    load: &LoadResult,
    log: &EventLog,
    o: &FinishOptions,
) -> Verdict {
    let ids: Vec<Uuid> = load.accepted.iter().map(|a| a.id).collect();
    let pb = progress_bar(ids.len() as u64, "final", o.visible);
    log.attach(&pb);
    let waited = wait_all(
        gw,
        ids.iter().copied(),
        &WaitOptions::new(o.timeout),
        |done, _| pb.set_position(done as u64),
    )
    .await;
    pb.finish_and_clear();
    log.attach(&indicatif::ProgressBar::hidden());
    if waited.pending.is_empty() {
        log.push(format!("all {} accepted jobs are final", ids.len()));
    } else {
        log.push(format!(
            "{} of {} jobs still not final after {}",
            waited.pending.len(),
            ids.len(),
            crate::output::fmt_duration(o.timeout)
        ));
    }

    // Duplicate deliveries are suppressed after the result is stored: give them time to land.
    tokio::time::sleep(o.settle).await;
    let manager = ctx.manager();
    let (after, restarts_after) = tokio::join!(
        fleet::snapshot(workers, Duration::from_secs(20)),
        fleet::engine_restarts(&manager)
    );
    let id_set: BTreeSet<Uuid> = ids.iter().copied().collect();
    let (listing, listing_err) = match listing_counts(gw, &id_set).await {
        Ok(l) => (Some(l), None),
        Err(e) => (None, Some(e)),
    };

    let observed = Observed {
        submitted: load.submitted,
        accepted: ids,
        rejected: load.rejected_total(),
        finals: waited.finals,
        pending: waited.pending,
        listing,
        counters: fleet::delta(&before.counters, &after),
        worker_restarts: fleet::restarts_delta(&before.restarts, &restarts_after),
        expect_success: o.expect_success,
        timeout: o.timeout,
    };
    let mut v = judge(&observed);
    if let Some(e) = listing_err {
        v.notes.push(format!("listing failed: {e:#}"));
    }
    if !waited.missing.is_empty() {
        v.notes.push(format!(
            "{} accepted jobs are unknown to the gateway (404)",
            waited.missing.len()
        ));
    }
    if let Some(e) = waited.last_error {
        v.notes
            .push(format!("{} polls failed; last: {e}", waited.poll_errors));
    }
    if load.retries > 0 {
        v.notes.push(format!(
            "{} submissions were retried with their Idempotency-Key after a transient refusal",
            load.retries
        ));
    }
    if !load.rejected.is_empty() {
        let reasons: Vec<String> = load
            .rejected
            .iter()
            .map(|(k, n)| format!("{n}× {k}"))
            .collect();
        v.notes.push(format!(
            "rejected (never accepted, so not lost): {}",
            reasons.join(", ")
        ));
    }
    v
}
