//! The gpuq contract shared by every service: the job schema, the queue topology, the result
//! store, Redis keys, configuration, telemetry and metric names. A service depends on this crate
//! and never on another service's crate.

pub mod amqp;
pub mod config;
pub mod coord;
pub mod credentials;
pub mod engine;
pub mod events;
pub mod faults;
pub mod http;
pub mod job;
pub mod job_env;
pub mod job_summary;
pub mod metrics;
pub mod prom;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tenancy;
pub mod tls;
pub mod topology;

pub use config::Settings;
pub use job::{JobId, JobMessage, JobRecord, JobStatus};
pub use job_summary::JobSummary;
pub use store::{JobStore, StoreError};
