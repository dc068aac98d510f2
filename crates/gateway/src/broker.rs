//! The gateway's link to RabbitMQ: one connection and one confirm channel, shared by every
//! request (confirms pipeline, so concurrent publishes never wait on each other), kept alive by a
//! supervisor that reconnects to another node with backoff when the link dies. A publish answers
//! `Ok` only after the broker's confirm; one caught by a dying link is retried on the next link
//! (same message id, so workers deduplicate it) until its deadline, then reported unavailable.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use gpuq_common::amqp::{self, AmqpError};
use gpuq_common::job::JobMessage;
use gpuq_common::topology::Topology;
use lapin::types::FieldTable;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pools the gateway declares itself when its broker user may (not under least privilege);
/// the others, and then these too, are declared by the workers that serve them.
pub const GATEWAY_POOLS: &[&str] = &["default"];
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Why a job was not accepted by the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No usable link within the deadline: nothing was sent.
    #[error("the message broker is unavailable: no broker node is reachable")]
    Unavailable,
    /// The link died under the publish and no other came up in time: the job may or may not
    /// have been stored.
    #[error(
        "the message broker is unavailable: the connection was lost and no node took over in time"
    )]
    LinkLost,
    #[error("the message broker did not confirm the job within {0:?}")]
    Timeout(Duration),
    /// The queue refused it (full: `x-overflow = reject-publish`, or not replicated).
    #[error("the message broker refused the job (queue full or not replicated)")]
    Nacked,
    /// No queue is bound to the routing key: no worker serves the pool.
    #[error("no queue for the job's pool")]
    Unroutable,
}

impl PublishError {
    /// True when the broker may have stored the job although it was not confirmed: a retry
    /// should reuse the job id (workers deduplicate by id) rather than make a new job.
    pub fn ambiguous(&self) -> bool {
        matches!(self, PublishError::Timeout(_) | PublishError::LinkLost)
    }

    /// Label of `gpuq_publish_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Unavailable => "unavailable",
            PublishError::LinkLost => "link_lost",
            PublishError::Timeout(_) => "timeout",
            PublishError::Nacked => "nack",
            PublishError::Unroutable => "unroutable",
        }
    }
}

/// A live connection and its confirm channel; replaced as a whole when either dies.
pub type Link = amqp::Session;

struct Inner {
    topology: Topology,
    confirm_timeout: Duration,
    link: watch::Sender<Option<Arc<Link>>>,
    /// Wakes the supervisor to check the link after a publish saw an error.
    kick: Notify,
}

/// Cheap to clone; every clone shares the link.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    /// A handle without a supervisor: it never connects, and every publish is unavailable once
    /// its deadline passes. For router tests that never reach the broker.
    pub fn unconnected(topology: Topology, confirm_timeout: Duration) -> Self {
        let (link, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                topology,
                confirm_timeout,
                link,
                kick: Notify::new(),
            }),
        }
    }

    /// Starts the supervisor, which connects through any of `urls` and keeps a link up until
    /// `shutdown`, then closes the connection with `200 OK`.
    pub fn start(
        urls: Vec<String>,
        topology: Topology,
        confirm_timeout: Duration,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Self {
        let supervisor = amqp::Supervisor {
            urls,
            name: format!("gpuq-gateway {}", topology.prefix),
            topology: topology.clone(),
            pools: Vec::new(),
            pools_if_permitted: GATEWAY_POOLS.iter().map(|p| p.to_string()).collect(),
        };
        let broker = Self::unconnected(topology, confirm_timeout);
        let this = broker.clone();
        tracker.spawn(async move {
            supervisor
                .run(&shutdown, |link| this.clone().hold(link, shutdown.clone()))
                .await;
        });
        broker
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    pub fn confirm_timeout(&self) -> Duration {
        self.inner.confirm_timeout
    }

    /// The current link, if one is up.
    pub fn current(&self) -> Option<Arc<Link>> {
        self.inner.link.borrow().clone()
    }

    /// True while a link is up and both its connection and channel are open.
    pub fn is_connected(&self) -> bool {
        self.current().is_some_and(|l| l.healthy())
    }

    /// Waits until a link is up, or `timeout` passes.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.wait_link(deadline, None).await.is_some()
    }

    /// Publishes a job to `<prefix>.jobs` with routing key = its pool, persistent, mandatory,
    /// and waits for the confirm within the confirm timeout.
    pub async fn publish_job(&self, msg: &JobMessage) -> Result<(), PublishError> {
        self.publish_job_with_headers(msg, FieldTable::default())
            .await
    }

    /// Publishes every job of a batch at once and waits for all their confirms together (each
    /// under the confirm timeout, retried on the next link like `publish_job`): the batch
    /// costs one confirm round trip, not one per job. Answers in the order of `msgs`.
    pub async fn publish_jobs(&self, msgs: &[JobMessage]) -> Vec<Result<(), PublishError>> {
        futures_util::future::join_all(msgs.iter().map(|m| self.publish_job(m))).await
    }

    /// `publish_job` with message headers (e.g. a re-drive's attempt offset).
    pub async fn publish_job_with_headers(
        &self,
        msg: &JobMessage,
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let expiration = msg.placement.ttl_s.map(|s| s.saturating_mul(1000));
        let props = amqp::job_properties(&msg.id.to_string(), expiration, headers);
        let body = msg.to_bytes();
        let exchange = self.inner.topology.jobs_exchange();
        let deadline = Instant::now() + self.inner.confirm_timeout;
        let mut failed_generation = None;
        loop {
            let Some(link) = self.wait_link(deadline, failed_generation).await else {
                return Err(match failed_generation {
                    Some(_) => PublishError::LinkLost,
                    None => PublishError::Unavailable,
                });
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = amqp::publish_confirmed(
                &link.channel,
                &exchange,
                &msg.placement.pool,
                &body,
                props.clone(),
                remaining,
            )
            .await;
            match result {
                Ok(()) => return Ok(()),
                Err(AmqpError::Unroutable) => return Err(PublishError::Unroutable),
                Err(AmqpError::Nacked) => return Err(PublishError::Nacked),
                Err(AmqpError::ConfirmTimeout(_)) => {
                    self.inner.kick.notify_one();
                    return Err(PublishError::Timeout(self.inner.confirm_timeout));
                }
                Err(e) => {
                    // The link died under this publish. The message may or may not have been
                    // stored; publishing it again with the same id is safe (workers deduplicate
                    // by id) and is the only way to answer 202.
                    tracing::warn!(
                        error.message = %e,
                        node = %amqp::redact(&link.node),
                        "publish failed on a broken link; retrying on the next one"
                    );
                    self.inner.kick.notify_one();
                    failed_generation = Some(link.generation);
                }
            }
        }
    }

    /// The current link unless it is the one that just failed, waiting for another until
    /// `deadline`.
    async fn wait_link(&self, deadline: Instant, not_generation: Option<u64>) -> Option<Arc<Link>> {
        let mut rx = self.inner.link.subscribe();
        let usable = |l: &Option<Arc<Link>>| {
            l.as_ref()
                .is_some_and(|l| Some(l.generation) != not_generation && l.healthy())
        };
        let wait = rx.wait_for(usable);
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(link)) => link.clone(),
            _ => None,
        }
    }

    /// Offers `link` to publishers until it dies or the gateway stops.
    async fn hold(self, link: Arc<Link>, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.inner.link.send_replace(Some(link.clone()));
        let why = self.watch(&link, &shutdown).await;
        self.inner.link.send_replace(None);
        match why {
            None => Ok(()),
            Some(why) => Err(anyhow::anyhow!(why)),
        }
    }

    /// Returns when the link dies (with the reason) or on shutdown (`None`).
    async fn watch(&self, link: &Link, shutdown: &CancellationToken) -> Option<String> {
        let mut events = link.connection.events_listener();
        let mut tick = tokio::time::interval(HEALTH_CHECK_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                event = events.next() => match event {
                    Some(lapin::Event::Error(e)) => return Some(format!("connection error: {e}")),
                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(%reason, "the broker blocked publishing (resource alarm)");
                    }
                    Some(lapin::Event::ConnectionUnblocked) => {
                        tracing::info!("the broker unblocked publishing");
                    }
                    Some(_) => {}
                    None => return Some("connection event stream ended".into()),
                },
                () = self.inner.kick.notified() => {
                    if !link.healthy() {
                        return Some("a publish found the link closed".into());
                    }
                }
                _ = tick.tick() => {
                    if !link.healthy() {
                        return Some("the connection or channel closed".into());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_after_sending_are_ambiguous() {
        assert!(PublishError::Timeout(Duration::from_secs(5)).ambiguous());
        assert!(PublishError::LinkLost.ambiguous());
        assert!(!PublishError::Unavailable.ambiguous());
        assert!(!PublishError::Nacked.ambiguous());
        assert!(!PublishError::Unroutable.ambiguous());
    }

    #[tokio::test]
    async fn without_a_link_a_publish_is_unavailable_once_its_deadline_passes() {
        let topology = Topology::from_settings(&gpuq_common::Settings::default());
        let broker = Broker::unconnected(topology, Duration::from_millis(50));
        let req: gpuq_common::job::SubmitRequest =
            serde_json::from_str(r#"{"kind":"simulate"}"#).unwrap();
        let (payload, placement) = req.validate().unwrap();
        let started = Instant::now();
        let err = broker
            .publish_job(&JobMessage::new(payload, placement))
            .await
            .unwrap_err();
        assert!(matches!(err, PublishError::Unavailable), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(!broker.is_connected());
    }
}
