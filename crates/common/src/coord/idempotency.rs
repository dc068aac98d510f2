//! `Idempotency-Key`: the first request with a key claims it in Redis (`SET NX`) before it
//! publishes, so a concurrent duplicate waits for it instead of enqueueing a second job. The claim
//! is `pending` until the broker confirms, then `done`; a failed publish releases it. A claim left
//! pending by a gateway that died is taken over after its deadline, keeping the job id, so the
//! retried publish is deduplicated by the workers if the first one did reach the queue. Each claim
//! has a token that owns the job's record: a takeover adopts the record, so the request it took
//! over from, if only slow, can no longer delete it.

use std::time::Duration;

use super::keys::{COMPARE_AND_DELETE_LUA, Keys};
use crate::job::{JobId, JobMessage, now_ms};
use serde::{Deserialize, Serialize};

use super::CoordError;
use super::kv::Kv;

/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 200;
/// How long a duplicate waits between looks at a pending claim.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// Slack on top of the confirm timeout before a pending claim counts as abandoned.
const PENDING_SLACK: Duration = Duration::from_secs(2);

/// Sets the value only if it is still the expected one. KEYS[1], ARGV = expected, new, ttl_s.
const COMPARE_AND_SET_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) return 1
end
return 0
"#;

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters")]
    BadKey,
    #[error("this Idempotency-Key was used with a different request body")]
    BodyMismatch,
    #[error("a request with this Idempotency-Key is still being processed; retry shortly")]
    InProgress,
    #[error("Idempotency-Key needs Redis, which is unreachable; retry later")]
    Unavailable(#[source] CoordError),
    #[error("the stored idempotency record is unreadable")]
    Corrupt,
}

impl From<CoordError> for IdempotencyError {
    fn from(e: CoordError) -> Self {
        IdempotencyError::Unavailable(e)
    }
}

/// What Redis keeps under `Keys::idempotency(tenant, key)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    id: JobId,
    body_hash: String,
    /// `pending` until the broker confirmed the job, then `done`.
    state: String,
    /// For a pending entry: when it counts as abandoned (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until_ms: Option<i64>,
    /// A batch's jobs, in request order (`id` is the first); empty for a single submission.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    batch: Vec<JobId>,
}

impl Entry {
    fn encode(&self) -> String {
        serde_json::to_string(self).expect("entry serializes")
    }
}

/// The outcome of claiming a key for a batch (`claim_batch`).
#[derive(Debug)]
pub enum BatchClaim {
    /// This request owns the key: publish the ticket's `batch` ids, then `commit`.
    Owned(Ticket),
    /// A previous request with this key and body enqueued these jobs, in request order.
    Replay(Vec<JobId>),
}

/// The outcome of claiming a key.
#[derive(Debug)]
pub enum Claim {
    /// This request owns the key: publish `id`, then `commit` (or `release` on failure).
    Owned(Ticket),
    /// A previous request with this key and body enqueued `id`: answer with it, enqueue nothing.
    Replay(JobId),
}

/// Proof of ownership of a pending claim.
#[derive(Debug)]
pub struct Ticket {
    redis_key: String,
    pending: String,
    pub id: JobId,
    /// A batch's job ids in request order (`id` is the first); empty for a single submission.
    pub batch: Vec<JobId>,
    pub body_hash: String,
    /// True when a pending claim of a dead request was taken over (the job may already exist).
    pub taken_over: bool,
    /// Names this claim in the job's record (`JobStore::insert_owned`, `adopt`), so that a
    /// request whose claim was taken over cannot withdraw a record its successor relies on.
    pub owner: String,
}

#[derive(Clone)]
pub struct Idempotency {
    kv: Kv,
    keys: Keys,
    ttl_s: u64,
    pending_for: Duration,
}

impl Idempotency {
    pub fn new(kv: Kv, keys: Keys, ttl_s: u64, confirm_timeout: Duration) -> Self {
        Self {
            kv,
            keys,
            ttl_s: ttl_s.max(1),
            pending_for: confirm_timeout + PENDING_SLACK,
        }
    }

    /// Checks a header value: 1..=200 visible ASCII characters.
    pub fn validate_key(raw: &[u8]) -> Result<String, IdempotencyError> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_KEY_LEN
            && raw.iter().all(|b| b.is_ascii_graphic() || *b == b' ');
        let key = std::str::from_utf8(raw).map_err(|_| IdempotencyError::BadKey)?;
        if ok && !key.trim().is_empty() {
            Ok(key.to_string())
        } else {
            Err(IdempotencyError::BadKey)
        }
    }

    /// Claims `tenant`'s `key` for a request whose job would be `id`, or finds the job a previous
    /// request of the tenant with the same key made. Waits while another request holds the
    /// claim. Keys are per tenant: two tenants using the same key never meet.
    pub async fn claim(
        &self,
        tenant: &str,
        key: &str,
        body_hash: &str,
        id: JobId,
    ) -> Result<Claim, IdempotencyError> {
        Ok(
            match self.claim_entry(tenant, key, body_hash, id, vec![]).await? {
                Ok(ticket) => Claim::Owned(ticket),
                Err(done) => Claim::Replay(done.id),
            },
        )
    }

    /// `claim` for a batch whose jobs would be `ids` (request order): the key names the whole
    /// batch, and a replay answers every job of the batch that made it.
    pub async fn claim_batch(
        &self,
        tenant: &str,
        key: &str,
        body_hash: &str,
        ids: Vec<JobId>,
    ) -> Result<BatchClaim, IdempotencyError> {
        let first = *ids.first().ok_or(IdempotencyError::Corrupt)?;
        Ok(
            match self.claim_entry(tenant, key, body_hash, first, ids).await? {
                Ok(ticket) => BatchClaim::Owned(ticket),
                Err(done) if done.batch.is_empty() => BatchClaim::Replay(vec![done.id]),
                Err(done) => BatchClaim::Replay(done.batch),
            },
        )
    }

    /// Claims the key, or answers the `done` entry of the request that made its job(s).
    async fn claim_entry(
        &self,
        tenant: &str,
        key: &str,
        body_hash: &str,
        id: JobId,
        batch: Vec<JobId>,
    ) -> Result<Result<Ticket, Entry>, IdempotencyError> {
        let redis_key = self.keys.idempotency(tenant, key);
        let mine = Entry {
            id,
            body_hash: body_hash.to_string(),
            state: "pending".into(),
            until_ms: Some(now_ms() + self.pending_for.as_millis() as i64),
            batch: batch.clone(),
        }
        .encode();
        // A waiter gives up after two pending windows: by then the holder either finished or
        // its claim was taken over by someone.
        let give_up = tokio::time::Instant::now() + self.pending_for * 2;
        loop {
            let set: Option<String> = self
                .kv
                .run(|mut c| {
                    let (k, v, ttl) = (redis_key.clone(), mine.clone(), self.ttl_s);
                    async move {
                        redis::cmd("SET")
                            .arg(&k)
                            .arg(&v)
                            .arg("NX")
                            .arg("EX")
                            .arg(ttl)
                            .query_async(&mut c)
                            .await
                    }
                })
                .await?;
            if set.is_some() {
                return Ok(Ok(Ticket {
                    redis_key,
                    pending: mine,
                    id,
                    batch,
                    body_hash: body_hash.to_string(),
                    taken_over: false,
                    owner: new_owner(),
                }));
            }
            let current: Option<String> = self
                .kv
                .run(|mut c| {
                    let k = redis_key.clone();
                    async move { redis::cmd("GET").arg(&k).query_async(&mut c).await }
                })
                .await?;
            // Released between our SET and GET: try to claim again.
            let Some(raw) = current else { continue };
            let entry: Entry = serde_json::from_str(&raw).map_err(|_| IdempotencyError::Corrupt)?;
            if entry.body_hash != body_hash {
                return Err(IdempotencyError::BodyMismatch);
            }
            if entry.state == "done" {
                return Ok(Err(entry));
            }
            if entry.until_ms.unwrap_or(0) < now_ms() {
                // Abandoned by a request that died: take it over, keeping its job id.
                let takeover = Entry {
                    id: entry.id,
                    body_hash: body_hash.to_string(),
                    state: "pending".into(),
                    until_ms: Some(now_ms() + self.pending_for.as_millis() as i64),
                    batch: entry.batch.clone(),
                }
                .encode();
                if self.compare_and_set(&redis_key, &raw, &takeover).await? {
                    tracing::warn!(job_id = %entry.id, "took over an abandoned idempotency claim");
                    return Ok(Ok(Ticket {
                        redis_key,
                        pending: takeover,
                        id: entry.id,
                        batch: entry.batch,
                        body_hash: body_hash.to_string(),
                        taken_over: true,
                        owner: new_owner(),
                    }));
                }
                continue;
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(IdempotencyError::InProgress);
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Marks the claim done: later requests with the key replay the job.
    pub async fn commit(&self, ticket: &Ticket) -> Result<bool, IdempotencyError> {
        let done = Entry {
            id: ticket.id,
            body_hash: ticket.body_hash.clone(),
            state: "done".into(),
            until_ms: None,
            batch: ticket.batch.clone(),
        }
        .encode();
        self.compare_and_set(&ticket.redis_key, &ticket.pending, &done)
            .await
    }

    /// After a publish whose outcome is unknown (no confirm in time): keeps the key with its job
    /// id but lets the next request with it take over at once, so a retry republishes the same
    /// id (deduplicated by the workers) instead of making a second job.
    pub async fn abandon(&self, ticket: &Ticket) -> Result<(), IdempotencyError> {
        let open = Entry {
            id: ticket.id,
            body_hash: ticket.body_hash.clone(),
            state: "pending".into(),
            until_ms: Some(0),
            batch: ticket.batch.clone(),
        }
        .encode();
        self.compare_and_set(&ticket.redis_key, &ticket.pending, &open)
            .await
            .map(|_| ())
    }

    /// Gives the key up after a failed publish, unless someone else holds it by now.
    pub async fn release(&self, ticket: &Ticket) -> Result<(), IdempotencyError> {
        let (k, v) = (ticket.redis_key.clone(), ticket.pending.clone());
        self.kv
            .run(|mut c| async move {
                redis::Script::new(COMPARE_AND_DELETE_LUA)
                    .key(&k)
                    .arg(&v)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: &str,
        new: &str,
    ) -> Result<bool, IdempotencyError> {
        let (k, e, n, ttl) = (
            key.to_string(),
            expected.to_string(),
            new.to_string(),
            self.ttl_s,
        );
        let swapped: i64 = self
            .kv
            .run(|mut c| async move {
                redis::Script::new(COMPARE_AND_SET_LUA)
                    .key(&k)
                    .arg(&e)
                    .arg(&n)
                    .arg(ttl)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(swapped == 1)
    }
}

/// A fresh claim token: one per claim, taken over or not.
fn new_owner() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A fingerprint of what a job asks for (kind, params, placement), after defaults are applied,
/// so that two bodies differing only in spacing, key order or spelled-out defaults match.
/// FNV-1a (128 bit): stable across builds and gateways, which a std `Hasher` is not promised to be.
pub fn body_hash(msg: &JobMessage) -> String {
    let canonical = serde_json::to_vec(&(&msg.payload, &msg.placement)).expect("job serializes");
    fingerprint(&canonical)
}

/// FNV-1a (128 bit) of `canonical`, in hex: a request's fingerprint made from its canonical form.
pub fn fingerprint(canonical: &[u8]) -> String {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for &b in canonical {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    format!("{h:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::SubmitRequest;

    fn msg(body: &str) -> JobMessage {
        let req: SubmitRequest = serde_json::from_str(body).unwrap();
        let (payload, placement) = req.validate().unwrap();
        JobMessage::new(payload, placement)
    }

    #[test]
    fn bodies_that_ask_for_the_same_job_hash_alike() {
        let a = msg(r#"{"kind":"simulate","params":{"duration_ms":5,"fail_times":1}}"#);
        let b = msg(
            r#"{ "params": {"fail_times":1, "duration_ms":5}, "pool":"default", "gpus":1, "kind":"simulate" }"#,
        );
        assert_ne!(a.id, b.id);
        assert_eq!(body_hash(&a), body_hash(&b));
        let c = msg(r#"{"kind":"simulate","params":{"duration_ms":6,"fail_times":1}}"#);
        assert_ne!(body_hash(&a), body_hash(&c));
    }

    #[test]
    fn keys_must_be_short_visible_ascii() {
        assert!(Idempotency::validate_key(b"order-42").is_ok());
        assert!(Idempotency::validate_key(b"").is_err());
        assert!(Idempotency::validate_key(b"   ").is_err());
        assert!(Idempotency::validate_key(&[b'k'; 201]).is_err());
        assert!(Idempotency::validate_key(&[b'k'; 200]).is_ok());
        assert!(Idempotency::validate_key("clé".as_bytes()).is_err());
        assert!(Idempotency::validate_key(b"a\tb").is_err());
    }

    #[test]
    fn entries_round_trip() {
        let e = Entry {
            id: uuid::Uuid::now_v7(),
            body_hash: "ab".into(),
            state: "pending".into(),
            until_ms: Some(5),
            batch: vec![],
        };
        assert_eq!(serde_json::from_str::<Entry>(&e.encode()).unwrap(), e);
        assert!(e.encode().contains("\"body_hash\""));
    }
}
