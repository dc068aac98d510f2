//! `gpuq watch ID` (a job live: a progress bar, its attempts, its output lines, its end) and
//! `gpuq logs ID [-f]` (what it printed), both from the job's event log; a dropped connection
//! or a restarted gateway is resumed where it stopped (`gpuq_client::events`).

use std::time::Duration;

use gpuq_client::Gateway;
use gpuq_common::JobStatus;
use gpuq_common::events::{EventKind, JobEvent, MAX_EVENTS_PAGE};
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

use crate::Exit;
use crate::submit::exit_for;

/// How one event reads on a terminal (`None`: nothing to print, e.g. progress, shown by the bar).
pub fn describe(e: &JobEvent) -> Option<String> {
    let d = &e.data;
    let text = |k: &str| d[k].as_str().unwrap_or_default().to_string();
    match e.kind {
        EventKind::Attempt => Some(format!(
            "— attempt {} on {}, GPUs {}",
            d["attempt"],
            text("worker"),
            d["gpus"]
        )),
        EventKind::Output if d["stream"] == "stderr" => Some(format!("! {}", text("line"))),
        EventKind::Output => Some(text("line")),
        EventKind::Notice => Some(format!("— {}", text("message"))),
        EventKind::Final => Some(match d["error"].as_str() {
            Some(err) => format!("— {}: {err}", text("status")),
            None => format!("— {}", text("status")),
        }),
        EventKind::Progress => None,
    }
}

/// The status a `final` event names.
fn final_status(e: &JobEvent) -> Option<JobStatus> {
    (e.kind == EventKind::Final)
        .then(|| e.data["status"].as_str().and_then(JobStatus::parse))
        .flatten()
}

fn bar() -> ProgressBar {
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {percent:>3}% {msg}").expect("a valid template"),
    );
    bar
}

/// The progress bar's position and message from a `progress` event.
fn show_progress(bar: &ProgressBar, e: &JobEvent) {
    if let Some(f) = e.data["fraction"].as_f64() {
        bar.set_position((f * 1000.0).round() as u64);
    }
    let mut msg = e.data["message"].as_str().unwrap_or_default().to_string();
    if let Some(metrics) = e.data["metrics"].as_object() {
        for (k, v) in metrics {
            msg.push_str(&format!("  {k}={v}"));
        }
    }
    bar.set_message(msg);
}

/// Follows job `id` to its final event; `json` prints each event as one JSON line instead.
pub async fn watch(gw: &Gateway, id: Uuid, from: u64, json: bool) -> anyhow::Result<Exit> {
    let mut follower = gw.follow(id, from);
    let bar = (!json).then(bar);
    let mut status = None;
    while let Some(e) = follower.next().await? {
        if json {
            println!("{}", serde_json::to_string(&e)?);
        } else if let Some(bar) = &bar {
            if e.kind == EventKind::Progress {
                show_progress(bar, &e);
            } else if let Some(line) = describe(&e) {
                // Lines go to stdout (the bar lives on stderr, hidden when it is no terminal).
                bar.suspend(|| println!("{line}"));
            }
        }
        status = final_status(&e).or(status);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(status.map_or(Exit::Failed, exit_for))
}

/// Prints job `id`'s output lines after `from`: what is logged now, or with `follow`, live until
/// the job ends.
pub async fn logs(gw: &Gateway, id: Uuid, from: u64, follow: bool) -> anyhow::Result<Exit> {
    let print = |e: &JobEvent| {
        if e.kind == EventKind::Output
            && let Some(line) = describe(e)
        {
            println!("{line}");
        }
    };
    if follow {
        let mut follower = gw.follow(id, from);
        while let Some(e) = follower.next().await? {
            print(&e);
        }
        return Ok(Exit::Ok);
    }
    let mut from = from;
    loop {
        let page = gw.events_page(id, from, MAX_EVENTS_PAGE).await?;
        page.events.iter().for_each(print);
        if page.next_from == from || page.events.len() < MAX_EVENTS_PAGE as usize {
            return Ok(Exit::Ok);
        }
        from = page.next_from;
    }
}

/// Waits for job `id`'s final event (how `submit --wait` follows a job); `None` when the
/// gateway has no event log (an older gateway) or `timeout` passed.
pub async fn until_final(gw: &Gateway, id: Uuid, timeout: Duration) -> Option<JobStatus> {
    let mut follower = gw.follow(id, 0);
    let follow = async {
        while let Ok(Some(e)) = follower.next().await {
            if let Some(s) = final_status(&e) {
                return Some(s);
            }
        }
        None
    };
    tokio::time::timeout(timeout, follow).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(kind: EventKind, data: serde_json::Value) -> JobEvent {
        JobEvent {
            offset: 1,
            kind,
            at_ms: 0,
            data,
        }
    }

    #[test]
    fn events_read_as_lines_and_the_final_one_names_the_status() {
        let attempt = ev(
            EventKind::Attempt,
            json!({"attempt": 2, "worker": "worker-3", "gpus": [0, 1]}),
        );
        assert_eq!(
            describe(&attempt).unwrap(),
            "— attempt 2 on worker-3, GPUs [0,1]"
        );
        let err = ev(
            EventKind::Output,
            json!({"stream": "stderr", "line": "oops"}),
        );
        assert_eq!(describe(&err).unwrap(), "! oops");
        let fin = ev(
            EventKind::Final,
            json!({"status": "failed", "error": "exit 3"}),
        );
        assert_eq!(describe(&fin).unwrap(), "— failed: exit 3");
        assert_eq!(final_status(&fin), Some(JobStatus::Failed));
        assert!(describe(&ev(EventKind::Progress, json!({"fraction": 0.5}))).is_none());
    }
}
