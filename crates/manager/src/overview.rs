//! The status page's data: one JSON overview of engines, queues, job counts, throughput and
//! recent jobs, served whole (`GET /v1/overview`) and pushed every ~1.5 s over Server-Sent
//! Events (`GET /v1/events`).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use futures_util::StreamExt;
use gpuq_common::engine::EngineView;
use gpuq_common::http::ApiError;
use gpuq_common::job::{JobRecord, JobStatus, now_ms};
use gpuq_common::store::ListQuery;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::queues::QueueStats;

/// How often the event stream sends a fresh overview.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(1500);
/// Throughput is measured over this window.
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Throughput {
    /// Jobs that reached a final status per second, over `window_s`.
    pub finished_per_s: f64,
    /// The span actually measured (shorter right after the manager started).
    pub window_s: f64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Overview {
    pub generated_at_ms: i64,
    pub engines: Vec<EngineView>,
    pub queues: Vec<QueueStats>,
    /// Whether the RabbitMQ management API answered the last poll.
    pub broker_management_up: bool,
    /// Whether the manager's dead-letter consumer is attached.
    pub broker_connected: bool,
    /// Jobs in the store by status (every status present).
    pub job_counts: BTreeMap<String, u64>,
    pub throughput: Throughput,
    pub recent_jobs: Vec<JobRecord>,
    pub dead_letters: Vec<JobRecord>,
}

/// Successive samples of the finished-job count, to turn counts into a rate.
#[derive(Default)]
pub struct ThroughputTracker {
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl ThroughputTracker {
    /// Samples the count of final jobs from a `count_by_status` answer.
    pub fn record(&self, counts: &BTreeMap<JobStatus, u64>) {
        let finished = counts
            .iter()
            .filter(|(s, _)| s.is_final())
            .map(|(_, n)| n)
            .sum();
        self.record_at(Instant::now(), finished);
    }

    pub fn record_at(&self, at: Instant, finished: u64) {
        let mut s = self.samples.lock().expect("throughput lock");
        if s.back()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) < Duration::from_millis(500))
        {
            return;
        }
        s.push_back((at, finished));
        // Keep one sample at least WINDOW old as the baseline.
        while s.len() > 2
            && s.get(1)
                .is_some_and(|(t, _)| at.saturating_duration_since(*t) >= WINDOW)
        {
            s.pop_front();
        }
    }

    pub fn rate(&self) -> Throughput {
        let s = self.samples.lock().expect("throughput lock");
        let (Some((t0, n0)), Some((t1, n1))) = (s.front(), s.back()) else {
            return Throughput {
                finished_per_s: 0.0,
                window_s: 0.0,
            };
        };
        let dt = t1.saturating_duration_since(*t0).as_secs_f64();
        if dt < 1.0 {
            return Throughput {
                finished_per_s: 0.0,
                window_s: dt,
            };
        }
        // Counts can fall (a dead letter re-driven goes back to queued): never a negative rate.
        Throughput {
            finished_per_s: n1.saturating_sub(*n0) as f64 / dt,
            window_s: dt,
        }
    }
}

/// Gathers the overview from Redis, the store and the last queue poll.
pub async fn build_overview(state: &AppState) -> Result<Overview, ApiError> {
    let store = state.store();
    let recent_q = ListQuery {
        limit: 20,
        ..Default::default()
    };
    let dead_q = ListQuery {
        status: Some(JobStatus::DeadLettered),
        limit: 10,
        ..Default::default()
    };
    let (engines, counts, recent, dead) = tokio::join!(
        state.registry().all_views(),
        store.count_by_status(),
        store.list(&recent_q),
        store.list(&dead_q),
    );
    let engines = engines.map_err(crate::api::redis_error)?;
    let counts = counts?;
    state.throughput().record(&counts);
    let queues = state.queues().snapshot();
    Ok(Overview {
        generated_at_ms: now_ms(),
        engines,
        queues: queues.queues,
        broker_management_up: queues.up,
        broker_connected: state.broker_connected(),
        job_counts: JobStatus::ALL
            .iter()
            .map(|s| (s.as_str().to_string(), counts.get(s).copied().unwrap_or(0)))
            .collect(),
        throughput: state.throughput().rate(),
        recent_jobs: recent?.jobs,
        dead_letters: dead?.jobs,
    })
}

/// Everything the status page shows, in one document.
#[utoipa::path(get, path = "/v1/overview", tag = "status",
    responses((status = 200, body = Overview), (status = 503, body = gpuq_common::http::ErrorBody)))]
pub async fn get_overview(State(state): State<AppState>) -> Result<Json<Overview>, ApiError> {
    Ok(Json(build_overview(&state).await?))
}

/// Server-Sent Events: an `overview` event every ~1.5 s (an `unavailable` event when a
/// dependency fails), with keep-alives; the stream ends when the manager shuts down.
#[utoipa::path(get, path = "/v1/events", tag = "status",
    responses((status = 200, description = "text/event-stream of `overview` events")))]
pub async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stop = state.shutdown_token();
    let ticks = futures_util::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::time::sleep(EVENT_INTERVAL).await;
        }
        let event = match build_overview(&state).await {
            Ok(o) => Event::default()
                .event("overview")
                .json_data(&o)
                .unwrap_or_else(|_| {
                    Event::default()
                        .event("unavailable")
                        .data("encoding failed")
                }),
            Err(e) => Event::default().event("unavailable").data(e.to_string()),
        };
        Some((Ok(event), (state, false)))
    });
    Sse::new(ticks.take_until(stop.cancelled_owned()))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_the_slope_of_finished_counts_over_the_last_minute() {
        let t = ThroughputTracker::default();
        let t0 = Instant::now();
        assert_eq!(t.rate().finished_per_s, 0.0);
        t.record_at(t0, 100);
        t.record_at(t0 + Duration::from_millis(100), 500); // too soon: ignored
        t.record_at(t0 + Duration::from_secs(10), 300);
        let r = t.rate();
        assert!((r.finished_per_s - 20.0).abs() < 1e-9, "{r:?}");
        for i in 1..=20u64 {
            t.record_at(t0 + Duration::from_secs(10 + i * 5), 300 + i * 50);
        }
        let r = t.rate();
        assert!(r.window_s <= 65.0, "{r:?}");
        assert!((r.finished_per_s - 10.0).abs() < 1e-9, "{r:?}");
        t.record_at(t0 + Duration::from_secs(200), 0);
        assert_eq!(t.rate().finished_per_s, 0.0);
    }
}
