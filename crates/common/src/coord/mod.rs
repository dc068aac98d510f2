//! Coordination through Redis: the one home of gpuq's Redis key names (`keys`), Lua scripts and
//! round trips. `lease` holds the worker's side of the delivery protocol (the per-job lease and
//! done marker, cancels, this process's liveness, operator intent, whether a pool can place a
//! job). Every key lives under the queue prefix, so tests can share one Redis.

pub mod keys;
pub mod lease;
