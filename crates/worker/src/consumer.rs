//! The broker side of the worker: connect through any node, declare the pools' queues, and hold
//! a consumer on each only while the gate is open (a schedulable GPU, Redis answering, not
//! cordoned or draining, not stopping). Prefetch equals the schedulable GPU slots, so the
//! worker never holds deliveries it cannot start. A lost connection is re-made on another node.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use gpuq_common::amqp::{Session, Supervisor};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use tokio_util::task::TaskTracker;

use crate::process::{Channels, process_delivery};
use crate::state::{Worker, gate_open};

pub async fn run(w: Arc<Worker>) {
    let jobs = TaskTracker::new();
    let supervisor = Supervisor {
        urls: w.config.common.amqp_urls.clone(),
        name: format!("gpuq-worker {}", w.instance_id),
        topology: w.topology.clone(),
        pools: w.pools.clone(),
        pools_if_permitted: Vec::new(),
    };
    supervisor
        .run(&w.shutdown, |link| session(w.clone(), jobs.clone(), link))
        .await;
    drain(&w, &jobs).await;
}

/// In-flight jobs get the grace period; then they are stopped and given back.
async fn drain(w: &Worker, jobs: &TaskTracker) {
    jobs.close();
    let grace = w.config.shutdown_grace;
    if tokio::time::timeout(grace, jobs.wait()).await.is_err() {
        tracing::warn!(
            running = w.running_jobs().len(),
            "grace period over: stopping running jobs"
        );
        w.stop_jobs(None, crate::runner::StopReason::Shutdown);
        let _ = tokio::time::timeout(Duration::from_secs(10), jobs.wait()).await;
    }
}

/// Starts a consumer per pool; each delivery becomes a job task straight from the consumer's
/// stream (no hop through another task: a zero-length job is a few milliseconds, and every
/// hand-over is a wake-up).
async fn consume_all(
    w: &Arc<Worker>,
    jobs: &TaskTracker,
    channels: &Arc<Channels>,
    prefetch: u16,
) -> anyhow::Result<Vec<ShortString>> {
    let ch = &channels.consume;
    ch.basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    let mut tags = vec![];
    for pool in &w.pools {
        let tag = ShortString::from(format!("{}:{pool}", w.instance_id));
        let mut consumer = ch
            .basic_consume(
                ShortString::from(w.topology.pool_queue(pool)),
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (w, jobs, channels) = (w.clone(), jobs.clone(), channels.clone());
        tokio::spawn(async move {
            while let Some(d) = consumer.next().await {
                match d {
                    Ok(d) => {
                        jobs.spawn(process_delivery(w.clone(), channels.clone(), d));
                    }
                    Err(e) => {
                        tracing::warn!(error.message = %e, "consumer stream failed");
                        break;
                    }
                }
            }
        });
        tags.push(tag);
    }
    Ok(tags)
}

/// Consumes on one broker link: the supervisor's confirm channel publishes give-backs and
/// dead letters, a second channel consumes.
async fn session(w: Arc<Worker>, jobs: TaskTracker, link: Arc<Session>) -> anyhow::Result<()> {
    let consume = link.connection.create_channel().await?;
    let channels = Arc::new(Channels {
        consume,
        publish: link.channel.clone(),
    });
    w.broker_connected.store(true, Ordering::Relaxed);
    let result = serve(&w, &jobs, &link, &channels).await;
    w.broker_connected.store(false, Ordering::Relaxed);
    w.consuming.store(false, Ordering::Relaxed);
    w.metrics.consuming.set(0);
    if w.shutdown.is_cancelled() {
        // Let in-flight jobs ack on this connection before the supervisor closes it.
        drain(&w, &jobs).await;
    }
    result
}

async fn serve(
    w: &Arc<Worker>,
    jobs: &TaskTracker,
    link: &Session,
    channels: &Arc<Channels>,
) -> anyhow::Result<()> {
    let mut capacity = w.slots.subscribe();
    let mut admin = w.admin.subscribe();
    let mut redis_ok = w.redis_ok.subscribe();
    let mut tags: Vec<ShortString> = vec![];
    let mut prefetch = 0u16;
    let mut health = tokio::time::interval(Duration::from_millis(500));
    loop {
        let want = gate_open(w);
        let slots = w.slots.capacity().schedulable.min(u32::from(u16::MAX)) as u16;
        if (!want || slots != prefetch) && !tags.is_empty() {
            for tag in tags.drain(..) {
                channels
                    .consume
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await?;
            }
            w.consuming.store(false, Ordering::Relaxed);
            w.metrics.consuming.set(0);
            tracing::info!(worker_id = %w.engine_id, "consumer paused");
        }
        if want && tags.is_empty() {
            tags = consume_all(w, jobs, channels, slots).await?;
            prefetch = slots;
            w.consuming.store(true, Ordering::Relaxed);
            w.metrics.consuming.set(1);
            tracing::info!(worker_id = %w.engine_id, prefetch, "consuming");
        }
        tokio::select! {
            _ = capacity.changed() => {}
            _ = admin.changed() => {}
            _ = redis_ok.changed() => {}
            _ = health.tick() => {
                if !link.healthy() || !channels.consume.status().connected() {
                    anyhow::bail!("broker connection lost");
                }
            }
            _ = w.shutdown.cancelled() => {
                for tag in tags.drain(..) {
                    let _ = channels.consume.basic_cancel(tag, BasicCancelOptions::default()).await;
                }
                return Ok(());
            }
        }
    }
}
