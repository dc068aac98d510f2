//! How every service's `main` starts: `--help` and `--version`, `--config FILE` (or
//! `GPUQ_CONFIG`), the settings loaded and parsed into the service's typed section (a bad value
//! prints the variable's name and exits with `EXIT_BAD_CONFIG`), the TLS trust (`tls::set_trust`),
//! telemetry, and a warning per unknown `GPUQ_*` variable (likely a typo).

use std::collections::BTreeMap;

use clap::{Arg, Command};

use super::{ConfigError, ServiceConfig, Settings};
use crate::telemetry::init_telemetry;

/// Exit code of a service whose configuration is refused (as with a usage error).
pub const EXIT_BAD_CONFIG: i32 = 2;
/// Exit code of a service that failed after it started.
pub const EXIT_FAILED: i32 = 1;

/// Loads a service's section from an explicit environment: the settings' layering (defaults,
/// the `GPUQ_CONFIG` file, `GPUQ_*` variables), then the section's own parsing.
pub fn load<C: ServiceConfig>(env: &BTreeMap<String, String>) -> Result<C, ConfigError> {
    C::from_settings(&Settings::from_sources(env)?)
}

/// Parses the command line, loads the section, starts telemetry. Exits on `--help`,
/// `--version` (0) and on a configuration it refuses (`EXIT_BAD_CONFIG`).
pub fn start<C: ServiceConfig>(
    binary: &'static str,
    service: &'static str,
    about: &'static str,
) -> C {
    let args = Command::new(binary)
        .version(env!("CARGO_PKG_VERSION"))
        .about(about)
        .after_help(
            "Every setting is a GPUQ_* environment variable, over the TOML file, over the \
             defaults (see the README's configuration table).",
        )
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .env("GPUQ_CONFIG")
                .help("A TOML file of settings (the GPUQ_* names, lower case, without GPUQ_)"),
        )
        .get_matches();
    let mut env: BTreeMap<String, String> = std::env::vars().collect();
    if let Some(path) = args.get_one::<String>("config") {
        env.insert("GPUQ_CONFIG".into(), path.clone());
    }
    let config: C = match load(&env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{binary}: configuration: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    let common = config.common();
    // The CA outgoing TLS connections trust, before any connection is made.
    match crate::tls::Trust::load(common.tls.ca_file.as_deref()) {
        Ok(trust) => {
            crate::tls::set_trust(trust);
        }
        Err(e) => {
            eprintln!("{binary}: configuration: tls_ca_file: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    }
    // lapin logs every returned (unroutable) message with its body at WARN; the services log
    // those themselves, once.
    let filter = format!("{},lapin::returned_messages=error", common.log_filter);
    init_telemetry(service, common.log_format.as_str(), &filter);
    for key in Settings::unknown_env_keys(env.keys()) {
        tracing::warn!(%key, "unknown GPUQ_ variable ignored (a typo?)");
    }
    config
}

/// Logs a failure after start and exits with `EXIT_FAILED`; returns on success.
pub fn exit_on_error(service: &str, result: anyhow::Result<()>) {
    if let Err(e) = result {
        tracing::error!(error.cause_chain = ?e, error.message = %e, "{service} failed");
        std::process::exit(EXIT_FAILED);
    }
}
