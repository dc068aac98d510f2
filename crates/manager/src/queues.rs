//! Queue depths and consumers from the RabbitMQ management API, polled every few seconds from
//! whichever node answers, kept for the status page and exported as `gpuq_queue_*` gauges.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use gpuq_common::amqp::redact;
use gpuq_common::metrics::ManagerMetrics;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

const QUEUES_PATH: &str =
    "/api/queues/%2f?columns=name,messages,messages_ready,messages_unacknowledged,consumers";

/// One queue as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QueueStats {
    pub name: String,
    pub messages: u64,
    pub ready: u64,
    pub unacked: u64,
    pub consumers: u64,
}

/// A row of `/api/queues`; counters are absent until the broker has sampled a new queue.
#[derive(Debug, Deserialize)]
struct MgmtRow {
    name: String,
    #[serde(default)]
    messages: Option<u64>,
    #[serde(default)]
    messages_ready: Option<u64>,
    #[serde(default)]
    messages_unacknowledged: Option<u64>,
    #[serde(default)]
    consumers: Option<u64>,
}

/// Keeps the queues whose names start with `<prefix>.`, sorted by name.
fn our_queues(rows: Vec<MgmtRow>, prefix: &str) -> Vec<QueueStats> {
    let head = format!("{prefix}.");
    let mut out: Vec<QueueStats> = rows
        .into_iter()
        .filter(|r| r.name.starts_with(&head))
        .map(|r| QueueStats {
            name: r.name,
            messages: r.messages.unwrap_or(0),
            ready: r.messages_ready.unwrap_or(0),
            unacked: r.messages_unacknowledged.unwrap_or(0),
            consumers: r.consumers.unwrap_or(0),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The last poll's result.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct QueueSnapshot {
    /// Whether the management API answered the last poll.
    pub up: bool,
    pub queues: Vec<QueueStats>,
}

pub struct QueuePoller {
    http: reqwest::Client,
    urls: Vec<String>,
    prefix: String,
    metrics: ManagerMetrics,
    /// The node that answered last; polls start there.
    preferred: AtomicUsize,
    latest: RwLock<QueueSnapshot>,
    exported: Mutex<BTreeSet<String>>,
}

impl QueuePoller {
    pub fn new(
        http: reqwest::Client,
        urls: Vec<String>,
        prefix: &str,
        metrics: ManagerMetrics,
    ) -> Self {
        Self {
            http,
            urls,
            prefix: prefix.to_string(),
            metrics,
            preferred: AtomicUsize::new(0),
            latest: RwLock::new(QueueSnapshot::default()),
            exported: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        self.latest.read().expect("queue lock").clone()
    }

    /// Polls the nodes in turn until one answers; updates the snapshot and the gauges.
    pub async fn poll_once(&self) -> bool {
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last_error = String::from("no management URL configured");
        for i in 0..self.urls.len() {
            let idx = (start + i) % self.urls.len();
            let base = self.urls[idx].trim_end_matches('/');
            match self.fetch(base).await {
                Ok(rows) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    self.publish(our_queues(rows, &self.prefix));
                    return true;
                }
                Err(e) => last_error = format!("{}: {e}", redact(base)),
            }
        }
        if self.latest.read().expect("queue lock").up {
            tracing::warn!(error.message = %last_error, "RabbitMQ management API unreachable");
        }
        self.latest.write().expect("queue lock").up = false;
        self.metrics.broker_up.set(0.0);
        false
    }

    async fn fetch(&self, base: &str) -> Result<Vec<MgmtRow>, reqwest::Error> {
        self.http
            .get(format!("{base}{QUEUES_PATH}"))
            .timeout(Duration::from_secs(3))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }

    fn publish(&self, queues: Vec<QueueStats>) {
        let m = &self.metrics;
        let names: BTreeSet<String> = queues.iter().map(|q| q.name.clone()).collect();
        {
            let mut exported = self.exported.lock().expect("queue lock");
            for gone in exported.difference(&names) {
                for family in [
                    &m.queue_messages,
                    &m.queue_messages_ready,
                    &m.queue_messages_unacked,
                    &m.queue_consumers,
                ] {
                    let _ = family.remove_label_values(&[gone.as_str()]);
                }
            }
            *exported = names;
        }
        for q in &queues {
            let l = [q.name.as_str()];
            m.queue_messages
                .with_label_values(&l)
                .set(q.messages as f64);
            m.queue_messages_ready
                .with_label_values(&l)
                .set(q.ready as f64);
            m.queue_messages_unacked
                .with_label_values(&l)
                .set(q.unacked as f64);
            m.queue_consumers
                .with_label_values(&l)
                .set(q.consumers as f64);
        }
        m.broker_up.set(1.0);
        *self.latest.write().expect("queue lock") = QueueSnapshot { up: true, queues };
    }

    /// Polls every `interval` until cancelled.
    pub async fn run(&self, interval: Duration, token: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            tokio::select! {
                _ = token.cancelled() => break,
                _ = self.poll_once() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_prefix_is_kept_and_missing_counters_read_as_zero() {
        let rows: Vec<MgmtRow> = serde_json::from_str(
            r#"[{"name":"t1.jobs.default","messages":5,"messages_ready":3,"messages_unacknowledged":2,"consumers":1},
                {"name":"t1.dead"},
                {"name":"t10.dead","messages":9},
                {"name":"other","messages":1}]"#,
        )
        .unwrap();
        let q = our_queues(rows, "t1");
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].name, "t1.dead");
        assert_eq!(q[0].messages, 0);
        assert_eq!(
            q[1],
            QueueStats {
                name: "t1.jobs.default".into(),
                messages: 5,
                ready: 3,
                unacked: 2,
                consumers: 1
            }
        );
    }
}
