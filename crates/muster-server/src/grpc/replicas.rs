//! The gRPC side of blob replication: [`GrpcBlobPeers`] implements the store's
//! [`BlobPeers`] over the peers' BlobService (each request marked as a replica copy, so the
//! receiving server does not copy it on again).

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use muster_proto::v1::{self, blob_service_client::BlobServiceClient};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use crate::coordinator::Coordinator;
use crate::coordinator::peers::replica_request;
use crate::store::replication::Chunks;
use crate::store::{BlobPeers, PeerError};

const CHUNK: usize = 1 << 20;

/// The other servers' BlobService, reached through the coordinator's peer book.
#[derive(Debug)]
pub(crate) struct GrpcBlobPeers {
    coordinator: Arc<Coordinator>,
}

impl GrpcBlobPeers {
    pub(crate) fn new(coordinator: Arc<Coordinator>) -> GrpcBlobPeers {
        GrpcBlobPeers { coordinator }
    }

    fn client(&self, peer: u64) -> Result<BlobServiceClient<Channel>, PeerError> {
        let channel = self
            .coordinator
            .peer_channel(peer)
            .ok_or_else(|| PeerError("its address is unknown".into()))?;
        Ok(BlobServiceClient::new(channel).max_decoding_message_size(8 << 20))
    }
}

fn peer_error(s: tonic::Status) -> PeerError {
    PeerError(s.message().to_string())
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
        async move {
            let mut client = self.client(peer)?;
            Ok(client
                .missing_blobs(replica_request(v1::MissingBlobsRequest { sha256: hashes }))
                .await
                .map_err(peer_error)?
                .into_inner()
                .sha256)
        }
        .boxed()
    }

    fn send(
        &self,
        peer: u64,
        sha256: String,
        path: PathBuf,
    ) -> BoxFuture<'_, Result<(), PeerError>> {
        async move {
            let mut client = self.client(peer)?;
            let mut file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| PeerError(format!("{}: {e}", path.display())))?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let reader = tokio::spawn(async move {
                let mut first = true;
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    let n = file.read(&mut buf).await?;
                    if n == 0 && !first {
                        return Ok::<(), std::io::Error>(());
                    }
                    buf.truncate(n);
                    let chunk = v1::BlobChunk {
                        sha256: if first { sha256.clone() } else { String::new() },
                        data: buf,
                    };
                    first = false;
                    if tx.send(chunk).await.is_err() || n == 0 {
                        return Ok(());
                    }
                }
            });
            let sent = client
                .put_blob(replica_request(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                ))
                .await
                .map_err(peer_error);
            reader
                .await
                .map_err(|e| PeerError(e.to_string()))?
                .map_err(|e| PeerError(e.to_string()))?;
            sent.map(|_| ())
        }
        .boxed()
    }

    fn fetch(&self, peer: u64, sha256: String) -> BoxFuture<'_, Result<Chunks, PeerError>> {
        async move {
            let mut client = self.client(peer)?;
            let stream = client
                .get_blob(replica_request(v1::GetBlobRequest { sha256 }))
                .await
                .map_err(peer_error)?
                .into_inner();
            Ok(stream
                .map(|chunk| chunk.map(|c| c.data).map_err(peer_error))
                .boxed())
        }
        .boxed()
    }
}
