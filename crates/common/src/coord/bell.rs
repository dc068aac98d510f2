//! "A job's log grew": workers announce each append on one Redis pub/sub channel, and a gateway
//! wakes the event streams of that job at once instead of waiting for their next look at the
//! store. Only a wake-up: the store stays the log, and a stream that misses a ring (Redis away,
//! a reconnect) still looks at the store every `FALLBACK`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::CoordResult;
use super::keys::Keys;
use super::lease::Coordinator;

/// How often a stream looks at the store when no ring came.
pub const FALLBACK: Duration = Duration::from_secs(1);

impl Coordinator {
    /// Rings the bell of `job`'s log (best effort: a lost ring costs a stream `FALLBACK`).
    pub async fn ring(&self, job: Uuid) -> CoordResult<()> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.keys.events_channel())
            .arg(job.to_string())
            .query_async(&mut c)
            .await?;
        Ok(())
    }
}

/// The gateway's side: one subscription, and a `Notify` per job that has open streams.
#[derive(Default)]
pub struct Bell {
    jobs: Mutex<HashMap<Uuid, Weak<Notify>>>,
}

impl Bell {
    /// What a stream of `job` waits on; shared by every stream of the job, gone with the last.
    pub fn waiter(&self, job: Uuid) -> Arc<Notify> {
        let mut jobs = self.jobs.lock().expect("bell");
        if let Some(n) = jobs.get(&job).and_then(Weak::upgrade) {
            return n;
        }
        let n = Arc::new(Notify::new());
        jobs.insert(job, Arc::downgrade(&n));
        n
    }

    fn ring(&self, job: Uuid) {
        let mut jobs = self.jobs.lock().expect("bell");
        match jobs.get(&job).and_then(Weak::upgrade) {
            Some(n) => n.notify_waiters(),
            None => {
                jobs.remove(&job);
            }
        }
    }

    /// Listens on the channel until `stop`, reconnecting with a pause when Redis goes away.
    pub async fn listen(self: Arc<Self>, redis_url: String, keys: Keys, stop: CancellationToken) {
        while !stop.is_cancelled() {
            if let Err(e) = self.listen_once(&redis_url, &keys, &stop).await {
                tracing::debug!(error.message = %e, "event bell: Redis subscription lost; streams fall back to polling");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(FALLBACK) => {}
            }
        }
    }

    async fn listen_once(
        &self,
        redis_url: &str,
        keys: &Keys,
        stop: &CancellationToken,
    ) -> redis::RedisResult<()> {
        let client = redis::Client::open(redis_url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(keys.events_channel()).await?;
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                m = messages.next() => {
                    let Some(m) = m else { return Ok(()) };
                    if let Ok(job) = m.get_payload::<String>().map(|s| s.parse::<Uuid>())
                        && let Ok(job) = job
                    {
                        self.ring(job);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ring_wakes_every_stream_of_its_job_and_only_those() {
        let bell = Bell::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let (a1, a2, b1) = (bell.waiter(a), bell.waiter(a), bell.waiter(b));
        assert!(Arc::ptr_eq(&a1, &a2));
        {
            let (w1, w2, wb) = (a1.notified(), a2.notified(), b1.notified());
            tokio::pin!(w1, w2, wb);
            for w in [w1.as_mut(), w2.as_mut(), wb.as_mut()] {
                w.enable();
            }
            bell.ring(a);
            tokio::time::timeout(Duration::from_secs(1), &mut w1)
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(1), &mut w2)
                .await
                .unwrap();
            assert!(
                tokio::time::timeout(Duration::from_millis(50), &mut wb)
                    .await
                    .is_err()
            );
        }
        drop((a1, a2));
        bell.ring(a);
        assert!(
            !bell.jobs.lock().unwrap().contains_key(&a),
            "forgotten with its streams"
        );
    }
}
