//! HTTP on the gRPC port: `/healthz`, `/metrics` (Prometheus text format) and the web UI.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use muster_core::RunState;
use muster_core::loglines::RankLines;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::coordinator::Coordinator;

/// Counters the server keeps; gauges of the state are computed at scrape time.
#[derive(Debug)]
pub struct Metrics {
    pub(crate) proposals: Counter,
    pub(crate) runs_submitted: Counter,
    schedule_seconds: Histogram,
    placements: Counter,
    last_pass_micros: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            proposals: Counter::default(),
            runs_submitted: Counter::default(),
            schedule_seconds: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
            placements: Counter::default(),
            last_pass_micros: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub(crate) fn observe_schedule(&self, took: Duration, placed: usize) {
        self.schedule_seconds.observe(took.as_secs_f64());
        self.placements.inc_by(placed as u64);
        self.last_pass_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

pub(crate) fn router(coordinator: Arc<Coordinator>) -> axum::Router {
    axum::Router::new()
        .route("/", get(index))
        .route("/runs/{id}", get(run_page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(coordinator)
}

async fn healthz(State(c): State<Arc<Coordinator>>) -> Response {
    let status = c.raft().status();
    let body = format!(
        "ok\nrole: {:?}\nleader: {}\napplied: {}\n",
        status.role,
        status
            .leader
            .map(|l| l.to_string())
            .unwrap_or_else(|| "none".into()),
        status.applied_index
    );
    (StatusCode::OK, body).into_response()
}

async fn metrics(State(c): State<Arc<Coordinator>>) -> Response {
    let mut registry = Registry::with_prefix("muster");
    let m = &c.metrics;
    registry.register(
        "raft_proposals",
        "Commands applied through Raft by this server",
        m.proposals.clone(),
    );
    registry.register(
        "runs_submitted",
        "Runs accepted by this server",
        m.runs_submitted.clone(),
    );
    registry.register(
        "placements",
        "Placements decided by this server's scheduler",
        m.placements.clone(),
    );
    registry.register(
        "schedule_pass_seconds",
        "Duration of one scheduling pass",
        m.schedule_seconds.clone(),
    );
    let runs = Family::<StateLabel, Gauge>::default();
    let (nodes, applied) = c.read(|s| {
        for r in s.runs.values() {
            runs.get_or_create(&StateLabel {
                state: r.state.as_str().to_string(),
            })
            .inc();
        }
        (s.nodes.len() as i64, c.raft().status().applied_index as i64)
    });
    registry.register("runs", "Runs by state", runs);
    let g = Gauge::<i64>::default();
    g.set(nodes);
    registry.register("nodes", "Registered nodes", g);
    let a = Gauge::<i64>::default();
    a.set(applied);
    registry.register(
        "raft_applied_index",
        "Highest log index applied on this server",
        a,
    );
    let mut body = String::new();
    if encode(&mut body, &registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Most of an attempt's log a run page shows.
const PAGE_LOG_BYTES: usize = 1 << 20;

/// An attempt's log for its page: rank 0's as it is, or for a multi-instance attempt every
/// rank's, line by line, each line prefixed `[rank N] ` (the ranks read in turns, a chunk
/// at a time, as `muster run logs` shows them). An ended rank's log comes from its sealed
/// blob (on any server); a live one from this server's file (the leader's).
async fn attempt_log(c: &Coordinator, run: &muster_core::Run, attempt: u32) -> Vec<u8> {
    let ranks = run
        .attempts
        .get(attempt as usize - 1)
        .map_or(1, |a| a.placements.len() as u32);
    if ranks <= 1 {
        return c
            .read_log(&run.id, attempt, 0, 0, PAGE_LOG_BYTES)
            .await
            .unwrap_or_default();
    }
    let mut lines = RankLines::new();
    let mut out = Vec::new();
    let mut offsets: Vec<(u32, u64)> = (0..ranks).map(|r| (r, 0)).collect();
    while !offsets.is_empty() && out.len() < PAGE_LOG_BYTES {
        let mut still = Vec::new();
        for (rank, offset) in offsets {
            let data = c
                .read_log(&run.id, attempt, rank, offset, 64 * 1024)
                .await
                .unwrap_or_default();
            if !data.is_empty() {
                out.extend(lines.push(rank, &data));
                still.push((rank, offset + data.len() as u64));
            }
        }
        offsets = still;
    }
    out.extend(lines.finish());
    out
}

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

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}.completed{color:#176f2c}.failed,.timed_out{color:#b00020}.running{color:#0b57d0}.canceled{color:#777}pre{background:#f6f8fa;padding:1em;overflow:auto}";

async fn index(State(c): State<Arc<Coordinator>>) -> Html<String> {
    let mut html = format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5><title>muster studio</title><style>{STYLE}</style></head><body><h1>muster studio</h1>"
    );
    c.read(|s| {
        let _ = write!(html, "<h2>Compute targets</h2><table><tr><th>name</th><th>type</th><th>nodes</th></tr>");
        for t in s.computes.values() {
            let nodes = s.nodes.values().filter(|n| n.compute == t.spec.name).count();
            let _ = write!(html, "<tr><td>{}</td><td>{}</td><td>{nodes}</td></tr>", esc(&t.spec.name), t.spec.kind.as_str());
        }
        let _ = write!(html, "</table><h2>Runs</h2><table><tr><th>id</th><th>experiment</th><th>compute</th><th>state</th><th>attempt</th><th>exit</th><th>created</th></tr>");
        let mut runs: Vec<_> = s.runs.values().collect();
        runs.sort_by_key(|r| std::cmp::Reverse(r.seq));
        for r in runs.into_iter().take(200) {
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

async fn run_page(State(c): State<Arc<Coordinator>>, Path(id): Path<String>) -> Response {
    let Some((run, attempts)) =
        c.read(|s| s.runs.get(&id).map(|r| (r.clone(), r.attempt_number())))
    else {
        return (StatusCode::NOT_FOUND, format!("run {id} does not exist")).into_response();
    };
    let mut html = format!(
        "<!doctype html><html><head><meta charset=utf-8>{}<title>{}</title><style>{STYLE}</style></head><body><p><a href=\"/\">← runs</a></p><h1>{}</h1>",
        if run.state.is_terminal() {
            ""
        } else {
            "<meta http-equiv=refresh content=2>"
        },
        esc(&run.id),
        esc(&run.id)
    );
    let _ = write!(
        html,
        "<table><tr><th>state</th><td class={st}>{st}</td></tr><tr><th>experiment</th><td>{}</td></tr><tr><th>compute</th><td>{}</td></tr><tr><th>command</th><td><code>{}</code></td></tr><tr><th>exit code</th><td>{}</td></tr><tr><th>message</th><td>{}</td></tr><tr><th>created</th><td>{}</td></tr><tr><th>started</th><td>{}</td></tr><tr><th>finished</th><td>{}</td></tr></table>",
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
    for attempt in 1..=attempts {
        let log = attempt_log(&c, &run, attempt).await;
        let _ = write!(
            html,
            "<h2>Attempt {attempt}</h2><pre>{}</pre>",
            esc(&String::from_utf8_lossy(&log))
        );
    }
    if run.state == RunState::Queued {
        html.push_str("<p>Waiting for placement.</p>");
    }
    html.push_str("</body></html>");
    Html(html).into_response()
}
