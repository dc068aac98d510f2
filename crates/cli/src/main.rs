//! `gpuq`: the operator CLI. Everything lives in the library; this parses and runs.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    gpuq_cli::main_with(gpuq_cli::cli::Cli::parse()).await
}
