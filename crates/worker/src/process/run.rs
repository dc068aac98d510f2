//! A job under its lease: the start checks, the run on its GPUs (lease renewed, cancels watched,
//! injected faults), then the final write, the done marker and the ack — each decision taken by
//! `protocol`.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use gpuq_common::events::{NewEvent, attempt_event};
use gpuq_common::job::{AttemptInfo, FinalOutcome, JobPayload, now_ms};
use gpuq_common::store::{FinishOutcome, StartOutcome};
use gpuq_common::{JobRecord, JobStatus};
use lapin::options::BasicAckOptions;
use tokio::sync::watch;

use super::Outcome;
use super::act::{Job, store_retry};
use crate::events::AttemptEvents;
use crate::faults::Scenario;
use crate::protocol::{self, Action, AfterRun, Finish, RunEnd, Stored};
use crate::runner::{self, RunContext, RunOutcome, StopReason};
use crate::state::{Running, Worker, record_run};

/// How often a running job looks for a client's cancel.
const CANCEL_POLL: Duration = Duration::from_secs(1);

/// Steps 5–7 for a job whose lease this process holds, on its reserved `gpus`.
pub(super) async fn leased(job: &Job<'_>, received: Instant, gpus: Vec<u32>) -> Outcome {
    let (w, msg) = (job.w, job.msg);
    let attempt = job.arrival.attempt();
    let first = job.arrival.is_first();
    // A redelivered job may already be final in the store (its done marker lost with Redis);
    // a first delivery cannot be (its record was queued when it was published, and a cancel
    // since then was seen in the lease round trip), so it costs no store round trip.
    let stored = if first {
        Ok(None)
    } else {
        match store_retry(w, "check", || w.store.get(msg.id)).await {
            Ok(r) => Ok(r.map(|r| r.status)),
            Err(e) => {
                tracing::error!(error.message = %e, "cannot read the job's record; retrying later");
                Err(())
            }
        }
    };
    match protocol::before_start(first, stored, w.shutdown.is_cancelled()) {
        Action::Proceed => {}
        other => return job.act(other).await,
    }
    let record = running_record(w, job, attempt, &gpus);
    count_start(w, job, received);
    tracing::info!(attempt, gpus = ?gpus, "job started");

    let (scenario, outcome, elapsed, events, ended_at) = run_attempt(job, &record, &gpus).await;
    let ran_at = Instant::now();
    let kind = msg.payload.kind().as_str();
    let (end, result, error) = match outcome {
        RunOutcome::Succeeded(v) => (RunEnd::Succeeded, Some(v), None),
        RunOutcome::Failed { result, error } => (RunEnd::Failed, Some(result), Some(error)),
        RunOutcome::Stopped(StopReason::Cancelled) => (RunEnd::Cancelled, None, None),
        RunOutcome::Retry(err) => (RunEnd::Retry, None, Some(err)),
        RunOutcome::Stopped(reason) => (RunEnd::Interrupted, None, Some(format!("{reason:?}"))),
    };
    let status = match protocol::after_run(end) {
        AfterRun::Store(status) => status,
        AfterRun::RecordErrorAndRequeue => {
            count_completed(w, job, kind, "retried");
            let err = error.unwrap_or_default();
            tracing::warn!(attempt, error.message = %err, "attempt failed; requeued for a retry");
            let note = format!("attempt {attempt}: {err}");
            append_left(w, job, events).await;
            let _ = w.store.record_error(msg.id, attempt, &note).await;
            return job.requeue().await;
        }
        AfterRun::Then(action) => {
            count_completed(w, job, kind, "interrupted");
            tracing::warn!(reason = ?error, "job stopped by the worker; giving it back to the queue");
            append_left(w, job, events).await;
            return job.act(action).await;
        }
    };
    let ran = AttemptInfo {
        attempts: attempt,
        gpus,
        started_at: record.started_at.unwrap_or_else(now_ms),
    };
    let mut fin = if status == JobStatus::Cancelled {
        FinalOutcome::cancelled(Some(w.engine_id.clone()), Some(ran))
    } else {
        FinalOutcome {
            status,
            result,
            error,
            worker: Some(w.engine_id.clone()),
            finished_at: now_ms(),
            attempt: Some(ran),
            events: vec![],
        }
    };
    // The attempt's events not written yet go with its outcome, before its `final` event.
    w.metrics.events.written.inc_by(events.len() as u64);
    fin.events = events;
    fin.finished_at = ended_at;
    finish(job, &record, &fin, scenario, elapsed, ran_at).await
}

/// The events of an attempt that ends without a final outcome (retried, given back): written
/// now, so the log shows what the attempt did before the next one's.
async fn append_left(w: &Worker, job: &Job<'_>, events: Vec<NewEvent>) {
    match w.store.append_events(job.msg.id, &events).await {
        Ok(_) => w.metrics.events.written.inc_by(events.len() as u64),
        Err(e) => {
            w.metrics.events.dropped.inc_by(events.len() as u64);
            tracing::warn!(error.message = %e, "the attempt's last events could not be written");
        }
    }
}

/// The record a run starts from: `running`, this attempt, this worker, these GPUs.
fn running_record(w: &Worker, job: &Job<'_>, attempt: u32, gpus: &[u32]) -> JobRecord {
    let mut record = JobRecord::queued(job.msg);
    record.status = JobStatus::Running;
    record.attempts = attempt;
    record.worker = Some(w.engine_id.clone());
    record.gpus = gpus.to_vec();
    record.started_at = Some(now_ms());
    record
}

fn count_start(w: &Worker, job: &Job<'_>, received: Instant) {
    let (pool, msg) = (job.pool(), job.msg);
    w.metrics
        .jobs_started
        .with_label_values(&[pool, msg.payload.kind().as_str()])
        .inc();
    w.metrics
        .queue_wait
        .with_label_values(&[pool])
        .observe(((now_ms() - msg.created_at_ms).max(0) as f64) / 1000.0);
    w.metrics
        .job_overhead
        .with_label_values(&[pool, "start"])
        .observe(received.elapsed().as_secs_f64());
}

fn count_completed(w: &Worker, job: &Job<'_>, kind: &str, outcome: &str) {
    w.metrics
        .jobs_completed
        .with_label_values(&[job.pool(), kind, outcome])
        .inc();
}

/// The fault the tester injected into this job, if any.
fn scenario_for(w: &Worker, payload: &JobPayload) -> Scenario {
    let mut scenario = w.faults.take();
    if let JobPayload::Simulate(p) = payload
        && w.faults.enabled()
        && p.crash_probability > 0.0
        && runner::random_unit() < p.crash_probability
    {
        scenario = Scenario::CrashMidTask;
    }
    if scenario != Scenario::Normal {
        tracing::warn!(scenario = scenario.as_str(), "fault injected into this job");
    }
    scenario
}

/// Runs the job on its GPUs, renewing the lease and watching for cancels; answers the injected
/// scenario, the run's outcome and how long it ran.
async fn run_attempt(
    job: &Job<'_>,
    record: &JobRecord,
    gpus: &[u32],
) -> (Scenario, RunOutcome, Duration, Vec<NewEvent>, i64) {
    let (w, msg) = (job.w, job.msg);
    let events = AttemptEvents::new(attempt_event(record.attempts, &w.engine_id, gpus, now_ms()));
    let scenario = scenario_for(w, &msg.payload);
    let (stop_tx, stop_rx) = watch::channel(None);
    let running = Running {
        stop: stop_tx.clone(),
        gpus: gpus.to_vec(),
        started: Instant::now(),
        pool: job.pool().to_string(),
    };
    w.running.lock().expect("running").insert(msg.id, running);
    for &g in gpus {
        w.gpus.set_busy(g, true);
    }
    let ctx = RunContext {
        job: msg.id,
        attempt: record.attempts,
        gpus: gpus.to_vec(),
        worker: w.engine_id.clone(),
        programs: w.programs.clone(),
        sandbox: w.sandbox.clone(),
        array: msg.array,
        job_timeout: Duration::from_secs(w.config.job_timeout_s),
        progress_timeout: (w.config.progress_timeout_s > 0)
            .then(|| Duration::from_secs(w.config.progress_timeout_s)),
        output_tail_bytes: w.config.output_tail_bytes,
        stop: stop_rx,
        events: events.sink(),
    };
    let started = Instant::now();
    let run = async {
        let engine = async {
            let run = runner::run(&msg.payload, ctx);
            if scenario == Scenario::CrashMidTask {
                let half = match &msg.payload {
                    JobPayload::Simulate(p) => Duration::from_millis(p.duration_ms / 2),
                    _ => Duration::from_millis(100),
                };
                tokio::select! {
                    o = run => o,
                    _ = tokio::time::sleep(half) => crash("crash_mid_task"),
                }
            } else {
                run.await
            }
        };
        // The lease's keeper runs beside the engine in this task (no task of its own to spawn
        // and abort per job) and ends with it.
        let outcome = tokio::select! {
            o = engine => o,
            never = keep_lease(w, record, stop_tx) => match never {},
        };
        // The job ended now, not when its events' writer is done with the store.
        let (elapsed, ended_at) = (started.elapsed(), now_ms());
        for &g in gpus {
            w.gpus.set_busy(g, false);
        }
        // The engine is gone: free its GPUs now, before the ack lets the broker send the next
        // delivery (freed only after the ack, that delivery could find its GPU still held and
        // be given back with a 200 ms delay, idling the GPU). `process` releases again: a no-op.
        w.slots.release(msg.id);
        w.running.lock().expect("running").remove(&msg.id);
        (outcome, elapsed, ended_at)
    };
    let ((outcome, elapsed, ended_at), left) = events.write_alongside(w, msg.id, run).await;
    w.metrics
        .job_duration
        .with_label_values(&[job.pool(), msg.payload.kind().as_str()])
        .observe(elapsed.as_secs_f64());
    let outcome = match (scenario, outcome) {
        (Scenario::ErrorBeforeAck, RunOutcome::Succeeded(_)) => {
            RunOutcome::Retry("injected fault: error_before_ack".into())
        }
        (_, o) => o,
    };
    let failed = !matches!(outcome, RunOutcome::Succeeded(_));
    record_run(w, elapsed.as_millis() as u64, failed);
    (scenario, outcome, elapsed, left, ended_at)
}

/// Step 7: the conditional final write (retried while the store is down), then the done
/// marker, then the ack — never an ack before the result is stored.
async fn finish(
    job: &Job<'_>,
    record: &JobRecord,
    fin: &FinalOutcome,
    scenario: Scenario,
    elapsed: Duration,
    ran_at: Instant,
) -> Outcome {
    let (w, msg) = (job.w, job.msg);
    let mut recreated = false;
    // Whether this write ended the job's log: its streams are then rung with the done marker.
    let mut ring = false;
    loop {
        let written = store_retry(w, "finish", || w.store.finish(msg.id, fin)).await;
        ring |= matches!(written, Ok(FinishOutcome::Stored));
        let answer = match &written {
            Ok(FinishOutcome::Stored) => Stored::Stored,
            Ok(FinishOutcome::AlreadyFinal(s)) => Stored::AlreadyFinal(*s),
            Ok(FinishOutcome::NotFound) => Stored::NotFound,
            Ok(FinishOutcome::Superseded) => Stored::Superseded,
            Err(_) => Stored::Failed,
        };
        match protocol::after_store(answer, fin.status, recreated) {
            Finish::Ack => {
                count_completed(w, job, msg.payload.kind().as_str(), fin.status.as_str());
                let ms = elapsed.as_millis() as u64;
                tracing::info!(status = fin.status.as_str(), ms, "job finished");
            }
            Finish::AckCancelled => tracing::info!("job stopped after its cancel was recorded"),
            Finish::AckDiscarded => {
                w.metrics
                    .results_discarded
                    .with_label_values(&[job.pool()])
                    .inc();
                if let Stored::AlreadyFinal(s) = answer {
                    let status = s.as_str();
                    tracing::warn!(
                        status,
                        "another final result was stored first; this one is discarded"
                    );
                }
            }
            Finish::RecreateAndStoreAgain => {
                // No record of this job (lost, or removed by the gateway after a missing
                // confirm the broker did take): recreate it, then record the result.
                let _ = store_retry(w, "start", || w.store.start_attempt(record)).await;
                recreated = true;
                continue;
            }
            Finish::Requeue => {
                // Once acked, nothing would redo it. Requeued, it counts toward the delivery
                // limit and ends in the dead letters if the store keeps refusing.
                let why = match &written {
                    Err(e) => e.to_string(),
                    Ok(FinishOutcome::NotFound) => {
                        "the job's record is missing and could not be recreated".into()
                    }
                    _ => "the store answered `superseded` to a plain final write".into(),
                };
                tracing::error!(error.message = %why, "the result could not be stored: requeued, not acked");
                return job.requeue().await;
            }
        }
        break;
    }
    let out = match fin.status {
        JobStatus::Succeeded => Outcome::Succeeded,
        JobStatus::Cancelled => Outcome::Cancelled,
        _ => Outcome::Failed,
    };
    match scenario {
        Scenario::CrashAfterComplete => crash("crash_after_complete"),
        Scenario::DuplicateAfterComplete => {
            let _ = w.coord.mark_done(msg.id, ring).await;
            tracing::warn!("injected fault: dropping the channel before the ack");
            let reason = "gpuq fault injection: ack lost".into();
            let _ = job.ch.consume.close(406, reason).await;
            return Outcome::AckLost;
        }
        _ => {}
    }
    mark_done(w, job, ring).await;
    if let Err(e) = job.d.acker.ack(BasicAckOptions::default()).await {
        tracing::warn!(error.message = %e, "ack failed; a redelivery will be suppressed");
    }
    w.metrics
        .job_overhead
        .with_label_values(&[job.pool(), "finish"])
        .observe(ran_at.elapsed().as_secs_f64());
    out
}

/// Sets the done marker (and drops the lease, and rings the log's streams when `ring`), trying a
/// few times: the store guards the job should Redis not answer (and streams look at the store
/// every second).
async fn mark_done(w: &Worker, job: &Job<'_>, ring: bool) {
    for _ in 0..3 {
        match w.coord.mark_done(job.msg.id, ring).await {
            Ok(()) => return,
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
}

/// Dies at once, without cleanup: the injected crash of the tester's scenarios 2 and 4.
fn crash(scenario: &str) -> ! {
    tracing::error!(scenario, "injected fault: the worker process dies now");
    std::process::abort()
}

/// While the job runs: records it as `running` once it has run for `running_record_delay_ms`
/// (a shorter job is written once, with its result), renews the lease, and stops the job when
/// a client cancels it.
async fn keep_lease(
    w: &Worker,
    record: &JobRecord,
    stop: watch::Sender<Option<StopReason>>,
) -> Infallible {
    let job = record.id;
    tokio::time::sleep(w.config.running_record_delay).await;
    // One try: a store outage must not hold up the lease renewals below; the final write
    // carries the attempt anyway.
    match w.store.start_attempt(record).await {
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
    let renew_every = Duration::from_millis((w.config.lease_ttl_ms / 3).max(200));
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
