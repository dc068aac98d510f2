//! The broker's own ceiling for gpuq's topology on this machine: publishes N confirmed
//! messages (64 in flight, like `gpuq bench`) into a fresh pool queue of the real topology
//! (quorum, delivery limit, dead-lettering) while C consumer connections with prefetch P ack
//! every delivery — gpuq's traffic with workers that do no work at all (no Redis, no store, no
//! logs). What `gpuq bench --duration-ms 0` reaches can only be below this number.
//!
//!   cargo run --release -p gpuq-common --example broker_ceiling -- [JOBS] [CONSUMERS] [PREFETCH] [HOLD_US] [backlog]
//!
//! HOLD_US (default 0): each delivery is held this long before its ack, without using the CPU —
//! a worker's lease, result write and done marker take about this long before it may ack, and
//! with prefetch = free GPU slots every slot waits for its ack to be committed by the queue's
//! Raft majority before its next delivery. (Tokio's timer rounds up to whole milliseconds.)
//! `backlog`: publish everything first, then time the consumers alone.
//!
//! Reads `GPUQ_AMQP_URLS` like the services (default: the local stack). Deletes its queues afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gpuq_common::amqp::{confirm_channel, connect_any, job_properties, publish_confirmed};
use gpuq_common::topology::Topology;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio::sync::{Notify, Semaphore};

const BODY: &[u8] = br#"{"schema":1,"id":"00000000-0000-0000-0000-000000000000","kind":"simulate","params":{"duration_ms":0},"placement":{"gpus":1,"pool":"default"},"created_at_ms":0}"#;

struct Args {
    jobs: usize,
    consumers: usize,
    prefetch: u16,
    hold: Duration,
    backlog: bool,
}

fn args() -> anyhow::Result<Args> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let backlog = raw.iter().any(|a| a == "backlog");
    let mut nums = raw
        .iter()
        .filter(|a| *a != "backlog")
        .map(|a| a.parse::<u64>());
    let mut next = |default: u64| nums.next().transpose().map(|v| v.unwrap_or(default));
    Ok(Args {
        jobs: next(2000)? as usize,
        consumers: next(3)? as usize,
        prefetch: u16::try_from(next(2)?)?,
        hold: Duration::from_micros(next(0)?),
        backlog,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let urls = gpuq_common::Settings::load()?.amqp_url_list();
    let topo = Topology {
        prefix: format!("ceiling{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        delivery_limit: 5,
        queue_ttl_ms: 3_600_000,
        max_queue_length: 1_000_000,
    };
    // Everything on the first node, like the dev stack's services.
    let first = vec![urls[0].clone()];
    let (admin, _) = connect_any(&first, "ceiling-admin").await?;
    let ch = admin.create_channel().await?;
    topo.declare(&ch, &["default".into()]).await?;
    let (publisher, _) = connect_any(&first, "ceiling-publisher").await?;
    let pch = confirm_channel(&publisher).await?;

    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let finished = all_done.notified();
    let start = Instant::now();
    let mut conns = vec![];
    if !a.backlog {
        conns = consume(&a, &first, &topo, &done, &all_done).await?;
    }
    publish_all(&pch, &topo, a.jobs).await?;
    let published = start.elapsed();
    let consumed_from = if a.backlog {
        let t = Instant::now();
        conns = consume(&a, &first, &topo, &done, &all_done).await?;
        t
    } else {
        start
    };
    tokio::time::timeout(Duration::from_secs(120), finished).await?;
    let total = consumed_from.elapsed();
    let what = if a.backlog {
        "consumed the backlog"
    } else {
        "all acked"
    };
    println!(
        "broker ceiling: {} messages, {} consumers × prefetch {}, hold {} µs: published in {:.2}s ({:.0}/s), {what} in {:.2}s = {:.0} msgs/s",
        a.jobs,
        a.consumers,
        a.prefetch,
        a.hold.as_micros(),
        published.as_secs_f64(),
        a.jobs as f64 / published.as_secs_f64(),
        total.as_secs_f64(),
        a.jobs as f64 / total.as_secs_f64()
    );
    for name in [topo.pool_queue("default"), topo.dead_queue()] {
        ch.queue_delete(ShortString::from(name), QueueDeleteOptions::default())
            .await?;
    }
    drop(conns);
    Ok(())
}

/// Publishes `jobs` messages with confirms, 64 in flight.
async fn publish_all(pch: &Channel, topo: &Topology, jobs: usize) -> anyhow::Result<()> {
    let inflight = Arc::new(Semaphore::new(64));
    let mut pubs = vec![];
    for _ in 0..jobs {
        let permit = inflight.clone().acquire_owned().await?;
        let (pch, exchange) = (pch.clone(), topo.jobs_exchange());
        pubs.push(tokio::spawn(async move {
            let id = uuid::Uuid::now_v7().to_string();
            let r = publish_confirmed(
                &pch,
                &exchange,
                "default",
                BODY,
                job_properties(&id, None, FieldTable::default()),
                Duration::from_secs(10),
            )
            .await;
            drop(permit);
            r
        }));
    }
    for p in pubs {
        p.await??;
    }
    Ok(())
}

/// Starts the consumer connections; `all_done` is notified at the last ack.
async fn consume(
    a: &Args,
    urls: &[String],
    topo: &Topology,
    done: &Arc<AtomicUsize>,
    all_done: &Arc<Notify>,
) -> anyhow::Result<Vec<Connection>> {
    let mut conns = vec![];
    for i in 0..a.consumers {
        let (conn, _) = connect_any(urls, &format!("ceiling-consumer-{i}")).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(a.prefetch, BasicQosOptions::default()).await?;
        let mut deliveries = ch
            .basic_consume(
                ShortString::from(topo.pool_queue("default")),
                ShortString::from(format!("ceiling-{i}")),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (done, all_done, jobs, hold) = (done.clone(), all_done.clone(), a.jobs, a.hold);
        tokio::spawn(async move {
            while let Some(Ok(d)) = deliveries.next().await {
                let (done, all_done) = (done.clone(), all_done.clone());
                let ack = async move {
                    if !hold.is_zero() {
                        tokio::time::sleep(hold).await;
                    }
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                    if done.fetch_add(1, Ordering::SeqCst) + 1 == jobs {
                        all_done.notify_one();
                    }
                };
                if hold.is_zero() {
                    ack.await;
                } else {
                    tokio::spawn(ack);
                }
            }
        });
        conns.push(conn);
    }
    Ok(conns)
}
