//! Coordination through Redis: the per-job lease and done marker of the delivery protocol,
//! this process's liveness key (so others can take over its leases when it dies), operator
//! intent (cordon/drain) and job cancellation.

use super::CoordResult;
use std::time::Duration;

use super::conn::Conn;
use super::keys::{COMPARE_AND_DELETE_LUA, Keys};
use super::pools::{PoolView, pool_view};
use crate::engine::AdminState;
use redis::{AsyncCommands, Script};
use uuid::Uuid;

/// How long a done marker outlives the job: longer than any redelivery can arrive.
const DONE_TTL_S: u64 = 7 * 24 * 3600;

/// How long an engine without a heartbeat still counts as possibly able to place a job: a
/// job only it could run is given back, not dead-lettered as unschedulable, while it restarts.
pub const ENGINE_AWAY_GRACE: Duration = Duration::from_secs(600);

/// Liveness of a worker process: refreshed every second, gone 3 s after the process dies. A
/// lease whose owner's liveness key is gone is taken over.
pub const ALIVE_TTL: Duration = Duration::from_secs(3);

/// The answer of the one round trip of the delivery protocol's step 4 (done marker, cancel,
/// lease); the worker's `protocol` decides what each means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// The job already has a final result.
    Done,
    /// A client cancelled the job before it started.
    Cancelled,
    /// A live worker holds the lease.
    Held,
    Taken,
    /// Taken from a worker whose liveness key is gone.
    TakenOver,
}

/// Done check, cancel check and lease in one round trip. KEYS: done, lease, cancel. ARGV: owner,
/// ttl ms, alive prefix. -1 done; -2 cancelled; 0 held by a live owner; 1 taken; 2 taken over
/// from a dead owner.
const ACQUIRE_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local owner = redis.call('GET', KEYS[2])
if owner == ARGV[1] then redis.call('PEXPIRE', KEYS[2], ARGV[2]) return 1 end
if not owner then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) return 1 end
if redis.call('EXISTS', ARGV[3] .. owner) == 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) return 2
end
return 0
"#;

/// Renews our lease, re-taking it if it expired meanwhile (e.g. Redis was away); 0 when another
/// owner holds it. KEYS: lease. ARGV: owner, ttl ms.
const RENEW_LUA: &str = r#"
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] or not owner then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"#;

#[derive(Clone)]
pub struct Coordinator {
    pub(super) conn: Conn,
    pub(super) keys: Keys,
    pub(super) owner: String,
    lease_ttl_ms: u64,
    acquire: Script,
    renew: Script,
    release: Script,
}

impl Coordinator {
    pub fn new(conn: Conn, keys: Keys, owner: String, lease_ttl_ms: u64) -> Self {
        Self {
            conn,
            keys,
            owner,
            lease_ttl_ms,
            acquire: Script::new(ACQUIRE_LUA),
            renew: Script::new(RENEW_LUA),
            release: Script::new(COMPARE_AND_DELETE_LUA),
        }
    }

    /// Connects now: a worker does not start without Redis.
    pub async fn connect(
        url: &str,
        keys: Keys,
        owner: String,
        lease_ttl_ms: u64,
    ) -> CoordResult<Self> {
        let config = super::conn::config(std::time::Duration::from_secs(2), 1);
        let conn = super::conn::connect(url, config).await?;
        Ok(Self::new(conn, keys, owner, lease_ttl_ms))
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub async fn acquire(&self, job: Uuid) -> CoordResult<Acquire> {
        let mut c = self.conn.clone();
        let r: i64 = self
            .acquire
            .key(self.keys.done(job))
            .key(self.keys.lease(job))
            .key(self.keys.cancel(job))
            .arg(&self.owner)
            .arg(self.lease_ttl_ms)
            .arg(self.keys.instance_alive(""))
            .invoke_async(&mut c)
            .await?;
        Ok(match r {
            -1 => Acquire::Done,
            -2 => Acquire::Cancelled,
            0 => Acquire::Held,
            2 => Acquire::TakenOver,
            _ => Acquire::Taken,
        })
    }

    /// True while we still own the lease.
    pub async fn renew(&self, job: Uuid) -> CoordResult<bool> {
        let mut c = self.conn.clone();
        let r: i64 = self
            .renew
            .key(self.keys.lease(job))
            .arg(&self.owner)
            .arg(self.lease_ttl_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(r == 1)
    }

    pub async fn release(&self, job: Uuid) -> CoordResult<()> {
        let mut c = self.conn.clone();
        let _: i64 = self
            .release
            .key(self.keys.lease(job))
            .arg(&self.owner)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }

    /// Sets the done marker and drops our lease in one round trip; with `ring`, in the same
    /// round trip rings the bell of the job's log (`bell.rs`): its final event is stored.
    pub async fn mark_done(&self, job: Uuid, ring: bool) -> CoordResult<()> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.set_ex(self.keys.done(job), 1, DONE_TTL_S).ignore();
        pipe.cmd("EVAL")
            .arg(COMPARE_AND_DELETE_LUA)
            .arg(1)
            .arg(self.keys.lease(job))
            .arg(&self.owner)
            .ignore();
        if ring {
            pipe.cmd("PUBLISH")
                .arg(self.keys.events_channel(job))
                .arg(1)
                .ignore();
        }
        pipe.query_async::<()>(&mut c).await.map_err(Into::into)
    }

    /// Whether a client asked to cancel the job.
    pub async fn cancel_requested(&self, job: Uuid) -> CoordResult<bool> {
        let mut c = self.conn.clone();
        c.exists(self.keys.cancel(job)).await.map_err(Into::into)
    }

    pub async fn refresh_alive(&self) -> CoordResult<()> {
        let mut c = self.conn.clone();
        c.set_ex::<_, _, ()>(
            self.keys.instance_alive(&self.owner),
            1,
            ALIVE_TTL.as_secs(),
        )
        .await
        .map_err(Into::into)
    }

    pub async fn forget_alive(&self) -> CoordResult<()> {
        let mut c = self.conn.clone();
        c.del(self.keys.instance_alive(&self.owner))
            .await
            .map_err(Into::into)
    }

    /// The operator's intent for this engine in one round trip: cordon/drain, and whether a
    /// restart was asked of this very process (a request names the instance it is for).
    pub async fn intent(&self, engine: &str) -> CoordResult<(Option<AdminState>, bool)> {
        let mut c = self.conn.clone();
        let (admin, restart): (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(self.keys.engine_admin(engine))
            .arg(self.keys.engine_restart(engine))
            .query_async(&mut c)
            .await?;
        Ok((
            admin.as_deref().and_then(AdminState::parse),
            restart.as_deref() == Some(self.owner.as_str()),
        ))
    }

    /// Removes the restart request this process obeyed (not one made for a later process):
    /// the lease's release script is a compare-and-delete on our instance id, which is the
    /// request's value too.
    pub async fn clear_restart(&self, engine: &str) -> CoordResult<()> {
        let mut c = self.conn.clone();
        self.release
            .key(self.keys.engine_restart(engine))
            .arg(&self.owner)
            .invoke_async::<i64>(&mut c)
            .await
            .map(drop)
            .map_err(Into::into)
    }

    pub async fn ping(&self) -> CoordResult<()> {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut c)
            .await
            .map_err(Into::into)
    }

    /// Whether any engine serving `pool` could ever place a job asking for `gpus` GPUs with
    /// `min_memory_mb` each, judged by the live engines' heartbeats. `None` when nothing can be
    /// concluded: no engine of the pool has a fresh heartbeat (the manager may be away), or none
    /// of the live ones fits while an engine seen within [`ENGINE_AWAY_GRACE`] has no heartbeat
    /// now (restarting, or briefly unreachable: it may be the one that fits).
    pub async fn pool_can_place(
        &self,
        pool: &str,
        gpus: u32,
        min_memory_mb: u64,
    ) -> CoordResult<Option<bool>> {
        let mut c = self.conn.clone();
        let PoolView {
            live: in_pool,
            away,
        } = pool_view(&mut c, &self.keys, pool).await?;
        if in_pool.is_empty() {
            return Ok(None);
        }
        let fits = in_pool.iter().any(|hb| {
            hb.gpus
                .iter()
                .filter(|g| g.memory_total_mb >= min_memory_mb)
                .count()
                >= gpus as usize
        });
        if fits || away.is_empty() {
            return Ok(Some(fits));
        }
        let mut pipe = redis::pipe();
        for e in &away {
            pipe.hget(self.keys.engine_info(e), "last_seen_ms");
        }
        let seen: Vec<Option<i64>> = pipe.query_async(&mut c).await?;
        let recent = crate::job::now_ms() - ENGINE_AWAY_GRACE.as_millis() as i64;
        if seen.iter().flatten().any(|&ms| ms >= recent) {
            return Ok(None);
        }
        Ok(Some(false))
    }
}
