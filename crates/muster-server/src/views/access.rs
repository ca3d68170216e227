//! Who sees what: the workspaces a user may read, and the workspace of each kind of object,
//! for the API (`grpc/auth.rs`) and the studio (`web/session.rs`) alike.

use std::collections::BTreeSet;

use muster_core::access::DEFAULT_WORKSPACE;
use muster_core::snapshot::Manifest;
use muster_core::state::{Pipeline, Sweep};

use crate::server::Server;

/// Which workspaces a caller may list objects of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Readable {
    /// Every workspace (servers, cluster-wide roles).
    All,
    /// These.
    Only(BTreeSet<String>),
}

impl Readable {
    /// Whether objects of `workspace` are shown.
    pub fn contains(&self, workspace: &str) -> bool {
        match self {
            Readable::All => true,
            Readable::Only(set) => set.contains(workspace),
        }
    }
}

/// The workspaces user `name` has a role in (every one for a cluster-wide role).
pub(crate) fn readable_by(server: &Server, name: &str) -> Readable {
    server.coordinator.read(|s| {
        if s.access.cluster_role(name).is_some() {
            Readable::All
        } else {
            Readable::Only(s.access.workspaces_of(name).into_keys().collect())
        }
    })
}

/// The workspace a sweep's trials run in.
pub(crate) fn sweep_workspace(sweep: &Sweep) -> &str {
    &sweep.spec.trial.workspace
}

/// The workspace a pipeline's steps run in.
pub(crate) fn pipeline_workspace(p: &Pipeline) -> &str {
    p.spec
        .steps
        .values()
        .next()
        .map(|s| s.run.workspace.as_str())
        .unwrap_or(DEFAULT_WORKSPACE)
}

/// Whether blob `sha256` belongs to a run of a workspace in `readable` (see
/// [`muster_core::state::Run::references_blob`]), or is a file of such a run's code
/// snapshot or uploaded inputs: what a user may download. Blobs are addressed by content, so without this
/// check anyone holding a digest could read another workspace's code, outputs and logs.
/// Callers who read every workspace skip the check. The snapshot files are found by
/// reading the manifests of the readable runs (each distinct one once), which is file I/O:
/// call it off the async threads, after [`crate::views::archive::Archived::refresh`] (the
/// runs retention archived count too).
pub(crate) fn blob_readable(server: &Server, readable: &Readable, sha256: &str) -> bool {
    let Readable::Only(_) = readable else {
        return true;
    };
    let (direct, manifests) = server.coordinator.read(|s| {
        let mut manifests = BTreeSet::new();
        let mut direct = false;
        for r in s
            .runs
            .values()
            .filter(|r| readable.contains(&r.spec.workspace))
        {
            if r.references_blob(sha256) {
                direct = true;
                break;
            }
            if let Some(code) = &r.spec.code {
                manifests.insert(code.manifest.clone());
            }
            // The files of the local inputs uploaded with it, too.
            manifests.extend(r.spec.snapshot_inputs.values().cloned());
        }
        (direct, manifests)
    });
    // Runs retention archived keep their blobs readable (the index is refreshed by the caller).
    let (archived, archived_manifests) = server.archived.readable_refs(readable, sha256);
    let manifests: BTreeSet<String> = manifests.into_iter().chain(archived_manifests).collect();
    direct
        || archived
        || manifests.iter().any(|m| {
            server
                .store
                .blobs
                .get(m)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Manifest>(&bytes).ok())
                .is_some_and(|m| m.files.iter().any(|f| f.sha256 == sha256))
        })
}
