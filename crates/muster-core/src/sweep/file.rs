//! Sweep files as written: Azure ML v2 `type: sweep` YAML and the v1 HyperDrive
//! `hdconfig.yml`, both normalized into a [`SweepSpec`]. Unknown keys are errors naming
//! their path, as in [`crate::spec`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::policy::{EarlyTermination, PolicyKind, Slack};
use super::space::{Distribution, ParamValue};
use super::{
    DEFAULT_MAX_TOTAL_TRIALS, DEFAULT_SWEEP_TIMEOUT_S, Goal, Objective, Sampling, SweepLimits,
    SweepSpec, prefix_error, search_space_refs,
};
use crate::spec::{
    InputFile, JobFile, OutputFile, RunSpec, Scalar, SpecError, parse_yaml, substitute,
};

/// Deserializes a sub-document, naming `prefix.<path>` in errors.
pub(crate) fn from_value<T: DeserializeOwned>(
    prefix: &str,
    value: yaml_serde::Value,
) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let raw = err.into_inner().to_string();
        let path = if path == "." || path.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{path}")
        };
        let message = if let Some(at) = raw.find("unknown field `") {
            let rest = &raw[at + "unknown field `".len()..];
            let expected = rest.split("expected ").nth(1).unwrap_or_default();
            if expected.is_empty() {
                "unknown key: remove it or fix its spelling".to_string()
            } else {
                format!("unknown key: remove it or fix its spelling; expected {expected}")
            }
        } else {
            raw
        };
        SpecError::field(path, message)
    })
}

/// A `search_space` entry as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchSpaceEntry {
    #[serde(rename = "type")]
    kind: Option<String>,
    values: Option<Vec<ParamValue>>,
    upper: Option<i64>,
    min_value: Option<f64>,
    max_value: Option<f64>,
    q: Option<f64>,
    mu: Option<f64>,
    sigma: Option<f64>,
}

/// `sampling_algorithm:` in its long form.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplingFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    seed: Option<u64>,
    rule: Option<String>,
    logbase: Option<Scalar>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectiveFile {
    primary_metric: Option<String>,
    goal: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct EarlyTerminationFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    evaluation_interval: Option<u32>,
    delay_evaluation: Option<u32>,
    slack_factor: Option<f64>,
    slack_amount: Option<f64>,
    truncation_percentage: Option<u32>,
    exclude_finished_jobs: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepLimitsFile {
    max_total_trials: Option<u32>,
    max_concurrent_trials: Option<u32>,
    timeout: Option<u64>,
    trial_timeout: Option<u64>,
}

/// An Azure ML v2 sweep job, as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    #[serde(rename = "$schema")]
    _schema: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    display_name: Option<String>,
    experiment_name: Option<String>,
    description: Option<String>,
    tags: Option<BTreeMap<String, Scalar>>,
    #[serde(rename = "properties")]
    _properties: Option<yaml_serde::Value>,
    compute: Option<String>,
    inputs: Option<BTreeMap<String, InputFile>>,
    outputs: Option<BTreeMap<String, Option<OutputFile>>>,
    trial: Option<yaml_serde::Value>,
    sampling_algorithm: Option<yaml_serde::Value>,
    search_space: Option<BTreeMap<String, SearchSpaceEntry>>,
    objective: Option<ObjectiveFile>,
    early_termination: Option<EarlyTerminationFile>,
    limits: Option<SweepLimitsFile>,
}

fn missing(path: &str, what: &str) -> SpecError {
    SpecError::field(path, format!("missing: {what}"))
}

fn distribution_v2(name: &str, e: SearchSpaceEntry) -> Result<Distribution, SpecError> {
    let path = format!("search_space.{name}");
    let kind = e.kind.clone().ok_or_else(|| {
        missing(
            &format!("{path}.type"),
            "give choice, randint, uniform, quniform, loguniform, qloguniform, normal, qnormal, lognormal or qlognormal",
        )
    })?;
    let need = |v: Option<f64>, key: &str| {
        v.ok_or_else(|| missing(&format!("{path}.{key}"), &format!("{kind} needs {key}")))
    };
    let (dist, used): (Distribution, &[&str]) = match kind.to_ascii_lowercase().as_str() {
        "choice" => (
            Distribution::Choice {
                values: e
                    .values
                    .clone()
                    .ok_or_else(|| missing(&format!("{path}.values"), "choice needs values"))?,
            },
            &["values"],
        ),
        "randint" => (
            Distribution::Randint {
                upper: e
                    .upper
                    .ok_or_else(|| missing(&format!("{path}.upper"), "randint needs upper"))?,
            },
            &["upper"],
        ),
        "uniform" => (
            Distribution::Uniform {
                min: need(e.min_value, "min_value")?,
                max: need(e.max_value, "max_value")?,
            },
            &["min_value", "max_value"],
        ),
        "loguniform" => (
            Distribution::Loguniform {
                min: need(e.min_value, "min_value")?,
                max: need(e.max_value, "max_value")?,
            },
            &["min_value", "max_value"],
        ),
        "quniform" => (
            Distribution::Quniform {
                min: need(e.min_value, "min_value")?,
                max: need(e.max_value, "max_value")?,
                q: need(e.q, "q")?,
            },
            &["min_value", "max_value", "q"],
        ),
        "qloguniform" => (
            Distribution::Qloguniform {
                min: need(e.min_value, "min_value")?,
                max: need(e.max_value, "max_value")?,
                q: need(e.q, "q")?,
            },
            &["min_value", "max_value", "q"],
        ),
        "normal" => (
            Distribution::Normal {
                mu: need(e.mu, "mu")?,
                sigma: need(e.sigma, "sigma")?,
            },
            &["mu", "sigma"],
        ),
        "lognormal" => (
            Distribution::Lognormal {
                mu: need(e.mu, "mu")?,
                sigma: need(e.sigma, "sigma")?,
            },
            &["mu", "sigma"],
        ),
        "qnormal" => (
            Distribution::Qnormal {
                mu: need(e.mu, "mu")?,
                sigma: need(e.sigma, "sigma")?,
                q: need(e.q, "q")?,
            },
            &["mu", "sigma", "q"],
        ),
        "qlognormal" => (
            Distribution::Qlognormal {
                mu: need(e.mu, "mu")?,
                sigma: need(e.sigma, "sigma")?,
                q: need(e.q, "q")?,
            },
            &["mu", "sigma", "q"],
        ),
        other => {
            return Err(SpecError::field(
                format!("{path}.type"),
                format!(
                    "unknown distribution {other:?}: use choice, randint, uniform, quniform, loguniform, qloguniform, normal, qnormal, lognormal or qlognormal"
                ),
            ));
        }
    };
    let given = [
        ("values", e.values.is_some()),
        ("upper", e.upper.is_some()),
        ("min_value", e.min_value.is_some()),
        ("max_value", e.max_value.is_some()),
        ("q", e.q.is_some()),
        ("mu", e.mu.is_some()),
        ("sigma", e.sigma.is_some()),
    ];
    if let Some((key, _)) = given.iter().find(|(k, set)| *set && !used.contains(k)) {
        return Err(SpecError::field(
            format!("{path}.{key}"),
            format!("{kind} does not take {key}: it takes {}", used.join(", ")),
        ));
    }
    dist.validate().map_err(|m| SpecError::field(path, m))?;
    Ok(dist)
}

fn parse_goal(path: &str, goal: Option<&str>) -> Result<Goal, SpecError> {
    match goal.map(str::to_ascii_lowercase).as_deref() {
        Some("maximize") => Ok(Goal::Maximize),
        Some("minimize") => Ok(Goal::Minimize),
        None => Err(missing(path, "give maximize or minimize")),
        Some(other) => Err(SpecError::field(
            path,
            format!("{other:?} is not a goal: use maximize or minimize"),
        )),
    }
}

fn sampling_v2(value: Option<yaml_serde::Value>) -> Result<Sampling, SpecError> {
    const PATH: &str = "sampling_algorithm";
    let file = match value {
        None => return Err(missing(PATH, "give random, grid or bayesian")),
        Some(yaml_serde::Value::String(s)) => SamplingFile {
            kind: Some(s),
            ..SamplingFile::default()
        },
        Some(v) => from_value::<SamplingFile>(PATH, v)?,
    };
    let kind = file
        .kind
        .ok_or_else(|| missing(&format!("{PATH}.type"), "give random, grid or bayesian"))?;
    let sampling = match kind.to_ascii_lowercase().as_str() {
        "random" => {
            match file.rule.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("random") => {}
                Some("sobol") => {
                    return Err(SpecError::field(
                        format!("{PATH}.rule"),
                        "muster's random sampler does not implement sobol sequences: use rule: random or leave rule out",
                    ));
                }
                Some(other) => {
                    return Err(SpecError::field(
                        format!("{PATH}.rule"),
                        format!("unknown rule {other:?}: use random"),
                    ));
                }
            }
            match &file.logbase {
                None => {}
                Some(Scalar::Text(e)) if e == "e" => {}
                Some(Scalar::Float(b)) if (b - std::f64::consts::E).abs() < 1e-9 => {}
                Some(other) => {
                    return Err(SpecError::field(
                        format!("{PATH}.logbase"),
                        format!(
                            "muster samples log distributions in base e, not {other}: use logbase: e or leave it out"
                        ),
                    ));
                }
            }
            Sampling::Random { seed: file.seed }
        }
        "grid" => Sampling::Grid,
        "bayesian" => Sampling::Bayesian,
        other => {
            return Err(SpecError::field(
                PATH,
                format!("unknown sampling algorithm {other:?}: use random, grid or bayesian"),
            ));
        }
    };
    if sampling != (Sampling::Random { seed: file.seed }) {
        if file.seed.is_some() {
            return Err(SpecError::field(
                format!("{PATH}.seed"),
                format!("only random sampling takes a seed, not {kind}"),
            ));
        }
        if file.rule.is_some() {
            return Err(SpecError::field(
                format!("{PATH}.rule"),
                format!("only random sampling takes a rule, not {kind}"),
            ));
        }
        if file.logbase.is_some() {
            return Err(SpecError::field(
                format!("{PATH}.logbase"),
                format!("only random sampling takes a logbase, not {kind}"),
            ));
        }
    }
    Ok(sampling)
}

fn early_termination_v2(e: EarlyTerminationFile) -> Result<Option<EarlyTermination>, SpecError> {
    const PATH: &str = "early_termination";
    let kind = e.kind.clone().ok_or_else(|| {
        missing(
            &format!("{PATH}.type"),
            "give bandit, median_stopping or truncation_selection",
        )
    })?;
    let kind_l = kind.to_ascii_lowercase();
    let policy = match kind_l.as_str() {
        "bandit" => PolicyKind::Bandit {
            slack: match (e.slack_factor, e.slack_amount) {
                (Some(f), None) => Slack::Factor(f),
                (None, Some(a)) => Slack::Amount(a),
                _ => {
                    return Err(SpecError::field(
                        format!("{PATH}.slack_factor"),
                        "a bandit policy needs exactly one of slack_factor or slack_amount",
                    ));
                }
            },
        },
        "median_stopping" => PolicyKind::MedianStopping,
        "truncation_selection" => PolicyKind::TruncationSelection {
            truncation_percentage: e.truncation_percentage.ok_or_else(|| {
                missing(
                    &format!("{PATH}.truncation_percentage"),
                    "truncation_selection needs truncation_percentage (1-99)",
                )
            })?,
            exclude_finished: e.exclude_finished_jobs.unwrap_or(false),
        },
        other => {
            return Err(SpecError::field(
                format!("{PATH}.type"),
                format!(
                    "unknown policy {other:?}: use bandit, median_stopping or truncation_selection"
                ),
            ));
        }
    };
    for (key, set, allowed) in [
        ("slack_factor", e.slack_factor.is_some(), "bandit"),
        ("slack_amount", e.slack_amount.is_some(), "bandit"),
        (
            "truncation_percentage",
            e.truncation_percentage.is_some(),
            "truncation_selection",
        ),
        (
            "exclude_finished_jobs",
            e.exclude_finished_jobs.is_some(),
            "truncation_selection",
        ),
    ] {
        if set && kind_l != allowed {
            return Err(SpecError::field(
                format!("{PATH}.{key}"),
                format!("{key} belongs to a {allowed} policy, not {kind}"),
            ));
        }
    }
    let policy = EarlyTermination {
        kind: policy,
        evaluation_interval: e.evaluation_interval.unwrap_or(1),
        delay_evaluation: e.delay_evaluation.unwrap_or(0),
    };
    policy.validate()?;
    Ok(Some(policy))
}

/// Parses an Azure ML v2 sweep job (`type: sweep`) into a validated [`SweepSpec`].
/// `default_experiment` is used when the file names none.
pub fn parse_sweep_yaml(text: &str, default_experiment: &str) -> Result<SweepSpec, SpecError> {
    let file: SweepFile = parse_yaml(text)?;
    match file.kind.as_deref() {
        Some("sweep") => {}
        None => return Err(missing("type", "a sweep job says `type: sweep`")),
        Some(other) => {
            return Err(SpecError::field(
                "type",
                format!("{other:?}: `muster sweep submit` takes a `type: sweep` job"),
            ));
        }
    }
    let mut search_space = BTreeMap::new();
    for (name, entry) in file
        .search_space
        .ok_or_else(|| missing("search_space", "give at least one parameter"))?
    {
        let dist = distribution_v2(&name, entry)?;
        search_space.insert(name, dist);
    }
    let sampling = sampling_v2(file.sampling_algorithm)?;
    let objective = file
        .objective
        .ok_or_else(|| missing("objective", "give primary_metric and goal"))?;
    let objective = Objective {
        primary_metric: objective
            .primary_metric
            .ok_or_else(|| missing("objective.primary_metric", "name the metric the trials log"))?,
        goal: parse_goal("objective.goal", objective.goal.as_deref())?,
    };
    let early_termination = match file.early_termination {
        Some(e) => early_termination_v2(e)?,
        None => None,
    };
    let l = file.limits.unwrap_or_default();
    let max_total = l.max_total_trials.unwrap_or(DEFAULT_MAX_TOTAL_TRIALS);
    let limits = SweepLimits {
        max_total_trials: max_total,
        max_concurrent_trials: l.max_concurrent_trials.unwrap_or(max_total),
        timeout_s: l.timeout.unwrap_or(DEFAULT_SWEEP_TIMEOUT_S),
        trial_timeout_s: l.trial_timeout,
    };
    let experiment = file
        .experiment_name
        .clone()
        .unwrap_or_else(|| default_experiment.to_string());

    let trial_value = file
        .trial
        .ok_or_else(|| missing("trial", "give the command job each trial runs"))?;
    if !matches!(trial_value, yaml_serde::Value::Mapping(_)) {
        return Err(SpecError::field(
            "trial",
            "give the trial as an inline command job (command, code, environment, ...); component references are not supported",
        ));
    }
    let mut job: JobFile = from_value("trial", trial_value)?;
    match job.kind.as_deref() {
        None | Some("command") => {}
        Some(other) => {
            return Err(SpecError::field(
                "trial.type",
                format!("a trial is a command job, not {other:?}"),
            ));
        }
    }
    if job.compute.is_none() {
        job.compute = file.compute;
    }
    if let Some(inputs) = file.inputs {
        job.inputs.get_or_insert_with(BTreeMap::new).extend(inputs);
    }
    if let Some(outputs) = file.outputs {
        job.outputs
            .get_or_insert_with(BTreeMap::new)
            .extend(outputs);
    }
    if job.experiment_name.is_none() {
        job.experiment_name = Some(experiment.clone());
    }
    if job.tags.is_none() {
        job.tags = file.tags;
    }
    let trial = trial_template(job, &search_space, &experiment)?;
    let mut spec = SweepSpec {
        trial,
        search_space,
        sampling,
        objective,
        early_termination,
        limits,
        display_name: file.display_name.or(file.name),
        experiment,
        description: file.description,
    };
    if let Some(t) = spec.limits.trial_timeout_s {
        spec.trial.timeout_s = Some(t);
    }
    spec.validate()?;
    Ok(spec)
}

/// Validates the trial job and returns its spec with inputs and outputs substituted and
/// `${{search_space.x}}` references kept.
fn trial_template(
    job: JobFile,
    space: &BTreeMap<String, Distribution>,
    experiment: &str,
) -> Result<RunSpec, SpecError> {
    let command = job
        .command
        .clone()
        .ok_or_else(|| missing("trial.command", "give the command each trial runs"))?;
    for name in search_space_refs(&command) {
        if !space.contains_key(&name) {
            return Err(SpecError::field(
                "trial.command",
                format!(
                    "`${{{{search_space.{name}}}}}` names a parameter the search_space does not define: add it under search_space or fix the name"
                ),
            ));
        }
    }
    let keep = |scope: &str, name: &str| Some(format!("${{{{{scope}.{name}}}}}"));
    // First validate everything else with a placeholder for each parameter.
    let probe = substitute("trial.command", &command, |scope, name| match scope {
        "search_space" => Some("0".to_string()),
        _ => keep(scope, name),
    })?;
    let outputs: Vec<String> = job
        .outputs
        .clone()
        .unwrap_or_default()
        .into_keys()
        .collect();
    let mut probe_job = job;
    probe_job.command = Some(probe);
    let base = probe_job
        .into_run_spec(experiment)
        .map_err(|e| prefix_error("trial", e))?;
    // Then resolve inputs and outputs in the real command, keeping the parameters.
    let template = substitute("trial.command", &command, |scope, name| match scope {
        "search_space" => keep(scope, name),
        "inputs" => base.inputs.get(name).cloned(),
        "outputs" => outputs
            .iter()
            .any(|o| o == name)
            .then(|| format!("outputs/{name}")),
        _ => None,
    })?;
    Ok(RunSpec {
        command: template,
        ..base
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HdParameter {
    name: String,
    expression: String,
    values: Vec<ParamValue>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HdSampling {
    #[serde(rename = "type")]
    kind: String,
    parameter_space: Vec<HdParameter>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HdPolicy {
    #[serde(rename = "type")]
    kind: String,
    evaluation_interval: Option<u32>,
    delay_evaluation: Option<u32>,
    slack_factor: Option<f64>,
    slack_amount: Option<f64>,
    truncation_percentage: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HdConfigFile {
    sampling: HdSampling,
    policy: Option<HdPolicy>,
    primary_metric_name: String,
    primary_metric_goal: String,
    max_total_runs: Option<u32>,
    max_concurrent_runs: Option<u32>,
    max_duration_minutes: Option<u64>,
}

/// The v1 SDK's default `max_duration_minutes` (7 days).
pub const DEFAULT_HYPERDRIVE_MINUTES: u64 = 10_080;

fn distribution_v1(path: &str, p: &HdParameter) -> Result<Distribution, SpecError> {
    let vpath = format!("{path}.values");
    let nums = |n: usize, names: &str| -> Result<Vec<f64>, SpecError> {
        let v: Option<Vec<f64>> = p.values.iter().map(ParamValue::as_f64).collect();
        match v {
            Some(v) if v.len() == n => Ok(v),
            _ => Err(SpecError::field(
                &vpath,
                format!("{} takes {n} numbers: [{names}]", p.expression),
            )),
        }
    };
    let dist = match p.expression.to_ascii_lowercase().as_str() {
        "choice" => Distribution::Choice {
            values: p.values.clone(),
        },
        "randint" => match p.values.as_slice() {
            [ParamValue::Int(upper)] => Distribution::Randint { upper: *upper },
            _ => {
                return Err(SpecError::field(
                    &vpath,
                    "randint takes one integer: [upper]",
                ));
            }
        },
        "uniform" => {
            let v = nums(2, "min, max")?;
            Distribution::Uniform {
                min: v[0],
                max: v[1],
            }
        }
        "loguniform" => {
            let v = nums(2, "min, max")?;
            Distribution::Loguniform {
                min: v[0],
                max: v[1],
            }
        }
        "quniform" => {
            let v = nums(3, "min, max, q")?;
            Distribution::Quniform {
                min: v[0],
                max: v[1],
                q: v[2],
            }
        }
        "qloguniform" => {
            let v = nums(3, "min, max, q")?;
            Distribution::Qloguniform {
                min: v[0],
                max: v[1],
                q: v[2],
            }
        }
        "normal" => {
            let v = nums(2, "mu, sigma")?;
            Distribution::Normal {
                mu: v[0],
                sigma: v[1],
            }
        }
        "lognormal" => {
            let v = nums(2, "mu, sigma")?;
            Distribution::Lognormal {
                mu: v[0],
                sigma: v[1],
            }
        }
        "qnormal" => {
            let v = nums(3, "mu, sigma, q")?;
            Distribution::Qnormal {
                mu: v[0],
                sigma: v[1],
                q: v[2],
            }
        }
        "qlognormal" => {
            let v = nums(3, "mu, sigma, q")?;
            Distribution::Qlognormal {
                mu: v[0],
                sigma: v[1],
                q: v[2],
            }
        }
        other => {
            return Err(SpecError::field(
                format!("{path}.expression"),
                format!(
                    "unknown expression {other:?}: use choice, randint, uniform, quniform, loguniform, qloguniform, normal, qnormal, lognormal or qlognormal"
                ),
            ));
        }
    };
    dist.validate().map_err(|m| SpecError::field(vpath, m))?;
    Ok(dist)
}

/// Parses an Azure ML v1 HyperDrive config (`hdconfig.yml`) into a validated [`SweepSpec`].
///
/// The v1 config has no command: `trial` is the run each trial starts (built by the CLI
/// from the rest of the command line), and each parameter is appended to its command as
/// command-line arguments `NAME VALUE`, as Azure ML does (`--penalty 0.5`; a name without a
/// leading `-` gets `--`).
pub fn parse_hyperdrive_config(text: &str, trial: RunSpec) -> Result<SweepSpec, SpecError> {
    let file: HdConfigFile = parse_yaml(text)?;
    let sampling = match file.sampling.kind.to_ascii_lowercase().as_str() {
        "random" => Sampling::Random { seed: None },
        "grid" => Sampling::Grid,
        "bayesian" => Sampling::Bayesian,
        other => {
            return Err(SpecError::field(
                "sampling.type",
                format!("unknown sampling {other:?}: use random, grid or bayesian"),
            ));
        }
    };
    let mut search_space = BTreeMap::new();
    let mut command = trial.command.clone();
    for (i, p) in file.sampling.parameter_space.iter().enumerate() {
        let path = format!("sampling.parameter_space[{i}]");
        if p.name.trim().is_empty() || p.name.contains(char::is_whitespace) || p.name.contains('}')
        {
            return Err(SpecError::field(
                format!("{path}.name"),
                "a parameter name is a script argument such as --learning_rate, without spaces",
            ));
        }
        if search_space.contains_key(&p.name) {
            return Err(SpecError::field(
                format!("{path}.name"),
                format!("{} is given twice", p.name),
            ));
        }
        search_space.insert(p.name.clone(), distribution_v1(&path, p)?);
        let flag = if p.name.starts_with('-') {
            p.name.clone()
        } else {
            format!("--{}", p.name)
        };
        command.push_str(&format!(" {flag} ${{{{search_space.{}}}}}", p.name));
    }
    let early_termination = match file.policy {
        None => None,
        Some(p) => {
            let kind = match p.kind.to_ascii_lowercase().as_str() {
                "banditpolicy" => Some(PolicyKind::Bandit {
                    slack: match (p.slack_factor, p.slack_amount) {
                        (Some(f), None) => Slack::Factor(f),
                        (None, Some(a)) => Slack::Amount(a),
                        _ => {
                            return Err(SpecError::field(
                                "policy.slack_factor",
                                "a BanditPolicy needs exactly one of slack_factor or slack_amount",
                            ));
                        }
                    },
                }),
                "medianstoppingpolicy" => Some(PolicyKind::MedianStopping),
                "truncationselectionpolicy" => Some(PolicyKind::TruncationSelection {
                    truncation_percentage: p.truncation_percentage.ok_or_else(|| {
                        missing(
                            "policy.truncation_percentage",
                            "a TruncationSelectionPolicy needs truncation_percentage (1-99)",
                        )
                    })?,
                    exclude_finished: false,
                }),
                "noterminationpolicy" => None,
                other => {
                    return Err(SpecError::field(
                        "policy.type",
                        format!(
                            "unknown policy {other:?}: use BanditPolicy, MedianStoppingPolicy, TruncationSelectionPolicy or NoTerminationPolicy"
                        ),
                    ));
                }
            };
            match kind {
                None => None,
                Some(kind) => {
                    let policy = EarlyTermination {
                        kind,
                        evaluation_interval: p.evaluation_interval.unwrap_or(1),
                        delay_evaluation: p.delay_evaluation.unwrap_or(0),
                    };
                    policy.validate().map_err(|mut e| {
                        e.path = e.path.replacen("early_termination", "policy", 1);
                        e
                    })?;
                    Some(policy)
                }
            }
        }
    };
    let max_total = file.max_total_runs.ok_or_else(|| {
        missing(
            "max_total_runs",
            "give the number of runs the sweep may start",
        )
    })?;
    let limits = SweepLimits {
        max_total_trials: max_total,
        max_concurrent_trials: file.max_concurrent_runs.unwrap_or(max_total),
        timeout_s: file
            .max_duration_minutes
            .unwrap_or(DEFAULT_HYPERDRIVE_MINUTES)
            .saturating_mul(60),
        trial_timeout_s: None,
    };
    let experiment = trial.experiment.clone();
    let spec = SweepSpec {
        display_name: trial.display_name.clone(),
        description: trial.description.clone(),
        trial: RunSpec { command, ..trial },
        search_space,
        sampling,
        objective: Objective {
            primary_metric: file.primary_metric_name,
            goal: parse_goal("primary_metric_goal", Some(&file.primary_metric_goal))?,
        },
        early_termination,
        limits,
        experiment,
    };
    spec.validate().map_err(|mut e| {
        for (v2, v1) in [
            ("limits.max_total_trials", "max_total_runs"),
            ("limits.max_concurrent_trials", "max_concurrent_runs"),
            ("limits.timeout", "max_duration_minutes"),
            ("objective.primary_metric", "primary_metric_name"),
        ] {
            if e.path == v2 {
                e.path = v1.to_string();
            }
        }
        e
    })?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::Params;

    const V2: &str = include_str!("../../../../../shared/formats/v2_sweep_job.yml");
    const V1: &str = include_str!("../../../../../shared/formats/v1_hdconfig.yml");

    #[test]
    fn parses_the_azure_ml_sweep_example() {
        let spec = parse_sweep_yaml(V2, "fallback").unwrap();
        assert_eq!(spec.experiment, "hello-sweep-example");
        assert_eq!(spec.display_name.as_deref(), Some("hello-sweep-example"));
        assert_eq!(spec.sampling, Sampling::Random { seed: None });
        assert_eq!(
            spec.search_space["B"],
            Distribution::Choice {
                values: vec![
                    ParamValue::Text("hello".into()),
                    ParamValue::Text("world".into()),
                    ParamValue::Text("hello_world".into())
                ]
            }
        );
        assert_eq!(
            spec.search_space["C"],
            Distribution::Uniform { min: 0.1, max: 1.0 }
        );
        assert_eq!(
            spec.objective,
            Objective {
                primary_metric: "random_metric".into(),
                goal: Goal::Minimize
            }
        );
        assert_eq!(
            spec.limits,
            SweepLimits {
                max_total_trials: 4,
                max_concurrent_trials: 2,
                timeout_s: 3600,
                trial_timeout_s: None
            }
        );
        assert_eq!(
            spec.trial.command,
            "python hello-sweep.py --A 0.5 --B ${{search_space.B}} --C ${{search_space.C}}"
        );
        assert_eq!(
            spec.trial.environment.name.as_deref(),
            Some("AzureML-sklearn-1.5@latest")
        );
        let params: Params = [
            ("B".to_string(), ParamValue::Text("world".into())),
            ("C".to_string(), ParamValue::Float(0.25)),
        ]
        .into();
        let run = spec.trial_run(&params).unwrap();
        assert_eq!(
            run.command,
            "python hello-sweep.py --A 0.5 --B world --C 0.25"
        );
        assert_eq!(run.experiment, "hello-sweep-example");
    }

    #[test]
    fn parses_the_hyperdrive_config() {
        let trial = RunSpec::new("python train.py");
        let spec = parse_hyperdrive_config(V1, trial).unwrap();
        assert_eq!(
            spec.search_space["--penalty"],
            Distribution::Choice {
                values: vec![
                    ParamValue::Float(0.5),
                    ParamValue::Int(1),
                    ParamValue::Float(1.5)
                ]
            }
        );
        assert_eq!(
            spec.early_termination,
            Some(EarlyTermination {
                kind: PolicyKind::Bandit {
                    slack: Slack::Factor(0.2)
                },
                evaluation_interval: 1,
                delay_evaluation: 0
            })
        );
        assert_eq!(spec.objective.goal, Goal::Maximize);
        assert_eq!(spec.objective.primary_metric, "Accuracy");
        assert_eq!(spec.limits.max_total_trials, 8);
        assert_eq!(spec.limits.max_concurrent_trials, 2);
        assert_eq!(spec.limits.timeout_s, 6000);
        let params: Params = [("--penalty".to_string(), ParamValue::Float(1.5))].into();
        assert_eq!(
            spec.trial_run(&params).unwrap().command,
            "python train.py --penalty 1.5"
        );
    }

    fn with(extra: &str) -> String {
        format!(
            "type: sweep\ntrial:\n  command: python t.py --x ${{{{search_space.x}}}}\nsampling_algorithm: random\nsearch_space:\n  x:\n    type: uniform\n    min_value: 0\n    max_value: 1\nobjective:\n  primary_metric: loss\n  goal: minimize\n{extra}"
        )
    }

    #[test]
    fn bad_sweep_files_name_the_field() {
        assert!(parse_sweep_yaml(&with(""), "e").is_ok());
        for (text, path) in [
            (with("foo: 1\n"), "foo"),
            (with("limits:\n  max_trials: 3\n"), "limits.max_trials"),
            (
                with("early_termination:\n  type: bandit\n  slack: 0.1\n"),
                "early_termination.slack",
            ),
            (
                with("early_termination:\n  type: bandit\n"),
                "early_termination.slack_factor",
            ),
            (
                with("early_termination:\n  type: median_stopping\n  slack_factor: 0.1\n"),
                "early_termination.slack_factor",
            ),
            (
                with("early_termination:\n  type: truncation_selection\n  truncation_percentage: 100\n"),
                "early_termination.truncation_percentage",
            ),
            (
                with("early_termination:\n  type: bandit\n  slack_factor: 0.1\n  evaluation_interval: 0\n"),
                "early_termination.evaluation_interval",
            ),
            (with("limits:\n  max_total_trials: 0\n"), "limits.max_total_trials"),
            (
                with("").replace(
                    "type: uniform\n    min_value: 0\n    max_value: 1",
                    "type: choice\n    values: [1, .nan]",
                ),
                "search_space.x",
            ),
            (
                with("").replace("primary_metric: loss", "primary_metric: val loss"),
                "objective.primary_metric",
            ),
            (
                "type: sweep\ntrial:\n  command: t ${{search_space.y}}\nsampling_algorithm: random\nsearch_space:\n  x:\n    type: choice\n    values: [1]\nobjective:\n  primary_metric: loss\n  goal: minimize\n".into(),
                "trial.command",
            ),
            (
                "type: sweep\ntrial:\n  command: t\n  comand: x\nsampling_algorithm: random\nsearch_space:\n  x:\n    type: choice\n    values: [1]\nobjective:\n  primary_metric: loss\n  goal: minimize\n".into(),
                "trial.comand",
            ),
            (
                "type: sweep\ntrial:\n  command: t\nsampling_algorithm: grid\nsearch_space:\n  x:\n    type: uniform\n    min_value: 0\n    max_value: 1\nobjective:\n  primary_metric: loss\n  goal: minimize\n".into(),
                "search_space.x",
            ),
            (
                "type: sweep\ntrial:\n  command: t\nsampling_algorithm: random\nsearch_space:\n  x:\n    type: uniform\n    min_value: 1\n    max_value: 0\nobjective:\n  primary_metric: loss\n  goal: minimize\n".into(),
                "search_space.x",
            ),
            (
                "type: sweep\ntrial:\n  command: t\nsampling_algorithm: random\nsearch_space:\n  x:\n    type: normal\n    mu: 0\n    sigma: 1\n    q: 1\nobjective:\n  primary_metric: loss\n  goal: minimize\n".into(),
                "search_space.x.q",
            ),
            (
                "type: sweep\ntrial:\n  command: t\nsampling_algorithm:\n  type: grid\n  seed: 3\nsearch_space:\n  x:\n    type: choice\n    values: [1]\nobjective:\n  primary_metric: loss\n  goal: up\n".into(),
                "sampling_algorithm.seed",
            ),
            (
                "type: sweep\ntrial:\n  command: t\nsampling_algorithm: random\nsearch_space:\n  x:\n    type: choice\n    values: [1]\nobjective:\n  primary_metric: loss\n  goal: up\n".into(),
                "objective.goal",
            ),
            (
                "type: sweep\ntrial:\n  command: t\n  compute: bad_name\nsampling_algorithm: random\nsearch_space:\n  x:\n    type: choice\n    values: [1]\nobjective:\n  primary_metric: loss\n  goal: minimize\n".into(),
                "trial.compute",
            ),
        ] {
            let e = parse_sweep_yaml(&text, "e").unwrap_err();
            assert_eq!(e.path, path, "{e}\n{text}");
        }
    }

    #[test]
    fn the_long_sampling_form_takes_a_seed() {
        let text = with("").replace(
            "sampling_algorithm: random",
            "sampling_algorithm:\n  type: random\n  seed: 42\n  rule: random\n  logbase: e",
        );
        let spec = parse_sweep_yaml(&text, "e").unwrap();
        assert_eq!(spec.sampling, Sampling::Random { seed: Some(42) });
        assert_eq!(spec.seed_or(7), 42);
    }

    #[test]
    fn sobol_and_other_log_bases_are_refused_by_name() {
        for (long, path) in [
            ("  type: random\n  rule: sobol", "sampling_algorithm.rule"),
            (
                "  type: random\n  logbase: 10",
                "sampling_algorithm.logbase",
            ),
            (
                "  type: bayesian\n  logbase: e",
                "sampling_algorithm.logbase",
            ),
        ] {
            let text = with("").replace(
                "sampling_algorithm: random",
                &format!("sampling_algorithm:\n{long}"),
            );
            let e = parse_sweep_yaml(&text, "e").unwrap_err();
            assert_eq!(e.path, path, "{e}");
        }
    }

    #[test]
    fn bad_hyperdrive_configs_name_the_field() {
        for (text, path) in [
            (
                V1.replace("max_total_runs: 8", "max_total_runz: 8"),
                "max_total_runz",
            ),
            (
                V1.replace("expression: choice", "expression: pick"),
                "sampling.parameter_space[0].expression",
            ),
            (
                V1.replace("type: BanditPolicy", "type: Nope"),
                "policy.type",
            ),
            (
                V1.replace("slack_factor: 0.2", "slack_factor: -1"),
                "policy.slack_factor",
            ),
            (
                V1.replace("max_total_runs: 8", "max_total_runs: 0"),
                "max_total_runs",
            ),
        ] {
            let e = parse_hyperdrive_config(&text, RunSpec::new("python t.py")).unwrap_err();
            assert_eq!(e.path, path, "{e}");
        }
    }
}
