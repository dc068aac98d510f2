//! The engines on real processes: outcomes, output tails, events, stops and the box.

use super::*;

fn ctx(attempt: u32, programs: &[(&str, &str)]) -> (RunContext, watch::Sender<Option<StopReason>>) {
    ctx_with_events(attempt, programs).0
}

#[allow(clippy::type_complexity)]
fn ctx_with_events(
    attempt: u32,
    programs: &[(&str, &str)],
) -> (
    (RunContext, watch::Sender<Option<StopReason>>),
    tokio::sync::mpsc::Receiver<NewEvent>,
) {
    let (tx, rx) = watch::channel(None);
    let (sink, events) = EventSink::channel();
    (
        (
            RunContext {
                job: Uuid::now_v7(),
                attempt,
                gpus: vec![1, 3],
                worker: "w".into(),
                programs: Arc::new(
                    programs
                        .iter()
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .collect(),
                ),
                job_timeout: Duration::from_secs(20),
                progress_timeout: Some(Duration::from_secs(1)),
                output_tail_bytes: 16,
                stop: rx,
                events: sink,
                sandbox: test_sandbox(),
                array: None,
            },
            tx,
        ),
        events,
    )
}

/// The box of a worker without a job user (these tests run as whoever runs them): a
/// private directory per attempt, limits, and a cgroup where the machine lets one be made.
fn test_sandbox() -> Arc<Sandbox> {
    static SANDBOX: std::sync::OnceLock<Arc<Sandbox>> = std::sync::OnceLock::new();
    SANDBOX
        .get_or_init(|| {
            let config = gpuq_common::config::JobSandboxConfig {
                user: String::new(),
                dir: std::env::temp_dir().join("gpuq-runner-tests"),
                max_open_files: 1024,
                max_processes: 0,
                max_file_bytes: 0,
                memory_bytes: 0,
            };
            Arc::new(Sandbox::start(&config, "runner-tests"))
        })
        .clone()
}

fn drain(rx: &mut tokio::sync::mpsc::Receiver<NewEvent>) -> Vec<NewEvent> {
    let mut out = vec![];
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

#[tokio::test]
async fn a_commands_lines_are_output_and_progress_events_in_order() {
    let ((c, _stop), mut rx) = ctx_with_events(1, &[("sh", "/bin/sh")]);
    let script = r#"printf 'one\ntw'; sleep 0.1; printf 'o\n'; echo '##gpuq:progress {"fraction": 0.5, "metrics": {"loss": 0.25}}'; echo err >&2; printf 'no newline'"#;
    let out = run(&sh(script), c).await;
    assert!(matches!(out, RunOutcome::Succeeded(_)), "{out:?}");
    let events = drain(&mut rx);
    let stdout: Vec<(EventKind, String)> = events
        .iter()
        .filter(|e| e.data["stream"] != "stderr")
        .map(|e| {
            (
                e.kind,
                e.data["line"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        stdout,
        vec![
            (EventKind::Output, "one".into()),
            (EventKind::Output, "two".into()),
            (EventKind::Progress, String::new()),
            (EventKind::Output, "no newline".into()),
        ]
    );
    let progress = events
        .iter()
        .find(|e| e.kind == EventKind::Progress)
        .unwrap();
    assert_eq!(progress.data["metrics"]["loss"], 0.25);
    assert!(
        events
            .iter()
            .any(|e| e.data["stream"] == "stderr" && e.data["line"] == "err")
    );
}

#[tokio::test]
async fn a_flood_of_lines_never_blocks_the_job_and_the_excess_is_counted() {
    let ((c, _stop), mut rx) = ctx_with_events(1, &[("sh", "/bin/sh")]);
    let sink = c.events.clone();
    let started = std::time::Instant::now();
    // 20,000 lines at once: far over the burst.
    let out = run(
        &sh("i=0; while [ $i -lt 20000 ]; do echo line $i; i=$((i+1)); done"),
        c,
    )
    .await;
    assert!(matches!(out, RunOutcome::Succeeded(_)), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let kept = drain(&mut rx).len() as u64;
    assert!(kept >= crate::events::BURST as u64, "{kept}");
    assert_eq!(kept + sink.dropped(), 20_000, "every line kept or counted");
    assert!(sink.dropped() > 0);
}

#[tokio::test]
async fn simulate_reports_each_progress_step() {
    let ((c, _stop), mut rx) = ctx_with_events(1, &[]);
    let p = JobPayload::Simulate(SimulateParams {
        duration_ms: 40,
        progress_steps: 4,
        ..Default::default()
    });
    assert!(matches!(run(&p, c).await, RunOutcome::Succeeded(_)));
    let fractions: Vec<f64> = drain(&mut rx)
        .iter()
        .map(|e| e.data["fraction"].as_f64().unwrap())
        .collect();
    assert_eq!(fractions, vec![0.25, 0.5, 0.75, 1.0]);
}

fn sh(script: &str) -> JobPayload {
    JobPayload::Command(CommandParams {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Default::default()
    })
}

#[tokio::test]
async fn a_command_sees_exactly_its_gpus_and_keeps_a_bounded_tail() {
    let (c, _tx) = ctx(1, &[("sh", "/bin/sh")]);
    let out = run(&sh("echo 0123456789abcdef; echo $CUDA_VISIBLE_DEVICES"), c).await;
    let RunOutcome::Succeeded(v) = out else {
        panic!("{out:?}")
    };
    let full = "0123456789abcdef\n1,3\n";
    assert_eq!(v["stdout_tail"], full[full.len() - 16..]);
    assert_eq!(v["stdout_bytes"], full.len());
    assert_eq!(v["exit_code"], 0);
}

#[tokio::test]
async fn exit_codes_are_classified() {
    let (c, _tx) = ctx(1, &[("sh", "/bin/sh")]);
    assert!(matches!(
        run(&sh("exit 3"), c).await,
        RunOutcome::Failed { .. }
    ));
    let (c, _tx) = ctx(1, &[("sh", "/bin/sh")]);
    assert!(matches!(run(&sh("exit 75"), c).await, RunOutcome::Retry(_)));
    let (c, _tx) = ctx(1, &[("sh", "/bin/sh")]);
    assert!(matches!(
        run(&sh("kill -9 $$"), c).await,
        RunOutcome::Retry(_)
    ));
    let (c, _tx) = ctx(1, &[]);
    assert!(matches!(
        run(&sh("true"), c).await,
        RunOutcome::Failed { .. }
    ));
}

#[tokio::test]
async fn a_program_that_cannot_be_executed_fails_at_once_and_a_missing_one_is_retried() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho hello\n").unwrap();
    // No execute bit for anyone: execve refuses it even to root (EACCES).
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = script.to_str().unwrap();
    let job = JobPayload::Command(CommandParams {
        program: "tool".into(),
        ..Default::default()
    });
    let (c, _tx) = ctx(1, &[("tool", path)]);
    match run(&job, c).await {
        RunOutcome::Failed { result, error } => {
            assert!(error.contains("may not execute"), "{error}");
            assert_eq!(result["path"], path);
        }
        other => panic!("not failed at once: {other:?}"),
    }
    // A program that is not there (yet) is another matter: retried.
    let gone = dir.path().join("gone");
    let (c, _tx) = ctx(1, &[("tool", gone.to_str().unwrap())]);
    assert!(matches!(run(&job, c).await, RunOutcome::Retry(_)));
}

#[tokio::test]
async fn a_silent_engine_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    let (c, _tx) = ctx(1, &[("sh", "/bin/sh")]);
    let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
    let out = run(&sh(&script), c).await;
    assert!(
        matches!(&out, RunOutcome::Retry(m) if m.contains("no progress")),
        "{out:?}"
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false);
    assert!(!alive, "the engine's child process {pid} outlived the job");
}

#[tokio::test]
async fn a_stop_request_ends_the_engine() {
    let (c, tx) = ctx(1, &[("sh", "/bin/sh")]);
    let h =
        tokio::spawn(async move { run(&sh("while true; do echo .; sleep 0.1; done"), c).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(Some(StopReason::Cancelled)).unwrap();
    assert_eq!(h.await.unwrap(), RunOutcome::Stopped(StopReason::Cancelled));
}

#[tokio::test]
async fn simulated_failures_follow_the_knobs() {
    let p = |fail_times| {
        JobPayload::Simulate(SimulateParams {
            fail_times,
            ..Default::default()
        })
    };
    let (c, _tx) = ctx(2, &[]);
    assert!(matches!(run(&p(2), c).await, RunOutcome::Retry(_)));
    let (c, _tx) = ctx(3, &[]);
    assert!(matches!(run(&p(2), c).await, RunOutcome::Succeeded(_)));
    let hang = JobPayload::Simulate(SimulateParams {
        hang_attempts: 1,
        ..Default::default()
    });
    let (c, _tx) = ctx(1, &[]);
    assert!(matches!(run(&hang, c).await, RunOutcome::Retry(m) if m.contains("no progress")));
}
