//! gpuq's REST gateway. Clients submit jobs here; a job is stored, published to its pool's
//! quorum queue, and answered 202 only after the broker's publisher confirm. It also serves job
//! status, listing, cancel, dead letters and their re-drive, readiness, metrics and OpenAPI.

pub mod broker;
pub mod jobs;
pub mod openapi;
pub mod quota;
pub mod routes;
pub mod startup;
pub mod state;

pub use routes::router;
pub use startup::Application;
pub use state::{AppState, SharedState};
