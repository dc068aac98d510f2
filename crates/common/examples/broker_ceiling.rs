//! The broker's own ceiling for gpuq's topology on this machine: publishes N confirmed
//! messages (64 in flight, like `gpuq bench`) into a fresh pool queue of the real topology
//! (quorum, delivery limit, dead-lettering) while C consumer connections with prefetch P ack
//! every delivery at once — gpuq's traffic with workers that do no work at all (no Redis, no
//! store, no logs). What `gpuq bench --duration-ms 0` reaches can only be below this number.
//!
//!   cargo run --release -p gpuq-common --example broker_ceiling -- [JOBS] [CONSUMERS] [PREFETCH]
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
use tokio::sync::Semaphore;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let jobs = args.next().transpose()?.unwrap_or(2000);
    let consumers = args.next().transpose()?.unwrap_or(3);
    let prefetch = args.next().transpose()?.unwrap_or(2);
    let urls = gpuq_common::Settings::load()?.amqp_url_list();
    let topo = Topology {
        prefix: format!("ceiling{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        delivery_limit: 5,
        queue_ttl_ms: 3_600_000,
        max_queue_length: 1_000_000,
    };
    let queue = topo.pool_queue("default");
    // Everything on the first node, like the dev stack's services.
    let first = vec![urls[0].clone()];
    let (admin, _) = connect_any(&first, "ceiling-admin").await?;
    let ch = admin.create_channel().await?;
    topo.declare(&ch, &["default".into()]).await?;

    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let mut conns = vec![];
    for i in 0..consumers {
        let (conn, _) = connect_any(&first, &format!("ceiling-consumer-{i}")).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(prefetch as u16, BasicQosOptions::default())
            .await?;
        let mut deliveries = ch
            .basic_consume(
                ShortString::from(queue.clone()),
                ShortString::from(format!("ceiling-{i}")),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (done, all_done) = (done.clone(), all_done.clone());
        tokio::spawn(async move {
            while let Some(Ok(d)) = deliveries.next().await {
                let _ = d.acker.ack(BasicAckOptions::default()).await;
                if done.fetch_add(1, Ordering::SeqCst) + 1 == jobs {
                    all_done.notify_one();
                }
            }
        });
        conns.push(conn);
    }

    let (publisher, _) = connect_any(&first, "ceiling-publisher").await?;
    let pch = confirm_channel(&publisher).await?;
    let body = br#"{"schema":1,"id":"00000000-0000-0000-0000-000000000000","kind":"simulate","params":{"duration_ms":0},"placement":{"gpus":1,"pool":"default"},"created_at_ms":0}"#;
    let inflight = Arc::new(Semaphore::new(64));
    let start = Instant::now();
    let finished = all_done.notified();
    let mut pubs = vec![];
    for _ in 0..jobs {
        let permit = inflight.clone().acquire_owned().await?;
        let (pch, exchange, queue) = (pch.clone(), topo.jobs_exchange(), "default".to_string());
        pubs.push(tokio::spawn(async move {
            let id = uuid::Uuid::now_v7().to_string();
            let r = publish_confirmed(
                &pch,
                &exchange,
                &queue,
                body,
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
    let published = start.elapsed();
    tokio::time::timeout(Duration::from_secs(120), finished).await?;
    let total = start.elapsed();
    println!(
        "broker ceiling: {jobs} messages, {consumers} consumers × prefetch {prefetch}: published in {:.2}s ({:.0}/s), all acked in {:.2}s = {:.0} msgs/s end to end",
        published.as_secs_f64(),
        jobs as f64 / published.as_secs_f64(),
        total.as_secs_f64(),
        jobs as f64 / total.as_secs_f64()
    );
    for name in [queue, topo.dead_queue()] {
        ch.queue_delete(ShortString::from(name), QueueDeleteOptions::default())
            .await?;
    }
    Ok(())
}
