//! Hyperparameter sweeps (Azure ML's `type: sweep` job and v1 HyperDrive config).
//!
//! - [`file`](mod@file): the YAML forms, parsed and normalized into one [`SweepSpec`]:
//!   [`parse_sweep_yaml`] (v2 `type: sweep`) and [`parse_hyperdrive_config`] (v1 `hdconfig.yml`).
//! - [`space`]: parameter [`Distribution`]s with Azure ML's definitions (`loguniform(min, max)`
//!   is `exp(uniform(min, max))`, `randint(upper)` is `0..upper`, q-variants are
//!   `round(x / q) * q`) and the seeded generator [`SweepRng`].
//! - [`sampler`]: which parameters trial `i` gets: random (seeded), grid (the full cartesian
//!   product of `choice` values), bayesian (TPE, see [`sampler::TpeConfig`]).
//! - [`policy`]: early termination (bandit, median stopping, truncation selection) as the
//!   pure function [`policy::evaluate`].
//! - [`controller`]: one step of a sweep, [`controller::step`]: given the spec, the trials so
//!   far, the seed and `now`, which trials to start, which to cancel, and whether the sweep is
//!   done. The server's leader runs it and proposes its decisions through Raft.
//!
//! Everything is deterministic: parameters depend only on the seed, the trial's index and
//! the results known when the trial is decided, and the decision records them, so a new
//! leader recomputing a step from the replicated state neither loses nor duplicates trials.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::metrics::Goal;
use crate::spec::{RunSpec, SpecError, substitute};

pub mod controller;
pub mod file;
pub mod policy;
pub mod sampler;
pub mod space;

pub use controller::{
    StopReason, SweepDecision, SweepEnd, TrialStatus, TrialView, rank_trials, step, step_canceled,
};
pub use file::{parse_hyperdrive_config, parse_sweep_yaml};
pub use policy::{CancelReason, EarlyTermination, PolicyKind, Slack};
pub use space::{Distribution, ParamValue, SweepRng};

/// Azure ML's default `limits.max_total_trials`.
pub const DEFAULT_MAX_TOTAL_TRIALS: u32 = 1000;
/// Azure ML's default `limits.timeout` (60 days), in seconds.
pub const DEFAULT_SWEEP_TIMEOUT_S: u64 = 5_184_000;

/// The parameters of one trial, by search-space name.
pub type Params = BTreeMap<String, ParamValue>;

/// How trials' parameters are chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Sampling {
    /// Independent draws; `seed` as written (the server fixes one at submission when absent).
    Random {
        /// The seed, when the file gives one.
        seed: Option<u64>,
    },
    /// Every combination of the `choice` (and `randint`) values, in order.
    Grid,
    /// TPE (Tree-structured Parzen Estimator) over the results so far.
    Bayesian,
}

/// What the sweep optimizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    /// The metric name trials log.
    pub primary_metric: String,
    /// Maximize or minimize.
    pub goal: Goal,
}

/// The sweep's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepLimits {
    /// Trials started in total, at most.
    pub max_total_trials: u32,
    /// Trials active at once, at most.
    pub max_concurrent_trials: u32,
    /// Seconds from the sweep's start after which active trials are cancelled and no new
    /// trial starts.
    pub timeout_s: u64,
    /// Seconds one trial may run (also set as each trial's `limits.timeout`).
    pub trial_timeout_s: Option<u64>,
}

/// A sweep as the server stores it: normalized and validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    /// The trial template: a run spec whose `command` still holds `${{search_space.x}}`
    /// references. Use [`SweepSpec::trial_run`] to get a trial's runnable spec.
    pub trial: RunSpec,
    /// The parameters and their distributions.
    pub search_space: BTreeMap<String, Distribution>,
    /// The sampler.
    pub sampling: Sampling,
    /// The primary metric and goal.
    pub objective: Objective,
    /// The early-termination policy, if any.
    pub early_termination: Option<EarlyTermination>,
    /// The limits.
    pub limits: SweepLimits,
    /// The sweep's display name.
    pub display_name: Option<String>,
    /// The experiment (trials run in it too).
    pub experiment: String,
    /// Free text.
    pub description: Option<String>,
}

/// The names referenced as `${{search_space.NAME}}` in `command`, in order.
pub(crate) fn search_space_refs(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = command;
    while let Some(start) = rest.find("${{") {
        let after = &rest[start + 3..];
        let Some(end) = after.find("}}") else { break };
        if let Some(("search_space", name)) = after[..end].trim().split_once('.') {
            out.push(name.to_string());
        }
        rest = &after[end + 2..];
    }
    out
}

impl SweepSpec {
    /// The seed the sampler uses: the file's `seed` when it gives one, else `fallback`
    /// (which the server draws once at submission and stores with the sweep).
    pub fn seed_or(&self, fallback: u64) -> u64 {
        match self.sampling {
            Sampling::Random { seed: Some(s) } => s,
            _ => fallback,
        }
    }

    /// The runnable spec of a trial with `params`: `${{search_space.x}}` substituted,
    /// validated. Errors name `trial.<field>`. Values are substituted as written, not
    /// shell-quoted, as Azure ML does (a choice value with spaces becomes several words).
    pub fn trial_run(&self, params: &Params) -> Result<RunSpec, SpecError> {
        let command = substitute("trial.command", &self.trial.command, |scope, name| {
            (scope == "search_space")
                .then(|| params.get(name).map(ToString::to_string))
                .flatten()
        })?;
        let mut spec = self.trial.clone();
        spec.command = command;
        spec.validate().map_err(|e| prefix_error("trial", e))?;
        Ok(spec)
    }

    /// Checks everything the controller relies on (the server calls it on every submission).
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.search_space.is_empty() {
            return Err(SpecError::field(
                "search_space",
                "missing: give at least one parameter",
            ));
        }
        for (name, dist) in &self.search_space {
            dist.validate()
                .map_err(|m| SpecError::field(format!("search_space.{name}"), m))?;
        }
        for name in search_space_refs(&self.trial.command) {
            if !self.search_space.contains_key(&name) {
                return Err(SpecError::field(
                    "trial.command",
                    format!(
                        "`${{{{search_space.{name}}}}}` names a parameter the search_space does not define: add it under search_space or fix the name"
                    ),
                ));
            }
        }
        if self.sampling == Sampling::Grid {
            sampler::grid_axes(&self.search_space)?;
        }
        crate::metrics::validate_name(&self.objective.primary_metric).map_err(|m| {
            SpecError::field(
                "objective.primary_metric",
                format!("{m}: name the metric exactly as the trials log it"),
            )
        })?;
        if let Some(p) = &self.early_termination {
            p.validate()?;
        }
        let l = &self.limits;
        if l.max_total_trials == 0 {
            return Err(SpecError::field(
                "limits.max_total_trials",
                "must be at least 1",
            ));
        }
        if l.max_concurrent_trials == 0 {
            return Err(SpecError::field(
                "limits.max_concurrent_trials",
                "must be at least 1",
            ));
        }
        if l.timeout_s == 0 {
            return Err(SpecError::field(
                "limits.timeout",
                "must be at least 1 second",
            ));
        }
        if l.trial_timeout_s == Some(0) {
            return Err(SpecError::field(
                "limits.trial_timeout",
                "must be at least 1 second (leave it out for no limit)",
            ));
        }
        // Every sampled trial must give a valid run: check one.
        let mut rng = SweepRng::new(0, 0);
        let params: Params = self
            .search_space
            .iter()
            .map(|(k, d)| (k.clone(), d.sample(&mut rng)))
            .collect();
        self.trial_run(&params)?;
        Ok(())
    }
}

pub(crate) fn prefix_error(prefix: &str, mut e: SpecError) -> SpecError {
    e.path = if e.path.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}.{}", e.path)
    };
    e
}
