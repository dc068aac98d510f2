//! The end-to-end suites, one test binary (one link of everything instead of seven): each module
//! is one concern and every test's name starts with it (`pipeline::…`), which is how
//! scripts/test.sh selects them (`-E 'binary(e2e) and test(/^disruptive::/)'`).
//!
//! They spawn the real gpuq binaries (`GPUQ_BIN_DIR`) against the shared RabbitMQ cluster and
//! Redis of scripts/stack.sh, each test under its own queue and key prefix (gpuq-e2e's harness).
//! `disruptive` stops broker nodes and Redis: it runs alone, one test at a time, last. `compose`'s
//! live tests are `#[ignore]`d here and run against scripts/compose.sh's stack.

mod backlog;
mod batch;
mod compose;
mod compose_script;
mod compose_tls;
mod deploy;
mod deploy_tls;
mod disruptive;
mod events;
mod faults;
mod gpus;
mod http;
mod least_privilege;
mod manager_auth;
mod monitoring;
mod observability;
mod pipeline;
mod sandbox;
mod scale;
mod store;
mod tenancy;
mod tls;
mod watch;
