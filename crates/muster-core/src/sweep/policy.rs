//! Early termination, with Azure ML's definitions.
//!
//! An *interval* is one logged value of the primary metric: a trial that has logged `n`
//! values has reached interval `n`. A policy is applied at every interval `N` that is a
//! multiple of `evaluation_interval` and at least `delay_evaluation` (and at least 1).
//! [`evaluate`] judges each active trial at the latest such interval it has reached,
//! comparing it with every trial (active or finished) that has reached the same interval,
//! each taken over its first `N` values only:
//!
//! - **bandit**: with `B` the best of all trials' best-so-far values at `N` and `Y` the
//!   trial's best so far, maximizing cancels when `Y < B / (1 + slack_factor)` (or
//!   `Y < B - slack_amount`); minimizing mirrors it: `Y > B * (1 + slack_factor)` (or
//!   `Y > B + slack_amount`). Azure ML's example: slack_factor 0.2 and best 0.8 cancel the
//!   trials below 0.8 / 1.2 ≈ 0.667.
//! - **median_stopping**: cancels a trial whose best value up to `N` is worse than the
//!   median of all trials' running averages over intervals 1..N.
//! - **truncation_selection**: cancels the trial when its best value up to `N` is among the
//!   lowest `truncation_percentage`% (rounded down) of the trials compared at `N`; finished
//!   trials are compared too unless `exclude_finished_jobs`. Ties rank the later trial lower.
//!
//! The function is pure and depends only on its arguments, so every leader cancels the same trials.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::Goal;
use crate::spec::SpecError;

/// A bandit policy's slack.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slack {
    /// A ratio of the best value.
    Factor(f64),
    /// An absolute distance from the best value.
    Amount(f64),
}

/// Which early-termination policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PolicyKind {
    /// Cancel trials not within the slack of the best.
    Bandit {
        /// The slack.
        slack: Slack,
    },
    /// Cancel trials whose best is worse than the median of running averages.
    MedianStopping,
    /// Cancel the lowest percentage of trials.
    TruncationSelection {
        /// 1 to 99.
        truncation_percentage: u32,
        /// Leave finished trials out of the comparison.
        exclude_finished: bool,
    },
}

/// An early-termination policy with its schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyTermination {
    /// The policy.
    pub kind: PolicyKind,
    /// Apply at every multiple of this many intervals (default 1).
    pub evaluation_interval: u32,
    /// Do not apply before this interval (default 0).
    pub delay_evaluation: u32,
}

impl EarlyTermination {
    /// Checks the parameters; errors name `early_termination.<field>`.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.evaluation_interval == 0 {
            return Err(SpecError::field(
                "early_termination.evaluation_interval",
                "must be at least 1",
            ));
        }
        match self.kind {
            PolicyKind::Bandit {
                slack: Slack::Factor(f),
            } if !(f.is_finite() && f > 0.0) => Err(SpecError::field(
                "early_termination.slack_factor",
                format!("must be a positive number, not {f}"),
            )),
            PolicyKind::Bandit {
                slack: Slack::Amount(a),
            } if !(a.is_finite() && a >= 0.0) => Err(SpecError::field(
                "early_termination.slack_amount",
                format!("must be a non-negative number, not {a}"),
            )),
            PolicyKind::TruncationSelection {
                truncation_percentage: p,
                ..
            } if !(1..=99).contains(&p) => Err(SpecError::field(
                "early_termination.truncation_percentage",
                format!("must be between 1 and 99, not {p}"),
            )),
            _ => Ok(()),
        }
    }

    /// The latest interval at which a trial that reached interval `n` is judged.
    pub fn evaluation_point(&self, n: usize) -> Option<usize> {
        let every = self.evaluation_interval.max(1) as usize;
        let point = n / every * every;
        (point >= 1 && point >= self.delay_evaluation as usize).then_some(point)
    }

    fn name(&self) -> &'static str {
        match self.kind {
            PolicyKind::Bandit { .. } => "bandit",
            PolicyKind::MedianStopping => "median_stopping",
            PolicyKind::TruncationSelection { .. } => "truncation_selection",
        }
    }
}

/// One trial as a policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct PolicyTrial<'a> {
    /// The trial's index in the sweep.
    pub index: u32,
    /// Still running (only active trials are cancelled).
    pub active: bool,
    /// The primary metric's values in the order logged.
    pub values: &'a [f64],
}

/// Why a trial was stopped early.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelReason {
    /// `bandit`, `median_stopping` or `truncation_selection`.
    pub policy: String,
    /// The interval at which the trial was judged.
    pub interval: u32,
    /// The comparison, with its numbers.
    pub detail: String,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stopped early by the {} policy at interval {}: {}",
            self.policy, self.interval, self.detail
        )
    }
}

fn best(goal: Goal, values: &[f64]) -> f64 {
    values
        .iter()
        .copied()
        .reduce(|a, b| goal.best_of(a, b))
        .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The active trials `policy` cancels now, with the reason, in trial order.
pub fn evaluate(
    policy: &EarlyTermination,
    goal: Goal,
    trials: &[PolicyTrial<'_>],
) -> Vec<(u32, CancelReason)> {
    let mut out = Vec::new();
    for t in trials.iter().filter(|t| t.active) {
        let Some(n) = policy.evaluation_point(t.values.len()) else {
            continue;
        };
        let y = best(goal, &t.values[..n]);
        // Every trial that reached interval n, over its first n values.
        let peers = trials.iter().filter(|p| p.values.len() >= n);
        let detail = match &policy.kind {
            PolicyKind::Bandit { slack } => {
                let (b, b_index) = peers
                    .map(|p| (best(goal, &p.values[..n]), p.index))
                    .reduce(|a, c| if goal.better(c.0, a.0) { c } else { a })
                    .expect("the trial itself reached n");
                let (cancel, bound) = match (goal, slack) {
                    (Goal::Maximize, Slack::Factor(f)) => {
                        let bound = b / (1.0 + f);
                        (y < bound, format!("{b} / (1 + {f}) = {bound:.6}"))
                    }
                    (Goal::Maximize, Slack::Amount(a)) => {
                        let bound = b - a;
                        (y < bound, format!("{b} - {a} = {bound:.6}"))
                    }
                    (Goal::Minimize, Slack::Factor(f)) => {
                        let bound = b * (1.0 + f);
                        (y > bound, format!("{b} * (1 + {f}) = {bound:.6}"))
                    }
                    (Goal::Minimize, Slack::Amount(a)) => {
                        let bound = b + a;
                        (y > bound, format!("{b} + {a} = {bound:.6}"))
                    }
                };
                let side = if goal == Goal::Maximize {
                    "below"
                } else {
                    "above"
                };
                cancel.then(|| {
                    format!("its best {y} is {side} {bound}, from trial {b_index}'s best {b}")
                })
            }
            PolicyKind::MedianStopping => {
                let averages: Vec<f64> = peers
                    .map(|p| p.values[..n].iter().sum::<f64>() / n as f64)
                    .collect();
                let count = averages.len();
                let m = median(averages);
                goal.better(m, y).then(|| {
                    format!(
                        "its best {y} is worse than {m}, the median of {count} trials' running averages"
                    )
                })
            }
            PolicyKind::TruncationSelection {
                truncation_percentage,
                exclude_finished,
            } => {
                let mut ranked: Vec<(f64, u32)> = peers
                    .filter(|p| p.active || !exclude_finished || p.index == t.index)
                    .map(|p| (best(goal, &p.values[..n]), p.index))
                    .collect();
                // Worst first; among equals, the later trial first.
                ranked.sort_by(|a, b| {
                    let by_value = match goal {
                        Goal::Maximize => a.0.total_cmp(&b.0),
                        Goal::Minimize => b.0.total_cmp(&a.0),
                    };
                    by_value.then(b.1.cmp(&a.1))
                });
                let k = ranked.len() * *truncation_percentage as usize / 100;
                let rank = ranked.iter().position(|r| r.1 == t.index);
                (rank.is_some_and(|r| r < k)).then(|| {
                    format!(
                        "its best {y} is in the lowest {truncation_percentage}% ({k} of {}) of the trials at this interval",
                        ranked.len()
                    )
                })
            }
        };
        if let Some(detail) = detail {
            out.push((
                t.index,
                CancelReason {
                    policy: policy.name().to_string(),
                    interval: n as u32,
                    detail,
                },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(kind: PolicyKind, every: u32, delay: u32) -> EarlyTermination {
        EarlyTermination {
            kind,
            evaluation_interval: every,
            delay_evaluation: delay,
        }
    }

    fn trial(index: u32, values: &[f64]) -> PolicyTrial<'_> {
        PolicyTrial {
            index,
            active: true,
            values,
        }
    }

    fn cancelled(p: &EarlyTermination, goal: Goal, trials: &[PolicyTrial<'_>]) -> Vec<u32> {
        evaluate(p, goal, trials).into_iter().map(|c| c.0).collect()
    }

    /// Azure ML's example: slack_factor 0.2, the best trial at 0.8 → trials below
    /// 0.8 / 1.2 ≈ 0.667 are cancelled.
    #[test]
    fn bandit_slack_factor_matches_azure_mls_example() {
        let p = policy(
            PolicyKind::Bandit {
                slack: Slack::Factor(0.2),
            },
            1,
            0,
        );
        let best = [0.5, 0.8];
        let within = [0.6, 0.67];
        let below = [0.6, 0.66];
        let trials = [trial(0, &best), trial(1, &within), trial(2, &below)];
        let out = evaluate(&p, Goal::Maximize, &trials);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].0, 2);
        assert_eq!(out[0].1.interval, 2);
        assert!(out[0].1.to_string().contains("0.666667"), "{}", out[0].1);
    }

    /// Azure ML's second example: slack_amount 0.2 with the best at 0.8 cancels the runs
    /// below 0.6; with evaluation_interval 100 and delay_evaluation 200 the first
    /// evaluation is at interval 200.
    #[test]
    fn bandit_slack_amount_and_delay_match_azure_mls_example() {
        let p = policy(
            PolicyKind::Bandit {
                slack: Slack::Amount(0.2),
            },
            100,
            200,
        );
        assert_eq!(p.evaluation_point(199), None);
        assert_eq!(p.evaluation_point(200), Some(200));
        assert_eq!(p.evaluation_point(299), Some(200));
        assert_eq!(p.evaluation_point(300), Some(300));
        let best = vec![0.8; 200];
        let kept = vec![0.61; 200];
        let cut = vec![0.59; 200];
        let trials = [trial(0, &best), trial(1, &kept), trial(2, &cut)];
        assert_eq!(cancelled(&p, Goal::Maximize, &trials), vec![2]);
        let early: Vec<_> = trials
            .iter()
            .map(|t| trial(t.index, &t.values[..199]))
            .collect();
        assert!(cancelled(&p, Goal::Maximize, &early).is_empty());
    }

    #[test]
    fn bandit_minimizing_and_slack_amount() {
        let p = policy(
            PolicyKind::Bandit {
                slack: Slack::Factor(0.2),
            },
            1,
            0,
        );
        // Best loss 1.0: above 1.2 is cancelled.
        let (a, b, c) = ([1.0], [1.19], [1.25]);
        let trials = [trial(0, &a), trial(1, &b), trial(2, &c)];
        assert_eq!(cancelled(&p, Goal::Minimize, &trials), vec![2]);
        let p = policy(
            PolicyKind::Bandit {
                slack: Slack::Amount(0.1),
            },
            1,
            0,
        );
        let (a, b, c) = ([0.9], [0.81], [0.79]);
        let trials = [trial(0, &a), trial(1, &b), trial(2, &c)];
        assert_eq!(cancelled(&p, Goal::Maximize, &trials), vec![2]);
    }

    #[test]
    fn bandit_compares_at_the_same_interval() {
        let p = policy(
            PolicyKind::Bandit {
                slack: Slack::Factor(0.1),
            },
            1,
            0,
        );
        // Trial 0 reaches 0.9 only at interval 3; at interval 1 trial 1's 0.5 is fine.
        let a = [0.5, 0.6, 0.9];
        let b = [0.5];
        let trials = [trial(0, &a), trial(1, &b)];
        assert!(cancelled(&p, Goal::Maximize, &trials).is_empty());
        // Once trial 1 reaches interval 3 below 0.9 / 1.1, it goes.
        let b = [0.5, 0.6, 0.7];
        let trials = [trial(0, &a), trial(1, &b)];
        assert_eq!(cancelled(&p, Goal::Maximize, &trials), vec![1]);
    }

    #[test]
    fn evaluation_interval_and_delay_are_respected() {
        let p = policy(
            PolicyKind::Bandit {
                slack: Slack::Factor(0.2),
            },
            2,
            3,
        );
        // Points: 4, 6, 8, ...
        assert_eq!(p.evaluation_point(1), None);
        assert_eq!(p.evaluation_point(3), None);
        assert_eq!(p.evaluation_point(4), Some(4));
        assert_eq!(p.evaluation_point(5), Some(4));
        assert_eq!(p.evaluation_point(6), Some(6));
        let good = [1.0, 1.0, 1.0, 1.0, 1.0];
        let bad3 = [0.1, 0.1, 0.1];
        let trials = [trial(0, &good), trial(1, &bad3)];
        assert!(cancelled(&p, Goal::Maximize, &trials).is_empty());
        let bad4 = [0.1, 0.1, 0.1, 0.1];
        let trials = [trial(0, &good), trial(1, &bad4)];
        assert_eq!(cancelled(&p, Goal::Maximize, &trials), vec![1]);
        // delay_evaluation 0 with interval 1 starts at the first value.
        let p0 = policy(
            PolicyKind::Bandit {
                slack: Slack::Factor(0.2),
            },
            1,
            0,
        );
        assert_eq!(p0.evaluation_point(0), None);
        assert_eq!(p0.evaluation_point(1), Some(1));
    }

    #[test]
    fn median_stopping_cancels_below_the_median_of_running_averages() {
        let p = policy(PolicyKind::MedianStopping, 1, 0);
        // Running averages at interval 2: 0.85, 0.75, 0.55, 0.35 → median 0.65.
        let (a, b, c, d) = ([0.8, 0.9], [0.7, 0.8], [0.5, 0.6], [0.3, 0.4]);
        let trials = [trial(0, &a), trial(1, &b), trial(2, &c), trial(3, &d)];
        let out = evaluate(&p, Goal::Maximize, &trials);
        assert_eq!(out.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 3]);
        assert!(out[0].1.detail.contains("0.65"), "{}", out[0].1);
        // Minimizing: the same numbers as losses cancel the two highest.
        assert_eq!(cancelled(&p, Goal::Minimize, &trials), vec![0, 1]);
        // A lone trial is never below its own average.
        assert!(cancelled(&p, Goal::Maximize, &[trial(0, &d)]).is_empty());
    }

    #[test]
    fn median_stopping_uses_the_best_so_far_against_averages() {
        let p = policy(PolicyKind::MedianStopping, 1, 0);
        // Trial 2 averages low but its best (0.9) beats the median average (0.5).
        let (a, b, c) = ([0.5, 0.5], [0.5, 0.5], [0.1, 0.9]);
        let trials = [trial(0, &a), trial(1, &b), trial(2, &c)];
        assert!(cancelled(&p, Goal::Maximize, &trials).is_empty());
    }

    #[test]
    fn truncation_cancels_the_lowest_percentage() {
        let p = policy(
            PolicyKind::TruncationSelection {
                truncation_percentage: 20,
                exclude_finished: false,
            },
            1,
            5,
        );
        let vals: Vec<[f64; 5]> = (0..5).map(|i| [f64::from(i) / 10.0; 5]).collect();
        let trials: Vec<_> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| trial(i as u32, v))
            .collect();
        // 20% of 5 is 1: the lowest, trial 0.
        assert_eq!(cancelled(&p, Goal::Maximize, &trials), vec![0]);
        assert_eq!(cancelled(&p, Goal::Minimize, &trials), vec![4]);
        // Before delay_evaluation (interval 5), nothing.
        let short: Vec<_> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| trial(i as u32, &v[..4]))
            .collect();
        assert!(cancelled(&p, Goal::Maximize, &short).is_empty());
        // 40% of 5 is 2.
        let p40 = policy(
            PolicyKind::TruncationSelection {
                truncation_percentage: 40,
                exclude_finished: false,
            },
            1,
            0,
        );
        assert_eq!(cancelled(&p40, Goal::Maximize, &trials), vec![0, 1]);
    }

    #[test]
    fn truncation_counts_finished_trials_unless_excluded() {
        let (a, b, c, d) = ([0.1], [0.2], [0.9], [0.8]);
        let mut trials = vec![trial(0, &a), trial(1, &b), trial(2, &c), trial(3, &d)];
        trials[0].active = false;
        let p = |exclude| {
            policy(
                PolicyKind::TruncationSelection {
                    truncation_percentage: 50,
                    exclude_finished: exclude,
                },
                1,
                0,
            )
        };
        // Compared with finished trial 0: the lowest two are 0 (finished) and 1.
        assert_eq!(cancelled(&p(false), Goal::Maximize, &trials), vec![1]);
        // Without it, 3 trials, 50% → 1: trial 1 still; and with 0 active it'd be 0 and 1.
        assert_eq!(cancelled(&p(true), Goal::Maximize, &trials), vec![1]);
        trials[0].active = true;
        assert_eq!(cancelled(&p(true), Goal::Maximize, &trials), vec![0, 1]);
    }

    #[test]
    fn finished_trials_are_never_cancelled() {
        let p = policy(
            PolicyKind::Bandit {
                slack: Slack::Factor(0.2),
            },
            1,
            0,
        );
        let (a, b) = ([0.9], [0.1]);
        let mut trials = [trial(0, &a), trial(1, &b)];
        trials[1].active = false;
        assert!(cancelled(&p, Goal::Maximize, &trials).is_empty());
    }
}
