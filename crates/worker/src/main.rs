//! `gpuq-worker`: load the configuration, start telemetry, run jobs until Ctrl-C or SIGTERM
//! (or an operator's restart, which exits with `EXIT_RESTART` for the supervisor).

use anyhow::Context as _;
use gpuq_common::config::{WorkerConfig, startup};
use gpuq_worker::Stopped;

fn main() {
    let config: WorkerConfig = startup::start(
        "gpuq-worker",
        "worker",
        "gpuq's worker agent: consumes jobs and runs each on a free healthy GPU.",
    );
    match run(config) {
        // The operator asked for a restart: the supervisor (compose `restart: always`, dev.sh,
        // systemd) starts the process again.
        Ok(Stopped::Restart) => std::process::exit(gpuq_worker::EXIT_RESTART),
        Ok(_) => {}
        Err(e) => startup::exit_on_error("worker", Err(e)),
    }
}

#[tokio::main]
async fn run(config: WorkerConfig) -> anyhow::Result<Stopped> {
    let app = gpuq_worker::Application::build(config)
        .await
        .context("starting the worker")?;
    app.run_until_stopped(gpuq_common::shutdown::shutdown_token())
        .await
}
