//! Compute targets and nodes as the API shows them: the replicated state joined with the
//! leader's memory of each node's last heartbeat.

use muster_core::paging::PageToken;
use muster_proto::v1;
use muster_proto::{compute_status_to_wire, node_to_wire};

use crate::server::Server;

/// Compute target `name`'s status (its nodes by state, usage, autoscaler history), or
/// `None` if there is none.
pub(crate) fn compute_status(server: &Server, name: &str) -> Option<v1::ComputeStatus> {
    server.coordinator.read(|s| {
        s.computes
            .get(name)
            .map(|c| compute_status_to_wire(s, c, |id| server.heartbeats.last(id)))
    })
}

/// The nodes of compute target `compute` (every node without one).
pub(crate) fn nodes(server: &Server, compute: Option<&str>) -> Vec<v1::Node> {
    server.coordinator.read(|s| {
        s.nodes
            .values()
            .filter(|n| compute.is_none_or(|c| n.compute == c))
            .map(|n| node_to_wire(n, server.heartbeats.last(&n.id)))
            .collect()
    })
}

/// A page of at most `size` nodes, by name, after `after`, of the compute targets `visible`
/// accepts (and of `compute` only, when given), and the next page's token. Only the nodes
/// on the page are converted.
pub(crate) fn nodes_page(
    server: &Server,
    compute: Option<&str>,
    visible: impl Fn(&str) -> bool,
    after: Option<&PageToken>,
    size: usize,
) -> Result<(Vec<v1::Node>, Option<PageToken>), String> {
    server.coordinator.read(|s| {
        let page = s.nodes_page(after, size, |n| {
            compute.is_none_or(|c| n.compute == c) && visible(&n.compute)
        })?;
        let nodes = page
            .items
            .iter()
            .map(|n| node_to_wire(n, server.heartbeats.last(&n.id)))
            .collect();
        Ok((nodes, page.next))
    })
}

/// Node `id`, or `None` if there is none.
pub(crate) fn node(server: &Server, id: &str) -> Option<v1::Node> {
    server.coordinator.read(|s| {
        s.nodes
            .get(id)
            .map(|n| node_to_wire(n, server.heartbeats.last(&n.id)))
    })
}
