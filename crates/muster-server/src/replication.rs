//! Blob replication: a blob a run depends on (its code snapshot, its outputs) is on a
//! majority of servers before the command that references it is proposed, so losing any
//! one server loses no blob (DESIGN.md section 4). Content addressing makes copies and
//! repairs idempotent. A server asked for a blob it lacks fetches it from a peer first.

use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use muster_proto::v1::{self, blob_service_client::BlobServiceClient};
use tokio::io::AsyncReadExt;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::blobs::BlobError;
use crate::coordinator::Coordinator;

/// Requests between servers carry this header, so a copy is not copied on again.
pub(crate) const REPLICA_HEADER: &str = "muster-replica";

const CHUNK: usize = 1 << 20;

pub(crate) fn replica_request<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert(REPLICA_HEADER, "1".parse().expect("ascii"));
    req
}

impl Coordinator {
    /// A lazily connected channel to a peer this server reaches (a partition test may cut
    /// it off), by its replicated address.
    pub(crate) fn peer_channel(&self, peer: u64) -> Option<Channel> {
        if !self.reaches(peer) {
            return None;
        }
        let address = self.peers.address(peer)?;
        let url = if address.contains("://") {
            address
        } else {
            format!("http://{address}")
        };
        Some(
            Endpoint::from_shared(url)
                .ok()?
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy(),
        )
    }

    /// A channel to the leader, when this server is a follower that knows and reaches it
    /// (a follower relays log and metric streams the leader holds).
    pub(crate) fn leader_channel(&self) -> Option<Channel> {
        if self.is_leader() {
            return None;
        }
        self.peer_channel(self.raft().status().leader?)
    }

    fn blob_client(&self, peer: u64) -> Option<BlobServiceClient<Channel>> {
        let channel = self.peer_channel(peer)?;
        Some(BlobServiceClient::new(channel).max_decoding_message_size(8 << 20))
    }

    fn other_voters(&self) -> (Vec<u64>, usize) {
        let status = self.raft().status();
        let me = status.id;
        let voters = status.voters.len().max(1);
        let others = status
            .voters
            .into_iter()
            .filter(|v| *v != me)
            .filter(|v| self.reaches(*v))
            .collect();
        (others, voters)
    }

    /// Makes sure a majority of the voters hold every blob in `hashes` (this server must
    /// hold them). Copies only what each peer lacks.
    pub(crate) async fn ensure_replicated(&self, hashes: Vec<String>) -> Result<(), Status> {
        let (others, voters) = self.other_voters();
        let needed = voters / 2 + 1;
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
        Err(Status::unavailable(format!(
            "the data is on {holders} of {voters} servers, and a majority ({needed}) must hold it before it is accepted: {}",
            why.join("; ")
        )))
    }

    async fn push(&self, peer: u64, hashes: Vec<String>) -> Result<(), String> {
        let mut client = self.blob_client(peer).ok_or("its address is unknown")?;
        let missing = client
            .missing_blobs(replica_request(v1::MissingBlobsRequest { sha256: hashes }))
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner()
            .sha256;
        for sha in missing {
            let path = self.blobs.path(&sha).map_err(|e| e.to_string())?;
            let mut file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let name = sha.clone();
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
                        sha256: if first { name.clone() } else { String::new() },
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
                .map_err(|s| s.message().to_string());
            reader
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            sent?;
        }
        Ok(())
    }

    /// Repairs a blob this server lacks by fetching it from a peer that has it.
    pub(crate) async fn fetch_from_peers(&self, sha: &str) -> Result<(), BlobError> {
        let (others, _) = self.other_voters();
        for peer in others {
            let Some(mut client) = self.blob_client(peer) else {
                continue;
            };
            let Ok(resp) = client
                .get_blob(replica_request(v1::GetBlobRequest {
                    sha256: sha.to_string(),
                }))
                .await
            else {
                continue;
            };
            let mut stream = resp.into_inner();
            let mut writer = self.blobs.writer(sha, self.config.max_blob_bytes)?;
            let mut ok = true;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => writer.write(&c.data)?,
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
        Err(BlobError::NotFound(sha.to_string()))
    }
}

/// Whether a request came from another server (a replica copy).
pub(crate) fn is_replica<T>(req: &tonic::Request<T>) -> bool {
    req.metadata().contains_key(REPLICA_HEADER)
}
