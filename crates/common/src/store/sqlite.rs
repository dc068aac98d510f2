//! Embedded SQLite backend. Several processes share one file (WAL). Writes go through one
//! writer thread per process that commits whatever is pending in one transaction (group
//! commit), so thousands of small writes a second cost a few commits; reads use their own
//! connection and never wait for the writer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;
use tokio::sync::oneshot;

use super::{FinishOutcome, JobPage, JobStore, ListQuery, StartOutcome, StoreError, page_limit};
use crate::job::{FinalOutcome, JobId, JobKind, JobRecord, JobStatus};
use crate::topology::FIRST_DRIVE;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    pool TEXT NOT NULL,
    gpus_requested INTEGER NOT NULL,
    min_gpu_memory_mb INTEGER,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    gpus TEXT NOT NULL DEFAULT '[]',
    result TEXT,
    error TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    drive TEXT,
    owner TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_status_id ON jobs(status, id);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
";

/// The column list, as a macro so that the fixed statements below can be `concat!`ed (and
/// prepared once per connection).
macro_rules! columns {
    () => {
        "id, kind, params, pool, gpus_requested, min_gpu_memory_mb, status, attempts, worker, gpus, result, error, created_at, started_at, finished_at"
    };
}
macro_rules! not_final {
    () => {
        "('queued','running')"
    };
}
const COLUMNS: &str = columns!();
const INSERT_SQL: &str = concat!(
    "INSERT OR IGNORE INTO jobs (",
    columns!(),
    ", owner) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)"
);
const GET_SQL: &str = concat!("SELECT ", columns!(), " FROM jobs WHERE id = ?1");
const MAX_BATCH: usize = 512;

enum Op {
    /// A submitted job, with the submission that owns it when it holds an idempotency claim.
    Insert(
        JobRecord,
        Option<String>,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    Adopt(
        JobId,
        String,
        oneshot::Sender<Result<Option<JobStatus>, StoreError>>,
    ),
    Withdraw(
        JobId,
        Option<String>,
        oneshot::Sender<Result<bool, StoreError>>,
    ),
    Start(JobRecord, oneshot::Sender<Result<StartOutcome, StoreError>>),
    RecordError(JobId, u32, String, oneshot::Sender<Result<(), StoreError>>),
    /// The final outcome, of one drive of the job when the drive is named.
    Finish(
        JobId,
        FinalOutcome,
        Option<String>,
        oneshot::Sender<Result<FinishOutcome, StoreError>>,
    ),
    Reset(JobId, String, oneshot::Sender<Result<bool, StoreError>>),
}

pub struct SqliteStore {
    writer: mpsc::Sender<Op>,
    reader: Arc<Mutex<Connection>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// How long a statement waits for another process's write lock before the store reports itself
/// unavailable (callers retry: a worker keeps its result until it is stored).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    /// When the current wait for a lock began (SQLite calls the busy handler on the thread that
    /// runs the statement, with attempt 0 first).
    static BUSY_SINCE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

fn busy_retry(attempt: i32) -> bool {
    let now = std::time::Instant::now();
    let since = if attempt == 0 {
        BUSY_SINCE.set(Some(now));
        now
    } else {
        BUSY_SINCE.get().unwrap_or(now)
    };
    let waited = now - since;
    if waited >= BUSY_TIMEOUT {
        return false;
    }
    // Short steps first (a commit holds the lock for well under a millisecond), then 1 ms.
    std::thread::sleep(if waited < Duration::from_millis(200) {
        Duration::from_micros(100)
    } else {
        Duration::from_millis(1)
    });
    true
}

fn open_conn(path: &str) -> Result<Connection, StoreError> {
    if let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(unavailable)?;
    }
    let mut conn = Connection::open(path).map_err(unavailable)?;
    // SQLite's default busy handler sleeps whole milliseconds (1, 2, 5, 10… ms) when another
    // process holds the write lock; with several processes committing small batches that
    // sleep, not the work, bounds throughput. Retry in 100 µs steps instead, for up to 10 s.
    conn.busy_handler(Some(busy_retry)).map_err(unavailable)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(unavailable)?;
    // FULL: each commit syncs the WAL. A worker acks a job to the broker once its result is
    // committed, and the broker then forgets the job; with NORMAL the last commits of a WAL
    // database survive a crash of the process but not of the machine.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    Ok(conn)
}

/// Databases made before re-drives were named lack the `drive` column, and those made before
/// submissions owned their records lack `owner`: add the one missing.
fn add_text_column(conn: &Connection, name: &str) -> Result<(), StoreError> {
    let has_it = || {
        conn.prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = ?1")
            .and_then(|mut st| st.exists([name]))
            .map_err(unavailable)
    };
    if has_it()? {
        return Ok(());
    }
    match conn.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {name} TEXT")) {
        Ok(()) => Ok(()),
        // Another process opening the same file added it first.
        Err(_) if has_it()? => Ok(()),
        Err(e) => Err(unavailable(e)),
    }
}

impl SqliteStore {
    pub fn open(path: &str) -> Result<Self, StoreError> {
        let write_conn = open_conn(path)?;
        write_conn.execute_batch(SCHEMA).map_err(unavailable)?;
        add_text_column(&write_conn, "drive")?;
        add_text_column(&write_conn, "owner")?;
        let reader = open_conn(path)?;
        let (tx, rx) = mpsc::channel::<Op>();
        std::thread::Builder::new()
            .name("gpuq-sqlite-writer".into())
            .spawn(move || writer_loop(write_conn, rx))
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
            .map_err(|_| unavailable("writer thread stopped"))?;
        rx.await.map_err(|_| unavailable("writer thread stopped"))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().map_err(|_| unavailable("reader poisoned"))?;
            f(&conn)
        })
        .await
        .map_err(unavailable)?
    }
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                for op in batch {
                    fail(op, unavailable(&e));
                }
                continue;
            }
        };
        let mut replies: Vec<Box<dyn FnOnce()>> = Vec::with_capacity(batch.len());
        for op in batch {
            replies.push(apply(&tx, op));
        }
        match tx.commit() {
            Ok(()) => replies.into_iter().for_each(|r| r()),
            Err(e) => {
                tracing::error!(error.message = %e, "sqlite commit failed");
                // Replies are dropped: every waiter sees "writer stopped"-style unavailability.
                drop(replies);
            }
        }
    }
}

fn fail(op: Op, e: StoreError) {
    let msg = e.to_string();
    let err = || StoreError::Unavailable(msg.clone());
    match op {
        Op::Insert(_, _, r) | Op::RecordError(_, _, _, r) => {
            let _ = r.send(Err(err()));
        }
        Op::Adopt(_, _, r) => {
            let _ = r.send(Err(err()));
        }
        Op::Withdraw(_, _, r) => {
            let _ = r.send(Err(err()));
        }
        Op::Start(_, r) => {
            let _ = r.send(Err(err()));
        }
        Op::Finish(_, _, _, r) => {
            let _ = r.send(Err(err()));
        }
        Op::Reset(_, _, r) => {
            let _ = r.send(Err(err()));
        }
    }
}

/// Runs one op inside the batch's transaction; the returned closure replies after the commit.
fn apply(tx: &rusqlite::Transaction<'_>, op: Op) -> Box<dyn FnOnce()> {
    fn reply<T: 'static>(
        r: oneshot::Sender<Result<T, StoreError>>,
        v: Result<T, StoreError>,
    ) -> Box<dyn FnOnce()> {
        Box::new(move || {
            let _ = r.send(v);
        })
    }
    match op {
        Op::Insert(job, owner, r) => {
            let v = insert_row(tx, &job, owner.as_deref()).and_then(|n| {
                if n == 0 {
                    Err(StoreError::Conflict(job.id))
                } else {
                    Ok(())
                }
            });
            reply(r, v)
        }
        Op::Adopt(id, owner, r) => {
            let v = tx
                .execute(
                    "UPDATE jobs SET owner = ?2 WHERE id = ?1 AND status = 'queued'",
                    params![id.to_string(), owner],
                )
                .map_err(unavailable)
                .and_then(|n| {
                    if n == 1 {
                        Ok(Some(JobStatus::Queued))
                    } else {
                        status_of(tx, id)
                    }
                });
            reply(r, v)
        }
        Op::Withdraw(id, owner, r) => {
            // `IS` compares NULL with NULL as equal: a record stored without an owner is
            // withdrawn by a submission without one.
            let v = tx
                .execute(
                    "DELETE FROM jobs WHERE id = ?1 AND status = 'queued' AND owner IS ?2",
                    params![id.to_string(), owner],
                )
                .map(|n| n == 1)
                .map_err(unavailable);
            reply(r, v)
        }
        Op::Start(job, r) => reply(r, start(tx, &job)),
        Op::RecordError(id, attempt, err, r) => {
            let v = tx
                .prepare_cached(concat!(
                    "UPDATE jobs SET error = ?2, attempts = max(attempts, ?3) WHERE id = ?1 AND status IN ",
                    not_final!()
                ))
                .and_then(|mut st| st.execute(params![id.to_string(), err, attempt]))
                .map(|_| ())
                .map_err(unavailable);
            reply(r, v)
        }
        Op::Finish(id, outcome, drive, r) => reply(r, finish(tx, id, &outcome, drive.as_deref())),
        Op::Reset(id, drive, r) => {
            let v = tx
                .execute(
                    "UPDATE jobs SET status = 'queued', finished_at = NULL, result = NULL, drive = ?2 WHERE id = ?1 AND status = 'dead_lettered'",
                    params![id.to_string(), drive],
                )
                .map(|n| n == 1)
                .map_err(unavailable);
            reply(r, v)
        }
    }
}

fn insert_row(
    tx: &rusqlite::Transaction<'_>,
    job: &JobRecord,
    owner: Option<&str>,
) -> Result<usize, StoreError> {
    tx.prepare_cached(INSERT_SQL)
        .and_then(|mut st| {
            st.execute(params![
                job.id.to_string(),
                job.kind.as_str(),
                job.params.to_string(),
                job.pool,
                job.gpus_requested,
                job.min_gpu_memory_mb.map(|m| m as i64),
                job.status.as_str(),
                job.attempts,
                job.worker,
                serde_json::to_string(&job.gpus).expect("gpus serialize"),
                job.result.as_ref().map(Value::to_string),
                job.error,
                job.created_at,
                job.started_at,
                job.finished_at,
                owner,
            ])
        })
        .map_err(unavailable)
}

fn status_of(tx: &rusqlite::Transaction<'_>, id: JobId) -> Result<Option<JobStatus>, StoreError> {
    let s: Option<String> = tx
        .prepare_cached("SELECT status FROM jobs WHERE id = ?1")
        .and_then(|mut st| {
            st.query_row(params![id.to_string()], |r| r.get(0))
                .optional()
        })
        .map_err(unavailable)?;
    s.map(|s| JobStatus::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("status {s}"))))
        .transpose()
}

fn start(tx: &rusqlite::Transaction<'_>, job: &JobRecord) -> Result<StartOutcome, StoreError> {
    let n = tx
        .prepare_cached(concat!(
            "UPDATE jobs SET status = 'running', attempts = ?2, worker = ?3, gpus = ?4, ",
            "started_at = ?5 WHERE id = ?1 AND status IN ",
            not_final!()
        ))
        .and_then(|mut st| {
            st.execute(params![
                job.id.to_string(),
                job.attempts,
                job.worker,
                serde_json::to_string(&job.gpus).expect("gpus serialize"),
                job.started_at
            ])
        })
        .map_err(unavailable)?;
    if n == 1 {
        return Ok(StartOutcome::Started);
    }
    match status_of(tx, job.id)? {
        Some(s) if s.is_final() => Ok(StartOutcome::AlreadyFinal(s)),
        Some(_) => Ok(StartOutcome::Started),
        None => {
            insert_row(tx, job, None)?;
            Ok(StartOutcome::Started)
        }
    }
}

/// The final write; with `drive`, only while the job is still on that drive (a job never
/// re-driven has no `drive` and is on the first).
fn finish(
    tx: &rusqlite::Transaction<'_>,
    id: JobId,
    o: &FinalOutcome,
    drive: Option<&str>,
) -> Result<FinishOutcome, StoreError> {
    let a = o.attempt.as_ref();
    let n = tx
        .prepare_cached(concat!(
            "UPDATE jobs SET status = ?2, result = ?3, error = coalesce(?4, error), ",
            "worker = coalesce(?5, worker), finished_at = ?6, attempts = coalesce(?7, attempts), ",
            "gpus = coalesce(?8, gpus), started_at = coalesce(?9, started_at) ",
            "WHERE id = ?1 AND (?10 IS NULL OR coalesce(drive, ?11) = ?10) AND status IN ",
            not_final!()
        ))
        .and_then(|mut st| {
            st.execute(params![
                id.to_string(),
                o.status.as_str(),
                o.result.as_ref().map(Value::to_string),
                o.error,
                o.worker,
                o.finished_at,
                a.map(|a| a.attempts),
                a.map(|a| serde_json::to_string(&a.gpus).expect("gpus serialize")),
                a.map(|a| a.started_at),
                drive,
                FIRST_DRIVE,
            ])
        })
        .map_err(unavailable)?;
    if n == 1 {
        return Ok(FinishOutcome::Stored);
    }
    Ok(match status_of(tx, id)? {
        Some(s) if s.is_final() => FinishOutcome::AlreadyFinal(s),
        Some(_) => FinishOutcome::Superseded,
        None => FinishOutcome::NotFound,
    })
}

/// Decodes a row. Whatever a column holds that does not decode (a wrong type included) is
/// `Corrupt`, not `Unavailable`: reading it again gives the same answer.
fn row_to_record(r: &Row<'_>) -> rusqlite::Result<Result<JobRecord, StoreError>> {
    let id: String = r.get(0)?;
    let build = || -> Result<JobRecord, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("{what} of job {id}"));
        let text = |i: usize, what: &str| -> Result<String, StoreError> {
            r.get(i).map_err(|_| corrupt(what))
        };
        let (kind, params, status, gpus) = (
            text(1, "kind")?,
            text(2, "params")?,
            text(6, "status")?,
            text(9, "gpus")?,
        );
        let result: Option<String> = r.get(10).map_err(|_| corrupt("result"))?;
        Ok(JobRecord {
            id: id.parse().map_err(|_| corrupt("id"))?,
            kind: match kind.as_str() {
                "simulate" => JobKind::Simulate,
                "command" => JobKind::Command,
                _ => return Err(corrupt("kind")),
            },
            params: serde_json::from_str(&params).map_err(|_| corrupt("params"))?,
            pool: r.get(3).map_err(|_| corrupt("pool"))?,
            gpus_requested: r.get(4).map_err(|_| corrupt("gpus_requested"))?,
            min_gpu_memory_mb: r
                .get::<_, Option<i64>>(5)
                .map_err(|_| corrupt("min_gpu_memory_mb"))?
                .map(|m| m as u64),
            status: JobStatus::parse(&status).ok_or_else(|| corrupt("status"))?,
            attempts: r.get(7).map_err(|_| corrupt("attempts"))?,
            worker: r.get(8).map_err(|_| corrupt("worker"))?,
            gpus: serde_json::from_str(&gpus).map_err(|_| corrupt("gpus"))?,
            result: result
                .map(|s| serde_json::from_str(&s))
                .transpose()
                .map_err(|_| corrupt("result"))?,
            error: r.get(11).map_err(|_| corrupt("error"))?,
            created_at: r.get(12).map_err(|_| corrupt("created_at"))?,
            started_at: r.get(13).map_err(|_| corrupt("started_at"))?,
            finished_at: r.get(14).map_err(|_| corrupt("finished_at"))?,
        })
    };
    Ok(build())
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
        self.read(move |c| {
            let limit = page_limit(q.limit);
            let mut sql = format!("SELECT {COLUMNS} FROM jobs WHERE 1=1");
            let mut args: Vec<String> = vec![];
            if let Some(s) = q.status {
                args.push(s.as_str().into());
                sql.push_str(&format!(" AND status = ?{}", args.len()));
            }
            if let Some(p) = &q.pool {
                args.push(p.clone());
                sql.push_str(&format!(" AND pool = ?{}", args.len()));
            }
            if let Some(cur) = q.cursor {
                args.push(cur.to_string());
                sql.push_str(&format!(" AND id < ?{}", args.len()));
            }
            sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit + 1));
            let mut stmt = c.prepare(&sql).map_err(unavailable)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args.iter()), row_to_record)
                .map_err(unavailable)?;
            let mut jobs = Vec::new();
            for row in rows {
                jobs.push(row.map_err(unavailable)??);
            }
            let next_cursor = if jobs.len() > limit as usize {
                jobs.truncate(limit as usize);
                jobs.last().map(|j| j.id)
            } else {
                None
            };
            Ok(JobPage { jobs, next_cursor })
        })
        .await
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
        self.read(|c| {
            let mut stmt = c
                .prepare("SELECT status, count(*) FROM jobs GROUP BY status")
                .map_err(unavailable)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(unavailable)?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (s, n) = row.map_err(unavailable)?;
                if let Some(s) = JobStatus::parse(&s) {
                    out.insert(s, n);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
