//! Taking turns at the write lock across processes. SQLite lets one writer at a time into a WAL
//! file and makes the others poll for the lock (the busy handler in `conn`): with dozens of
//! processes on one file — 50 workers on one host — the waiters' wake-ups every 100 µs took the
//! CPU the lock holder needed, and a job's final write waited ~60 ms. Before each write
//! transaction the writer thread takes an exclusive `flock(2)` on `<database>-writers`, in which
//! the kernel queues the waiters and wakes them when the holder lets go; SQLite's own lock still
//! guards the data (a process that does not take turns, e.g. the `sqlite3` shell, is waited for by
//! the busy handler as before).
//!
//! The uncontended turn costs a `dup` and a non-blocking `flock`; a contended one is waited for
//! by one thread per store that blocks in the kernel and hands the turn over. A turn is waited for
//! at most as long as SQLite's busy timeout, which the turn and the lock share (the writer's
//! wait for the lock counts from when it asked for its turn): past it the write goes ahead
//! without its turn and fails at once if the lock is taken (callers retry), the waiting thread
//! lets go as soon as it gets the turn, and until then later writes do not queue behind it.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// One writer's turn; dropping it (after the commit) closes the file and so lets the next
/// process in.
pub(super) type Turn = Flock<File>;

pub(super) struct WriteTurns {
    path: String,
    /// The file, open once for the uncontended turn.
    file: File,
    /// To the waiting thread: where to hand the next turn.
    requests: mpsc::Sender<mpsc::SyncSender<Turn>>,
    /// Whether the waiting thread is still in the kernel (a turn that timed out).
    blocked: Arc<AtomicBool>,
}

impl WriteTurns {
    /// The turns of the database at `db_path`; `None` (with a warning) for an in-memory
    /// database or when the file cannot be opened — the writer then relies on SQLite's lock.
    pub(super) fn open(db_path: &str) -> Option<Self> {
        if db_path.is_empty() || db_path.starts_with(':') || db_path.starts_with("file:") {
            return None;
        }
        let path = format!("{db_path}-writers");
        let file = match open(&path) {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(path, error.message = %e, "SQLite writers cannot take turns; every waiting writer polls the lock");
                return None;
            }
        };
        let (requests, rx) = mpsc::channel();
        let blocked = Arc::new(AtomicBool::new(false));
        let (in_kernel, waiter_path) = (blocked.clone(), path.clone());
        let waiting = std::thread::Builder::new()
            .name("gpuq-sqlite-turn".into())
            .spawn(move || wait_in_kernel(&waiter_path, &rx, &in_kernel));
        if let Err(e) = waiting {
            tracing::warn!(error.message = %e, "could not start the SQLite turn waiter");
            return None;
        }
        Some(Self {
            path,
            file,
            requests,
            blocked,
        })
    }

    /// Waits for this process's turn, at most `timeout`; `None`: go ahead without one.
    pub(super) fn take(&mut self, timeout: Duration) -> Option<Turn> {
        let file = self.file.try_clone().ok()?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(turn) => return Some(turn),
            Err((_, Errno::EWOULDBLOCK)) => {}
            Err((_, e)) => {
                tracing::warn!(path = %self.path, error.message = %e, "flock failed");
                return None;
            }
        }
        if self.blocked.load(Ordering::Acquire) {
            return None;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.blocked.store(true, Ordering::Release);
        self.requests.send(tx).ok()?;
        match rx.recv_timeout(timeout) {
            Ok(turn) => Some(turn),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(path = %self.path, waited_ms = timeout.as_millis() as u64, "another process has held the SQLite writers' turn too long; writing without a turn");
                None
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
        }
    }
}

/// The waiting thread: for each request, blocks in `flock` on a file it opens (a lock of its
/// own, not shared with the writer's open file) and hands the turn over; when the writer has given
/// up on it, the send fails and dropping the turn lets go at once. Ends with the store (the
/// requests' sender dropped).
fn wait_in_kernel(
    path: &str,
    requests: &mpsc::Receiver<mpsc::SyncSender<Turn>>,
    blocked: &AtomicBool,
) {
    while let Ok(grant) = requests.recv() {
        let turn = open(path)
            .map_err(|e| e.to_string())
            .and_then(|f| Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| e.to_string()));
        blocked.store(false, Ordering::Release);
        match turn {
            Ok(turn) => drop(grant.send(turn)),
            Err(e) => tracing::warn!(path, error.message = %e, "flock failed"),
        }
    }
}

fn open(path: &str) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    // Two `WriteTurns` of one file in one process stand for two processes: each holds its own
    // open files, and flock(2) locks belong to open files.
    fn two(dir: &tempfile::TempDir) -> (WriteTurns, WriteTurns) {
        let db = dir.path().join("jobs.db");
        let db = db.to_str().unwrap();
        (WriteTurns::open(db).unwrap(), WriteTurns::open(db).unwrap())
    }

    #[test]
    fn a_waiting_writer_gets_its_turn_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, mut b) = two(&dir);
        let held = a.take(Duration::from_secs(1)).expect("an uncontended turn");
        let released = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let letting_go = Instant::now();
            drop(held);
            letting_go
        });
        let t0 = Instant::now();
        let turn = b
            .take(Duration::from_secs(5))
            .expect("the turn after the holder's");
        let got = Instant::now();
        let released = released.join().unwrap();
        assert!(got >= released, "b's turn came before a let go");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // Now a waits for b.
        drop(turn);
        assert!(a.take(Duration::from_millis(100)).is_some());
    }

    #[test]
    fn a_turn_held_too_long_is_given_up_without_queueing_writers_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, mut b) = two(&dir);
        let held = a.take(Duration::from_secs(1)).unwrap();
        let t0 = Instant::now();
        assert!(b.take(Duration::from_millis(150)).is_none());
        assert!(t0.elapsed() >= Duration::from_millis(150));
        // The waiting thread is still in the kernel: the next write does not wait again.
        let t1 = Instant::now();
        assert!(b.take(Duration::from_secs(5)).is_none());
        assert!(
            t1.elapsed() < Duration::from_millis(100),
            "{:?}",
            t1.elapsed()
        );
        // Once a lets go, the waiting thread gets the turn nobody wants and lets go at once.
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        let turn = loop {
            if let Some(t) = b.take(Duration::from_millis(50)) {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "b never got a turn after a let go"
            );
        };
        assert!(
            a.take(Duration::from_millis(50)).is_none(),
            "b holds the turn now"
        );
        drop(turn);
    }

    #[test]
    fn an_in_memory_database_takes_no_turns() {
        assert!(WriteTurns::open(":memory:").is_none());
        assert!(WriteTurns::open("").is_none());
    }
}
