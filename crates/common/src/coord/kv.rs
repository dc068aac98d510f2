//! Redis for the gateway: idempotency keys and cancel signals. The connection is made lazily and
//! heals itself, so the gateway starts and serves requests that do not need Redis while Redis is
//! down; every command is bounded by a short timeout so a dead Redis costs a request a second, not
//! a hang.

use std::time::Duration;

use super::CoordError;
use super::conn as redis_conn;
use super::conn::Conn;
use super::keys::Keys;
use super::pools::pool_view;
use crate::job::{JobId, now_ms};

/// Upper bound of one Redis command, connection included.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(1500);

/// A cheap-to-clone handle on one multiplexed Redis connection.
#[derive(Clone)]
pub struct Kv {
    conn: Conn,
}

impl Kv {
    /// Parses the URL and prepares the connection without making it.
    pub fn lazy(url: &str) -> Result<Self, CoordError> {
        // On the request path: short timeouts and a quick reconnect.
        let config = redis_conn::config(Duration::from_secs(1), 1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = redis_conn::lazy(url, config)?;
        Ok(Self { conn })
    }

    /// Runs one command (or script invocation) with the timeout applied.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, CoordError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(REDIS_TIMEOUT, f(self.conn.clone())).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CoordError::Timeout(REDIS_TIMEOUT)),
        }
    }

    pub async fn ping(&self) -> Result<(), CoordError> {
        self.run(|mut c| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }

    /// A client's cancel of a job: the flag the worker reads before and while it runs the job
    /// (`lease::Coordinator::cancel_requested`), kept `ttl_s` seconds.
    pub async fn signal_cancel(
        &self,
        keys: &Keys,
        id: JobId,
        ttl_s: u64,
    ) -> Result<(), CoordError> {
        let key = keys.cancel(id);
        self.run(|mut c| async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(now_ms())
                .arg("EX")
                .arg(ttl_s)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Drops a job's done marker (a re-drive: workers would otherwise skip the job).
    /// Whether every live worker of `pool` runs with fault injection (`None`: no live worker),
    /// so a job whose knobs crash or hang workers may be sent there.
    pub async fn pool_fault_injection(
        &self,
        keys: &Keys,
        pool: &str,
    ) -> Result<Option<bool>, CoordError> {
        let mut c = self.conn.clone();
        let view = tokio::time::timeout(REDIS_TIMEOUT, pool_view(&mut c, keys, pool))
            .await
            .map_err(|_| CoordError::Timeout(REDIS_TIMEOUT))??;
        Ok((!view.live.is_empty()).then(|| view.live.iter().all(|hb| hb.fault_injection)))
    }

    pub async fn clear_done(&self, keys: &Keys, id: JobId) -> Result<(), CoordError> {
        let key = keys.done(id);
        self.run(
            |mut c| async move { redis::cmd("DEL").arg(&key).query_async::<i64>(&mut c).await },
        )
        .await
        .map(|_| ())
    }
}
