//! The scheduling loop: on every state change (at most once per `scheduler_min_interval`),
//! and at least once a second (so a requeued run whose backoff has passed is placed without
//! waiting for an unrelated event), ask muster-core's `schedule()` for decisions and propose
//! each through Raft.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use muster_core::schedule;
use tokio::time::Instant;

use crate::coordinator::{Coordinator, now_ms};

pub(crate) async fn run(coordinator: Arc<Coordinator>) {
    let mut changes = coordinator.subscribe();
    let min_interval = coordinator.config.scheduler_min_interval;
    let mut last = Instant::now() - min_interval;
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        tokio::time::sleep_until(last + min_interval).await;
        last = Instant::now();
        if !coordinator.is_leader() {
            continue;
        }
        let now = now_ms();
        let started = std::time::Instant::now();
        let decisions = coordinator.read(|s| schedule(s, now));
        coordinator
            .metrics
            .observe_schedule(started.elapsed(), decisions.len());
        if decisions.is_empty() {
            continue;
        }
        tracing::debug!(decisions = decisions.len(), "scheduling pass");
        let proposals = decisions
            .into_iter()
            .map(|d| coordinator.propose(d.into_command(now)));
        for result in join_all(proposals).await {
            // A rejected placement means the state moved on; the next pass decides again.
            if let Err(e) = result {
                tracing::debug!(cause = %e, "placement not applied");
            }
        }
    }
}
