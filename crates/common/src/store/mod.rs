//! The result store: one `JobStore` trait, two backends chosen by `GPUQ_STORE_URL`
//! (`sqlite://path`, embedded; `mongodb://…`). Writes that end a job are conditional: the first
//! final result wins, so a job's result is never recorded twice.

mod mongo;
mod sqlite;

use crate::events::{JobEvent, NewEvent};
use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

// The list filters and page are part of the API contract (OpenAPI schemas), defined with the
// job types; the store only takes and returns them.
use crate::job::{FinalOutcome, JobId, JobRecord, JobStatus};
pub use crate::job::{JobPage, ListQuery};

pub use mongo::MongoStore;
pub use sqlite::SqliteStore;

/// A store failure in domain terms. `Unavailable` is worth retrying (the backend did not
/// answer or refused for now); `Corrupt` is not (stored data this version cannot read). Both
/// keep the driver's error (rusqlite, mongodb, bson, serde) as their `source()`, so a log line
/// or `anyhow`'s `{:#}` shows the cause and a caller can downcast to it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Cause),
    #[error("job {0} already exists")]
    Conflict(JobId),
    #[error("store data is corrupt: {0}")]
    Corrupt(#[source] Cause),
    #[error("bad store URL: {0}")]
    BadUrl(String),
}

impl StoreError {
    /// `Unavailable`, caused by a driver error.
    pub fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(Cause::from_error(e))
    }
    /// `Corrupt`, caused by a decoding error.
    pub fn corrupt(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Corrupt(Cause::from_error(e))
    }
}

/// What caused a `StoreError`: a message, and the error behind it when there is one. Cheap to
/// clone (the SQLite writer answers every operation of a failed batch with the same cause).
#[derive(Debug, Clone)]
pub struct Cause {
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Cause {
    pub fn from_error(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            message: e.to_string(),
            source: Some(Arc::new(e)),
        }
    }
}

impl From<String> for Cause {
    fn from(message: String) -> Self {
        Self {
            message,
            source: None,
        }
    }
}

impl From<&str> for Cause {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Outcome of starting an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    /// Recorded as running; go ahead.
    Started,
    /// The job already has a final status: run nothing.
    AlreadyFinal(JobStatus),
}

/// Outcome of a conditional final write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishOutcome {
    /// This write is the job's final result.
    Stored,
    /// Another final result was there first; nothing changed.
    AlreadyFinal(JobStatus),
    /// No such job.
    NotFound,
    /// The job was re-driven since the drive this write belongs to: nothing changed.
    Superseded,
}

pub const MAX_PAGE: u32 = 1000;

/// The events of `record`'s job after `from`: its log, or — for a final job whose log is empty
/// (a single quiet attempt writes none) — the log derived from its record, with `true`: the
/// log has no rows of its own, and what was derived is all of it.
pub async fn read_log(
    store: &dyn JobStore,
    record: &JobRecord,
    from: u64,
    limit: u32,
) -> Result<(Vec<JobEvent>, bool), StoreError> {
    let events = store.events(record.id, from, limit).await?;
    if !events.is_empty() || !record.status.is_final() {
        return Ok((events, false));
    }
    if !store.events(record.id, 0, 1).await?.is_empty() {
        return Ok((vec![], false));
    }
    let derived = crate::events::derived_log(record)
        .into_iter()
        .filter(|e| e.offset > from)
        .take(limit as usize)
        .collect();
    Ok((derived, true))
}

/// The store's part of a status page (`JobStore::status_view`).
#[derive(Debug, Clone, Default)]
pub struct StatusView {
    pub counts: BTreeMap<JobStatus, u64>,
    pub recent: Vec<JobRecord>,
    pub dead: Vec<JobRecord>,
}

#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Records a submitted job (status `queued`). `Conflict` when the id exists.
    async fn insert(&self, job: &JobRecord) -> Result<(), StoreError>;
    /// `insert` for a submission that holds an idempotency claim: the record remembers `owner`
    /// (the claim's token), and only the owner may `withdraw` it.
    async fn insert_owned(&self, job: &JobRecord, owner: &str) -> Result<(), StoreError>;
    /// Records a batch's submitted jobs in one write (SQLite: one transaction; MongoDB: one
    /// unordered `insert_many`), owned by `owner` when the batch holds an idempotency claim.
    /// Answers the ids that existed already, which are left as they were; the others are stored.
    async fn insert_many(
        &self,
        jobs: &[JobRecord],
        owner: Option<&str>,
    ) -> Result<Vec<JobId>, StoreError>;
    /// Hands a `queued` record to `owner`, a submission that took over the idempotency claim of
    /// the one that stored it: from then on the earlier submission's `withdraw` removes nothing.
    /// Answers the job's status (the record is adopted only when `queued`), `None` if no such job.
    async fn adopt(&self, id: JobId, owner: &str) -> Result<Option<JobStatus>, StoreError>;
    /// Removes a `queued` job the broker refused for sure, only while `owner` still owns it
    /// (`None`: a record stored by `insert`). False when nothing was removed.
    async fn withdraw(&self, id: JobId, owner: Option<&str>) -> Result<bool, StoreError>;
    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;
    async fn list(&self, query: &ListQuery) -> Result<JobPage, StoreError>;
    /// Marks an attempt running (creating the record from `job` if it is missing), unless the
    /// job is already final.
    async fn start_attempt(&self, job: &JobRecord) -> Result<StartOutcome, StoreError>;
    /// Notes the error of a failed attempt (number `attempt`) that will be retried; the status
    /// stays non-final, `attempts` becomes at least `attempt`.
    async fn record_error(&self, id: JobId, attempt: u32, error: &str) -> Result<(), StoreError>;
    /// Writes the final outcome unless the job already has one.
    async fn finish(&self, id: JobId, outcome: &FinalOutcome) -> Result<FinishOutcome, StoreError>;
    /// Writes the final outcome of one drive of the job (`topology::FIRST_DRIVE` for the
    /// first) unless the job already has one or was re-driven since (`Superseded`). The
    /// manager records dead letters with it: a late copy of an old drive's dead letter must
    /// not undo a re-drive.
    async fn finish_drive(
        &self,
        id: JobId,
        drive: &str,
        outcome: &FinalOutcome,
    ) -> Result<FinishOutcome, StoreError>;
    /// Puts a dead-lettered job back to `queued` for a re-drive named `drive` (a fresh id, the
    /// message's `x-gpuq-drive`); false if it is not dead-lettered.
    async fn reset_for_retry(&self, id: JobId, drive: &str) -> Result<bool, StoreError>;
    /// Jobs by status (for status pages and benchmarks).
    async fn count_by_status(&self) -> Result<BTreeMap<JobStatus, u64>, StoreError>;
    /// What a status page shows of the store: the counts, the `recent` newest jobs and the
    /// `dead` newest dead-lettered ones. SQLite reads them in one trip to its reader thread
    /// and one read transaction (a status page polled on a loaded host pays one wait to be
    /// scheduled, not three); other stores may read them concurrently.
    async fn status_view(&self, recent: u32, dead: u32) -> Result<StatusView, StoreError> {
        let dead_q = ListQuery {
            status: Some(JobStatus::DeadLettered),
            limit: dead,
            ..Default::default()
        };
        let recent_q = ListQuery {
            limit: recent,
            ..Default::default()
        };
        let (counts, recent, dead) = tokio::join!(
            self.count_by_status(),
            self.list(&recent_q),
            self.list(&dead_q)
        );
        Ok(StatusView {
            counts: counts?,
            recent: recent?.jobs,
            dead: dead?.jobs,
        })
    }
    /// Appends events to the job's log, each under the next offset of the job, and sets the
    /// record's `progress` to the last `progress` event among them. Answers the last offset
    /// (0 when the job has no record: nothing is appended).
    async fn append_events(&self, id: JobId, events: &[NewEvent]) -> Result<u64, StoreError>;
    /// The job's events with offsets above `after`, oldest first, at most `limit`.
    async fn events(&self, id: JobId, after: u64, limit: u32) -> Result<Vec<JobEvent>, StoreError>;
    /// Deletes up to `limit` final jobs submitted before `cutoff_ms`, with their event logs;
    /// answers how many went. Small batches: a writer never waits long behind one.
    async fn delete_final_before(&self, cutoff_ms: i64, limit: u32) -> Result<u64, StoreError>;
    /// Jobs not final yet (queued or running) per tenant: the gateway's `max_queued` quota.
    async fn count_active_by_tenant(&self) -> Result<BTreeMap<String, u64>, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Opens the backend named by the URL.
pub async fn open(url: &str) -> Result<Arc<dyn JobStore>, StoreError> {
    if let Some(location) = url.strip_prefix("sqlite://") {
        let (path, sync) = sqlite::parse_location(location)?;
        Ok(Arc::new(SqliteStore::open_with(path, sync)?))
    } else if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
        Ok(Arc::new(MongoStore::connect(url).await?))
    } else {
        Err(StoreError::BadUrl(
            "use sqlite://PATH[?synchronous=normal] or mongodb://HOST/DB".into(),
        ))
    }
}

/// A page of at most `limit` jobs from `jobs`, read with one more than the limit: the cursor
/// to the next page when there is one.
pub(crate) fn page(mut jobs: Vec<JobRecord>, limit: u32) -> JobPage {
    let next_cursor = if jobs.len() > limit as usize {
        jobs.truncate(limit as usize);
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    JobPage { jobs, next_cursor }
}

/// Clamps a requested page size.
pub(crate) fn page_limit(limit: u32) -> u32 {
    match limit {
        0 => 100,
        n => n.min(MAX_PAGE),
    }
}
