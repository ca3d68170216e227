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

use tokio::task::JoinHandle;

use crate::server::Server;

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
