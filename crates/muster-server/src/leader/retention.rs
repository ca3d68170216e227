//! The retention loop: with `--retention`, every `retention_check` the leader asks
//! muster-core which finished runs are older than the retention ([`State::archivable`]) and
//! archives them in batches ([`Server::archive_runs`]: blob on a majority first, then the
//! removal through Raft), until none is left. A batch refused because a run changed
//! meanwhile is picked again by the next pass.
//!
//! [`State::archivable`]: muster_core::State::archivable
//! [`Server::archive_runs`]: crate::server::Server::archive_runs

use std::sync::Arc;

use muster_core::state::MAX_ARCHIVE_RUNS;

use crate::coordinator::now_ms;
use crate::server::Server;

/// Batches archived per pass at most (a pass never runs unbounded).
const MAX_BATCHES_PER_PASS: usize = 50;

pub(crate) async fn run(server: Arc<Server>) {
    let Some(retention) = server.config.retention else {
        return;
    };
    let mut tick = tokio::time::interval(server.config.retention_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !server.coordinator.is_leader() {
            continue;
        }
        let cut = now_ms().saturating_sub(retention.as_millis() as u64);
        for _ in 0..MAX_BATCHES_PER_PASS {
            let ids = server
                .coordinator
                .read(|s| s.archivable(cut, MAX_ARCHIVE_RUNS));
            if ids.is_empty() || !server.coordinator.is_leader() {
                break;
            }
            match server.archive_runs(&ids, cut).await {
                Ok(n) => tracing::info!(runs = n, "archived finished runs (retention)"),
                Err(e) => {
                    tracing::warn!(cause = %e, "could not archive finished runs; the next pass retries");
                    break;
                }
            }
        }
    }
}
