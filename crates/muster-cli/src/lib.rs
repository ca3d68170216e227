//! # muster-cli: the client commands of `muster`
//!
//! The flags of every subcommand (`cli.rs`, clap derive), and the noun commands
//! (`compute`, `node`, `run`, `sweep`, `pipeline`, `cluster`): gRPC clients through
//! muster-client, which connects (trying each `--server` in turn), retries and streams
//! blobs. Input is validated here first for fast, clear errors, and again by the server,
//! which is the enforcer. The snapshot builder (`snapshot.rs`) lives here because it reads
//! the user's directory. The `muster` crate holds the binary and runs the daemon
//! subcommands (`server`, `agent`, `dev`) whose flags are defined here; this crate depends
//! on neither muster-server nor muster-agent.
//!
//! Crate choices: `clap` (derive) for flags, `comfy-table` for tables, `humantime` for
//! times, `ignore` for `.amlignore`/`.gitignore` semantics, `tar` for outputs;
//! muster-client (`backon`) paces a submission's retries through an election.

pub mod cli;
pub mod commands;
pub mod output;
pub mod snapshot;

use cli::{ClientCommand, OutputFormat};

/// Runs a client command against `server` (comma-separated URLs); returns the process
/// exit code.
pub async fn execute(
    server: &str,
    output: OutputFormat,
    cmd: ClientCommand,
) -> anyhow::Result<i32> {
    match cmd {
        ClientCommand::Compute(cmd) => commands::compute::run(server, output, cmd).await.map(|_| 0),
        ClientCommand::Node(cmd) => commands::node::run(server, output, cmd).await.map(|_| 0),
        ClientCommand::Run(cmd) => commands::run::run(server, output, cmd).await,
        ClientCommand::Sweep(cmd) => commands::sweep::run(server, output, cmd).await,
        ClientCommand::Cluster(cmd) => commands::cluster::run(server, output, cmd).await.map(|_| 0),
        ClientCommand::Pipeline(cmd) => commands::pipeline::run(server, output, cmd).await,
    }
}
