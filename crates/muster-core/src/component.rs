//! Azure ML command components in pipeline steps: a step that says `component:` gets the
//! component's command, code, environment, distribution and resources, its declared
//! inputs (the step's values and bindings, else the component's defaults) and outputs,
//! with the step's own settings (compute, environment variables, resources, limits)
//! on top. The result is an inline command step, so the rest of the pipeline parser
//! treats both alike.
//!
//! The component is given inline (`component: {type: command, ...}`); `muster pipeline
//! submit` reads a component file (`component: ./train.yml`) and inlines it, with its
//! `code` relative to the pipeline file, and inlines a registered component
//! (`azureml:NAME:VERSION`, `@latest`) from the server, with its registered code. Other
//! component types (parallel, spark, automl, pipeline) are errors naming the step. Optional inputs follow Azure ML: `$[[--flag ${{inputs.x}}]]` in the command is
//! kept only when `x` is given.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use yaml_serde::{Mapping, Value};

use crate::spec::{OutputFile, Scalar, SpecError};
use crate::sweep::file::from_value;

/// A command component as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentFile {
    #[serde(rename = "$schema")]
    _schema: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(rename = "name")]
    _name: Option<String>,
    #[serde(rename = "version")]
    _version: Option<Scalar>,
    display_name: Option<String>,
    description: Option<String>,
    #[serde(rename = "tags")]
    _tags: Option<BTreeMap<String, Scalar>>,
    #[serde(rename = "is_deterministic")]
    _is_deterministic: Option<bool>,
    inputs: Option<BTreeMap<String, ComponentInput>>,
    outputs: Option<BTreeMap<String, Option<OutputFile>>>,
    code: Option<String>,
    environment: Option<Value>,
    command: Option<String>,
    distribution: Option<Value>,
    resources: Option<Value>,
    environment_variables: Option<Value>,
    additional_includes: Option<Value>,
}

/// A component input: a literal of a type, or data, with an optional default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentInput {
    #[serde(rename = "type")]
    kind: Option<String>,
    default: Option<Value>,
    optional: Option<bool>,
    description: Option<String>,
    min: Option<Scalar>,
    max: Option<Scalar>,
    #[serde(rename = "enum")]
    choices: Option<Vec<Scalar>>,
    mode: Option<String>,
}

fn key(k: &str) -> Value {
    Value::String(k.to_string())
}

/// A mapping value of `step` (absent or null: empty); `path` names it in errors.
fn take_mapping(step: &mut Mapping, k: &str, path: &str) -> Result<Mapping, SpecError> {
    match step.remove(k) {
        None | Some(Value::Null) => Ok(Mapping::new()),
        Some(Value::Mapping(m)) => Ok(m),
        Some(_) => Err(SpecError::field(
            format!("{path}.{k}"),
            "must be a mapping of names to values",
        )),
    }
}

/// Checks a component definition on its own (`muster component create`): as a step that
/// gives each required input a stand-in value (the first of an `enum`), so a component
/// whose inputs a pipeline binds later registers as in Azure ML. Errors name
/// `component.…`.
pub fn check_definition(component: Value) -> Result<(), SpecError> {
    let mut inputs = Mapping::new();
    for (name, decl) in component
        .get("inputs")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
    {
        let given = |k: &str| decl.get(k).is_some_and(|v| !v.is_null());
        if given("default") || decl.get("optional").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let stand_in = decl
            .get("enum")
            .and_then(Value::as_sequence)
            .and_then(|s| s.first().cloned())
            .unwrap_or_else(|| Value::String("stand-in".into()));
        inputs.insert(name.clone(), stand_in);
    }
    let mut step = Mapping::new();
    step.insert(key("component"), component);
    step.insert(key("inputs"), Value::Mapping(inputs));
    // The step's path is the component's own here: `component.command`, not
    // `component.component.command`.
    inline_component("component", step)
        .map(|_| ())
        .map_err(|mut e| {
            if let Some(rest) = e.path.strip_prefix("component.") {
                e.path = rest.to_string();
            }
            e
        })
}

/// Turns a step with `component:` into an inline command step (`step` unchanged without
/// one). `path` is the step's (`jobs.train`).
pub(crate) fn inline_component(path: &str, mut step: Mapping) -> Result<Mapping, SpecError> {
    let Some(component) = step.remove("component") else {
        return Ok(step);
    };
    let cpath = format!("{path}.component");
    let comp: ComponentFile = match component {
        Value::Mapping(m) => from_value(&cpath, Value::Mapping(m))?,
        Value::String(s) if s.starts_with("azureml:") => {
            return Err(SpecError::field(
                cpath,
                format!(
                    "{s}: `muster pipeline submit` resolves registered components (muster component list); the server takes the component inline"
                ),
            ));
        }
        Value::String(s) => {
            return Err(SpecError::field(
                cpath,
                format!(
                    "{s}: a component file is read by `muster pipeline submit`, which sends it inline; give the component inline here"
                ),
            ));
        }
        _ => {
            return Err(SpecError::field(
                cpath,
                "give a component file (./train.yml) or the component inline",
            ));
        }
    };
    match comp.kind.as_deref() {
        None | Some("command") => {}
        Some(other) => {
            return Err(SpecError::field(
                format!("{cpath}.type"),
                format!("{other} components are not supported: muster runs command components"),
            ));
        }
    }
    if comp
        .additional_includes
        .as_ref()
        .is_some_and(|v| !v.is_null())
    {
        return Err(SpecError::field(
            format!("{cpath}.additional_includes"),
            "not supported yet: put the files in the component's code folder",
        ));
    }
    let command = comp.command.clone().ok_or_else(|| {
        SpecError::field(
            format!("{cpath}.command"),
            "missing: a command component has a command",
        )
    })?;

    // Inputs: each declared one from the step, else its default; optional ones may stay out.
    let declared = comp.inputs.clone().unwrap_or_default();
    let given_by_step = take_mapping(&mut step, "inputs", path)?;
    for k in given_by_step.keys() {
        let name = k.as_str().unwrap_or_default();
        if !declared.contains_key(name) {
            return Err(SpecError::field(
                format!("{path}.inputs.{name}"),
                format!(
                    "the component has no input {name:?}; its inputs are {}",
                    names(declared.keys())
                ),
            ));
        }
    }
    let mut inputs = Mapping::new();
    let mut given = BTreeSet::new();
    for (name, decl) in &declared {
        let _ = (&decl.description, &decl.min, &decl.max, &decl.mode);
        let value = match given_by_step.get(name.as_str()) {
            Some(v) if !v.is_null() => Some(v.clone()),
            _ => decl.default.clone(),
        };
        match value {
            Some(v) => {
                if let (Some(choices), Some(text)) = (&decl.choices, scalar_text(&v))
                    && !choices.iter().any(|c| c.to_string() == text)
                {
                    return Err(SpecError::field(
                        format!("{path}.inputs.{name}"),
                        format!(
                            "{text:?} is not one of the component's values: {}",
                            names(choices.iter().map(|c| c.to_string()))
                        ),
                    ));
                }
                inputs.insert(key(name), v);
                given.insert(name.clone());
            }
            None if decl.optional == Some(true) => {}
            None => {
                return Err(SpecError::field(
                    format!("{path}.inputs.{name}"),
                    format!(
                        "the component requires this {} input: give it a value or a binding",
                        decl.kind.as_deref().unwrap_or("string")
                    ),
                ));
            }
        }
    }
    let command = optional_segments(&format!("{cpath}.command"), &command, &given)?;

    // Outputs: the component's, each as the step binds or overrides it.
    let declared_outputs = comp.outputs.clone().unwrap_or_default();
    let step_outputs = take_mapping(&mut step, "outputs", path)?;
    for k in step_outputs.keys() {
        let name = k.as_str().unwrap_or_default();
        if !declared_outputs.contains_key(name) {
            return Err(SpecError::field(
                format!("{path}.outputs.{name}"),
                format!(
                    "the component has no output {name:?}; its outputs are {}",
                    names(declared_outputs.keys())
                ),
            ));
        }
    }
    let mut outputs = Mapping::new();
    for (name, decl) in &declared_outputs {
        let value = match step_outputs.get(name.as_str()) {
            Some(v) if !v.is_null() => v.clone(),
            _ => match decl {
                Some(o) => output_value(o),
                None => Value::Null,
            },
        };
        outputs.insert(key(name), value);
    }

    // The job: the component's body, the step's settings on top.
    let mut job = Mapping::new();
    job.insert(key("command"), Value::String(command));
    for (k, v) in [
        ("code", comp.code.map(Value::String)),
        ("environment", comp.environment),
        ("distribution", comp.distribution),
        ("resources", comp.resources),
        ("environment_variables", comp.environment_variables),
        ("display_name", comp.display_name.map(Value::String)),
        ("description", comp.description.map(Value::String)),
    ] {
        if let Some(v) = v {
            job.insert(key(k), v);
        }
    }
    for (k, v) in step {
        let merged = match (k.as_str(), job.get(&k), &v) {
            // Variables merge, the step's winning.
            (Some("environment_variables"), Some(Value::Mapping(base)), Value::Mapping(over)) => {
                let mut m = base.clone();
                for (vk, vv) in over {
                    m.insert(vk.clone(), vv.clone());
                }
                Value::Mapping(m)
            }
            _ => v,
        };
        job.insert(k, merged);
    }
    job.insert(key("inputs"), Value::Mapping(inputs));
    job.insert(key("outputs"), Value::Mapping(outputs));
    Ok(job)
}

fn names<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let all: Vec<String> = items.into_iter().map(|s| s.as_ref().to_string()).collect();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(", ")
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.contains("${{") => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn output_value(o: &OutputFile) -> Value {
    let mut m = Mapping::new();
    if let Some(k) = &o.kind {
        m.insert(key("type"), Value::String(k.clone()));
    }
    if let Some(mode) = &o.mode {
        m.insert(key("mode"), Value::String(mode.clone()));
    }
    if m.is_empty() {
        Value::Null
    } else {
        Value::Mapping(m)
    }
}

/// Azure ML's optional parts of a command: `$[[ ... ]]` is kept (without the brackets)
/// when every `${{inputs.X}}` inside it names a given input, and dropped otherwise.
fn optional_segments(
    field: &str,
    command: &str,
    given: &BTreeSet<String>,
) -> Result<String, SpecError> {
    let mut out = String::with_capacity(command.len());
    let mut rest = command;
    while let Some(start) = rest.find("$[[") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let end = after
            .find("]]")
            .ok_or_else(|| SpecError::field(field, "a `$[[` optional part has no closing `]]`"))?;
        let inner = &after[..end];
        let keep = inner
            .match_indices("${{")
            .filter_map(|(i, _)| {
                let r = &inner[i + 3..];
                r.find("}}").map(|e| r[..e].trim().to_string())
            })
            .all(|expr| {
                expr.strip_prefix("inputs.")
                    .is_none_or(|name| given.contains(name))
            });
        if keep {
            out.push_str(inner);
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(text: &str) -> Mapping {
        yaml_serde::from_str(text).unwrap()
    }

    const TRAIN: &str = "type: command
component:
  name: train_model
  version: 1
  type: command
  display_name: Train
  inputs:
    data: {type: uri_folder}
    epochs: {type: integer, default: 10}
    lr: {type: number, optional: true}
    mode: {type: string, default: fast, enum: [fast, slow]}
  outputs:
    model: {type: uri_folder}
  code: ./src
  environment: {image: python:3.12}
  environment_variables: {A: '1', B: '2'}
  command: python train.py --data ${{inputs.data}} --epochs ${{inputs.epochs}} $[[--lr ${{inputs.lr}}]] --mode ${{inputs.mode}} --out ${{outputs.model}}
inputs:
  data: ${{parent.jobs.prep.outputs.clean}}
outputs:
  model: ${{parent.outputs.trained}}
environment_variables: {B: '3'}
compute: gpus
";

    #[test]
    fn a_component_step_becomes_an_inline_command_step() {
        let job = inline_component("jobs.train", step(TRAIN)).unwrap();
        let get = |k: &str| job.get(k).cloned().unwrap();
        assert_eq!(
            get("command").as_str().unwrap(),
            "python train.py --data ${{inputs.data}} --epochs ${{inputs.epochs}}  --mode ${{inputs.mode}} --out ${{outputs.model}}"
        );
        assert_eq!(get("code").as_str(), Some("./src"));
        assert_eq!(get("compute").as_str(), Some("gpus"));
        assert_eq!(get("display_name").as_str(), Some("Train"));
        let vars = get("environment_variables");
        assert_eq!(vars.get("A").and_then(Value::as_str), Some("1"));
        assert_eq!(
            vars.get("B").and_then(Value::as_str),
            Some("3"),
            "the step wins"
        );
        let inputs = get("inputs");
        assert_eq!(
            inputs.get("data").and_then(Value::as_str),
            Some("${{parent.jobs.prep.outputs.clean}}")
        );
        assert_eq!(inputs.get("epochs").and_then(Value::as_u64), Some(10));
        assert!(inputs.get("lr").is_none(), "optional and not given");
        assert_eq!(
            get("outputs").get("model").and_then(Value::as_str),
            Some("${{parent.outputs.trained}}")
        );
    }

    #[test]
    fn an_optional_input_given_keeps_its_part() {
        let text = TRAIN.replace(
            "inputs:\n  data: ${{parent",
            "inputs:\n  lr: 0.1\n  data: ${{parent",
        );
        let job = inline_component("jobs.train", step(&text)).unwrap();
        assert!(
            job.get("command")
                .and_then(Value::as_str)
                .unwrap()
                .contains(" --lr ${{inputs.lr}} "),
            "{job:?}"
        );
    }

    #[test]
    fn what_a_component_cannot_take_is_an_error_naming_the_step() {
        for (text, path) in [
            (
                TRAIN.replace("  data: ${{parent.jobs.prep.outputs.clean}}\n", ""),
                "jobs.train.inputs.data",
            ),
            (
                TRAIN.replace(
                    "inputs:\n  data: ${{parent",
                    "inputs:\n  nope: 1\n  data: ${{parent",
                ),
                "jobs.train.inputs.nope",
            ),
            (
                TRAIN.replace(
                    "mode: {type: string, default: fast",
                    "mode: {type: string, default: medium",
                ),
                "jobs.train.inputs.mode",
            ),
            (
                TRAIN.replace(
                    "  type: command\n  display_name",
                    "  type: parallel\n  display_name",
                ),
                "jobs.train.component.type",
            ),
            (
                TRAIN.replace(
                    "component:\n  name: train_model",
                    "component: azureml:train_model:1\nx:\n  name: train_model",
                ),
                "jobs.train.component",
            ),
        ] {
            let e = match inline_component("jobs.train", step(&text)) {
                Err(e) => e,
                Ok(j) => panic!("{path}: accepted {j:?}"),
            };
            assert!(e.path.starts_with(path), "{path}: {e}");
        }
        let e = inline_component(
            "jobs.train",
            step(&TRAIN.replace(
                "outputs:\n  model: ${{parent",
                "outputs:\n  weights: ${{parent",
            )),
        )
        .unwrap_err();
        assert_eq!(e.path, "jobs.train.outputs.weights", "{e}");
        assert!(e.message.contains("its outputs are model"), "{e}");
    }

    #[test]
    fn a_component_registers_with_required_inputs_left_for_its_steps() {
        let parse = |text: &str| yaml_serde::from_str::<Value>(text).unwrap();
        check_definition(parse(
            "type: command\ninputs:\n  data: {type: uri_folder}\n  kind: {type: string, enum: [a, b]}\n  n: {type: integer, default: 2}\ncommand: echo ${{inputs.data}} ${{inputs.kind}} ${{inputs.n}}\n",
        ))
        .unwrap();
        let e = check_definition(parse(
            "type: command\ninputs:\n  data: {type: uri_folder}\n",
        ))
        .unwrap_err();
        assert_eq!(e.path, "component.command", "{e}");
        let e = check_definition(parse("type: spark\ncommand: x\n")).unwrap_err();
        assert!(e.message.contains("not supported"), "{e}");
    }
}
