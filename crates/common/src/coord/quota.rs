//! A tenant's GPU quota, kept at placement: the GPUs running a tenant's jobs, over the whole
//! fleet, stay at or under the quota its jobs carry (`JobMessage::tenant_max_gpus`). Each running
//! job of the tenant is an entry `job id → "GPUS OWNER"` of one Redis hash; an entry whose owner
//! (a worker process) is no longer alive is dropped when the quota is next checked, so a crashed
//! worker's GPUs come back to the tenant within its liveness TTL.

use std::sync::LazyLock;

use redis::Script;
use uuid::Uuid;

use super::CoordResult;
use super::lease::Coordinator;

/// KEYS: the tenant's hash. ARGV: job, GPUs, owner, quota, alive-key prefix. Returns -1 when
/// the job's GPUs are granted (or were already), else the GPUs the tenant runs now.
const TAKE_LUA: &str = r#"
local used = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local job, value = entries[i], entries[i + 1]
  local n, owner = string.match(value, '^(%d+) (.+)$')
  if job == ARGV[1] then
    if owner == ARGV[3] then return -1 end
    redis.call('HDEL', KEYS[1], job)
  elseif owner == nil or redis.call('EXISTS', ARGV[5] .. owner) == 0 then
    redis.call('HDEL', KEYS[1], job)
  else
    used = used + tonumber(n)
  end
end
if used + tonumber(ARGV[2]) > tonumber(ARGV[4]) then return used end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
return -1
"#;

/// KEYS: the tenant's hash. ARGV: job, owner. Drops the job's entry if it is ours.
const GIVE_LUA: &str = r#"
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value and string.match(value, '^%d+ (.+)$') == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"#;

static TAKE: LazyLock<Script> = LazyLock::new(|| Script::new(TAKE_LUA));
static GIVE: LazyLock<Script> = LazyLock::new(|| Script::new(GIVE_LUA));

/// The answer to a job's request for its tenant's GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Granted,
    /// The tenant already runs this many GPUs: one more job would pass its quota.
    Full {
        running: u32,
    },
}

impl Coordinator {
    /// Counts `gpus` GPUs of `tenant` for `job` if that keeps the tenant within `max_gpus`.
    pub async fn take_tenant_gpus(
        &self,
        tenant: &str,
        job: Uuid,
        gpus: u32,
        max_gpus: u32,
    ) -> CoordResult<Quota> {
        let mut c = self.conn.clone();
        let r: i64 = TAKE
            .key(self.keys.tenant_gpus(tenant))
            .arg(job.to_string())
            .arg(gpus)
            .arg(&self.owner)
            .arg(max_gpus)
            .arg(self.keys.instance_alive(""))
            .invoke_async(&mut c)
            .await?;
        Ok(match r {
            -1 => Quota::Granted,
            n => Quota::Full {
                running: u32::try_from(n).unwrap_or(u32::MAX),
            },
        })
    }

    /// The job no longer runs here: its GPUs no longer count against its tenant.
    pub async fn give_tenant_gpus(&self, tenant: &str, job: Uuid) -> CoordResult<()> {
        let mut c = self.conn.clone();
        let _: i64 = GIVE
            .key(self.keys.tenant_gpus(tenant))
            .arg(job.to_string())
            .arg(&self.owner)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }
}
