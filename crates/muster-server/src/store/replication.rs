//! Blob replication: a blob a run depends on (its code snapshot, its outputs, a sealed log)
//! is on a majority of servers before the command that references it is proposed, so losing
//! any one server loses no blob (DESIGN.md section 4). Content addressing makes copies and
//! repairs idempotent. A server asked for a blob it lacks fetches it from a peer first.
//!
//! This module holds the policy (who must hold what, when it is enough); how bytes reach a
//! peer is behind [`BlobPeers`], which the gRPC layer implements (`grpc/replicas.rs`), so the
//! store knows no transport.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use futures::future::{BoxFuture, join_all};
use futures::stream::BoxStream;

use super::StoreError;
use super::blobs::BlobStore;

/// Why a peer did not take or give a blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PeerError(pub String);

/// A blob as a peer sends it: chunks of bytes, in order.
pub type Chunks = BoxStream<'static, Result<Vec<u8>, PeerError>>;

/// The other servers, as far as blobs go. Implemented over gRPC by the transport layer;
/// tests may fake it.
pub trait BlobPeers: Send + Sync + fmt::Debug {
    /// The other voters this server reaches now, and how many voters there are in all
    /// (this server included).
    fn voters(&self) -> (Vec<u64>, usize);
    /// Which of `hashes` `peer` lacks.
    fn missing(
        &self,
        peer: u64,
        hashes: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<String>, PeerError>>;
    /// Copies the blob `sha256`, stored at `path` here, to `peer`.
    fn send(
        &self,
        peer: u64,
        sha256: String,
        path: PathBuf,
    ) -> BoxFuture<'_, Result<(), PeerError>>;
    /// Reads the blob `sha256` from `peer`, as a stream of chunks.
    fn fetch(&self, peer: u64, sha256: String) -> BoxFuture<'_, Result<Chunks, PeerError>>;
}

/// Copies blobs to and from the other servers.
#[derive(Debug, Clone)]
pub struct Replicator {
    blobs: BlobStore,
    peers: Arc<dyn BlobPeers>,
    max_blob_bytes: u64,
}

impl Replicator {
    /// A replicator of `blobs` over `peers`.
    pub fn new(blobs: BlobStore, peers: Arc<dyn BlobPeers>, max_blob_bytes: u64) -> Replicator {
        Replicator {
            blobs,
            peers,
            max_blob_bytes,
        }
    }

    /// Makes sure a majority of the voters hold every blob in `hashes` (this server must
    /// hold them). Copies only what each peer lacks.
    pub async fn ensure_replicated(&self, hashes: Vec<String>) -> Result<(), StoreError> {
        let (others, voters) = self.peers.voters();
        let needed = voters.max(1) / 2 + 1;
        if needed <= 1 {
            return Ok(());
        }
        let pushes = others.into_iter().map(|peer| {
            let hashes = hashes.clone();
            async move { self.push(peer, hashes).await.map_err(|e| (peer, e)) }
        });
        let results = join_all(pushes).await;
        let holders = 1 + results.iter().filter(|r| r.is_ok()).count();
        if holders >= needed {
            return Ok(());
        }
        let why: Vec<String> = results
            .into_iter()
            .filter_map(Result::err)
            .map(|(peer, e)| format!("server {peer}: {e}"))
            .collect();
        Err(StoreError::NoMajority {
            holders,
            voters: voters.max(1),
            needed,
            why: why.join("; "),
        })
    }

    async fn push(&self, peer: u64, hashes: Vec<String>) -> Result<(), PeerError> {
        let missing = self.peers.missing(peer, hashes).await?;
        for sha in missing {
            let path = self
                .blobs
                .path(&sha)
                .map_err(|e| PeerError(e.to_string()))?;
            self.peers.send(peer, sha, path).await?;
        }
        Ok(())
    }

    /// Repairs a blob this server lacks by fetching it from a peer that has it.
    pub async fn fetch_from_peers(&self, sha: &str) -> Result<(), StoreError> {
        let (others, _) = self.peers.voters();
        for peer in others {
            let Ok(mut stream) = self.peers.fetch(peer, sha.to_string()).await else {
                continue;
            };
            let mut writer = self.blobs.writer(sha, self.max_blob_bytes)?;
            let mut ok = true;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(data) => writer.write(&data)?,
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok && writer.finish().is_ok() {
                tracing::info!(blob = %sha, from = peer, "repaired a missing blob from a peer");
                return Ok(());
            }
        }
        Err(super::BlobError::NotFound(sha.to_string()).into())
    }
}
