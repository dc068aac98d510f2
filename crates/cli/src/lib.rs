//! The gpuq operator CLI: submit and watch jobs, list and steer engines and GPUs, run the fault
//! tester and the bench. The typed clients per service come from `gpuq-client`; one module per
//! command, formatting kept
//! apart from the calls so it can be tested.

pub mod bench;
pub mod cli;
pub mod config;
pub mod engines;
pub mod fleet;
pub mod jobs;
pub mod load;
pub mod output;
pub use gpuq_common::prom;
pub mod stats;
pub mod submit;
pub mod tester;
pub mod wait;
pub mod watch;

use std::process::ExitCode;

use cli::{Cli, Command};
use config::Config;
use gpuq_client::ClientError;
use gpuq_client::Gateway;
use gpuq_client::Manager;
use gpuq_client::Worker;
use gpuq_common::config::Secret;

/// How a command that ran to its end went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0
    Ok,
    /// 1: a job failed, or a verdict is FAIL.
    Failed,
}

/// Connection settings and one shared keep-alive HTTP client.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub cfg: Config,
    pub http: reqwest::Client,
}

impl Ctx {
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            http: gpuq_client::http_client(64),
        }
    }

    pub fn gateway(&self) -> Gateway {
        self.gateway_with(self.http.clone())
    }

    pub fn gateway_with(&self, http: reqwest::Client) -> Gateway {
        Gateway::new(
            http,
            &self.cfg.gateway_url.value,
            self.cfg.api_key.value.clone(),
        )
    }

    pub fn manager(&self) -> Manager {
        Manager::new(
            self.http.clone(),
            &self.cfg.manager_url.value,
            self.cfg.admin_token.value.clone(),
        )
        .with_read_token(self.cfg.read_token.value.clone())
    }

    /// `worker-1`, `worker-2`, … in the order of `GPUQ_WORKER_URLS`.
    pub fn workers(&self) -> Vec<Worker> {
        self.cfg
            .worker_urls
            .value
            .iter()
            .enumerate()
            .map(|(i, url)| {
                Worker::new(
                    format!("worker-{}", i + 1),
                    self.http.clone(),
                    url,
                    self.cfg.admin_token.value.clone(),
                )
            })
            .collect()
    }
}

/// Runs one command line.
pub async fn run(cli: Cli) -> anyhow::Result<Exit> {
    let cfg = Config::load(&cli.conn);
    // Before the first client is built: every https:// URL is trusted with it.
    let ca = cfg.tls_ca_file.value.as_deref().map(std::path::Path::new);
    gpuq_common::tls::set_trust(gpuq_common::tls::Trust::load(ca)?);
    let ctx = Ctx::new(cfg);
    match &cli.command {
        Command::Submit(a) => submit::run(&ctx, a).await,
        Command::Jobs { cmd } => jobs::run(&ctx, cmd).await,
        Command::Watch { id, json, from } => watch::watch(&ctx.gateway(), *id, *from, *json).await,
        Command::Logs { id, follow, from } => {
            watch::logs(&ctx.gateway(), *id, *from, *follow).await
        }
        Command::DeadLetters { cmd } => jobs::run_dead_letters(&ctx, cmd).await,
        Command::Engines(a) => engines::run(&ctx, a).await,
        Command::Gpus { cmd } => engines::run_gpus(&ctx, cmd).await,
        Command::Bench(a) => bench::run(&ctx, a).await,
        Command::Tester(a) => tester::run(&ctx, a).await,
        Command::Admin {
            cmd:
                cli::AdminCmd::WorkerToken {
                    engine_id,
                    worker_secret,
                },
        } => {
            println!("{}", worker_token(engine_id, worker_secret)?);
            Ok(Exit::Ok)
        }
        Command::Config { json } => {
            if *json {
                println!("{}", serde_json::to_string_pretty(&ctx.cfg.to_json())?);
            } else {
                print!("{}", ctx.cfg.render());
            }
            Ok(Exit::Ok)
        }
    }
}

/// `gpuq admin worker-token`: the credential a worker named `engine_id` sends with its
/// heartbeats, derived from the manager's fleet secret.
pub fn worker_token(engine_id: &str, worker_secret: &str) -> anyhow::Result<String> {
    gpuq_common::coord::registry::validate_engine_id(engine_id)
        .map_err(|m| anyhow::anyhow!("{engine_id:?}: {m}"))?;
    let token = gpuq_common::credentials::worker_token(&Secret::new(worker_secret), engine_id)
        .ok_or_else(|| anyhow::anyhow!("GPUQ_WORKER_SECRET is empty"))?;
    Ok(token.expose().to_string())
}

/// Runs and maps the outcome to the process exit code (0 ok, 1 failed, 2 error).
pub async fn main_with(cli: Cli) -> ExitCode {
    match run(cli).await {
        Ok(Exit::Ok) => ExitCode::SUCCESS,
        Ok(Exit::Failed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = e
                .chain()
                .find_map(|c| c.downcast_ref::<ClientError>()?.hint())
            {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(2)
        }
    }
}
