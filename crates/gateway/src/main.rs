//! `gpuq-gateway`: load the configuration, start telemetry, serve until Ctrl-C or SIGTERM.

use anyhow::Context as _;
use gpuq_common::config::{GatewayConfig, startup};
use gpuq_common::shutdown::shutdown_signal;
use gpuq_gateway::Application;

#[tokio::main]
async fn main() {
    let config: GatewayConfig = startup::start(
        "gpuq-gateway",
        "gateway",
        "gpuq's REST gateway: accepts jobs, publishes them with confirms, answers their status.",
    );
    startup::exit_on_error("gateway", run(config).await);
}

async fn run(config: GatewayConfig) -> anyhow::Result<()> {
    let app = Application::build(config)
        .await
        .context("starting the gateway")?;
    let stop = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    app.run_until_stopped().await
}
