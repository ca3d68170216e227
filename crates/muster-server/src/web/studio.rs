//! muster studio: server-rendered pages of compute targets, runs (with their logs, metrics
//! and nodes), sweeps (trials ranked by the primary metric) and pipelines (steps and their
//! inputs). Read from this server's replica; live pages reload themselves.
//!
//! The handlers gather what a page shows (reading the state, `views::…`) into plain structs;
//! the markup is in askama templates, `crates/muster-server/templates/studio/*.html`
//! (`base.html` is every page's frame, `macros.html` the pieces pages share). askama
//! rather than maud: the markup stays HTML files a reader opens beside the page, they are
//! checked when the crate compiles (a field a template names must exist), and every
//! `{{ … }}` is HTML-escaped unless a template says otherwise (none does).

use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use muster_core::paging::{Listing, PageToken, RunFilter};
use muster_core::pipeline::StepInput;
use muster_core::{Run, RunState};
use muster_proto::v1;
use muster_proto::{Word, pipeline_to_wire, run_to_wire, sweep_trial_note};
use serde::{Deserialize, Serialize};

use super::compute::{GpuRow, TargetCard, gpu_grid};
use super::session::Viewer;
use crate::server::Server;
use crate::views::access::{pipeline_workspace, sweep_workspace};
use crate::views::logs::combined_log;
use crate::views::metrics::run_metrics;
use crate::views::sweeps::sweep_view;

/// Most sweeps, pipelines and runs the index lists (the newest).
const INDEX_ROWS: usize = 200;

/// Seconds between reloads of the front page.
const INDEX_REFRESH_S: u32 = 5;

/// Seconds between reloads of a live run, sweep or pipeline page.
const LIVE_REFRESH_S: u32 = 2;

/// A time (ms since the epoch) as RFC 3339 to the second; empty when there is none.
pub(super) fn ms(t: Option<u64>) -> String {
    t.map(|t| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(t))
            .to_string()
    })
    .unwrap_or_default()
}

/// Whether a run, sweep trial or pipeline step (by its state word) is over.
fn ended(state: &str) -> bool {
    state == "reused" || RunState::parse(state).is_ok_and(RunState::is_terminal)
}

/// A metric value as `muster` prints it.
fn number(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_string())
}

/// The frame of a page (`base.html`): its title, how often it reloads itself (live pages
/// only), and what the link back to the front page says (none on the front page).
#[derive(Debug)]
pub(super) struct Head {
    pub title: String,
    pub refresh_s: Option<u32>,
    pub back: Option<&'static str>,
}

impl Head {
    /// The head of a run, sweep or pipeline page, reloading while `live`.
    fn page(title: &str, live: bool, back: &'static str) -> Self {
        Self {
            title: title.to_string(),
            refresh_s: live.then_some(LIVE_REFRESH_S),
            back: Some(back),
        }
    }
}

/// Renders a page; a template only fails when a value's `Display` does, which ours do not.
pub(super) fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the page could not be rendered: {e}\n"),
        )
            .into_response(),
    }
}

/// A sweep's best trial, as `muster sweep show` names it (`macros.html`).
#[derive(Debug)]
struct BestTrial {
    index: u32,
    run_id: String,
    value: String,
}

impl BestTrial {
    /// The best trial of `s`, once one logged the primary metric.
    fn of(s: &v1::Sweep) -> Option<Self> {
        s.best_trial
            .and_then(|b| s.trials.iter().find(|t| t.index == b))
            .map(|t| Self {
                index: t.index,
                run_id: t.run_id.clone(),
                value: number(t.best),
            })
    }
}

/// The 404 of a missing `what` (`id`): plain text naming where the `list` is.
fn not_found(what: &str, id: &str, list: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("{what} {id} does not exist: the studio's front page (/) lists the {list}\n"),
    )
        .into_response()
}

/// The page of a path the studio has no page at (`not_found.html`).
#[derive(Debug, Template)]
#[template(path = "studio/not_found.html", whitespace = "minimize")]
struct NotFoundPage {
    head: Head,
    path: String,
}

/// The 404 page of an unknown path (the web router's fallback).
pub(super) async fn unknown_page(uri: Uri) -> Response {
    let page = NotFoundPage {
        head: Head {
            title: "Not found".into(),
            refresh_s: None,
            back: None,
        },
        path: uri.path().to_string(),
    };
    let mut response = render(&page);
    if response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NOT_FOUND;
    }
    response
}

/// The studio's stylesheet, `static/studio.css` (pages carry no inline style, so the
/// Content-Security-Policy needs no `'unsafe-inline'`).
pub(super) async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../../static/studio.css"),
    )
        .into_response()
}

/// The front page: compute targets, then the newest sweeps, pipelines and runs.
#[derive(Debug, Template)]
#[template(path = "studio/index.html", whitespace = "minimize")]
struct IndexPage {
    head: Head,
    user: String,
    csrf: String,
    computes: Vec<TargetCard>,
    gpus: Vec<GpuRow>,
    sweeps: Vec<SweepRow>,
    pipelines: Vec<PipelineRow>,
    runs: Vec<RunRow>,
    /// What the runs table is filtered on, in words (empty: nothing).
    runs_filter: String,
    /// The link to the next page of older runs, when there are more.
    older_runs: Option<String>,
    /// The table starts below the newest runs (a link back to them is shown).
    not_newest: bool,
}

/// The front page's query: which page of runs its table shows, filtered how. The table
/// pages on the server: `runs_page` is the page token of the previous page's "older runs"
/// link (muster-core's `paging`), so no page builds more than its own rows.
#[derive(Debug, Default, Deserialize, Serialize)]
pub(super) struct IndexQuery {
    /// Where the runs table starts (a page token; the newest runs without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    runs_page: Option<String>,
    /// Only runs of this experiment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    experiment: Option<String>,
    /// Only runs in this state (`running`, `failed`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<String>,
}

impl IndexQuery {
    /// The front page's address with this query (`/` without one).
    fn href(&self) -> String {
        match serde_urlencoded::to_string(self) {
            Ok(q) if !q.is_empty() => format!("/?{q}"),
            _ => "/".to_string(),
        }
    }
}

/// A 400 of the front page's query: plain text naming the parameter and what to send.
fn bad_query(what: &str, why: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        format!("{what}: {why}; the studio's front page (/) shows the newest runs\n"),
    )
        .into_response()
}

/// A sweep on the front page.
#[derive(Debug)]
struct SweepRow {
    id: String,
    name: String,
    state: String,
    goal: String,
    metric: String,
    done: usize,
    max_trials: u32,
    best: Option<BestTrial>,
    created: String,
}

/// A pipeline on the front page.
#[derive(Debug)]
struct PipelineRow {
    id: String,
    name: String,
    state: String,
    done: usize,
    steps: usize,
    created: String,
}

/// A run on the front page.
#[derive(Debug)]
struct RunRow {
    id: String,
    experiment: String,
    compute: String,
    state: &'static str,
    attempt: u32,
    exit: String,
    created: String,
}

impl RunRow {
    /// The row of `r`.
    fn of(r: &Run) -> Self {
        Self {
            id: r.id.clone(),
            experiment: r.spec.experiment.clone(),
            compute: r.spec.compute.clone(),
            state: r.state.as_str(),
            attempt: r.attempt_number(),
            exit: r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            created: ms(Some(r.created_at)),
        }
    }
}

/// `GET /` (with an [`IndexQuery`]: `/?runs_page=…&experiment=…&state=…`).
pub(super) async fn index(
    State(c): State<Arc<Server>>,
    viewer: Viewer,
    Query(query): Query<IndexQuery>,
) -> Response {
    let seen = &viewer.readable;
    let after = match PageToken::parse_opt(Listing::Runs, query.runs_page.as_deref().unwrap_or(""))
    {
        Ok(after) => after,
        Err(why) => return bad_query("runs_page", &why),
    };
    let state = match query
        .state
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(RunState::parse)
    {
        Some(Err(why)) => return bad_query("state", &why),
        Some(Ok(s)) => Some(s),
        None => None,
    };
    let filter = RunFilter {
        experiment: query.experiment.clone().filter(|e| !e.is_empty()),
        state,
        ..RunFilter::default()
    };
    let (computes, gpus, sweeps, pipelines) = c.coordinator.read(|s| {
        let computes: Vec<TargetCard> = s
            .computes
            .values()
            .filter(|t| seen.contains(&t.spec.workspace))
            .map(|t| TargetCard::of(s, t))
            .collect();
        let gpus = gpu_grid(s, seen);
        let sweeps: Vec<_> = s
            .sweeps_page(None, INDEX_ROWS, |w| seen.contains(sweep_workspace(w)))
            .map(|page| page.items.into_iter().cloned().collect())
            .unwrap_or_default();
        let pipelines: Vec<PipelineRow> = s
            .pipelines_page(None, INDEX_ROWS, |p| seen.contains(pipeline_workspace(p)))
            .map(|page| page.items)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let p = pipeline_to_wire(s, p);
                PipelineRow {
                    done: p
                        .steps
                        .iter()
                        .filter(|s| ended(&v1::StepState::word_of(s.state)))
                        .count(),
                    steps: p.steps.len(),
                    created: ms(Some(p.created_at_ms)),
                    name: p.display_name.unwrap_or_default(),
                    id: p.id,
                    state: v1::PipelineState::word_of(p.state).into_owned(),
                }
            })
            .collect();
        (computes, gpus, sweeps, pipelines)
    });
    // A sweep's view reads the metric store and then the state: outside the lock above.
    let sweeps = sweeps
        .iter()
        .map(|sweep| {
            let v = sweep_view(&c, sweep);
            SweepRow {
                done: v
                    .trials
                    .iter()
                    .filter(|t| ended(&v1::RunState::word_of(t.state)))
                    .count(),
                max_trials: v.max_total_trials,
                best: BestTrial::of(&v),
                created: ms(Some(v.created_at_ms)),
                name: v.display_name.unwrap_or_default(),
                id: v.id,
                state: v1::SweepState::word_of(v.state).into_owned(),
                goal: v.goal,
                metric: v.primary_metric,
            }
        })
        .collect();
    // One page of runs, newest first, filtered while the state pages: only its rows are built.
    let page = c.coordinator.read(|s| {
        s.runs_page(after.as_ref(), INDEX_ROWS, |r| {
            seen.contains(&r.spec.workspace) && filter.matches(r)
        })
        .map(|page| {
            let rows: Vec<RunRow> = page.items.into_iter().map(RunRow::of).collect();
            (rows, page.next)
        })
    });
    let (runs, next) = match page {
        Ok(page) => page,
        Err(why) => return bad_query("runs_page", &why),
    };
    let older_runs = next.map(|t| {
        IndexQuery {
            runs_page: Some(t.to_string()),
            experiment: filter.experiment.clone(),
            state: filter.state.map(|s| s.as_str().to_string()),
        }
        .href()
    });
    let runs_filter = [
        filter
            .experiment
            .as_ref()
            .map(|e| format!("experiment {e}")),
        filter.state.map(|s| format!("state {}", s.as_str())),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ");
    render(&IndexPage {
        head: Head {
            title: "muster studio".to_string(),
            refresh_s: Some(INDEX_REFRESH_S),
            back: None,
        },
        user: viewer.user,
        csrf: viewer.csrf,
        computes,
        gpus,
        sweeps,
        pipelines,
        runs,
        runs_filter,
        older_runs,
        not_newest: after.is_some(),
    })
}

/// A sweep: its settings, then its trials ranked by the primary metric (best first), as
/// the SweepService ranks them.
#[derive(Debug, Template)]
#[template(path = "studio/sweep.html", whitespace = "minimize")]
struct SweepPage {
    head: Head,
    name: Option<String>,
    state: String,
    /// Why it was canceled.
    canceled: Option<String>,
    experiment: String,
    compute: String,
    goal: String,
    metric: String,
    sampling: String,
    seed: u64,
    early_termination: String,
    max_trials: u32,
    max_concurrent: u32,
    timeout_s: u64,
    trial_timeout_s: Option<u64>,
    /// How many trials are over.
    done: usize,
    best: Option<BestTrial>,
    created: String,
    finished: String,
    /// Best first.
    trials: Vec<TrialRow>,
}

/// A sweep's trial, with its rank (1 is the best).
#[derive(Debug)]
struct TrialRow {
    rank: usize,
    index: u32,
    run_id: String,
    /// `name=value`, by name, space-separated.
    params: String,
    state: String,
    best: String,
    last: String,
    points: u64,
    note: String,
}

/// `GET /sweeps/{id}`.
pub(super) async fn sweep_page(
    State(c): State<Arc<Server>>,
    Path(id): Path<String>,
    viewer: Viewer,
) -> Response {
    let Some(sweep) = c
        .coordinator
        .read(|s| s.sweeps.get(&id).cloned())
        .filter(|w| viewer.readable.contains(sweep_workspace(w)))
    else {
        return not_found("sweep", &id, "sweeps");
    };
    let v = sweep_view(&c, &sweep);
    let live = matches!(
        v.state(),
        v1::SweepState::Running | v1::SweepState::Canceling
    );
    let trials = v
        .trials
        .iter()
        .enumerate()
        .map(|(rank, t)| {
            let mut params: Vec<_> = t.params.iter().collect();
            params.sort();
            let params: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            TrialRow {
                rank: rank + 1,
                index: t.index,
                run_id: t.run_id.clone(),
                params: params.join(" "),
                state: v1::RunState::word_of(t.state).into_owned(),
                best: number(t.best),
                last: number(t.last),
                points: t.points,
                note: sweep_trial_note(t),
            }
        })
        .collect();
    render(&SweepPage {
        head: Head::page(&v.id, live, "studio"),
        done: v
            .trials
            .iter()
            .filter(|t| ended(&v1::RunState::word_of(t.state)))
            .count(),
        best: BestTrial::of(&v),
        created: ms(Some(v.created_at_ms)),
        finished: ms(v.finished_at_ms),
        trial_timeout_s: sweep.spec.limits.trial_timeout_s,
        early_termination: v.early_termination.unwrap_or_else(|| "none".to_string()),
        name: v.display_name,
        state: v1::SweepState::word_of(v.state).into_owned(),
        canceled: v.message,
        experiment: v.experiment,
        compute: v.compute,
        goal: v.goal,
        metric: v.primary_metric,
        sampling: v.sampling,
        seed: v.seed,
        max_trials: v.max_total_trials,
        max_concurrent: v.max_concurrent_trials,
        timeout_s: v.timeout_s,
        trials,
    })
}

/// A pipeline: its steps in a topological order, each with its run (or the earlier run it
/// reused), where its inputs come from, and why it failed.
#[derive(Debug, Template)]
#[template(path = "studio/pipeline.html", whitespace = "minimize")]
struct PipelinePage {
    head: Head,
    name: String,
    state: String,
    experiment: String,
    /// How many steps are over.
    done: usize,
    created: String,
    finished: String,
    /// Why it was canceled.
    canceled: Option<String>,
    outputs: Vec<OutputRow>,
    steps: Vec<StepRow>,
}

/// A pipeline's output: the step output it is, and its identity once that step completed.
#[derive(Debug)]
struct OutputRow {
    name: String,
    step: String,
    output: String,
    /// `<archive sha256>/<folder>`, or empty.
    identity: String,
}

/// A pipeline's step.
#[derive(Debug)]
struct StepRow {
    name: String,
    state: String,
    compute: String,
    run_id: Option<String>,
    /// The earlier run whose outputs it reused (when it has no run of its own).
    reused_from: Option<String>,
    /// In the spec's order (by name).
    inputs: Vec<InputRow>,
    reason: String,
}

/// A step's input and where it comes from.
#[derive(Debug)]
struct InputRow {
    name: String,
    source: InputSource,
}

/// Where a step's input comes from.
#[derive(Debug)]
enum InputSource {
    /// An upstream step's output, and what was mounted (archive/folder) once known.
    Output {
        step: String,
        output: String,
        mounted: Option<String>,
    },
    /// A literal value.
    Value { value: String },
}

/// `GET /pipelines/{id}`.
pub(super) async fn pipeline_page(
    State(c): State<Arc<Server>>,
    Path(id): Path<String>,
    viewer: Viewer,
) -> Response {
    let Some((p, spec)) = c.coordinator.read(|s| {
        s.pipelines
            .get(&id)
            .filter(|p| viewer.readable.contains(pipeline_workspace(p)))
            .map(|p| (pipeline_to_wire(s, p), p.spec.clone()))
    }) else {
        return not_found("pipeline", &id, "pipelines");
    };
    let live = matches!(
        p.state(),
        v1::PipelineState::Running | v1::PipelineState::Canceling
    );
    let steps = p
        .steps
        .iter()
        .map(|step| {
            let inputs = spec
                .steps
                .get(&step.name)
                .map(|s| {
                    s.inputs
                        .iter()
                        .map(|(name, input)| InputRow {
                            name: name.clone(),
                            source: match input {
                                StepInput::StepOutput { step: from, output } => {
                                    InputSource::Output {
                                        step: from.clone(),
                                        output: output.clone(),
                                        mounted: step.inputs.get(name).cloned(),
                                    }
                                }
                                StepInput::Value { value } => InputSource::Value {
                                    value: value.clone(),
                                },
                            },
                        })
                        .collect()
                })
                .unwrap_or_default();
            StepRow {
                name: step.name.clone(),
                state: v1::StepState::word_of(step.state).into_owned(),
                compute: step.compute.clone(),
                run_id: step.run_id.clone(),
                reused_from: step.reused_from.clone(),
                inputs,
                reason: step.reason.clone().unwrap_or_default(),
            }
        })
        .collect();
    render(&PipelinePage {
        head: Head::page(&p.id, live, "studio"),
        done: p
            .steps
            .iter()
            .filter(|s| ended(&v1::StepState::word_of(s.state)))
            .count(),
        created: ms(Some(p.created_at_ms)),
        finished: ms(p.finished_at_ms),
        name: p.display_name.unwrap_or_default(),
        state: v1::PipelineState::word_of(p.state).into_owned(),
        experiment: p.experiment,
        canceled: p.cancel_reason,
        outputs: p
            .outputs
            .into_iter()
            .map(|o| OutputRow {
                name: o.name,
                step: o.step,
                output: o.output,
                identity: o.identity.unwrap_or_default(),
            })
            .collect(),
        steps,
    })
}

/// A run: its spec and state, the sweep or pipeline it belongs to, its metrics, and each
/// attempt with its nodes and log.
#[derive(Debug, Template)]
#[template(path = "studio/run.html", whitespace = "minimize")]
struct RunPage {
    head: Head,
    state: &'static str,
    experiment: String,
    compute: String,
    command: String,
    exit_code: String,
    message: String,
    created: String,
    started: String,
    finished: String,
    /// The sweep and the pipeline it is part of.
    owners: Vec<Owner>,
    /// None when the run logged no metrics.
    metrics: Option<MetricsSection>,
    attempts: Vec<AttemptSection>,
    /// Still waiting to be placed.
    queued: bool,
    /// Why it waits, when the last scheduling pass said (empty otherwise).
    waiting: String,
}

/// A sweep or pipeline a run is part of.
#[derive(Debug)]
struct Owner {
    /// `sweep` or `pipeline`.
    kind: &'static str,
    /// Where its pages are: `sweeps` or `pipelines`.
    page: &'static str,
    id: String,
}

/// The last value of each metric a run logged (as `muster run show` prints them).
#[derive(Debug)]
struct MetricsSection {
    /// Why the metrics cannot be read now (then there is nothing else).
    error: Option<String>,
    last: Vec<LastValue>,
    /// How many lines were skipped as malformed, and why the last one was.
    malformed: u64,
    last_error: String,
}

/// A metric's last value, at its step.
#[derive(Debug)]
struct LastValue {
    name: String,
    step: u64,
    value: f64,
}

/// An attempt's nodes (one per rank), how it ended, and its log.
#[derive(Debug)]
struct AttemptSection {
    number: u32,
    /// Each node (with its rank in a gang, and its GPUs), `; `-separated.
    nodes: String,
    /// `end` once it ended, else `state`.
    state_label: &'static str,
    state: String,
    exit_code: Option<i32>,
    reason: Option<String>,
    placed: String,
    started: String,
    finished: String,
    /// The checkpoint it started from, as `muster run show` says it.
    resumed: Option<String>,
    /// Its ranks' output, combined.
    log: String,
    /// What of the log the page leaves out, and how to read it whole.
    log_note: Option<String>,
}

/// `GET /runs/{id}`.
pub(super) async fn run_page(
    State(c): State<Arc<Server>>,
    Path(id): Path<String>,
    viewer: Viewer,
) -> Response {
    let live = c
        .coordinator
        .read(|s| s.runs.get(&id).map(|r| (r.clone(), run_to_wire(s, r))));
    // A run retention archived is shown from its archive, to the same viewers.
    let found = match live {
        Some(found) => Some(found),
        None => match c.archived.find(&c, &id).await {
            Ok(Some((run, archive))) => {
                let wire = crate::views::runs::archived(&c, &run, archive);
                Some((run, wire))
            }
            _ => None,
        },
    };
    let Some((run, wire)) = found.filter(|(r, _)| viewer.readable.contains(&r.spec.workspace))
    else {
        return not_found("run", &id, "runs");
    };
    let owners = [("muster.sweep", "sweep"), ("muster.pipeline", "pipeline")]
        .into_iter()
        .filter_map(|(tag, kind)| {
            Some(Owner {
                kind,
                page: if kind == "sweep" {
                    "sweeps"
                } else {
                    "pipelines"
                },
                id: run.spec.tags.get(tag)?.clone(),
            })
        })
        .collect();
    let metrics = metrics_section(&c, &run.id).await;
    let mut attempts = Vec::with_capacity(wire.attempts.len());
    for a in &wire.attempts {
        let log = combined_log(&c, &run, a.number).await;
        let note = log.left_out.map(|n| {
            let (what, ranks) = if a.placements.len() > 1 {
                ("The log goes on", "after these lines")
            } else {
                ("The log starts", "before these lines")
            };
            format!(
                "{what} with {} more {ranks}: `muster run logs {} --attempt {}` prints it whole.",
                muster_core::state::human_bytes(n),
                run.id,
                a.number
            )
        });
        let mut section = attempt_section(a, String::from_utf8_lossy(&log.bytes).into_owned());
        section.log_note = note;
        attempts.push(section);
    }
    render(&RunPage {
        head: Head::page(&run.id, !run.state.is_terminal(), "runs"),
        state: run.state.as_str(),
        experiment: run.spec.experiment.clone(),
        compute: run.spec.compute.clone(),
        command: run.spec.command.clone(),
        exit_code: run.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        message: run.message.clone().unwrap_or_default(),
        created: ms(Some(run.created_at)),
        started: ms(run.started_at),
        finished: ms(run.finished_at),
        owners,
        metrics,
        attempts,
        queued: run.state == RunState::Queued,
        // The scheduler's own reason (the leader's last pass), as `run show` gives it.
        waiting: c.waiting.reason(&run).unwrap_or_default(),
    })
}

/// A run's metrics, read as the MetricsService reads them: sealed once the run ended, else
/// live (from the leader). None when it logged none (and no malformed line).
async fn metrics_section(c: &Server, run_id: &str) -> Option<MetricsSection> {
    let req = v1::GetRunMetricsRequest {
        run_id: run_id.to_string(),
        last_only: true,
        ..Default::default()
    };
    let m = match run_metrics(c, &req, false).await {
        Ok(m) => m,
        Err(e) => {
            return Some(MetricsSection {
                error: Some(e.message().to_string()),
                last: Vec::new(),
                malformed: 0,
                last_error: String::new(),
            });
        }
    };
    let last: Vec<LastValue> = m
        .series
        .iter()
        .filter_map(|s| {
            Some(LastValue {
                name: s.name.clone(),
                step: *s.steps.last()?,
                value: *s.values.last()?,
            })
        })
        .collect();
    if last.is_empty() && m.malformed == 0 {
        return None;
    }
    Some(MetricsSection {
        error: None,
        last,
        malformed: m.malformed,
        last_error: m.last_error.unwrap_or_default(),
    })
}

/// An attempt as `muster run show` lists it, with its `log`.
fn attempt_section(a: &v1::Attempt, log: String) -> AttemptSection {
    let nodes: Vec<String> = a
        .placements
        .iter()
        .enumerate()
        .map(|(rank, p)| {
            let name = if p.node_name.is_empty() {
                &p.node_id
            } else {
                &p.node_name
            };
            let gpus = if p.gpus.is_empty() {
                String::new()
            } else {
                format!(" (GPUs {})", p.gpus.join(", "))
            };
            let rank = if a.placements.len() > 1 {
                format!("rank {rank}: ")
            } else {
                String::new()
            };
            format!("{rank}{name}{gpus}")
        })
        .collect();
    let over = a.end != i32::from(v1::AttemptEnd::Unspecified);
    AttemptSection {
        number: a.number,
        nodes: nodes.join("; "),
        state_label: if over { "end" } else { "state" },
        state: if over {
            v1::AttemptEnd::word_of(a.end).into_owned()
        } else {
            v1::AttemptState::word_of(a.state).into_owned()
        },
        exit_code: a.exit_code,
        reason: a.message.clone(),
        placed: ms(Some(a.placed_at_ms)),
        started: ms(a.started_at_ms),
        finished: ms(a.finished_at_ms),
        resumed: a.resumed_from.as_ref().map(|c| {
            let taken = muster_proto::decode_enum::<
                v1::CheckpointCause,
                muster_core::state::CheckpointCause,
            >(c.cause)
            .map_or("taken", |cause| cause.describe());
            format!(
                "from the checkpoint of attempt {} ({} file{}, {}, {taken})",
                c.attempt,
                c.files,
                if c.files == 1 { "" } else { "s" },
                muster_core::state::human_bytes(c.bytes)
            )
        }),
        log,
        log_note: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished run page whose spec, message, metric and log carry `text`.
    fn run_page_with(text: &str) -> RunPage {
        RunPage {
            head: Head::page("run-1", false, "runs"),
            state: "completed",
            experiment: text.to_string(),
            compute: "local".to_string(),
            command: format!("echo '{text}'"),
            exit_code: "0".to_string(),
            message: text.to_string(),
            created: ms(Some(0)),
            started: ms(Some(1_000)),
            finished: ms(Some(2_000)),
            owners: vec![Owner {
                kind: "sweep",
                page: "sweeps",
                id: "sweep-1".to_string(),
            }],
            metrics: Some(MetricsSection {
                error: None,
                last: vec![LastValue {
                    name: text.to_string(),
                    step: 3,
                    value: 0.96,
                }],
                malformed: 0,
                last_error: String::new(),
            }),
            attempts: vec![AttemptSection {
                number: 1,
                nodes: "node-a (GPUs 0, 1)".to_string(),
                state_label: "end",
                state: "completed".to_string(),
                exit_code: Some(0),
                reason: None,
                placed: ms(Some(500)),
                started: ms(Some(1_000)),
                finished: ms(Some(2_000)),
                resumed: Some(
                    "from the checkpoint of attempt 1 (1 file, 3 B, taken when preempted)".into(),
                ),
                log: format!("{text}\n"),
                log_note: None,
            }],
            queued: false,
            waiting: String::new(),
        }
    }

    #[test]
    fn run_text_with_a_script_is_rendered_escaped() {
        let html = run_page_with("<script>alert(\"hi\") & 'bye'</script>")
            .render()
            .unwrap();
        assert!(!html.contains("<script>"), "{html}");
        let escaped = "&#60;script&#62;alert(&#34;hi&#34;) &#38; &#39;bye&#39;&#60;/script&#62;";
        for shown in [
            format!("<th>experiment</th><td>{escaped}</td>"),
            format!("<th>message</th><td>{escaped}</td>"),
            format!("<code>echo &#39;{escaped}&#39;</code>"),
            format!("<tr class=metric><td>{escaped}</td><td>0.96</td><td>3</td></tr>"),
            format!("<pre>{escaped}\n</pre>"),
        ] {
            assert!(html.contains(&shown), "{shown} in {html}");
        }
    }

    #[test]
    fn run_page_shows_its_owner_and_attempts() {
        let html = run_page_with("exp").render().unwrap();
        assert!(
            html.starts_with(
                "<!doctype html><html><head><meta charset=utf-8><title>run-1</title>\
                 <link rel=stylesheet href=/static/studio.css></head>"
            ),
            "a finished run does not reload: {html}"
        );
        assert!(
            html.contains("<body><p><a href=\"/\">← runs</a></p><h1>run-1</h1>"),
            "{html}"
        );
        assert!(
            html.contains(
                "<tr><th>sweep</th><td><a href=\"/sweeps/sweep-1\">sweep-1</a></td></tr>"
            ),
            "{html}"
        );
        assert!(
            html.contains("<h2>Metrics</h2><table><tr><th>metric</th>"),
            "{html}"
        );
        assert!(html.contains("<h2>Attempt 1</h2><table class=attempt><tr><th>nodes</th><td>node-a (GPUs 0, 1)</td></tr>"), "{html}");
        assert!(
            html.contains("<tr><th>end</th><td class=completed>completed (exit 0)</td></tr>"),
            "{html}"
        );
        assert!(
            html.contains("<tr><th>resumed</th><td>from the checkpoint of attempt 1 (1 file, 3 B, taken when preempted)</td></tr>"),
            "{html}"
        );
        assert!(
            !html.contains("reason") && !html.contains("Waiting for placement"),
            "{html}"
        );
        assert!(html.ends_with("</body></html>"), "{html}");
    }

    #[test]
    fn index_lists_sweeps_pipelines_and_runs() {
        let empty = IndexPage {
            head: Head {
                title: "muster studio".to_string(),
                refresh_s: Some(INDEX_REFRESH_S),
                back: None,
            },
            user: "admin".into(),
            csrf: "c0ffee".into(),
            computes: Vec::new(),
            gpus: Vec::new(),
            sweeps: Vec::new(),
            pipelines: Vec::new(),
            runs: Vec::new(),
            runs_filter: String::new(),
            older_runs: None,
            not_newest: false,
        };
        let html = empty.render().unwrap();
        assert!(html.starts_with("<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5><title>muster studio</title>"), "{html}");
        assert!(
            html.contains("<body><h1>muster studio</h1>"),
            "no way back from the front page: {html}"
        );
        assert!(
            html.contains("No sweeps yet") && html.contains("No pipelines yet"),
            "{html}"
        );
        let full = IndexPage {
            computes: vec![TargetCard {
                name: "gpu-pool".to_string(),
                kind: "cluster",
                tier: "dedicated",
                size: String::new(),
                provisioner: "docker",
                nodes: "2 ready".to_string(),
                gpus_used: 3,
                gpus: 8,
                queued: 5,
                active: 2,
                stopped: false,
            }],
            gpus: vec![GpuRow {
                compute: "gpu-pool".to_string(),
                node: "muster-gpu-pool-0".to_string(),
                cells: vec![
                    super::super::compute::GpuCell {
                        uuid: "GPU-1".to_string(),
                        model: "H200".to_string(),
                        memory: "139.8 GiB".to_string(),
                        run: Some("run-7".to_string()),
                    },
                    super::super::compute::GpuCell {
                        uuid: "GPU-2".to_string(),
                        model: "H200".to_string(),
                        memory: "139.8 GiB".to_string(),
                        run: None,
                    },
                ],
            }],
            sweeps: vec![SweepRow {
                id: "sweep-1".to_string(),
                name: "<b>lr</b>".to_string(),
                state: "completed".to_string(),
                goal: "maximize".to_string(),
                metric: "accuracy".to_string(),
                done: 8,
                max_trials: 8,
                best: Some(BestTrial {
                    index: 2,
                    run_id: "run-2".to_string(),
                    value: "0.96".to_string(),
                }),
                created: ms(Some(0)),
            }],
            pipelines: vec![PipelineRow {
                id: "pl-1".to_string(),
                name: String::new(),
                state: "failed".to_string(),
                done: 4,
                steps: 4,
                created: ms(Some(0)),
            }],
            ..empty
        };
        let html = full.render().unwrap();
        assert!(
            html.contains("<div class=card><h3><a href=\"/compute/gpu-pool\">gpu-pool</a></h3><p>cluster, dedicated</p><p>nodes: 2 ready</p><p>GPUs: 3 used, 5 free</p><p>runs: 5 queued, 2 active</p></div>"),
            "{html}"
        );
        assert!(
            html.contains("<tr><td>gpu-pool</td><td>muster-gpu-pool-0</td><td><span class=gpu title=\"H200 139.8 GiB GPU-1\"><a href=\"/runs/run-7\">run-7</a></span> <span class=gpu title=\"H200 139.8 GiB GPU-2\">free</span> </td></tr>"),
            "{html}"
        );
        assert!(html.contains("<tr class=sweep><td><a href=\"/sweeps/sweep-1\">sweep-1</a></td><td>&#60;b&#62;lr&#60;/b&#62;</td><td class=completed>completed</td><td>maximize accuracy</td><td>8/8</td><td>trial 2 (<a href=\"/runs/run-2\">run-2</a>) 0.96</td><td>1970-01-01T00:00:00Z</td></tr>"), "{html}");
        assert!(html.contains("<tr class=pipeline><td><a href=\"/pipelines/pl-1\">pl-1</a></td><td></td><td class=failed>failed</td><td>4/4</td>"), "{html}");
        assert!(
            !html.contains("No sweeps yet") && !html.contains("No pipelines yet"),
            "{html}"
        );
    }

    #[test]
    fn the_runs_table_links_to_older_runs_with_its_filter() {
        let query = IndexQuery {
            runs_page: Some("runs.200".into()),
            experiment: Some("a b&c".into()),
            state: Some("running".into()),
        };
        assert_eq!(
            query.href(),
            "/?runs_page=runs.200&experiment=a+b%26c&state=running"
        );
        assert_eq!(IndexQuery::default().href(), "/");
        let page = IndexPage {
            head: Head {
                title: "muster studio".to_string(),
                refresh_s: Some(INDEX_REFRESH_S),
                back: None,
            },
            user: "admin".into(),
            csrf: "c0ffee".into(),
            computes: Vec::new(),
            gpus: Vec::new(),
            sweeps: Vec::new(),
            pipelines: Vec::new(),
            runs: vec![RunRow {
                id: "run-1".into(),
                experiment: "a b&c".into(),
                compute: "local".into(),
                state: "running",
                attempt: 1,
                exit: String::new(),
                created: ms(Some(0)),
            }],
            runs_filter: "experiment a b&c, state running".into(),
            older_runs: Some(query.href()),
            not_newest: true,
        };
        let html = page.render().unwrap();
        assert!(
            html.contains("<p class=more><a href=\"/?runs_page=runs.200&#38;experiment=a+b%26c&#38;state=running\">older runs →</a></p>"),
            "{html}"
        );
        assert!(
            html.contains("<p class=filter>Only runs of experiment a b&#38;c, state running (<a href=\"/\">every run</a>).</p>"),
            "{html}"
        );
        assert!(
            html.contains("<p class=more><a href=\"/\">← the newest runs</a></p>"),
            "{html}"
        );
        let newest = IndexPage {
            older_runs: None,
            not_newest: false,
            runs_filter: String::new(),
            ..page
        };
        let html = newest.render().unwrap();
        assert!(
            !html.contains("older runs")
                && !html.contains("the newest runs")
                && !html.contains("Only runs of"),
            "{html}"
        );
    }

    #[test]
    fn sweep_page_ranks_trials() {
        let page = SweepPage {
            head: Head::page("sweep-1", true, "studio"),
            name: None,
            state: "running".to_string(),
            canceled: None,
            experiment: "exp".to_string(),
            compute: "local".to_string(),
            goal: "maximize".to_string(),
            metric: "accuracy".to_string(),
            sampling: "grid".to_string(),
            seed: 7,
            early_termination: "none".to_string(),
            max_trials: 8,
            max_concurrent: 2,
            timeout_s: 600,
            trial_timeout_s: Some(60),
            done: 1,
            best: None,
            created: ms(Some(0)),
            finished: String::new(),
            trials: vec![TrialRow {
                rank: 1,
                index: 3,
                run_id: "run-3".to_string(),
                params: "lr=0.3 q=0.9".to_string(),
                state: "completed".to_string(),
                best: "0.9".to_string(),
                last: "0.8".to_string(),
                points: 3,
                note: String::new(),
            }],
        };
        let html = page.render().unwrap();
        assert!(
            html.contains(
                "<meta charset=utf-8><meta http-equiv=refresh content=2><title>sweep-1</title>"
            ),
            "a running sweep reloads: {html}"
        );
        assert!(
            !html.contains("<th>name</th>") && !html.contains("<th>canceled</th>"),
            "{html}"
        );
        assert!(
            html.contains("<tr><th>sampling</th><td>grid (seed 7)</td></tr>"),
            "{html}"
        );
        assert!(html.contains("<tr><th>limits</th><td>8 trials at most, 2 at once; the sweep times out after 600 s, each trial after 60 s</td></tr>"), "{html}");
        assert!(
            html.contains("<tr><th>trials</th><td>1 started, 1 done</td></tr>"),
            "{html}"
        );
        assert!(
            html.contains("<tr><th>best trial</th><td>-</td></tr>"),
            "{html}"
        );
        assert!(
            html.contains("<th>best accuracy</th><th>last accuracy</th>"),
            "{html}"
        );
        assert!(html.contains("<tr class=trial><td>1</td><td>3</td><td><a href=\"/runs/run-3\">run-3</a></td><td>lr=0.3 q=0.9</td><td class=completed>completed</td><td>0.9</td><td>0.8</td><td>3</td><td></td></tr>"), "{html}");
    }

    #[test]
    fn pipeline_page_shows_steps_and_inputs() {
        let page = PipelinePage {
            head: Head::page("pl-1", false, "studio"),
            name: "train".to_string(),
            state: "completed".to_string(),
            experiment: "exp".to_string(),
            done: 2,
            created: ms(Some(0)),
            finished: ms(Some(1_000)),
            canceled: None,
            outputs: vec![OutputRow {
                name: "model".to_string(),
                step: "b".to_string(),
                output: "out".to_string(),
                identity: "abc/out".to_string(),
            }],
            steps: vec![
                StepRow {
                    name: "a".to_string(),
                    state: "reused".to_string(),
                    compute: "cpu-pool".to_string(),
                    run_id: None,
                    reused_from: Some("run-0".to_string()),
                    inputs: vec![InputRow {
                        name: "n".to_string(),
                        source: InputSource::Value {
                            value: "3".to_string(),
                        },
                    }],
                    reason: String::new(),
                },
                StepRow {
                    name: "b".to_string(),
                    state: "completed".to_string(),
                    compute: "cpu-pool".to_string(),
                    run_id: Some("run-2".to_string()),
                    reused_from: None,
                    inputs: vec![
                        InputRow {
                            name: "data".to_string(),
                            source: InputSource::Output {
                                step: "a".to_string(),
                                output: "out".to_string(),
                                mounted: Some("def/out".to_string()),
                            },
                        },
                        InputRow {
                            name: "seed".to_string(),
                            source: InputSource::Value {
                                value: "1".to_string(),
                            },
                        },
                    ],
                    reason: String::new(),
                },
            ],
        };
        let html = page.render().unwrap();
        assert!(
            html.contains("<tr><th>steps done</th><td>2/2</td></tr>"),
            "{html}"
        );
        assert!(
            html.contains("<tr><th>output model</th><td>b.out abc/out</td></tr>"),
            "{html}"
        );
        assert!(html.contains("<tr class=step><td>a</td><td class=reused>reused</td><td>cpu-pool</td><td>reused from <a href=\"/runs/run-0\">run-0</a></td><td>n = 3</td><td></td></tr>"), "{html}");
        assert!(html.contains("<tr class=step><td>b</td><td class=completed>completed</td><td>cpu-pool</td><td><a href=\"/runs/run-2\">run-2</a></td><td>data ← a.out <small>(def/out)</small><br>seed = 1</td><td></td></tr>"), "{html}");
    }
}
