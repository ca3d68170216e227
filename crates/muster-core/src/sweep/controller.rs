//! One step of the sweep controller, as a pure function.
//!
//! The leader calls [`step`] with the sweep's replicated state (the spec, its seed, when it
//! started, and every trial decided so far) and `now`, proposes the returned decisions
//! through Raft, and calls it again when something changes (a trial's state or metrics) or
//! on a tick. [`step`] depends only on its arguments: a new leader computing it from the
//! same replicated state gets the same decisions, and a decision already applied is not
//! repeated (trial `i` is started only while `i` trials exist; the state machine refuses a
//! [`SweepDecision::StartTrial`] whose index is not the next one, so a decision proposed
//! twice is applied once). Trial `i`'s parameters depend only on the seed, `i` and the
//! results known when it is decided, and the decision records them.

use serde::{Deserialize, Serialize};

use super::policy::{CancelReason, PolicyTrial, evaluate};
use super::sampler::{Observation, sample};
use super::{Goal, Params, SweepSpec};
use crate::Millis;
use crate::metrics::Series;

/// Where a trial is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialStatus {
    /// Queued or running.
    Active,
    /// Finished successfully.
    Completed,
    /// Failed (or timed out).
    Failed,
    /// Cancelled (by a policy, the sweep's timeout or a person).
    Cancelled,
}

/// A trial as the controller sees it. `trials[i].index == i`.
#[derive(Debug, Clone, Copy)]
pub struct TrialView<'a> {
    /// The trial's index in the sweep (0-based, in start order).
    pub index: u32,
    /// The parameters it was started with.
    pub params: &'a Params,
    /// Where it is.
    pub status: TrialStatus,
    /// True once a cancellation has been decided (it is still active until its run ends).
    pub stopping: bool,
    /// Its primary metric's series.
    pub metric: &'a Series,
}

/// Why the controller cancels a trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StopReason {
    /// The early-termination policy.
    EarlyTermination(CancelReason),
    /// The sweep's `limits.timeout` passed.
    SweepTimedOut {
        /// The limit, in seconds.
        timeout_s: u64,
    },
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::EarlyTermination(r) => write!(f, "{r}"),
            StopReason::SweepTimedOut { timeout_s } => {
                write!(f, "the sweep's timeout of {timeout_s} s passed")
            }
        }
    }
}

/// How a sweep ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepEnd {
    /// Every trial allowed (max_total_trials, or the whole grid) ran.
    Completed,
    /// `limits.timeout` passed.
    TimedOut,
    /// A person canceled it.
    Canceled,
}

/// What the controller decides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SweepDecision {
    /// Start trial `index` (always the next one) with `params`.
    StartTrial {
        /// The trial's index.
        index: u32,
        /// Its parameters.
        params: Params,
    },
    /// Cancel an active trial.
    CancelTrial {
        /// The trial's index.
        index: u32,
        /// Why.
        reason: StopReason,
    },
    /// The sweep is over: no trial is active and none will start.
    Finish {
        /// How it ended.
        end: SweepEnd,
        /// The best trial by the primary metric, if any trial logged it.
        best_trial: Option<u32>,
    },
}

/// The trials ranked by their best primary-metric value (best first); trials without a
/// value come last, in index order. Ties keep index order.
pub fn rank_trials(goal: Goal, trials: &[TrialView<'_>]) -> Vec<(u32, Option<f64>)> {
    let mut ranked: Vec<(u32, Option<f64>)> = trials
        .iter()
        .map(|t| (t.index, t.metric.best(goal)))
        .collect();
    ranked.sort_by(|a, b| match (a.1, b.1) {
        (Some(x), Some(y)) => match goal {
            Goal::Maximize => y.total_cmp(&x),
            Goal::Minimize => x.total_cmp(&y),
        }
        .then(a.0.cmp(&b.0)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.0.cmp(&b.0),
    });
    ranked
}

fn best_trial(goal: Goal, trials: &[TrialView<'_>]) -> Option<u32> {
    rank_trials(goal, trials)
        .first()
        .and_then(|(i, v)| v.map(|_| *i))
}

/// The step of a sweep a person canceled: its trials' runs were canceled when the cancel
/// was applied; once none is active the sweep finishes as [`SweepEnd::Canceled`] with the
/// best trial so far. No trial starts.
pub fn step_canceled(goal: Goal, trials: &[TrialView<'_>]) -> Vec<SweepDecision> {
    if trials.iter().any(|t| t.status == TrialStatus::Active) {
        return Vec::new();
    }
    vec![SweepDecision::Finish {
        end: SweepEnd::Canceled,
        best_trial: best_trial(goal, trials),
    }]
}

/// One controller step: see the module docs. `seed` is the sweep's effective seed
/// ([`SweepSpec::seed_or`]), `started_at` when the sweep was accepted.
pub fn step(
    spec: &SweepSpec,
    seed: u64,
    started_at: Millis,
    trials: &[TrialView<'_>],
    now: Millis,
) -> Vec<SweepDecision> {
    debug_assert!(
        trials
            .iter()
            .enumerate()
            .all(|(i, t)| t.index as usize == i)
    );
    let goal = spec.objective.goal;
    let mut out = Vec::new();
    let active: Vec<&TrialView<'_>> = trials
        .iter()
        .filter(|t| t.status == TrialStatus::Active)
        .collect();

    let deadline = started_at.saturating_add(spec.limits.timeout_s.saturating_mul(1000));
    if now >= deadline {
        for t in active.iter().filter(|t| !t.stopping) {
            out.push(SweepDecision::CancelTrial {
                index: t.index,
                reason: StopReason::SweepTimedOut {
                    timeout_s: spec.limits.timeout_s,
                },
            });
        }
        if active.is_empty() {
            out.push(SweepDecision::Finish {
                end: SweepEnd::TimedOut,
                best_trial: best_trial(goal, trials),
            });
        }
        return out;
    }

    if let Some(policy) = &spec.early_termination {
        let values: Vec<Vec<f64>> = trials.iter().map(|t| t.metric.values().collect()).collect();
        let views: Vec<PolicyTrial<'_>> = trials
            .iter()
            .zip(&values)
            .map(|(t, v)| PolicyTrial {
                index: t.index,
                active: t.status == TrialStatus::Active && !t.stopping,
                values: v,
            })
            .collect();
        for (index, reason) in evaluate(policy, goal, &views) {
            out.push(SweepDecision::CancelTrial {
                index,
                reason: StopReason::EarlyTermination(reason),
            });
        }
    }

    let observations: Vec<Observation<'_>> = trials
        .iter()
        .filter(|t| t.status != TrialStatus::Active)
        .filter_map(|t| {
            t.metric.best(goal).map(|value| Observation {
                params: t.params,
                value,
            })
        })
        .collect();
    let slots = spec
        .limits
        .max_concurrent_trials
        .saturating_sub(active.len() as u32);
    let next = trials.len() as u32;
    let mut started = 0;
    for index in next..next.saturating_add(slots) {
        if index >= spec.limits.max_total_trials {
            break;
        }
        let Some(params) = sample(
            &spec.sampling,
            &spec.search_space,
            goal,
            &observations,
            seed,
            index,
        ) else {
            break;
        };
        out.push(SweepDecision::StartTrial { index, params });
        started += 1;
    }
    if active.is_empty() && started == 0 {
        out.push(SweepDecision::Finish {
            end: SweepEnd::Completed,
            best_trial: best_trial(goal, trials),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{ParamValue, Sampling, parse_sweep_yaml};

    /// A simulated trial: its params, status, stopping flag and metric.
    #[derive(Debug, Clone)]
    struct Sim {
        params: Params,
        status: TrialStatus,
        stopping: bool,
        metric: Series,
        cancelled_by: Option<StopReason>,
    }

    fn views(sims: &[Sim]) -> Vec<TrialView<'_>> {
        sims.iter()
            .enumerate()
            .map(|(i, s)| TrialView {
                index: i as u32,
                params: &s.params,
                status: s.status,
                stopping: s.stopping,
                metric: &s.metric,
            })
            .collect()
    }

    /// Applies decisions as the state machine would: a start must have the next index.
    fn apply(sims: &mut Vec<Sim>, decisions: &[SweepDecision]) -> Option<(SweepEnd, Option<u32>)> {
        let mut finished = None;
        for d in decisions {
            match d {
                SweepDecision::StartTrial { index, params } => {
                    if *index as usize == sims.len() {
                        sims.push(Sim {
                            params: params.clone(),
                            status: TrialStatus::Active,
                            stopping: false,
                            metric: Series::new(),
                            cancelled_by: None,
                        });
                    }
                }
                SweepDecision::CancelTrial { index, reason } => {
                    let s = &mut sims[*index as usize];
                    if s.status == TrialStatus::Active && !s.stopping {
                        s.stopping = true;
                        s.cancelled_by = Some(reason.clone());
                    }
                }
                SweepDecision::Finish { end, best_trial } => finished = Some((*end, *best_trial)),
            }
        }
        finished
    }

    fn spec(extra: &str, sampling: &str, total: u32, concurrent: u32) -> SweepSpec {
        parse_sweep_yaml(
            &format!(
                "type: sweep\ntrial:\n  command: python t.py --x ${{{{search_space.x}}}}\nsampling_algorithm: {sampling}\nsearch_space:\n  x:\n    type: uniform\n    min_value: 0\n    max_value: 1\nobjective:\n  primary_metric: acc\n  goal: maximize\nlimits:\n  max_total_trials: {total}\n  max_concurrent_trials: {concurrent}\n  timeout: 1000\n{extra}"
            ),
            "e",
        )
        .unwrap()
    }

    /// The objective of the simulated script: accuracy is x, reported over 5 intervals
    /// approaching it.
    fn simulate_tick(sims: &mut [Sim]) {
        for s in sims.iter_mut().filter(|s| s.status == TrialStatus::Active) {
            if s.stopping {
                s.status = TrialStatus::Cancelled;
                continue;
            }
            let x = s.params["x"].as_f64().unwrap();
            let n = s.metric.len() as f64;
            s.metric.push(None, x * (n + 1.0) / 5.0);
            if s.metric.len() == 5 {
                s.status = TrialStatus::Completed;
            }
        }
    }

    /// Runs a sweep to its end; `crash_after` drops the second half of each step's
    /// decisions (a leader dying mid-proposal) the first few steps.
    fn run(spec: &SweepSpec, seed: u64, crash_steps: usize) -> (Vec<Sim>, SweepEnd, Option<u32>) {
        let mut sims = Vec::new();
        for round in 0..1000 {
            let mut decisions = step(spec, seed, 0, &views(&sims), round * 10);
            if round < crash_steps as u64 {
                decisions.truncate(decisions.len() / 2);
            }
            // Starts within one step never exceed the concurrency limit.
            let active = sims
                .iter()
                .filter(|s| s.status == TrialStatus::Active)
                .count();
            let starts = decisions
                .iter()
                .filter(|d| matches!(d, SweepDecision::StartTrial { .. }))
                .count();
            assert!(active + starts <= spec.limits.max_concurrent_trials as usize);
            if let Some((end, best)) = apply(&mut sims, &decisions) {
                return (sims, end, best);
            }
            // Idempotence: a leader recomputing from the applied state proposes nothing
            // already applied.
            let again = step(spec, seed, 0, &views(&sims), round * 10);
            let restarts: Vec<usize> = again
                .iter()
                .filter_map(|d| match d {
                    SweepDecision::StartTrial { index, .. } => Some(*index as usize),
                    _ => None,
                })
                .collect();
            let expected: Vec<usize> = (sims.len()..sims.len() + restarts.len()).collect();
            assert_eq!(restarts, expected);
            simulate_tick(&mut sims);
        }
        panic!("the sweep did not end");
    }

    #[test]
    fn a_sweep_runs_exactly_max_total_trials_within_concurrency() {
        let s = spec("", "random", 8, 2);
        let (sims, end, best) = run(&s, 5, 0);
        assert_eq!(sims.len(), 8);
        assert_eq!(end, SweepEnd::Completed);
        assert!(sims.iter().all(|s| s.status == TrialStatus::Completed));
        let expected = (0..8)
            .max_by(|&a, &b| {
                let x = |i: usize| sims[i].params["x"].as_f64().unwrap();
                x(a).total_cmp(&x(b))
            })
            .unwrap();
        assert_eq!(best, Some(expected as u32));
    }

    #[test]
    fn a_leader_dying_mid_step_neither_loses_nor_duplicates_trials() {
        let s = spec("", "random", 8, 3);
        let (clean, _, best_clean) = run(&s, 11, 0);
        let (crashed, _, best_crashed) = run(&s, 11, 6);
        assert_eq!(crashed.len(), 8);
        // Random parameters depend only on the seed and the index: the same trials.
        let p = |sims: &[Sim]| sims.iter().map(|s| s.params.clone()).collect::<Vec<_>>();
        assert_eq!(p(&clean), p(&crashed));
        assert_eq!(best_clean, best_crashed);
    }

    #[test]
    fn the_same_state_gives_the_same_decisions() {
        for sampling in ["random", "bayesian"] {
            let s = spec("", sampling, 30, 4);
            let (sims, _, _) = run(&s, 3, 0);
            let (again, _, _) = run(&s, 3, 0);
            let p = |sims: &[Sim]| sims.iter().map(|s| s.params.clone()).collect::<Vec<_>>();
            assert_eq!(p(&sims), p(&again), "{sampling}");
            let (other, _, _) = run(&s, 4, 0);
            assert_ne!(p(&sims), p(&other), "{sampling}");
        }
    }

    #[test]
    fn a_bandit_policy_stops_the_clearly_bad_trials() {
        let s = spec(
            "early_termination:\n  type: bandit\n  slack_factor: 0.2\n  evaluation_interval: 1\n  delay_evaluation: 2\n",
            "random",
            12,
            12,
        );
        let (sims, end, best) = run(&s, 21, 0);
        assert_eq!(end, SweepEnd::Completed);
        assert_eq!(sims.len(), 12);
        let best = best.unwrap() as usize;
        let best_x = sims[best].params["x"].as_f64().unwrap();
        for (i, t) in sims.iter().enumerate() {
            let x = t.params["x"].as_f64().unwrap();
            if x < best_x / 1.2 * 0.999 {
                assert_eq!(
                    t.status,
                    TrialStatus::Cancelled,
                    "trial {i} x={x} best {best_x}"
                );
                assert!(t.metric.len() < 5, "stopped early");
                match &t.cancelled_by {
                    Some(StopReason::EarlyTermination(r)) => assert_eq!(r.policy, "bandit"),
                    other => panic!("{other:?}"),
                }
            }
            if x >= best_x / 1.2 * 1.001 {
                assert_eq!(t.status, TrialStatus::Completed, "trial {i} x={x}");
            }
        }
        assert!(sims.iter().any(|t| t.status == TrialStatus::Cancelled));
    }

    #[test]
    fn the_timeout_cancels_active_trials_then_finishes() {
        let s = spec("", "random", 8, 2);
        let params = Params::from([("x".to_string(), ParamValue::Float(0.5))]);
        let metric = Series::from_values([0.1]);
        let sims = [
            TrialView {
                index: 0,
                params: &params,
                status: TrialStatus::Completed,
                stopping: false,
                metric: &metric,
            },
            TrialView {
                index: 1,
                params: &params,
                status: TrialStatus::Active,
                stopping: false,
                metric: &Series::new(),
            },
        ];
        let d = step(&s, 1, 0, &sims, 1_000_000);
        assert_eq!(
            d,
            vec![SweepDecision::CancelTrial {
                index: 1,
                reason: StopReason::SweepTimedOut { timeout_s: 1000 }
            }]
        );
        // Already stopping: nothing more until it ends.
        let stopping = [
            sims[0],
            TrialView {
                stopping: true,
                ..sims[1]
            },
        ];
        assert!(step(&s, 1, 0, &stopping, 1_000_000).is_empty());
        let ended = [
            sims[0],
            TrialView {
                status: TrialStatus::Cancelled,
                ..sims[1]
            },
        ];
        assert_eq!(
            step(&s, 1, 0, &ended, 1_000_000),
            vec![SweepDecision::Finish {
                end: SweepEnd::TimedOut,
                best_trial: Some(0)
            }]
        );
        // Before the deadline, the next trials start.
        let d = step(&s, 1, 0, &sims, 999_999);
        assert!(
            matches!(d.as_slice(), [SweepDecision::StartTrial { index: 2, .. }]),
            "{d:?}"
        );
    }

    #[test]
    fn a_grid_sweep_ends_when_the_grid_is_exhausted() {
        let s = parse_sweep_yaml(
            "type: sweep\ntrial:\n  command: t ${{search_space.x}}\nsampling_algorithm: grid\nsearch_space:\n  x:\n    type: choice\n    values: [0.1, 0.9, 0.5]\nobjective:\n  primary_metric: acc\n  goal: maximize\nlimits:\n  max_concurrent_trials: 2\n",
            "e",
        )
        .unwrap();
        assert_eq!(s.sampling, Sampling::Grid);
        let (sims, end, best) = run(&s, 0, 0);
        assert_eq!(sims.len(), 3);
        assert_eq!(end, SweepEnd::Completed);
        assert_eq!(best, Some(1));
    }

    #[test]
    fn ranking_puts_trials_without_the_metric_last() {
        let params = Params::new();
        let (a, b, c) = (
            Series::from_values([0.2, 0.5]),
            Series::new(),
            Series::from_values([0.4]),
        );
        let v = |index, metric| TrialView {
            index,
            params: &params,
            status: TrialStatus::Completed,
            stopping: false,
            metric,
        };
        let trials = [v(0, &a), v(1, &b), v(2, &c)];
        assert_eq!(
            rank_trials(Goal::Maximize, &trials),
            vec![(0, Some(0.5)), (2, Some(0.4)), (1, None)]
        );
        assert_eq!(
            rank_trials(Goal::Minimize, &trials),
            vec![(0, Some(0.2)), (2, Some(0.4)), (1, None)]
        );
    }

    fn any_spec(sampling: usize, policy: usize, total: u32, concurrent: u32) -> SweepSpec {
        let (sampling, space) = match sampling {
            0 => (
                "random",
                "  x:\n    type: uniform\n    min_value: 0\n    max_value: 1\n",
            ),
            1 => (
                "bayesian",
                "  x:\n    type: uniform\n    min_value: 0\n    max_value: 1\n",
            ),
            _ => (
                "grid",
                "  x:\n    type: choice\n    values: [0.1, 0.3, 0.5, 0.7, 0.9]\n",
            ),
        };
        let policy = [
            "",
            "early_termination:\n  type: bandit\n  slack_amount: 0.1\n",
            "early_termination:\n  type: median_stopping\n  delay_evaluation: 1\n",
            "early_termination:\n  type: truncation_selection\n  truncation_percentage: 30\n  evaluation_interval: 2\n",
        ][policy];
        parse_sweep_yaml(
            &format!(
                "type: sweep\ntrial:\n  command: t ${{{{search_space.x}}}}\nsampling_algorithm: {sampling}\nsearch_space:\n{space}objective:\n  primary_metric: m\n  goal: maximize\nlimits:\n  max_total_trials: {total}\n  max_concurrent_trials: {concurrent}\n{policy}"
            ),
            "e",
        )
        .unwrap()
    }

    proptest::proptest! {
        /// Whatever the trials do, the controller starts trials in order, within the
        /// limits, cancels only running trials, is deterministic, and ends exactly once
        /// with every trial over.
        #[test]
        fn the_controller_keeps_its_limits_whatever_the_trials_do(
            seed in proptest::prelude::any::<u64>(),
            sampling in 0usize..3,
            policy in 0usize..4,
            total in 1u32..14,
            concurrent in 1u32..5,
            outcomes in proptest::collection::vec(0u8..4, 14),
        ) {
            let spec = any_spec(sampling, policy, total, concurrent);
            let mut sims: Vec<Sim> = Vec::new();
            let mut finished = None;
            for round in 0..400u64 {
                let v = views(&sims);
                let decisions = step(&spec, seed, 0, &v, round);
                proptest::prop_assert_eq!(&decisions, &step(&spec, seed, 0, &v, round));
                let active = sims.iter().filter(|s| s.status == TrialStatus::Active).count();
                let mut next = sims.len() as u32;
                for d in &decisions {
                    match d {
                        SweepDecision::StartTrial { index, .. } => {
                            proptest::prop_assert_eq!(*index, next);
                            next += 1;
                        }
                        SweepDecision::CancelTrial { index, .. } => {
                            let t = &sims[*index as usize];
                            proptest::prop_assert!(t.status == TrialStatus::Active && !t.stopping);
                        }
                        SweepDecision::Finish { .. } => {
                            proptest::prop_assert!(sims.iter().all(|s| s.status != TrialStatus::Active));
                        }
                    }
                }
                proptest::prop_assert!(active + (next as usize - sims.len()) <= concurrent as usize);
                proptest::prop_assert!(next <= total);
                if let Some(f) = apply(&mut sims, &decisions) {
                    finished = Some(f);
                    break;
                }
                // Trials: 0 completes after 3 values, 1 fails after 1, 2 fails at once, 3 logs 6.
                for (i, s) in sims.iter_mut().enumerate() {
                    if s.status != TrialStatus::Active {
                        continue;
                    }
                    if s.stopping {
                        s.status = TrialStatus::Cancelled;
                        continue;
                    }
                    let x = s.params["x"].as_f64().unwrap();
                    let (fail_at, done_at) = match outcomes[i] {
                        0 => (None, 3),
                        1 => (Some(1), 9),
                        2 => (Some(0), 9),
                        _ => (None, 6),
                    };
                    if fail_at == Some(s.metric.len()) {
                        s.status = TrialStatus::Failed;
                        continue;
                    }
                    s.metric.push(None, x * (s.metric.len() + 1) as f64);
                    if s.metric.len() == done_at {
                        s.status = TrialStatus::Completed;
                    }
                }
            }
            let (end, best) = finished.expect("the sweep ends");
            proptest::prop_assert_eq!(end, SweepEnd::Completed);
            let expected = if sampling == 2 { total.min(5) } else { total };
            proptest::prop_assert_eq!(sims.len() as u32, expected);
            if let Some(b) = best {
                proptest::prop_assert!(!sims[b as usize].metric.is_empty());
            } else {
                proptest::prop_assert!(sims.iter().all(|s| s.metric.is_empty()));
            }
        }
    }
}
