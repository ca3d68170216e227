//! Blob replication: a blob a run depends on (its code snapshot, its outputs, a sealed log)
//! is on a majority of servers before the command that references it is proposed, so losing
//! any one server loses no blob (DESIGN.md section 4). Content addressing makes copies and
//! repairs idempotent. A server asked for a blob it lacks fetches it from a peer first.
//!
//! A request waits for a majority, never for every server: the copies go out to all peers at
//! once, the caller goes on as soon as enough hold the blob, and the remaining copies finish
//! in the background (a repair). Every peer call has a deadline, so a server that accepts
//! connections but does not answer (a paused process, a stalled disk) costs at most that
//! deadline and never blocks a request while a majority answers.
//!
//! This module holds the policy (who must hold what, when it is enough); how bytes reach a
//! peer is behind [`BlobPeers`], which the gRPC layer implements (`grpc/replicas.rs`), so the
//! store knows no transport.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use super::StoreError;
use super::blobs::BlobStore;

/// How long a peer may take to answer a small call (which blobs it lacks, the start of a
/// download) or to send the next chunk of one.
pub const PEER_CALL_DEADLINE: Duration = Duration::from_secs(5);

/// The least rate a copy to a peer must keep: a copy of `n` bytes gets
/// [`PEER_CALL_DEADLINE`] plus `n` at this rate before it counts as failed.
pub const PEER_MIN_BYTES_PER_SEC: u64 = 8 << 20;

/// `call` unless it takes longer than `deadline`.
async fn within<T>(
    deadline: Duration,
    what: &str,
    call: impl Future<Output = Result<T, PeerError>>,
) -> Result<T, PeerError> {
    tokio::time::timeout(deadline, call)
        .await
        .unwrap_or_else(|_| Err(PeerError(format!("{what}: no answer within {deadline:?}"))))
}

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
    /// [`PEER_CALL_DEADLINE`], shorter in tests.
    deadline: Duration,
}

impl Replicator {
    /// A replicator of `blobs` over `peers`.
    pub fn new(blobs: BlobStore, peers: Arc<dyn BlobPeers>, max_blob_bytes: u64) -> Replicator {
        Replicator {
            blobs,
            peers,
            max_blob_bytes,
            deadline: PEER_CALL_DEADLINE,
        }
    }

    /// The deadline of a copy of `bytes` to a peer.
    fn transfer_deadline(&self, bytes: u64) -> Duration {
        self.deadline + Duration::from_secs(bytes / PEER_MIN_BYTES_PER_SEC)
    }

    /// Makes sure a majority of the voters hold every blob in `hashes` (this server must
    /// hold them): copies what each peer lacks to all of them at once and returns as soon
    /// as a majority (this server included) holds everything; the other copies go on in the
    /// background, each within its deadline.
    pub async fn ensure_replicated(&self, hashes: Vec<String>) -> Result<(), StoreError> {
        let (others, voters) = self.peers.voters();
        let needed = voters.max(1) / 2 + 1;
        if needed <= 1 {
            return Ok(());
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for peer in others {
            let (me, hashes, tx) = (self.clone(), hashes.clone(), tx.clone());
            tokio::spawn(async move {
                let result = me.push(peer, hashes).await;
                if let Err(e) = &result {
                    tracing::debug!(peer, error = %e, "a blob copy to a peer failed");
                }
                let _ = tx.send((peer, result));
            });
        }
        drop(tx);
        let mut holders = 1;
        let mut why = Vec::new();
        while let Some((peer, result)) = rx.recv().await {
            match result {
                Ok(()) => {
                    holders += 1;
                    if holders >= needed {
                        return Ok(());
                    }
                }
                Err(e) => why.push(format!("server {peer}: {e}")),
            }
        }
        Err(StoreError::NoMajority {
            holders,
            voters: voters.max(1),
            needed,
            why: why.join("; "),
        })
    }

    async fn push(&self, peer: u64, hashes: Vec<String>) -> Result<(), PeerError> {
        let missing = within(
            self.deadline,
            "asking which blobs it lacks",
            self.peers.missing(peer, hashes),
        )
        .await?;
        for sha in missing {
            let path = self
                .blobs
                .path(&sha)
                .map_err(|e| PeerError(e.to_string()))?;
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            within(
                self.transfer_deadline(bytes),
                &format!("copying blob {sha} ({bytes} bytes)"),
                self.peers.send(peer, sha.clone(), path),
            )
            .await?;
        }
        Ok(())
    }

    /// Repairs a blob this server lacks by fetching it from a peer that has it.
    pub async fn fetch_from_peers(&self, sha: &str) -> Result<(), StoreError> {
        let (others, _) = self.peers.voters();
        for peer in others {
            let opened = within(
                self.deadline,
                "opening a download",
                self.peers.fetch(peer, sha.to_string()),
            );
            let Ok(mut stream) = opened.await else {
                continue;
            };
            let mut writer = self.blobs.writer(sha, self.max_blob_bytes)?;
            let mut ok = true;
            // A peer that stops sending is given up on after the deadline, and the next one
            // is asked.
            loop {
                match tokio::time::timeout(self.deadline, stream.next()).await {
                    Ok(None) => break,
                    Ok(Some(Ok(data))) => writer.write(&data)?,
                    Ok(Some(Err(_))) | Err(_) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// How a fake peer behaves.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Peer {
        /// Takes every copy.
        Healthy,
        /// Accepts the call and never answers (a paused process).
        Paused,
        /// Refuses at once.
        Down,
    }

    #[derive(Debug)]
    struct FakePeers {
        peers: BTreeMap<u64, Peer>,
        received: Mutex<Vec<(u64, String)>>,
    }

    impl BlobPeers for FakePeers {
        fn voters(&self) -> (Vec<u64>, usize) {
            (self.peers.keys().copied().collect(), self.peers.len() + 1)
        }
        fn missing(
            &self,
            peer: u64,
            hashes: Vec<String>,
        ) -> BoxFuture<'_, Result<Vec<String>, PeerError>> {
            let behaviour = self.peers[&peer];
            async move {
                match behaviour {
                    Peer::Healthy => Ok(hashes),
                    Peer::Paused => futures::future::pending().await,
                    Peer::Down => Err(PeerError("connection refused".into())),
                }
            }
            .boxed()
        }
        fn send(
            &self,
            peer: u64,
            sha256: String,
            _: PathBuf,
        ) -> BoxFuture<'_, Result<(), PeerError>> {
            self.received.lock().unwrap().push((peer, sha256));
            async { Ok(()) }.boxed()
        }
        fn fetch(&self, _: u64, _: String) -> BoxFuture<'_, Result<Chunks, PeerError>> {
            async { futures::future::pending().await }.boxed()
        }
    }

    /// The peer deadline in these tests (real time).
    const DEADLINE: Duration = Duration::from_millis(1_000);

    fn replicator(
        peers: &[(u64, Peer)],
    ) -> (Replicator, Arc<FakePeers>, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().to_path_buf()).unwrap();
        let sha = blobs.put(b"a snapshot").unwrap();
        let fake = Arc::new(FakePeers {
            peers: peers.iter().copied().collect(),
            received: Mutex::default(),
        });
        let mut r = Replicator::new(blobs, fake.clone(), 1 << 20);
        r.deadline = DEADLINE;
        (r, fake, sha, dir)
    }

    #[tokio::test]
    async fn a_paused_peer_does_not_hold_up_a_majority() {
        // Three voters, one paused: this server and the healthy one are a majority, at once.
        let (r, fake, sha, _dir) = replicator(&[(2, Peer::Healthy), (3, Peer::Paused)]);
        let started = std::time::Instant::now();
        r.ensure_replicated(vec![sha.clone()]).await.unwrap();
        assert!(started.elapsed() < DEADLINE, "{:?}", started.elapsed());
        assert_eq!(*fake.received.lock().unwrap(), vec![(2, sha)]);
    }

    #[tokio::test]
    async fn without_a_majority_the_answer_comes_within_the_deadline_and_names_each_server() {
        let (r, _, sha, _dir) = replicator(&[(2, Peer::Down), (3, Peer::Paused)]);
        let started = std::time::Instant::now();
        let err = r
            .ensure_replicated(vec![sha])
            .await
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < DEADLINE * 3, "{:?}", started.elapsed());
        assert!(err.contains("server 2: connection refused"), "{err}");
        assert!(
            err.contains("server 3: asking which blobs it lacks: no answer"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_copies_beyond_a_majority_finish_in_the_background() {
        // Five voters: two healthy peers make the majority; the third healthy one still
        // gets its copy after the call returned.
        let (r, fake, sha, _dir) = replicator(&[
            (2, Peer::Healthy),
            (3, Peer::Healthy),
            (4, Peer::Healthy),
            (5, Peer::Paused),
        ]);
        r.ensure_replicated(vec![sha]).await.unwrap();
        for _ in 0..100 {
            if fake.received.lock().unwrap().len() == 3 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("copies: {:?}", fake.received.lock().unwrap());
    }

    #[tokio::test]
    async fn a_repair_skips_a_peer_that_does_not_answer() {
        let (r, _, _, _dir) = replicator(&[(2, Peer::Paused)]);
        let started = std::time::Instant::now();
        let missing = "0".repeat(64);
        assert!(r.fetch_from_peers(&missing).await.is_err());
        assert!(started.elapsed() < DEADLINE * 3, "{:?}", started.elapsed());
    }
}
