//! The manager's view of the fleet, through gpuq-client: engines, waiting for their state, GPU
//! faults and operator actions.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use crate::stack::Stack;

impl Stack {
    /// Injects a GPU fault through the manager (`POST /v1/engines/{engine}/gpus/{gpu}/fault`).
    pub async fn gpu_fault(&self, engine: &str, gpu: u32, fault: &str) -> anyhow::Result<Value> {
        Ok(self.manager_client().gpu_fault(engine, gpu, fault).await?)
    }

    /// `cordon`, `uncordon`, `drain` or `restart` of an engine through the manager.
    pub async fn engine_action(&self, engine: &str, action: &str) -> anyhow::Result<Value> {
        Ok(self.manager_client().engine_action(engine, action).await?)
    }

    /// `GET /v1/engines`: every engine the manager has seen, as JSON.
    pub async fn engines(&self) -> anyhow::Result<Vec<Value>> {
        let engines = self.manager_client().engines().await?;
        Ok(engines
            .into_iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?)
    }

    /// `GET /v1/engines/{id}`, as JSON.
    pub async fn engine(&self, id: &str) -> anyhow::Result<Value> {
        Ok(serde_json::to_value(
            self.manager_client().engine(id).await?,
        )?)
    }

    /// Polls `GET /v1/engines/{id}` until `pred` holds; returns the view that satisfied it.
    pub async fn wait_engine(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            if let Ok(v) = self.engine(id).await {
                if pred(&v) {
                    return Ok(v);
                }
                last = v;
            }
            if Instant::now() > deadline {
                bail!(
                    "engine {id} not {what} after {timeout:?}; last view {last}; logs in {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The manager's `/metrics` page (open, like every service's).
    pub async fn manager_metrics_text(&self) -> anyhow::Result<String> {
        let r = self
            .http
            .get(format!("{}/metrics", self.manager_url))
            .send()
            .await?;
        Ok(r.error_for_status()?.text().await?)
    }

    /// The first `overview` event of `GET /v1/events` sent with `token`, as JSON (10 s at most).
    pub async fn first_overview_event(&self, token: &str) -> anyhow::Result<Value> {
        let mut events = self
            .http
            .get(format!("{}/v1/events", self.manager_url))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?;
        let mut buf = String::new();
        let read = async {
            while let Some(chunk) = events.chunk().await? {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                if let Some(end) = buf.find("\n\n") {
                    let event = &buf[..end];
                    let Some(data) = event.strip_prefix("event: overview\ndata: ") else {
                        bail!("not an overview event: {event}");
                    };
                    return Ok(serde_json::from_str(data)?);
                }
            }
            bail!("the stream ended: {buf}")
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .map_err(|_| anyhow::anyhow!("no event within 10 s"))?
    }

    /// Waits until the manager lists engines `worker-1..=worker-n` as healthy and consuming.
    pub async fn wait_engines_healthy(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        for i in 1..=n {
            self.wait_engine(
                &format!("worker-{i}"),
                timeout,
                "healthy and consuming",
                |v| v["state"] == "healthy" && v["heartbeat"]["consuming"] == true,
            )
            .await?;
        }
        Ok(())
    }
}
