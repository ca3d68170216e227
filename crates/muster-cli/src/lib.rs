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
//! times (shown, and `--since 2h` / `--since 2026-01-31T12:00:00Z` read: see `paging.rs`), `ignore` for `.amlignore`/`.gitignore` semantics, `tar` for outputs;
//! muster-client (`backon`) paces a submission's retries through an election; `russh` (on
//! ring, as rustls here) is the SSH client of `compute attach`/`detach` (`ssh.rs`).

pub mod cli;
pub mod commands;
pub mod credentials;
pub mod local_inputs;
pub mod output;
pub mod paging;
pub mod progress;
pub mod snapshot;
pub mod ssh;
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

/// The CA file `--ca-file` named, if any.
pub fn ca_file() -> Option<&'static std::path::Path> {
    CA_FILE.get().and_then(|c| c.as_deref())
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

/// `servers` (comma-separated URLs) with this user's credentials: one list for a command's
/// upload and submit, so both go over one connection ([`muster_client::Servers::call`]).
pub fn server_list(servers: &str) -> Result<muster_client::Servers, ClientError> {
    let credentials =
        client_credentials(servers).map_err(|e| ClientError::Credentials(format!("{e:#}")))?;
    Ok(muster_client::Servers::parse(servers).with_credentials(credentials))
}

/// Checks, before anything is uploaded, that `spec`'s compute target exists in the
/// caller's view and could ever hold the run (its instance count and quota), so a typo in
/// `--compute` costs no upload. `serverless` is the server's to resolve.
pub async fn check_compute_before_upload(
    list: &mut muster_client::Servers,
    spec: &muster_core::RunSpec,
) -> anyhow::Result<()> {
    if spec.compute == "serverless" {
        return Ok(());
    }
    let name = spec.compute.clone();
    let got = list
        .call(&muster_client::RetryPolicy::SUBMISSION, |channel| {
            let mut c = Clients::new(String::new(), channel);
            let name = name.clone();
            async move {
                c.compute
                    .get_compute(muster_proto::v1::GetComputeRequest { name })
                    .await
                    .map(|r| r.into_inner())
                    .map_err(muster_client::status)
            }
        })
        .await;
    let target = match got {
        Ok(t) => t,
        Err(ClientError::Status { status }) if status.code() == tonic::Code::NotFound => {
            anyhow::bail!(
                "compute: compute target {name:?} does not exist: list them with `muster compute list`, or create it with `muster compute create` (nothing was uploaded)"
            );
        }
        Err(e) => return Err(e.into()),
    };
    if let Ok(target) = muster_proto::compute_spec_from_wire(&target)
        && let Some(why) = target.never_fits(spec)
    {
        anyhow::bail!("{why} (nothing was uploaded)");
    }
    Ok(())
}

/// Uploads `snapshots` through the first of `list` that answers, failing over as
/// [`submit_failing_over`] does (a server that goes away mid-upload costs a retry, not the
/// submission). Returns what each snapshot became and what was sent.
pub async fn upload_failing_over(
    list: &mut muster_client::Servers,
    snapshots: &[&snapshot::Snapshot],
) -> Result<Vec<(muster_core::spec::CodeRef, snapshot::UploadStats)>, ClientError> {
    list.call(&muster_client::RetryPolicy::SUBMISSION, |channel| {
        let mut c = Clients::new(String::new(), channel);
        async move {
            let mut done = Vec::with_capacity(snapshots.len());
            for snapshot in snapshots {
                done.push(upload_one(&mut c, snapshot).await?);
            }
            Ok(done)
        }
    })
    .await
}

/// One snapshot's upload, its error as the client's (so a transport error is retryable).
async fn upload_one(
    c: &mut Clients,
    snapshot: &snapshot::Snapshot,
) -> Result<(muster_core::spec::CodeRef, snapshot::UploadStats), ClientError> {
    snapshot::upload(&mut c.blobs, snapshot)
        .await
        .map_err(|e| match e.downcast::<ClientError>() {
            Ok(e) => e,
            Err(e) => muster_client::status(tonic::Status::internal(format!(
                "uploading the snapshot: {e:#}"
            ))),
        })
}

/// Sends a submission, failing over by itself: through the first of `servers` that
/// answers, then, while the answer is retryable (the server went away, no leader yet),
/// through the others in turn (a leader a follower names first), paced by
/// [`muster_client::RetryPolicy::SUBMISSION`]. Before each try after the first it uploads
/// what that server lacks of `snapshots`, since the server that took the upload may be the one
/// that went away. `send` builds the request from the clients of that try's server; the
/// request carries the submission's idempotency key, so a try that landed before its answer
/// was lost returns the same object instead of making a second one.
pub async fn submit_failing_over<T, F, Fut>(
    list: &mut muster_client::Servers,
    snapshots: &[&snapshot::Snapshot],
    mut send: F,
) -> Result<T, ClientError>
where
    F: FnMut(Clients) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut first = true;
    list.call(&muster_client::RetryPolicy::SUBMISSION, |channel| {
        let mut c = Clients::new(String::new(), channel);
        let again = !std::mem::replace(&mut first, false);
        let sent = send(c.clone());
        async move {
            for snapshot in snapshots.iter().filter(|_| again) {
                upload_one(&mut c, snapshot).await?;
            }
            sent.await
                .map(tonic::Response::into_inner)
                .map_err(ClientError::from)
        }
    })
    .await
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
        ClientCommand::Data(cmd) => commands::data::run(server, output, cmd).await.map(|_| 0),
        ClientCommand::Component(cmd) => commands::component::run(server, output, cmd)
            .await
            .map(|_| 0),
        ClientCommand::Datastore(cmd) => commands::data::datastore(server, output, cmd)
            .await
            .map(|_| 0),
        ClientCommand::Secret(cmd) => commands::secret::run(server, output, cmd).await.map(|_| 0),
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
