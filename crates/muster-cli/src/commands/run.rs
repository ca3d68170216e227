//! `muster run ...`: the user's path from a script to its results.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use muster_core::loglines::RankLines;
use muster_core::names::validate_experiment_name;
use muster_core::spec::{
    DistributionFile, EnvironmentFile, InputFile, JobFile, LimitsFile, ResourcesFile, Scalar,
    parse_job_yaml, shell_quote,
};
use muster_proto::{Word, v1};
use serde_json::json;

use crate::cli::{OutputFormat, RunCommand, SubmitArgs};
use crate::connect;
use crate::output::{print_json, run_details, run_json, runs_table};
use crate::paging;
use crate::snapshot::{self, SnapshotLimits};
use muster_client::{Clients, status};

/// Runs a `muster run` command; returns the process exit code.
pub async fn run(server: &str, output: OutputFormat, cmd: RunCommand) -> anyhow::Result<i32> {
    match cmd {
        RunCommand::Submit(args) => submit(server, output, *args).await,
        RunCommand::List {
            experiment,
            state,
            compute,
            since,
            page,
            stale,
        } => {
            let state = state
                .map(|s| muster_core::RunState::parse(&s).map(|s| v1::RunState::from(s).into()))
                .transpose()
                .map_err(|e| anyhow::anyhow!("state: {e}"))?;
            let c = connect(server).await?;
            let request = v1::ListRunsRequest {
                experiment,
                state,
                compute,
                stale,
                workspace: crate::workspace().map(Into::into),
                since_ms: since,
                ..Default::default()
            };
            let fetched = paging::fetch(page.rows(), |page_size, page_token| {
                let mut runs = c.runs.clone();
                let request = v1::ListRunsRequest {
                    page_size,
                    page_token,
                    ..request.clone()
                };
                async move {
                    let answer = runs.list_runs(request).await?.into_inner();
                    Ok::<_, tonic::Status>((answer.runs, answer.next_page_token))
                }
            })
            .await
            .map_err(status)?;
            let runs = fetched.rows;
            if output == OutputFormat::Json {
                print_json(&json!(runs.iter().map(run_json).collect::<Vec<_>>()));
            } else if runs.is_empty() {
                println!("No runs. Submit one with `muster run submit -- COMMAND`.");
            } else {
                println!("{}", runs_table(&runs));
            }
            if fetched.more {
                eprintln!(
                    "{}",
                    paging::more_hint(&format!("the newest {} runs", runs.len()), "run", true)
                );
            }
            Ok(0)
        }
        RunCommand::Show { id, stale } => {
            let mut c = connect(server).await?;
            let run = c
                .runs
                .get_run(v1::GetRunRequest { id, stale })
                .await
                .map_err(status)?
                .into_inner();
            let metrics = super::metrics::last_values(&mut c, &run.id).await;
            super::metrics::print_run_with_metrics(output, &run, metrics.as_ref());
            Ok(0)
        }
        RunCommand::Metrics { id, follow, name } => {
            super::metrics::run_metrics(server, output, &id, follow, name).await
        }
        RunCommand::Logs {
            id,
            follow,
            attempt,
            rank,
        } => {
            let mut c = connect(server).await?;
            stream_logs(&mut c, &id, follow, attempt, rank).await?;
            Ok(0)
        }
        RunCommand::Cancel { id } => {
            let mut c = connect(server).await?;
            let run = c
                .runs
                .cancel_run(v1::CancelRunRequest {
                    id: id.clone(),
                    reason: None,
                })
                .await
                .map_err(status)?
                .into_inner();
            if output == OutputFormat::Json {
                print_json(&run_json(&run));
            } else if run.state() == v1::RunState::Canceled {
                println!("Canceled run {id}.");
            } else {
                println!(
                    "Canceling run {id}: its process gets SIGTERM, then SIGKILL after the grace period."
                );
            }
            Ok(0)
        }
        RunCommand::Wait { id, timeout } => {
            let mut c = connect(server).await?;
            let shown = c.clone();
            let waited = saying_why_it_waits(
                &shown,
                &id,
                wait(&mut c, &id, timeout.map(Duration::from_secs)),
            );
            let run = match until_interrupted(&id, waited).await? {
                Ok(run) => run,
                Err(code) => return Ok(code),
            };
            print_run(output, &run);
            if !run.state().is_terminal() {
                eprintln!(
                    "run {id} is still {} after the timeout; wait again with `muster run wait {id}`",
                    v1::RunState::word_of(run.state)
                );
                return Ok(EXIT_STILL_RUNNING);
            }
            Ok(exit_code(&run))
        }
        RunCommand::Download {
            id,
            to,
            output_name: only,
        } => {
            let mut c = connect(server).await?;
            let to = to.unwrap_or_else(|| PathBuf::from(&id));
            let summary = download(&mut c, &id, &to, only.as_deref()).await?;
            if output == OutputFormat::Json {
                print_json(&summary);
            } else {
                println!("Downloaded run {id} to {}", to.display());
            }
            Ok(0)
        }
    }
}

fn print_run(output: OutputFormat, run: &v1::Run) {
    if output == OutputFormat::Json {
        print_json(&run_json(run));
    } else {
        print!("{}", run_details(run));
    }
}

/// Follows a run with `follow` until it is done or Ctrl-C; then says the run keeps running
/// and how to stop it, and gives [`EXIT_INTERRUPTED`] instead.
async fn until_interrupted<T>(
    id: &str,
    follow: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Result<T, i32>> {
    tokio::select! {
        done = follow => done.map(Ok),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nrun {id} keeps running: `muster run cancel {id}` stops it");
            Ok(Err(EXIT_INTERRUPTED))
        }
    }
}

/// How a run that has not started yet reads on stderr while a client waits for it:
/// `queued: waiting: needs 1 node with 4 free GPUs; …`, or `preparing on gpu-01`; `None`
/// once it runs or has ended (its logs and its end speak then).
fn waiting_line(run: &v1::Run) -> Option<String> {
    let state = run.state();
    let node = || {
        run.attempts
            .last()
            .and_then(|a| a.placements.first())
            .map(|p| format!(" on {}", p.node_name))
            .unwrap_or_default()
    };
    match state {
        v1::RunState::Queued => Some(match &run.message {
            Some(m) if m.contains("waiting:") => format!("queued: {m}"),
            _ => "queued".to_string(),
        }),
        v1::RunState::Scheduled | v1::RunState::Preparing => {
            Some(format!("{}{}", v1::RunState::word_of(run.state), node()))
        }
        _ => None,
    }
}

/// Runs `follow` while saying on stderr what the run waits for, each time it changes
/// (looked up every second): the scheduler's reason while it is queued, then where it is
/// being prepared. Quiet once the run has started.
async fn saying_why_it_waits<T>(
    c: &Clients,
    id: &str,
    follow: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let mut c = c.clone();
    let id = id.to_string();
    let say = async move {
        let mut said: Option<String> = None;
        // Until the run starts (then this future is left pending) or `follow` ends.
        loop {
            if let Ok(run) = c
                .runs
                .get_run(v1::GetRunRequest {
                    id: id.clone(),
                    ..Default::default()
                })
                .await
            {
                let line = waiting_line(&run.into_inner());
                let Some(line) = line else {
                    return std::future::pending::<()>().await;
                };
                if said.as_ref() != Some(&line) {
                    eprintln!("run {id} is {line}");
                    said = Some(line);
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        done = follow => done,
        () = say => unreachable!("saying why a run waits never ends by itself"),
    }
}

/// `run wait --timeout` gave up while the run goes on (EX_TEMPFAIL: try again later).
pub const EXIT_STILL_RUNNING: i32 = 75;
/// The run timed out (`limits.timeout`), as `timeout(1)` says it.
pub const EXIT_TIMED_OUT: i32 = 124;
/// Ctrl-C stopped `--stream` or `run wait`; the run goes on (128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;
/// The run was canceled: muster stopped it with SIGTERM (128 + SIGTERM).
pub const EXIT_CANCELED: i32 = 143;

/// The process exit code that stands for a finished run: 0 when it completed, its own code
/// when it failed (1 when it has none), [`EXIT_CANCELED`], [`EXIT_TIMED_OUT`].
pub fn exit_code(run: &v1::Run) -> i32 {
    match run.state() {
        v1::RunState::Completed => 0,
        v1::RunState::Canceled => EXIT_CANCELED,
        v1::RunState::TimedOut => EXIT_TIMED_OUT,
        _ => match run.exit_code {
            Some(c) if (1..=255).contains(&c) => c,
            _ => 1,
        },
    }
}

async fn get(c: &mut Clients, id: &str) -> anyhow::Result<v1::Run> {
    Ok(c.runs
        .get_run(v1::GetRunRequest {
            id: id.to_string(),
            stale: false,
        })
        .await
        .map_err(status)?
        .into_inner())
}

async fn wait(c: &mut Clients, id: &str, timeout: Option<Duration>) -> anyhow::Result<v1::Run> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    // Bounded by the deadline (if any); each call returns at the latest after a minute so a
    // dropped connection is noticed.
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        let slice = left
            .unwrap_or(Duration::from_secs(60))
            .min(Duration::from_secs(60));
        let run = c
            .runs
            .wait_run(v1::WaitRunRequest {
                id: id.to_string(),
                timeout_ms: slice.as_millis().max(1) as u64,
            })
            .await
            .map_err(status)?
            .into_inner();
        if run.state().is_terminal() || left.is_some_and(|l| l <= slice) {
            return Ok(run);
        }
    }
}

/// Prints a run's logs: one rank's as they are (`rank`), or every rank's of each attempt,
/// combined: a single-instance attempt's log as it is, a multi-instance one's line by line,
/// each line prefixed `[rank N] ` (a rank's unfinished line waits for its newline, so no
/// other rank's output splits it).
async fn stream_logs(
    c: &mut Clients,
    id: &str,
    follow: bool,
    attempt: Option<u32>,
    rank: Option<u32>,
) -> anyhow::Result<()> {
    let mut stream = c
        .runs
        .stream_logs(v1::StreamLogsRequest {
            id: id.to_string(),
            attempt,
            follow,
            rank,
            all_ranks: rank.is_none(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut current = 0;
    let mut lines = RankLines::new();
    let mut pulls = crate::progress::PullLines::for_terminal();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status)?;
        if chunk.attempt != current {
            stdout.write_all(&pulls.finish())?;
            pulls = crate::progress::PullLines::for_terminal();
            stdout.write_all(&lines.finish())?;
            if current != 0 || chunk.attempt > 1 {
                let _ = stdout.flush();
                eprintln!("── attempt {} ──", chunk.attempt);
            }
            current = chunk.attempt;
        }
        if rank.is_none() && chunk.ranks > 1 {
            stdout.write_all(&lines.push(chunk.rank, &chunk.data))?;
        } else {
            stdout.write_all(&pulls.push(&chunk.data))?;
        }
        stdout.flush()?;
    }
    stdout.write_all(&pulls.finish())?;
    stdout.write_all(&lines.finish())?;
    stdout.flush()?;
    Ok(())
}

/// The experiment a run of `code` gets by default: the directory's name, when valid.
pub(crate) fn default_experiment(code: &Path) -> String {
    std::fs::canonicalize(code)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .filter(|n| validate_experiment_name(n).is_ok())
        .unwrap_or_else(|| "default".to_string())
}

/// Rewrites each data input whose `path` names a data asset (`azureml:NAME:VERSION`,
/// `azureml:NAME@latest`) to the asset's own path, asking the server only when one does.
async fn resolve_data_assets(server: &str, job: &mut JobFile) -> anyhow::Result<()> {
    let named = |d: &muster_core::spec::DataInput| {
        d.path
            .as_deref()
            .is_some_and(|p| p.starts_with("azureml:") && !p.starts_with("azureml://"))
    };
    let any = job
        .inputs
        .iter()
        .flatten()
        .any(|(_, i)| matches!(i, InputFile::Data(d) if named(d)));
    if !any {
        return Ok(());
    }
    let mut c = crate::connect(server).await?;
    for (name, input) in job.inputs.iter_mut().flatten() {
        let InputFile::Data(d) = input else { continue };
        if !named(d) {
            continue;
        }
        let reference = d.path.clone().unwrap_or_default();
        let asset = crate::commands::data::get(&mut c, &reference)
            .await
            .with_context(|| format!("inputs.{name}.path"))?;
        if d.kind.is_none() {
            d.kind = Some(asset.r#type.clone());
        }
        d.path = Some(asset.input_path);
    }
    Ok(())
}

/// What a submit snapshots when neither `--code` nor the job's `code:` says: nothing for
/// a job file (as Azure ML), the current directory for a command given on the command line.
fn job_code_default(args: &SubmitArgs) -> Option<PathBuf> {
    args.file.is_none().then(|| PathBuf::from("."))
}

async fn submit(server: &str, output: OutputFormat, args: SubmitArgs) -> anyhow::Result<i32> {
    // Everything the user gave is checked before the network is touched.
    let runconfig = match (&args.runconfig, &args.run_configuration_name) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(name)) => Some(
            args.code
                .clone()
                .unwrap_or_default()
                .join(".azureml")
                .join(format!("{name}.runconfig")),
        ),
        (None, None) => None,
    };
    let mut v1_warnings = Vec::new();
    let (mut job, base, snapshot) = match (&args.file, &runconfig) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let job =
                parse_job_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (job, base, job_code_default(&args))
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!(
                    "cannot read the run configuration {} (v1 run configurations live in the project's .azureml/ folder)",
                    path.display()
                )
            })?;
            let rc = muster_core::runconfig::parse_runconfig(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            v1_warnings = rc.warnings;
            // The project is the folder that holds `.azureml/`.
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let project = if dir.file_name().is_some_and(|n| n == ".azureml") {
                dir.parent().map(Path::to_path_buf).unwrap_or_default()
            } else {
                dir
            };
            let code = (rc.snapshot || args.code.is_some()).then(|| {
                args.code.clone().unwrap_or_else(|| {
                    if project.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        project.clone()
                    }
                })
            });
            (rc.job, project, code)
        }
        (None, None) => (JobFile::default(), PathBuf::new(), job_code_default(&args)),
    };
    // A job file without `code:` uploads nothing, as in Azure ML; a command given on the
    // command line alone runs in a snapshot of the current directory.
    let code_dir = match (&args.code, &job.code) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(c)) => Some(base.join(c)),
        (None, None) => snapshot,
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
    if let Some(c) = args.compute {
        job.compute = Some(c);
    }
    if let Some(e) = args.experiment {
        job.experiment_name = Some(e);
    }
    if let Some(n) = args.name {
        job.display_name = Some(n);
    }
    if let Some(i) = args.image {
        job.environment = Some(EnvironmentFile::Reference(i));
    }
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--env: {kv:?} is not KEY=VALUE"))?;
        job.environment_variables
            .get_or_insert_with(Default::default)
            .insert(k.to_string(), Scalar::Text(v.to_string()));
    }
    {
        let r = job.resources.get_or_insert_with(ResourcesFile::default);
        if let Some(c) = args.cpu {
            r.cpu = Some(Scalar::Text(c));
        }
        if let Some(m) = args.memory {
            r.memory = Some(Scalar::Text(m));
        }
        if let Some(g) = args.gpus {
            r.gpus = Some(g);
        }
        if let Some(n) = args.instance_count {
            r.instance_count = Some(n);
        }
    }
    if args.distribution.is_some() || args.process_count_per_instance.is_some() {
        let d = job
            .distribution
            .get_or_insert_with(DistributionFile::default);
        if let Some(kind) = args.distribution {
            d.kind = kind;
        }
        if d.kind.is_empty() {
            anyhow::bail!(
                "--process-count-per-instance needs a distribution: add --distribution pytorch, mpi or tensorflow"
            );
        }
        if let Some(n) = args.process_count_per_instance {
            d.process_count_per_instance = Some(n);
        }
    }
    for kv in &args.node_selector {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--node-selector: {kv:?} is not KEY=VALUE"))?;
        job.node_selector
            .get_or_insert_with(Default::default)
            .insert(k.to_string(), Scalar::Text(v.to_string()));
    }
    if let Some(t) = args.timeout {
        job.limits.get_or_insert_with(LimitsFile::default).timeout = Some(t);
    }
    if let Some(p) = args.priority {
        job.priority = Some(Scalar::Text(p));
    }
    if let Some(m) = args.max_attempts {
        job.max_attempts = Some(m);
    }
    if let Some(i) = &args.checkpoint_interval {
        muster_core::spec::parse_checkpoint_interval(i)
            .map_err(|e| anyhow::anyhow!("--checkpoint-interval: {e}"))?;
        job.checkpoint = Some(muster_core::spec::CheckpointFile {
            interval: Some(Scalar::Text(i.clone())),
        });
    }
    let label = args
        .file
        .as_ref()
        .or(runconfig.as_ref())
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default();
    // Inputs that name data assets become what the assets stand for.
    resolve_data_assets(server, &mut job)
        .await
        .map_err(|e| anyhow::anyhow!("{label}{e:#}"))?;
    // Local data inputs travel with the submit, as snapshots of their own.
    let local_inputs = crate::local_inputs::in_job(&mut job, &base)
        .map_err(|e| anyhow::anyhow!("{label}{e:#}"))?;
    let mut spec = job
        .into_run_spec(&default_experiment(
            code_dir.as_deref().unwrap_or(Path::new(".")),
        ))
        .map_err(|e| anyhow::anyhow!("{label}{e}"))?;
    spec.warnings.extend(v1_warnings);
    for w in &spec.warnings {
        eprintln!("warning: {label}{w}");
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
        .chain(local_inputs.iter().map(|i| &i.snapshot))
        .collect();

    let mut list = crate::server_list(server)?;
    if !snaps.is_empty() {
        crate::check_compute_before_upload(&mut list, &spec).await?;
        let mut uploaded = crate::upload_failing_over(&mut list, &snaps)
            .await?
            .into_iter();
        if let Some(dir) = &code_dir {
            let (code, stats) = uploaded.next().expect("one upload per snapshot");
            if output == OutputFormat::Table {
                eprintln!("{}", snapshot::describe(dir, "", &code, &stats));
            }
            spec.code = Some(code);
        }
        if output == OutputFormat::Table {
            crate::local_inputs::describe(&local_inputs, uploaded);
        }
    }
    if let Some(w) = crate::workspace() {
        spec.workspace = w.to_string();
    }
    // The same key on every retry: a retry after a timeout never makes a second run.
    let key = args
        .idempotency_key
        .unwrap_or_else(|| format!("cli-{:032x}", rand::random::<u128>()));
    let req = v1::SubmitRunRequest {
        spec: Some(spec.clone().into()),
        idempotency_key: Some(key),
    };
    let run = crate::submit_failing_over(&mut list, &snaps, |mut c| {
        let req = req.clone();
        async move { c.runs.submit_run(req).await }
    })
    .await?;
    if output == OutputFormat::Json && !args.stream {
        print_json(&run_json(&run));
        return Ok(0);
    }
    if output == OutputFormat::Table {
        // The server's spec: `serverless` became the workspace's serverless target.
        let accepted = run.spec.clone().unwrap_or_default();
        // Warnings the server added (e.g. no node of the target is large enough yet).
        for w in accepted.warnings.iter().skip(spec.warnings.len()) {
            eprintln!("warning: {w}");
        }
        let compute = match &accepted.requested_compute {
            Some(asked) => format!("{} for {asked}", accepted.compute),
            None => accepted.compute,
        };
        if args.stream {
            eprintln!(
                "Submitted run {} (experiment {}, compute {compute}); streaming its logs",
                run.id, spec.experiment
            );
        } else {
            println!("{}", run.id);
            eprintln!(
                "Submitted run {} (experiment {}, compute {compute}). Follow it: muster run logs --follow {}",
                run.id, spec.experiment, run.id
            );
            return Ok(0);
        }
    }
    let mut c = connect(server).await?;
    let shown = c.clone();
    let followed = until_interrupted(
        &run.id,
        saying_why_it_waits(&shown, &run.id, async {
            stream_logs(&mut c, &run.id, true, None, None).await?;
            wait(&mut c, &run.id, None).await
        }),
    )
    .await?;
    let done = match followed {
        Ok(done) => done,
        Err(code) => return Ok(code),
    };
    if output == OutputFormat::Json {
        print_json(&run_json(&done));
    } else {
        let detail = done
            .message
            .clone()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        eprintln!(
            "Run {} {}{detail}",
            done.id,
            v1::RunState::word_of(done.state)
        );
    }
    Ok(exit_code(&done))
}

/// Downloads the outputs of the run's latest attempt that has any (into `to/outputs/`)
/// and the logs of every attempt (into `to/logs/`: `attempt-N.std_log.txt`, or for a
/// multi-instance run one file per rank, `attempt-N.rank-R.std_log.txt`). With `only`,
/// just that declared output (`to/outputs/NAME`) and no logs.
async fn download(
    c: &mut Clients,
    id: &str,
    to: &Path,
    only: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let run = get(c, id).await?;
    let declared: std::collections::BTreeMap<String, String> = run
        .spec
        .as_ref()
        .map(|s| s.outputs.clone().into_iter().collect())
        .unwrap_or_default();
    if let Some(name) = only
        && !declared.contains_key(name)
    {
        let names: Vec<&str> = declared.keys().map(String::as_str).collect();
        anyhow::bail!(
            "--output-name: run {id} declares no output {name:?}; {}",
            if names.is_empty() {
                "it declares none (download all of outputs/ without --output-name)".to_string()
            } else {
                format!("its outputs are {}", names.join(", "))
            }
        );
    }
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    let outputs = run.attempts.iter().rev().find_map(|a| a.outputs.clone());
    let mut files = 0usize;
    if let Some(sha) = &outputs {
        let archive = to.join(".outputs.tar");
        let bar = crate::progress::bytes_unknown(&format!("downloading run {id}'s outputs"));
        c.blobs
            .download_observed(sha, &archive, |n| bar.inc(n))
            .await?;
        bar.finish_and_clear();
        let dest = to.join("outputs");
        let archive2 = archive.clone();
        let only = only.map(str::to_string);
        let (unpacked, skipped) =
            tokio::task::spawn_blocking(move || unpack(&archive2, &dest, only.as_deref()))
                .await??;
        files = unpacked;
        let _ = std::fs::remove_file(&archive);
        if !skipped.is_empty() {
            eprintln!(
                "warning: run {id}'s outputs hold {} entries that are not files or folders, not written (muster never recreates a run's links): {}",
                skipped.len(),
                skipped.join(", ")
            );
        }
    }
    if let Some(name) = only {
        if files == 0 {
            eprintln!(
                "run {id}'s output {name} is empty (the run wrote nothing to outputs/{name})"
            );
        }
        return Ok(
            json!({"id": id, "to": to.display().to_string(), "output": name, "output_files": files}),
        );
    }
    let logs_dir = to.join("logs");
    std::fs::create_dir_all(&logs_dir)?;
    for a in &run.attempts {
        let ranks = a.placements.len().max(1) as u32;
        for rank in 0..ranks {
            let mut stream = c
                .runs
                .stream_logs(v1::StreamLogsRequest {
                    id: id.to_string(),
                    attempt: Some(a.number),
                    follow: false,
                    rank: Some(rank),
                    all_ranks: false,
                })
                .await
                .map_err(status)?
                .into_inner();
            let name = if ranks > 1 {
                format!("attempt-{}.rank-{rank}.std_log.txt", a.number)
            } else {
                format!("attempt-{}.std_log.txt", a.number)
            };
            let mut f = std::fs::File::create(logs_dir.join(name))?;
            while let Some(chunk) = stream.next().await {
                f.write_all(&chunk.map_err(status)?.data)?;
            }
        }
    }
    if outputs.is_none() {
        eprintln!(
            "run {id} has no outputs (nothing was written to outputs/); its logs are in {}",
            logs_dir.display()
        );
    }
    Ok(
        json!({"id": id, "to": to.display().to_string(), "output_files": files, "attempts": run.attempts.len()}),
    )
}

/// Unpacks an outputs archive into `dest` (all of it, or only `only`'s file or folder);
/// returns how many files it held, and the entries it did not write. Only files and
/// folders are written: a link a run left in `outputs/` (`evil -> /etc/shadow`), a device
/// or a FIFO is never recreated, and no entry lands outside `dest` (an absolute path or a
/// `..` is refused by the tar crate, and without links nothing inside can lead out).
fn unpack(archive: &Path, dest: &Path, only: Option<&str>) -> anyhow::Result<(usize, Vec<String>)> {
    let wanted = |path: &Path| {
        only.is_none_or(|name| {
            path.components()
                .find(|c| !matches!(c, std::path::Component::CurDir))
                .is_some_and(|first| first.as_os_str() == name)
        })
    };
    let mut ar = tar::Archive::new(std::fs::File::open(archive)?);
    let mut files = 0;
    let mut skipped = Vec::new();
    std::fs::create_dir_all(dest)?;
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if !wanted(&path) {
            continue;
        }
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            let target = entry
                .link_name()
                .ok()
                .flatten()
                .map(|t| format!(" -> {}", t.display()))
                .unwrap_or_default();
            skipped.push(format!("{}{target}", path.display()));
            continue;
        }
        if !entry.unpack_in(dest)? {
            skipped.push(format!("{} (outside the folder)", path.display()));
            continue;
        }
        if kind.is_file() {
            files += 1;
        }
    }
    Ok((files, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outputs archive as a hostile run could leave it: a link out, a name that climbs
    /// out, a file behind the link's name, and one honest file.
    fn hostile_archive(path: &Path) {
        let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_link_name("/etc/shadow").unwrap();
        link.set_size(0);
        link.set_cksum();
        b.append_data(&mut link, "evil", std::io::empty()).unwrap();
        let mut climb = tar::Header::new_old();
        climb.as_old_mut().name[..4].copy_from_slice(b"../x");
        climb.set_size(3);
        climb.set_mode(0o644);
        climb.set_cksum();
        b.append(&climb, &b"bad"[..]).unwrap();
        for (name, data) in [
            ("evil/passwd", &b"through the link"[..]),
            ("model.txt", b"ok"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        b.finish().unwrap();
    }

    #[test]
    fn a_download_writes_files_and_folders_only_and_nothing_outside() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("outputs.tar");
        hostile_archive(&archive);
        let dest = dir.path().join("run/outputs");
        let (files, skipped) = unpack(&archive, &dest, None).unwrap();
        assert_eq!(std::fs::read(dest.join("model.txt")).unwrap(), b"ok");
        assert!(!dir.path().join("run/x").exists() && !dir.path().join("x").exists());
        let evil = std::fs::symlink_metadata(dest.join("evil")).unwrap();
        assert!(evil.is_dir(), "evil is a plain folder, never a link");
        assert_eq!(files, 2, "model.txt and evil/passwd");
        assert!(
            skipped.iter().any(|s| s == "evil -> /etc/shadow"),
            "{skipped:?}"
        );
        assert!(skipped.iter().any(|s| s.starts_with("../x")), "{skipped:?}");
    }
}
