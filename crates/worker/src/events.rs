//! A running attempt's events on their way to the job's log (`common::events`): the engine
//! pushes them without ever waiting, a task writes them to the store in batches every
//! `FLUSH_EVERY`, and what is still pending when the attempt ends goes with its final outcome
//! (one store write for a short job). Bounded per attempt: a token bucket of `RATE` events per
//! second with a burst of `BURST`, and at most `MAX_PER_ATTEMPT`; events over the bounds are
//! counted, dropped, and said so in a `notice` event.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gpuq_common::JobStore;
use gpuq_common::coord::lease::Coordinator;
use gpuq_common::events::{EventKind, NewEvent};
use gpuq_common::job::{JobId, now_ms};
use gpuq_common::metrics::WorkerMetrics;
use serde_json::json;
use tokio::sync::mpsc;

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

    /// An event outside the engine (the attempt's start): never dropped for the rate.
    fn push_always(&self, e: NewEvent) {
        if self.tx.try_send(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The worker's side of one attempt's events.
pub struct AttemptEvents {
    sink: EventSink,
    writer: tokio::task::JoinHandle<Vec<NewEvent>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl AttemptEvents {
    /// Starts the attempt's writer; its first event says which attempt runs where.
    pub fn start(
        store: Arc<dyn JobStore>,
        coord: Coordinator,
        metrics: WorkerMetrics,
        job: JobId,
        first: NewEvent,
    ) -> Self {
        let (sink, rx) = EventSink::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        sink.push_always(first);
        let writer = tokio::spawn(write_loop(
            Writer {
                store,
                coord,
                metrics,
                job,
            },
            rx,
            sink.dropped.clone(),
            stopped,
        ));
        Self { sink, writer, stop }
    }

    pub fn sink(&self) -> EventSink {
        self.sink.clone()
    }

    /// Ends the attempt's events: the writer stops, and the events it had not written yet are
    /// returned (to go with the final outcome, or to be appended by the caller).
    pub async fn finish(self) -> Vec<NewEvent> {
        let Self { sink, writer, stop } = self;
        drop(sink);
        let _ = stop.send(());
        writer.await.unwrap_or_default()
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

struct Writer {
    store: Arc<dyn JobStore>,
    coord: Coordinator,
    metrics: WorkerMetrics,
    job: JobId,
}

async fn write_loop(
    w: Writer,
    mut rx: mpsc::Receiver<NewEvent>,
    dropped: Arc<AtomicU64>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) -> Vec<NewEvent> {
    let Writer {
        store,
        coord,
        metrics,
        job,
    } = w;
    let mut pending: Vec<NewEvent> = vec![];
    let mut reported = 0u64;
    let started = Instant::now();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.tick().await;
    loop {
        let stop = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut stopped => true,
        };
        while let Ok(e) = rx.try_recv() {
            pending.push(e);
        }
        let now_dropped = dropped.load(Ordering::Relaxed);
        if now_dropped > reported {
            metrics.events.dropped.inc_by(now_dropped - reported);
            pending.push(notice(now_dropped - reported));
            reported = now_dropped;
        }
        if stop {
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
