//! The gpuq worker agent: takes deliveries from its pools' quorum queues only while it has free
//! healthy GPU slots, runs each job on concrete GPUs under the Redis lease of the delivery
//! protocol, stores the result with a conditional write, and only then acks.

pub mod admin;
pub mod app;
pub mod consumer;
pub mod events;
pub mod faults;
pub mod gpu;
pub mod monitor;
pub mod process;
pub mod protocol;
pub mod runner;
pub mod sandbox;
pub mod slots;
pub mod state;

pub use app::{Application, EXIT_RESTART, Stopped};
pub use state::Worker;
