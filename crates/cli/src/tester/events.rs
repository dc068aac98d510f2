//! A timeline of what the tester did and saw (faults armed, workers down and back, broker nodes
//! and Redis stopped and started), printed for people as it happens and kept for the verdict.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuq_common::job::now_ms;
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::output::note;
use gpuq_client::worker::Worker;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Seconds since the run started.
    pub t_s: f64,
    /// Milliseconds since the epoch.
    pub at_ms: i64,
    pub what: String,
}

#[derive(Debug, Clone)]
pub struct EventLog {
    start: Instant,
    events: Arc<Mutex<Vec<Event>>>,
    pb: Arc<Mutex<ProgressBar>>,
    quiet: bool,
}

impl EventLog {
    /// `quiet` (JSON output): events are kept but not printed.
    pub fn new(quiet: bool) -> Self {
        Self {
            start: Instant::now(),
            events: Arc::default(),
            pb: Arc::new(Mutex::new(ProgressBar::hidden())),
            quiet,
        }
    }

    /// Prints further events above this bar.
    pub fn attach(&self, pb: &ProgressBar) {
        *self.pb.lock().expect("lock") = pb.clone();
    }

    pub fn push(&self, what: impl Into<String>) {
        let what = what.into();
        let t_s = (self.start.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        let pb = self.pb.lock().expect("lock").clone();
        note(&pb, self.quiet, &format!("[+{t_s:.1}s] {what}"));
        self.events.lock().expect("lock").push(Event {
            t_s,
            at_ms: now_ms(),
            what,
        });
    }

    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().expect("lock"))
    }
}

/// Watches each worker's `/healthz` twice a second and logs when one stops or starts answering
/// (a crash scenario, then the supervisor's restart). Ends when `stop` fires.
pub fn watch_workers(
    workers: Vec<Worker>,
    log: EventLog,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut up: Vec<Option<bool>> = vec![None; workers.len()];
        loop {
            let states = futures_util::future::join_all(workers.iter().map(|w| w.healthy())).await;
            for (i, now_up) in states.into_iter().enumerate() {
                match (up[i], now_up) {
                    (Some(true), false) => {
                        log.push(format!("{} stopped answering", workers[i].name))
                    }
                    (Some(false), true) => log.push(format!("{} answers again", workers[i].name)),
                    (None, false) => log.push(format!("{} is not answering", workers[i].name)),
                    _ => {}
                }
                up[i] = Some(now_up);
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    })
}
