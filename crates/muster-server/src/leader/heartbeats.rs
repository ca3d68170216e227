//! Node liveness: heartbeats live in the leader's memory (never in the log); a node silent
//! past the grace period is marked lost through Raft, which requeues its attempts. A new
//! leader gives every node a fresh grace period.
//!
//! A lost node's ranks never report their ends, so before proposing the loss the leader
//! seals what it holds of their logs (as an agent's end report would have it do): the
//! attempt ends as `node_lost` with its logs up to the loss kept on a majority. If the seal
//! fails (no majority for the blob, say) the node is tried again on the next tick.

use std::sync::Arc;
use std::time::Duration;

use muster_core::{Command, NodeState};

use crate::coordinator::{Coordinator, now_ms};

pub(crate) async fn run(coordinator: Arc<Coordinator>) {
    let grace = coordinator.config.node_grace.as_millis() as u64;
    let mut leader_since: Option<u64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if !coordinator.is_leader() {
            leader_since = None;
            continue;
        }
        let now = now_ms();
        let since = *leader_since.get_or_insert(now);
        let beats = coordinator.heartbeats_snapshot();
        let silent: Vec<(String, String)> = coordinator.read(|s| {
            s.nodes
                .values()
                .filter(|n| matches!(n.state, NodeState::Ready | NodeState::Draining))
                .filter(|n| {
                    let last = beats.get(&n.id).copied().unwrap_or(0).max(since);
                    now.saturating_sub(last) > grace
                })
                .map(|n| (n.id.clone(), n.name.clone()))
                .collect()
        });
        for (node_id, name) in silent {
            tracing::warn!(node = %name, "no heartbeat within the grace period; marking the node lost");
            let reason = format!(
                "node {name} sent no heartbeat for {} s",
                coordinator.config.node_grace.as_secs()
            );
            take_down(&coordinator, &node_id, NodeState::Lost, reason, now).await;
        }
    }
}

/// Marks a node that is gone (`Lost`, or `Evicted` by a provisioner that saw its machine
/// reclaimed) through Raft, which ends its attempts so their runs restart as new attempts.
/// Its ranks' logs are sealed first; if that fails the caller's next pass tries again.
pub(crate) async fn take_down(
    coordinator: &Coordinator,
    node_id: &str,
    state: NodeState,
    reason: String,
    at: u64,
) {
    if let Err(e) = coordinator.seal_lost_node_logs(node_id).await {
        tracing::warn!(node = node_id, cause = %e.message(), "could not seal the logs of a gone node's ranks; retrying");
        return;
    }
    let cmd = Command::SetNodeState {
        node_id: node_id.to_string(),
        state,
        reason: Some(reason),
        at,
    };
    if let Err(e) = coordinator.propose(cmd).await {
        tracing::debug!(cause = %e, "could not mark the node {}", state.as_str());
    }
}
