//! HTTP on the gRPC port: `/healthz`, `/metrics` (Prometheus text format, `prometheus.rs`)
//! and the web UI, muster studio (`studio.rs`, its stylesheet at `/static/studio.css`),
//! behind the HTTP front (`front.rs`), which every request on the port passes first: it
//! keeps browsers out of gRPC, checks the host and origin of web requests and adds the
//! security headers.

pub(crate) mod front;
mod prometheus;
mod session;
mod studio;

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::server::Server;

/// The HTTP routes beside gRPC; an unknown path gets the studio's 404 page.
pub(crate) fn router(server: Arc<Server>) -> axum::Router {
    axum::Router::new()
        .route("/", get(studio::index))
        .route("/login", get(session::login).post(session::login_submit))
        .route("/logout", axum::routing::post(session::logout))
        .route("/runs/{id}", get(studio::run_page))
        .route("/sweeps/{id}", get(studio::sweep_page))
        .route("/pipelines/{id}", get(studio::pipeline_page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(prometheus::metrics))
        .route("/static/studio.css", get(studio::stylesheet))
        .fallback(studio::unknown_page)
        .with_state(server)
}

async fn healthz(State(c): State<Arc<Server>>) -> Response {
    let status = c.coordinator.raft().status();
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
