//! "A job's log grew": workers announce each append on the job's own Redis pub/sub channel, and
//! a gateway that has event streams open for that job — and only such a gateway, subscribed to
//! the job's channel while they last — wakes them at once instead of waiting for their next
//! look at the store. Only a wake-up: the store stays the log, and a stream that misses a ring
//! (Redis away, a reconnect) still looks at the store every `FALLBACK`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::CoordResult;
use super::keys::Keys;
use super::lease::Coordinator;

/// How often a stream looks at the store when no ring came (and how often the gateway drops
/// the subscriptions of jobs whose streams are gone).
pub const FALLBACK: Duration = Duration::from_secs(1);

impl Coordinator {
    /// Rings the bell of `job`'s log (best effort: a lost ring costs a stream `FALLBACK`). A
    /// channel nobody listens to costs Redis a lookup.
    pub async fn ring(&self, job: Uuid) -> CoordResult<()> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.keys.events_channel(job))
            .arg(1)
            .query_async(&mut c)
            .await?;
        Ok(())
    }
}

/// The gateway's side: a `Notify` per job that has open streams, and one Redis connection
/// subscribed to those jobs' channels.
pub struct Bell {
    jobs: Mutex<HashMap<Uuid, Weak<Notify>>>,
    subscribe: mpsc::UnboundedSender<Uuid>,
    requests: Mutex<Option<mpsc::UnboundedReceiver<Uuid>>>,
}

impl Default for Bell {
    fn default() -> Self {
        let (subscribe, requests) = mpsc::unbounded_channel();
        Self {
            jobs: Mutex::new(HashMap::new()),
            subscribe,
            requests: Mutex::new(Some(requests)),
        }
    }
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
        let _ = self.subscribe.send(job);
        n
    }

    fn ring(&self, job: Uuid) {
        let jobs = self.jobs.lock().expect("bell");
        if let Some(n) = jobs.get(&job).and_then(Weak::upgrade) {
            n.notify_waiters();
        }
    }

    /// Jobs whose streams are all gone: forgotten, to be unsubscribed.
    fn sweep(&self) -> Vec<Uuid> {
        let mut jobs = self.jobs.lock().expect("bell");
        let gone: Vec<Uuid> = jobs
            .iter()
            .filter(|(_, w)| w.strong_count() == 0)
            .map(|(j, _)| *j)
            .collect();
        for j in &gone {
            jobs.remove(j);
        }
        gone
    }

    fn watched(&self) -> Vec<Uuid> {
        self.jobs.lock().expect("bell").keys().copied().collect()
    }

    /// Keeps the subscriptions and rings the streams until `stop`, reconnecting with a pause
    /// when Redis goes away.
    pub async fn listen(self: Arc<Self>, redis_url: String, keys: Keys, stop: CancellationToken) {
        let Some(mut requests) = self.requests.lock().expect("bell").take() else {
            return;
        };
        while !stop.is_cancelled() {
            if let Err(e) = self
                .listen_once(&redis_url, &keys, &mut requests, &stop)
                .await
            {
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
        requests: &mut mpsc::UnboundedReceiver<Uuid>,
        stop: &CancellationToken,
    ) -> redis::RedisResult<()> {
        let client = super::conn::client(redis_url)?;
        let (mut sink, mut messages) = client.get_async_pubsub().await?.split();
        for job in self.watched() {
            sink.subscribe(keys.events_channel(job)).await?;
        }
        let prefix = keys.events_channel(Uuid::nil());
        let prefix = prefix
            .trim_end_matches(&Uuid::nil().to_string())
            .to_string();
        let mut sweep = tokio::time::interval(FALLBACK);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                m = messages.next() => {
                    let Some(m) = m else { return Ok(()) };
                    if let Some(job) = m
                        .get_channel_name()
                        .strip_prefix(&prefix)
                        .and_then(|id| id.parse::<Uuid>().ok())
                    {
                        self.ring(job);
                    }
                }
                Some(job) = requests.recv() => sink.subscribe(keys.events_channel(job)).await?,
                _ = sweep.tick() => {
                    for job in self.sweep() {
                        sink.unsubscribe(keys.events_channel(job)).await?;
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
        // Subscriptions asked for: one per job, not per stream.
        let mut asked = bell.requests.lock().unwrap().take().unwrap();
        assert_eq!(
            (asked.try_recv().unwrap(), asked.try_recv().unwrap()),
            (a, b)
        );
        assert!(asked.try_recv().is_err());
        drop((a1, a2));
        assert_eq!(
            bell.sweep(),
            vec![a],
            "forgotten with its streams, to be unsubscribed"
        );
    }
}
