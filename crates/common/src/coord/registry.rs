//! The engine registry in Redis: the latest heartbeat of each engine under a TTL (its expiry is
//! what makes an engine `offline`), the set of every engine ever seen (until it has been offline
//! for the forget time), restart detection by instance id — a new instance is refused while the
//! current one is live, unless it said goodbye — and the operator's cordon/drain intent that
//! workers read and obey.

use super::CoordResult;
use std::collections::HashSet;

use super::conn::Conn;
use super::keys::Keys;
use crate::engine::{AdminState, EngineView, Heartbeat, derive_state};

/// Records a heartbeat atomically.
/// KEYS: 1 info hash, 2 starts counter, 3 heartbeat key, 4 engines set, 5 admin key.
/// ARGV: 1 instance id, 2 started_at_ms, 3 heartbeat JSON, 4 ttl ms, 5 engine id, 6 now ms.
/// Returns {change, starts, admin}: change is 0 (same instance), 1 (a restart), 2 (first
/// sighting), -1 (a late heartbeat of an instance older than the current one: ignored) or -2
/// (another instance while the current one is live — its heartbeat key has not expired and it
/// did not say goodbye: refused, so no process can take over a live engine's id).
const HEARTBEAT_LUA: &str = r#"
local inst = redis.call('HGET', KEYS[1], 'instance')
local change = 0
if inst ~= ARGV[1] then
  local started = tonumber(redis.call('HGET', KEYS[1], 'started_at_ms') or '0') or 0
  if inst and tonumber(ARGV[2]) < started then
    return {-1, tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('GET', KEYS[5]) or ''}
  end
  if inst and redis.call('EXISTS', KEYS[3]) == 1 then
    return {-2, tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('GET', KEYS[5]) or ''}
  end
  redis.call('HSET', KEYS[1], 'instance', ARGV[1], 'started_at_ms', ARGV[2])
  redis.call('INCR', KEYS[2])
  if inst then change = 1 else change = 2 end
end
redis.call('HSET', KEYS[1], 'last_seen_ms', ARGV[6])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('SADD', KEYS[4], ARGV[5])
return {change, tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('GET', KEYS[5]) or ''}
"#;

/// A worker's goodbye: drops the heartbeat key if the engine's current instance is the one
/// leaving, so its successor is accepted at once. KEYS: 1 info hash, 2 heartbeat key.
/// ARGV: 1 instance id. Returns 1 when it was the current instance, else 0.
const GOODBYE_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'instance') == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"#;

/// Forgets an engine offline since before a cutoff, unless a heartbeat came meanwhile.
/// KEYS: 1 info hash, 2 heartbeat key, 3 engines set, 4 starts, 5 admin, 6 restart request.
/// ARGV: 1 engine id, 2 cutoff ms. Returns 1 when forgotten.
const FORGET_LUA: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local seen = tonumber(redis.call('HGET', KEYS[1], 'last_seen_ms') or '0') or 0
if seen > tonumber(ARGV[2]) then return 0 end
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1], KEYS[4], KEYS[5], KEYS[6])
return 1
"#;

/// What recording a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// The instance we already knew.
    Same,
    /// A new instance of a known engine: the worker restarted.
    Restarted,
    /// The first heartbeat of this engine.
    New,
    /// A heartbeat of an older instance than the current one (a late packet): not stored.
    Stale,
    /// A new instance while the current one is live and did not say goodbye: not stored.
    Taken,
}

#[derive(Debug, Clone)]
pub struct HeartbeatReceipt {
    pub sighting: Sighting,
    pub restarts: u64,
    pub admin: Option<AdminState>,
}

/// Engine names become Redis keys and metric labels: keep them short and plain.
pub fn validate_engine_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err("engine ids are 1 to 64 characters".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err("engine ids use letters, digits, '-', '_' and '.'".into());
    }
    Ok(())
}

/// Redis access for the engine registry.
#[derive(Clone)]
pub struct Registry {
    redis: Conn,
    keys: Keys,
}

impl Registry {
    /// Whether this drive's dead letter was already recorded.
    pub async fn dead_letter_seen(&self, job: uuid::Uuid, drive: &str) -> CoordResult<bool> {
        let mut c = self.redis.clone();
        redis::cmd("EXISTS")
            .arg(self.keys.dead_seen(job, drive))
            .query_async(&mut c)
            .await
            .map_err(Into::into)
    }

    /// Remembers (for a week) that this drive's dead letter is recorded.
    pub async fn mark_dead_letter_seen(&self, job: uuid::Uuid, drive: &str) -> CoordResult<()> {
        let mut c = self.redis.clone();
        redis::cmd("SET")
            .arg(self.keys.dead_seen(job, drive))
            .arg(1)
            .arg("EX")
            .arg(7 * 24 * 3600)
            .query_async(&mut c)
            .await
            .map_err(Into::into)
    }

    pub fn new(redis: Conn, keys: Keys) -> Self {
        Self { redis, keys }
    }

    /// Parses the URL and prepares the connection without making it: the manager starts (and
    /// reports not ready) while Redis is away.
    pub fn lazy(url: &str, keys: Keys) -> CoordResult<Self> {
        let config = super::conn::config(std::time::Duration::from_secs(2), 2);
        Ok(Self::new(super::conn::lazy(url, config)?, keys))
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Stores the heartbeat with a TTL of `ttl_ms`, notes the engine, and detects restarts.
    pub async fn record_heartbeat(
        &self,
        hb: &Heartbeat,
        ttl_ms: u64,
        now_ms: i64,
    ) -> CoordResult<HeartbeatReceipt> {
        let json = serde_json::to_string(hb).expect("heartbeat serializes");
        let id = hb.engine_id.as_str();
        let (change, starts, admin): (i64, i64, String) = redis::Script::new(HEARTBEAT_LUA)
            .key(self.keys.engine_info(id))
            .key(self.keys.engine_starts(id))
            .key(self.keys.engine(id))
            .key(self.keys.engines())
            .key(self.keys.engine_admin(id))
            .arg(&hb.instance_id)
            .arg(hb.started_at_ms)
            .arg(json)
            .arg(ttl_ms.max(1))
            .arg(id)
            .arg(now_ms)
            .invoke_async(&mut self.redis.clone())
            .await?;
        let sighting = match change {
            0 => Sighting::Same,
            1 => Sighting::Restarted,
            2 => Sighting::New,
            -2 => Sighting::Taken,
            _ => Sighting::Stale,
        };
        Ok(HeartbeatReceipt {
            sighting,
            restarts: restarts_from_starts(starts),
            admin: AdminState::parse(&admin),
        })
    }

    /// A worker process leaving for good (graceful shutdown): its engine goes offline now, and
    /// the next process of the engine is accepted without waiting for the heartbeat to expire.
    /// Answers whether `instance` was the engine's current instance.
    pub async fn goodbye(&self, id: &str, instance: &str) -> CoordResult<bool> {
        let done: i64 = redis::Script::new(GOODBYE_LUA)
            .key(self.keys.engine_info(id))
            .key(self.keys.engine(id))
            .arg(instance)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(done == 1)
    }

    /// Drops every trace of an engine (its listing, restarts, operator intent) when it has been
    /// offline since `cutoff_ms` or earlier; a heartbeat since then keeps it. Answers whether it
    /// was forgotten.
    pub async fn forget(&self, id: &str, cutoff_ms: i64) -> CoordResult<bool> {
        let done: i64 = redis::Script::new(FORGET_LUA)
            .key(self.keys.engine_info(id))
            .key(self.keys.engine(id))
            .key(self.keys.engines())
            .key(self.keys.engine_starts(id))
            .key(self.keys.engine_admin(id))
            .key(self.keys.engine_restart(id))
            .arg(id)
            .arg(cutoff_ms)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(done == 1)
    }

    /// Every engine ever seen, sorted.
    pub async fn engine_ids(&self) -> CoordResult<Vec<String>> {
        let ids: HashSet<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.engines())
            .query_async(&mut self.redis.clone())
            .await?;
        let mut ids: Vec<String> = ids.into_iter().collect();
        ids.sort_by_key(|a| natural_key(a));
        Ok(ids)
    }

    pub async fn is_known(&self, id: &str) -> CoordResult<bool> {
        redis::cmd("SISMEMBER")
            .arg(self.keys.engines())
            .arg(id)
            .query_async(&mut self.redis.clone())
            .await
            .map_err(Into::into)
    }

    /// The views of the given engines, read in one round trip.
    pub async fn views(&self, ids: &[String]) -> CoordResult<Vec<EngineView>> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("GET").arg(self.keys.engine(id));
            pipe.cmd("GET").arg(self.keys.engine_admin(id));
            pipe.cmd("GET").arg(self.keys.engine_starts(id));
            pipe.cmd("HGET")
                .arg(self.keys.engine_info(id))
                .arg("last_seen_ms");
            pipe.cmd("GET").arg(self.keys.engine_restart(id));
        }
        let rows: Vec<Option<String>> = pipe.query_async(&mut self.redis.clone()).await?;
        Ok(ids
            .iter()
            .zip(rows.chunks(5))
            .map(|(id, r)| {
                let mut v = build_view(
                    id,
                    r[0].as_deref(),
                    r[1].as_deref(),
                    r[2].as_deref(),
                    r[3].as_deref(),
                );
                v.restart_requested = restart_pending(&v, r[4].as_deref());
                v
            })
            .collect())
    }

    /// The view of every engine ever seen.
    pub async fn all_views(&self) -> CoordResult<Vec<EngineView>> {
        let ids = self.engine_ids().await?;
        self.views(&ids).await
    }

    /// One engine's view; `None` for an engine never seen.
    pub async fn view(&self, id: &str) -> CoordResult<Option<EngineView>> {
        if !self.is_known(id).await? {
            return Ok(None);
        }
        Ok(self.views(&[id.to_string()]).await?.pop())
    }

    /// Writes (or with `None` clears) the operator's intent for an engine.
    pub async fn set_admin(&self, id: &str, admin: Option<AdminState>) -> CoordResult<()> {
        let key = self.keys.engine_admin(id);
        let mut conn = self.redis.clone();
        match admin {
            Some(a) => {
                redis::cmd("SET")
                    .arg(key)
                    .arg(a.as_str())
                    .query_async(&mut conn)
                    .await
            }
            None => redis::cmd("DEL").arg(key).query_async(&mut conn).await,
        }
        .map_err(Into::into)
    }

    /// Asks the engine's running worker process (`instance`) to restart. The request names the
    /// instance so that the process started in its place does not restart again; it expires
    /// after `ttl` if that process never sees it (it died meanwhile).
    pub async fn request_restart(
        &self,
        id: &str,
        instance: &str,
        ttl: std::time::Duration,
    ) -> CoordResult<()> {
        redis::cmd("SET")
            .arg(self.keys.engine_restart(id))
            .arg(instance)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut self.redis.clone())
            .await
            .map_err(Into::into)
    }

    pub async fn ping(&self) -> CoordResult<()> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.redis.clone())
            .await
            .map(drop)
            .map_err(Into::into)
    }
}

/// A restart is pending while the request names the instance that still heartbeats.
fn restart_pending(v: &EngineView, requested_instance: Option<&str>) -> bool {
    match (v.heartbeat.as_ref(), requested_instance) {
        (Some(hb), Some(inst)) => hb.instance_id == inst,
        _ => false,
    }
}

fn restarts_from_starts(starts: i64) -> u64 {
    u64::try_from(starts.saturating_sub(1)).unwrap_or(0)
}

/// Builds a view from the raw Redis values; a heartbeat that does not parse counts as absent.
pub fn build_view(
    id: &str,
    heartbeat: Option<&str>,
    admin: Option<&str>,
    starts: Option<&str>,
    last_seen: Option<&str>,
) -> EngineView {
    let heartbeat: Option<Heartbeat> = heartbeat.and_then(|s| match serde_json::from_str(s) {
        Ok(hb) => Some(hb),
        Err(e) => {
            tracing::warn!(engine = id, error.message = %e, "unreadable heartbeat in Redis");
            None
        }
    });
    let admin = admin.and_then(AdminState::parse);
    EngineView {
        id: id.to_string(),
        state: derive_state(heartbeat.as_ref(), admin),
        admin,
        restarts: restarts_from_starts(starts.and_then(|s| s.parse().ok()).unwrap_or(0)),
        last_seen_ms: last_seen.and_then(|s| s.parse().ok()),
        heartbeat,
        restart_requested: false,
    }
}

/// Sorts `worker-2` before `worker-10`.
fn natural_key(s: &str) -> (String, u64, String) {
    let digits_at = s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (head, tail) = s.split_at(digits_at);
    (head.to_string(), tail.parse().unwrap_or(0), s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineState;

    #[test]
    fn engine_ids_that_would_break_keys_or_labels_are_refused() {
        assert!(validate_engine_id("worker-1").is_ok());
        assert!(validate_engine_id("").is_err());
        assert!(validate_engine_id("a b").is_err());
        assert!(validate_engine_id("x:y").is_err());
        assert!(validate_engine_id(&"w".repeat(65)).is_err());
    }

    #[test]
    fn an_engine_without_a_fresh_heartbeat_is_offline_whatever_the_operator_said() {
        let v = build_view("w1", None, Some("cordoned"), Some("3"), Some("1700"));
        assert_eq!(v.state, EngineState::Offline);
        assert_eq!(v.admin, Some(AdminState::Cordoned));
        assert_eq!(v.restarts, 2);
        assert_eq!(v.last_seen_ms, Some(1700));
        let v = build_view("w1", Some("not json"), None, None, None);
        assert_eq!(v.state, EngineState::Offline);
        assert_eq!(v.restarts, 0);
    }

    #[test]
    fn a_restart_request_is_pending_only_for_the_instance_it_names() {
        let hb = serde_json::json!({
            "engine_id": "w1", "instance_id": "inst-a", "version": "0", "gpu_backend": "sim",
            "pools": ["default"], "gpus": [], "running_jobs": [], "consuming": true,
            "jobs_processed": 0, "jobs_failed": 0, "avg_job_ms": 0.0, "admin_url": "",
            "started_at_ms": 0, "sent_at_ms": 0, "heartbeat_interval_ms": 1000
        })
        .to_string();
        let v = build_view("w1", Some(&hb), None, Some("1"), Some("1"));
        assert!(v.heartbeat.is_some(), "{v:?}");
        assert!(restart_pending(&v, Some("inst-a")));
        // The process that replaced it, or no request at all: nothing pending.
        assert!(!restart_pending(&v, Some("inst-old")));
        assert!(!restart_pending(&v, None));
        // An offline engine has no process to restart.
        let offline = build_view("w1", None, None, Some("1"), Some("1"));
        assert!(!restart_pending(&offline, Some("inst-a")));
    }

    #[test]
    fn engines_sort_naturally() {
        let mut ids = vec!["worker-10", "worker-2", "alpha", "worker-1"];
        ids.sort_by_key(|a| natural_key(a));
        assert_eq!(ids, vec!["alpha", "worker-1", "worker-2", "worker-10"]);
    }
}
