//! `muster pipeline ...`: submit a `type: pipeline` job (each step's code and local data inputs snapshotted and
//! uploaded as `run submit` does), show its steps, list, cancel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use muster_core::pipeline::parse_pipeline_yaml;
use muster_proto::{Word, v1};
use serde_json::{Value, json};

use crate::cli::{OutputFormat, PipelineCommand, PipelineSubmitArgs};
use crate::commands::run::default_experiment;
use crate::connect;
use crate::output::{print_json, table, time};
use crate::paging;
use crate::snapshot::{self, SnapshotLimits};
use muster_client::status;

/// Runs a `muster pipeline` command; returns the process exit code.
pub async fn run(server: &str, output: OutputFormat, cmd: PipelineCommand) -> anyhow::Result<i32> {
    match cmd {
        PipelineCommand::Submit(args) => submit(server, output, args).await,
        PipelineCommand::Show { id } => {
            let mut c = connect(server).await?;
            let p = c
                .pipelines
                .get_pipeline(v1::GetPipelineRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            if output == OutputFormat::Json {
                print_json(&pipeline_json(&p));
            } else {
                print!("{}", pipeline_details(&p));
            }
            Ok(0)
        }
        PipelineCommand::List {
            experiment,
            state,
            since,
            page,
        } => {
            let state = state
                .map(|s| v1::PipelineState::from_word(&s).map(i32::from))
                .transpose()
                .map_err(|e| anyhow::anyhow!("state: {e}"))?;
            let client = connect(server).await?.pipelines;
            let request = v1::ListPipelinesRequest {
                workspace: crate::workspace().map(Into::into),
                experiment,
                state,
                since_ms: since,
                ..Default::default()
            };
            let fetched = paging::fetch(page.rows(), |page_size, page_token| {
                let mut client = client.clone();
                let request = v1::ListPipelinesRequest {
                    page_size,
                    page_token,
                    ..request.clone()
                };
                async move {
                    let answer = client.list_pipelines(request).await?.into_inner();
                    Ok::<_, tonic::Status>((answer.pipelines, answer.next_page_token))
                }
            })
            .await
            .map_err(status)?;
            let ps = fetched.rows;
            if output == OutputFormat::Json {
                print_json(&json!(ps.iter().map(pipeline_json).collect::<Vec<_>>()));
            } else if ps.is_empty() {
                println!("No pipelines. Submit one with `muster pipeline submit -f pipeline.yml`.");
            } else {
                let mut t = table(&["ID", "EXPERIMENT", "STATE", "STEPS", "CREATED", "NAME"]);
                for p in &ps {
                    let done = p
                        .steps
                        .iter()
                        .filter(|s| {
                            matches!(s.state(), v1::StepState::Completed | v1::StepState::Reused)
                        })
                        .count();
                    t.add_row(vec![
                        p.id.clone(),
                        p.experiment.clone(),
                        v1::PipelineState::word_of(p.state).into_owned(),
                        format!("{done}/{} done", p.steps.len()),
                        time(p.created_at_ms),
                        p.display_name.clone().unwrap_or_default(),
                    ]);
                }
                println!("{t}");
            }
            if fetched.more {
                let shown = format!("the newest {} pipelines", ps.len());
                eprintln!("{}", paging::more_hint(&shown, "pipeline", true));
            }
            Ok(0)
        }
        PipelineCommand::Cancel { id } => {
            let mut c = connect(server).await?;
            let p = c
                .pipelines
                .cancel_pipeline(v1::CancelPipelineRequest {
                    id: id.clone(),
                    reason: None,
                })
                .await
                .map_err(status)?
                .into_inner();
            if output == OutputFormat::Json {
                print_json(&pipeline_json(&p));
            } else {
                println!(
                    "Canceling pipeline {id}: its running steps are canceled, steps not started fail."
                );
            }
            Ok(0)
        }
    }
}

/// Each step's `code:` directory, relative to the YAML file (the parsed spec keeps the
/// snapshot, not the path).
fn code_dirs(text: &str, base: &Path) -> BTreeMap<String, PathBuf> {
    // The real parse (after this) reports a file over the limits.
    if muster_core::spec::check_yaml_limits(text).is_err() {
        return BTreeMap::new();
    }
    let Ok(doc) = yaml_serde::from_str::<yaml_serde::Value>(text) else {
        return BTreeMap::new();
    };
    let Some(jobs) = doc.get("jobs").and_then(|j| j.as_mapping()) else {
        return BTreeMap::new();
    };
    jobs.iter()
        .filter_map(|(name, job)| {
            let name = name.as_str()?;
            // A component step's code is the component's (inlined by `inline_components`).
            let code = job
                .get("code")
                .or_else(|| job.get("component").and_then(|c| c.get("code")))?
                .as_str()?;
            Some((name.to_string(), base.join(code)))
        })
        .collect()
}

/// The pipeline with each step's component file (`component: ./train.yml`) read and put
/// inline, its `code` made relative to the pipeline file, as the server takes it. The
/// text is returned as it is when no step names a file (so errors keep their lines).
async fn inline_components(
    server: &str,
    text: &str,
    base: &Path,
) -> anyhow::Result<(String, BTreeMap<String, String>)> {
    let mut registered_code = BTreeMap::new();
    if muster_core::spec::check_yaml_limits(text).is_err() {
        return Ok((text.to_string(), registered_code));
    }
    let Ok(mut doc) = yaml_serde::from_str::<yaml_serde::Value>(text) else {
        return Ok((text.to_string(), registered_code));
    };
    let Some(jobs) = doc.get_mut("jobs").and_then(|j| j.as_mapping_mut()) else {
        return Ok((text.to_string(), registered_code));
    };
    let mut changed = false;
    let mut clients = None;
    for (name, job) in jobs.iter_mut() {
        let name = name.as_str().unwrap_or_default().to_string();
        let Some(file) = job
            .get("component")
            .and_then(|c| c.as_str())
            .map(str::to_string)
        else {
            continue;
        };
        // A registered component: its YAML from the server, its code already stored.
        if let Some(reference) = file.strip_prefix("azureml:") {
            let (cname, version) = muster_core::data::parse_reference(reference)
                .map_err(|e| anyhow::anyhow!("jobs.{name}.component: {e}"))?;
            if clients.is_none() {
                clients = Some(crate::connect(server).await?);
            }
            let c = clients.as_mut().expect("connected above");
            let registered = c
                .components
                .get_component(v1::GetComponentRequest {
                    workspace: crate::workspace().unwrap_or_default().to_string(),
                    name: cname.to_string(),
                    version: version.map(str::to_string),
                })
                .await
                .map_err(status)
                .with_context(|| format!("jobs.{name}.component"))?
                .into_inner();
            job["component"] = yaml_serde::from_str(&registered.yaml)
                .with_context(|| format!("jobs.{name}.component: the registered YAML"))?;
            if let Some(code) = registered.code {
                registered_code.insert(name.clone(), code);
            }
            changed = true;
            continue;
        }
        let path = base.join(&file);
        let component_text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "jobs.{name}.component: cannot read the component file {}",
                path.display()
            )
        })?;
        muster_core::spec::check_yaml_limits(&component_text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut component: yaml_serde::Value = yaml_serde::from_str(&component_text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let dir = Path::new(&file).parent().unwrap_or(Path::new(""));
        if let Some(code) = component.get("code").and_then(|c| c.as_str()) {
            let relative = dir.join(code).to_string_lossy().into_owned();
            component["code"] = yaml_serde::Value::String(relative);
        }
        job["component"] = component;
        changed = true;
    }
    if !changed {
        return Ok((text.to_string(), registered_code));
    }
    Ok((yaml_serde::to_string(&doc)?, registered_code))
}

async fn submit(
    server: &str,
    output: OutputFormat,
    args: PipelineSubmitArgs,
) -> anyhow::Result<i32> {
    // Everything is checked before the network is touched: a bad file stores nothing.
    let path = &args.file;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let experiment = default_experiment(&base);
    // Data assets the pipeline names become what they stand for, as in `run submit`.
    let text = crate::commands::data::resolve_asset_paths(server, &text)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
    let (text, registered_code) = inline_components(server, &text, &base).await?;
    // Local data inputs travel with the submit, as in `run submit`.
    let (text, inputs) = crate::local_inputs::in_yaml(&text, &base)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
    let spec = parse_pipeline_yaml(&text, &experiment)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for w in &spec.warnings {
        eprintln!("warning: {}: {w}", path.display());
    }
    for (step, s) in &spec.steps {
        for w in &s.run.warnings {
            eprintln!("warning: jobs.{step}: {w}");
        }
    }
    let dirs = code_dirs(&text, &base);
    let limits = SnapshotLimits {
        max_bytes: args.max_snapshot_bytes,
        max_files: args.max_snapshot_files,
    };
    let mut snaps = Vec::new();
    for (step, dir) in &dirs {
        let snap = snapshot::build(dir, limits).with_context(|| format!("jobs.{step}.code"))?;
        snaps.push((step.clone(), dir.clone(), snap));
    }

    let all: Vec<&snapshot::Snapshot> = snaps
        .iter()
        .map(|(_, _, s)| s)
        .chain(inputs.iter().map(|i| &i.snapshot))
        .collect();
    let mut list = crate::server_list(server)?;
    let mut uploaded = crate::upload_failing_over(&mut list, &all)
        .await?
        .into_iter();
    let mut code = std::collections::HashMap::new();
    for ((step, dir, _), (r, stats)) in snaps.iter().zip(uploaded.by_ref()) {
        if output == OutputFormat::Table {
            let step_name = format!(" (step {step})");
            eprintln!("{}", snapshot::describe(dir, &step_name, &r, &stats));
        }
        code.insert(step.clone(), muster_proto::code_to_wire(r));
    }
    if output == OutputFormat::Table {
        crate::local_inputs::describe(&inputs, uploaded);
    }
    // Steps of registered components run in the code registered with them.
    for (step, manifest) in registered_code {
        code.entry(step).or_insert_with(|| {
            muster_proto::code_to_wire(muster_core::spec::CodeRef::stored(&manifest))
        });
    }
    // The same key on every retry: a retry after a timeout never makes a second pipeline.
    let key = args
        .idempotency_key
        .unwrap_or_else(|| format!("cli-{:032x}", rand::random::<u128>()));
    let req = v1::SubmitPipelineRequest {
        yaml: text,
        default_experiment: experiment,
        code,
        idempotency_key: Some(key),
        workspace: crate::workspace().unwrap_or_default().to_string(),
    };
    let p = crate::submit_failing_over(&mut list, &all, |mut c| {
        let req = req.clone();
        async move { c.pipelines.submit_pipeline(req).await }
    })
    .await?;
    if output == OutputFormat::Json {
        print_json(&pipeline_json(&p));
    } else {
        println!("{}", p.id);
        eprintln!(
            "Submitted pipeline {} ({} steps, experiment {}). Follow it: muster pipeline show {}",
            p.id,
            spec.steps.len(),
            p.experiment,
            p.id
        );
    }
    Ok(0)
}

/// A pipeline as JSON: id, state, experiment, times, and each step.
pub fn pipeline_json(p: &v1::Pipeline) -> Value {
    json!({
        "id": p.id,
        "display_name": p.display_name,
        "experiment": p.experiment,
        "state": v1::PipelineState::word_of(p.state),
        "created_at": time(p.created_at_ms),
        "finished_at": p.finished_at_ms.map(time),
        "cancel_reason": p.cancel_reason,
        "message": p.message,
        "outputs": p.outputs.iter().map(|o| json!({
            "name": o.name, "step": o.step, "output": o.output, "identity": o.identity,
        })).collect::<Vec<_>>(),
        "steps": p.steps.iter().map(|s| json!({
            "name": s.name,
            "state": v1::StepState::word_of(s.state),
            "run_id": s.run_id,
            "reused_from": s.reused_from,
            "compute": s.compute,
            "reason": s.reason,
            "depends_on": s.depends_on,
            "inputs": s.inputs,
            "outputs": s.outputs,
        })).collect::<Vec<_>>(),
    })
}

/// A pipeline for people: its summary, then a table of its steps.
pub fn pipeline_details(p: &v1::Pipeline) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        if !v.is_empty() {
            out.push_str(&format!("{k:<11} {v}\n"));
        }
    };
    line("id", p.id.clone());
    line("name", p.display_name.clone().unwrap_or_default());
    line("state", v1::PipelineState::word_of(p.state).into_owned());
    line("experiment", p.experiment.clone());
    line("created", time(p.created_at_ms));
    line("finished", p.finished_at_ms.map(time).unwrap_or_default());
    line("canceled", p.cancel_reason.clone().unwrap_or_default());
    line("message", p.message.clone().unwrap_or_default());
    for o in &p.outputs {
        line(
            "output",
            format!(
                "{} = {}.{}{}",
                o.name,
                o.step,
                o.output,
                o.identity
                    .as_ref()
                    .map(|i| format!(" ({i})"))
                    .unwrap_or_default()
            ),
        );
    }
    let mut t = table(&[
        "STEP",
        "STATE",
        "RUN",
        "REUSED FROM",
        "COMPUTE",
        "AFTER",
        "REASON",
    ]);
    for s in &p.steps {
        t.add_row(vec![
            s.name.clone(),
            v1::StepState::word_of(s.state).into_owned(),
            s.run_id.clone().unwrap_or_default(),
            s.reused_from.clone().unwrap_or_default(),
            s.compute.clone(),
            s.depends_on.join(","),
            s.reason.clone().unwrap_or_default(),
        ]);
    }
    out.push_str(&format!("{t}\n"));
    out
}
