//! The autoscaling loop: on every state change (at most once per
//! `autoscale_min_interval`), and at least once a second while a target autoscales (idle
//! times pass without events; [`crate::leader::tick`]), ask muster-core's `autoscale()` for scale decisions and propose each through
//! Raft (`ScaleCompute`); then have each compute target's provisioner act on the applied
//! state (`provision::plan`), which it reports back with `Provisioned`.
//!
//! A decision is applied before anything is started, and a provisioner only acts on what
//! is applied, so a failover neither starts a node twice nor forgets one: the new leader
//! reads the same requested nodes and finishes what the old one did not report.

use std::sync::Arc;

use muster_core::autoscale;
use tokio::time::Instant;

use crate::coordinator::now_ms;
use crate::leader::provision::{Provisioners, plan};
use crate::server::Server;

pub(crate) async fn run(server: Arc<Server>) {
    let mut changes = server.coordinator.subscribe();
    let min_interval = server.config.autoscale_min_interval;
    let mut last = Instant::now() - min_interval;
    let mut provisioners = Provisioners::default();
    let mut leading = false;
    loop {
        let busy = server.coordinator.read(|s| {
            !s.scaling.is_empty() || s.computes.values().any(|c| c.spec.scale_bounds().is_some())
        });
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(crate::leader::tick(busy)) => {}
        }
        tokio::time::sleep_until(last + min_interval).await;
        last = Instant::now();
        if !server.coordinator.is_leader() {
            if leading {
                provisioners.forget();
                leading = false;
            }
            continue;
        }
        leading = true;
        let now = now_ms();
        let decisions = server.coordinator.read(|s| autoscale(s, now));
        for d in decisions {
            tracing::info!(
                compute = %d.compute,
                add = ?d.add,
                remove = ?d.remove,
                reason = %d.reason,
                "autoscaler"
            );
            // A rejected decision means the state moved on; the next pass decides again.
            if let Err(e) = server.coordinator.propose(d.into_command(now)).await {
                tracing::debug!(cause = %e, "scale decision not applied");
            }
        }
        let work = server.coordinator.read(plan);
        for w in work {
            if !server.coordinator.is_leader() {
                break;
            }
            provisioners.reconcile(&server, w).await;
        }
    }
}
