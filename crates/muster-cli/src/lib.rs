//! # muster-cli: the `muster` binary
//!
//! `muster server`, `muster agent` and `muster dev` run the daemons (library calls into
//! muster-server and muster-agent); the noun commands (`compute`, `node`, `run`, `sweep`,
//! `pipeline`, `cluster`) are gRPC clients. Input is validated here first for fast, clear
//! errors, and again by the server, which is the enforcer. The snapshot builder
//! (`snapshot.rs`) lives here because it reads the user's directory.
//!
//! Crate choices: `clap` (derive) for flags, `comfy-table` for tables, `humantime` for
//! times, `ignore` for `.amlignore`/`.gitignore` semantics, `tar` for outputs, `backon`
//! to pace a submission's retries through an election.

pub mod cli;
pub mod client;
pub mod commands;
pub mod output;
pub mod snapshot;

pub use commands::dev::{DevConfig, serve as serve_dev};

use cli::{Cli, Command};

/// Runs a parsed command line; returns the process exit code.
pub async fn execute(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Dev(args) => commands::dev::run(args).await.map(|_| 0),
        Command::Server(args) => commands::server::run(args).await.map(|_| 0),
        Command::Agent(args) => commands::agent::run(&cli.server, args).await.map(|_| 0),
        Command::Compute(cmd) => commands::compute::run(&cli.server, cli.output, cmd)
            .await
            .map(|_| 0),
        Command::Node(cmd) => commands::node::run(&cli.server, cli.output, cmd)
            .await
            .map(|_| 0),
        Command::Run(cmd) => commands::run::run(&cli.server, cli.output, cmd).await,
        Command::Sweep(cmd) => commands::sweep::run(&cli.server, cli.output, cmd).await,
        Command::Cluster(cmd) => commands::cluster::run(&cli.server, cli.output, cmd)
            .await
            .map(|_| 0),
        Command::Pipeline(cmd) => commands::pipeline::run(&cli.server, cli.output, cmd).await,
    }
}
