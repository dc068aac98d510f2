//! The SQLite writer thread: every write goes through it as an `Op`, and it commits whatever is
//! pending in one transaction (group commit); the conditional writes that end a job live here.

use std::sync::mpsc;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;
use tokio::sync::oneshot;

use super::conn::{BUSY_TIMEOUT, Synchronous, lock_wait_counts_from, unavailable};
use super::turns::WriteTurns;
use crate::events::{EventKind, NewEvent, final_event, is_quiet_attempt};
use crate::job::{FinalOutcome, JobId, JobKind, JobRecord, JobStatus};
use crate::store::{FinishOutcome, StartOutcome, StoreError};
use crate::topology::FIRST_DRIVE;

const INSERT_SQL: &str = concat!(
    "INSERT OR IGNORE INTO jobs (",
    columns!(),
    ", owner) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20)"
);
pub(super) const GET_SQL: &str = concat!("SELECT ", columns!(), " FROM jobs WHERE id = ?1");
const MAX_BATCH: usize = 512;

pub(super) enum Op {
    /// A submitted job, with the submission that owns it when it holds an idempotency claim.
    Insert(
        JobRecord,
        Option<String>,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    /// A batch's jobs, in the same transaction; answers the ids that existed already.
    InsertMany(
        Vec<JobRecord>,
        Option<String>,
        oneshot::Sender<Result<Vec<JobId>, StoreError>>,
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
    /// Retention: final jobs submitted before a time, at most so many, with their logs.
    Delete(i64, u32, oneshot::Sender<Result<u64, StoreError>>),
    /// Events for the job's log.
    Events(
        JobId,
        Vec<NewEvent>,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
}

impl Op {
    /// Whether the op's commit must be on the disk before it is answered. A job's start and its
    /// live log lines need not be: the job is not acked until its final write, whose synced commit
    /// carries every earlier commit of the write-ahead log to the disk with it; if the machine
    /// loses power before that, the job runs again and writes them again.
    fn must_reach_disk(&self) -> bool {
        !matches!(self, Op::Start(..) | Op::Events(..))
    }
}

/// The commit mode for a batch: `Full` syncs only batches holding an op that must reach the disk.
fn mode_for(configured: Synchronous, batch: &[Op]) -> Synchronous {
    match configured {
        Synchronous::Full if !batch.iter().any(Op::must_reach_disk) => Synchronous::Normal,
        mode => mode,
    }
}

pub(super) fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Op>,
    configured: Synchronous,
    mut turns: Option<WriteTurns>,
) {
    let mut current = configured;
    while let Ok(first) = rx.recv() {
        // The turn first, then the batch: what arrived while other processes had their turns
        // goes into this commit. Held until the commit (or the failure to begin) ends it.
        let asked = std::time::Instant::now();
        let turn = turns.as_mut().and_then(|t| t.take(BUSY_TIMEOUT));
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mode = mode_for(configured, &batch);
        if mode != current {
            // A connection's setting, read at each commit; no I/O.
            match super::conn::set_synchronous(&conn, mode) {
                Ok(()) => current = mode,
                Err(e) => tracing::warn!(error.message = %e, "could not change the commit mode"),
            }
        }
        // The turn and the lock share one busy timeout: a store that takes no writes is
        // reported within it (callers retry), however long the turn took.
        lock_wait_counts_from(Some(asked));
        let begun = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate);
        lock_wait_counts_from(None);
        let tx = match begun {
            Ok(tx) => tx,
            Err(e) => {
                let e = unavailable(e);
                for op in batch {
                    fail(op, e.clone());
                }
                continue;
            }
        };
        let mut replies: Vec<Box<dyn FnOnce()>> = Vec::with_capacity(batch.len());
        for op in batch {
            replies.push(apply(&tx, op));
        }
        let committed = tx.commit();
        drop(turn);
        match committed {
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
    let err = || e.clone();
    match op {
        Op::Insert(_, _, r) | Op::RecordError(_, _, _, r) => {
            let _ = r.send(Err(err()));
        }
        Op::Adopt(_, _, r) => {
            let _ = r.send(Err(err()));
        }
        Op::InsertMany(_, _, r) => {
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
        Op::Events(_, _, r) | Op::Delete(_, _, r) => {
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
        Op::InsertMany(jobs, owner, r) => {
            let v = jobs.iter().try_fold(vec![], |mut existed, job| {
                if insert_row(tx, job, owner.as_deref())? == 0 {
                    existed.push(job.id);
                }
                Ok(existed)
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
        Op::Events(id, events, r) => reply(r, append_events(tx, id, &events)),
        Op::Delete(cutoff, limit, r) => reply(r, delete_final_before(tx, cutoff, limit)),
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
                job.tenant,
                job.progress
                    .as_ref()
                    .map(|p| serde_json::to_string(p).expect("progress serializes")),
                job.array_id.map(|a| a.to_string()),
                job.array_index,
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
    s.map(|s| JobStatus::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("status {s}").into())))
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
        append_final(tx, id, o)?;
        return Ok(FinishOutcome::Stored);
    }
    Ok(match status_of(tx, id)? {
        Some(s) if s.is_final() => FinishOutcome::AlreadyFinal(s),
        Some(_) => FinishOutcome::Superseded,
        None => FinishOutcome::NotFound,
    })
}

/// Appends `events` under the job's next offsets (the write lock of the batch's transaction
/// serializes every process's appends), and keeps the last progress on the record.
fn append_events(
    tx: &rusqlite::Transaction<'_>,
    id: JobId,
    events: &[NewEvent],
) -> Result<u64, StoreError> {
    if events.is_empty() || status_of(tx, id)?.is_none() {
        return Ok(0);
    }
    append_rows(tx, id, events)
}

/// The outcome's events and its `final` event — unless the log is empty and the outcome's only
/// event is its attempt's start: then the log stays empty, and readers derive its two events
/// from the record (`events::derived_log`). Most jobs are such short, quiet ones; this spares
/// each of them two rows.
fn append_final(
    tx: &rusqlite::Transaction<'_>,
    id: JobId,
    o: &FinalOutcome,
) -> Result<(), StoreError> {
    if is_quiet_attempt(&o.events) {
        let logged: bool = tx
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM job_events WHERE job = ?1)")
            .and_then(|mut st| st.query_row(params![id.to_string()], |r| r.get(0)))
            .map_err(unavailable)?;
        if !logged {
            return Ok(());
        }
    }
    let mut events = o.events.clone();
    events.push(final_event(o.status, o.error.as_deref(), o.finished_at));
    append_rows(tx, id, &events).map(|_| ())
}

/// Retention's batch: the oldest final jobs (found through `jobs_created`) and their logs.
fn delete_final_before(
    tx: &rusqlite::Transaction<'_>,
    cutoff_ms: i64,
    limit: u32,
) -> Result<u64, StoreError> {
    let ids: Vec<String> = tx
        .prepare_cached(concat!(
            "SELECT id FROM jobs WHERE created_at < ?1 AND status NOT IN ",
            not_final!(),
            " ORDER BY created_at LIMIT ?2"
        ))
        .and_then(|mut st| {
            st.query_map(params![cutoff_ms, limit], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()
        })
        .map_err(unavailable)?;
    for id in &ids {
        tx.prepare_cached("DELETE FROM job_events WHERE job = ?1")
            .and_then(|mut st| st.execute(params![id]))
            .map_err(unavailable)?;
        tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")
            .and_then(|mut st| st.execute(params![id]))
            .map_err(unavailable)?;
    }
    Ok(ids.len() as u64)
}

/// `append_events` for a job known to exist.
fn append_rows(
    tx: &rusqlite::Transaction<'_>,
    id: JobId,
    events: &[NewEvent],
) -> Result<u64, StoreError> {
    let job = id.to_string();
    let last: i64 = tx
        .prepare_cached("SELECT coalesce(max(offset), 0) FROM job_events WHERE job = ?1")
        .and_then(|mut st| st.query_row(params![job], |r| r.get(0)))
        .map_err(unavailable)?;
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO job_events (job, offset, kind, at, data) VALUES (?1,?2,?3,?4,?5)",
        )
        .map_err(unavailable)?;
    for (i, e) in events.iter().enumerate() {
        insert
            .execute(params![
                job,
                last + 1 + i as i64,
                e.kind.as_str(),
                e.at_ms,
                e.data.to_string()
            ])
            .map_err(unavailable)?;
    }
    if let Some(p) = events.iter().rev().find(|e| e.kind == EventKind::Progress) {
        tx.prepare_cached("UPDATE jobs SET progress = ?2 WHERE id = ?1")
            .and_then(|mut st| st.execute(params![job, p.data.to_string()]))
            .map_err(unavailable)?;
    }
    Ok((last + events.len() as i64) as u64)
}

/// Decodes a row. Whatever a column holds that does not decode (a wrong type included) is
/// `Corrupt`, not `Unavailable`: reading it again gives the same answer.
pub(super) fn row_to_record(r: &Row<'_>) -> rusqlite::Result<Result<JobRecord, StoreError>> {
    let id: String = r.get(0)?;
    let build = || -> Result<JobRecord, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("{what} of job {id}").into());
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
            // Jobs stored before tenants have none: they are the default tenant's.
            tenant: r
                .get::<_, Option<String>>(15)
                .map_err(|_| corrupt("tenant"))?
                .unwrap_or_else(|| crate::tenancy::DEFAULT_TENANT.to_string()),
            progress: r
                .get::<_, Option<String>>(16)
                .map_err(|_| corrupt("progress"))?
                .map(|s| serde_json::from_str(&s))
                .transpose()
                .map_err(|_| corrupt("progress"))?,
            array_id: r
                .get::<_, Option<String>>(17)
                .map_err(|_| corrupt("array_id"))?
                .map(|s| s.parse())
                .transpose()
                .map_err(|_| corrupt("array_id"))?,
            array_index: r.get(18).map_err(|_| corrupt("array_index"))?,
        })
    };
    Ok(build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobMessage, SubmitRequest};

    fn record() -> JobRecord {
        let req: SubmitRequest = serde_json::from_value(serde_json::json!({"kind":"simulate"}))
            .expect("a simulate request");
        let (payload, placement) = req.validate().expect("valid");
        JobRecord::queued(&JobMessage::new(payload, placement))
    }

    #[test]
    fn only_a_batch_of_starts_and_log_lines_commits_without_the_sync() {
        let start = || Op::Start(record(), oneshot::channel().0);
        let events = || Op::Events(record().id, vec![], oneshot::channel().0);
        let finish = || {
            let outcome = FinalOutcome {
                status: JobStatus::Succeeded,
                result: None,
                error: None,
                worker: None,
                finished_at: 0,
                attempt: None,
                events: vec![],
            };
            Op::Finish(record().id, outcome, None, oneshot::channel().0)
        };
        let insert = || Op::Insert(record(), None, oneshot::channel().0);
        let full = Synchronous::Full;
        assert_eq!(mode_for(full, &[start(), events()]), Synchronous::Normal);
        assert_eq!(mode_for(full, &[start(), finish()]), full);
        assert_eq!(mode_for(full, &[insert()]), full);
        assert_eq!(mode_for(full, &[events(), insert(), start()]), full);
        // A store opened without syncs never gains them.
        let normal = Synchronous::Normal;
        assert_eq!(mode_for(normal, &[finish()]), normal);
    }
}
