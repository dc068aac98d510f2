//! A running attempt's events on their way to the job's log (`common::events`): the engine
//! pushes them without ever waiting, a writer running beside it in the attempt's task writes
//! them to the store in batches every `FLUSH_EVERY`, and what is still pending when the attempt ends goes with its final outcome
//! (one store write for a short job). Bounded per attempt: a token bucket of `RATE` events per
//! second with a burst of `BURST`, and at most `MAX_PER_ATTEMPT`; events over the bounds are
//! counted, dropped, and said so in a `notice` event.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gpuq_common::events::{EventKind, NewEvent};
use gpuq_common::job::{JobId, now_ms};
use serde_json::json;
use tokio::sync::mpsc;

use crate::state::Worker;

/// How often pending events are written to the store (and their streams rung).
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// How long an attempt's start waits for company before it is written alone: a short job that
/// prints nothing writes no event at all (its log is derived from its record).
pub const LONE_START: Duration = Duration::from_secs(1);
/// Events per second an attempt may emit, sustained.
pub const RATE: f64 = 1000.0;
/// Events an attempt may emit at once above the rate.
pub const BURST: f64 = 5000.0;
/// Events one attempt may emit in all.
pub const MAX_PER_ATTEMPT: u64 = 200_000;
/// Events waiting to be written at most; past it they are dropped, never waited for.
const QUEUE: usize = 20_000;
/// Events written to the store in one call at most.
const BATCH: usize = 1000;

struct Bucket {
    tokens: f64,
    at: Instant,
    emitted: u64,
}

/// The engine's side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<NewEvent>,
    bucket: Arc<Mutex<Bucket>>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    /// A sink and the receiving end of its events (at most `QUEUE` waiting).
    pub fn channel() -> (Self, mpsc::Receiver<NewEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let sink = Self {
            tx,
            bucket: Arc::new(Mutex::new(Bucket {
                tokens: BURST,
                at: Instant::now(),
                emitted: 0,
            })),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        (sink, rx)
    }

    /// Events dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Emits `e` if the attempt is within its bounds; otherwise counts it as dropped.
    pub fn push(&self, e: NewEvent) {
        let admitted = {
            let mut b = self.bucket.lock().expect("event bucket");
            let now = Instant::now();
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * RATE).min(BURST);
            b.at = now;
            if b.tokens >= 1.0 && b.emitted < MAX_PER_ATTEMPT {
                b.tokens -= 1.0;
                b.emitted += 1;
                true
            } else {
                false
            }
        };
        if !admitted || self.tx.try_send(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The worker's side of one attempt's events. Its writer is no task of its own: it runs inside
/// the attempt's task, next to the engine (`write_alongside`), so a short, quiet job costs no
/// spawn, no ticking timer and no wake-up of another thread.
pub struct AttemptEvents {
    sink: EventSink,
    rx: mpsc::Receiver<NewEvent>,
    first: NewEvent,
}

impl AttemptEvents {
    /// The attempt's events; the first one says which attempt runs where.
    pub fn new(first: NewEvent) -> Self {
        let (sink, rx) = EventSink::channel();
        Self { sink, rx, first }
    }

    pub fn sink(&self) -> EventSink {
        self.sink.clone()
    }

    /// Writes the events to `job`'s log while `run` runs; when `run` is done, answers its output
    /// and the events not written yet (to go with the final outcome, or to be appended by the
    /// caller). A write under way when `run` ends is finished first.
    pub async fn write_alongside<T>(
        self,
        w: &Worker,
        job: JobId,
        run: impl Future<Output = T>,
    ) -> (T, Vec<NewEvent>) {
        let Self { sink, rx, first } = self;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let run = async move {
            let out = run.await;
            let _ = stop.send(());
            out
        };
        tokio::join!(run, write_loop(w, job, first, rx, sink, stopped))
    }
}

/// A `notice` for events dropped since the last one.
fn notice(dropped: u64) -> NewEvent {
    NewEvent {
        kind: EventKind::Notice,
        at_ms: now_ms(),
        data: json!({
            "message": format!("{dropped} events dropped: over the job's bounds ({RATE}/s, burst {BURST}, {MAX_PER_ATTEMPT} per attempt)"),
            "dropped": dropped,
        }),
    }
}

/// Moves the events received into `pending`, with a `notice` for those dropped since the last.
fn drain(
    rx: &mut mpsc::Receiver<NewEvent>,
    pending: &mut Vec<NewEvent>,
    dropped: &AtomicU64,
    reported: &mut u64,
    metrics: &gpuq_common::metrics::WorkerMetrics,
) {
    while let Ok(e) = rx.try_recv() {
        pending.push(e);
    }
    let now_dropped = dropped.load(Ordering::Relaxed);
    if now_dropped > *reported {
        metrics.events.dropped.inc_by(now_dropped - *reported);
        pending.push(notice(now_dropped - *reported));
        *reported = now_dropped;
    }
}

async fn write_loop(
    w: &Worker,
    job: JobId,
    first: NewEvent,
    mut rx: mpsc::Receiver<NewEvent>,
    sink: EventSink,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) -> Vec<NewEvent> {
    let (store, coord, metrics) = (&w.store, &w.coord, &w.metrics);
    let dropped = sink.dropped.clone();
    drop(sink);
    let mut pending: Vec<NewEvent> = vec![first];
    let mut reported = 0u64;
    let started = Instant::now();
    // A quiet attempt's start waits alone, without a timer ticking, until the engine says
    // something, `LONE_START` passes, or the attempt ends.
    let mut ended = tokio::select! {
        e = rx.recv() => {
            pending.extend(e);
            false
        }
        () = tokio::time::sleep(LONE_START) => false,
        _ = &mut stopped => true,
    };
    if ended {
        // Most jobs: over before their start was worth writing alone. No flush timer for
        // them; whatever the engine emitted goes with the outcome.
        drain(&mut rx, &mut pending, &dropped, &mut reported, metrics);
        return pending;
    }
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.tick().await;
    loop {
        ended = ended
            || tokio::select! {
                _ = tick.tick() => false,
                _ = &mut stopped => true,
            };
        drain(&mut rx, &mut pending, &dropped, &mut reported, metrics);
        if ended {
            return pending;
        }
        let lone_start = matches!(pending.as_slice(), [e] if e.kind == EventKind::Attempt);
        if lone_start && started.elapsed() < LONE_START {
            continue;
        }
        if pending.len() > QUEUE {
            // The store has been away for a while: keep the newest, count the rest as dropped.
            let excess = pending.len() - QUEUE;
            pending.drain(..excess);
            dropped.fetch_add(excess as u64, Ordering::Relaxed);
        }
        while !pending.is_empty() {
            let n = pending.len().min(BATCH);
            match store.append_events(job, &pending[..n]).await {
                Ok(_) => {
                    metrics.events.written.inc_by(n as u64);
                    pending.drain(..n);
                    if let Err(e) = coord.ring(job).await {
                        tracing::debug!(error.message = %e, "could not ring the job's event streams");
                    }
                }
                Err(e) => {
                    // Kept for the next tick (or the final write); the run goes on.
                    metrics.store_retries.with_label_values(&["events"]).inc();
                    tracing::warn!(error.message = %e, "cannot write the job's events yet");
                    break;
                }
            }
        }
    }
}
