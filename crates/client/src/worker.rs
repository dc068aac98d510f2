//! Typed client of a worker's admin port: health, `/metrics`, and fault injection (admin token;
//! the worker must run with `GPUQ_FAULT_INJECTION=true`).

use std::time::Duration;

use gpuq_common::config::Secret;
use gpuq_common::engine::Heartbeat;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::endpoint::{ClientError, Endpoint};
use gpuq_common::prom;

/// `GET/POST /admin/faults` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultsView {
    pub enabled: bool,
    #[serde(default)]
    pub armed: Vec<ArmedFault>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmedFault {
    pub scenario: String,
    pub remaining: u32,
}

/// The counters the tester and the bench compare before and after a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct WorkerCounters {
    pub duplicates_suppressed: f64,
    pub redeliveries: f64,
    pub results_discarded: f64,
    /// `gpuq_job_overhead_seconds` (sum, count) of the `start` and the `finish` stage.
    pub overhead_start: (f64, f64),
    pub overhead_finish: (f64, f64),
    /// `process_start_time_seconds`: changes when the process restarted (counters reset).
    pub start_time: Option<f64>,
}

impl WorkerCounters {
    pub fn from_metrics(text: &str) -> Self {
        let sum = |name| prom::sum_family(text, name).unwrap_or(0.0);
        let overhead = |stage| {
            let of = |name| prom::sum_family_where(text, name, "stage", stage).unwrap_or(0.0);
            (
                of("gpuq_job_overhead_seconds_sum"),
                of("gpuq_job_overhead_seconds_count"),
            )
        };
        Self {
            duplicates_suppressed: sum("gpuq_duplicates_suppressed_total"),
            redeliveries: sum("gpuq_redeliveries_total"),
            results_discarded: sum("gpuq_results_discarded_total"),
            overhead_start: overhead("start"),
            overhead_finish: overhead("finish"),
            start_time: prom::sum_family(text, "process_start_time_seconds"),
        }
    }
}

/// One worker: its place in `GPUQ_WORKER_URLS` names it (`worker-1` is the first).
#[derive(Debug, Clone)]
pub struct Worker {
    pub name: String,
    ep: Endpoint,
}

impl Worker {
    pub fn new(
        name: String,
        http: reqwest::Client,
        base: &str,
        admin_token: Option<Secret>,
    ) -> Self {
        Self {
            name,
            ep: Endpoint::new("worker", http, base, admin_token),
        }
    }

    pub fn base(&self) -> &str {
        &self.ep.base
    }

    /// Answers `/healthz` within a second.
    pub async fn healthy(&self) -> bool {
        let path = "/healthz";
        let rb = self
            .ep
            .request(Method::GET, path)
            .timeout(Duration::from_secs(1));
        self.ep.send(rb, path).await.is_ok()
    }

    pub async fn metrics(&self) -> Result<String, ClientError> {
        let path = "/metrics";
        self.ep.text(self.ep.request(Method::GET, path), path).await
    }

    pub async fn counters(&self) -> Result<WorkerCounters, ClientError> {
        Ok(WorkerCounters::from_metrics(&self.metrics().await?))
    }

    pub async fn status(&self) -> Result<Heartbeat, ClientError> {
        let path = "/admin/status";
        self.ep.json(self.ep.request(Method::GET, path), path).await
    }

    pub async fn arm(&self, scenario: &str, count: u32) -> Result<FaultsView, ClientError> {
        let path = "/admin/faults";
        let rb = self
            .ep
            .request(Method::POST, path)
            .json(&serde_json::json!({ "scenario": scenario, "count": count }));
        self.ep.json(rb, path).await
    }

    pub async fn clear_faults(&self) -> Result<(), ClientError> {
        let path = "/admin/faults";
        self.ep
            .send(self.ep.request(Method::DELETE, path), path)
            .await
            .map(drop)
    }

    pub async fn faults(&self) -> Result<FaultsView, ClientError> {
        let path = "/admin/faults";
        self.ep.json(self.ep.request(Method::GET, path), path).await
    }
}
