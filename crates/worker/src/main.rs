use anyhow::Context;
use gpuq_common::Settings;
use gpuq_common::telemetry::init_telemetry;
use gpuq_worker::Stopped;

/// A worker's own work per job is a handful of small round trips (broker, Redis, store); the
/// jobs themselves run in child processes or timers. One scheduler thread serves that without
/// waking a second thread for every delivery, which on a busy 2-core host cost a third of the
/// worker's CPU (measured with `gpuq bench`: README, Performance). Blocking calls (NVML, store
/// reads) have their own threads either way. `TOKIO_WORKER_THREADS` overrides.
fn main() -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        rt.worker_threads(1);
    }
    let stopped = rt
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run())?;
    if stopped == Stopped::Restart {
        // The operator asked for a restart: the supervisor (compose `restart: always`, dev.sh,
        // systemd) starts the process again.
        std::process::exit(gpuq_worker::EXIT_RESTART);
    }
    Ok(())
}

async fn run() -> anyhow::Result<Stopped> {
    let settings = Settings::load().context("loading configuration")?;
    init_telemetry("worker", &settings.log_format, &settings.log);
    let app = gpuq_worker::Application::build(settings)
        .await
        .context("starting the worker")?;
    app.run_until_stopped(gpuq_common::shutdown::shutdown_token())
        .await
}
