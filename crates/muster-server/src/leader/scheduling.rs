//! The scheduling loop: on every state change (at most once per `scheduler_min_interval`),
//! and at least once a second while runs are queued (so a requeued run whose backoff has
//! passed is placed without waiting for an unrelated event; [`crate::leader::tick`]), ask muster-core's `schedule()` for decisions (placements
//! and preemptions) and propose each through Raft.
//!
//! The pace adapts to the pass's cost: the next pass waits at least
//! `PASS_COST_FACTOR` times as long as the last one took, so the scheduler takes at most
//! about a fifth of a core however long the queue grows (a pass over 100,000 waiting runs
//! takes ~20 ms: passes then run every ~100 ms; over a short queue, every
//! `scheduler_min_interval`). Under a storm of submissions that cannot be placed, this is
//! what leaves the CPU to the submissions.

use std::sync::Arc;

use futures::future::join_all;
use muster_core::{Decision, schedule};
use tokio::time::Instant;
use tracing::Instrument;

use crate::coordinator::now_ms;
use crate::server::Server;

/// The next pass waits at least this many times the last pass's duration.
const PASS_COST_FACTOR: u32 = 4;

pub(crate) async fn run(server: Arc<Server>) {
    let mut changes = server.coordinator.subscribe();
    let min_interval = server.config.scheduler_min_interval;
    let mut last = Instant::now() - min_interval;
    let mut gap = min_interval;
    loop {
        let busy = server.coordinator.read(|s| !s.queue.is_empty());
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(crate::leader::tick(busy)) => {}
        }
        tokio::time::sleep_until(last + gap).await;
        last = Instant::now();
        if !server.coordinator.is_leader() {
            continue;
        }
        let now = now_ms();
        let started = std::time::Instant::now();
        let pass = server.coordinator.read(|s| schedule(s, now));
        let placed = pass
            .decisions
            .iter()
            .filter(|d| matches!(d, Decision::Place { .. }))
            .count();
        let took = started.elapsed();
        gap = min_interval.max(took * PASS_COST_FACTOR);
        server.metrics.observe_schedule(took, placed);
        tracing::debug!(
            decisions = pass.decisions.len(),
            placed,
            waiting = pass.waiting.len(),
            "scheduling pass"
        );
        // Why each queued run waits: kept in the leader's memory for `run show` (recomputed
        // every pass, never in the log).
        server.waiting.set(pass.waiting);
        let decisions = pass.decisions;
        if decisions.is_empty() {
            continue;
        }
        let proposals = decisions.into_iter().map(|d| {
            let span = match &d {
                Decision::Place {
                    run_id,
                    attempt,
                    placements,
                } => tracing::debug_span!("place", %run_id, attempt, nodes = placements.len()),
                Decision::Preempt {
                    run_id,
                    attempt,
                    for_run,
                } => tracing::debug_span!("preempt", %run_id, attempt, %for_run),
            };
            server
                .coordinator
                .propose(d.into_command(now).with_secret(attempt_secret()))
                .instrument(span)
        });
        for result in join_all(proposals).await {
            // A rejected decision means the state moved on; the next pass decides again.
            if let Err(e) = result {
                tracing::debug!(cause = %e, "decision not applied");
            }
        }
    }
}

/// A fresh secret for a placed attempt (128 random bits, hex): the ranks of a distributed
/// attempt present it to each other's agents. Chosen here, by the proposer, because core
/// has no randomness.
fn attempt_secret() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}
