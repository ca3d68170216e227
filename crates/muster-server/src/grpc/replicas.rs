//! The gRPC side of blob replication: [`GrpcBlobPeers`] implements the store's
//! [`BlobPeers`] with muster-client's blob streaming to the peers' BlobService, each
//! request marked as a replica copy (`Blobs::replica`), so the receiving server does not
//! copy it on again.

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use muster_client::{Blobs, ClientError};
use muster_proto::v1::blob_service_client::BlobServiceClient;

use crate::coordinator::Coordinator;
use crate::store::replication::Chunks;
use crate::store::{BlobPeers, PeerError};

/// The other servers' BlobService, reached through the coordinator's peer book.
#[derive(Debug)]
pub(crate) struct GrpcBlobPeers {
    coordinator: Arc<Coordinator>,
}

impl GrpcBlobPeers {
    pub(crate) fn new(coordinator: Arc<Coordinator>) -> GrpcBlobPeers {
        GrpcBlobPeers { coordinator }
    }

    fn blobs(&self, peer: u64) -> Result<Blobs, PeerError> {
        let channel = self
            .coordinator
            .peer_channel(peer)
            .ok_or_else(|| PeerError("its address is unknown".into()))?;
        Ok(Blobs::replica(
            BlobServiceClient::new(channel).max_decoding_message_size(8 << 20),
        ))
    }
}

fn peer_error(e: ClientError) -> PeerError {
    PeerError(e.to_string())
}

impl BlobPeers for GrpcBlobPeers {
    fn voters(&self) -> (Vec<u64>, usize) {
        let status = self.coordinator.raft().status();
        let me = status.id;
        let voters = status.voters.len().max(1);
        let others = status
            .voters
            .into_iter()
            .filter(|v| *v != me)
            .filter(|v| self.coordinator.reaches(*v))
            .collect();
        (others, voters)
    }

    fn missing(
        &self,
        peer: u64,
        hashes: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<String>, PeerError>> {
        async move { self.blobs(peer)?.missing(hashes).await.map_err(peer_error) }.boxed()
    }

    fn send(
        &self,
        peer: u64,
        sha256: String,
        path: PathBuf,
    ) -> BoxFuture<'_, Result<(), PeerError>> {
        async move {
            self.blobs(peer)?
                .upload_file(&sha256, &path)
                .await
                .map_err(peer_error)
        }
        .boxed()
    }

    fn fetch(&self, peer: u64, sha256: String) -> BoxFuture<'_, Result<Chunks, PeerError>> {
        async move {
            let stream = self
                .blobs(peer)?
                .download_stream(&sha256)
                .await
                .map_err(peer_error)?;
            Ok(stream.map(|chunk| chunk.map_err(peer_error)).boxed())
        }
        .boxed()
    }
}
