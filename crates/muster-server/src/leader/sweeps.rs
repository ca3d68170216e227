//! The sweep controller loop: on every state change and every metric the store takes (at
//! most once per 200 ms), and at least once a second while one is unfinished (timeouts pass
//! without events; [`crate::leader::tick`]), for every sweep
//! not yet finished, ask muster-core's `State::sweep_step` for decisions (start a trial,
//! cancel a trial, finish) given each trial's primary-metric series from the metric
//! store, and propose each through Raft.
//!
//! The leader chooses a new trial's run id; the trial is a normal run with the trial's spec
//! (the state machine submits it when it applies the decision). A failover neither loses
//! nor duplicates trials: decisions are computed from the replicated state only, and the
//! state machine refuses a start whose index is not the next one, a cancel of a trial
//! already stopping, and a finish of a finished sweep, so a decision proposed by both the
//! old and the new leader is applied once.

use std::sync::Arc;
use std::time::Duration;

use muster_core::Command;
use muster_core::state::Sweep;
use muster_core::sweep::SweepDecision;
use tokio::time::Instant;

use crate::coordinator::{new_run_id, now_ms};
use crate::server::Server;
use crate::views::sweeps::trial_series;

const MIN_INTERVAL: Duration = Duration::from_millis(200);

pub(crate) async fn run(server: Arc<Server>) {
    let mut changes = server.coordinator.subscribe();
    let mut metrics = server.store.series.subscribe();
    let mut last = Instant::now() - MIN_INTERVAL;
    loop {
        let busy = server
            .coordinator
            .read(|s| s.sweeps.values().any(|x| x.finished.is_none()));
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            changed = metrics.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(crate::leader::tick(busy)) => {}
        }
        tokio::time::sleep_until(last + MIN_INTERVAL).await;
        last = Instant::now();
        if !server.coordinator.is_leader() {
            continue;
        }
        pass(&server).await;
    }
}

/// One controller pass over every sweep not yet finished.
async fn pass(server: &Server) {
    let sweeps: Vec<Sweep> = server.coordinator.read(|s| {
        s.sweeps
            .values()
            .filter(|s| !s.is_finished())
            .cloned()
            .collect()
    });
    for sweep in sweeps {
        // The series are read outside the state lock; trials decided meanwhile are treated
        // as having logged nothing (the next pass sees them).
        let series = trial_series(server, &sweep);
        let now = now_ms();
        let decisions = server
            .coordinator
            .read(|s| s.sweep_step(&sweep.id, &series, now));
        for decision in decisions {
            if !server.coordinator.is_leader() {
                return;
            }
            let cmd = decision_command(&sweep.id, decision, now);
            match server.coordinator.propose(cmd.clone()).await {
                Ok(_) => log_applied(&cmd),
                Err(e) => {
                    // The state moved on (or leadership did); the next pass decides again.
                    tracing::debug!(sweep = %sweep.id, cause = %e, "sweep decision not applied");
                    break;
                }
            }
        }
    }
}

/// The command for one decision: a new trial gets a fresh run id chosen here.
pub(crate) fn decision_command(sweep_id: &str, decision: SweepDecision, now: u64) -> Command {
    let run_id = matches!(decision, SweepDecision::StartTrial { .. }).then(new_run_id);
    Command::SweepDecision {
        sweep_id: sweep_id.to_string(),
        decision,
        run_id,
        at: now,
    }
}

fn log_applied(cmd: &Command) {
    let Command::SweepDecision {
        sweep_id,
        decision,
        run_id,
        ..
    } = cmd
    else {
        return;
    };
    match decision {
        SweepDecision::StartTrial { index, params } => tracing::info!(
            sweep = %sweep_id,
            trial = index,
            run = run_id.as_deref().unwrap_or_default(),
            ?params,
            "sweep trial started"
        ),
        SweepDecision::CancelTrial { index, reason } => {
            tracing::info!(sweep = %sweep_id, trial = index, %reason, "sweep trial canceled")
        }
        SweepDecision::Finish { end, best_trial } => {
            tracing::info!(sweep = %sweep_id, ?end, ?best_trial, "sweep finished")
        }
    }
}

#[cfg(test)]
mod tests {
    use muster_core::State;
    use muster_core::compute::{ComputeKind, ComputeSpec};
    use muster_core::sweep::parse_sweep_yaml;

    use super::*;

    const SWEEP: &str = "type: sweep
trial:
  command: echo ${{search_space.lr}}
  compute: local
sampling_algorithm: random
search_space:
  lr:
    type: uniform
    min_value: 0
    max_value: 1
objective:
  primary_metric: accuracy
  goal: maximize
limits:
  max_total_trials: 3
  max_concurrent_trials: 2
";

    fn state() -> State {
        let mut s = State::default();
        s.apply(&Command::CreateCompute {
            spec: ComputeSpec::new("local", ComputeKind::Local),
            at: 0,
        })
        .unwrap();
        let spec = parse_sweep_yaml(SWEEP, "e").unwrap();
        s.apply(&Command::SubmitSweep {
            sweep_id: "sw".into(),
            spec: Box::new(spec),
            seed: 5,
            at: 0,
        })
        .unwrap();
        s
    }

    /// An old leader and a new one compute the same step from the same replicated state
    /// and both propose it, each with its own fresh run ids: the decisions the second
    /// proposes are refused and change nothing; no trial is lost or duplicated.
    #[test]
    fn decisions_proposed_by_two_leaders_apply_once() {
        let mut s = state();
        let old = s.sweep_step("sw", &[], 1);
        let new = s.sweep_step("sw", &[], 1);
        assert_eq!(old, new, "both leaders decide the same from the same state");
        assert_eq!(old.len(), 2, "two trials start (max_concurrent_trials)");
        for d in old {
            s.apply(&decision_command("sw", d, 1)).unwrap();
        }
        let after_old = s.clone();
        for d in new {
            let cmd = decision_command("sw", d, 2);
            assert!(s.apply(&cmd).is_err(), "{cmd:?} is refused");
            assert_eq!(s, after_old, "a refused decision changes nothing");
        }
        let sweep = &s.sweeps["sw"];
        assert_eq!(sweep.trials.len(), 2);
        assert_eq!(s.runs.len(), 2, "one run per trial");
        for t in &sweep.trials {
            assert!(s.runs.contains_key(&t.run_id));
        }
        s.sanity_check().unwrap();
        // The next step from the new state starts nothing more (both slots are taken).
        assert!(s.sweep_step("sw", &[], 3).is_empty());
    }

    /// A cancel proposed twice (a policy decision repeated by a new leader) cancels once.
    #[test]
    fn a_repeated_cancel_is_refused() {
        use muster_core::sweep::{CancelReason, StopReason};
        let mut s = state();
        for d in s.sweep_step("sw", &[], 1) {
            s.apply(&decision_command("sw", d, 1)).unwrap();
        }
        let cancel = SweepDecision::CancelTrial {
            index: 0,
            reason: StopReason::EarlyTermination(CancelReason {
                policy: "bandit".into(),
                interval: 1,
                detail: "0.1 < 0.8 / 1.2".into(),
            }),
        };
        s.apply(&decision_command("sw", cancel.clone(), 2)).unwrap();
        let after = s.clone();
        assert!(s.apply(&decision_command("sw", cancel, 3)).is_err());
        assert_eq!(s, after);
        let run = &s.runs[&s.sweeps["sw"].trials[0].run_id];
        assert!(run.state.is_terminal() || run.cancel_requested);
    }
}
