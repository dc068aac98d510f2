//! Issue 4's end-to-end proof on the real cluster: jobs go only to healthy GPUs of engines the
//! operator lets work, `gpus: n` jobs get exactly n concrete GPUs (and see only those), dead and
//! hung engines are noticed, and with a backlog every GPU slot stays busy.
//!
//! One file per theme: placement on healthy, allowed GPUs; dead, restarted and hung engines;
//! a backlog and jobs given back. The helpers they share are here.

use std::collections::BTreeSet;
use std::time::Duration;

use gpuq_common::JobRecord;
use gpuq_e2e::{Stack, StackOptions};
use serde_json::{Value, json};

mod backlog;
mod engines;
mod placement;

/// Workers that ran the given records.
fn workers_of(records: &[JobRecord]) -> BTreeSet<String> {
    records.iter().filter_map(|r| r.worker.clone()).collect()
}

fn short_job(ms: u64) -> Value {
    json!({"kind": "simulate", "params": {"duration_ms": ms}})
}

/// Starts a stack and waits until every worker's engine is healthy and consuming.
async fn healthy_stack(opts: StackOptions) -> Stack {
    Stack::start_healthy(opts).await
}

async fn engine_action(stack: &Stack, engine: &str, action: &str) -> Value {
    stack
        .engine_action(engine, action)
        .await
        .unwrap_or_else(|e| panic!("{action} {engine}: {e}"))
}

/// Waits until the engine's worker reports (in a heartbeat) that it consumes or does not.
async fn wait_consuming(stack: &Stack, engine: &str, consuming: bool) -> Value {
    stack
        .wait_engine(
            engine,
            Duration::from_secs(15),
            &format!("consuming={consuming}"),
            |v| v["heartbeat"]["consuming"] == consuming,
        )
        .await
        .unwrap()
}
