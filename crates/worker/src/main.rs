use anyhow::Context;
use gpuq_common::Settings;
use gpuq_common::telemetry::init_telemetry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().context("loading configuration")?;
    init_telemetry("worker", &settings.log_format, &settings.log);
    let app = gpuq_worker::Application::build(settings)
        .await
        .context("starting the worker")?;
    app.run_until_stopped(gpuq_common::shutdown::shutdown_token())
        .await
}
