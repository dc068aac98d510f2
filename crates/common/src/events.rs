//! A job's event log: what a client watching the job sees, in order, each event under an offset
//! that increases strictly per job (across attempts and workers). Kept in the job store next to
//! the job (`JobStore::append_events`, `JobStore::events`), so it is as durable as the result and
//! goes when the job goes.
//!
//! Kinds: `attempt` (an attempt started: worker, GPUs), `progress` (fraction, message, metrics),
//! `output` (a line of stdout or stderr), `notice` (lines dropped over the per-job bounds), and
//! `final` (the job's final status; nothing follows it unless the job is re-driven).
//!
//! A `command` job reports progress by printing a line that starts with [`PROGRESS_MARKER`],
//! followed by JSON: `##gpuq:progress {"fraction": 0.5, "message": "epoch 3", "metrics":
//! {"loss": 0.12}}`. Every other line is an `output` event.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::job::{JobRecord, JobStatus};

/// The prefix of a progress line on a `command` job's stdout.
pub const PROGRESS_MARKER: &str = "##gpuq:progress ";
/// Longest line kept in an `output` event; the rest is cut (and said so).
pub const MAX_LINE_BYTES: usize = 4096;
/// Longest page of `GET /v1/jobs/{id}/events?format=json`.
pub const MAX_EVENTS_PAGE: u32 = 1000;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Attempt,
    Progress,
    Output,
    Notice,
    Final,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Attempt => "attempt",
            EventKind::Progress => "progress",
            EventKind::Output => "output",
            EventKind::Notice => "notice",
            EventKind::Final => "final",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            EventKind::Attempt,
            EventKind::Progress,
            EventKind::Output,
            EventKind::Notice,
            EventKind::Final,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// An event before the store gave it its offset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub kind: EventKind,
    pub at_ms: i64,
    pub data: Value,
}

/// An event of a job's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    /// Strictly increasing per job, from 1; `Last-Event-ID` / `?from=` resume after it.
    pub offset: u64,
    pub kind: EventKind,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// `attempt`: `{attempt, worker, gpus}`; `progress`: `{fraction, message, metrics}`;
    /// `output`: `{stream, line}`; `notice`: `{message, dropped}`; `final`: `{status, error}`.
    #[schema(value_type = Object)]
    pub data: Value,
}

/// A page of a job's events (`GET /v1/jobs/{id}/events?format=json`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<JobEvent>,
    /// Pass as `from` for the next page.
    pub next_from: u64,
    /// The job's status now: once it is final and `events` ends with the `final` event, the log
    /// is complete.
    pub status: JobStatus,
}

/// A job's latest progress, as its record carries it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// 0 to 1, when the job says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

impl Progress {
    /// Reads a progress line's JSON; `None` when it is not a progress object. Non-numeric
    /// metrics and a fraction outside 0..=1 are refused rather than stored wrong.
    pub fn parse(json: &str) -> Option<Self> {
        let p: Progress = serde_json::from_str(json).ok()?;
        if let Some(f) = p.fraction
            && !(0.0..=1.0).contains(&f)
        {
            return None;
        }
        if p.metrics.values().any(|v| !v.is_finite()) {
            return None;
        }
        Some(p)
    }
}

/// `output` or `progress`, from one line a `command` job printed on `stream`.
pub fn from_line(stream: &str, line: &str, at_ms: i64) -> NewEvent {
    if stream == "stdout"
        && let Some(rest) = line.strip_prefix(PROGRESS_MARKER)
        && let Some(p) = Progress::parse(rest)
    {
        return NewEvent {
            kind: EventKind::Progress,
            at_ms,
            data: serde_json::to_value(p).expect("progress serializes"),
        };
    }
    let cut = line.len() > MAX_LINE_BYTES;
    let line = if cut {
        let mut end = MAX_LINE_BYTES;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        &line[..end]
    } else {
        line
    };
    let mut data = serde_json::json!({"stream": stream, "line": line});
    if cut {
        data["truncated"] = Value::Bool(true);
    }
    NewEvent {
        kind: EventKind::Output,
        at_ms,
        data,
    }
}

/// The `final` event of a job that ended with `status`.
pub fn final_event(status: JobStatus, error: Option<&str>, at_ms: i64) -> NewEvent {
    NewEvent {
        kind: EventKind::Final,
        at_ms,
        data: serde_json::json!({"status": status.as_str(), "error": error}),
    }
}

/// Whether a final outcome's events are only its attempt's start (a job that printed nothing
/// and reported no progress).
pub fn is_quiet_attempt(events: &[NewEvent]) -> bool {
    matches!(events, [e] if e.kind == EventKind::Attempt)
}

/// The log of a final job whose log is empty (a single quiet attempt; see the stores' final
/// write): its attempt's start and its final event, at offsets 1 and 2, from its record. A job
/// that never ran has only the final event, at offset 1.
pub fn derived_log(r: &JobRecord) -> Vec<JobEvent> {
    let mut made = vec![];
    if let (Some(worker), Some(started)) = (&r.worker, r.started_at)
        && r.attempts > 0
    {
        made.push(attempt_event(r.attempts, worker, &r.gpus, started));
    }
    made.push(final_event(
        r.status,
        r.error.as_deref(),
        r.finished_at.unwrap_or(r.created_at),
    ));
    made.into_iter()
        .enumerate()
        .map(|(i, e)| JobEvent {
            offset: i as u64 + 1,
            kind: e.kind,
            at_ms: e.at_ms,
            data: e.data,
        })
        .collect()
}

/// The `attempt` event of an attempt that started.
pub fn attempt_event(attempt: u32, worker: &str, gpus: &[u32], at_ms: i64) -> NewEvent {
    NewEvent {
        kind: EventKind::Attempt,
        at_ms,
        data: serde_json::json!({"attempt": attempt, "worker": worker, "gpus": gpus}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_stdout_line_is_progress_every_other_line_is_output() {
        let e = from_line(
            "stdout",
            r#"##gpuq:progress {"fraction": 0.5, "message": "epoch 3", "metrics": {"loss": 0.12}}"#,
            7,
        );
        assert_eq!(e.kind, EventKind::Progress);
        assert_eq!(e.data["fraction"], 0.5);
        assert_eq!(e.data["metrics"]["loss"], 0.12);
        for (stream, line) in [
            ("stdout", "epoch 3 done"),
            ("stderr", r#"##gpuq:progress {"fraction": 0.5}"#),
            ("stdout", r#"##gpuq:progress {"fraction": 1.5}"#),
            ("stdout", r#"##gpuq:progress {"metrics": {"loss": "low"}}"#),
            ("stdout", "##gpuq:progress not json"),
        ] {
            let e = from_line(stream, line, 7);
            assert_eq!(e.kind, EventKind::Output, "{line}");
            assert_eq!(e.data["line"], line);
            assert_eq!(e.data["stream"], stream);
        }
    }

    #[test]
    fn a_long_line_is_cut_on_a_character_boundary() {
        let line = "é".repeat(MAX_LINE_BYTES);
        let e = from_line("stdout", &line, 0);
        let kept = e.data["line"].as_str().unwrap();
        assert!(kept.len() <= MAX_LINE_BYTES && kept.len() >= MAX_LINE_BYTES - 1);
        assert_eq!(e.data["truncated"], true);
        for k in ["attempt", "progress", "output", "notice", "final"] {
            assert_eq!(EventKind::parse(k).unwrap().as_str(), k);
        }
    }
}
