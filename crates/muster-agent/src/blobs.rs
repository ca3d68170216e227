//! Blob transfers that survive a failover: the one place that tries the other servers.
//!
//! An attempt fetches its code snapshot and pipeline inputs and uploads its outputs
//! through the session's server; if that server dies mid-transfer (a leader lost), the
//! blobs are still on a majority, so [`Blobs::with_failover`] retries the same transfer
//! against every other server that answers, in the configured order, until one succeeds.
//! The transfers themselves (`snapshot.rs`, `inputs.rs`, `outputs.rs`, on `transfer.rs`)
//! take a plain client and know nothing of this.

use std::future::Future;
use std::time::Duration;

use muster_client::{Channel, Credentials};
use muster_proto::v1::blob_service_client::BlobServiceClient;

/// The largest blob message accepted (chunks are 1 MiB).
const MAX_MESSAGE: usize = 8 << 20;
/// How long connecting to another server may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(3);

/// A blob client of one server, over `channel`.
pub(crate) fn client(channel: Channel) -> BlobServiceClient<Channel> {
    BlobServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE)
}

/// The blob service of the cluster as an attempt sees it.
#[derive(Debug, Clone)]
pub(crate) struct Blobs {
    /// The session's server (or, for an attempt adopted before any session, a client of
    /// the first server that connects on first use).
    primary: BlobServiceClient<Channel>,
    /// Every server the agent knows, to fall back to.
    servers: Vec<String>,
    /// The agent's credential, for the other servers.
    credentials: Credentials,
}

impl Blobs {
    /// Transfers through `primary` first, then through the other `servers`.
    pub(crate) fn new(
        primary: BlobServiceClient<Channel>,
        servers: Vec<String>,
        credentials: Credentials,
    ) -> Blobs {
        Blobs {
            primary,
            servers,
            credentials,
        }
    }

    /// Before any session: the first of `servers`, connected on first use.
    pub(crate) fn lazy(
        servers: Vec<String>,
        credentials: Credentials,
    ) -> Result<Blobs, crate::ConfigError> {
        let first = servers.first().ok_or(crate::ConfigError::NoServers)?;
        let endpoint = credentials
            .endpoint(first)
            .map_err(|e| crate::ConfigError::ServerUrl {
                url: first.clone(),
                cause: e.to_string(),
            })?;
        let primary = client(credentials.attach(endpoint.connect_lazy()));
        Ok(Blobs::new(primary, servers, credentials))
    }

    /// Runs `transfer` against the primary server, then against each other server that
    /// answers until one succeeds; the last error if none did. `what` names the transfer
    /// in the warning logged when the first try fails.
    pub(crate) async fn with_failover<T, E, F, Fut>(
        &self,
        what: &str,
        mut transfer: F,
    ) -> Result<T, E>
    where
        F: FnMut(BlobServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut last = match transfer(self.primary.clone()).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        // The leader may have been lost mid-transfer: blobs are on a majority.
        tracing::warn!(cause = %last, "{what} failed; trying the other servers");
        for url in &self.servers {
            let Some(other) = connect(url, &self.credentials).await else {
                continue;
            };
            match transfer(other).await {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// A client of the server at `url`, if it answers.
async fn connect(url: &str, credentials: &Credentials) -> Option<BlobServiceClient<Channel>> {
    let endpoint = credentials.endpoint(url).ok()?;
    let channel = endpoint
        .connect_timeout(CONNECT_LIMIT)
        .connect()
        .await
        .ok()?;
    Some(client(credentials.attach(channel)))
}
