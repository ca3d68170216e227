//! # muster-client: the one gRPC client of muster
//!
//! Everything that talks to a muster server goes through this crate: the CLI, the agent
//! (its blob transfers) and, for server-to-server blob copies, the server itself
//! (DESIGN.md section 14: one client crate for failover, retries and blob streaming).
//! It owns:
//!
//! - `servers.rs`: the `--server a,b,c` list, connecting to the first server that answers,
//!   and [`Servers::call`], which fails over to the next server and follows the leader a
//!   follower names in the [`LEADER_HEADER`] of its UNAVAILABLE answer;
//! - `retry.rs`: [`RetryPolicy`] and [`retry`]: a bounded backoff
//!   for retryable errors only;
//! - `credentials.rs`: [`Credentials`] (a bearer token, or a server's cluster key) and
//!   [`Channel`], tonic's channel with them attached to every request;
//! - `blobs.rs`: [`Blobs`], blob upload and download streamed in 1 MiB chunks, digests
//!   checked, and [`Blobs::replica`] for copies between servers;
//! - `error.rs`: [`ClientError`], split like openraft's `APIError` and `Fatal`:
//!   [`ClientError::is_retryable`] is true for UNAVAILABLE answers, servers that do not
//!   answer and corrupted transfers; a refusal (INVALID_ARGUMENT, NOT_FOUND,
//!   PERMISSION_DENIED, …) or a local I/O error is final.
//!
//! It knows nothing of what a run is beyond the generated API, and depends on neither the
//! server nor the agent.
//!
//! Crate choices: `backon` paces retries (exponential backoff, bounded, with a predicate),
//! `thiserror` for the error enum, `sha2`/`hex` for blob addresses, `tonic` for transport.

mod blobs;
mod credentials;
mod error;
pub mod pki;
mod retry;
mod servers;

pub use blobs::{Blobs, CHUNK, REPLICA_HEADER, hash_bytes, hash_file};
pub use credentials::{
    BadToken, CLUSTER_KEY_HEADER, Channel, ClientTls, Credentials, SERVER_ID_HEADER, TlsFileError,
    write_secret_file,
};
pub use error::{ClientError, LEADER_HEADER, is_retryable_code, leader_hint, status};
pub use retry::{RetryPolicy, retry};
pub use servers::{Servers, normalize_url};

use muster_proto::v1::{
    access_service_client::AccessServiceClient, component_service_client::ComponentServiceClient,
    compute_service_client::ComputeServiceClient, data_service_client::DataServiceClient,
    metrics_service_client::MetricsServiceClient, pipeline_service_client::PipelineServiceClient,
    run_service_client::RunServiceClient, secret_service_client::SecretServiceClient,
    sweep_service_client::SweepServiceClient,
};

/// Clients of every user-facing service over one connection.
#[derive(Debug, Clone)]
pub struct Clients {
    /// The URL of the server connected to.
    pub url: String,
    /// Runs.
    pub runs: RunServiceClient<Channel>,
    /// Compute targets and nodes.
    pub compute: ComputeServiceClient<Channel>,
    /// Blobs.
    pub blobs: Blobs,
    /// Pipelines.
    pub pipelines: PipelineServiceClient<Channel>,
    /// Run metrics.
    pub metrics: MetricsServiceClient<Channel>,
    /// Sweeps.
    pub sweeps: SweepServiceClient<Channel>,
    /// Tokens, workspaces, roles, the audit log.
    pub access: AccessServiceClient<Channel>,
    /// Data assets and datastores.
    pub data: DataServiceClient<Channel>,
    /// Registered components.
    pub components: ComponentServiceClient<Channel>,
    /// Workspace secrets (names in, values never out).
    pub secrets: SecretServiceClient<Channel>,
}

impl Clients {
    /// Clients over `channel` to the server at `url`, with room for large answers (run
    /// lists, metric series, blob chunks).
    pub fn new(url: String, channel: Channel) -> Clients {
        Clients {
            url,
            runs: RunServiceClient::new(channel.clone()).max_decoding_message_size(16 << 20),
            compute: ComputeServiceClient::new(channel.clone()),
            pipelines: PipelineServiceClient::new(channel.clone()),
            sweeps: SweepServiceClient::new(channel.clone()).max_decoding_message_size(16 << 20),
            metrics: MetricsServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            access: AccessServiceClient::new(channel.clone()).max_decoding_message_size(16 << 20),
            data: DataServiceClient::new(channel.clone()).max_decoding_message_size(16 << 20),
            components: ComponentServiceClient::new(channel.clone())
                .max_decoding_message_size(16 << 20),
            secrets: SecretServiceClient::new(channel.clone()),
            blobs: Blobs::connect(channel),
        }
    }
}

/// Connects to the first server of `servers` (comma-separated URLs or `host:port`) that
/// answers, presenting `credentials` on every call. When none answers, the error names
/// each with its cause and says what to do.
pub async fn connect(servers: &str, credentials: Credentials) -> Result<Clients, ClientError> {
    let (url, channel) = Servers::parse(servers)
        .with_credentials(credentials)
        .connect()
        .await?;
    Ok(Clients::new(url, channel))
}
