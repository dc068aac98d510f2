//! One delivery, start to finish: the delivery protocol of DESIGN.md. Every path ends in exactly
//! one of ack, nack (retry, counted by the broker), reject (malformed), or "give back" — a
//! confirmed republish of the same job followed by an ack, used when the job is not at fault
//! (its lease is held elsewhere, no capacity here, graceful stop) so that contention never
//! burns its delivery budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuq_common::amqp::{header_u64, job_properties, publish_confirmed};
use gpuq_common::job::{AttemptInfo, FinalOutcome, JobMessage, now_ms};
use gpuq_common::store::{FinishOutcome, StartOutcome, StoreError};
use gpuq_common::topology::{ATTEMPT_OFFSET_HEADER, ERROR_HEADER, REASON_HEADER};
use gpuq_common::{JobRecord, JobStatus};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;
use tokio::sync::watch;
use tracing::Instrument;

use crate::app::{Running, Worker, record_run};
use crate::faults::Scenario;
use crate::lease::{ALIVE_TTL, Acquire};
use crate::runner::{self, RunContext, RunOutcome, StopReason};
use crate::slots::NoPlacement;

/// How often a running job looks for a client's cancel.
const CANCEL_POLL: Duration = Duration::from_secs(1);

/// Deliveries a job had before a give-back republished it (the broker's count restarts).
pub const PRIOR_DELIVERIES_HEADER: &str = "x-gpuq-prior-deliveries";

/// What happened to a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
    /// Already final: acked without running.
    DuplicateSuppressed,
    /// Failed this attempt; nacked for a retry.
    Retried,
    GivenBack(&'static str),
    DeadLettered(&'static str),
    Rejected,
    /// The fault injector dropped the channel before the ack.
    AckLost,
}

/// The channels a delivery needs: the one it came on (for closing it in a fault) and a
/// confirm-mode one for republishing.
pub struct Channels {
    pub consume: Channel,
    pub publish: Channel,
}

pub async fn process_delivery(w: Arc<Worker>, ch: Arc<Channels>, d: Delivery) -> Outcome {
    let msg = match JobMessage::from_bytes(&d.data) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error.message = %e, "malformed job message: rejected to the dead letters");
            let _ = d.acker.reject(BasicRejectOptions { requeue: false }).await;
            return Outcome::Rejected;
        }
    };
    let span = tracing::info_span!("job", job_id = %msg.id, worker_id = %w.engine_id, pool = %msg.placement.pool);
    process(w, ch, d, msg).instrument(span).await
}

/// Whether a job returned `returns` times (failed or lost deliveries, over every copy of it) is
/// past its budget. The rule the broker applies to one copy, for copies given back: a quorum
/// queue dead-letters a message once it has been returned *more* times than `x-delivery-limit`,
/// so a limit of 5 allows 6 attempts.
fn past_delivery_limit(returns: u64, limit: u32) -> bool {
    returns > u64::from(limit)
}

async fn process(w: Arc<Worker>, ch: Arc<Channels>, d: Delivery, msg: JobMessage) -> Outcome {
    let received = Instant::now();
    let pool = msg.placement.pool.as_str();
    let headers = d.properties.headers().as_ref();
    let prior = header_u64(headers, PRIOR_DELIVERIES_HEADER).unwrap_or(0);
    let count = header_u64(headers, "x-delivery-count").unwrap_or(0);
    if d.redelivered || count > 0 {
        w.metrics.redeliveries.with_label_values(&[pool]).inc();
    }
    let offset = header_u64(headers, ATTEMPT_OFFSET_HEADER).unwrap_or(0);
    let attempt = (offset + prior + count + 1) as u32;
    // The first delivery of a freshly submitted job: its record is `queued` in the store.
    let first = !d.redelivered && count == 0 && prior == 0 && offset == 0;
    if prior > 0 && past_delivery_limit(prior + count, w.settings.delivery_limit) {
        // Out of budget, unless it already has its result (a given-back job that then ran and
        // whose ack was lost): that is a duplicate, not a dead letter.
        if let Ok(Some(r)) = w.store.get(msg.id).await
            && r.status.is_final()
        {
            return suppress_final(&w, &d, &msg, r.status).await;
        }
        return dead_letter(
            &w,
            &ch,
            &d,
            &msg,
            "delivery_limit",
            "delivery limit reached",
        )
        .await;
    }

    // 1. A place to run: concrete free healthy GPUs.
    let min_mem = msg.placement.min_gpu_memory_mb.unwrap_or(0);
    let gpus = match w.slots.reserve(msg.id, msg.placement.gpus, min_mem) {
        Ok(g) => g,
        Err(NoPlacement::Busy) => {
            return give_back(&w, &ch, &d, &msg, "no_free_gpu", Duration::from_millis(200)).await;
        }
        Err(NoPlacement::AlreadyHere) => {
            // Its first delivery's channel dropped while it runs here, and the broker sent it
            // again. One run only: the first one stores the result and sets the done marker,
            // and the copy given back now is then acked as a duplicate.
            w.metrics.lease_contended.with_label_values(&[pool]).inc();
            tracing::info!("job already running in this process: its redelivery is given back");
            return give_back(&w, &ch, &d, &msg, "running_here", ALIVE_TTL).await;
        }
        Err(NoPlacement::Never) => {
            match w
                .coord
                .pool_can_place(pool, msg.placement.gpus, min_mem)
                .await
            {
                Ok(Some(false)) => {
                    let why = format!(
                        "no engine in pool {pool} has {} GPUs with {min_mem} MB",
                        msg.placement.gpus
                    );
                    return dead_letter(&w, &ch, &d, &msg, "unschedulable", &why).await;
                }
                _ => {
                    return give_back(
                        &w,
                        &ch,
                        &d,
                        &msg,
                        "not_placeable_here",
                        Duration::from_secs(1),
                    )
                    .await;
                }
            }
        }
    };
    let outcome = with_gpus(
        &w,
        &ch,
        &d,
        &msg,
        Attempt {
            number: attempt,
            first,
            received,
        },
        gpus,
    )
    .await;
    w.slots.release(msg.id);
    outcome
}

/// Which attempt a delivery is, whether it is the job's first delivery ever, and when it came.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    number: u32,
    first: bool,
    received: Instant,
}

async fn with_gpus(
    w: &Arc<Worker>,
    ch: &Arc<Channels>,
    d: &Delivery,
    msg: &JobMessage,
    attempt: Attempt,
    gpus: Vec<u32>,
) -> Outcome {
    let pool = msg.placement.pool.as_str();
    // 2. Done marker and lease in one round trip; nothing runs without a lease.
    let waited = Instant::now();
    let acquired = loop {
        match w.coord.acquire(msg.id).await {
            Ok(Acquire::Held) if waited.elapsed() < ALIVE_TTL + Duration::from_secs(1) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(a) => break a,
            Err(e) => {
                w.metrics.redis_errors.with_label_values(&["acquire"]).inc();
                if w.shutdown.is_cancelled() {
                    return give_back(w, ch, d, msg, "shutdown", Duration::ZERO).await;
                }
                tracing::warn!(error.message = %e, "Redis unavailable: waiting to take the lease");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    match acquired {
        Acquire::Done => {
            w.metrics
                .duplicates_suppressed
                .with_label_values(&[pool])
                .inc();
            tracing::info!("job already done: duplicate delivery acked without running");
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            return Outcome::DuplicateSuppressed;
        }
        Acquire::Cancelled => {
            tracing::info!("job cancelled before it started: acked without running");
            // The gateway wrote `cancelled` already; this conditional write covers a cancel whose
            // store write failed after its signal was set.
            let fin = FinalOutcome::cancelled(Some(w.engine_id.clone()), None);
            let _ = store_retry(w, "finish", || w.store.finish(msg.id, &fin)).await;
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            return Outcome::Cancelled;
        }
        Acquire::Held => {
            w.metrics.lease_contended.with_label_values(&[pool]).inc();
            return give_back(w, ch, d, msg, "lease_held", Duration::ZERO).await;
        }
        Acquire::TakenOver => {
            w.metrics.lease_takeovers.with_label_values(&[pool]).inc();
            tracing::info!("took over the lease of a dead worker");
        }
        Acquire::Taken => {}
    }
    w.metrics.leases_held.inc();
    let out = leased(w, ch, d, msg, attempt, gpus).await;
    w.metrics.leases_held.dec();
    out
}

/// Retries a store write until it succeeds (a store outage must not lose or repeat a result).
async fn store_retry<T, F, Fut>(w: &Worker, op: &'static str, mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Err(StoreError::Unavailable(e)) => {
                w.metrics.store_retries.with_label_values(&[op]).inc();
                tracing::warn!(error.message = %e, op, "store write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

async fn leased(
    w: &Arc<Worker>,
    ch: &Arc<Channels>,
    d: &Delivery,
    msg: &JobMessage,
    Attempt {
        number: attempt,
        first,
        received,
    }: Attempt,
    gpus: Vec<u32>,
) -> Outcome {
    let pool = msg.placement.pool.as_str();
    let kind = msg.payload.kind().as_str();
    let mut record = JobRecord::queued(msg);
    record.status = JobStatus::Running;
    record.attempts = attempt;
    record.worker = Some(w.engine_id.clone());
    record.gpus = gpus.clone();
    record.started_at = Some(now_ms());
    // 3. A redelivered job may already be final in the store (its done marker lost with Redis);
    // a first delivery cannot be (its record was queued when it was published, and a cancel
    // since then was seen by `acquire`), so it costs no store round trip.
    if !first {
        match store_retry(w, "check", || w.store.get(msg.id)).await {
            Ok(Some(r)) if r.status.is_final() => {
                return suppress_final(w, d, msg, r.status).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error.message = %e, "cannot read the job's record; retrying later");
                return requeue(w, d, msg).await;
            }
        }
    }
    if w.shutdown.is_cancelled() {
        // Stopping: running jobs get the grace period, deliveries not started yet go back.
        let _ = w.coord.release(msg.id).await;
        return give_back(w, ch, d, msg, "shutdown", Duration::ZERO).await;
    }
    w.metrics
        .jobs_started
        .with_label_values(&[pool, kind])
        .inc();
    w.metrics
        .queue_wait
        .with_label_values(&[pool])
        .observe(((now_ms() - msg.created_at_ms).max(0) as f64) / 1000.0);
    w.metrics
        .job_overhead
        .with_label_values(&[pool, "start"])
        .observe(received.elapsed().as_secs_f64());
    tracing::info!(attempt, gpus = ?gpus, "job started");

    // 4. Run, renewing the lease and watching for cancellation.
    let mut scenario = w.faults.take();
    if let gpuq_common::job::JobPayload::Simulate(p) = &msg.payload
        && w.faults.enabled()
        && p.crash_probability > 0.0
        && runner::random_unit() < p.crash_probability
    {
        scenario = Scenario::CrashMidTask;
    }
    if scenario != Scenario::Normal {
        tracing::warn!(scenario = scenario.as_str(), "fault injected into this job");
    }
    let (stop_tx, stop_rx) = watch::channel(None);
    w.running.lock().expect("running").insert(
        msg.id,
        Running {
            stop: stop_tx.clone(),
            gpus: gpus.clone(),
            started: Instant::now(),
            pool: pool.to_string(),
        },
    );
    for &g in &gpus {
        w.gpus.set_busy(g, true);
    }
    let keeper = tokio::spawn(keep_lease(w.clone(), record.clone(), stop_tx));
    let ctx = RunContext {
        job: msg.id,
        attempt,
        gpus: gpus.clone(),
        worker: w.engine_id.clone(),
        programs: w.programs.clone(),
        job_timeout: Duration::from_secs(w.settings.job_timeout_s),
        progress_timeout: (w.settings.progress_timeout_s > 0)
            .then(|| Duration::from_secs(w.settings.progress_timeout_s)),
        output_tail_bytes: w.settings.output_tail_bytes,
        stop: stop_rx,
    };
    let started = Instant::now();
    let run = runner::run(&msg.payload, ctx);
    let outcome = if scenario == Scenario::CrashMidTask {
        let half = match &msg.payload {
            gpuq_common::job::JobPayload::Simulate(p) => Duration::from_millis(p.duration_ms / 2),
            _ => Duration::from_millis(100),
        };
        tokio::select! {
            o = run => o,
            _ = tokio::time::sleep(half) => crash("crash_mid_task"),
        }
    } else {
        run.await
    };
    let elapsed = started.elapsed();
    let ran_at = Instant::now();
    keeper.abort();
    for &g in &gpus {
        w.gpus.set_busy(g, false);
    }
    // The engine is gone: free its GPUs now, before the ack below lets the broker send the
    // next delivery (freed only after the ack, that delivery could find its GPU still held
    // and be given back with a 200 ms delay, idling the GPU). `process` releases again: no-op.
    w.slots.release(msg.id);
    w.running.lock().expect("running").remove(&msg.id);
    w.metrics
        .job_duration
        .with_label_values(&[pool, kind])
        .observe(elapsed.as_secs_f64());
    let outcome = match (scenario, outcome) {
        (Scenario::ErrorBeforeAck, RunOutcome::Succeeded(_)) => {
            RunOutcome::Retry("injected fault: error_before_ack".into())
        }
        (_, o) => o,
    };
    record_run(
        w,
        elapsed.as_millis() as u64,
        !matches!(outcome, RunOutcome::Succeeded(_)),
    );

    // 5. Record, mark done, then ack.
    let ran = || AttemptInfo {
        attempts: attempt,
        gpus: gpus.clone(),
        started_at: record.started_at.unwrap_or_else(now_ms),
    };
    let final_write =
        |status: JobStatus, result: Option<Value>, error: Option<String>| FinalOutcome {
            status,
            result,
            error,
            worker: Some(w.engine_id.clone()),
            finished_at: now_ms(),
            attempt: Some(ran()),
        };
    let (fin, outcome_label, out) = match outcome {
        RunOutcome::Succeeded(v) => (
            final_write(JobStatus::Succeeded, Some(v), None),
            "succeeded",
            Outcome::Succeeded,
        ),
        RunOutcome::Failed { result, error } => (
            final_write(JobStatus::Failed, Some(result), Some(error)),
            "failed",
            Outcome::Failed,
        ),
        RunOutcome::Stopped(StopReason::Cancelled) => (
            FinalOutcome::cancelled(Some(w.engine_id.clone()), Some(ran())),
            "cancelled",
            Outcome::Cancelled,
        ),
        RunOutcome::Retry(err) => {
            w.metrics
                .jobs_completed
                .with_label_values(&[pool, kind, "retried"])
                .inc();
            tracing::warn!(attempt, error.message = %err, "attempt failed; requeued for a retry");
            let _ = w
                .store
                .record_error(msg.id, attempt, &format!("attempt {attempt}: {err}"))
                .await;
            return requeue(w, d, msg).await;
        }
        RunOutcome::Stopped(reason) => {
            w.metrics
                .jobs_completed
                .with_label_values(&[pool, kind, "interrupted"])
                .inc();
            tracing::warn!(
                ?reason,
                "job stopped by the worker; giving it back to the queue"
            );
            let _ = w.coord.release(msg.id).await;
            return give_back(w, ch, d, msg, "interrupted", Duration::ZERO).await;
        }
    };
    let mut stored = store_retry(w, "finish", || w.store.finish(msg.id, &fin)).await;
    if let Ok(FinishOutcome::NotFound) = stored {
        // The store has no record of this job (lost, or the gateway removed it after a missing
        // confirm that the broker did in fact take): recreate it, then record the result.
        let _ = store_retry(w, "start", || w.store.start_attempt(&record)).await;
        stored = store_retry(w, "finish", || w.store.finish(msg.id, &fin)).await;
    }
    match stored {
        Ok(FinishOutcome::Stored) => {
            w.metrics
                .jobs_completed
                .with_label_values(&[pool, kind, outcome_label])
                .inc();
            tracing::info!(
                status = outcome_label,
                ms = elapsed.as_millis() as u64,
                "job finished"
            );
        }
        Ok(FinishOutcome::AlreadyFinal(JobStatus::Cancelled)) if out == Outcome::Cancelled => {
            tracing::info!("job stopped after its cancel was recorded");
        }
        Ok(FinishOutcome::AlreadyFinal(s)) => {
            w.metrics.results_discarded.with_label_values(&[pool]).inc();
            tracing::warn!(
                status = s.as_str(),
                "another final result was stored first; this one is discarded"
            );
        }
        Ok(FinishOutcome::NotFound | FinishOutcome::Superseded) | Err(_) => {
            // Never ack a job whose result is not stored: once acked, nothing would redo it.
            // Requeued, it counts toward the delivery limit and ends in the dead letters if
            // the store keeps refusing.
            let why = match &stored {
                Err(e) => e.to_string(),
                Ok(FinishOutcome::NotFound) => {
                    "the job's record is missing and could not be recreated".into()
                }
                // Only a drive-conditional write answers this; a plain one never does.
                _ => "the store answered `superseded` to a plain final write".into(),
            };
            tracing::error!(error.message = %why, "the result could not be stored: requeued, not acked");
            return requeue(w, d, msg).await;
        }
    }
    match scenario {
        Scenario::CrashAfterComplete => crash("crash_after_complete"),
        Scenario::DuplicateAfterComplete => {
            let _ = w.coord.mark_done(msg.id).await;
            tracing::warn!("injected fault: dropping the channel before the ack");
            let _ = ch
                .consume
                .close(406, "gpuq fault injection: ack lost".into())
                .await;
            return Outcome::AckLost;
        }
        _ => {}
    }
    for _ in 0..3 {
        match w.coord.mark_done(msg.id).await {
            Ok(()) => break,
            Err(e) => {
                w.metrics
                    .redis_errors
                    .with_label_values(&["mark_done"])
                    .inc();
                tracing::warn!(error.message = %e, "cannot set the done marker (the store still guards the job)");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
        tracing::warn!(error.message = %e, "ack failed; a redelivery will be suppressed");
    }
    w.metrics
        .job_overhead
        .with_label_values(&[pool, "finish"])
        .observe(ran_at.elapsed().as_secs_f64());
    out
}

/// Acks the delivery of a job that already has a final result, without running it.
async fn suppress_final(w: &Worker, d: &Delivery, msg: &JobMessage, status: JobStatus) -> Outcome {
    w.metrics
        .duplicates_suppressed
        .with_label_values(&[msg.placement.pool.as_str()])
        .inc();
    tracing::info!(
        status = status.as_str(),
        "job already final in the store: acked without running"
    );
    let _ = w.coord.mark_done(msg.id).await;
    let _ = d.acker.ack(BasicAckOptions::default()).await;
    Outcome::DuplicateSuppressed
}

/// Drops the lease (if this process holds it) and nacks for a retry (counted toward the
/// delivery limit by the broker).
async fn requeue(w: &Worker, d: &Delivery, msg: &JobMessage) -> Outcome {
    let _ = w.coord.release(msg.id).await;
    let _ = d
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await;
    Outcome::Retried
}

/// Dies at once, without cleanup: the injected crash of the tester's scenarios 2 and 4.
fn crash(scenario: &str) -> ! {
    tracing::error!(scenario, "injected fault: the worker process dies now");
    std::process::abort()
}

/// While the job runs: records it as `running` once it has run for `running_record_delay_ms`
/// (a shorter job is written once, with its result), renews the lease, and stops the job when
/// a client cancels it.
async fn keep_lease(w: Arc<Worker>, record: JobRecord, stop: watch::Sender<Option<StopReason>>) {
    let job = record.id;
    tokio::time::sleep(Duration::from_millis(w.settings.running_record_delay_ms)).await;
    // One try: a store outage must not hold up the lease renewals below; the final write
    // carries the attempt anyway.
    match w.store.start_attempt(&record).await {
        Ok(StartOutcome::Started) => {}
        Ok(StartOutcome::AlreadyFinal(s)) => {
            tracing::warn!(
                status = s.as_str(),
                "the job became final while running here: stopping it"
            );
            let _ = stop.send(Some(StopReason::Cancelled));
        }
        Err(e) => tracing::error!(error.message = %e, "cannot record the job as running"),
    }
    // A cancel is looked for every second (one EXISTS); the lease is renewed every third of its TTL.
    let renew_every = Duration::from_millis((w.settings.lease_ttl_ms / 3).max(200));
    let mut tick = tokio::time::interval(CANCEL_POLL.min(renew_every));
    let mut renewed = Instant::now();
    loop {
        if let Ok(true) = w.coord.cancel_requested(job).await {
            let _ = stop.send(Some(StopReason::Cancelled));
        }
        tick.tick().await;
        if renewed.elapsed() < renew_every {
            continue;
        }
        renewed = Instant::now();
        match w.coord.renew(job).await {
            Ok(true) => {}
            Ok(false) => tracing::error!("lease taken by another worker while running"),
            Err(e) => {
                w.metrics.redis_errors.with_label_values(&["renew"]).inc();
                tracing::warn!(error.message = %e, "lease renewal failed");
            }
        }
    }
}

fn republish_headers(d: &Delivery, extra: &[(&str, AMQPValue)]) -> FieldTable {
    let old = d.properties.headers().clone().unwrap_or_default();
    // The broker's count of this delivery travels as `x-gpuq-prior-deliveries`; a copied
    // `x-delivery-count` would be counted a second time on the republished message.
    let mut h = FieldTable::default();
    for (k, v) in old.inner().iter() {
        if k.as_str() != "x-delivery-count" {
            h.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in extra {
        h.insert((*k).into(), v.clone());
    }
    h
}

/// Puts the job back at the end of its queue (confirmed) and acks this delivery. The broker's
/// delivery count restarts, so the count so far travels in a header.
async fn give_back(
    w: &Arc<Worker>,
    ch: &Arc<Channels>,
    d: &Delivery,
    msg: &JobMessage,
    reason: &'static str,
    delay: Duration,
) -> Outcome {
    let pool = msg.placement.pool.as_str();
    w.metrics
        .given_back
        .with_label_values(&[pool, reason])
        .inc();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let headers = d.properties.headers().as_ref();
    let prior = header_u64(headers, PRIOR_DELIVERIES_HEADER).unwrap_or(0)
        + header_u64(headers, "x-delivery-count").unwrap_or(0);
    let h = republish_headers(
        d,
        &[(
            PRIOR_DELIVERIES_HEADER,
            AMQPValue::LongLongInt(prior as i64),
        )],
    );
    let props = job_properties(&msg.id.to_string(), None, h);
    let published = publish_confirmed(
        &ch.publish,
        &w.topology.jobs_exchange(),
        pool,
        &d.data,
        props,
        Duration::from_secs(5),
    )
    .await;
    match published {
        Ok(()) => {
            tracing::debug!(reason, "delivery given back to the queue");
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            Outcome::GivenBack(reason)
        }
        Err(e) => {
            tracing::warn!(error.message = %e, reason, "give-back failed; requeueing instead");
            requeue(w, d, msg).await
        }
    }
}

/// Sends the job to the dead letters with a gpuq reason (confirmed), then acks.
async fn dead_letter(
    w: &Arc<Worker>,
    ch: &Arc<Channels>,
    d: &Delivery,
    msg: &JobMessage,
    reason: &'static str,
    error: &str,
) -> Outcome {
    tracing::warn!(reason, error.message = %error, "dead-lettering the job");
    let h = republish_headers(
        d,
        &[
            (
                REASON_HEADER,
                AMQPValue::LongString(LongString::from(reason)),
            ),
            (ERROR_HEADER, AMQPValue::LongString(LongString::from(error))),
        ],
    );
    let props = job_properties(&msg.id.to_string(), None, h);
    match publish_confirmed(
        &ch.publish,
        &w.topology.dead_letter_exchange(),
        "",
        &d.data,
        props,
        Duration::from_secs(5),
    )
    .await
    {
        Ok(()) => {
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            Outcome::DeadLettered(reason)
        }
        Err(e) => {
            tracing::warn!(error.message = %e, "dead-lettering failed; requeueing instead");
            requeue(w, d, msg).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_back_job_gets_the_attempts_the_broker_would_give_it() {
        // Limit 5: the broker delivers a message returned 5 times once more (the 6th
        // attempt, measured on 3.10: an always-failing job ends with attempts 6) and
        // dead-letters it on its 6th return.
        assert!(!past_delivery_limit(5, 5));
        assert!(past_delivery_limit(6, 5));
        assert!(!past_delivery_limit(1, 1));
        assert!(past_delivery_limit(2, 1));
    }
}
