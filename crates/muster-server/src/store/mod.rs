//! # store: what a server keeps beside the Raft log
//!
//! Blobs (content-addressed code snapshots, outputs, sealed logs and metrics), the live
//! logs of attempts, the metric series of runs, and the replication of blobs to a majority
//! of servers. Large data never goes into the Raft log (DESIGN.md section 4): the log holds
//! a blob's SHA-256, this layer holds its bytes.
//!
//! May import: muster-core and its own files. Never `tonic`, the gRPC layer, or the
//! coordinator: a store answers with [`StoreError`], which the transport maps to a status,
//! and reaches other servers only through the [`BlobPeers`] trait the transport implements.
//! What is recorded in the replicated state about a stored thing (a `SealLog` command, say)
//! is proposed by the layer above (`crate::effects`).

pub mod backup;
pub mod blobs;
pub mod logs;
pub mod replication;
pub mod secret_key;
pub mod series;

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use muster_core::State;
use muster_core::snapshot::Manifest;
use muster_core::spec::CodeRef;
use muster_core::state::{SealedLog, SealedMetrics};

pub use blobs::{BlobError, BlobStore};
pub use logs::{Append, LogStore};
pub use replication::{BlobPeers, PeerError, Replicator};
pub use series::{Feed, SeriesStore, Stream};

/// Why a store operation failed. The transport maps each to the status a client acts on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The blob store refused or lacks a blob.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// A log or metrics file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done ("sealing logs", "reading the log").
        what: &'static str,
        /// The failure.
        source: io::Error,
    },
    /// Fewer servers than a majority hold the data.
    #[error(
        "the data is on {holders} of {voters} servers, and a majority ({needed}) must hold it before it is accepted: {why}"
    )]
    NoMajority {
        /// Servers that hold it, this one included.
        holders: usize,
        /// Voters in all.
        voters: usize,
        /// A majority of them.
        needed: usize,
        /// What each server that does not hold it said.
        why: String,
    },
    /// This server lacks a blob the state refers to, and no peer could provide it.
    #[error(
        "the {what} {sha256} is not on this server and no other server could provide it ({cause}); retry when more servers are up"
    )]
    Unavailable {
        /// What the blob is ("sealed log", "sealed metrics").
        what: &'static str,
        /// Its address.
        sha256: String,
        /// Why the repair failed.
        cause: String,
    },
    /// A sealed blob is shorter than the state records.
    #[error("the sealed log {sha256} is shorter than the {bytes} bytes recorded")]
    Truncated {
        /// Its address.
        sha256: String,
        /// The length the state records.
        bytes: u64,
    },
}

/// Why a code snapshot named by a submission cannot be accepted (the message follows the
/// field it is about, `code: …`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The manifest blob was never uploaded.
    #[error(
        "snapshot manifest {0} is not in the blob store: upload the snapshot before submitting"
    )]
    ManifestMissing(String),
    /// The manifest does not parse.
    #[error("the snapshot manifest is not valid: {0}")]
    ManifestUnreadable(String),
    /// The manifest parses but breaks a rule (muster-core's `Manifest::validate`).
    #[error("{0}")]
    ManifestInvalid(String),
    /// A file of the snapshot was never uploaded.
    #[error(
        "file blob {0} of the snapshot was not uploaded: upload the snapshot before submitting"
    )]
    FileMissing(String),
}

impl SnapshotError {
    /// Whether the client must upload something first (rather than fix what it sent).
    pub fn is_missing(&self) -> bool {
        matches!(
            self,
            SnapshotError::ManifestMissing(_) | SnapshotError::FileMissing(_)
        )
    }
}

fn io(what: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io { what, source }
}

/// One server's stores.
#[derive(Debug)]
pub struct Store {
    /// Content-addressed blobs.
    pub blobs: BlobStore,
    /// Live attempt logs (on the leader).
    pub logs: LogStore,
    /// Metric series of runs.
    pub series: SeriesStore,
    /// Copies blobs to and from peers.
    pub replicas: Replicator,
}

impl Store {
    /// Opens (creating) the stores under `dir` (`blobs/`, `logs/`, `metrics/`). The series
    /// store reads `state` to find sealed metrics of runs it no longer holds.
    pub fn open(
        dir: &Path,
        state: Arc<RwLock<State>>,
        peers: Arc<dyn BlobPeers>,
        max_blob_bytes: u64,
    ) -> Result<Store, StoreError> {
        let blobs = BlobStore::open(dir.join("blobs")).map_err(io("opening the blob store"))?;
        let logs = LogStore::open(dir.join("logs")).map_err(io("opening the log store"))?;
        let series = SeriesStore::open(dir.join("metrics"), state, blobs.clone())
            .map_err(io("opening the metrics store"))?;
        let replicas = Replicator::new(blobs.clone(), peers, max_blob_bytes);
        Ok(Store {
            blobs,
            logs,
            series,
            replicas,
        })
    }

    /// Checks that a code snapshot is whole here (its manifest valid, every file uploaded)
    /// and returns every blob it consists of, the manifest last. Shared by runs, sweeps
    /// and pipelines, which then replicate the blobs before they accept the submission.
    pub fn snapshot_blobs(&self, code: &CodeRef) -> Result<Vec<String>, SnapshotError> {
        let manifest = self
            .blobs
            .get(&code.manifest)
            .map_err(|_| SnapshotError::ManifestMissing(code.manifest.clone()))?;
        let manifest: Manifest = serde_json::from_slice(&manifest)
            .map_err(|e| SnapshotError::ManifestUnreadable(e.to_string()))?;
        manifest
            .validate()
            .map_err(|e| SnapshotError::ManifestInvalid(e.to_string()))?;
        let mut hashes: Vec<String> = manifest.files.iter().map(|f| f.sha256.clone()).collect();
        if let Some(missing) = hashes.iter().find(|h| !self.blobs.has(h)) {
            return Err(SnapshotError::FileMissing(missing.clone()));
        }
        hashes.push(code.manifest.clone());
        Ok(hashes)
    }

    /// Makes sure this server holds every blob of `manifests` (with the files each names)
    /// and of `blobs`, fetching what it lacks from its peers; the ones no peer had.
    pub async fn gather(
        &self,
        manifests: &std::collections::BTreeSet<String>,
        blobs: &std::collections::BTreeSet<String>,
    ) -> Vec<String> {
        let mut missing = Vec::new();
        let mut wanted: Vec<String> = blobs.iter().cloned().collect();
        for m in manifests {
            if self.ensure_local("a snapshot manifest", m).await.is_err() {
                missing.push(m.clone());
                continue;
            }
            let files = self
                .blobs
                .get(m)
                .ok()
                .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
                .map(|man| man.files.into_iter().map(|f| f.sha256).collect::<Vec<_>>())
                .unwrap_or_default();
            wanted.extend(files);
        }
        for sha in wanted {
            if self.ensure_local("a blob", &sha).await.is_err() {
                missing.push(sha);
            }
        }
        missing.sort();
        missing.dedup();
        missing
    }

    /// Makes sure this server holds blob `sha256` (a sealed log or metrics the state
    /// refers to), repairing it from a peer if it missed it.
    pub async fn ensure_local(&self, what: &'static str, sha256: &str) -> Result<(), StoreError> {
        if self.blobs.has(sha256) {
            return Ok(());
        }
        self.replicas
            .fetch_from_peers(sha256)
            .await
            .map_err(|e| StoreError::Unavailable {
                what,
                sha256: sha256.to_string(),
                cause: e.to_string(),
            })
    }

    /// Closes a rank's complete log, copies it into the blob store and onto a majority of
    /// servers. The caller records the returned [`SealedLog`] in the replicated state; if
    /// anything fails the log takes the agent's bytes again (a later seal retries).
    pub async fn seal_log(
        &self,
        run: &str,
        attempt: u32,
        rank: u32,
    ) -> Result<SealedLog, StoreError> {
        let sealed = self.try_seal_log(run, attempt, rank).await;
        if sealed.is_err() {
            self.logs.unseal(run, attempt, rank);
        }
        sealed
    }

    async fn try_seal_log(
        &self,
        run: &str,
        attempt: u32,
        rank: u32,
    ) -> Result<SealedLog, StoreError> {
        self.logs
            .seal(run, attempt, rank)
            .map_err(io("sealing logs"))?;
        let path = self.logs.path(run, attempt, rank);
        let blobs = self.blobs.clone();
        let (sha256, bytes) = tokio::task::spawn_blocking(move || blobs.put_file(&path))
            .await
            .map_err(|e| io("sealing logs")(io::Error::other(e)))??;
        self.replicas
            .ensure_replicated(vec![sha256.clone()])
            .await?;
        Ok(SealedLog { sha256, bytes })
    }

    /// Completes a rank's metric streams and copies the run's compacted metrics into the
    /// blob store and onto a majority of servers. `None` when the run logged none; the
    /// caller records the result in the replicated state.
    pub async fn seal_metrics(
        &self,
        run: &str,
        attempt: u32,
        rank: u32,
    ) -> Result<Option<SealedMetrics>, StoreError> {
        let failed = io("sealing metrics");
        self.series
            .finish(run, Stream::File { attempt, rank })
            .and_then(|()| self.series.finish(run, Stream::Stdout { attempt, rank }))
            .map_err(failed)?;
        let Some((bytes, lines)) = self.series.compact(run).map_err(io("sealing metrics"))? else {
            return Ok(None);
        };
        if lines == 0 {
            return Ok(None);
        }
        let len = bytes.len() as u64;
        let blobs = self.blobs.clone();
        let sha256 = tokio::task::spawn_blocking(move || blobs.put(&bytes))
            .await
            .map_err(|e| io("sealing metrics")(io::Error::other(e)))??;
        self.replicas
            .ensure_replicated(vec![sha256.clone()])
            .await?;
        Ok(Some(SealedMetrics {
            sha256,
            bytes: len,
            lines,
        }))
    }

    /// Feeds new log bytes of a rank (stored in the log store from `offset`) to the series
    /// store's stdout stream, first reading from the log file any bytes the stream lacks
    /// (after a restart, or once its run was dropped from memory).
    pub fn feed_log_metrics(
        &self,
        run: &str,
        attempt: u32,
        rank: u32,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let stream = Stream::Stdout { attempt, rank };
        let mut have = self.series.stream_len(run, stream)?;
        while have < offset {
            let missing = self.logs.read(
                run,
                attempt,
                rank,
                have,
                ((offset - have) as usize).min(1 << 20),
            )?;
            if missing.is_empty() {
                break;
            }
            match self.series.feed(run, stream, have, &missing)? {
                Feed::Stored(n) if n > have => have = n,
                _ => break,
            }
        }
        self.series.feed(run, stream, offset, data)?;
        Ok(())
    }

    /// Reads up to `max` bytes of a sealed log from `offset`, repairing the blob from a
    /// peer first if this server lacks it.
    pub async fn read_sealed(
        &self,
        log: &SealedLog,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        self.ensure_local("sealed log", &log.sha256).await?;
        let end = log.bytes.saturating_sub(offset).min(max as u64) as usize;
        Ok(self.blobs.read_range(&log.sha256, offset, end)?)
    }

    /// Reads a rank's log: from its sealed blob once it ended (`sealed`, from the state; on
    /// any server), else from the file this server holds (the live log, on the leader).
    pub async fn read_log(
        &self,
        sealed: Option<&SealedLog>,
        (run, attempt, rank): (&str, u32, u32),
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        match sealed {
            Some(log) => self.read_sealed(log, offset, max).await,
            None => self
                .logs
                .read(run, attempt, rank, offset, max)
                .map_err(io("reading the log")),
        }
    }

    /// The run's sealed metrics, when the blob is (or can be made) local: fetched from a
    /// peer if this server missed it. False when the run has no sealed metrics.
    pub async fn ensure_sealed_metrics_local(&self, run: &str) -> Result<bool, StoreError> {
        let Some(sealed) = self.series.sealed(run) else {
            return Ok(false);
        };
        self.ensure_local("sealed metrics", &sealed.sha256).await?;
        Ok(true)
    }
}
