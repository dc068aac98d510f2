//! Coordination through Redis: the one home of gpuq's Redis key names (`keys`), Lua scripts and
//! round trips. `lease` holds the worker's side of the delivery protocol (the per-job lease and
//! done marker, cancels, this process's liveness, operator intent, whether a pool can place a
//! job); `idempotency` the gateway's claims of `Idempotency-Key`s over `kv`, its bounded-time
//! Redis handle (also used for cancel signals); `registry` the manager's engine registry
//! (heartbeats, the engines ever seen, operator intent, restart requests, dead-letter markers).
//! Every key lives under the queue prefix, so tests can share one Redis.

use std::time::Duration;

pub mod bell;
pub mod conn;
pub mod idempotency;
pub mod keys;
pub mod kv;
pub mod lease;
pub mod pools;
pub mod quota;
pub mod registry;

/// What a coordination round trip fails with: Redis answered with an error, or not in time.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

pub type CoordResult<T> = Result<T, CoordError>;
