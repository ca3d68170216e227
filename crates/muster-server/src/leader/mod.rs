//! Loops that run on every server but act only while it leads the Raft group.

mod autoscale;
pub(crate) mod heartbeats;
mod pipelines;
mod scheduling;
pub(crate) mod sweeps;

use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::coordinator::Coordinator;

/// Starts the leader loops; the caller aborts them at shutdown.
pub(crate) fn spawn(coordinator: Arc<Coordinator>) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(scheduling::run(coordinator.clone())),
        tokio::spawn(heartbeats::run(coordinator.clone())),
        tokio::spawn(pipelines::run(coordinator.clone())),
        tokio::spawn(sweeps::run(coordinator.clone())),
        tokio::spawn(autoscale::run(coordinator)),
    ]
}
