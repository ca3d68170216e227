//! Connecting to a server, with an error that says what to do when none answers, and
//! retrying a submission while the cluster elects a leader (`backon` paces the retries).

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
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

/// Sends a submission again while the servers answer UNAVAILABLE (no leader yet, or the
/// leader just changed): 4 more tries, 200 ms apart and doubling. A submission carries an
/// idempotency key, so a retry of one that did land returns it instead of making another.
pub async fn submit_retrying<T, F, Fut>(send: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    send.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_times(4),
    )
    .when(|s: &tonic::Status| s.code() == tonic::Code::Unavailable)
    .await
    .map(tonic::Response::into_inner)
    .map_err(status)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_submission_is_sent_again_only_while_no_leader_takes_it() {
        // Two UNAVAILABLE answers (an election), then the leader's.
        let calls = AtomicU32::new(0);
        let got = submit_retrying(|| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(tonic::Status::unavailable("no leader yet; retry"))
                } else {
                    Ok(tonic::Response::new(n))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!((got, calls.load(Ordering::SeqCst)), (2, 3));

        // A refusal is final: sent once, its message is the error.
        let calls = AtomicU32::new(0);
        let err = submit_retrying(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<tonic::Response<()>, _>(tonic::Status::invalid_argument("name: bad")) }
        })
        .await
        .unwrap_err();
        assert_eq!(
            (err.to_string(), calls.load(Ordering::SeqCst)),
            ("name: bad".into(), 1)
        );

        // An outage longer than the retries ends with the last answer, after 5 tries.
        let calls = AtomicU32::new(0);
        let err = submit_retrying(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<tonic::Response<()>, _>(tonic::Status::unavailable("no leader")) }
        })
        .await
        .unwrap_err();
        assert_eq!(
            (err.to_string(), calls.load(Ordering::SeqCst)),
            ("no leader".into(), 5)
        );
    }
}
