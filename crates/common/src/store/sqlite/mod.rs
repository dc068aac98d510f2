//! Embedded SQLite backend. Several processes share one file (WAL). Writes go through one
//! writer thread per process that commits whatever is pending in one transaction (group
//! commit), so thousands of small writes a second cost a few commits; reads use their own
//! connection and never wait for the writer. Counts come from counters the file keeps itself
//! (`counts`); a listing walks one named index (`list`).

/// The column list, as a macro so that the fixed statements below can be `concat!`ed (and
/// prepared once per connection).
macro_rules! columns {
    () => {
        "id, kind, params, pool, gpus_requested, min_gpu_memory_mb, status, attempts, worker, gpus, result, error, created_at, started_at, finished_at, tenant, progress, array_id, array_index"
    };
}
macro_rules! not_final {
    () => {
        "('queued','running')"
    };
}

mod conn;
mod counts;
mod list;
mod turns;
mod writer;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, mpsc};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{
    FinishOutcome, JobPage, JobStore, ListQuery, StartOutcome, StatusView, StoreError, page,
    page_limit,
};
use crate::events::{EventKind, JobEvent, NewEvent};
use crate::job::{FinalOutcome, JobId, JobRecord, JobStatus};
#[cfg(test)]
use conn::open_conn;
use conn::{SCHEMA, add_column, open_conn_with, unavailable};
pub use conn::{Synchronous, parse_location};
use writer::{GET_SQL, Op, row_to_record, writer_loop};

pub struct SqliteStore {
    writer: mpsc::Sender<Op>,
    reader: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub fn open(path: &str) -> Result<Self, StoreError> {
        Self::open_with(path, Synchronous::Full)
    }

    /// `open`, with commits synced to the disk as `sync` says.
    pub fn open_with(path: &str, sync: Synchronous) -> Result<Self, StoreError> {
        let mut write_conn = open_conn_with(path, sync)?;
        write_conn.execute_batch(SCHEMA).map_err(unavailable)?;
        for (name, sql_type) in [
            ("drive", "TEXT"),
            ("owner", "TEXT"),
            ("tenant", "TEXT"),
            ("progress", "TEXT"),
            ("array_id", "TEXT"),
            ("array_index", "INTEGER"),
        ] {
            add_column(&write_conn, name, sql_type)?;
        }
        write_conn
            .execute_batch(list::LIST_INDEXES)
            .map_err(unavailable)?;
        counts::ensure_counters(&mut write_conn)?;
        let reader = open_conn_with(path, sync)?;
        let (tx, rx) = mpsc::channel::<Op>();
        let turns = turns::WriteTurns::open(path);
        std::thread::Builder::new()
            .name("gpuq-sqlite-writer".into())
            .spawn(move || writer_loop(write_conn, rx, sync, turns))
            .map_err(unavailable)?;
        Ok(Self {
            writer: tx,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    async fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(make(tx))
            .map_err(|_| StoreError::Unavailable("writer thread stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("writer thread stopped".into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| StoreError::Unavailable("reader poisoned".into()))?;
            f(&conn)
        })
        .await
        .map_err(unavailable)?
    }
}

/// One page of `list`, read on `c`.
fn list_page(c: &Connection, q: &ListQuery) -> Result<JobPage, StoreError> {
    let limit = page_limit(q.limit);
    let (sql, args) = list::list_sql(q, limit);
    let mut stmt = c.prepare_cached(&sql).map_err(unavailable)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args.iter()), row_to_record)
        .map_err(unavailable)?;
    let mut jobs = Vec::new();
    for row in rows {
        jobs.push(row.map_err(unavailable)??);
    }
    Ok(page(jobs, limit))
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn insert(&self, job: &JobRecord) -> Result<(), StoreError> {
        let job = job.clone();
        self.send(|r| Op::Insert(job, None, r)).await
    }

    async fn insert_owned(&self, job: &JobRecord, owner: &str) -> Result<(), StoreError> {
        let (job, owner) = (job.clone(), owner.to_string());
        self.send(|r| Op::Insert(job, Some(owner), r)).await
    }

    async fn insert_many(
        &self,
        jobs: &[JobRecord],
        owner: Option<&str>,
    ) -> Result<Vec<JobId>, StoreError> {
        let (jobs, owner) = (jobs.to_vec(), owner.map(str::to_string));
        self.send(|r| Op::InsertMany(jobs, owner, r)).await
    }

    async fn adopt(&self, id: JobId, owner: &str) -> Result<Option<JobStatus>, StoreError> {
        let owner = owner.to_string();
        self.send(|r| Op::Adopt(id, owner, r)).await
    }

    async fn withdraw(&self, id: JobId, owner: Option<&str>) -> Result<bool, StoreError> {
        let owner = owner.map(str::to_string);
        self.send(|r| Op::Withdraw(id, owner, r)).await
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(GET_SQL)
                .and_then(|mut st| {
                    st.query_row(params![id.to_string()], row_to_record)
                        .optional()
                })
                .map_err(unavailable)?
                .transpose()
        })
        .await
    }

    async fn list(&self, q: &ListQuery) -> Result<JobPage, StoreError> {
        let q = q.clone();
        self.read(move |c| list_page(c, &q)).await
    }

    async fn start_attempt(&self, job: &JobRecord) -> Result<StartOutcome, StoreError> {
        let job = job.clone();
        self.send(|r| Op::Start(job, r)).await
    }

    async fn record_error(&self, id: JobId, attempt: u32, error: &str) -> Result<(), StoreError> {
        let error = error.to_string();
        self.send(|r| Op::RecordError(id, attempt, error, r)).await
    }

    async fn finish(&self, id: JobId, outcome: &FinalOutcome) -> Result<FinishOutcome, StoreError> {
        let outcome = outcome.clone();
        self.send(|r| Op::Finish(id, outcome, None, r)).await
    }

    async fn finish_drive(
        &self,
        id: JobId,
        drive: &str,
        outcome: &FinalOutcome,
    ) -> Result<FinishOutcome, StoreError> {
        let (outcome, drive) = (outcome.clone(), drive.to_string());
        self.send(|r| Op::Finish(id, outcome, Some(drive), r)).await
    }

    async fn reset_for_retry(&self, id: JobId, drive: &str) -> Result<bool, StoreError> {
        let drive = drive.to_string();
        self.send(|r| Op::Reset(id, drive, r)).await
    }

    async fn count_by_status(&self) -> Result<BTreeMap<JobStatus, u64>, StoreError> {
        self.read(counts::by_status).await
    }

    async fn status_view(&self, recent: u32, dead: u32) -> Result<StatusView, StoreError> {
        self.read(move |c| {
            let tx = c.unchecked_transaction().map_err(unavailable)?;
            let recent_q = ListQuery {
                limit: recent,
                ..Default::default()
            };
            let dead_q = ListQuery {
                status: Some(JobStatus::DeadLettered),
                limit: dead,
                ..Default::default()
            };
            let view = StatusView {
                counts: counts::by_status(&tx)?,
                recent: list_page(&tx, &recent_q)?.jobs,
                dead: list_page(&tx, &dead_q)?.jobs,
            };
            tx.finish().map_err(unavailable)?;
            Ok(view)
        })
        .await
    }

    async fn append_events(&self, id: JobId, events: &[NewEvent]) -> Result<u64, StoreError> {
        let events = events.to_vec();
        self.send(|r| Op::Events(id, events, r)).await
    }

    async fn events(&self, id: JobId, after: u64, limit: u32) -> Result<Vec<JobEvent>, StoreError> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT offset, kind, at, data FROM job_events WHERE job = ?1 AND offset > ?2 ORDER BY offset LIMIT ?3",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![id.to_string(), after as i64, limit], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .map_err(unavailable)?;
            let mut out = vec![];
            for row in rows {
                let (offset, kind, at_ms, data) = row.map_err(unavailable)?;
                let corrupt = || StoreError::Corrupt(format!("event {offset} of job {id}").into());
                out.push(JobEvent {
                    offset: offset as u64,
                    kind: EventKind::parse(&kind).ok_or_else(corrupt)?,
                    at_ms,
                    data: serde_json::from_str(&data).map_err(|_| corrupt())?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn delete_final_before(&self, cutoff_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.send(|r| Op::Delete(cutoff_ms, limit, r)).await
    }

    async fn count_active_by_tenant(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.read(counts::active_by_tenant).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::FIRST_DRIVE;

    #[test]
    fn an_unavailable_store_keeps_the_drivers_error_as_its_source() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the database file should be: SQLite cannot open it.
        let path = dir.path().join("db");
        std::fs::create_dir(&path).unwrap();
        let err = SqliteStore::open(path.to_str().unwrap())
            .err()
            .expect("a directory is no database");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        let cause = std::error::Error::source(&err).expect("a cause");
        let driver = std::error::Error::source(cause).expect("the driver's error");
        assert!(
            driver.downcast_ref::<rusqlite::Error>().is_some(),
            "{driver:?}"
        );
    }

    #[test]
    fn every_connection_writes_ahead_and_syncs_each_commit() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_conn(dir.path().join("jobs.db").to_str().unwrap()).unwrap();
        let pragma = |name: &str| -> String {
            conn.query_row(&format!("PRAGMA {name}"), [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| format!("{v:?}"))
            .unwrap()
        };
        assert_eq!(pragma("journal_mode"), "Text(\"wal\")");
        assert_eq!(pragma("synchronous"), "Integer(2)", "2 is FULL");
    }

    #[tokio::test]
    async fn a_database_from_before_named_drives_and_owners_gains_the_columns_and_keeps_its_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let path = path.to_str().unwrap();
        let old = SCHEMA.replace(
            "finished_at INTEGER,\n    drive TEXT,\n    owner TEXT",
            "finished_at INTEGER",
        );
        assert_ne!(old, SCHEMA, "the old schema has no drive or owner column");
        let conn = open_conn(path).unwrap();
        conn.execute_batch(&old).unwrap();
        let id = uuid::Uuid::now_v7();
        conn.execute(
            "INSERT INTO jobs (id, kind, params, pool, gpus_requested, status, created_at) \
             VALUES (?1, 'simulate', '{}', 'default', 1, 'dead_lettered', 1)",
            params![id.to_string()],
        )
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(path).unwrap();
        // Twice on one file: the second open finds the column there.
        let _again = SqliteStore::open(path).unwrap();
        assert!(store.reset_for_retry(id, "d2").await.unwrap());
        let dead = FinalOutcome {
            status: JobStatus::DeadLettered,
            result: None,
            error: Some("delivery_limit".into()),
            worker: None,
            finished_at: 2,
            attempt: None,
            events: vec![],
        };
        assert_eq!(
            store.finish_drive(id, FIRST_DRIVE, &dead).await.unwrap(),
            FinishOutcome::Superseded
        );
        assert_eq!(
            store.finish_drive(id, "d2", &dead).await.unwrap(),
            FinishOutcome::Stored
        );
        // A record from before owners has none: only a submission without one withdraws it.
        let queued = uuid::Uuid::now_v7();
        let conn = open_conn(path).unwrap();
        conn.execute(
            "INSERT INTO jobs (id, kind, params, pool, gpus_requested, status, created_at) \
             VALUES (?1, 'simulate', '{}', 'default', 1, 'queued', 1)",
            params![queued.to_string()],
        )
        .unwrap();
        assert!(!store.withdraw(queued, Some("someone")).await.unwrap());
        assert!(store.withdraw(queued, None).await.unwrap());
    }
}
