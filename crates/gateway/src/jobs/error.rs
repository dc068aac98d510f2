//! Why a job operation did not happen, in the domain's words; `routes` maps each to its HTTP
//! answer. Every variant keeps its source.

use gpuq_common::JobStatus;
use gpuq_common::StoreError;
use gpuq_common::coord::CoordError;
use gpuq_common::coord::idempotency::IdempotencyError;
use gpuq_common::job::JobId;

use crate::broker::PublishError;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request names a bad field (the message names it).
    #[error("{0}")]
    Invalid(String),
    #[error("no job {0}")]
    NotFound(JobId),
    /// Cancel of a job that already ended.
    #[error("job {id} is already {}", status.as_str())]
    AlreadyFinal { id: JobId, status: JobStatus },
    /// Re-drive of a job that is not (or no longer) dead-lettered.
    #[error("job {id} is {}, not dead_lettered", status.as_str())]
    NotDeadLettered { id: JobId, status: JobStatus },
    /// The tenant is over its rate limit or its cap on unfinished jobs.
    #[error("{message}")]
    Throttled { message: String, retry_after_s: u64 },
    /// No queue is bound for the pool: no worker serves it.
    #[error("pool: no worker serves pool {0:?}")]
    NoWorkerForPool(String),
    /// The broker did not take the job. When `source.ambiguous()` it may be queued all the
    /// same: `keyed` says whether a retry with the same `Idempotency-Key` settles it.
    #[error("{}", not_accepted(source, *id, *keyed, *redrive))]
    NotAccepted {
        source: PublishError,
        id: JobId,
        keyed: bool,
        redrive: bool,
    },
    /// The broker did not take every job of a batch: `confirmed` are queued, `unsure` may be.
    #[error("{}", batch_not_accepted(source, *total, *confirmed, *unsure, *keyed))]
    BatchNotAccepted {
        source: PublishError,
        total: usize,
        confirmed: usize,
        unsure: usize,
        keyed: bool,
    },
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Redis is needed for the operation (a running job's stop signal, a re-drive's done
    /// marker) and did not answer.
    #[error("cannot reach Redis to {action}; retry later")]
    Coordination {
        action: &'static str,
        #[source]
        source: CoordError,
    },
    /// A bug or a broken invariant.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// After an ambiguous publish the job may run: the message names it, and how to settle it.
fn not_accepted(e: &PublishError, id: JobId, keyed: bool, redrive: bool) -> String {
    match (e.ambiguous(), keyed, redrive) {
        (false, _, _) => e.to_string(),
        (true, _, true) => format!(
            "{e}; job {id} may have been re-driven: it stays queued, check it before retrying"
        ),
        (true, true, false) => format!(
            "{e}; job {id} may be queued: retry with the same Idempotency-Key, which keeps this job"
        ),
        (true, false, false) => format!(
            "{e}; job {id} may be queued and stays queued: check GET /v1/jobs/{id}, or cancel it, \
             before submitting it again"
        ),
    }
}

/// What became of a batch the broker did not take whole, and how to settle it.
fn batch_not_accepted(
    e: &PublishError,
    total: usize,
    confirmed: usize,
    unsure: usize,
    keyed: bool,
) -> String {
    let refused = total - confirmed - unsure;
    let fate = format!(
        "{e}: of the batch's {total} jobs {refused} were refused, {unsure} may be queued and {confirmed} are queued"
    );
    match (confirmed + unsure, keyed) {
        (0, _) => format!("{fate}; nothing was enqueued"),
        (_, true) => format!(
            "{fate}; retry with the same Idempotency-Key, which keeps the batch's jobs and runs none twice"
        ),
        (_, false) => {
            format!("{fate}; those stay queued: see GET /v1/jobs before submitting the batch again")
        }
    }
}

impl JobError {
    pub(super) fn not_accepted(source: PublishError, id: JobId, pool: &str, keyed: bool) -> Self {
        match source {
            PublishError::Unroutable => JobError::NoWorkerForPool(pool.to_string()),
            source => JobError::NotAccepted {
                source,
                id,
                keyed,
                redrive: false,
            },
        }
    }
}
