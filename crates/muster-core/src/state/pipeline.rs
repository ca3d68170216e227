//! Pipelines in the replicated state: the pipeline, its steps (each a run, a reuse, or a
//! failure), and applying the planner's decisions ([`Command::SubmitPipeline`],
//! [`Command::PipelineDecision`], [`Command::CancelPipeline`]).
//!
//! A step's outputs are identified by its run's outputs archive: output `x` of a run whose
//! archive has digest `D` is `D/x` (the folder `x/` of that archive). The leader gives
//! [`State::pipeline_step_states`] and [`State::pipeline_reuse_lookup`] to
//! [`crate::pipeline::plan`] and proposes the decisions; applying them is idempotent (a
//! decision about a step that already has one is rejected and changes nothing).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Millis;
use crate::pipeline::{PipelineDecision, PipelineSpec, StepState};
use crate::spec::SpecError;
use crate::state::{Applied, ApplyError, Command, PipelineRule, RunState, State};

/// What happened to one step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Its run, once started.
    pub run_id: Option<String>,
    /// Its reuse key, once its inputs were ready.
    pub reuse_key: Option<String>,
    /// Inputs to place at `inputs/<name>`: the upstream outputs' identities.
    pub mounts: BTreeMap<String, String>,
    /// The outputs taken from an earlier identical step, when reused.
    pub reused: Option<BTreeMap<String, String>>,
    /// Why it failed without running (an upstream failure, a cancel).
    pub failed: Option<String>,
}

/// How a pipeline ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineFinish {
    /// Every step completed.
    pub succeeded: bool,
    /// The steps that failed.
    pub failed: Vec<String>,
    /// When.
    pub at: Millis,
}

/// A pipeline as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    /// Its id, chosen by the proposer.
    pub id: String,
    /// The DAG.
    pub spec: PipelineSpec,
    /// When it was accepted.
    pub created_at: Millis,
    /// The steps that have a record (absent: pending).
    pub steps: BTreeMap<String, StepRecord>,
    /// A person asked to cancel it, with this reason.
    pub cancel_requested: Option<String>,
    /// Set once it ended.
    pub finished: Option<PipelineFinish>,
}

fn rejected(id: &str, rule: PipelineRule) -> ApplyError {
    ApplyError::PipelineRejected {
        pipeline_id: id.to_string(),
        rule,
    }
}

fn unknown(id: &str) -> ApplyError {
    ApplyError::UnknownPipeline(id.to_string())
}

impl State {
    /// Each step's state for [`crate::pipeline::plan`] (steps without a record are left out:
    /// the planner takes them as pending).
    pub fn pipeline_step_states(&self, pipeline: &Pipeline) -> BTreeMap<String, StepState> {
        let mut out = BTreeMap::new();
        for (name, rec) in &pipeline.steps {
            let state = if let Some(reason) = &rec.failed {
                StepState::Failed {
                    reason: reason.clone(),
                }
            } else if let Some(outputs) = &rec.reused {
                StepState::Completed {
                    outputs: outputs.clone(),
                    reused: true,
                }
            } else if let Some(run) = rec.run_id.as_ref().and_then(|r| self.runs.get(r)) {
                match run.state {
                    RunState::Completed => {
                        let archive = run.current_attempt().and_then(|a| a.outputs.clone());
                        let outputs = match (archive, pipeline.spec.steps.get(name)) {
                            (Some(d), Some(step)) => step
                                .outputs
                                .iter()
                                .map(|o| (o.clone(), format!("{d}/{o}")))
                                .collect(),
                            _ => BTreeMap::new(),
                        };
                        StepState::Completed {
                            outputs,
                            reused: false,
                        }
                    }
                    s if s.is_terminal() => StepState::Failed {
                        reason: run
                            .message
                            .clone()
                            .unwrap_or_else(|| format!("its run {} {}", run.id, s.as_str())),
                    },
                    _ => StepState::Running,
                }
            } else {
                StepState::Failed {
                    reason: "its run is missing".to_string(),
                }
            };
            out.insert(name.clone(), state);
        }
        out
    }

    /// Every completed step of every pipeline by reuse key: the outputs it produced.
    pub fn pipeline_reuse_lookup(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for p in self.pipelines.values() {
            let states = self.pipeline_step_states(p);
            for (name, rec) in &p.steps {
                if let (Some(key), Some(StepState::Completed { outputs, .. })) =
                    (&rec.reuse_key, states.get(name))
                {
                    out.entry(key.clone()).or_insert_with(|| outputs.clone());
                }
            }
        }
        out
    }

    /// The planner's decisions for pipeline `id` now (nothing once it finished), with
    /// every earlier completed step available for reuse. The reuse lookup (a walk over
    /// every pipeline) is built only when a step that allows reuse is ready to start, so
    /// a pass over many waiting pipelines does not walk them all once each.
    pub fn pipeline_plan(&self, id: &str) -> Vec<PipelineDecision> {
        let Some(p) = self.pipelines.get(id) else {
            return Vec::new();
        };
        if p.finished.is_some() {
            return Vec::new();
        }
        let states = self.pipeline_step_states(p);
        let lookup = std::cell::OnceCell::new();
        crate::pipeline::plan(&p.spec, &states, &|k: &str| {
            lookup
                .get_or_init(|| self.pipeline_reuse_lookup())
                .get(k)
                .cloned()
        })
    }

    /// What the agent of a pipeline step's run needs besides its spec: the inputs to place
    /// at `inputs/<name>` (each `<outputs archive sha256>/<folder>`) and the step's declared
    /// outputs. Empty for a run that is not a pipeline step.
    pub fn pipeline_step_io(
        &self,
        run: &crate::state::Run,
    ) -> (BTreeMap<String, String>, Vec<String>) {
        let step = run
            .spec
            .tags
            .get("muster.pipeline")
            .and_then(|p| self.pipelines.get(p))
            .and_then(|p| {
                let name = run.spec.tags.get("muster.step")?;
                let rec = p.steps.get(name)?;
                (rec.run_id.as_deref() == Some(run.id.as_str()))
                    .then(|| (rec.mounts.clone(), p.spec.steps.get(name)))
            });
        match step {
            Some((mounts, spec)) => (
                mounts,
                spec.map(|s| s.outputs.iter().cloned().collect())
                    .unwrap_or_default(),
            ),
            None => (BTreeMap::new(), Vec::new()),
        }
    }

    /// The run whose outputs a step with reuse key `key` took: the earliest pipeline step
    /// that ran with that key and completed.
    pub fn pipeline_reused_from(&self, key: &str) -> Option<&str> {
        self.pipelines
            .values()
            .flat_map(|p| p.steps.values())
            .filter(|r| r.reuse_key.as_deref() == Some(key))
            .filter_map(|r| r.run_id.as_deref())
            .filter_map(|id| self.runs.get(id))
            .filter(|r| r.state == RunState::Completed)
            .min_by_key(|r| r.seq)
            .map(|r| r.id.as_str())
    }

    pub(crate) fn submit_pipeline(
        &mut self,
        id: &str,
        spec: &PipelineSpec,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        if self.pipelines.contains_key(id) {
            return Err(ApplyError::PipelineExists(id.to_string()));
        }
        let order = crate::pipeline::topological_order(&spec.steps)?;
        if order != spec.order {
            return Err(SpecError::field(
                "jobs",
                "the step order is not the steps' topological order",
            )
            .into());
        }
        for (name, step) in &spec.steps {
            step.run
                .validate()
                .map_err(|e| e.under(&format!("jobs.{name}")))?;
            if !self.computes.contains_key(&step.run.compute) {
                return Err(ApplyError::UnknownCompute(step.run.compute.clone()));
            }
        }
        self.pipelines.insert(
            id.to_string(),
            Pipeline {
                id: id.to_string(),
                spec: spec.clone(),
                created_at: at,
                steps: BTreeMap::new(),
                cancel_requested: None,
                finished: None,
            },
        );
        Ok(Applied::Done)
    }

    pub(crate) fn apply_pipeline_decision(
        &mut self,
        id: &str,
        decision: &PipelineDecision,
        run_id: Option<&str>,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        let p = self.pipelines.get(id).ok_or_else(|| unknown(id))?;
        if p.finished.is_some() {
            return Err(rejected(id, PipelineRule::Finished));
        }
        let fresh_step = |step: &str| -> Result<(), ApplyError> {
            if !p.spec.steps.contains_key(step) {
                return Err(rejected(id, PipelineRule::UnknownStep(step.to_string())));
            }
            if p.steps.contains_key(step) {
                return Err(rejected(id, PipelineRule::StepDecided(step.to_string())));
            }
            Ok(())
        };
        let record = match decision {
            PipelineDecision::StartStep {
                step,
                run,
                reuse_key,
                mounts,
            } => {
                fresh_step(step)?;
                if p.cancel_requested.is_some() {
                    return Err(rejected(id, PipelineRule::Canceling));
                }
                if **run != p.spec.steps[step].run {
                    return Err(rejected(id, PipelineRule::RunNotInSpec(step.clone())));
                }
                let run_id = run_id.ok_or_else(|| rejected(id, PipelineRule::MissingRunId))?;
                let mut spec = (**run).clone();
                spec.tags.insert("muster.pipeline".into(), id.to_string());
                spec.tags.insert("muster.step".into(), step.clone());
                if spec.display_name.is_none() {
                    let name = p.spec.display_name.as_deref().unwrap_or(id);
                    spec.display_name = Some(format!("{name} {step}"));
                }
                self.apply(&Command::SubmitRun {
                    run_id: run_id.to_string(),
                    spec: Box::new(spec),
                    idempotency_key: None,
                    at,
                })?;
                (
                    step.clone(),
                    StepRecord {
                        run_id: Some(run_id.to_string()),
                        reuse_key: Some(reuse_key.clone()),
                        mounts: mounts.clone(),
                        ..StepRecord::default()
                    },
                )
            }
            PipelineDecision::ReuseStep {
                step,
                reuse_key,
                outputs,
            } => {
                fresh_step(step)?;
                (
                    step.clone(),
                    StepRecord {
                        reuse_key: Some(reuse_key.clone()),
                        reused: Some(outputs.clone()),
                        ..StepRecord::default()
                    },
                )
            }
            PipelineDecision::FailStep { step, reason } => {
                fresh_step(step)?;
                (
                    step.clone(),
                    StepRecord {
                        failed: Some(reason.clone()),
                        ..StepRecord::default()
                    },
                )
            }
            PipelineDecision::Finish { succeeded, failed } => {
                let states = self.pipeline_step_states(p);
                if let Some(step) = p.spec.order.iter().find(|s| {
                    !matches!(
                        states.get(*s),
                        Some(StepState::Completed { .. } | StepState::Failed { .. })
                    )
                }) {
                    return Err(rejected(id, PipelineRule::StepNotOver(step.clone())));
                }
                let p = self.pipelines.get_mut(id).expect("checked above");
                p.finished = Some(PipelineFinish {
                    succeeded: *succeeded,
                    failed: failed.clone(),
                    at,
                });
                return Ok(Applied::Done);
            }
        };
        let p = self.pipelines.get_mut(id).expect("checked above");
        p.steps.insert(record.0, record.1);
        Ok(Applied::Done)
    }

    pub(crate) fn cancel_pipeline(
        &mut self,
        id: &str,
        reason: Option<&str>,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        let p = self.pipelines.get(id).ok_or_else(|| unknown(id))?;
        if p.finished.is_some() || p.cancel_requested.is_some() {
            return Err(rejected(id, PipelineRule::FinishedOrCanceling));
        }
        let why = reason.unwrap_or("canceled by user").to_string();
        let active: Vec<String> = p
            .steps
            .values()
            .filter_map(|r| r.run_id.clone())
            .filter(|r| self.runs.get(r).is_some_and(|r| !r.state.is_terminal()))
            .collect();
        let pending: Vec<String> = p
            .spec
            .order
            .iter()
            .filter(|s| !p.steps.contains_key(*s))
            .cloned()
            .collect();
        for run_id in active {
            self.apply(&Command::CancelRun {
                run_id,
                reason: Some(format!("pipeline {id}: {why}")),
                at,
            })?;
        }
        let p = self.pipelines.get_mut(id).expect("checked above");
        for step in pending {
            p.steps.insert(
                step,
                StepRecord {
                    failed: Some(format!(
                        "{}the pipeline was canceled ({why})",
                        crate::pipeline::NOT_RUN
                    )),
                    ..StepRecord::default()
                },
            );
        }
        p.cancel_requested = Some(why);
        Ok(Applied::Done)
    }

    /// Checks the pipelines against the runs (part of [`State::sanity_check`]).
    pub(crate) fn check_pipelines(&self) -> Result<(), String> {
        for (id, p) in &self.pipelines {
            if id != &p.id {
                return Err(format!("pipeline {id} is stored under another id"));
            }
            for (name, rec) in &p.steps {
                if !p.spec.steps.contains_key(name) {
                    return Err(format!("pipeline {id}: record for unknown step {name}"));
                }
                let kinds = usize::from(rec.run_id.is_some())
                    + usize::from(rec.reused.is_some())
                    + usize::from(rec.failed.is_some());
                if kinds != 1 {
                    return Err(format!(
                        "pipeline {id}: step {name} is {kinds} things at once"
                    ));
                }
                if let Some(r) = &rec.run_id {
                    let run = self.runs.get(r).ok_or_else(|| {
                        format!("pipeline {id}: step {name}'s run {r} is missing")
                    })?;
                    if p.finished.is_some() && !run.state.is_terminal() {
                        return Err(format!("pipeline {id} finished with step {name} active"));
                    }
                }
            }
            if p.finished.is_some() && p.steps.len() != p.spec.steps.len() {
                return Err(format!("pipeline {id} finished with steps never decided"));
            }
        }
        Ok(())
    }
}
