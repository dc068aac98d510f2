use anyhow::Context;
use gpuq_common::Settings;
use gpuq_common::telemetry::init_telemetry;
use gpuq_worker::Stopped;

fn main() -> anyhow::Result<()> {
    let stopped = run()?;
    if stopped == Stopped::Restart {
        // The operator asked for a restart: the supervisor (compose `restart: always`, dev.sh,
        // systemd) starts the process again.
        std::process::exit(gpuq_worker::EXIT_RESTART);
    }
    Ok(())
}

#[tokio::main]
async fn run() -> anyhow::Result<Stopped> {
    let settings = Settings::load().context("loading configuration")?;
    init_telemetry("worker", &settings.log_format, &settings.log);
    let app = gpuq_worker::Application::build(settings)
        .await
        .context("starting the worker")?;
    app.run_until_stopped(gpuq_common::shutdown::shutdown_token())
        .await
}
