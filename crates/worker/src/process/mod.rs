//! One delivery, start to finish: the adapter of the delivery protocol. At each step of a job's
//! path it gathers the facts (headers, placement, lease, stored record, run outcome, store
//! answer), asks `crate::protocol` what to do, and does it on RabbitMQ, Redis and the store
//! (`act`). Every path ends in exactly one of ack, nack (retry, counted by the broker), reject
//! (malformed), give-back (a confirmed republish then an ack, when the job is not at fault) or
//! dead-letter.

mod act;
mod run;

use std::sync::Arc;
use std::time::Instant;

use gpuq_common::amqp::header_u64;
use gpuq_common::job::{JobMessage, now_ms};
use gpuq_common::topology::ATTEMPT_OFFSET_HEADER;
use lapin::message::Delivery;
use lapin::options::BasicRejectOptions;
use tracing::Instrument;

pub use self::act::Channels;
use self::act::Job;
use crate::protocol::{self, Acquire, Action, Arrival, PRIOR_DELIVERIES_HEADER, Placement, Quota};
use crate::slots::NoPlacement;
use crate::state::Worker;

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
    let job = Job {
        w: &w,
        ch: &ch,
        d: &d,
        msg: &msg,
        arrival: arrival(&d),
        deadline_ms: protocol::deadline_ms(
            msg.created_at_ms,
            msg.placement.ttl_s,
            w.topology.queue_ttl_ms,
        ),
    };
    process(&job).instrument(span).await
}

/// The facts of the delivery's headers.
fn arrival(d: &Delivery) -> Arrival {
    let headers = d.properties.headers().as_ref();
    Arrival {
        redelivered: d.redelivered,
        delivery_count: header_u64(headers, "x-delivery-count").unwrap_or(0),
        prior_deliveries: header_u64(headers, PRIOR_DELIVERIES_HEADER).unwrap_or(0),
        attempt_offset: header_u64(headers, ATTEMPT_OFFSET_HEADER).unwrap_or(0),
    }
}

/// The budget check of a given-back copy, then placement (step 3).
async fn process(job: &Job<'_>) -> Outcome {
    let (w, msg) = (job.w, job.msg);
    let received = Instant::now();
    let pool = job.pool();
    if job.arrival.is_redelivery() {
        w.metrics.redeliveries.with_label_values(&[pool]).inc();
    }
    if job.arrival.over_budget(w.topology.delivery_limit) {
        let stored = w.store.get(msg.id).await.ok().flatten().map(|r| r.status);
        return job.act(protocol::over_budget(stored)).await;
    }
    if let action @ Action::DeadLetter { .. } = protocol::arrival(job.deadline_ms, now_ms()) {
        return job.act(action).await;
    }
    let (gpus, min_mem) = (
        msg.placement.gpus,
        msg.placement.min_gpu_memory_mb.unwrap_or(0),
    );
    let placement = match w.slots.reserve(msg.id, gpus, min_mem) {
        Ok(reserved) => {
            let outcome = with_lease(job, received, reserved).await;
            w.slots.release(msg.id);
            return outcome;
        }
        Err(NoPlacement::Busy) => Placement::Busy,
        Err(NoPlacement::AlreadyHere) => {
            w.metrics.lease_contended.with_label_values(&[pool]).inc();
            tracing::info!("job already running in this process: its redelivery is given back");
            Placement::AlreadyHere
        }
        Err(NoPlacement::Never) => Placement::Never {
            pool_can_place: w
                .coord
                .pool_can_place(pool, gpus, min_mem)
                .await
                .ok()
                .flatten(),
        },
    };
    job.act(protocol::placement(placement, pool, gpus, min_mem))
        .await
}

/// Step 4: the done marker, the cancel and the lease in one round trip; nothing runs without
/// a lease.
async fn with_lease(job: &Job<'_>, received: Instant, gpus: Vec<u32>) -> Outcome {
    let (w, pool) = (job.w, job.pool());
    let asked = Instant::now();
    loop {
        let answer = match w.coord.acquire(job.msg.id).await {
            Ok(a) => Some(a),
            Err(e) => {
                w.metrics.redis_errors.with_label_values(&["acquire"]).inc();
                tracing::warn!(error.message = %e, "Redis unavailable: waiting to take the lease");
                None
            }
        };
        match protocol::lease(answer, asked.elapsed(), w.shutdown.is_cancelled()) {
            Action::Wait(pause) => tokio::time::sleep(pause).await,
            Action::Proceed => {
                if answer == Some(Acquire::TakenOver) {
                    w.metrics.lease_takeovers.with_label_values(&[pool]).inc();
                    tracing::info!("took over the lease of a dead worker");
                }
                break;
            }
            other => {
                if answer == Some(Acquire::Held) {
                    w.metrics.lease_contended.with_label_values(&[pool]).inc();
                }
                return job.act(other).await;
            }
        }
    }
    let msg = job.msg;
    if let Some(max) = msg.tenant_max_gpus {
        let answer = w
            .coord
            .take_tenant_gpus(&msg.tenant, msg.id, msg.placement.gpus, max)
            .await;
        if let Ok(Quota::Full { running }) = answer {
            w.metrics
                .tenant_quota_waits
                .with_label_values(&[msg.tenant.as_str()])
                .inc();
            tracing::debug!(tenant = %msg.tenant, running, max, "tenant at its GPU quota: given back");
        }
        match protocol::tenant_quota(answer.ok()) {
            Action::Proceed => {}
            other => {
                // Its GPUs go to other jobs at once, not after the give-back's pause.
                w.slots.release(msg.id);
                return job.act(other).await;
            }
        }
    }
    w.metrics.leases_held.inc();
    let out = run::leased(job, received, gpus).await;
    w.metrics.leases_held.dec();
    if msg.tenant_max_gpus.is_some()
        && let Err(e) = w.coord.give_tenant_gpus(&msg.tenant, msg.id).await
    {
        // The entry is dropped anyway once this process is gone; until then it counts.
        tracing::warn!(error.message = %e, "could not return the job's GPUs to its tenant's quota");
    }
    out
}
