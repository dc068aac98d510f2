//! The command line: every subcommand and flag, parsed by clap. Connection flags are global and
//! fall back to `GPUQ_*` variables, then to `.dev/env`, then to the dev stack's defaults
//! (see `config`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use gpuq_common::JobStatus;
pub use gpuq_common::engine::GpuFault;
use uuid::Uuid;

use crate::tester::scenario::Scenario;

const EXIT_CODES: &str = "Exit codes: 0 success; 1 a job failed or a verdict is FAIL; \
2 the command could not be carried out (bad usage, a service unreachable or refusing, a timeout).";

#[derive(Debug, Parser)]
#[command(
    name = "gpuq",
    version,
    about = "Operate a gpuq fleet: submit and watch jobs, engines and GPUs, the fault tester, bench",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the services are. Each flag falls back to its variable, then `.dev/env`, then a default.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnArgs {
    /// Gateway base URL [default: http://127.0.0.1:8080]
    #[arg(long, global = true, env = "GPUQ_GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// Bearer key for the gateway's /v1 API
    #[arg(long, global = true, env = "GPUQ_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Manager base URL [default: http://127.0.0.1:8090]
    #[arg(long, global = true, env = "GPUQ_MANAGER_URL")]
    pub manager_url: Option<String>,
    /// Token for admin endpoints (engine cordon/drain, GPU and worker faults); also reads the manager
    #[arg(long, global = true, env = "GPUQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Read-only token for the manager's reads (engines, overview); the admin token if unset
    #[arg(long, global = true, env = "GPUQ_READ_TOKEN", hide_env_values = true)]
    pub read_token: Option<String>,
    /// Worker admin URLs, comma separated, worker-1 first [default: :9001,:9002,:9003 on loopback]
    #[arg(long, global = true, env = "GPUQ_WORKER_URLS")]
    pub worker_urls: Option<String>,
    /// A CA certificate (PEM) https:// URLs are trusted with, besides the system's roots
    #[arg(long, global = true, env = "GPUQ_TLS_CA_FILE")]
    pub tls_ca_file: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job (prints its id; --wait follows it to a final status)
    Submit(Box<SubmitArgs>),
    /// Follow a job live: a progress bar, its attempts and output lines, its end (resumes by
    /// itself when the connection drops)
    Watch {
        id: Uuid,
        /// Each event as one JSON line
        #[arg(long)]
        json: bool,
        /// Start after this event offset
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Print what a job printed (its output lines); -f follows it until it ends
    Logs {
        id: Uuid,
        #[arg(short, long)]
        follow: bool,
        /// Start after this event offset
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Read, list and cancel jobs
    Jobs {
        #[command(subcommand)]
        cmd: JobsCmd,
    },
    /// List and re-drive dead-lettered jobs
    DeadLetters {
        #[command(subcommand)]
        cmd: DeadLettersCmd,
    },
    /// Show engines and their GPUs, or cordon/uncordon/drain/restart one
    Engines(EnginesArgs),
    /// Inject or clear a simulated GPU fault
    Gpus {
        #[command(subcommand)]
        cmd: GpusCmd,
    },
    /// Measure throughput and latency through the gateway
    Bench(BenchArgs),
    /// Fault scenarios: interactive menu, `run` one scenario, or `chaos`
    Tester(TesterArgs),
    /// Fleet provisioning: derive a worker's credential
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
    },
    /// Show the resolved connection settings and where each came from
    Config {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Print engine ENGINE_ID's GPUQ_WORKER_TOKEN: hex(HMAC-SHA256(GPUQ_WORKER_SECRET, ENGINE_ID))
    WorkerToken {
        /// The worker's GPUQ_WORKER_ID, e.g. worker-1
        engine_id: String,
        /// The manager's fleet secret
        #[arg(long, env = "GPUQ_WORKER_SECRET", hide_env_values = true)]
        worker_secret: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    Simulate,
    Command,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[arg(long, value_enum, default_value = "simulate")]
    pub kind: KindArg,

    /// simulate: run time
    #[arg(long, help_heading = "Simulate")]
    pub duration_ms: Option<u64>,
    /// simulate: progress reports spread over the run
    #[arg(long, help_heading = "Simulate")]
    pub progress_steps: Option<u32>,
    /// simulate: fail the first N attempts
    #[arg(long, help_heading = "Simulate")]
    pub fail_times: Option<u32>,
    /// simulate: chance in [0, 1] that an attempt fails
    #[arg(long, help_heading = "Simulate")]
    pub fail_probability: Option<f64>,
    /// simulate: fail every attempt (a poison job)
    #[arg(long, help_heading = "Simulate")]
    pub always_fail: bool,

    /// command: an allow-listed program name
    #[arg(long, help_heading = "Command")]
    pub program: Option<String>,
    /// command: one argument (repeatable; or put them after `--`)
    #[arg(
        long = "arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        help_heading = "Command"
    )]
    pub args: Vec<String>,
    /// command: an environment variable K=V (repeatable)
    #[arg(long = "env", value_name = "K=V", value_parser = parse_key_value, help_heading = "Command")]
    pub env: Vec<(String, String)>,
    /// command: kill the program after this many seconds
    #[arg(long, help_heading = "Command")]
    pub timeout_s: Option<u64>,
    /// command: arguments after `--`
    #[arg(last = true, value_name = "ARGS")]
    pub trailing: Vec<String>,

    /// Raw params object, instead of the kind's flags
    #[arg(long, value_name = "JSON")]
    pub params: Option<String>,

    /// GPUs the job needs
    #[arg(long)]
    pub gpus: Option<u32>,
    /// Memory each of its GPUs must have
    #[arg(long)]
    pub min_gpu_memory_mb: Option<u64>,
    /// Queue pool (gpuq.jobs.<pool>) [default: the gateway's, `default`]
    #[arg(long)]
    pub pool: Option<String>,
    /// Seconds the job may wait in the queue before it is dead-lettered as expired
    #[arg(long)]
    pub ttl_s: Option<u64>,
    /// The same key returns the same job instead of enqueuing a new one
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A job array: `0-99` (or `100`) makes 100 jobs sharing these params, each with its index
    /// (`GPUQ_ARRAY_INDEX` of a command); prints their ids, the first naming the array
    #[arg(long, value_name = "0-LAST", value_parser = parse_array)]
    pub array: Option<u32>,

    /// Poll the job until it is final and print the outcome
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 60s, 5m)
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub timeout: Duration,
    /// Print JSON: the gateway's answer, or with --wait the final record
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobsCmd {
    /// One job's record
    Get {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Jobs, newest first
    List(ListArgs),
    /// Cancel a job that is not final yet, or with --array every unfinished job of an array
    Cancel {
        id: Uuid,
        /// ID names an array (its first job's id): cancel all of its jobs not final yet
        #[arg(long)]
        array: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// queued, running, succeeded, failed, dead_lettered or cancelled
    #[arg(long, value_parser = parse_status)]
    pub status: Option<JobStatus>,
    #[arg(long)]
    pub pool: Option<String>,
    /// Only the jobs of this array (its first job's id)
    #[arg(long, value_name = "ARRAY_ID")]
    pub array: Option<Uuid>,
    /// Jobs per page (at most 1000)
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Follow the cursor through every page
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCmd {
    /// Dead-lettered jobs with their reasons, newest first
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Put a dead-lettered job back in its queue
    Retry { id: Uuid },
}

#[derive(Debug, Args)]
pub struct EnginesArgs {
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Option<EngineAction>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum EngineAction {
    /// Take no new jobs; running ones go on
    Cordon { id: String },
    /// Take jobs again
    Uncordon { id: String },
    /// Finish running jobs, then take nothing
    Drain { id: String },
    /// Restart the worker process: it finishes its running jobs (within its shutdown grace),
    /// exits, and its supervisor starts it again
    Restart { id: String },
}

#[derive(Debug, Subcommand)]
pub enum GpusCmd {
    /// Give a simulated GPU a fault (overheat, ecc, oom, lost) or clear it
    Fault {
        engine: String,
        gpu: u32,
        #[arg(value_enum)]
        fault: GpuFault,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Jobs to submit
    #[arg(long)]
    pub jobs: u32,
    /// Submissions per second (default: as fast as --concurrency allows)
    #[arg(long)]
    pub rate: Option<f64>,
    /// Run time of each simulate job
    #[arg(long, default_value_t = 0)]
    pub duration_ms: u64,
    /// Requests in flight at once
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Submit this many jobs per request through POST /v1/jobs/batch (1 to 1000) instead of
    /// one per request
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch: Option<u32>,
    #[arg(long)]
    pub pool: Option<String>,
    /// Jobs not final this long after the last submit count as lost
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub timeout: Duration,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TesterArgs {
    #[command(subcommand)]
    pub cmd: Option<TesterCmd>,
    /// Interactive mode: run time of each job
    #[arg(long, default_value_t = 200)]
    pub duration_ms: u64,
    /// Interactive mode: how long to wait for the jobs
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum TesterCmd {
    /// Arm one scenario on one worker, submit jobs, wait, judge
    Run(TesterRunArgs),
    /// Random faults, a RabbitMQ node and Redis stopped and started, while jobs flow
    Chaos(ChaosArgs),
}

#[derive(Debug, Clone, Args)]
pub struct TesterRunArgs {
    /// Worker number: 1 = first of GPUQ_WORKER_URLS (worker-1 on :9001), 2, 3 …
    #[arg(long)]
    pub worker: usize,
    /// normal, error_before_ack, crash_mid_task, duplicate_after_complete, crash_after_complete (or 0-4)
    #[arg(long, value_parser = parse_scenario)]
    pub scenario: Scenario,
    #[arg(long, default_value_t = 100)]
    pub jobs: u32,
    #[arg(long, default_value_t = 200)]
    pub duration_ms: u64,
    /// Jobs on that worker to arm with the fault
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Also let each attempt fail with this chance (the original load test used 0.2)
    #[arg(long)]
    pub fail_probability: Option<f64>,
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub timeout: Duration,
    /// Pause after the last job is final before reading the counters (late duplicates)
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub settle: Duration,
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// How long jobs flow and faults are injected
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub duration: Duration,
    /// Submissions per second
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 100)]
    pub duration_ms: u64,
    /// Script with node-stop/node-start N and redis-stop/redis-start [default: scripts/stack.sh if found]
    #[arg(long, env = "GPUQ_STACK_SCRIPT")]
    pub stack_script: Option<PathBuf>,
    /// Inject worker faults only; leave RabbitMQ and Redis alone
    #[arg(long)]
    pub no_stack: bool,
    /// Seed of the random choices (printed in the verdict, to replay a run)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Jobs not final this long after the last submit count as lost
    #[arg(long, value_parser = parse_duration, default_value = "180s")]
    pub timeout: Duration,
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub settle: Duration,
    #[arg(long)]
    pub json: bool,
}

/// `60s`, `1.5s`, `500ms`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 500ms, 60s, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--array 0-99` or `--array 100`: an array of 100 jobs, indexed from 0.
pub fn parse_array(s: &str) -> Result<u32, String> {
    let max = gpuq_common::job::MAX_ARRAY;
    let n = match s.split_once('-') {
        None => s
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("{s:?} is not a count like 100 or a range like 0-99"))?,
        Some((first, last)) => {
            let (first, last) = (first.trim().parse::<u32>(), last.trim().parse::<u32>());
            match (first, last) {
                (Ok(0), Ok(last)) => last.saturating_add(1),
                (Ok(_), Ok(_)) => return Err("an array's indices start at 0: use 0-LAST".into()),
                _ => return Err(format!("{s:?} is not a range like 0-99")),
            }
        }
    };
    if n == 0 || n > max {
        return Err(format!("an array has 1 to {max} jobs"));
    }
    Ok(n)
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn parse_status(s: &str) -> Result<JobStatus, String> {
    JobStatus::parse(s).ok_or_else(|| {
        let all: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown status {s:?} (one of {})", all.join(", "))
    })
}

fn parse_scenario(s: &str) -> Result<Scenario, String> {
    Scenario::parse(s).ok_or_else(|| {
        format!(
            "unknown scenario {s:?} (0-4 or one of {})",
            Scenario::names().join(", ")
        )
    })
}

#[cfg(test)]
#[path = "cli_tests.rs"]
mod tests;
