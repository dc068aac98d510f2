//! The protocol's actions performed on RabbitMQ, Redis and the store: ack a duplicate, record a
//! cancel, give back (a confirmed republish with the returns so far, then an ack), requeue (nack),
//! dead-letter (a confirmed publish with the reason, then an ack).

use std::sync::Arc;
use std::time::Duration;

use gpuq_common::amqp::{job_properties, publish_confirmed};
use gpuq_common::job::{FinalOutcome, JobMessage, now_ms};
use gpuq_common::store::StoreError;
use gpuq_common::topology::{ERROR_HEADER, REASON_HEADER};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};

use super::Outcome;
use crate::protocol::{self, Action, Arrival, PRIOR_DELIVERIES_HEADER};
use crate::state::Worker;

/// How long a give-back or dead-lettering waits for the broker's confirm.
const REPUBLISH_CONFIRM: Duration = Duration::from_secs(30);

/// The channels a delivery needs: the one it came on (for closing it in a fault) and a
/// confirm-mode one for republishing.
pub struct Channels {
    pub consume: Channel,
    pub publish: Channel,
}

/// One delivery and what acting on it needs.
pub(super) struct Job<'a> {
    pub w: &'a Arc<Worker>,
    pub ch: &'a Arc<Channels>,
    pub d: &'a Delivery,
    pub msg: &'a JobMessage,
    pub arrival: Arrival,
    /// The job's deadline (`protocol::deadline_ms`), ms since the epoch.
    pub deadline_ms: i64,
}

impl Job<'_> {
    pub fn pool(&self) -> &str {
        self.msg.placement.pool.as_str()
    }

    /// Does what the protocol decided. `Proceed` and `Wait` are the caller's to handle; given
    /// here they would leave the delivery unanswered, so it is requeued (and logged as a bug).
    pub async fn act(&self, action: Action) -> Outcome {
        match action {
            Action::Suppress => self.suppress().await,
            Action::RecordCancelled => self.record_cancelled().await,
            Action::GiveBack {
                reason,
                delay,
                release_lease,
            } => {
                if release_lease {
                    let _ = self.w.coord.release(self.msg.id).await;
                }
                self.give_back(reason, delay).await
            }
            Action::Requeue => self.requeue().await,
            Action::DeadLetter { reason, error } => self.dead_letter(reason, &error).await,
            Action::Proceed | Action::Wait(_) => {
                tracing::error!(?action, "not a final action: the delivery is requeued");
                self.requeue().await
            }
        }
    }

    /// Acks the delivery of a job that already has a final result, without running it.
    async fn suppress(&self) -> Outcome {
        self.w
            .metrics
            .duplicates_suppressed
            .with_label_values(&[self.pool()])
            .inc();
        tracing::info!("job already final: duplicate delivery acked without running");
        let _ = self.w.coord.mark_done(self.msg.id, false).await;
        let _ = self.d.acker.ack(BasicAckOptions::default()).await;
        Outcome::DuplicateSuppressed
    }

    async fn record_cancelled(&self) -> Outcome {
        tracing::info!("job cancelled before it started: acked without running");
        // The gateway wrote `cancelled` already; this conditional write covers a cancel whose
        // store write failed after its signal was set.
        let fin = FinalOutcome::cancelled(Some(self.w.engine_id.clone()), None);
        let w = self.w;
        let _ = store_retry(w, "finish", || w.store.finish(self.msg.id, &fin)).await;
        let _ = self.d.acker.ack(BasicAckOptions::default()).await;
        Outcome::Cancelled
    }

    /// Drops the lease (if this process holds it) and nacks for a retry (counted toward the
    /// delivery limit by the broker).
    pub async fn requeue(&self) -> Outcome {
        let _ = self.w.coord.release(self.msg.id).await;
        let _ = self
            .d
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await;
        Outcome::Retried
    }

    /// Puts the job back at the end of its queue (confirmed) and acks this delivery. The
    /// broker's delivery count restarts, so the returns so far travel in a header.
    async fn give_back(&self, reason: &'static str, delay: Duration) -> Outcome {
        self.w
            .metrics
            .given_back
            .with_label_values(&[self.pool(), reason])
            .inc();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // The copy keeps the job's deadline: it may wait in the queue only what is left of it.
        let Some(ttl_ms) = protocol::remaining_ttl_ms(self.deadline_ms, now_ms()) else {
            let why = "expired: its ttl passed while it was given back";
            return self.dead_letter(protocol::EXPIRED, why).await;
        };
        let returns = AMQPValue::LongLongInt(self.arrival.returns() as i64);
        let headers = self.republish_headers(&[(PRIOR_DELIVERIES_HEADER, returns)]);
        let exchange = self.w.topology.jobs_exchange();
        match self
            .publish(&exchange, self.pool(), headers, Some(ttl_ms))
            .await
        {
            Ok(()) => {
                tracing::debug!(reason, "delivery given back to the queue");
                let _ = self.d.acker.ack(BasicAckOptions::default()).await;
                Outcome::GivenBack(reason)
            }
            Err(e) => {
                tracing::warn!(error.message = %e, reason, "give-back failed; requeueing instead");
                self.requeue().await
            }
        }
    }

    /// Sends the job to the dead letters with a gpuq reason (confirmed), then acks.
    async fn dead_letter(&self, reason: &'static str, error: &str) -> Outcome {
        tracing::warn!(reason, error.message = %error, "dead-lettering the job");
        let headers = self.republish_headers(&[
            (
                REASON_HEADER,
                AMQPValue::LongString(LongString::from(reason)),
            ),
            (ERROR_HEADER, AMQPValue::LongString(LongString::from(error))),
        ]);
        let exchange = self.w.topology.dead_letter_exchange();
        match self.publish(&exchange, "", headers, None).await {
            Ok(()) => {
                let _ = self.d.acker.ack(BasicAckOptions::default()).await;
                Outcome::DeadLettered(reason)
            }
            Err(e) => {
                tracing::warn!(error.message = %e, "dead-lettering failed; requeueing instead");
                self.requeue().await
            }
        }
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: FieldTable,
        expiration_ms: Option<u64>,
    ) -> Result<(), gpuq_common::amqp::AmqpError> {
        let props = job_properties(&self.msg.id.to_string(), expiration_ms, headers);
        // Waiting is cheap here (only this delivery waits), and a give-back that gives up is
        // requeued, which burns a delivery of the job's budget: a broker slow to confirm (a
        // quorum queue's fsync on a loaded host) gets long before that happens.
        let confirm = REPUBLISH_CONFIRM;
        publish_confirmed(
            &self.ch.publish,
            exchange,
            routing_key,
            &self.d.data,
            props,
            confirm,
        )
        .await
    }

    /// The delivery's headers for a republished copy, with `extra` set.
    fn republish_headers(&self, extra: &[(&str, AMQPValue)]) -> FieldTable {
        let old = self.d.properties.headers().clone().unwrap_or_default();
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
}

/// Retries a store write until it succeeds (a store outage must not lose or repeat a result).
pub(super) async fn store_retry<T, F, Fut>(
    w: &Worker,
    op: &'static str,
    mut f: F,
) -> Result<T, StoreError>
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
