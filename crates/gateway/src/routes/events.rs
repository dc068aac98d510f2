//! `GET /v1/jobs/{id}/events`: a job's event log, live over SSE or a page at a time as JSON.
//! Every SSE event has `id:` = its offset, `event:` = its kind and `data:` = the event as JSON;
//! `Last-Event-ID` (or `?from=`) resumes after an offset, with no gap and no duplicate, because
//! the stream is read from the job store's ordered log, not from memory. The stream ends after
//! the `final` event; a comment every 10 s keeps an idle connection open.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt, stream};
use gpuq_common::coord::bell::FALLBACK;
use gpuq_common::events::{EventKind, EventPage, JobEvent, MAX_EVENTS_PAGE, final_event};
use gpuq_common::http::{ApiError, ErrorBody};
use gpuq_common::job::JobId;
use gpuq_common::store::read_log;
use gpuq_common::tenancy::Principal;
use serde::Deserialize;
use tokio::sync::Notify;
use utoipa::IntoParams;

use super::{ApiQuery, parse_id};
use crate::state::SharedState;

/// Events read from the store at once by a stream.
const READ: u32 = 500;
/// Event streams one gateway serves at once; more get 503.
pub const MAX_STREAMS: usize = 2000;
/// A log without its `final` event this long after the record turned final (a crash between
/// the two writes on a store without transactions) gets one made from the record.
const FINAL_GRACE: Duration = Duration::from_secs(2);

/// Where to start and in which shape.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Resume after this offset (`Last-Event-ID` wins when both are given); 0 = from the start.
    pub from: Option<u64>,
    /// `json` for a page of events instead of a stream (also `Accept: application/json`).
    pub format: Option<String>,
    /// Page size of the JSON shape, 1 to 1000 (default 1000).
    pub limit: Option<u32>,
}

/// A job's events: progress, output, attempts, the final result.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path, description = "Job id (UUID)"), EventParams,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this offset")),
    responses(
        (status = 200, description = "`text/event-stream` (id = offset, event = kind, data = the event), or with `Accept: application/json` / `?format=json` a page", body = EventPage),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn job_events(
    State(state): State<SharedState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(p): ApiQuery<EventParams>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let record = crate::jobs::visible(&state, &who, id).await?;
    let from = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be an event offset".into()))?,
        None => p.from.unwrap_or(0),
    };
    let wants_json = p.format.as_deref() == Some("json")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/json") && !a.contains("text/event-stream"));
    if let Some(f) = p.format.as_deref().filter(|f| *f != "json" && *f != "sse") {
        return Err(ApiError::BadRequest(format!(
            "format: {f:?}; use json or sse"
        )));
    }
    if wants_json {
        let limit = match p.limit {
            None => MAX_EVENTS_PAGE,
            Some(n) if (1..=MAX_EVENTS_PAGE).contains(&n) => n,
            Some(_) => {
                return Err(ApiError::BadRequest(format!(
                    "limit must be 1 to {MAX_EVENTS_PAGE}"
                )));
            }
        };
        let (events, _) = read_log(state.store.as_ref(), &record, from, limit).await?;
        let next_from = events.last().map_or(from, |e| e.offset);
        return Ok(Json(EventPage {
            events,
            next_from,
            status: record.status,
        })
        .into_response());
    }
    let guard = StreamSlot::take(&state).ok_or_else(|| {
        ApiError::Unavailable(format!(
            "this gateway serves {MAX_STREAMS} event streams already; retry shortly"
        ))
    })?;
    Ok(Sse::new(live(state, id, from, guard))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

/// One open stream, counted while it lives.
struct StreamSlot(SharedState);

impl StreamSlot {
    fn take(state: &SharedState) -> Option<Self> {
        let was = state.open_streams.fetch_add(1, Ordering::SeqCst);
        if was >= MAX_STREAMS {
            state.open_streams.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        state.metrics.event_streams_open.inc();
        Some(Self(state.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.event_streams_open.dec();
    }
}

struct Cursor {
    state: SharedState,
    id: JobId,
    offset: u64,
    done: bool,
    /// When the record was first seen final with nothing more in the log.
    final_seen: Option<tokio::time::Instant>,
    /// Rung when a worker appended to the job's log.
    bell: Arc<Notify>,
    _slot: StreamSlot,
}

fn sse(e: &JobEvent) -> Event {
    Event::default()
        .id(e.offset.to_string())
        .event(e.kind.as_str())
        .data(serde_json::to_string(e).expect("event serializes"))
}

/// The log from `from` on, as it grows, until its `final` event.
fn live(
    state: SharedState,
    id: JobId,
    from: u64,
    slot: StreamSlot,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let cursor = Cursor {
        bell: state.bell.waiter(id),
        state,
        id,
        offset: from,
        done: false,
        final_seen: None,
        _slot: slot,
    };
    stream::unfold(cursor, |mut c| async move {
        if c.done {
            return None;
        }
        let batch = next_batch(&mut c).await;
        Some((batch, c))
    })
    .flat_map(|batch| stream::iter(batch.into_iter().map(Ok)))
}

/// The next events, waiting while there are none: for the job's bell, or `FALLBACK` at most.
async fn next_batch(c: &mut Cursor) -> Vec<Event> {
    loop {
        // Listening before reading: a ring between the read and the wait is not lost.
        let bell = c.bell.clone();
        let rung = bell.notified();
        tokio::pin!(rung);
        rung.as_mut().enable();
        match c.state.store.events(c.id, c.offset, READ).await {
            Ok(events) if !events.is_empty() => {
                c.offset = events.last().map_or(c.offset, |e| e.offset);
                c.done = events.last().is_some_and(|e| e.kind == EventKind::Final);
                c.final_seen = None;
                c.state
                    .metrics
                    .job_events_streamed
                    .inc_by(events.len() as u64);
                return events.iter().map(sse).collect();
            }
            Ok(_) => {
                if let Some(end) = end_of_log(c).await {
                    c.done = true;
                    return end;
                }
            }
            Err(e) => tracing::warn!(error.message = %e, "cannot read a job's events; retrying"),
        }
        let _ = tokio::time::timeout(FALLBACK, rung).await;
    }
}

/// With nothing after the cursor: `Some` when the stream is over — the client resumed after
/// the final event (nothing more to send), or the job is final and its log lacks its own final
/// event past `FINAL_GRACE` (one made from the record).
async fn end_of_log(c: &mut Cursor) -> Option<Vec<Event>> {
    let record = c.state.store.get(c.id).await.ok().flatten()?;
    if !record.status.is_final() {
        c.final_seen = None;
        return None;
    }
    let (derived, is_derived) = read_log(c.state.store.as_ref(), &record, c.offset, READ)
        .await
        .ok()?;
    if is_derived {
        c.state
            .metrics
            .job_events_streamed
            .inc_by(derived.len() as u64);
        return Some(derived.iter().map(sse).collect());
    }
    if c.offset > 0 {
        let at = c.state.store.events(c.id, c.offset - 1, 1).await.ok()?;
        if at.first().is_some_and(|e| e.kind == EventKind::Final) {
            return Some(vec![]);
        }
    }
    let seen = *c.final_seen.get_or_insert_with(tokio::time::Instant::now);
    if seen.elapsed() < FINAL_GRACE {
        return None;
    }
    let e = final_event(
        record.status,
        record.error.as_deref(),
        record.finished_at.unwrap_or_default(),
    );
    let made = JobEvent {
        offset: c.offset + 1,
        kind: e.kind,
        at_ms: e.at_ms,
        data: e.data,
    };
    Some(vec![sse(&made)])
}
