//! Typed client of the manager's API: engines (reads: the read token, else the admin token),
//! cordon/uncordon/drain/restart and GPU faults (the admin token).

use gpuq_common::config::Secret;
use gpuq_common::engine::EngineView;
use reqwest::Method;
use serde_json::Value;

use crate::endpoint::{ClientError, Endpoint};

#[derive(Debug, Clone)]
pub struct Manager {
    /// Operator actions, with the admin token.
    ep: Endpoint,
    /// Reads, with the read token when there is one, else the admin token.
    reads: Endpoint,
}

impl Manager {
    /// A client whose reads and actions both use `admin_token`; see `with_read_token`.
    /// The manager's `/metrics` page (Prometheus text; open, no token).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let path = "/metrics";
        self.ep.text(self.ep.request(Method::GET, path), path).await
    }

    pub fn new(http: reqwest::Client, base: &str, admin_token: Option<Secret>) -> Self {
        Self {
            reads: Endpoint::new("manager", http.clone(), base, admin_token.clone()),
            ep: Endpoint::new("manager", http, base, admin_token),
        }
    }

    /// Reads with `read_token` instead of the admin token (`None` keeps the admin token).
    pub fn with_read_token(mut self, read_token: Option<Secret>) -> Self {
        if let Some(t) = read_token.filter(|t| !t.is_empty()) {
            self.reads = Endpoint::new(
                "manager",
                self.reads.http().clone(),
                &self.reads.base,
                Some(t),
            );
        }
        self
    }

    pub async fn engines(&self) -> Result<Vec<EngineView>, ClientError> {
        let path = "/v1/engines";
        self.reads
            .json(self.reads.request(Method::GET, path), path)
            .await
    }

    pub async fn engine(&self, id: &str) -> Result<EngineView, ClientError> {
        let path = format!("/v1/engines/{}", segment(id));
        self.reads
            .json(self.reads.request(Method::GET, &path), &path)
            .await
    }

    /// `GET /v1/overview`: the status page's document, as JSON.
    pub async fn overview(&self) -> Result<Value, ClientError> {
        let path = "/v1/overview";
        self.reads
            .json(self.reads.request(Method::GET, path), path)
            .await
    }

    /// `action` is `cordon`, `uncordon`, `drain` or `restart`. Answers whatever the manager returns.
    pub async fn engine_action(&self, id: &str, action: &str) -> Result<Value, ClientError> {
        let path = format!("/v1/engines/{}/{action}", segment(id));
        let resp = self
            .ep
            .send(self.ep.request(Method::POST, &path), &path)
            .await?;
        Ok(resp.json().await.unwrap_or(Value::Null))
    }

    /// Proxied by the manager to the worker's admin API; answers the GPU's snapshot.
    pub async fn gpu_fault(
        &self,
        engine: &str,
        gpu: u32,
        fault: &str,
    ) -> Result<Value, ClientError> {
        let path = format!("/v1/engines/{}/gpus/{gpu}/fault", segment(engine));
        let rb = self
            .ep
            .request(Method::POST, &path)
            .json(&serde_json::json!({ "fault": fault }));
        let resp = self.ep.send(rb, &path).await?;
        Ok(resp.json().await.unwrap_or(Value::Null))
    }
}

/// An engine id as one path segment.
fn segment(id: &str) -> String {
    crate::endpoint::encode_query_value(id)
}
