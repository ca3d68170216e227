//! The autoscaling loop: on every state change (at most once per
//! `autoscale_min_interval`), and at least once a second (idle times pass without
//! events), ask muster-core's `autoscale()` for scale decisions and propose each through
//! Raft (`ScaleCompute`); then have each compute target's provisioner act on the applied
//! state (`provision::plan`), which it reports back with `Provisioned`.
//!
//! A decision is applied before anything is started, and a provisioner only acts on what
//! is applied, so a failover neither starts a node twice nor forgets one: the new leader
//! reads the same requested nodes and finishes what the old one did not report.

use std::sync::Arc;
use std::time::Duration;

use muster_core::autoscale;
use tokio::time::Instant;

use crate::coordinator::{Coordinator, now_ms};
use crate::provision::{Provisioners, plan};

pub(crate) async fn run(coordinator: Arc<Coordinator>) {
    let mut changes = coordinator.subscribe();
    let min_interval = coordinator.config.autoscale_min_interval;
    let mut last = Instant::now() - min_interval;
    let mut provisioners = Provisioners::default();
    let mut leading = false;
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        tokio::time::sleep_until(last + min_interval).await;
        last = Instant::now();
        if !coordinator.is_leader() {
            if leading {
                provisioners.forget();
                leading = false;
            }
            continue;
        }
        leading = true;
        let now = now_ms();
        let decisions = coordinator.read(|s| autoscale(s, now));
        for d in decisions {
            tracing::info!(
                compute = %d.compute,
                add = ?d.add,
                remove = ?d.remove,
                reason = %d.reason,
                "autoscaler"
            );
            // A rejected decision means the state moved on; the next pass decides again.
            if let Err(e) = coordinator.propose(d.into_command(now)).await {
                tracing::debug!(cause = %e, "scale decision not applied");
            }
        }
        let work = coordinator.read(plan);
        for w in work {
            if !coordinator.is_leader() {
                break;
            }
            provisioners.reconcile(&coordinator, w).await;
        }
    }
}
