//! # leader: loops that decide and propose
//!
//! Loops that run on every server but act only while it leads the Raft group: each asks
//! muster-core for decisions over the applied state (schedule, sweep and pipeline steps,
//! autoscaling, node liveness, retention) and proposes them; the provisioners (`provision/`) turn the
//! applied scale decisions into machines.
//!
//! May import: `effects`, `views`, `coordinator`, `store`, muster-core. Never the
//! transport (`grpc/`, `web/`).

mod autoscale;
pub(crate) mod heartbeats;
mod pipelines;
pub(crate) mod provision;
mod retention;
mod scheduling;
pub(crate) mod sweeps;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::server::Server;

/// How long a loop waits for a state change before it passes anyway: a second while it
/// has work that time alone moves on (a queued run's backoff ends, a sweep's timeout, an
/// autoscaled node's idle time), else half a minute: new work (a submission, a sweep, a
/// new compute target) is a state change, which wakes the loop at once, so an idle
/// `muster dev` does not wake four loops every second.
pub(crate) fn tick(busy: bool) -> Duration {
    if busy {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(30)
    }
}

/// Starts the leader loops; the caller aborts them at shutdown.
pub(crate) fn spawn(server: Arc<Server>) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(scheduling::run(server.clone())),
        tokio::spawn(heartbeats::run(server.clone())),
        tokio::spawn(pipelines::run(server.clone())),
        tokio::spawn(sweeps::run(server.clone())),
        tokio::spawn(autoscale::run(server.clone())),
        tokio::spawn(retention::run(server)),
    ]
}
