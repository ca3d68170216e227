//! muster studio: server-rendered pages of compute targets, runs (with their logs, metrics
//! and nodes), sweeps (trials ranked by the primary metric) and pipelines (steps and their
//! inputs). Read from this server's replica; live pages reload themselves.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use muster_core::RunState;
use muster_core::pipeline::StepInput;
use muster_proto::v1;
use muster_proto::{Word, pipeline_to_wire, run_to_wire, sweep_trial_note};

use crate::server::Server;
use crate::views::logs::combined_log;
use crate::views::metrics::run_metrics;
use crate::views::sweeps::sweep_view;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ms(t: Option<u64>) -> String {
    t.map(|t| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(t))
            .to_string()
    })
    .unwrap_or_default()
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}.completed{color:#176f2c}.failed,.timed_out{color:#b00020}.running{color:#0b57d0}.canceled,.canceling{color:#777}.reused{color:#176f2c}.pending,.queued{color:#555}pre{background:#f6f8fa;padding:1em;overflow:auto}";

/// Most sweeps, pipelines and runs the index lists (the newest).
const INDEX_ROWS: usize = 200;

/// A link to a run's page.
fn run_link(id: &str) -> String {
    format!("<a href=\"/runs/{id}\">{id}</a>", id = esc(id))
}

/// Whether a run, sweep trial or pipeline step (by its state word) is over.
fn ended(state: &str) -> bool {
    state == "reused" || RunState::parse(state).is_ok_and(RunState::is_terminal)
}

/// A metric value as `muster` prints it.
fn number(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_string())
}

/// A sweep's best trial and its value, as `muster sweep show` names it.
fn best_text(s: &v1::Sweep) -> String {
    s.best_trial
        .and_then(|b| s.trials.iter().find(|t| t.index == b))
        .map(|t| {
            format!(
                "trial {} ({}) {}",
                t.index,
                run_link(&t.run_id),
                esc(&number(t.best))
            )
        })
        .unwrap_or_else(|| "-".to_string())
}

fn page_head(title: &str, live: bool, back: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=utf-8>{}<title>{t}</title><style>{STYLE}</style></head><body><p><a href=\"/\">← {back}</a></p><h1>{t}</h1>",
        if live {
            "<meta http-equiv=refresh content=2>"
        } else {
            ""
        },
        t = esc(title),
    )
}

fn not_found(what: &str, id: &str, list: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("{what} {id} does not exist: the studio's front page (/) lists the {list}\n"),
    )
        .into_response()
}

pub(super) async fn index(State(c): State<Arc<Server>>) -> Html<String> {
    let mut html = format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5><title>muster studio</title><style>{STYLE}</style></head><body><h1>muster studio</h1>"
    );
    let (mut sweeps, pipelines) = c.coordinator.read(|s| {
        let _ = write!(
            html,
            "<h2>Compute targets</h2><table><tr><th>name</th><th>type</th><th>nodes</th></tr>"
        );
        for t in s.computes.values() {
            let nodes = s
                .nodes
                .values()
                .filter(|n| n.compute == t.spec.name)
                .count();
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{nodes}</td></tr>",
                esc(&t.spec.name),
                t.spec.kind.as_str()
            );
        }
        html.push_str("</table>");
        let mut sweeps: Vec<_> = s.sweeps.values().collect();
        sweeps.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        let sweeps: Vec<_> = sweeps.into_iter().take(INDEX_ROWS).cloned().collect();
        let mut pipelines: Vec<_> = s.pipelines.values().collect();
        pipelines.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        let pipelines: Vec<v1::Pipeline> = pipelines
            .into_iter()
            .take(INDEX_ROWS)
            .map(|p| pipeline_to_wire(s, p))
            .collect();
        (sweeps, pipelines)
    });
    // A sweep's view reads the metric store and then the state: outside the lock above.
    html.push_str("<h2>Sweeps</h2>");
    if sweeps.is_empty() {
        html.push_str("<p>No sweeps yet (<code>muster sweep submit</code>).</p>");
    } else {
        html.push_str("<table><tr><th>id</th><th>name</th><th>state</th><th>objective</th><th>trials done</th><th>best trial</th><th>created</th></tr>");
        for sweep in sweeps.drain(..) {
            let v = sweep_view(&c, &sweep);
            let done = v
                .trials
                .iter()
                .filter(|t| ended(&v1::RunState::word_of(t.state)))
                .count();
            let _ = write!(
                html,
                "<tr class=sweep><td><a href=\"/sweeps/{id}\">{id}</a></td><td>{}</td><td class={st}>{st}</td><td>{} {}</td><td>{done}/{}</td><td>{}</td><td>{}</td></tr>",
                esc(v.display_name.as_deref().unwrap_or("")),
                esc(&v.goal),
                esc(&v.primary_metric),
                v.max_total_trials,
                best_text(&v),
                ms(Some(v.created_at_ms)),
                id = esc(&v.id),
                st = esc(&v1::SweepState::word_of(v.state)),
            );
        }
        html.push_str("</table>");
    }
    html.push_str("<h2>Pipelines</h2>");
    if pipelines.is_empty() {
        html.push_str("<p>No pipelines yet (<code>muster pipeline submit</code>).</p>");
    } else {
        html.push_str("<table><tr><th>id</th><th>name</th><th>state</th><th>steps done</th><th>created</th></tr>");
        for p in &pipelines {
            let done = p
                .steps
                .iter()
                .filter(|s| ended(&v1::StepState::word_of(s.state)))
                .count();
            let _ = write!(
                html,
                "<tr class=pipeline><td><a href=\"/pipelines/{id}\">{id}</a></td><td>{}</td><td class={st}>{st}</td><td>{done}/{}</td><td>{}</td></tr>",
                esc(p.display_name.as_deref().unwrap_or("")),
                p.steps.len(),
                ms(Some(p.created_at_ms)),
                id = esc(&p.id),
                st = esc(&v1::PipelineState::word_of(p.state)),
            );
        }
        html.push_str("</table>");
    }
    c.coordinator.read(|s| {
        let _ = write!(html, "<h2>Runs</h2><table><tr><th>id</th><th>experiment</th><th>compute</th><th>state</th><th>attempt</th><th>exit</th><th>created</th></tr>");
        let mut runs: Vec<_> = s.runs.values().collect();
        runs.sort_by_key(|r| std::cmp::Reverse(r.seq));
        for r in runs.into_iter().take(INDEX_ROWS) {
            let _ = write!(
                html,
                "<tr><td><a href=\"/runs/{id}\">{id}</a></td><td>{}</td><td>{}</td><td class={st}>{st}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&r.spec.experiment),
                esc(&r.spec.compute),
                r.attempt_number(),
                r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                ms(Some(r.created_at)),
                id = esc(&r.id),
                st = r.state.as_str(),
            );
        }
        html.push_str("</table>");
    });
    html.push_str("</body></html>");
    Html(html)
}

/// A sweep: its settings, then its trials ranked by the primary metric (best first), as
/// the SweepService ranks them.
pub(super) async fn sweep_page(State(c): State<Arc<Server>>, Path(id): Path<String>) -> Response {
    let Some(sweep) = c.coordinator.read(|s| s.sweeps.get(&id).cloned()) else {
        return not_found("sweep", &id, "sweeps");
    };
    let v = sweep_view(&c, &sweep);
    let live = matches!(
        v.state(),
        v1::SweepState::Running | v1::SweepState::Canceling
    );
    let mut html = page_head(&v.id, live, "studio");
    let row = |html: &mut String, k: &str, v: String| {
        let _ = write!(html, "<tr><th>{k}</th><td>{v}</td></tr>");
    };
    html.push_str("<table>");
    if let Some(n) = &v.display_name {
        row(&mut html, "name", esc(n));
    }
    row(
        &mut html,
        "state",
        format!(
            "<span class={st}>{st}</span>",
            st = esc(&v1::SweepState::word_of(v.state))
        ),
    );
    if let Some(m) = &v.message {
        row(&mut html, "canceled", esc(m));
    }
    row(&mut html, "experiment", esc(&v.experiment));
    row(&mut html, "compute", esc(&v.compute));
    row(
        &mut html,
        "objective",
        format!("{} {}", esc(&v.goal), esc(&v.primary_metric)),
    );
    row(
        &mut html,
        "sampling",
        format!("{} (seed {})", esc(&v.sampling), v.seed),
    );
    row(
        &mut html,
        "early termination",
        esc(v.early_termination.as_deref().unwrap_or("none")),
    );
    row(
        &mut html,
        "limits",
        format!(
            "{} trials at most, {} at once; the sweep times out after {} s{}",
            v.max_total_trials,
            v.max_concurrent_trials,
            v.timeout_s,
            sweep
                .spec
                .limits
                .trial_timeout_s
                .map(|t| format!(", each trial after {t} s"))
                .unwrap_or_default()
        ),
    );
    row(
        &mut html,
        "trials",
        format!(
            "{} started, {} done",
            v.trials.len(),
            v.trials
                .iter()
                .filter(|t| ended(&v1::RunState::word_of(t.state)))
                .count()
        ),
    );
    row(&mut html, "best trial", best_text(&v));
    row(&mut html, "created", ms(Some(v.created_at_ms)));
    row(&mut html, "finished", ms(v.finished_at_ms));
    html.push_str("</table><h2>Trials</h2>");
    if v.trials.is_empty() {
        html.push_str("<p>No trials yet.</p>");
    } else {
        let _ = write!(
            html,
            "<table><tr><th>rank</th><th>trial</th><th>run</th><th>parameters</th><th>state</th><th>best {m}</th><th>last {m}</th><th>points</th><th>note</th></tr>",
            m = esc(&v.primary_metric)
        );
        for (rank, t) in v.trials.iter().enumerate() {
            let mut params: Vec<_> = t.params.iter().collect();
            params.sort();
            let params: Vec<String> = params
                .iter()
                .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
                .collect();
            let _ = write!(
                html,
                "<tr class=trial><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class={st}>{st}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                rank + 1,
                t.index,
                run_link(&t.run_id),
                params.join(" "),
                esc(&number(t.best)),
                esc(&number(t.last)),
                t.points,
                esc(&sweep_trial_note(t)),
                st = esc(&v1::RunState::word_of(t.state)),
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>");
    Html(html).into_response()
}

/// A pipeline: its steps in a topological order, each with its run (or the earlier run it
/// reused), where its inputs come from, and why it failed.
pub(super) async fn pipeline_page(
    State(c): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Response {
    let Some((p, spec)) = c.coordinator.read(|s| {
        s.pipelines
            .get(&id)
            .map(|p| (pipeline_to_wire(s, p), p.spec.clone()))
    }) else {
        return not_found("pipeline", &id, "pipelines");
    };
    let live = matches!(
        p.state(),
        v1::PipelineState::Running | v1::PipelineState::Canceling
    );
    let mut html = page_head(&p.id, live, "studio");
    let _ = write!(
        html,
        "<table><tr><th>name</th><td>{}</td></tr><tr><th>state</th><td class={st}>{st}</td></tr><tr><th>experiment</th><td>{}</td></tr><tr><th>steps done</th><td>{}/{}</td></tr><tr><th>created</th><td>{}</td></tr><tr><th>finished</th><td>{}</td></tr>",
        esc(p.display_name.as_deref().unwrap_or("")),
        esc(&p.experiment),
        p.steps
            .iter()
            .filter(|s| ended(&v1::StepState::word_of(s.state)))
            .count(),
        p.steps.len(),
        ms(Some(p.created_at_ms)),
        ms(p.finished_at_ms),
        st = esc(&v1::PipelineState::word_of(p.state)),
    );
    if let Some(r) = &p.cancel_reason {
        let _ = write!(html, "<tr><th>canceled</th><td>{}</td></tr>", esc(r));
    }
    for o in &p.outputs {
        let _ = write!(
            html,
            "<tr><th>output {}</th><td>{}.{} {}</td></tr>",
            esc(&o.name),
            esc(&o.step),
            esc(&o.output),
            esc(o.identity.as_deref().unwrap_or("")),
        );
    }
    html.push_str("</table><h2>Steps</h2><table><tr><th>step</th><th>state</th><th>compute</th><th>run</th><th>inputs</th><th>reason</th></tr>");
    for step in &p.steps {
        let run = match (&step.run_id, &step.reused_from) {
            (Some(r), _) => run_link(r),
            (None, Some(from)) => format!("reused from {}", run_link(from)),
            (None, None) => String::new(),
        };
        let inputs: Vec<String> = spec
            .steps
            .get(&step.name)
            .map(|s| {
                s.inputs
                    .iter()
                    .map(|(name, input)| {
                        let mounted = step
                            .inputs
                            .get(name)
                            .map(|i| format!(" <small>({})</small>", esc(i)))
                            .unwrap_or_default();
                        match input {
                            StepInput::StepOutput { step, output } => {
                                format!("{} ← {}.{}{mounted}", esc(name), esc(step), esc(output))
                            }
                            StepInput::Value { value } => {
                                format!("{} = {}", esc(name), esc(value))
                            }
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let _ = write!(
            html,
            "<tr class=step><td>{}</td><td class={st}>{st}</td><td>{}</td><td>{run}</td><td>{}</td><td>{}</td></tr>",
            esc(&step.name),
            esc(&step.compute),
            inputs.join("<br>"),
            esc(step.reason.as_deref().unwrap_or("")),
            st = esc(&v1::StepState::word_of(step.state)),
        );
    }
    html.push_str("</table></body></html>");
    Html(html).into_response()
}

pub(super) async fn run_page(State(c): State<Arc<Server>>, Path(id): Path<String>) -> Response {
    let Some((run, wire)) = c
        .coordinator
        .read(|s| s.runs.get(&id).map(|r| (r.clone(), run_to_wire(s, r))))
    else {
        return not_found("run", &id, "runs");
    };
    let mut html = page_head(&run.id, !run.state.is_terminal(), "runs");
    let _ = write!(
        html,
        "<table><tr><th>state</th><td class={st}>{st}</td></tr><tr><th>experiment</th><td>{}</td></tr><tr><th>compute</th><td>{}</td></tr><tr><th>command</th><td><code>{}</code></td></tr><tr><th>exit code</th><td>{}</td></tr><tr><th>message</th><td>{}</td></tr><tr><th>created</th><td>{}</td></tr><tr><th>started</th><td>{}</td></tr><tr><th>finished</th><td>{}</td></tr>",
        esc(&run.spec.experiment),
        esc(&run.spec.compute),
        esc(&run.spec.command),
        run.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        esc(run.message.as_deref().unwrap_or("")),
        ms(Some(run.created_at)),
        ms(run.started_at),
        ms(run.finished_at),
        st = run.state.as_str(),
    );
    for (tag, page) in [("muster.sweep", "sweeps"), ("muster.pipeline", "pipelines")] {
        if let Some(owner) = run.spec.tags.get(tag) {
            let _ = write!(
                html,
                "<tr><th>{}</th><td><a href=\"/{page}/{id}\">{id}</a></td></tr>",
                &page[..page.len() - 1],
                id = esc(owner)
            );
        }
    }
    html.push_str("</table>");
    html.push_str(&metrics_section(&c, &run.id).await);
    for attempt in &wire.attempts {
        let log = combined_log(&c, &run, attempt.number).await;
        let _ = write!(
            html,
            "<h2>Attempt {}</h2>{}<pre>{}</pre>",
            attempt.number,
            attempt_summary(attempt),
            esc(&String::from_utf8_lossy(&log))
        );
    }
    if run.state == RunState::Queued {
        html.push_str("<p>Waiting for placement.</p>");
    }
    html.push_str("</body></html>");
    Html(html).into_response()
}

/// The last value of each metric a run logged (as `muster run show` prints them), read as
/// the MetricsService reads them: sealed once the run ended, else live (from the leader).
async fn metrics_section(c: &Server, run_id: &str) -> String {
    let req = v1::GetRunMetricsRequest {
        run_id: run_id.to_string(),
        last_only: true,
        ..Default::default()
    };
    let m = match run_metrics(c, &req, false).await {
        Ok(m) => m,
        Err(e) => {
            return format!(
                "<h2>Metrics</h2><p>The metrics cannot be read now: {}</p>",
                esc(e.message())
            );
        }
    };
    let last: Vec<(&str, u64, f64)> = m
        .series
        .iter()
        .filter_map(|s| Some((s.name.as_str(), *s.steps.last()?, *s.values.last()?)))
        .collect();
    if last.is_empty() && m.malformed == 0 {
        return String::new();
    }
    let mut html = String::from("<h2>Metrics</h2>");
    if !last.is_empty() {
        html.push_str("<table><tr><th>metric</th><th>last value</th><th>step</th></tr>");
        for (name, step, value) in last {
            let _ = write!(
                html,
                "<tr class=metric><td>{}</td><td>{value}</td><td>{step}</td></tr>",
                esc(name)
            );
        }
        html.push_str("</table>");
    }
    if m.malformed > 0 {
        let _ = write!(
            html,
            "<p>{} malformed metric line(s) were skipped; the last: {}</p>",
            m.malformed,
            esc(m.last_error.as_deref().unwrap_or(""))
        );
    }
    html
}

/// An attempt's nodes (one per rank) and how it ended, as `muster run show` lists it.
fn attempt_summary(a: &v1::Attempt) -> String {
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
            format!("{rank}{}{}", esc(name), esc(&gpus))
        })
        .collect();
    let over = a.end != i32::from(v1::AttemptEnd::Unspecified);
    let state = if over {
        v1::AttemptEnd::word_of(a.end)
    } else {
        v1::AttemptState::word_of(a.state)
    };
    format!(
        "<table class=attempt><tr><th>nodes</th><td>{}</td></tr><tr><th>{}</th><td class={st}>{st}{}</td></tr>{}<tr><th>placed</th><td>{}</td></tr><tr><th>started</th><td>{}</td></tr><tr><th>finished</th><td>{}</td></tr></table>",
        nodes.join("; "),
        if over { "end" } else { "state" },
        a.exit_code
            .map(|c| format!(" (exit {c})"))
            .unwrap_or_default(),
        a.message
            .as_ref()
            .map(|m| format!("<tr><th>reason</th><td>{}</td></tr>", esc(m)))
            .unwrap_or_default(),
        ms(Some(a.placed_at_ms)),
        ms(a.started_at_ms),
        ms(a.finished_at_ms),
        st = esc(&state),
    )
}
