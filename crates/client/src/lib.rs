//! Typed HTTP clients of gpuq's services: `Gateway` (jobs, dead letters), `Manager` (engines,
//! operator actions) and `Worker` (the worker's admin API and metrics), over one `Endpoint` that
//! adds bearer auth and turns the services' `{"error":{"code","message"}}` into a `ClientError`.
//! The CLI and the test suites call the services through these.

pub mod endpoint;
pub mod events;
pub mod gateway;
pub mod manager;
pub mod worker;

pub use endpoint::{ClientError, Endpoint, http_client};
pub use gateway::Gateway;
pub use manager::Manager;
pub use worker::Worker;
