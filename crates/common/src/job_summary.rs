//! What a job looks like to someone watching the fleet (the manager's overview and event
//! stream, the status page): who, what, where and how it went — never its parameters, its
//! environment or its output, which belong to the client that submitted it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::job::{JobKind, JobRecord, JobStatus};

/// A job without its `params` (which carry a command's `env`) and without its `result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobSummary {
    pub id: Uuid,
    /// The tenant that submitted it.
    pub tenant: String,
    pub kind: JobKind,
    pub status: JobStatus,
    pub attempts: u32,
    pub worker: Option<String>,
    /// GPU indices on `worker`.
    pub gpus: Vec<u32>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
}

impl From<&JobRecord> for JobSummary {
    fn from(r: &JobRecord) -> Self {
        Self {
            id: r.id,
            tenant: r.tenant.clone(),
            kind: r.kind,
            status: r.status,
            attempts: r.attempts,
            worker: r.worker.clone(),
            gpus: r.gpus.clone(),
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            error: r.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_summary_carries_no_params_env_or_result() {
        let record: JobRecord = serde_json::from_value(json!({
            "id": Uuid::nil(), "kind": "command",
            "params": {"program": "sh", "args": ["-c", "true"], "env": {"TOKEN": "s3cret"}},
            "pool": "default", "gpus_requested": 1, "status": "succeeded", "attempts": 2,
            "worker": "worker-1", "gpus": [1], "result": {"stdout": "s3cret output"},
            "error": null, "created_at": 1, "started_at": 2, "finished_at": 3
        }))
        .unwrap();
        let s = serde_json::to_value(JobSummary::from(&record)).unwrap();
        let text = s.to_string();
        assert!(!text.contains("s3cret"), "{text}");
        for key in ["params", "env", "result", "pool"] {
            assert!(s.get(key).is_none(), "{key} in {text}");
        }
        assert_eq!(s["kind"], "command");
        assert_eq!(s["status"], "succeeded");
        assert_eq!(
            (s["attempts"].clone(), s["gpus"].clone()),
            (json!(2), json!([1]))
        );
        assert_eq!(s["worker"], "worker-1");
        assert_eq!(
            (s["created_at"].clone(), s["finished_at"].clone()),
            (json!(1), json!(3))
        );
    }
}
