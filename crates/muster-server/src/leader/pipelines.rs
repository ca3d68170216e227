//! The pipeline loop: on every state change (at most once per `scheduler_min_interval`),
//! and at least once a second while one is unfinished ([`crate::leader::tick`]), ask muster-core's planner (`State::pipeline_plan`) what
//! each unfinished pipeline does next, and propose each decision through Raft. The leader
//! chooses the run id of a started step; each step is then an ordinary run.
//!
//! Decisions are applied before anything runs, and applying one about a step that already
//! has a decision is rejected, so a failover neither loses a step (the new leader plans
//! from the same applied state) nor duplicates one (a stale proposal is refused).

use std::sync::Arc;

use muster_core::Command;
use muster_core::pipeline::PipelineDecision;
use tokio::time::Instant;

use crate::coordinator::{new_run_id, now_ms};
use crate::server::Server;

pub(crate) async fn run(server: Arc<Server>) {
    let mut changes = server.coordinator.subscribe();
    let min_interval = server.config.scheduler_min_interval;
    let mut last = Instant::now() - min_interval;
    loop {
        let busy = server
            .coordinator
            .read(|s| s.pipelines.values().any(|p| p.finished.is_none()));
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(crate::leader::tick(busy)) => {}
        }
        tokio::time::sleep_until(last + min_interval).await;
        last = Instant::now();
        if !server.coordinator.is_leader() {
            continue;
        }
        pass(&server).await;
    }
}

/// One planning pass over every unfinished pipeline.
async fn pass(server: &Server) {
    let plans: Vec<(String, Vec<PipelineDecision>)> = server.coordinator.read(|s| {
        s.pipelines
            .values()
            .filter(|p| p.finished.is_none())
            .map(|p| (p.id.clone(), s.pipeline_plan(&p.id)))
            .filter(|(_, d)| !d.is_empty())
            .collect()
    });
    for (pipeline_id, decisions) in plans {
        // In order: a plan's later decisions may rest on earlier ones (a reuse that
        // completes a step its dependent then starts from).
        for decision in decisions {
            if !server.coordinator.is_leader() {
                return;
            }
            let run_id = matches!(decision, PipelineDecision::StartStep { .. }).then(new_run_id);
            tracing::debug!(pipeline = %pipeline_id, ?run_id, decision = decision_name(&decision), "pipeline decision");
            let cmd = Command::PipelineDecision {
                pipeline_id: pipeline_id.clone(),
                decision,
                run_id,
                at: now_ms(),
            };
            // A rejected decision means the state moved on; the next pass plans again.
            if let Err(e) = server.coordinator.propose(cmd).await {
                tracing::debug!(pipeline = %pipeline_id, cause = %e, "pipeline decision not applied");
                break;
            }
        }
    }
}

fn decision_name(d: &PipelineDecision) -> String {
    match d {
        PipelineDecision::StartStep { step, .. } => format!("start {step}"),
        PipelineDecision::ReuseStep { step, .. } => format!("reuse {step}"),
        PipelineDecision::FailStep { step, .. } => format!("fail {step}"),
        PipelineDecision::Finish { succeeded, .. } => format!("finish (succeeded: {succeeded})"),
    }
}
