//! SQLite connections: the schema, the pragmas every connection needs (WAL, synced commits unless
//! the URL says `synchronous=normal`), a
//! busy handler that retries in short steps, and the columns older databases lack.

use std::time::Duration;

use rusqlite::Connection;

use crate::store::StoreError;

pub(super) const SCHEMA: &str = "
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
    owner TEXT,
    tenant TEXT,
    progress TEXT,
    array_id TEXT,
    array_index INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_events (
    job TEXT NOT NULL,
    offset INTEGER NOT NULL,
    kind TEXT NOT NULL,
    at INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job, offset)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_status_id ON jobs(status, id);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
";

pub(super) fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::unavailable(e)
}

/// How long a statement waits for another process's write lock before the store reports itself
/// unavailable (callers retry: a worker keeps its result until it is stored).
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    /// When the current wait for a lock began (SQLite calls the busy handler on the thread that
    /// runs the statement, with attempt 0 first).
    static BUSY_SINCE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    /// Set by the writer around its `BEGIN`: when it began waiting (for its turn, `turns`), so
    /// that the turn and the lock share one busy timeout.
    static WAITING_SINCE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// On this thread, until called again with `None`: a wait for SQLite's lock counts from `since`
/// (the write gives up once `since` is `BUSY_TIMEOUT` ago, however the wait was spent).
pub(super) fn lock_wait_counts_from(since: Option<std::time::Instant>) {
    WAITING_SINCE.set(since);
}

fn busy_retry(attempt: i32) -> bool {
    let now = std::time::Instant::now();
    let since = if attempt == 0 {
        let since = WAITING_SINCE.get().unwrap_or(now);
        BUSY_SINCE.set(Some(since));
        since
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

/// How a commit reaches the disk (`sqlite://PATH?synchronous=…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Every commit that ends, submits or deletes a job syncs the WAL: a result the worker acked
    /// survives a crash of the machine.
    #[default]
    Full,
    /// Commits do not wait for the disk (WAL `NORMAL`): they survive a crash of the process but
    /// the last ones may be lost with the machine's power — jobs acked meanwhile would be lost.
    Normal,
}

/// `PATH` or `PATH?synchronous=full|normal`: the file and its commit mode.
pub fn parse_location(location: &str) -> Result<(&str, Synchronous), StoreError> {
    let Some((path, query)) = location.split_once('?') else {
        return Ok((location, Synchronous::Full));
    };
    let mut sync = Synchronous::Full;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        sync = match pair {
            "synchronous=full" => Synchronous::Full,
            "synchronous=normal" => Synchronous::Normal,
            other => {
                return Err(StoreError::BadUrl(format!(
                    "unknown SQLite option {other:?}: the one option is synchronous=full|normal"
                )));
            }
        };
    }
    Ok((path, sync))
}

#[cfg(test)]
pub(super) fn open_conn(path: &str) -> Result<Connection, StoreError> {
    open_conn_with(path, Synchronous::Full)
}

pub(super) fn open_conn_with(path: &str, sync: Synchronous) -> Result<Connection, StoreError> {
    if let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(unavailable)?;
    }
    let mut conn = Connection::open(path).map_err(unavailable)?;
    // SQLite's default busy handler sleeps whole milliseconds (1, 2, 5, 10… ms) when another
    // process holds the write lock; with several processes committing small batches that
    // sleep, not the work, bounds throughput. Retry in 100 µs steps instead, for up to 10 s.
    // (gpuq's own writers rarely get here: they take turns at the lock first, `turns`.)
    conn.busy_handler(Some(busy_retry)).map_err(unavailable)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(unavailable)?;
    // FULL (the default): each commit that must survive the machine syncs the WAL. A worker
    // acks a job to the broker once its result is committed, and the broker then forgets the
    // job; with NORMAL the last commits of a WAL database survive a crash of the process but not
    // of the machine. (The writer commits a batch of only starts and log lines without the sync:
    // the next synced commit carries them to the disk; see writer::Op::must_reach_disk.) The sync holds the
    // file's write lock, and processes cannot share one: many processes on one file commit at
    // most once per sync between them (see README, "Many engines, and which store").
    set_synchronous(&conn, sync)?;
    Ok(conn)
}

pub(super) fn set_synchronous(conn: &Connection, sync: Synchronous) -> Result<(), StoreError> {
    let mode = match sync {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", mode)
        .map_err(unavailable)
}

/// Databases made before re-drives were named lack the `drive` column, those made before
/// submissions owned their records lack `owner`, those made before tenants lack `tenant`, and
/// those made before arrays lack `array_id` and `array_index`: add the one missing.
pub(super) fn add_column(conn: &Connection, name: &str, sql_type: &str) -> Result<(), StoreError> {
    let has_it = || {
        conn.prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = ?1")
            .and_then(|mut st| st.exists([name]))
            .map_err(unavailable)
    };
    if has_it()? {
        return Ok(());
    }
    match conn.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {name} {sql_type}")) {
        Ok(()) => Ok(()),
        // Another process opening the same file added it first.
        Err(_) if has_it()? => Ok(()),
        Err(e) => Err(unavailable(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_may_name_the_commit_mode() {
        assert_eq!(
            parse_location("a/b.db").unwrap(),
            ("a/b.db", Synchronous::Full)
        );
        assert_eq!(
            parse_location("/x.db?synchronous=normal").unwrap(),
            ("/x.db", Synchronous::Normal)
        );
        assert_eq!(
            parse_location("x.db?synchronous=full").unwrap(),
            ("x.db", Synchronous::Full)
        );
        let e = parse_location("x.db?sync=off").unwrap_err();
        assert!(e.to_string().contains("synchronous=full|normal"), "{e}");
    }
}
