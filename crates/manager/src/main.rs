//! `gpuq-manager`: loads the configuration, starts telemetry, and runs the manager until
//! SIGTERM or Ctrl-C.

use std::collections::BTreeMap;

use anyhow::Context as _;
use clap::Parser;
use gpuq_common::Settings;
use gpuq_common::telemetry::init_telemetry;
use gpuq_manager::Application;

/// Engine registry, dead letters, fleet metrics and the status page of gpuq. Every setting is
/// read from `GPUQ_*` environment variables over the config file over defaults.
#[derive(Debug, Parser)]
#[command(name = "gpuq-manager", version)]
struct Cli {
    /// A TOML config file (same keys as the GPUQ_* variables, lower case).
    #[arg(long, env = "GPUQ_CONFIG")]
    config: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut env: BTreeMap<String, String> = std::env::vars().collect();
    if let Some(path) = cli.config {
        env.insert("GPUQ_CONFIG".into(), path);
    }
    let settings = Settings::from_sources(&env).context("loading the configuration")?;
    init_telemetry("manager", &settings.log_format, &settings.log);
    for key in Settings::unknown_env_keys(env.keys()) {
        tracing::warn!(variable = %key, "unknown GPUQ_ variable ignored");
    }
    let app = Application::build(settings).await?;
    let token = app.shutdown_token();
    tokio::spawn(async move {
        gpuq_common::shutdown::shutdown_signal().await;
        token.cancel();
    });
    app.run_until_stopped().await
}
