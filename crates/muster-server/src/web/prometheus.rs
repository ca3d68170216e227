//! `/metrics`: the server's counters and the state's gauges in the Prometheus text format
//! (`prometheus-client`, the Prometheus project's own Rust client).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::server::Server;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

pub(super) async fn metrics(State(c): State<Arc<Server>>) -> Response {
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
    let raft = c.coordinator.raft().status();
    let (nodes, applied) = c.coordinator.read(|s| {
        for r in s.runs.values() {
            runs.get_or_create(&StateLabel {
                state: r.state.as_str().to_string(),
            })
            .inc();
        }
        (s.nodes.len() as i64, raft.applied_index as i64)
    });
    registry.register("runs", "Runs by state", runs);
    let g = Gauge::<i64>::default();
    g.set(nodes);
    registry.register("nodes", "Registered nodes", g);
    let last = Gauge::<i64>::default();
    last.set(m.last_pass_micros.load(Ordering::Relaxed) as i64);
    registry.register(
        "schedule_last_pass_microseconds",
        "Duration of the last scheduling pass on this server",
        last,
    );
    let a = Gauge::<i64>::default();
    a.set(applied);
    registry.register(
        "raft_applied_index",
        "Highest log index applied on this server",
        a,
    );
    let w = Gauge::<i64>::default();
    w.set(raft.log_writes as i64);
    registry.register(
        "raft_log_writes",
        "Durable writes of the Raft log on this server since it started (one fsync each)",
        w,
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
