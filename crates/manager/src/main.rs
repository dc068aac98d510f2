//! `gpuq-manager`: load the configuration, start telemetry, run the manager until Ctrl-C or
//! SIGTERM.

use anyhow::Context as _;
use gpuq_common::config::{ManagerConfig, startup};
use gpuq_common::shutdown::shutdown_signal;
use gpuq_manager::Application;

#[tokio::main]
async fn main() {
    let config: ManagerConfig = startup::start(
        "gpuq-manager",
        "manager",
        "gpuq's manager: engine registry, dead letters, fleet metrics and the status page.",
    );
    startup::exit_on_error("manager", run(config).await);
}

async fn run(config: ManagerConfig) -> anyhow::Result<()> {
    let app = Application::build(config)
        .await
        .context("starting the manager")?;
    let stop = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    app.run_until_stopped().await
}
