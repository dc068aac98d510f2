//! Typed client of the gateway's REST API (`/v1`, bearer API key).

use gpuq_common::config::Secret;
use gpuq_common::job::JobKind;
use gpuq_common::store::JobPage;
use gpuq_common::{JobRecord, JobStatus};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::endpoint::{ClientError, Endpoint, query_string};

/// The body of `POST /v1/jobs`; absent fields take the gateway's defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubmitBody {
    pub kind: JobKind,
    pub params: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_gpu_memory_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
    /// A job array of this many jobs (through `submit_batch` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub array: Option<u32>,
}

impl SubmitBody {
    /// A short `simulate` job, as the bench and the tester submit them.
    pub fn simulate(duration_ms: u64) -> Self {
        Self {
            kind: JobKind::Simulate,
            params: serde_json::json!({ "duration_ms": duration_ms }),
            gpus: None,
            min_gpu_memory_mb: None,
            pool: None,
            ttl_s: None,
            array: None,
        }
    }
}

/// The gateway's answer to a submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submitted {
    pub id: Uuid,
    pub status: JobStatus,
    /// The Idempotency-Key was seen before: this is the earlier job.
    #[serde(default)]
    pub replayed: bool,
}

/// The gateway's answer to a batch: every job in request order (an array's in index order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchSubmitted {
    pub jobs: Vec<Submitted>,
    /// The Idempotency-Key was seen before: these are the earlier batch's jobs.
    #[serde(default)]
    pub replayed: bool,
}

/// The gateway's answer to an array's cancel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArrayCancelled {
    pub array_id: Uuid,
    pub cancelled: Vec<Uuid>,
    pub already_final: u32,
}

/// `GET /v1/jobs` filters.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub status: Option<JobStatus>,
    pub pool: Option<String>,
    /// Only the jobs of this array.
    pub array: Option<Uuid>,
    pub limit: Option<u32>,
    pub cursor: Option<Uuid>,
}

#[derive(Debug, Clone)]
pub struct Gateway {
    pub(crate) ep: Endpoint,
}

impl Gateway {
    pub fn new(http: reqwest::Client, base: &str, api_key: Option<Secret>) -> Self {
        Self {
            ep: Endpoint::new("gateway", http, base, api_key),
        }
    }

    pub fn base(&self) -> &str {
        &self.ep.base
    }

    pub async fn submit(
        &self,
        body: &SubmitBody,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, ClientError> {
        let (mut s, replayed): (Submitted, bool) =
            self.post_keyed("/v1/jobs", body, idempotency_key).await?;
        s.replayed |= replayed;
        Ok(s)
    }

    /// `POST /v1/jobs/batch`: every job of `jobs` (arrays made whole), accepted together.
    pub async fn submit_batch(
        &self,
        jobs: &[SubmitBody],
        idempotency_key: Option<&str>,
    ) -> Result<BatchSubmitted, ClientError> {
        let body = serde_json::json!({ "jobs": jobs });
        let (mut b, replayed): (BatchSubmitted, bool) = self
            .post_keyed("/v1/jobs/batch", &body, idempotency_key)
            .await?;
        b.replayed |= replayed;
        for job in &mut b.jobs {
            job.replayed |= replayed;
        }
        Ok(b)
    }

    /// A submission: the answer, and whether the gateway said it is an idempotent replay.
    async fn post_keyed<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        idempotency_key: Option<&str>,
    ) -> Result<(T, bool), ClientError> {
        let mut rb = self.ep.request(Method::POST, path).json(body);
        if let Some(k) = idempotency_key {
            rb = rb.header("Idempotency-Key", k);
        }
        let resp = self.ep.send(rb, path).await?;
        let replayed = replayed(&resp);
        Ok((self.ep.decode(resp, path).await?, replayed))
    }

    /// The gateway's `/metrics` page (Prometheus text).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let path = "/metrics";
        self.ep.text(self.ep.request(Method::GET, path), path).await
    }

    pub async fn job(&self, id: Uuid) -> Result<JobRecord, ClientError> {
        let path = format!("/v1/jobs/{id}");
        self.ep
            .json(self.ep.request(Method::GET, &path), &path)
            .await
    }

    /// `GET /v1/jobs/{id}?wait=…`: answers as soon as the job is final, or after `wait` (the
    /// gateway allows up to 55 s; keep it under the HTTP client's own timeout) with its status
    /// then.
    pub async fn job_wait(
        &self,
        id: Uuid,
        wait: std::time::Duration,
    ) -> Result<JobRecord, ClientError> {
        let path = format!("/v1/jobs/{id}?wait={}ms", wait.as_millis());
        self.ep
            .json(self.ep.request(Method::GET, &path), &path)
            .await
    }

    pub async fn list(&self, p: &ListParams) -> Result<JobPage, ClientError> {
        let path = format!(
            "/v1/jobs{}",
            query_string(&[
                ("status", p.status.map(|s| s.as_str().to_string())),
                ("pool", p.pool.clone()),
                ("array", p.array.map(|a| a.to_string())),
                ("limit", p.limit.map(|l| l.to_string())),
                ("cursor", p.cursor.map(|c| c.to_string())),
            ])
        );
        self.ep
            .json(self.ep.request(Method::GET, &path), &path)
            .await
    }

    pub async fn cancel(&self, id: Uuid) -> Result<JobRecord, ClientError> {
        let path = format!("/v1/jobs/{id}/cancel");
        self.ep
            .json(self.ep.request(Method::POST, &path), &path)
            .await
    }

    /// Cancels every unfinished job of the array `array_id`.
    pub async fn cancel_array(&self, array_id: Uuid) -> Result<ArrayCancelled, ClientError> {
        let path = format!("/v1/jobs/{array_id}/cancel?array=true");
        self.ep
            .json(self.ep.request(Method::POST, &path), &path)
            .await
    }

    pub async fn dead_letters(
        &self,
        limit: Option<u32>,
        cursor: Option<Uuid>,
    ) -> Result<JobPage, ClientError> {
        let path = format!(
            "/v1/dead-letters{}",
            query_string(&[
                ("limit", limit.map(|l| l.to_string())),
                ("cursor", cursor.map(|c| c.to_string())),
            ])
        );
        self.ep
            .json(self.ep.request(Method::GET, &path), &path)
            .await
    }

    pub async fn retry_dead_letter(&self, id: Uuid) -> Result<Submitted, ClientError> {
        let path = format!("/v1/dead-letters/{id}/retry");
        self.ep
            .json(self.ep.request(Method::POST, &path), &path)
            .await
    }

    /// Every page of a listing, following cursors; `stop` ends early once a page ends below it
    /// (pages are newest first by id).
    pub async fn list_all(
        &self,
        mut p: ListParams,
        stop_below: Option<Uuid>,
    ) -> Result<Vec<JobRecord>, ClientError> {
        let mut out = Vec::new();
        loop {
            let page = self.list(&p).await?;
            let last = page.jobs.last().map(|j| j.id);
            out.extend(page.jobs);
            match (page.next_cursor, last, stop_below) {
                (None, _, _) => break,
                (Some(_), Some(last), Some(stop)) if last < stop => break,
                (Some(c), _, _) => p.cursor = Some(c),
            }
        }
        Ok(out)
    }
}

/// Whether the gateway answered an idempotent replay.
fn replayed(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get("idempotent-replayed")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}
