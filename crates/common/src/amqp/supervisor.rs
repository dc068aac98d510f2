//! The one broker-connection supervisor of the gateway, the manager and the worker: connect
//! through any node of the cluster, open a confirm channel, declare the topology, hand the
//! session to the service, and when the service's session ends (the link died, a channel closed)
//! close what is left of it and connect again — to another node first, with backoff — until
//! shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::types::ShortString;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use super::{confirm_channel, connect_any, redact};
use crate::topology::Topology;

/// Wait before reconnecting; doubles with every failed connect or short-lived session up to
/// `BACKOFF_MAX`, and starts afresh after a session that lived `STABLE_AFTER`.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long a closing connection may take to answer before it is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// One live connection, with a confirm-mode channel on which the topology was declared.
pub struct Session {
    pub connection: Connection,
    pub channel: Channel,
    /// The node's URL (log it through `redact`).
    pub node: String,
    /// Counts the sessions of one supervisor from 1, so a caller can tell a fresh link from the
    /// one that just failed it.
    pub generation: u64,
}

impl Session {
    /// Both the connection and the confirm channel are open.
    pub fn healthy(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    async fn close(&self) {
        if !self.connection.status().connected() {
            return;
        }
        let closing = self.connection.close(200, ShortString::from("OK"));
        match tokio::time::timeout(CLOSE_WAIT, closing).await {
            Ok(Ok(())) => tracing::info!("broker connection closed"),
            Ok(Err(e)) => tracing::debug!(error.message = %e, "closing the broker connection"),
            Err(_) => tracing::warn!("the broker did not answer the connection close in time"),
        }
    }
}

/// Where and how a service connects.
#[derive(Clone)]
pub struct Supervisor {
    pub urls: Vec<String>,
    /// The connection name the broker's management UI shows.
    pub name: String,
    pub topology: Topology,
    /// The pools whose queues this service declares on every connect (a worker's: it must
    /// consume them, so a refusal fails the session).
    pub pools: Vec<String>,
    /// Pools whose queues this service declares on every connect when its broker user may
    /// (the gateway's and the manager's courtesy, so jobs wait for a pool's first worker);
    /// a refusal is logged and ignored (`Topology::declare_pool_if_permitted`).
    pub pools_if_permitted: Vec<String>,
}

impl Supervisor {
    /// Runs `serve` on one session after another until `shutdown`. `serve` returns when its
    /// session is no longer usable (`Err` says why) or on shutdown; the supervisor then closes
    /// the connection if it still answers, so a channel error never leaks a connection.
    pub async fn run<F, Fut>(&self, shutdown: &CancellationToken, mut serve: F)
    where
        F: FnMut(Arc<Session>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let mut backoff = BACKOFF_MIN;
        let mut generation = 0u64;
        while !shutdown.is_cancelled() {
            let opened = tokio::select! {
                r = self.open(generation + 1) => r,
                () = shutdown.cancelled() => break,
            };
            match opened {
                Ok(session) => {
                    generation = session.generation;
                    tracing::info!(node = %redact(&session.node), generation, "broker link up");
                    let session = Arc::new(session);
                    let started = tokio::time::Instant::now();
                    let ended = serve(session.clone()).await;
                    if started.elapsed() >= STABLE_AFTER {
                        backoff = BACKOFF_MIN;
                    }
                    session.close().await;
                    if shutdown.is_cancelled() {
                        break;
                    }
                    match ended {
                        Ok(()) => tracing::warn!(
                            node = %redact(&session.node),
                            "broker session ended; reconnecting"
                        ),
                        Err(e) => tracing::warn!(
                            node = %redact(&session.node),
                            error.cause_chain = ?e,
                            error.message = %e,
                            "broker link lost; reconnecting"
                        ),
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        error.cause_chain = ?e,
                        error.message = %e,
                        retry_in_ms = backoff.as_millis() as u64,
                        "cannot reach the broker"
                    );
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        tracing::info!(name = %self.name, "broker supervisor stopped");
    }

    async fn open(&self, generation: u64) -> anyhow::Result<Session> {
        use anyhow::Context as _;
        let (connection, node) = connect_any(&self.urls, &self.name)
            .await
            .context("connecting to the broker")?;
        let channel = confirm_channel(&connection)
            .await
            .context("opening the confirm channel")?;
        self.topology
            .declare(&channel, &self.pools)
            .await
            .context("declaring the topology")?;
        for pool in &self.pools_if_permitted {
            let declared = self
                .topology
                .declare_pool_if_permitted(&connection, pool)
                .await
                .with_context(|| format!("declaring the queue of pool {pool}"))?;
            if !declared {
                tracing::debug!(
                    pool = %pool,
                    "this broker user may not create the pool's queue; its workers do"
                );
            }
        }
        Ok(Session {
            connection,
            channel,
            node,
            generation,
        })
    }
}
