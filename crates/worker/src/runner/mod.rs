//! Engines: what actually runs a job. `simulate` runs in-process; `command` runs an allow-listed
//! program in its own process group on exactly the GPUs it was given (`CUDA_VISIBLE_DEVICES`).
//! Every engine is stopped on timeout, on lost progress, on cancel, or when the worker must stop
//! it, and no process of a job outlives it.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use gpuq_common::job::{
    ARRAY_ID_ENV, ARRAY_INDEX_ENV, ArrayMember, CommandParams, JobPayload, SimulateParams, now_ms,
};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::{Mutex, watch};
use uuid::Uuid;

use crate::events::EventSink;
use crate::sandbox::{JobBox, Sandbox};
use gpuq_common::events::{EventKind, MAX_LINE_BYTES, NewEvent, from_line};

/// Why the worker stops a running engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    Shutdown,
    GpuUnhealthy,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    Succeeded(Value),
    /// The job ran and failed for good (e.g. a non-zero exit code); recorded as `failed`.
    Failed {
        result: Value,
        error: String,
    },
    /// The attempt failed in a way worth retrying (error, timeout, hang, signal).
    Retry(String),
    Stopped(StopReason),
}

pub struct RunContext {
    pub job: Uuid,
    pub attempt: u32,
    pub gpus: Vec<u32>,
    pub worker: String,
    pub programs: Arc<BTreeMap<String, String>>,
    /// The box `command` jobs run in.
    pub sandbox: Arc<Sandbox>,
    /// The job's place in its array, if it is one's member (`GPUQ_ARRAY_ID`, `GPUQ_ARRAY_INDEX`).
    pub array: Option<ArrayMember>,
    pub job_timeout: Duration,
    /// Kill an engine silent for this long (None = never).
    pub progress_timeout: Option<Duration>,
    pub output_tail_bytes: usize,
    pub stop: watch::Receiver<Option<StopReason>>,
    /// Where the engine's progress and output lines go (the job's event log).
    pub events: EventSink,
}

pub async fn run(payload: &JobPayload, ctx: RunContext) -> RunOutcome {
    match payload {
        JobPayload::Simulate(p) => simulate(p, ctx).await,
        JobPayload::Command(p) => command(p, ctx).await,
    }
}

async fn stopped(stop: &mut watch::Receiver<Option<StopReason>>) -> StopReason {
    loop {
        if let Some(r) = *stop.borrow_and_update() {
            return r;
        }
        if stop.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// A random number in [0, 1) from the OS-seeded UUID generator.
pub fn random_unit() -> f64 {
    (Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

async fn simulate(p: &SimulateParams, mut ctx: RunContext) -> RunOutcome {
    if ctx.attempt <= p.hang_attempts {
        let silent = ctx
            .progress_timeout
            .unwrap_or(ctx.job_timeout)
            .min(ctx.job_timeout);
        return tokio::select! {
            r = stopped(&mut ctx.stop) => RunOutcome::Stopped(r),
            _ = tokio::time::sleep(silent) => RunOutcome::Retry(format!(
                "engine made no progress for {}s and was stopped", silent.as_secs()
            )),
        };
    }
    let steps = p.progress_steps.max(1);
    let step = Duration::from_millis(p.duration_ms) / steps;
    let deadline = tokio::time::Instant::now() + ctx.job_timeout;
    for i in 1..=steps {
        if !step.is_zero() {
            tokio::select! {
                r = stopped(&mut ctx.stop) => return RunOutcome::Stopped(r),
                _ = tokio::time::sleep_until(deadline) => {
                    return RunOutcome::Retry(format!("timed out after {}s", ctx.job_timeout.as_secs()));
                }
                _ = tokio::time::sleep(step) => {}
            }
        }
        if p.progress_steps > 0 {
            ctx.events.push(NewEvent {
                kind: EventKind::Progress,
                at_ms: now_ms(),
                data: json!({
                    "fraction": f64::from(i) / f64::from(steps),
                    "message": format!("step {i}/{steps}"),
                }),
            });
        }
    }
    let fail = p.always_fail
        || ctx.attempt <= p.fail_times
        || (p.fail_probability > 0.0 && random_unit() < p.fail_probability);
    if fail {
        return RunOutcome::Retry(format!("simulated failure on attempt {}", ctx.attempt));
    }
    RunOutcome::Succeeded(json!({
        "duration_ms": p.duration_ms,
        "steps": steps,
        "attempt": ctx.attempt,
        "worker": ctx.worker,
        "gpus": ctx.gpus,
    }))
}

/// The last `cap` bytes written to a stream.
struct Tail {
    cap: usize,
    buf: Vec<u8>,
    total: u64,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
        }
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

/// Splits a stream into lines, each an event of the job's log; a line longer than
/// `MAX_LINE_BYTES` is cut there (the rest is its own line), so memory stays bounded.
struct Lines {
    stream: &'static str,
    partial: Vec<u8>,
    sink: EventSink,
}

impl Lines {
    fn push(&mut self, mut chunk: &[u8]) {
        while let Some(i) = chunk.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&chunk[..i]);
            self.emit();
            chunk = &chunk[i + 1..];
        }
        self.partial.extend_from_slice(chunk);
        if self.partial.len() > MAX_LINE_BYTES {
            self.emit();
        }
    }

    fn emit(&mut self) {
        let line = String::from_utf8_lossy(&self.partial);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        self.sink.push(from_line(self.stream, line, now_ms()));
        self.partial.clear();
    }

    fn end(&mut self) {
        if !self.partial.is_empty() {
            self.emit();
        }
    }
}

fn spawn_reader<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    mut r: R,
    tail: Arc<Mutex<Tail>>,
    last_output: Arc<AtomicI64>,
    mut lines: Lines,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    last_output.store(now_ms(), Ordering::Relaxed);
                    tail.lock().await.push(&buf[..n]);
                    lines.push(&buf[..n]);
                }
            }
        }
        lines.end();
    })
}

/// Exit code that asks for a retry (BSD `EX_TEMPFAIL`).
pub const EXIT_RETRY: i32 = 75;

/// Readers of the engine's stdout and stderr: each keeps its tail for the result and turns
/// its lines into events.
#[allow(clippy::type_complexity)]
fn spawn_readers(
    child: &mut tokio::process::Child,
    ctx: &RunContext,
    last_output: &Arc<AtomicI64>,
) -> (
    [tokio::task::JoinHandle<()>; 2],
    Arc<Mutex<Tail>>,
    Arc<Mutex<Tail>>,
) {
    let new_tail = || {
        Arc::new(Mutex::new(Tail {
            cap: ctx.output_tail_bytes,
            buf: Vec::new(),
            total: 0,
        }))
    };
    let (out_tail, err_tail) = (new_tail(), new_tail());
    let lines = |stream| Lines {
        stream,
        partial: Vec::new(),
        sink: ctx.events.clone(),
    };
    let readers = [
        spawn_reader(
            child.stdout.take().expect("piped"),
            out_tail.clone(),
            last_output.clone(),
            lines("stdout"),
        ),
        spawn_reader(
            child.stderr.take().expect("piped"),
            err_tail.clone(),
            last_output.clone(),
            lines("stderr"),
        ),
    ];
    (readers, out_tail, err_tail)
}

/// A program that could not be started. EACCES (the job user may not execute it, or search a
/// directory on its path) fails the job at once: every attempt, on any worker, would meet the
/// same file. Anything else may pass (a busy machine, a program being replaced): retried.
fn spawn_failed(p: &CommandParams, path: &str, e: &std::io::Error) -> RunOutcome {
    if e.raw_os_error() == Some(nix::errno::Errno::EACCES as i32) {
        return RunOutcome::Failed {
            result: json!({"program": p.program, "path": path}),
            error: format!("cannot start {path}: the job user may not execute it ({e})"),
        };
    }
    RunOutcome::Retry(format!("cannot start {path}: {e}"))
}

async fn command(p: &CommandParams, mut ctx: RunContext) -> RunOutcome {
    let Some(path) = ctx.programs.get(&p.program) else {
        return RunOutcome::Failed {
            result: json!({"program": p.program}),
            error: format!(
                "program {:?} is not allowed on worker {}",
                p.program, ctx.worker
            ),
        };
    };
    let devices = ctx
        .gpus
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let jail = match ctx.sandbox.enter(ctx.job, ctx.attempt) {
        Ok(b) => b,
        Err(e) => {
            return RunOutcome::Failed {
                result: json!({"program": p.program, "sandbox": ctx.sandbox.describe()}),
                error: format!("worker {} cannot run command jobs: {e}", ctx.worker),
            };
        }
    };
    let mut cmd = engine_command(path, p, &ctx, &devices, &jail);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            jail.close(0).await;
            return spawn_failed(p, path, &e);
        }
    };
    let pgid = child.id().unwrap_or_default();
    let last_output = Arc::new(AtomicI64::new(now_ms()));
    let (readers, out_tail, err_tail) = spawn_readers(&mut child, &ctx, &last_output);
    let timeout = p
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(ctx.job_timeout)
        .min(ctx.job_timeout);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut watchdog = tokio::time::interval(Duration::from_millis(250));
    let status = loop {
        tokio::select! {
            s = child.wait() => break Ok(s),
            r = stopped(&mut ctx.stop) => break Err(RunOutcome::Stopped(r)),
            _ = tokio::time::sleep_until(deadline) => {
                break Err(RunOutcome::Retry(format!("timed out after {}s; engine killed", timeout.as_secs())));
            }
            _ = watchdog.tick() => {
                if let Some(limit) = ctx.progress_timeout {
                    let silent = now_ms() - last_output.load(Ordering::Relaxed);
                    if silent >= limit.as_millis() as i64 {
                        break Err(RunOutcome::Retry(format!(
                            "engine made no progress for {}s; killed", limit.as_secs()
                        )));
                    }
                }
            }
        }
    };
    // Whatever happened, nothing of this job survives it: its cgroup (or process group) goes.
    jail.kill_all(pgid);
    let status = match status {
        Ok(s) => s,
        Err(outcome) => {
            let _ = child.wait().await;
            for r in readers {
                r.abort();
            }
            jail.close(pgid).await;
            return outcome;
        }
    };
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
    }
    let result = json!({
        "exit_code": status.as_ref().ok().and_then(|s| s.code()),
        "stdout_tail": out_tail.lock().await.text(),
        "stderr_tail": err_tail.lock().await.text(),
        "stdout_bytes": out_tail.lock().await.total,
        "stderr_bytes": err_tail.lock().await.total,
        "gpus": ctx.gpus,
        "cuda_visible_devices": devices,
    });
    jail.close(pgid).await;
    exit_outcome(&p.program, status, result)
}

/// The engine's process: the allow-listed program with its arguments, no shell, in the job's
/// box (`sandbox`: user, directory, limits, cgroup, the environment's base), with the job's own
/// variables (the refused names skipped, should a message carry one) and its GPUs, in its own
/// process group.
fn engine_command(
    path: &str,
    p: &CommandParams,
    ctx: &RunContext,
    devices: &str,
    jail: &JobBox,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(path);
    jail.apply(&mut cmd);
    cmd.args(&p.args)
        .envs(
            p.env
                .iter()
                .filter(|(k, _)| gpuq_common::job_env::refusal(k).is_none()),
        )
        .env("CUDA_VISIBLE_DEVICES", devices)
        .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        .env("GPUQ_JOB_ID", ctx.job.to_string())
        .env("GPUQ_ATTEMPT", ctx.attempt.to_string());
    if let Some(a) = ctx.array {
        cmd.env(ARRAY_ID_ENV, a.id.to_string())
            .env(ARRAY_INDEX_ENV, a.index.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// What the engine's exit means for the job.
fn exit_outcome(
    program: &str,
    status: std::io::Result<std::process::ExitStatus>,
    result: serde_json::Value,
) -> RunOutcome {
    let status = match status {
        Ok(s) => s,
        Err(e) => return RunOutcome::Retry(format!("waiting for the engine failed: {e}")),
    };
    match status.code() {
        Some(0) => RunOutcome::Succeeded(result),
        Some(EXIT_RETRY) => RunOutcome::Retry(format!("{} exited {EXIT_RETRY} (retry)", program)),
        Some(code) => RunOutcome::Failed {
            result,
            error: format!("{} exited with code {code}", program),
        },
        None => {
            use std::os::unix::process::ExitStatusExt;
            RunOutcome::Retry(format!(
                "{} was killed by signal {}",
                program,
                status.signal().unwrap_or_default()
            ))
        }
    }
}

#[cfg(test)]
mod tests;
