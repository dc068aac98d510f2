//! gpuq manager: the engine registry and states (Redis, heartbeat TTLs), health gating by
//! cordon/drain, dead-letter bookkeeping, fleet and queue metrics, and the live status page.

pub mod api;
pub mod app;
pub mod auth;
pub mod deadletters;
pub mod fleet;
pub mod heartbeat;
pub mod jobs;
pub mod overview;
pub mod queues;
pub mod retention;
pub mod state;
pub mod throughput;
pub mod ui;

pub use app::{Application, Intervals, router};
pub use state::AppState;
