//! BlobService: upload only what the server lacks; download by address.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use muster_proto::v1::{self, blob_service_server::BlobService};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::grpc::auth::Caller;
use crate::server::Server;
use crate::store::BlobError;
use crate::views::access::blob_readable;

pub(crate) struct Blobs(pub Arc<Server>);

const CHUNK: usize = 1 << 20;

type BlobStream = Pin<Box<dyn Stream<Item = Result<v1::BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl BlobService for Blobs {
    async fn missing_blobs(
        &self,
        req: Request<v1::MissingBlobsRequest>,
    ) -> Result<Response<v1::MissingBlobsResponse>, Status> {
        let mut sha256 = Vec::new();
        for h in req.into_inner().sha256 {
            self.0.store.blobs.path(&h).map_err(Status::from)?;
            if !self.0.store.blobs.has(&h) {
                sha256.push(h);
            }
        }
        Ok(Response::new(v1::MissingBlobsResponse { sha256 }))
    }

    async fn put_blob(
        &self,
        req: Request<Streaming<v1::BlobChunk>>,
    ) -> Result<Response<v1::PutBlobResponse>, Status> {
        let caller = Caller::of(&req);
        // Servers copying to a peer are not limited; users and agents are, per token.
        let slot = match &caller {
            Caller::Server { .. } => None,
            other => Some(self.0.uploads.open(&other.label())?),
        };
        let mut stream = req.into_inner();
        let first = stream.next().await.ok_or_else(|| {
            Status::invalid_argument("empty upload: the first chunk must name the blob's sha256")
        })??;
        let sha = first.sha256.clone();
        let store = self.0.store.blobs.clone();
        let limit = self.0.config.max_blob_bytes;
        let mut writer = store.writer(&sha, limit).map_err(Status::from)?;
        // File I/O off the async threads, chunk by chunk.
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
        let sink = tokio::task::spawn_blocking(move || -> Result<u64, BlobError> {
            while let Some(data) = rx.blocking_recv() {
                writer.write(&data)?;
            }
            writer.finish()
        });
        let mut send_err = None;
        if tx.send(first.data).await.is_ok() {
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => {
                        if let Some(slot) = &slot {
                            let wait = self.0.uploads.pace(slot, c.data.len() as u64);
                            if !wait.is_zero() {
                                tokio::time::sleep(wait).await;
                            }
                        }
                        if tx.send(c.data).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        send_err = Some(e);
                        break;
                    }
                }
            }
        }
        drop(tx);
        if let Some(e) = send_err {
            sink.abort();
            return Err(e);
        }
        let size = sink
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::from)?;
        Ok(Response::new(v1::PutBlobResponse { sha256: sha, size }))
    }

    type GetBlobStream = BlobStream;

    async fn get_blob(
        &self,
        req: Request<v1::GetBlobRequest>,
    ) -> Result<Response<BlobStream>, Status> {
        let from_peer = crate::coordinator::peers::is_replica(&req);
        let caller = Caller::of(&req);
        let sha = req.into_inner().sha256;
        let path = self.0.store.blobs.path(&sha).map_err(Status::from)?;
        // A user reads only blobs of runs they may see; agents and servers move any blob
        // (snapshots, inputs, replicas). An unreadable blob is as absent as a missing one.
        if let Caller::User { .. } = caller {
            let readable = caller.readable(&self.0, None)?;
            if let Err(e) = self.0.archived.refresh(&self.0).await {
                tracing::warn!(cause = %e, "could not read the run archives; their blobs are unreadable until then");
            }
            let (server, digest) = (self.0.clone(), sha.clone());
            let allowed =
                tokio::task::spawn_blocking(move || blob_readable(&server, &readable, &digest))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
            if !allowed {
                return Err(Status::from(BlobError::NotFound(sha)));
            }
        }
        if !from_peer && !self.0.store.blobs.has(&sha) {
            // Repair: another server may hold it (it was uploaded there).
            self.0
                .store
                .replicas
                .fetch_from_peers(&sha)
                .await
                .map_err(Status::from)?;
        }
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| Status::from(BlobError::NotFound(sha.clone())))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut file = file;
            let mut buf = vec![0u8; CHUNK];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        let chunk = v1::BlobChunk {
                            sha256: String::new(),
                            data: buf[..n].to_vec(),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("reading blob {sha}: {e}"))))
                            .await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
