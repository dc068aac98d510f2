//! `gpuq-gateway`: load the configuration, start telemetry, serve until Ctrl-C or SIGTERM.

use anyhow::Context as _;
use clap::Parser;
use gpuq_common::Settings;
use gpuq_common::shutdown::shutdown_signal;
use gpuq_common::telemetry::init_telemetry;
use gpuq_gateway::Application;

/// gpuq's REST gateway. Every setting is a GPUQ_* environment variable (see the README).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML file of settings, under the GPUQ_* environment variables.
    #[arg(long, env = "GPUQ_CONFIG")]
    config: Option<String>,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let mut env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    if let Some(path) = cli.config {
        env.insert("GPUQ_CONFIG".into(), path);
    }
    let settings = match Settings::from_sources(&env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gpuq-gateway: configuration: {e}");
            std::process::exit(2);
        }
    };
    // lapin logs every returned (unroutable) message with its body at WARN; the gateway answers
    // those with a 422 and logs them itself, once.
    let filter = format!("{},lapin::returned_messages=error", settings.log);
    init_telemetry("gateway", &settings.log_format, &filter);
    for key in Settings::unknown_env_keys(env.keys()) {
        tracing::warn!(%key, "unknown GPUQ_ variable ignored (a typo?)");
    }
    if let Err(e) = run(settings).await {
        tracing::error!(error.cause_chain = ?e, error.message = %e, "gateway failed");
        std::process::exit(1);
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(settings)
        .await
        .context("starting the gateway")?;
    let stop = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    app.run_until_stopped().await
}
