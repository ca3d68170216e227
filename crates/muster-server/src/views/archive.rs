//! Archived runs: the finished runs retention moved out of the replicated state
//! (muster-core's `state/archive.rs`), found again in their archive blobs.
//!
//! The state lists the archives (append-only); this server indexes them as it first needs
//! them, in its own memory: which archive holds each run and in which workspace, and which
//! blobs (snapshot manifests, outputs, sealed logs and metrics) belong to archived runs of
//! which workspaces, so `run show`, `run logs` and blob downloads work as before the run
//! was archived, with the same access rules. The index is rebuilt from the blobs after a
//! restart; nothing here is replicated.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use muster_core::state::{Run, decode_archive};

use crate::server::Server;
use crate::store::StoreError;
use crate::views::access::Readable;

/// This server's index of the archived runs.
#[derive(Debug, Default)]
pub(crate) struct Archived {
    /// Held while archives are being read in, so two callers do not read the same one.
    refreshing: tokio::sync::Mutex<()>,
    index: Mutex<Index>,
}

#[derive(Debug, Default)]
struct Index {
    /// How many of the state's archives (a prefix: they are only appended) are indexed.
    indexed: usize,
    /// Run id → (the archive's blob, the run's workspace).
    runs: HashMap<String, (String, String)>,
    /// Blob → the workspaces of the archived runs it belongs to.
    blobs: HashMap<String, BTreeSet<String>>,
    /// (workspace, snapshot manifest) of the archived runs: their files are readable too.
    manifests: BTreeSet<(String, String)>,
    /// The archive read last, decoded (a run's logs read it once per call).
    last: Option<(String, Arc<Vec<Run>>)>,
}

impl Archived {
    /// Indexes the archives the state lists that this server has not read yet, fetching
    /// a blob from a peer where this server lacks it.
    pub async fn refresh(&self, server: &Server) -> Result<(), StoreError> {
        let _one = self.refreshing.lock().await;
        let indexed = self.index.lock().expect("archive index").indexed;
        let new: Vec<String> = server.coordinator.read(|s| {
            s.archives
                .iter()
                .skip(indexed)
                .map(|a| a.sha256.clone())
                .collect()
        });
        for sha in new {
            let runs = load(server, &sha).await?;
            let mut index = self.index.lock().expect("archive index");
            for run in runs.iter() {
                let workspace = run.spec.workspace.clone();
                index
                    .runs
                    .insert(run.id.clone(), (sha.clone(), workspace.clone()));
                if let Some(code) = &run.spec.code {
                    index
                        .manifests
                        .insert((workspace.clone(), code.manifest.clone()));
                }
                for blob in blobs_of(run) {
                    index
                        .blobs
                        .entry(blob)
                        .or_default()
                        .insert(workspace.clone());
                }
            }
            index.indexed += 1;
            index.last = Some((sha, runs));
        }
        Ok(())
    }

    /// Archived run `id` and the archive blob it is in, if retention archived it.
    pub async fn find(
        &self,
        server: &Server,
        id: &str,
    ) -> Result<Option<(Run, String)>, StoreError> {
        self.refresh(server).await?;
        let (sha, cached) = {
            let index = self.index.lock().expect("archive index");
            let Some((sha, _)) = index.runs.get(id) else {
                return Ok(None);
            };
            let cached = index
                .last
                .as_ref()
                .filter(|(last, _)| last == sha)
                .map(|(_, runs)| runs.clone());
            (sha.clone(), cached)
        };
        let runs = match cached {
            Some(runs) => runs,
            None => {
                let runs = load(server, &sha).await?;
                self.index.lock().expect("archive index").last = Some((sha.clone(), runs.clone()));
                runs
            }
        };
        Ok(runs.iter().find(|r| r.id == id).map(|r| (r.clone(), sha)))
    }

    /// For a blob download: whether blob `sha256` belongs to an archived run of a
    /// workspace in `readable`, and the snapshot manifests of those workspaces' archived
    /// runs (whose files are readable too). Reads only the index: call
    /// [`Archived::refresh`] first.
    pub fn readable_refs(&self, readable: &Readable, sha256: &str) -> (bool, BTreeSet<String>) {
        let index = self.index.lock().expect("archive index");
        let direct = index
            .blobs
            .get(sha256)
            .is_some_and(|ws| ws.iter().any(|w| readable.contains(w)));
        let manifests = index
            .manifests
            .iter()
            .filter(|(w, _)| readable.contains(w))
            .map(|(_, m)| m.clone())
            .collect();
        (direct, manifests)
    }
}

/// The blobs a run refers to directly: its snapshot manifest, and each attempt's outputs,
/// sealed logs and sealed metrics.
fn blobs_of(run: &Run) -> Vec<String> {
    let mut out: Vec<String> = run.spec.code.iter().map(|c| c.manifest.clone()).collect();
    for a in &run.attempts {
        out.extend(a.outputs.iter().cloned());
        out.extend(a.logs.values().map(|l| l.sha256.clone()));
        out.extend(a.metrics.iter().map(|m| m.sha256.clone()));
    }
    out
}

/// Reads and decodes archive blob `sha` (from a peer if this server lacks it).
async fn load(server: &Server, sha: &str) -> Result<Arc<Vec<Run>>, StoreError> {
    server.store.ensure_local("run archive", sha).await?;
    let blobs = server.store.blobs.clone();
    let digest = sha.to_string();
    let bytes = tokio::task::spawn_blocking(move || blobs.get(&digest))
        .await
        .map_err(|e| StoreError::Io {
            what: "reading a run archive",
            source: std::io::Error::other(e),
        })??;
    decode_archive(&bytes)
        .map(Arc::new)
        .map_err(|cause| StoreError::Io {
            what: "reading a run archive",
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, cause),
        })
}
