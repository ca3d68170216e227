//! Sweeps in the replicated state: the sweep, its trials (each a run), and applying the
//! controller's decisions ([`Command::SubmitSweep`], [`Command::SweepDecision`]).
//!
//! A trial's status comes from its run; its metric series is not in the state (metrics live
//! in the server's metric store): the leader passes each trial's primary-metric series to
//! [`State::sweep_trial_views`] and gives the views to [`crate::sweep::step`].
//!
//! Applying a decision is idempotent: a `StartTrial` whose index is not the next one, a
//! `CancelTrial` of a trial already stopping or ended, or a `Finish` of a finished sweep is
//! rejected and changes nothing, so a decision proposed twice (a leader change between
//! proposing and learning the outcome) is applied once.

use serde::{Deserialize, Serialize};

use crate::Millis;
use crate::metrics::Series;
use crate::state::{Applied, ApplyError, Command, RunState, State, SweepRule};
use crate::sweep::{
    Params, StopReason, SweepDecision, SweepEnd, SweepSpec, TrialStatus, TrialView, step,
    step_canceled,
};

/// One trial of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Its index (its position in [`Sweep::trials`]).
    pub index: u32,
    /// Its run.
    pub run_id: String,
    /// The parameters it was started with.
    pub params: Params,
    /// Why the controller stopped it, if it did.
    pub stopped: Option<StopReason>,
}

/// How a sweep ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepFinish {
    /// How.
    pub end: SweepEnd,
    /// The best trial by the primary metric.
    pub best_trial: Option<u32>,
    /// When.
    pub at: Millis,
}

/// A sweep as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    /// Its id, chosen by the proposer.
    pub id: String,
    /// What it searches.
    pub spec: SweepSpec,
    /// The sampler's seed, fixed at submission.
    pub seed: u64,
    /// When it was accepted (its timeout counts from here).
    pub created_at: Millis,
    /// Its trials, in index order.
    pub trials: Vec<Trial>,
    /// Set once it ended.
    pub finished: Option<SweepFinish>,
    /// A person canceled it, with this reason: no trial starts, it finishes as canceled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested: Option<String>,
}

// The spec's numbers are validated finite at submission, so equality is total.
impl Eq for Sweep {}

impl Sweep {
    /// Whether it is over.
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }
}

fn trial_status(state: RunState) -> TrialStatus {
    match state {
        RunState::Completed => TrialStatus::Completed,
        RunState::Failed | RunState::TimedOut => TrialStatus::Failed,
        RunState::Canceled => TrialStatus::Cancelled,
        _ => TrialStatus::Active,
    }
}

fn rejected(sweep_id: &str, rule: SweepRule) -> ApplyError {
    ApplyError::SweepRejected {
        sweep_id: sweep_id.to_string(),
        rule,
    }
}

fn unknown(sweep_id: &str) -> ApplyError {
    ApplyError::UnknownSweep(sweep_id.to_string())
}

impl State {
    /// The controller's view of a sweep's trials: `series[i]` is trial `i`'s primary-metric
    /// series from the metric store (a trial without one, or past the slice's end, has
    /// logged nothing yet).
    pub fn sweep_trial_views<'a>(
        &'a self,
        sweep: &'a Sweep,
        series: &'a [Series],
    ) -> Vec<TrialView<'a>> {
        static EMPTY: Series = Series::new();
        sweep
            .trials
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let metric = series.get(i).unwrap_or(&EMPTY);
                let run = self.runs.get(&t.run_id);
                let status = run.map_or(TrialStatus::Failed, |r| trial_status(r.state));
                TrialView {
                    index: t.index,
                    params: &t.params,
                    status,
                    stopping: t.stopped.is_some() || run.is_some_and(|r| r.cancel_requested),
                    metric,
                }
            })
            .collect()
    }

    /// The controller's decisions for sweep `sweep_id` now ([`crate::sweep::step`], or
    /// [`crate::sweep::step_canceled`] once canceled; nothing once finished). `series` as
    /// for [`State::sweep_trial_views`].
    pub fn sweep_step(&self, sweep_id: &str, series: &[Series], now: Millis) -> Vec<SweepDecision> {
        let Some(sweep) = self.sweeps.get(sweep_id) else {
            return Vec::new();
        };
        if sweep.is_finished() {
            return Vec::new();
        }
        let views = self.sweep_trial_views(sweep, series);
        if sweep.cancel_requested.is_some() {
            return step_canceled(sweep.spec.objective.goal, &views);
        }
        step(&sweep.spec, sweep.seed, sweep.created_at, &views, now)
    }

    pub(crate) fn cancel_sweep(
        &mut self,
        sweep_id: &str,
        reason: Option<&str>,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        let sweep = self.sweeps.get(sweep_id).ok_or_else(|| unknown(sweep_id))?;
        if sweep.is_finished() || sweep.cancel_requested.is_some() {
            return Err(rejected(sweep_id, SweepRule::FinishedOrCanceling));
        }
        let why = reason.unwrap_or("canceled by user").to_string();
        let active: Vec<String> = sweep
            .trials
            .iter()
            .map(|t| t.run_id.clone())
            .filter(|r| self.runs.get(r).is_some_and(|r| !r.state.is_terminal()))
            .collect();
        for run_id in active {
            self.apply(&Command::CancelRun {
                run_id,
                reason: Some(format!("sweep {sweep_id}: {why}")),
                at,
            })?;
        }
        let sweep = self.sweeps.get_mut(sweep_id).expect("checked above");
        sweep.cancel_requested = Some(why);
        Ok(Applied::Done)
    }

    pub(crate) fn submit_sweep(
        &mut self,
        sweep_id: &str,
        spec: &SweepSpec,
        seed: u64,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        spec.validate()?;
        if !self.computes.contains_key(&spec.trial.compute) {
            return Err(ApplyError::UnknownCompute(spec.trial.compute.clone()));
        }
        if self.sweeps.contains_key(sweep_id) {
            return Err(ApplyError::SweepExists(sweep_id.to_string()));
        }
        self.sweeps.insert(
            sweep_id.to_string(),
            Sweep {
                id: sweep_id.to_string(),
                spec: spec.clone(),
                seed,
                created_at: at,
                trials: Vec::new(),
                finished: None,
                cancel_requested: None,
            },
        );
        Ok(Applied::Done)
    }

    pub(crate) fn apply_sweep_decision(
        &mut self,
        sweep_id: &str,
        decision: &SweepDecision,
        run_id: Option<&str>,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        let sweep = self.sweeps.get(sweep_id).ok_or_else(|| unknown(sweep_id))?;
        if sweep.is_finished() {
            return Err(rejected(sweep_id, SweepRule::Finished));
        }
        match decision {
            SweepDecision::StartTrial { index, params } => {
                if sweep.cancel_requested.is_some() {
                    return Err(rejected(sweep_id, SweepRule::Canceling));
                }
                let run_id = run_id.ok_or_else(|| rejected(sweep_id, SweepRule::MissingRunId))?;
                if *index as usize != sweep.trials.len() {
                    return Err(rejected(
                        sweep_id,
                        SweepRule::NotNextTrial {
                            index: *index,
                            next: sweep.trials.len() as u32,
                        },
                    ));
                }
                if *index >= sweep.spec.limits.max_total_trials {
                    return Err(rejected(sweep_id, SweepRule::MaxTotalTrials));
                }
                let active = sweep
                    .trials
                    .iter()
                    .filter(|t| {
                        self.runs
                            .get(&t.run_id)
                            .is_some_and(|r| !r.state.is_terminal())
                    })
                    .count();
                if active >= sweep.spec.limits.max_concurrent_trials as usize {
                    return Err(rejected(sweep_id, SweepRule::MaxConcurrentTrials));
                }
                let mut spec = sweep.spec.trial_run(params)?;
                spec.tags
                    .insert("muster.sweep".into(), sweep_id.to_string());
                spec.tags.insert("muster.trial".into(), index.to_string());
                if spec.display_name.is_none() {
                    let name = sweep.spec.display_name.as_deref().unwrap_or(sweep_id);
                    spec.display_name = Some(format!("{name} trial {index}"));
                }
                self.apply(&Command::SubmitRun {
                    run_id: run_id.to_string(),
                    spec: Box::new(spec),
                    idempotency_key: None,
                    at,
                })?;
                let sweep = self.sweeps.get_mut(sweep_id).expect("checked above");
                sweep.trials.push(Trial {
                    index: *index,
                    run_id: run_id.to_string(),
                    params: params.clone(),
                    stopped: None,
                });
                Ok(Applied::Done)
            }
            SweepDecision::CancelTrial { index, reason } => {
                let trial = sweep
                    .trials
                    .get(*index as usize)
                    .ok_or_else(|| rejected(sweep_id, SweepRule::UnknownTrial(*index)))?;
                if trial.stopped.is_some() {
                    return Err(rejected(sweep_id, SweepRule::TrialStopping(*index)));
                }
                let run_id = trial.run_id.clone();
                self.apply(&Command::CancelRun {
                    run_id,
                    reason: Some(reason.to_string()),
                    at,
                })?;
                let sweep = self.sweeps.get_mut(sweep_id).expect("checked above");
                sweep.trials[*index as usize].stopped = Some(reason.clone());
                Ok(Applied::Done)
            }
            SweepDecision::Finish { end, best_trial } => {
                if let Some(t) = sweep.trials.iter().find(|t| {
                    self.runs
                        .get(&t.run_id)
                        .is_some_and(|r| !r.state.is_terminal())
                }) {
                    return Err(rejected(sweep_id, SweepRule::TrialActive(t.index)));
                }
                if best_trial.is_some_and(|b| b as usize >= sweep.trials.len()) {
                    return Err(rejected(sweep_id, SweepRule::UnknownBestTrial));
                }
                let sweep = self.sweeps.get_mut(sweep_id).expect("checked above");
                sweep.finished = Some(SweepFinish {
                    end: *end,
                    best_trial: *best_trial,
                    at,
                });
                Ok(Applied::Done)
            }
        }
    }

    /// Checks the sweeps against the runs (part of [`State::sanity_check`]).
    pub(crate) fn check_sweeps(&self) -> Result<(), String> {
        for (id, sweep) in &self.sweeps {
            if id != &sweep.id {
                return Err(format!("sweep {id} is stored under another id"));
            }
            let mut active = 0;
            for (i, t) in sweep.trials.iter().enumerate() {
                if t.index as usize != i {
                    return Err(format!("sweep {id}: trial {} at position {i}", t.index));
                }
                let run = self.runs.get(&t.run_id).ok_or_else(|| {
                    format!("sweep {id}: trial {i}'s run {} is missing", t.run_id)
                })?;
                if !run.state.is_terminal() {
                    active += 1;
                }
            }
            if sweep.trials.len() > sweep.spec.limits.max_total_trials as usize {
                return Err(format!("sweep {id} has more trials than max_total_trials"));
            }
            if sweep.finished.is_some() && active > 0 {
                return Err(format!("sweep {id} finished with {active} active trials"));
            }
        }
        Ok(())
    }
}
