//! `muster sweep ...`: hyperparameter sweeps (Azure ML `type: sweep` jobs and v1
//! HyperDrive configs). Each trial is a run (in `muster run list`); the leader's sweep
//! controller starts them, and stops the ones the early-termination policy gives up on.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use muster_core::spec::{JobFile, parse_job_yaml};
use muster_core::sweep::{SweepSpec, parse_hyperdrive_config, parse_sweep_yaml};
use muster_proto::{Word, v1};
use serde_json::{Value, json};

use crate::cli::OutputFormat;
use crate::commands::run::default_experiment;
use crate::connect;
use crate::local_inputs::LocalInput;
use crate::output::{print_json, table, time};
use crate::paging::{self, PageArgs};
use crate::snapshot::{self, SnapshotLimits};
use muster_client::status;
use muster_core::spec::shell_quote;

/// `muster sweep` subcommands.
#[derive(Debug, Subcommand)]
pub enum SweepCommand {
    /// Submit a sweep: `-f sweep.yml` (an Azure ML `type: sweep` job), or
    /// `--hyperdrive-config hdconfig.yml` with the trial as `-f job.yml` or `-- COMMAND`.
    Submit(Box<SweepSubmitArgs>),
    /// Show a sweep: its trials ranked by the primary metric, and which were stopped early.
    Show {
        /// The sweep id.
        id: String,
        /// Answer from this server's replica, without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// List sweeps, newest first: the newest 50 (stderr says when there are more).
    List {
        /// Only this experiment.
        #[arg(long)]
        experiment: Option<String>,
        /// Only sweeps in this state (running, canceling, completed, timed_out, canceled).
        #[arg(long)]
        state: Option<String>,
        /// Only sweeps submitted since: a duration ago (2h, 30m, 7d) or an RFC 3339 time.
        #[arg(long, value_name = "WHEN", value_parser = crate::paging::parse_since)]
        since: Option<u64>,
        #[command(flatten)]
        page: PageArgs,
        /// Answer from this server's replica, without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Cancel a sweep: its active trials are canceled and no trial starts.
    Cancel {
        /// The sweep id.
        id: String,
    },
}

/// `muster sweep submit` flags.
#[derive(Debug, Args)]
pub struct SweepSubmitArgs {
    /// An Azure ML v2 sweep job YAML (`type: sweep`); with --hyperdrive-config, the command
    /// job YAML each trial runs.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// An Azure ML v1 HyperDrive config (`hdconfig.yml`); the trial is `-f JOB.yml` or
    /// `-- COMMAND` (each parameter is appended to it as `NAME VALUE`).
    #[arg(long)]
    pub hyperdrive_config: Option<PathBuf>,
    /// The compute target of the trials (default: the file's, else `local`).
    #[arg(long)]
    pub compute: Option<String>,
    /// The experiment (default: the file's, else the code directory's name).
    #[arg(long)]
    pub experiment: Option<String>,
    /// The directory to snapshot (default: the trial's `code`, else `.`).
    #[arg(long)]
    pub code: Option<PathBuf>,
    /// Retrying with the same key never creates a second sweep.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Snapshot limit in bytes.
    #[arg(long, default_value_t = 300_000_000)]
    pub max_snapshot_bytes: u64,
    /// Snapshot limit in files.
    #[arg(long, default_value_t = 2_000)]
    pub max_snapshot_files: usize,
    /// The trial's command (after `--`), with --hyperdrive-config.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Runs a `muster sweep` command; returns the process exit code.
pub async fn run(server: &str, output: OutputFormat, cmd: SweepCommand) -> anyhow::Result<i32> {
    match cmd {
        SweepCommand::Submit(args) => submit(server, output, *args).await,
        SweepCommand::Show { id, stale } => {
            let mut client = connect(server).await?.sweeps;
            let sweep = client
                .get_sweep(v1::GetSweepRequest { id, stale })
                .await
                .map_err(status)?
                .into_inner();
            if output == OutputFormat::Json {
                print_json(&sweep_json(&sweep));
            } else {
                print!("{}", sweep_details(&sweep));
            }
            Ok(0)
        }
        SweepCommand::List {
            experiment,
            state,
            since,
            page,
            stale,
        } => {
            let state = state
                .map(|s| v1::SweepState::from_word(&s).map(i32::from))
                .transpose()
                .map_err(|e| anyhow::anyhow!("state: {e}"))?;
            let client = connect(server).await?.sweeps;
            let request = v1::ListSweepsRequest {
                stale,
                workspace: crate::workspace().map(Into::into),
                experiment,
                state,
                since_ms: since,
                ..Default::default()
            };
            let fetched = paging::fetch(page.rows(), |page_size, page_token| {
                let mut client = client.clone();
                let request = v1::ListSweepsRequest {
                    page_size,
                    page_token,
                    ..request.clone()
                };
                async move {
                    let answer = client.list_sweeps(request).await?.into_inner();
                    Ok::<_, tonic::Status>((answer.sweeps, answer.next_page_token))
                }
            })
            .await
            .map_err(status)?;
            let sweeps = fetched.rows;
            if output == OutputFormat::Json {
                print_json(&json!(sweeps.iter().map(sweep_json).collect::<Vec<_>>()));
            } else if sweeps.is_empty() {
                println!("No sweeps. Submit one with `muster sweep submit -f sweep.yml`.");
            } else {
                let mut t = table(&[
                    "ID",
                    "NAME",
                    "STATE",
                    "TRIALS",
                    "OBJECTIVE",
                    "BEST",
                    "CREATED",
                ]);
                for s in &sweeps {
                    t.add_row(vec![
                        s.id.clone(),
                        s.display_name.clone().unwrap_or_default(),
                        v1::SweepState::word_of(s.state).into_owned(),
                        format!("{}/{}", s.trials.len(), s.max_total_trials),
                        format!("{} {}", s.goal, s.primary_metric),
                        best_text(s),
                        time(s.created_at_ms),
                    ]);
                }
                println!("{t}");
            }
            if fetched.more {
                let shown = format!("the newest {} sweeps", sweeps.len());
                eprintln!("{}", paging::more_hint(&shown, "sweep", true));
            }
            Ok(0)
        }
        SweepCommand::Cancel { id } => {
            let mut client = connect(server).await?.sweeps;
            let sweep = client
                .cancel_sweep(v1::CancelSweepRequest {
                    id: id.clone(),
                    reason: None,
                })
                .await
                .map_err(status)?
                .into_inner();
            if output == OutputFormat::Json {
                print_json(&sweep_json(&sweep));
            } else if sweep.state() == v1::SweepState::Canceled {
                println!("Canceled sweep {id}.");
            } else {
                println!(
                    "Canceling sweep {id}: its active trials are canceled and no trial starts."
                );
            }
            Ok(0)
        }
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn base_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The `trial.code` of a v2 sweep file, if it names one (the file is parsed for real
/// afterwards; this only finds the directory to snapshot).
fn v2_trial_code(text: &str) -> Option<String> {
    muster_core::spec::check_yaml_limits(text).ok()?;
    let value: yaml_serde::Value = yaml_serde::from_str(text).ok()?;
    value
        .get("trial")?
        .get("code")?
        .as_str()
        .map(str::to_string)
}

/// Reads and validates the sweep the flags describe; returns it with the directory to
/// snapshot and the local data inputs to upload. The network is asked only for the data assets the files name.
async fn sweep_from_args(
    server: &str,
    args: &SweepSubmitArgs,
) -> anyhow::Result<(SweepSpec, Option<PathBuf>, Vec<LocalInput>)> {
    let mut inputs = Vec::new();
    let (mut spec, code_dir) = match &args.hyperdrive_config {
        None => {
            let path = args.file.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "give the sweep: -f sweep.yml (a `type: sweep` job), or --hyperdrive-config hdconfig.yml with -f job.yml or -- COMMAND"
                )
            })?;
            if !args.command.is_empty() {
                anyhow::bail!(
                    "a `type: sweep` file holds its trial's command: remove the command after `--` (it is for --hyperdrive-config)"
                );
            }
            // Data assets the sweep names become what they stand for, as in `run submit`.
            let text = crate::commands::data::resolve_asset_paths(server, &read(path)?)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
            // Local data inputs travel with the submit, as in `run submit`.
            let (text, found) = crate::local_inputs::in_yaml(&text, &base_dir(path))
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
            inputs = found;
            // A trial without `code:` uploads nothing, as in Azure ML.
            let code_dir = match (&args.code, v2_trial_code(&text)) {
                (Some(c), _) => Some(c.clone()),
                (None, Some(c)) => Some(base_dir(path).join(c)),
                (None, None) => None,
            };
            let spec = parse_sweep_yaml(
                &text,
                &default_experiment(code_dir.as_deref().unwrap_or(Path::new("."))),
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            (spec, code_dir)
        }
        Some(hd_path) => {
            let (mut job, base) = match &args.file {
                Some(path) => {
                    let text = crate::commands::data::resolve_asset_paths(server, &read(path)?)
                        .await
                        .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
                    let mut job = parse_job_yaml(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    inputs = crate::local_inputs::in_job(&mut job, &base_dir(path))
                        .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
                    (job, base_dir(path))
                }
                None => (JobFile::default(), PathBuf::new()),
            };
            if !args.command.is_empty() {
                job.command = Some(
                    args.command
                        .iter()
                        .map(|a| shell_quote(a))
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
            if job.command.is_none() {
                anyhow::bail!(
                    "--hyperdrive-config needs the trial: -f job.yml (a command job) or -- COMMAND"
                );
            }
            let code_dir = match (&args.code, &job.code) {
                (Some(c), _) => c.clone(),
                (None, Some(c)) => base.join(c),
                (None, None) => PathBuf::from("."),
            };
            let label = args
                .file
                .as_ref()
                .map(|p| format!("{}: ", p.display()))
                .unwrap_or_default();
            let trial = job
                .into_run_spec(&default_experiment(&code_dir))
                .map_err(|e| anyhow::anyhow!("{label}{e}"))?;
            let spec = parse_hyperdrive_config(&read(hd_path)?, trial)
                .map_err(|e| anyhow::anyhow!("{}: {e}", hd_path.display()))?;
            // v1's submit-hyperdrive always snapshots the source directory.
            (spec, Some(code_dir))
        }
    };
    if let Some(c) = &args.compute {
        spec.trial.compute = c.clone();
    }
    if let Some(e) = &args.experiment {
        spec.experiment = e.clone();
        spec.trial.experiment = e.clone();
    }
    if args.compute.is_some() || args.experiment.is_some() {
        spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok((spec, code_dir, inputs))
}

async fn submit(server: &str, output: OutputFormat, args: SweepSubmitArgs) -> anyhow::Result<i32> {
    // Everything the user gave is checked before the network is touched.
    let (mut spec, code_dir, inputs) = sweep_from_args(server, &args).await?;
    for w in &spec.trial.warnings {
        eprintln!("warning: trial: {w}");
    }
    let limits = SnapshotLimits {
        max_bytes: args.max_snapshot_bytes,
        max_files: args.max_snapshot_files,
    };
    let snap = match &code_dir {
        Some(dir) => vec![snapshot::build(dir, limits)?],
        None => Vec::new(),
    };
    let snaps: Vec<&snapshot::Snapshot> = snap
        .iter()
        .chain(inputs.iter().map(|i| &i.snapshot))
        .collect();
    let mut list = crate::server_list(server)?;
    if !snaps.is_empty() {
        let mut uploaded = crate::upload_failing_over(&mut list, &snaps)
            .await?
            .into_iter();
        if let Some(dir) = &code_dir {
            let (code, stats) = uploaded.next().expect("one upload per snapshot");
            if output == OutputFormat::Table {
                eprintln!("{}", snapshot::describe(dir, "", &code, &stats));
            }
            spec.trial.code = Some(code);
        }
        if output == OutputFormat::Table {
            crate::local_inputs::describe(&inputs, uploaded);
        }
    }
    if let Some(w) = crate::workspace() {
        spec.trial.workspace = w.to_string();
    }
    // The same key on every retry: a retry after a timeout never makes a second sweep.
    let key = args
        .idempotency_key
        .unwrap_or_else(|| format!("cli-{:032x}", rand::random::<u128>()));
    let req = v1::SubmitSweepRequest {
        spec: Some(muster_proto::sweep_spec_to_wire(&spec)),
        idempotency_key: Some(key),
    };
    let sweep = crate::submit_failing_over(&mut list, &snaps, |mut c| {
        let req = req.clone();
        async move { c.sweeps.submit_sweep(req).await }
    })
    .await?;
    if output == OutputFormat::Json {
        print_json(&sweep_json(&sweep));
    } else {
        println!("{}", sweep.id);
        eprintln!(
            "Submitted sweep {} ({} trials at most, {} at once, {} {}, compute {}). Follow it: muster sweep show {}",
            sweep.id,
            sweep.max_total_trials,
            sweep.max_concurrent_trials,
            sweep.goal,
            sweep.primary_metric,
            sweep.compute,
            sweep.id
        );
    }
    Ok(0)
}

fn number(v: Option<f64>) -> String {
    v.map(|v| format!("{v}")).unwrap_or_else(|| "-".to_string())
}

fn params_text(t: &v1::SweepTrial) -> String {
    let mut params: Vec<(&String, &String)> = t.params.iter().collect();
    params.sort();
    params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn best_text(s: &v1::Sweep) -> String {
    s.best_trial
        .and_then(|b| s.trials.iter().find(|t| t.index == b))
        .map(|t| format!("trial {} ({})", t.index, number(t.best)))
        .unwrap_or_else(|| "-".to_string())
}

/// `sweep show` for people: the sweep, then its trials ranked best first.
pub fn sweep_details(s: &v1::Sweep) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<20}{v}\n"));
    line(&mut out, "Sweep:", s.id.clone());
    if let Some(n) = &s.display_name {
        line(&mut out, "Name:", n.clone());
    }
    line(
        &mut out,
        "State:",
        v1::SweepState::word_of(s.state).into_owned(),
    );
    if let Some(m) = &s.message {
        line(&mut out, "Canceled:", m.clone());
    }
    line(&mut out, "Experiment:", s.experiment.clone());
    line(&mut out, "Compute:", s.compute.clone());
    line(
        &mut out,
        "Objective:",
        format!("{} {}", s.goal, s.primary_metric),
    );
    line(&mut out, "Sampling:", s.sampling.clone());
    line(
        &mut out,
        "Early termination:",
        s.early_termination
            .clone()
            .unwrap_or_else(|| "none".to_string()),
    );
    line(
        &mut out,
        "Trials:",
        format!(
            "{} of at most {} ({} at once)",
            s.trials.len(),
            s.max_total_trials,
            s.max_concurrent_trials
        ),
    );
    line(&mut out, "Created:", time(s.created_at_ms));
    if let Some(f) = s.finished_at_ms {
        line(&mut out, "Finished:", time(f));
    }
    line(&mut out, "Best trial:", best_text(s));
    if s.trials.is_empty() {
        out.push_str("No trials yet.\n");
        return out;
    }
    let mut t = table(&[
        "RANK", "TRIAL", "RUN", "PARAMS", "BEST", "LAST", "STATE", "NOTE",
    ]);
    for (rank, trial) in s.trials.iter().enumerate() {
        t.add_row(vec![
            (rank + 1).to_string(),
            trial.index.to_string(),
            trial.run_id.clone(),
            params_text(trial),
            number(trial.best),
            number(trial.last),
            v1::RunState::word_of(trial.state).into_owned(),
            muster_proto::sweep_trial_note(trial),
        ]);
    }
    out.push_str(&format!("{t}\n"));
    out
}

/// A sweep as JSON: its settings, state, best trial, and the trials ranked best first.
pub fn sweep_json(s: &v1::Sweep) -> Value {
    json!({
        "id": s.id,
        "display_name": s.display_name,
        "experiment": s.experiment,
        "compute": s.compute,
        "state": v1::SweepState::word_of(s.state),
        "message": s.message,
        "primary_metric": s.primary_metric,
        "goal": s.goal,
        "sampling": s.sampling,
        "seed": s.seed,
        "early_termination": s.early_termination,
        "max_total_trials": s.max_total_trials,
        "max_concurrent_trials": s.max_concurrent_trials,
        "timeout_s": s.timeout_s,
        "best_trial": s.best_trial,
        "created_at": time(s.created_at_ms),
        "finished_at": s.finished_at_ms.map(time),
        "trials": s.trials.iter().enumerate().map(|(rank, t)| json!({
            "rank": rank + 1,
            "index": t.index,
            "run_id": t.run_id,
            "params": t.params.iter().collect::<std::collections::BTreeMap<_, _>>(),
            "state": v1::RunState::word_of(t.state),
            "best": t.best,
            "last": t.last,
            "points": t.points,
            "stopped": t.stopped,
            "stopped_early": t.early_terminated,
        })).collect::<Vec<_>>(),
    })
}
