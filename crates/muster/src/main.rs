//! The `muster` binary: parse flags, set up logging, run, exit with the right code.

use clap::Parser;
use muster_cli::cli::{Cli, Command};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Daemon(_));
    let default_level = if daemon { "info,raft=warn" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MUSTER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match muster::execute(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
