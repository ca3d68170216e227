//! Connecting to a server, with an error that says what to do when none answers.

use std::time::Duration;

use muster_proto::v1::{
    blob_service_client::BlobServiceClient, compute_service_client::ComputeServiceClient,
    metrics_service_client::MetricsServiceClient, pipeline_service_client::PipelineServiceClient,
    run_service_client::RunServiceClient, sweep_service_client::SweepServiceClient,
};
use tonic::transport::{Channel, Endpoint};

/// Clients of one connection.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Runs.
    pub runs: RunServiceClient<Channel>,
    /// Compute targets and nodes.
    pub compute: ComputeServiceClient<Channel>,
    /// Blobs.
    pub blobs: BlobServiceClient<Channel>,
    /// Pipelines.
    pub pipelines: PipelineServiceClient<Channel>,
    /// Run metrics.
    pub metrics: MetricsServiceClient<Channel>,
    /// Sweeps.
    pub sweeps: SweepServiceClient<Channel>,
}

/// Connects to the first server of `servers` (comma-separated URLs) that answers.
pub async fn connect(servers: &str) -> anyhow::Result<Clients> {
    let mut failures = Vec::new();
    for url in servers.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let url = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let endpoint = match Endpoint::from_shared(url.clone()) {
            Ok(e) => e.connect_timeout(Duration::from_secs(3)),
            Err(e) => {
                failures.push(format!("{url}: not a valid address ({e})"));
                continue;
            }
        };
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(Clients {
                    runs: RunServiceClient::new(channel.clone())
                        .max_decoding_message_size(16 << 20),
                    compute: ComputeServiceClient::new(channel.clone()),
                    pipelines: PipelineServiceClient::new(channel.clone()),
                    sweeps: SweepServiceClient::new(channel.clone())
                        .max_decoding_message_size(16 << 20),
                    metrics: MetricsServiceClient::new(channel.clone())
                        .max_decoding_message_size(64 << 20),
                    blobs: BlobServiceClient::new(channel).max_decoding_message_size(16 << 20),
                });
            }
            Err(e) => {
                let cause = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string());
                failures.push(format!("{url} ({cause})"));
            }
        }
    }
    anyhow::bail!(
        "cannot reach a muster server at {}: start one with `muster dev`, or point --server (or MUSTER_SERVER) at a running server",
        failures.join(", ")
    )
}

/// A gRPC status as the message a person needs.
pub fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
