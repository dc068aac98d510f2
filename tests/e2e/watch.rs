//! `gpuq watch` and `gpuq logs` on the real stack: every event of a running job once, in order,
//! to its end; the lines it printed; and `submit --wait` following a job's events to its result.

use gpuq_e2e::{Stack, StackOptions};
use serde_json::{Value, json};

fn script_job() -> Value {
    let script = r###"for i in 1 2 3 4 5; do echo "##gpuq:progress {\"fraction\": 0.$((i*2)), \"message\": \"step $i\"}"; echo "line $i"; echo "warn $i" >&2; sleep 0.2; done"###;
    json!({"kind": "command", "params": {"program": "sh", "args": ["-c", script]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gpuq_watch_shows_every_event_once_in_order_and_gpuq_logs_prints_the_lines() {
    let stack = Stack::start_healthy(StackOptions::default()).await;
    let id = stack.submit_ok(&script_job()).await.unwrap();
    let id_s = id.to_string();
    // Started while the job runs: it follows it live to its end.
    let stdout = stack.cli_ok(&["watch", &id_s, "--json"]).await;
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let offsets: Vec<u64> = events
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(offsets, want, "every event once, in order: {stdout}");
    assert_eq!(events[0]["kind"], "attempt");
    let last = events.last().unwrap();
    assert_eq!(
        (last["kind"].as_str(), last["data"]["status"].as_str()),
        (Some("final"), Some("succeeded"))
    );
    let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!((count("progress"), count("output")), (5, 10), "{stdout}");

    // The human view prints the lines, stderr marked, and the end.
    let human = stack.cli_ok(&["watch", &id_s]).await;
    for want in [
        "— attempt 1 on worker-",
        "line 3",
        "! warn 3",
        "— succeeded",
    ] {
        assert!(human.contains(want), "{want:?} missing from: {human}");
    }
    // Resumed after an offset: only what came after.
    let tail = stack
        .cli_ok(&["watch", &id_s, "--json", "--from", "10"])
        .await;
    assert_eq!(tail.lines().count(), events.len() - 10);

    // Each stream's lines in their order (stdout and stderr are read apart: they interleave).
    let logs = stack.cli_ok(&["logs", &id_s]).await;
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 10, "{logs}");
    let of = |prefix: &str| -> Vec<&str> {
        lines
            .iter()
            .copied()
            .filter(|l| l.starts_with(prefix))
            .collect()
    };
    assert_eq!(
        of("line "),
        ["line 1", "line 2", "line 3", "line 4", "line 5"]
    );
    assert_eq!(
        of("! warn "),
        ["! warn 1", "! warn 2", "! warn 3", "! warn 4", "! warn 5"]
    );
    let followed = stack.cli_ok(&["logs", &id_s, "-f"]).await;
    assert_eq!(
        followed, logs,
        "-f of a finished job prints the same and ends"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gpuq_submit_wait_follows_the_events_to_the_final_status_and_result() {
    let stack = Stack::start_healthy(StackOptions::default()).await;
    let script = r###"for i in 1 2 3; do echo "tick $i"; sleep 0.2; done"###;
    let out = stack
        .cli_ok(&[
            "submit",
            "--kind",
            "command",
            "--program",
            "sh",
            "--arg",
            "-c",
            "--arg",
            script,
            "--wait",
        ])
        .await;
    assert!(out.contains("status:    succeeded"), "{out}");
    assert!(out.contains("tick 3"), "the result's output tail: {out}");
    stack.stop().await;
}
