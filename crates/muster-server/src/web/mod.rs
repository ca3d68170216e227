//! HTTP on the gRPC port: `/healthz`, `/metrics` (Prometheus text format, `prometheus.rs`)
//! and the web UI, muster studio (`studio.rs`; its compute and queue pages in `compute.rs`;
//! its stylesheet at `/static/studio.css`),
//! behind the HTTP front (`front.rs`), which every request on the port passes first: it
//! keeps browsers out of gRPC, checks the host and origin of web requests and adds the
//! security headers.

mod compute;
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
        .route("/compute", get(compute::compute_list))
        .route("/compute/{name}", get(compute::compute_page))
        .route("/queue", get(compute::queue_page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(prometheus::metrics))
        .route("/static/studio.css", get(studio::stylesheet))
        .fallback(studio::unknown_page)
        .with_state(server)
}

async fn healthz(State(c): State<Arc<Server>>) -> Response {
    let (code, body) = health(&c.coordinator.raft().status());
    (code, body).into_response()
}

/// `/healthz`: 200 `ok` while the Raft node runs, 503 `unhealthy` with the reason while it
/// cannot write its log (a full disk: it recovers by itself once space is freed) or once it
/// stopped, so a load balancer or supervisor stops sending it requests it cannot serve;
/// then the role, leader and applied index either way.
fn health(status: &muster_raft::RaftStatus) -> (StatusCode, String) {
    let (code, first) = match (&status.fatal_error, status.stopped) {
        (None, false) if status.storage_error.is_some() => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "unhealthy: cannot write the raft log: {}; retrying every second (free space on the data directory's disk)",
                status.storage_error.as_deref().unwrap_or_default()
            ),
        ),
        (Some(why), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: the raft node stopped: {why}"),
        ),
        (None, true) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: the raft node is shutting down".to_string(),
        ),
        (None, false) => (StatusCode::OK, "ok".to_string()),
    };
    let leader = status
        .leader
        .map(|l| l.to_string())
        .unwrap_or_else(|| "none".into());
    let body = format!(
        "{first}\nrole: {:?}\nleader: {leader}\napplied: {}\n",
        status.role, status.applied_index
    );
    (code, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_503_with_the_reason_once_raft_stopped() {
        let mut status = muster_raft::RaftStatus::default();
        let (code, body) = health(&status);
        assert_eq!(code, StatusCode::OK);
        assert!(body.starts_with("ok\n"), "{body}");
        status.storage_error = Some("No space left on device (os error 28)".into());
        let (code, body) = health(&status);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with("unhealthy: cannot write the raft log: No space left"),
            "{body}"
        );
        status.storage_error = None;
        assert_eq!(health(&status).0, StatusCode::OK, "healthy again");
        status.stopped = true;
        status.fatal_error = Some("writing the log: No space left on device".into());
        let (code, body) = health(&status);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with("unhealthy: the raft node stopped: writing the log: No space left"),
            "{body}"
        );
    }
}
