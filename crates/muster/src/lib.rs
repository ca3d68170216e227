//! # muster: the one binary
//!
//! `muster server`, `muster agent` and `muster dev` run the daemons: each is a library
//! call into muster-server or muster-agent with a listener, a data directory and a
//! shutdown future (`server.rs`, `agent.rs`, `dev.rs`); `main.rs` only parses flags, sets
//! up logging and exits with the right code. Every other subcommand is a client command of
//! muster-cli, which depends on neither daemon (a test checks it: `tests/layering.rs`).
//! The flags of all subcommands are defined in one place, muster-cli's `cli.rs`.

pub mod agent;
pub mod dev;
pub mod server;

use std::path::PathBuf;

use muster_cli::cli::{Cli, Command, DaemonCommand};

pub use dev::{DevConfig, serve as serve_dev};

/// Runs a parsed command line; returns the process exit code.
pub async fn execute(cli: Cli) -> anyhow::Result<i32> {
    muster_cli::set_ca_file(cli.ca_file.clone());
    match cli.command {
        Command::Daemon(DaemonCommand::Dev(args)) => dev::run(args).await.map(|_| 0),
        Command::Daemon(DaemonCommand::Server(args)) => server::run(*args).await.map(|_| 0),
        Command::Daemon(DaemonCommand::Agent(args)) => {
            agent::run(&cli.server, cli.ca_file.as_deref(), *args)
                .await
                .map(|_| 0)
        }
        Command::Client(cmd) => {
            muster_cli::execute(&cli.server, cli.workspace, cli.output, cmd).await
        }
    }
}

/// `~/.local/share/muster/<what>` (or `$XDG_DATA_HOME/muster/<what>`).
pub fn default_data_dir(what: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("muster").join(what)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
