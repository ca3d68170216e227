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

use muster_core::NodeState;

use crate::coordinator::now_ms;
use crate::server::Server;

pub(crate) async fn run(server: Arc<Server>) {
    let grace = server.config.node_grace.as_millis() as u64;
    let mut leader_since: Option<u64> = None;
    // A tenth of the grace period (at most 5 s): a silent node is marked lost within 1.1×
    // the grace, and an idle leader wakes rarely.
    let every =
        (server.config.node_grace / 10).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if !server.coordinator.is_leader() {
            leader_since = None;
            continue;
        }
        let now = now_ms();
        let since = *leader_since.get_or_insert(now);
        let beats = server.heartbeats.snapshot();
        let silent: Vec<(String, String)> = server.coordinator.read(|s| {
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
                server.config.node_grace.as_secs()
            );
            server
                .take_down(&node_id, NodeState::Lost, reason, now)
                .await;
        }
    }
}
