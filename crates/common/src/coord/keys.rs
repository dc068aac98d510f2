//! Redis key names, all under the queue prefix so tests can share one Redis.

use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    /// Owner of a running job: the worker instance id, with a TTL renewed while it runs.
    pub fn lease(&self, job: Uuid) -> String {
        format!("{}:lease:{job}", self.prefix)
    }
    /// Set once a job's final result is stored; later deliveries are acked without running.
    pub fn done(&self, job: Uuid) -> String {
        format!("{}:done:{job}", self.prefix)
    }
    /// Maps a tenant's `Idempotency-Key` to the job id it created (keys are per tenant; a tenant
    /// name has no `/`).
    pub fn idempotency(&self, tenant: &str, key: &str) -> String {
        format!("{}:idem:{tenant}/{key}", self.prefix)
    }
    /// Liveness of one worker process (instance), with a TTL of a few heartbeats.
    pub fn instance_alive(&self, instance: &str) -> String {
        format!("{}:alive:{instance}", self.prefix)
    }
    /// The latest heartbeat of an engine (worker), JSON, with a TTL.
    pub fn engine(&self, engine: &str) -> String {
        format!("{}:engine:{engine}", self.prefix)
    }
    /// Every engine ever seen (a set), so that offline ones stay listed.
    pub fn engines(&self) -> String {
        format!("{}:engines", self.prefix)
    }
    /// Operator intent for an engine: `cordoned` or `draining` (absent = schedulable).
    pub fn engine_admin(&self, engine: &str) -> String {
        format!("{}:engine-admin:{engine}", self.prefix)
    }
    /// An operator's restart request: the instance id of the worker process asked to restart
    /// (a later instance of the same engine is not affected by it).
    pub fn engine_restart(&self, engine: &str) -> String {
        format!("{}:engine-restart:{engine}", self.prefix)
    }
    /// A client's cancel of a job: set by the gateway, read by the worker before and while it runs.
    pub fn cancel(&self, job: Uuid) -> String {
        format!("{}:cancel:{job}", self.prefix)
    }
    /// A running counter of worker process starts per engine (restarts are visible).
    pub fn engine_starts(&self, engine: &str) -> String {
        format!("{}:starts:{engine}", self.prefix)
    }
    /// Set once the manager recorded the dead letter of one drive of a job (`drive` = the
    /// `x-gpuq-drive` header, `0` for the first), so a late duplicate cannot undo a re-drive.
    pub fn dead_seen(&self, job: Uuid, drive: &str) -> String {
        format!("{}:dead-seen:{job}:{drive}", self.prefix)
    }
    /// What the manager remembers of an engine without a TTL (a hash: `instance`,
    /// `started_at_ms`, `last_seen_ms`), so restarts and the last sighting outlive the heartbeat.
    pub fn engine_info(&self, engine: &str) -> String {
        format!("{}:engine-info:{engine}", self.prefix)
    }
    /// The pub/sub channel on which workers announce that a job's event log grew.
    pub fn events_channel(&self, job: Uuid) -> String {
        format!("{}:job-events:{job}", self.prefix)
    }
    /// The GPUs running a tenant's jobs (a hash: job id → `GPUS OWNER`), for its GPU quota.
    pub fn tenant_gpus(&self, tenant: &str) -> String {
        format!("{}:tenant-gpus:{tenant}", self.prefix)
    }
}

/// Deletes the key only if it still holds the expected value: KEYS[1] = key, ARGV[1] = expected.
/// Returns 1 when deleted, 0 otherwise. The worker releases a lease it owns with it
/// (ARGV[1] = owner); the gateway drops an idempotency claim it still holds.
pub const COMPARE_AND_DELETE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_prefix() {
        let k = Keys::new("t9");
        let id = Uuid::nil();
        assert_eq!(k.lease(id), format!("t9:lease:{id}"));
        assert_eq!(k.instance_alive("w-1"), "t9:alive:w-1");
        assert_eq!(k.idempotency("team-a", "order-1"), "t9:idem:team-a/order-1");
        assert_eq!(k.tenant_gpus("team-a"), "t9:tenant-gpus:team-a");
    }
}
