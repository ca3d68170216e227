//! Who sees what: the workspaces a user may read, and the workspace of each kind of object,
//! for the API (`grpc/auth.rs`) and the studio (`web/session.rs`) alike.

use std::collections::BTreeSet;

use muster_core::access::DEFAULT_WORKSPACE;
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
/// [`muster_core::state::Run::references_blob`]): what a user may download. Blobs are
/// addressed by content, so without this check anyone holding a digest could read
/// another workspace's outputs and logs.
pub(crate) fn blob_readable(server: &Server, readable: &Readable, sha256: &str) -> bool {
    server.coordinator.read(|s| {
        s.runs
            .values()
            .any(|r| readable.contains(&r.spec.workspace) && r.references_blob(sha256))
    })
}
