//! The `lorahost` binary: parse the command line, set up logging, run, report errors.

use clap::Parser;

fn main() -> std::process::ExitCode {
    lorahost::runtime::default_candle_threads();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LORAHOST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = lorahost::cli::Cli::parse();
    match lorahost::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
