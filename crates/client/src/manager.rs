//! Typed client of the manager's API: engines (open reads), cordon/uncordon/drain/restart and GPU faults
//! (admin token).

use gpuq_common::config::Secret;
use gpuq_common::engine::EngineView;
use reqwest::Method;
use serde_json::Value;

use crate::endpoint::{ClientError, Endpoint};

#[derive(Debug, Clone)]
pub struct Manager {
    ep: Endpoint,
}

impl Manager {
    pub fn new(http: reqwest::Client, base: &str, admin_token: Option<Secret>) -> Self {
        Self {
            ep: Endpoint::new("manager", http, base, admin_token),
        }
    }

    pub async fn engines(&self) -> Result<Vec<EngineView>, ClientError> {
        let path = "/v1/engines";
        self.ep.json(self.ep.request(Method::GET, path), path).await
    }

    pub async fn engine(&self, id: &str) -> Result<EngineView, ClientError> {
        let path = format!("/v1/engines/{}", segment(id));
        self.ep
            .json(self.ep.request(Method::GET, &path), &path)
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
