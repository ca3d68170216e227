//! Pipelines: Azure ML v2 `type: pipeline` jobs, validated into a DAG of steps, and the
//! planner that decides which steps start.
//!
//! A pipeline's `jobs:` are named command steps, each with its own `compute` (default
//! `settings.default_compute`, else `local`). A step's input bound to
//! `${{parent.jobs.A.outputs.x}}` makes it depend on step `A`: it starts once `A`
//! completed, with `A`'s output `x` placed at `inputs/<input name>` in its working
//! directory (that path is what `${{inputs.<name>}}` becomes in its command).
//! `${{parent.inputs.p}}` takes the pipeline's input `p`; a step output bound to
//! `${{parent.outputs.o}}` becomes the pipeline's output `o`.
//!
//! A step is an inline command job or a command component (`component:`, see
//! `component.rs`), which becomes one.
//!
//! [`parse_pipeline_yaml`] validates: unknown keys and bad references are errors naming
//! their path, and a cycle is an error naming its steps. [`plan`] is a pure function of the
//! spec, the steps' states and a lookup of earlier completed steps by [`reuse_key`]:
//! steps whose inputs are ready start together; a step that failed fails its dependents
//! with the reason (and, unless `settings.continue_on_step_failure`, every step not yet
//! started); a step whose reuse key matches an earlier completed step takes its outputs
//! instead of running (`allow_reuse`, default true, off for all with `settings.force_rerun`);
//! the pipeline is done when every step is terminal.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::spec::{
    DataInput, InputFile, JobFile, OutputFile, RunSpec, Scalar, SpecError, parse_yaml,
};
use crate::sweep::file::from_value;
use crate::sweep::prefix_error;

/// Where a step's input comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StepInput {
    /// A literal value or a data path, as resolved.
    Value {
        /// The value.
        value: String,
    },
    /// Another step's output, placed at `inputs/<name>`.
    StepOutput {
        /// The producing step.
        step: String,
        /// Its output's name.
        output: String,
    },
}

/// One step: a run and its wiring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    /// The run, inputs and outputs substituted in its command.
    pub run: RunSpec,
    /// Its inputs by name.
    pub inputs: BTreeMap<String, StepInput>,
    /// Its outputs' names (each a folder `outputs/<name>`).
    pub outputs: BTreeSet<String>,
    /// Whether an earlier identical step's outputs may be reused.
    pub allow_reuse: bool,
}

impl StepSpec {
    /// The steps this one depends on.
    pub fn depends_on(&self) -> BTreeSet<&str> {
        self.inputs
            .values()
            .filter_map(|i| match i {
                StepInput::StepOutput { step, .. } => Some(step.as_str()),
                StepInput::Value { .. } => None,
            })
            .collect()
    }
}

/// A pipeline as the server stores it: a validated DAG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineSpec {
    /// The display name.
    pub display_name: Option<String>,
    /// The experiment (steps run in it too).
    pub experiment: String,
    /// Free text.
    pub description: Option<String>,
    /// The steps by name.
    pub steps: BTreeMap<String, StepSpec>,
    /// The steps in a topological order (dependencies first, ties by name).
    pub order: Vec<String>,
    /// Keep starting independent steps after one failed.
    pub continue_on_step_failure: bool,
    /// The pipeline's outputs: name → (step, output).
    pub outputs: BTreeMap<String, (String, String)>,
    /// Pipeline-level keys muster read but does not act on, one sentence each (the steps'
    /// own are on their runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    default_compute: Option<String>,
    /// A warning: muster keeps outputs in its one blob store.
    default_datastore: Option<String>,
    continue_on_step_failure: Option<bool>,
    force_rerun: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    #[serde(rename = "$schema")]
    _schema: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    display_name: Option<String>,
    experiment_name: Option<String>,
    description: Option<String>,
    tags: Option<BTreeMap<String, Scalar>>,
    properties: Option<yaml_serde::Value>,
    compute: Option<String>,
    settings: Option<SettingsFile>,
    inputs: Option<BTreeMap<String, InputFile>>,
    outputs: Option<BTreeMap<String, Option<OutputFile>>>,
    jobs: Option<BTreeMap<String, yaml_serde::Value>>,
}

/// A `${{...}}` binding as a whole value.
enum Binding {
    StepOutput(String, String),
    ParentInput(String),
    ParentOutput(String),
}

fn binding(path: &str, text: &str) -> Result<Option<Binding>, SpecError> {
    let t = text.trim();
    if !t.contains("${{") {
        return Ok(None);
    }
    let inner = t
        .strip_prefix("${{")
        .and_then(|r| r.strip_suffix("}}"))
        .map(str::trim)
        .ok_or_else(|| {
            SpecError::field(
                path,
                format!("{text:?}: a binding is the whole value, `${{{{parent.jobs.STEP.outputs.NAME}}}}` or `${{{{parent.inputs.NAME}}}}`"),
            )
        })?;
    let parts: Vec<&str> = inner.split('.').collect();
    match parts.as_slice() {
        ["parent", "jobs", step, "outputs", output] => Ok(Some(Binding::StepOutput(
            step.to_string(),
            output.to_string(),
        ))),
        ["parent", "inputs", name] => Ok(Some(Binding::ParentInput(name.to_string()))),
        ["parent", "outputs", name] => Ok(Some(Binding::ParentOutput(name.to_string()))),
        _ => Err(SpecError::field(
            path,
            format!(
                "`${{{{{inner}}}}}` is not a binding muster knows: use parent.jobs.STEP.outputs.NAME, parent.inputs.NAME or parent.outputs.NAME"
            ),
        )),
    }
}

fn valid_step_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Parses an Azure ML v2 pipeline job (`type: pipeline`) into a validated [`PipelineSpec`].
/// `default_experiment` is used when the file names none.
pub fn parse_pipeline_yaml(
    text: &str,
    default_experiment: &str,
) -> Result<PipelineSpec, SpecError> {
    let file: PipelineFile = parse_yaml(text)?;
    match file.kind.as_deref() {
        Some("pipeline") => {}
        None => {
            return Err(SpecError::field(
                "type",
                "missing: a pipeline job says `type: pipeline`",
            ));
        }
        Some(other) => {
            return Err(SpecError::field(
                "type",
                format!("{other:?}: `muster pipeline submit` takes a `type: pipeline` job"),
            ));
        }
    }
    let settings = file.settings.unwrap_or_default();
    let default_compute = settings.default_compute.or(file.compute);
    let force_rerun = settings.force_rerun.unwrap_or(false);
    let experiment = file
        .experiment_name
        .unwrap_or_else(|| default_experiment.to_string());
    let parent_inputs = file.inputs.unwrap_or_default();
    let parent_outputs: BTreeSet<String> = file.outputs.unwrap_or_default().into_keys().collect();
    let jobs = file.jobs.unwrap_or_default();
    if jobs.is_empty() {
        return Err(SpecError::field(
            "jobs",
            "missing: give at least one step under jobs:",
        ));
    }

    // First pass: each step's job, bindings pulled out.
    struct Raw {
        job: JobFile,
        allow_reuse: bool,
        step_inputs: BTreeMap<String, (String, String)>,
        output_bindings: BTreeMap<String, String>,
    }
    let mut raws = BTreeMap::new();
    for (name, value) in jobs {
        let path = format!("jobs.{name}");
        if !valid_step_name(&name) {
            return Err(SpecError::field(
                &path,
                "a step name uses letters, digits, '_' and '-'",
            ));
        }
        let yaml_serde::Value::Mapping(map) = value else {
            return Err(SpecError::field(
                &path,
                "give the step as an inline command job (command, code, environment, compute, inputs, outputs) or a command component (component: ./train.yml)",
            ));
        };
        // A component step becomes the inline command step it stands for.
        let mut map = crate::component::inline_component(&path, map)?;
        let allow_reuse = match map.remove("allow_reuse") {
            None => true,
            Some(yaml_serde::Value::Bool(b)) => b,
            Some(_) => {
                return Err(SpecError::field(
                    format!("{path}.allow_reuse"),
                    "must be true or false",
                ));
            }
        };
        // Output values written as `${{parent.outputs.o}}` bind the pipeline's outputs.
        let mut output_bindings = BTreeMap::new();
        if let Some(yaml_serde::Value::Mapping(outputs)) = map.get_mut("outputs") {
            for (key, v) in outputs.iter_mut() {
                let key = key.as_str().unwrap_or_default().to_string();
                if let yaml_serde::Value::String(s) = v {
                    let opath = format!("{path}.outputs.{key}");
                    match binding(&opath, s)? {
                        Some(Binding::ParentOutput(o)) => {
                            if !parent_outputs.contains(&o) {
                                return Err(SpecError::field(
                                    opath,
                                    format!(
                                        "names the pipeline output {o:?}, which the pipeline does not define under outputs:"
                                    ),
                                ));
                            }
                            output_bindings.insert(key, o);
                            *v = yaml_serde::Value::Null;
                        }
                        _ => {
                            return Err(SpecError::field(
                                opath,
                                "an output is a mapping ({type: uri_folder}) or `${{parent.outputs.NAME}}`",
                            ));
                        }
                    }
                }
            }
        }
        let mut job: JobFile = from_value(&path, yaml_serde::Value::Mapping(map))?;
        match job.kind.as_deref() {
            None | Some("command") => {}
            Some(other) => {
                return Err(SpecError::field(
                    format!("{path}.type"),
                    format!("muster runs command steps, not {other:?}"),
                ));
            }
        }
        let mut step_inputs = BTreeMap::new();
        let mut inputs = job.inputs.take().unwrap_or_default();
        for (iname, input) in inputs.iter_mut() {
            let ipath = format!("{path}.inputs.{iname}");
            let text = match &*input {
                InputFile::Literal(Scalar::Text(s)) => Some(s.clone()),
                InputFile::Data(DataInput { path: Some(p), .. }) => Some(p.clone()),
                _ => None,
            };
            let Some(text) = text else { continue };
            match binding(&ipath, &text)? {
                None => {}
                Some(Binding::StepOutput(step, output)) => {
                    step_inputs.insert(iname.clone(), (step, output));
                    *input = InputFile::Literal(Scalar::Text(format!("inputs/{iname}")));
                }
                Some(Binding::ParentInput(p)) => {
                    *input = parent_inputs.get(&p).cloned().ok_or_else(|| {
                        SpecError::field(
                            &ipath,
                            format!("names the pipeline input {p:?}, which the pipeline does not define under inputs:"),
                        )
                    })?;
                }
                Some(Binding::ParentOutput(_)) => {
                    return Err(SpecError::field(
                        ipath,
                        "an input cannot read the pipeline's outputs: bind it to parent.jobs.STEP.outputs.NAME",
                    ));
                }
            }
        }
        job.inputs = Some(inputs);
        if job.compute.is_none() {
            job.compute = default_compute.clone();
        }
        if job.experiment_name.is_none() {
            job.experiment_name = Some(experiment.clone());
        }
        raws.insert(
            name,
            Raw {
                job,
                allow_reuse: allow_reuse && !force_rerun,
                step_inputs,
                output_bindings,
            },
        );
    }

    // Second pass: check references, build the steps.
    let declared: BTreeMap<String, BTreeSet<String>> = raws
        .iter()
        .map(|(n, r)| {
            (
                n.clone(),
                r.job
                    .outputs
                    .clone()
                    .unwrap_or_default()
                    .into_keys()
                    .collect(),
            )
        })
        .collect();
    let mut steps = BTreeMap::new();
    let mut outputs = BTreeMap::new();
    for (name, raw) in raws {
        let path = format!("jobs.{name}");
        for (iname, (step, output)) in &raw.step_inputs {
            let ipath = format!("{path}.inputs.{iname}");
            let Some(outs) = declared.get(step) else {
                return Err(SpecError::field(
                    ipath,
                    format!(
                        "`${{{{parent.jobs.{step}.outputs.{output}}}}}` names step {step:?}, which the pipeline does not define under jobs:"
                    ),
                ));
            };
            if !outs.contains(output) {
                return Err(SpecError::field(
                    ipath,
                    format!(
                        "`${{{{parent.jobs.{step}.outputs.{output}}}}}`: step {step:?} has no output {output:?} (add it under its outputs:)"
                    ),
                ));
            }
        }
        for (out, pipeline_out) in &raw.output_bindings {
            if let Some((other, _)) = outputs.get(pipeline_out) {
                return Err(SpecError::field(
                    format!("{path}.outputs.{out}"),
                    format!(
                        "the pipeline output {pipeline_out:?} is already bound by step {other:?}"
                    ),
                ));
            }
            outputs.insert(pipeline_out.clone(), (name.clone(), out.clone()));
        }
        let run = raw
            .job
            .into_run_spec(&experiment)
            .map_err(|e| prefix_error(&path, e))?;
        let inputs = run
            .inputs
            .iter()
            .map(|(iname, value)| {
                let input = match raw.step_inputs.get(iname) {
                    Some((step, output)) => StepInput::StepOutput {
                        step: step.clone(),
                        output: output.clone(),
                    },
                    None => StepInput::Value {
                        value: value.clone(),
                    },
                };
                (iname.clone(), input)
            })
            .collect();
        steps.insert(
            name.clone(),
            StepSpec {
                run,
                inputs,
                outputs: declared[&name].clone(),
                allow_reuse: raw.allow_reuse,
            },
        );
    }
    let order = topological_order(&steps)?;
    let mut warnings = Vec::new();
    if file.tags.is_some() {
        warnings
            .push("tags: not kept on the pipeline; tag its steps (jobs.STEP.tags) instead".into());
    }
    if file.properties.is_some() {
        warnings.push("properties: not kept".into());
    }
    if let Some(d) = &settings.default_datastore {
        warnings.push(format!(
            "settings.default_datastore: {d} is not used; muster keeps outputs in its own store"
        ));
    }
    Ok(PipelineSpec {
        warnings,
        display_name: file.display_name.or(file.name),
        experiment,
        description: file.description,
        steps,
        order,
        continue_on_step_failure: settings.continue_on_step_failure.unwrap_or(false),
        outputs,
    })
}

/// The steps, dependencies first (ties by name); a cycle is an error naming its steps.
pub fn topological_order(steps: &BTreeMap<String, StepSpec>) -> Result<Vec<String>, SpecError> {
    let mut remaining: BTreeMap<&str, BTreeSet<&str>> = steps
        .iter()
        .map(|(n, s)| (n.as_str(), s.depends_on()))
        .collect();
    let mut order = Vec::with_capacity(steps.len());
    loop {
        let ready: Vec<&str> = remaining
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            break;
        }
        for n in ready {
            remaining.remove(n);
            for deps in remaining.values_mut() {
                deps.remove(n);
            }
            order.push(n.to_string());
        }
    }
    if remaining.is_empty() {
        return Ok(order);
    }
    // Walk dependencies from the first remaining step until one repeats: that is a cycle.
    let mut path: Vec<&str> = vec![remaining.keys().next().copied().expect("non-empty")];
    loop {
        let last = *path.last().expect("non-empty");
        let next = *remaining[last]
            .iter()
            .next()
            .expect("a blocked step has a dependency");
        if let Some(at) = path.iter().position(|p| *p == next) {
            // path[at..] depends in turn on the next one; print it in data-flow order.
            let mut cycle: Vec<&str> = path[at..].to_vec();
            cycle.reverse();
            // Start at the first name, for a stable message.
            let first = (0..cycle.len()).min_by_key(|&i| cycle[i]).unwrap_or(0);
            cycle.rotate_left(first);
            cycle.push(cycle[0]);
            return Err(SpecError::field(
                "jobs",
                format!(
                    "steps {} form a cycle: a step cannot depend on its own outputs",
                    cycle.join(" → ")
                ),
            ));
        }
        path.push(next);
    }
}

/// A step's state, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Started (queued or running).
    Running,
    /// Finished; each output's content identity (the digest of its stored snapshot).
    Completed {
        /// Output name → content identity.
        outputs: BTreeMap<String, String>,
        /// True when the outputs were taken from an earlier identical step.
        reused: bool,
    },
    /// Failed, or could not run.
    Failed {
        /// Why.
        reason: String,
    },
}

impl StepState {
    fn is_terminal(&self) -> bool {
        matches!(self, StepState::Completed { .. } | StepState::Failed { .. })
    }
}

/// What the planner decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PipelineDecision {
    /// Start the step's run. Each `mounts` entry is an input to place at `inputs/<name>`:
    /// the content identity of the upstream output.
    StartStep {
        /// The step.
        step: String,
        /// The run to submit.
        run: Box<RunSpec>,
        /// Its reuse key (record it with the outputs when it completes).
        reuse_key: String,
        /// Input name → content identity of the upstream output.
        mounts: BTreeMap<String, String>,
    },
    /// Complete the step with an earlier identical step's outputs.
    ReuseStep {
        /// The step.
        step: String,
        /// The matching reuse key.
        reuse_key: String,
        /// The outputs taken.
        outputs: BTreeMap<String, String>,
    },
    /// Fail a step that cannot run.
    FailStep {
        /// The step.
        step: String,
        /// Why.
        reason: String,
    },
    /// Every step is terminal.
    Finish {
        /// True when every step completed.
        succeeded: bool,
        /// The steps that failed, in order.
        failed: Vec<String>,
    },
}

/// The reuse key of a step: SHA-256 (hex) over its code snapshot, command, environment
/// (image, registered name, variables) and each input's content identity (a literal's value,
/// or the upstream output's identity). Two steps with the same key do the same work.
pub fn reuse_key(run: &RunSpec, input_identities: &BTreeMap<String, String>) -> String {
    let doc = serde_json::json!({
        "v": 1,
        "code": run.code.as_ref().map(|c| &c.manifest),
        "command": run.command,
        "image": run.environment.image,
        "environment": run.environment.name,
        "environment_variables": run.environment_variables,
        "inputs": input_identities,
    });
    let digest = Sha256::digest(doc.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fails a step within a plan: in the plan's view of the steps and as a decision.
fn fail<'a>(
    now: &mut BTreeMap<&'a str, StepState>,
    out: &mut Vec<PipelineDecision>,
    step: &'a str,
    reason: String,
) {
    now.insert(
        step,
        StepState::Failed {
            reason: reason.clone(),
        },
    );
    out.push(PipelineDecision::FailStep {
        step: step.to_string(),
        reason,
    });
}

/// How the reason of a step that never ran begins (an upstream step failed, the pipeline
/// stopped after a failure, or it was canceled): what follows names the cause once.
pub const NOT_RUN: &str = "not run: ";

/// A failed pipeline in one line: each step that failed by itself with its reason, then
/// the steps that never ran because of it (`steps` in order, with their failure reasons).
pub fn failure_summary<'a>(steps: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut failed = Vec::new();
    let mut not_run = Vec::new();
    for (name, reason) in steps {
        if reason.starts_with(NOT_RUN) {
            not_run.push(name);
        } else {
            failed.push(format!("step {name} failed: {reason}"));
        }
    }
    let mut out = failed.join("; ");
    if !not_run.is_empty() {
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(&format!("not run: {}", not_run.join(", ")));
    }
    out
}

/// Decides what happens next (see the module docs). `states` lacks steps not started
/// (they are pending); `reuse` finds an earlier completed step's outputs by reuse key.
/// Decisions that complete or fail a step are taken into account within the same call, so
/// a resubmitted, unchanged pipeline is reused end to end in one plan.
pub fn plan(
    spec: &PipelineSpec,
    states: &BTreeMap<String, StepState>,
    reuse: &dyn Fn(&str) -> Option<BTreeMap<String, String>>,
) -> Vec<PipelineDecision> {
    let mut now: BTreeMap<&str, StepState> = spec
        .order
        .iter()
        .map(|n| {
            (
                n.as_str(),
                states.get(n).cloned().unwrap_or(StepState::Pending),
            )
        })
        .collect();
    let mut out = Vec::new();
    let first_failure = |now: &BTreeMap<&str, StepState>| {
        spec.order
            .iter()
            .find(|n| matches!(now[n.as_str()], StepState::Failed { .. }))
            .cloned()
    };
    for name in &spec.order {
        if now[name.as_str()] != StepState::Pending {
            continue;
        }
        let step = &spec.steps[name];
        let deps = step.depends_on();
        let failed_dep = deps.iter().find_map(|d| match &now[d] {
            StepState::Failed { reason } => Some((d.to_string(), reason.clone())),
            _ => None,
        });
        let reason = if let Some((dep, why)) = failed_dep {
            // Name the step that failed by itself once, however far downstream.
            Some(if why.starts_with(NOT_RUN) {
                why
            } else {
                format!("{NOT_RUN}upstream step {dep} failed: {why}")
            })
        } else if !spec.continue_on_step_failure
            && let Some(f) = first_failure(&now)
        {
            Some(format!(
                "{NOT_RUN}step {f} failed and settings.continue_on_step_failure is false"
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            fail(&mut now, &mut out, name, reason);
            continue;
        }
        if !deps
            .iter()
            .all(|d| matches!(now[d], StepState::Completed { .. }))
        {
            continue;
        }
        // Inputs are ready: their identities.
        let mut identities = BTreeMap::new();
        let mut mounts = BTreeMap::new();
        let mut missing = None;
        for (iname, input) in &step.inputs {
            match input {
                StepInput::Value { value } => {
                    identities.insert(iname.clone(), format!("value:{value}"));
                }
                StepInput::StepOutput { step: up, output } => match &now[up.as_str()] {
                    StepState::Completed { outputs, .. } if outputs.contains_key(output) => {
                        identities.insert(iname.clone(), format!("output:{}", outputs[output]));
                        mounts.insert(iname.clone(), outputs[output].clone());
                    }
                    _ => {
                        missing = Some(format!(
                            "upstream step {up} completed without its output {output}"
                        ))
                    }
                },
            }
        }
        if let Some(reason) = missing {
            fail(&mut now, &mut out, name, reason);
            continue;
        }
        let key = reuse_key(&step.run, &identities);
        let reused = step
            .allow_reuse
            .then(|| reuse(&key))
            .flatten()
            .filter(|outs| step.outputs.iter().all(|o| outs.contains_key(o)));
        if let Some(outputs) = reused {
            now.insert(
                name,
                StepState::Completed {
                    outputs: outputs.clone(),
                    reused: true,
                },
            );
            out.push(PipelineDecision::ReuseStep {
                step: name.clone(),
                reuse_key: key,
                outputs,
            });
        } else {
            now.insert(name, StepState::Running);
            out.push(PipelineDecision::StartStep {
                step: name.clone(),
                run: Box::new(step.run.clone()),
                reuse_key: key,
                mounts,
            });
        }
    }
    if now.values().all(StepState::is_terminal) {
        let failed: Vec<String> = spec
            .order
            .iter()
            .filter(|n| matches!(now[n.as_str()], StepState::Failed { .. }))
            .cloned()
            .collect();
        out.push(PipelineDecision::Finish {
            succeeded: failed.is_empty(),
            failed,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The issue's pipeline: A, then B and C in parallel on A's outputs, then D on both.
    const DIAMOND: &str = r#"
$schema: https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json
type: pipeline
display_name: diamond
experiment_name: pipelines
settings:
  default_compute: azureml:cpu-cluster
  continue_on_step_failure: true
inputs:
  raw:
    type: uri_folder
    path: azureml:raw-data@latest
  rate: 0.1
outputs:
  final:
    type: uri_folder
jobs:
  A:
    type: command
    command: python prep.py --raw ${{inputs.raw}} --out ${{outputs.prepped}}
    environment:
      image: python:3.12
    inputs:
      raw: ${{parent.inputs.raw}}
    outputs:
      prepped:
        type: uri_folder
  B:
    command: python train.py --data ${{inputs.data}} --lr ${{inputs.lr}} --out ${{outputs.model}}
    compute: gpu-cluster
    inputs:
      data: ${{parent.jobs.A.outputs.prepped}}
      lr: ${{parent.inputs.rate}}
    outputs:
      model:
  C:
    command: python stats.py ${{inputs.data}} ${{outputs.report}}
    inputs:
      data:
        type: uri_folder
        path: ${{parent.jobs.A.outputs.prepped}}
    outputs:
      report:
  D:
    command: python eval.py ${{inputs.model}} ${{inputs.report}} ${{outputs.score}}
    allow_reuse: true
    inputs:
      model: ${{parent.jobs.B.outputs.model}}
      report: ${{parent.jobs.C.outputs.report}}
    outputs:
      score: ${{parent.outputs.final}}
"#;

    fn diamond() -> PipelineSpec {
        parse_pipeline_yaml(DIAMOND, "fallback").unwrap()
    }

    fn no_reuse(_: &str) -> Option<BTreeMap<String, String>> {
        None
    }

    fn started(d: &[PipelineDecision]) -> Vec<&str> {
        d.iter()
            .filter_map(|d| match d {
                PipelineDecision::StartStep { step, .. } => Some(step.as_str()),
                _ => None,
            })
            .collect()
    }

    fn completed(outputs: &[(&str, &str)]) -> StepState {
        StepState::Completed {
            outputs: outputs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            reused: false,
        }
    }

    /// The shape of azureml-examples' `cli/jobs/pipelines/nyc-taxi/pipeline.yml`.
    const NYC_TAXI: &str = r#"
$schema: https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json
type: pipeline
display_name: nyc_taxi_data_regression
description: Train regression model based on nyc taxi dataset
outputs:
  pipeline_job_trained_model:
    mode: upload
  pipeline_job_test_data:
    mode: upload
settings:
  default_compute: azureml:cpu-cluster
jobs:
  prep_job:
    type: command
    inputs:
      raw_data:
          type: uri_folder
          path: ./data
    outputs:
      prep_data:
        mode: upload
    code: src/prep
    environment: azureml://registries/azureml/environments/sklearn-1.5/labels/latest
    command: >-
      python prep.py
      --raw_data ${{inputs.raw_data}}
      --prep_data ${{outputs.prep_data}}
  transform_job:
    type: command
    inputs:
      clean_data: ${{parent.jobs.prep_job.outputs.prep_data}}
    outputs:
      transformed_data:
        mode: upload
    code: src/transform
    environment: azureml://registries/azureml/environments/sklearn-1.5/labels/latest
    command: >-
      python transform.py
      --clean_data ${{inputs.clean_data}}
      --transformed_data ${{outputs.transformed_data}}
  train_job:
    type: command
    inputs:
      training_data: ${{parent.jobs.transform_job.outputs.transformed_data}}
    outputs:
      model_output: ${{parent.outputs.pipeline_job_trained_model}}
      test_data: ${{parent.outputs.pipeline_job_test_data}}
    code: src/train
    environment: azureml://registries/azureml/environments/sklearn-1.5/labels/latest
    command: >-
      python train.py
      --training_data ${{inputs.training_data}}
      --test_data ${{outputs.test_data}}
      --model_output ${{outputs.model_output}}
"#;

    #[test]
    fn parses_the_azure_ml_nyc_taxi_pipeline() {
        let p = parse_pipeline_yaml(NYC_TAXI, "fallback").unwrap();
        assert_eq!(p.order, vec!["prep_job", "transform_job", "train_job"]);
        assert_eq!(p.experiment, "fallback");
        let train = &p.steps["train_job"];
        assert_eq!(train.run.compute, "cpu-cluster");
        assert_eq!(
            train.run.command,
            "python train.py --training_data inputs/training_data --test_data outputs/test_data --model_output outputs/model_output"
        );
        assert_eq!(
            p.outputs["pipeline_job_trained_model"],
            ("train_job".to_string(), "model_output".to_string())
        );
        assert_eq!(
            p.steps["prep_job"].inputs["raw_data"],
            StepInput::Value {
                value: "./data".into()
            }
        );
    }

    #[test]
    fn the_diamond_parses_into_a_dag() {
        let p = diamond();
        assert_eq!(p.order, vec!["A", "B", "C", "D"]);
        assert_eq!(p.experiment, "pipelines");
        let a = &p.steps["A"];
        assert_eq!(
            a.run.command,
            "python prep.py --raw raw-data@latest --out outputs/prepped"
        );
        assert_eq!(a.run.compute, "cpu-cluster");
        let b = &p.steps["B"];
        assert_eq!(b.run.compute, "gpu-cluster");
        assert_eq!(
            b.run.command,
            "python train.py --data inputs/data --lr 0.1 --out outputs/model"
        );
        assert_eq!(b.depends_on(), BTreeSet::from(["A"]));
        assert_eq!(p.steps["C"].depends_on(), BTreeSet::from(["A"]));
        assert_eq!(p.steps["D"].depends_on(), BTreeSet::from(["B", "C"]));
        assert_eq!(
            p.outputs,
            BTreeMap::from([("final".to_string(), ("D".to_string(), "score".to_string()))])
        );
    }

    #[test]
    fn steps_start_when_their_inputs_are_ready_in_parallel() {
        let p = diamond();
        let mut states = BTreeMap::new();
        assert_eq!(started(&plan(&p, &states, &no_reuse)), vec!["A"]);
        states.insert("A".to_string(), StepState::Running);
        assert!(plan(&p, &states, &no_reuse).is_empty());
        states.insert("A".to_string(), completed(&[("prepped", "h-a")]));
        let d = plan(&p, &states, &no_reuse);
        assert_eq!(started(&d), vec!["B", "C"]);
        match &d[0] {
            PipelineDecision::StartStep { mounts, .. } => {
                assert_eq!(
                    mounts,
                    &BTreeMap::from([("data".to_string(), "h-a".to_string())])
                );
            }
            other => panic!("{other:?}"),
        }
        states.insert("B".to_string(), completed(&[("model", "h-b")]));
        states.insert("C".to_string(), StepState::Running);
        assert!(plan(&p, &states, &no_reuse).is_empty());
        states.insert("C".to_string(), completed(&[("report", "h-c")]));
        assert_eq!(started(&plan(&p, &states, &no_reuse)), vec!["D"]);
        states.insert("D".to_string(), completed(&[("score", "h-d")]));
        assert_eq!(
            plan(&p, &states, &no_reuse),
            vec![PipelineDecision::Finish {
                succeeded: true,
                failed: vec![]
            }]
        );
    }

    #[test]
    fn pipeline_keys_muster_does_not_act_on_are_warnings() {
        let p = parse_pipeline_yaml(
            "type: pipeline\ntags: {team: cv}\nproperties: {a: b}\nsettings:\n  default_datastore: azureml:workspaceblobstore\njobs:\n  a:\n    command: echo\n",
            "exp",
        )
        .unwrap();
        let keys: Vec<&str> = p
            .warnings
            .iter()
            .map(|w| w.split(':').next().unwrap())
            .collect();
        assert_eq!(keys, ["tags", "properties", "settings.default_datastore"]);
    }

    #[test]
    fn component_steps_wire_like_inline_ones() {
        let p = parse_pipeline_yaml(
            r#"type: pipeline
inputs:
  raw: {type: uri_folder, path: ./data}
outputs:
  trained: {type: uri_folder}
jobs:
  prep:
    type: command
    component:
      type: command
      inputs: {raw: {type: uri_folder}}
      outputs: {clean: {type: uri_folder}}
      command: python prep.py ${{inputs.raw}} ${{outputs.clean}}
    inputs: {raw: "${{parent.inputs.raw}}"}
  train:
    type: command
    component:
      type: command
      inputs:
        data: {type: uri_folder}
        epochs: {type: integer, default: 10}
      outputs: {model: {type: uri_folder}}
      command: python train.py ${{inputs.data}} ${{inputs.epochs}} ${{outputs.model}}
    inputs: {data: "${{parent.jobs.prep.outputs.clean}}"}
    outputs: {model: "${{parent.outputs.trained}}"}
"#,
            "exp",
        )
        .unwrap();
        assert_eq!(p.order, ["prep", "train"]);
        let train = &p.steps["train"];
        assert_eq!(
            train.run.command,
            "python train.py inputs/data 10 outputs/model"
        );
        assert_eq!(train.depends_on(), BTreeSet::from(["prep"]));
        assert_eq!(
            p.outputs.get("trained"),
            Some(&("train".to_string(), "model".to_string()))
        );
        assert_eq!(
            p.steps["prep"].outputs,
            BTreeSet::from(["clean".to_string()])
        );
    }

    #[test]
    fn a_failed_pipeline_names_its_root_cause_once_and_what_never_ran() {
        assert_eq!(
            failure_summary([
                ("A", "exited with code 1"),
                ("B", "not run: upstream step A failed: exited with code 1"),
                ("C", "not run: upstream step A failed: exited with code 1"),
            ]),
            "step A failed: exited with code 1; not run: B, C"
        );
        assert_eq!(
            failure_summary([("x", "not run: the pipeline was canceled (by alice)")]),
            "not run: x"
        );
    }

    #[test]
    fn a_failed_step_fails_its_dependents_with_the_reason() {
        let p = diamond();
        let states = BTreeMap::from([
            ("A".to_string(), completed(&[("prepped", "h-a")])),
            (
                "B".to_string(),
                StepState::Failed {
                    reason: "exit code 1".into(),
                },
            ),
            ("C".to_string(), StepState::Running),
        ]);
        let d = plan(&p, &states, &no_reuse);
        assert_eq!(
            d,
            vec![PipelineDecision::FailStep {
                step: "D".into(),
                reason: "not run: upstream step B failed: exit code 1".into()
            }]
        );
        // C still runs; once it ends, the pipeline ends failed.
        let mut states = states;
        states.insert("C".to_string(), completed(&[("report", "h-c")]));
        states.insert(
            "D".to_string(),
            StepState::Failed {
                reason: "not run: upstream step B failed: exit code 1".into(),
            },
        );
        assert_eq!(
            plan(&p, &states, &no_reuse),
            vec![PipelineDecision::Finish {
                succeeded: false,
                failed: vec!["B".into(), "D".into()]
            }]
        );
        // A failing first fails everything downstream, transitively, in one plan.
        let states = BTreeMap::from([(
            "A".to_string(),
            StepState::Failed {
                reason: "oom".into(),
            },
        )]);
        let d = plan(&p, &states, &no_reuse);
        let failed: Vec<_> = d
            .iter()
            .filter_map(|d| match d {
                PipelineDecision::FailStep { step, reason } => {
                    Some((step.as_str(), reason.as_str()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            failed,
            vec![
                ("B", "not run: upstream step A failed: oom"),
                ("C", "not run: upstream step A failed: oom"),
                ("D", "not run: upstream step A failed: oom"),
            ]
        );
        assert!(matches!(
            d.last(),
            Some(PipelineDecision::Finish {
                succeeded: false,
                ..
            })
        ));
    }

    #[test]
    fn without_continue_on_step_failure_no_new_step_starts() {
        let text = "type: pipeline\njobs:\n  a:\n    command: x\n  b:\n    command: y\n  c:\n    command: z ${{inputs.i}}\n    inputs:\n      i: ${{parent.jobs.b.outputs.o}}\n  b2:\n    command: w\n    outputs:\n      o:\n";
        let text = text.replace("parent.jobs.b.outputs.o", "parent.jobs.b2.outputs.o");
        let p = parse_pipeline_yaml(&text, "e").unwrap();
        assert!(!p.continue_on_step_failure);
        let states = BTreeMap::from([
            (
                "a".to_string(),
                StepState::Failed {
                    reason: "boom".into(),
                },
            ),
            ("b".to_string(), StepState::Running),
            ("b2".to_string(), completed(&[("o", "h")])),
        ]);
        let d = plan(&p, &states, &no_reuse);
        assert_eq!(
            d,
            vec![PipelineDecision::FailStep {
                step: "c".into(),
                reason: "not run: step a failed and settings.continue_on_step_failure is false"
                    .into()
            }]
        );
    }

    /// Runs the pipeline to the end with fake step outputs derived from the reuse key,
    /// recording completed steps in `cache`; returns the steps that actually ran.
    fn run_all(
        p: &PipelineSpec,
        cache: &mut BTreeMap<String, BTreeMap<String, String>>,
    ) -> Vec<String> {
        let mut states: BTreeMap<String, StepState> = BTreeMap::new();
        let mut ran = Vec::new();
        for _ in 0..20 {
            let snapshot = cache.clone();
            let lookup = move |k: &str| snapshot.get(k).cloned();
            let decisions = plan(p, &states, &lookup);
            for d in decisions {
                match d {
                    PipelineDecision::StartStep {
                        step, reuse_key, ..
                    } => {
                        // The step "runs": outputs are a function of its key (deterministic work).
                        let outputs: BTreeMap<String, String> = p.steps[&step]
                            .outputs
                            .iter()
                            .map(|o| (o.clone(), format!("{o}@{}", &reuse_key[..8])))
                            .collect();
                        cache.insert(reuse_key, outputs.clone());
                        states.insert(
                            step.clone(),
                            StepState::Completed {
                                outputs,
                                reused: false,
                            },
                        );
                        ran.push(step);
                    }
                    PipelineDecision::ReuseStep { step, outputs, .. } => {
                        states.insert(
                            step,
                            StepState::Completed {
                                outputs,
                                reused: true,
                            },
                        );
                    }
                    PipelineDecision::FailStep { step, reason } => {
                        states.insert(step, StepState::Failed { reason });
                    }
                    PipelineDecision::Finish { succeeded, .. } => {
                        assert!(succeeded);
                        return ran;
                    }
                }
            }
        }
        panic!("the pipeline did not finish");
    }

    #[test]
    fn an_unchanged_resubmission_reuses_all_four_steps() {
        let p = diamond();
        let mut cache = BTreeMap::new();
        assert_eq!(run_all(&p, &mut cache), vec!["A", "B", "C", "D"]);
        // Resubmitted unchanged: one plan reuses every step and finishes.
        let snapshot = cache.clone();
        let d = plan(&diamond(), &BTreeMap::new(), &move |k: &str| {
            snapshot.get(k).cloned()
        });
        let reused: Vec<_> = d
            .iter()
            .filter_map(|d| match d {
                PipelineDecision::ReuseStep { step, .. } => Some(step.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(reused, vec!["A", "B", "C", "D"]);
        assert!(matches!(
            d.last(),
            Some(PipelineDecision::Finish {
                succeeded: true,
                ..
            })
        ));
        assert!(run_all(&diamond(), &mut cache).is_empty());
        // Changing D's command re-runs D only.
        let changed =
            parse_pipeline_yaml(&DIAMOND.replace("python eval.py", "python eval2.py"), "x")
                .unwrap();
        assert_eq!(run_all(&changed, &mut cache), vec!["D"]);
        // Changing A's command re-runs A, and so everything fed by its (new) outputs.
        let changed =
            parse_pipeline_yaml(&DIAMOND.replace("python prep.py", "python prep2.py"), "x")
                .unwrap();
        assert_eq!(run_all(&changed, &mut cache), vec!["A", "B", "C", "D"]);
        // allow_reuse: false on D always re-runs it.
        let no = parse_pipeline_yaml(
            &DIAMOND.replace("allow_reuse: true", "allow_reuse: false"),
            "x",
        )
        .unwrap();
        assert_eq!(run_all(&no, &mut cache), vec!["D"]);
        // settings.force_rerun re-runs all.
        let forced = parse_pipeline_yaml(
            &DIAMOND.replace("continue_on_step_failure: true", "force_rerun: true"),
            "x",
        )
        .unwrap();
        assert_eq!(run_all(&forced, &mut cache), vec!["A", "B", "C", "D"]);
    }

    #[test]
    fn the_reuse_key_covers_code_command_image_and_inputs() {
        let run = RunSpec::new("python t.py");
        let inputs = BTreeMap::from([("x".to_string(), "output:h1".to_string())]);
        let k = reuse_key(&run, &inputs);
        assert_eq!(k.len(), 64);
        assert_eq!(k, reuse_key(&run.clone(), &inputs.clone()));
        let mut other = run.clone();
        other.command = "python u.py".into();
        assert_ne!(k, reuse_key(&other, &inputs));
        let mut other = run.clone();
        other.environment.image = Some("python:3.12".into());
        assert_ne!(k, reuse_key(&other, &inputs));
        let mut other = run.clone();
        other.code = Some(crate::spec::CodeRef {
            manifest: "a".repeat(64),
            files: 1,
            bytes: 1,
            git: None,
        });
        assert_ne!(k, reuse_key(&other, &inputs));
        let changed = BTreeMap::from([("x".to_string(), "output:h2".to_string())]);
        assert_ne!(k, reuse_key(&run, &changed));
        // The compute target does not change the work.
        let mut other = run.clone();
        other.compute = "gpu".into();
        assert_eq!(k, reuse_key(&other, &inputs));
    }

    #[test]
    fn cycles_are_rejected_naming_the_steps() {
        let text = "type: pipeline\njobs:\n  a:\n    command: x ${{inputs.i}}\n    inputs:\n      i: ${{parent.jobs.c.outputs.o}}\n    outputs:\n      o:\n  b:\n    command: y ${{inputs.i}}\n    inputs:\n      i: ${{parent.jobs.a.outputs.o}}\n    outputs:\n      o:\n  c:\n    command: z ${{inputs.i}}\n    inputs:\n      i: ${{parent.jobs.b.outputs.o}}\n    outputs:\n      o:\n  d:\n    command: free\n";
        let e = parse_pipeline_yaml(text, "e").unwrap_err();
        assert_eq!(e.path, "jobs");
        assert!(e.message.contains("a → b → c → a"), "{e}");
        let selfloop = "type: pipeline\njobs:\n  a:\n    command: x ${{inputs.i}}\n    inputs:\n      i: ${{parent.jobs.a.outputs.o}}\n    outputs:\n      o:\n";
        let e = parse_pipeline_yaml(selfloop, "e").unwrap_err();
        assert!(e.message.contains("a → a"), "{e}");
    }

    #[test]
    fn bad_references_name_their_path() {
        for (from, to, path) in [
            (
                "parent.jobs.A.outputs.prepped}}\n      lr",
                "parent.jobs.Z.outputs.prepped}}\n      lr",
                "jobs.B.inputs.data",
            ),
            (
                "parent.jobs.A.outputs.prepped}}\n      lr",
                "parent.jobs.A.outputs.nope}}\n      lr",
                "jobs.B.inputs.data",
            ),
            (
                "${{parent.inputs.rate}}",
                "${{parent.inputs.speed}}",
                "jobs.B.inputs.lr",
            ),
            (
                "${{parent.outputs.final}}",
                "${{parent.outputs.other}}",
                "jobs.D.outputs.score",
            ),
            (
                "${{parent.inputs.rate}}",
                "${{parent.things.rate}}",
                "jobs.B.inputs.lr",
            ),
            (
                "    allow_reuse: true",
                "    allow_reuse: maybe",
                "jobs.D.allow_reuse",
            ),
            (
                "    compute: gpu-cluster",
                "    compute: gpu-cluster\n    computer: x",
                "jobs.B.computer",
            ),
            (
                "    compute: gpu-cluster",
                "    compute: gpu_cluster",
                "jobs.B.compute",
            ),
            (
                "  continue_on_step_failure: true",
                "  continue_on_failure: true",
                "settings.continue_on_failure",
            ),
            (
                "--out ${{outputs.model}}",
                "--out ${{outputs.modl}}",
                "jobs.B.command",
            ),
        ] {
            let text = DIAMOND.replace(from, to);
            assert_ne!(text, DIAMOND, "{from}");
            let e = parse_pipeline_yaml(&text, "e").unwrap_err();
            assert_eq!(e.path, path, "{e}");
        }
        let e = parse_pipeline_yaml("type: pipeline\njobs: {}\n", "e").unwrap_err();
        assert_eq!(e.path, "jobs");
        let e = parse_pipeline_yaml("type: sweep\njobs: {}\n", "e").unwrap_err();
        assert_eq!(e.path, "type");
    }

    /// A pipeline of `n` steps `s0..`, where step j reads step i's output when
    /// `edges[i][j]` (i < j, so acyclic).
    fn random_pipeline(n: usize, edges: &[Vec<bool>], keep_going: bool) -> PipelineSpec {
        let mut text =
            format!("type: pipeline\nsettings:\n  continue_on_step_failure: {keep_going}\njobs:\n");
        let edge = |i: usize, j: usize| edges[i][j];
        for j in 0..n {
            let deps: Vec<usize> = (0..j).filter(|&i| edge(i, j)).collect();
            let args: String = deps
                .iter()
                .map(|i| format!(" ${{{{inputs.i{i}}}}}"))
                .collect();
            text.push_str(&format!(
                "  s{j}:\n    command: step{j}{args}\n    outputs:\n      o:\n"
            ));
            if !deps.is_empty() {
                text.push_str("    inputs:\n");
                for i in deps {
                    text.push_str(&format!(
                        "      i{i}: ${{{{parent.jobs.s{i}.outputs.o}}}}\n"
                    ));
                }
            }
        }
        parse_pipeline_yaml(&text, "e").unwrap()
    }

    proptest::proptest! {
        /// On any DAG with any failures, a step starts only once all its inputs are
        /// complete, each step is decided once, a step fails exactly when it failed itself
        /// or an upstream step did, and the pipeline finishes once, with all steps over.
        #[test]
        fn the_planner_is_sound_on_any_dag(
            n in 1usize..8,
            edges in proptest::collection::vec(proptest::collection::vec(proptest::bool::ANY, 8), 8),
            failing in proptest::collection::vec(proptest::bool::weighted(0.2), 8),
            keep_going in proptest::bool::ANY,
        ) {
            let edges: Vec<Vec<bool>> = (0..8)
                .map(|i| (0..8).map(|j| i < j && edges[i][j]).collect())
                .collect();
            let p = random_pipeline(n, &edges, keep_going);
            let mut states: BTreeMap<String, StepState> = BTreeMap::new();
            let mut finished = None;
            for _ in 0..50 {
                let decisions = plan(&p, &states, &no_reuse);
                let mut started = Vec::new();
                for d in decisions {
                    match d {
                        PipelineDecision::StartStep { step, .. } => {
                            for dep in p.steps[&step].depends_on() {
                                let done = matches!(states.get(dep), Some(StepState::Completed { .. }));
                                proptest::prop_assert!(done);
                            }
                            proptest::prop_assert!(!states.contains_key(&step));
                            states.insert(step.clone(), StepState::Running);
                            started.push(step);
                        }
                        PipelineDecision::FailStep { step, reason } => {
                            proptest::prop_assert!(!states.contains_key(&step));
                            states.insert(step, StepState::Failed { reason });
                        }
                        PipelineDecision::ReuseStep { .. } => proptest::prop_assert!(false, "nothing to reuse"),
                        PipelineDecision::Finish { succeeded, failed } => {
                            proptest::prop_assert!(finished.is_none());
                            finished = Some((succeeded, failed));
                        }
                    }
                }
                if finished.is_some() {
                    break;
                }
                // Steps started in an earlier round end now.
                for (name, state) in states.iter_mut() {
                    if *state == StepState::Running && !started.contains(name) {
                        let j: usize = name[1..].parse().unwrap();
                        *state = if failing[j] {
                            StepState::Failed { reason: "exit 1".into() }
                        } else {
                            completed(&[("o", name)])
                        };
                    }
                }
            }
            let (succeeded, failed) = finished.expect("the pipeline finishes");
            proptest::prop_assert_eq!(states.len(), n);
            let any_failed = (0..n).any(|j| failing[j] && !matches!(states[&format!("s{j}")], StepState::Failed { ref reason } if reason.starts_with(NOT_RUN)));
            proptest::prop_assert_eq!(succeeded, failed.is_empty());
            proptest::prop_assert_eq!(succeeded, !any_failed);
            for (j, fails) in failing.iter().enumerate().take(n) {
                let name = format!("s{j}");
                let upstream_failed = p.steps[&name].depends_on().iter().any(|d| matches!(states[*d], StepState::Failed { .. }));
                let is_failed = matches!(states[&name], StepState::Failed { .. });
                if upstream_failed {
                    proptest::prop_assert!(is_failed, "{name} runs after a failed input");
                }
                if keep_going && !upstream_failed {
                    proptest::prop_assert_eq!(is_failed, *fails, "{}", name);
                }
            }
        }
    }
}
