//! The end-to-end harness: spawns the real gpuq binaries (gateway, manager, workers) against the
//! local RabbitMQ cluster and Redis (`scripts/stack.sh up`), each stack under a fresh queue/key
//! prefix with its own store and random ports, so suites share one cluster safely. The store is
//! a SQLite file, or with `GPUQ_TEST_STORE=mongodb` a MongoDB database of the stack's own.
//! Workers run under a restart loop like `scripts/dev.sh`, so crash tests see them come back.
//!
//! `access` (each service's own broker and Redis users), `env` (environment, paths, ports, polling), `stack` (spawn, submit, wait, stop), `fleet`
//! (engines through the manager), `metrics` (exposition checks), `procs` (supervised processes).

pub mod access;
pub mod env;
pub mod fleet;
pub mod metrics;
pub mod procs;
pub mod stack;

pub use env::{
    TEST_STORE_ENV, TestTls, admin_amqp_urls, bin_dir, eventually, free_port,
    mongodb_url_with_database, repo_root, test_env, test_store_url, test_tls,
};
pub use metrics::{by_status, percentile, promtool_lint, sum_metric};
pub use procs::Supervised;
pub use stack::{Stack, StackOptions};
