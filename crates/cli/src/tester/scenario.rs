//! The tester's scenarios are the worker's fault-injection contract, defined once in common.

pub use gpuq_common::faults::Scenario;
