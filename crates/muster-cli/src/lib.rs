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
pub mod credentials;
pub mod output;
pub mod snapshot;
pub mod tls;

use std::sync::OnceLock;

use cli::{ClientCommand, OutputFormat};
use muster_client::{ClientError, Clients};

/// The workspace of this invocation (`--workspace` / `MUSTER_WORKSPACE`), set once by
/// [`execute`]; `None`: the default workspace for new objects, every readable one in lists.
static WORKSPACE: OnceLock<Option<String>> = OnceLock::new();

/// The CA file of this invocation (`--ca-file` / `MUSTER_CA_FILE`), set once by [`execute`].
static CA_FILE: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();

/// Sets the CA a client trusts (`--ca-file`); the first call wins.
pub fn set_ca_file(ca: Option<std::path::PathBuf>) {
    let _ = CA_FILE.set(ca);
}

/// The credentials calls to `servers` present: the stored token, and TLS when
/// `--ca-file` is given.
pub fn client_credentials(servers: &str) -> anyhow::Result<muster_client::Credentials> {
    with_ca(credentials::credentials_for(servers)?)
}

/// `credentials` over TLS when `--ca-file` is given.
pub fn with_ca(
    credentials: muster_client::Credentials,
) -> anyhow::Result<muster_client::Credentials> {
    Ok(match CA_FILE.get().and_then(|c| c.as_deref()) {
        Some(ca) => credentials.with_tls(
            muster_client::ClientTls::from_ca_file(ca)
                .map_err(|e| anyhow::anyhow!("--ca-file: {e}"))?,
        ),
        None => credentials,
    })
}

/// The workspace `--workspace` named, if any.
pub fn workspace() -> Option<&'static str> {
    WORKSPACE.get().and_then(|w| w.as_deref())
}

/// Connects to the first of `servers` that answers, presenting the token the user logged
/// in with (see `credentials.rs`).
pub async fn connect(servers: &str) -> Result<Clients, ClientError> {
    let credentials =
        client_credentials(servers).map_err(|e| ClientError::Credentials(format!("{e:#}")))?;
    muster_client::connect(servers, credentials).await
}

/// Runs a client command against `server` (comma-separated URLs); returns the process
/// exit code.
pub async fn execute(
    server: &str,
    workspace: Option<String>,
    output: OutputFormat,
    cmd: ClientCommand,
) -> anyhow::Result<i32> {
    let _ = WORKSPACE.set(workspace.filter(|w| !w.trim().is_empty()));
    // (`--ca-file` is set by the binary before this is called.)
    match cmd {
        ClientCommand::Compute(cmd) => commands::compute::run(server, output, cmd).await.map(|_| 0),
        ClientCommand::Node(cmd) => commands::node::run(server, output, cmd).await.map(|_| 0),
        ClientCommand::Run(cmd) => commands::run::run(server, output, cmd).await,
        ClientCommand::Sweep(cmd) => commands::sweep::run(server, output, cmd).await,
        ClientCommand::Cluster(cmd) => commands::cluster::run(server, output, cmd).await.map(|_| 0),
        ClientCommand::Pipeline(cmd) => commands::pipeline::run(server, output, cmd).await,
        ClientCommand::Login(args) => commands::access::login(server, args).await.map(|_| 0),
        ClientCommand::Logout => commands::access::logout(server).map(|_| 0),
        ClientCommand::Whoami => commands::access::whoami(server, output).await.map(|_| 0),
        ClientCommand::Token(cmd) => commands::access::token(server, output, cmd)
            .await
            .map(|_| 0),
        ClientCommand::Workspace(cmd) => commands::access::workspace_cmd(server, output, cmd)
            .await
            .map(|_| 0),
        ClientCommand::Role(cmd) => commands::access::role(server, output, cmd).await.map(|_| 0),
        ClientCommand::Tls(cmd) => commands::access::tls(cmd).map(|_| 0),
        ClientCommand::Audit { limit } => commands::access::audit(server, output, limit)
            .await
            .map(|_| 0),
    }
}
