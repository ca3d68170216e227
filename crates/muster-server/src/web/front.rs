//! # The HTTP front: what a request must be before any handler sees it
//!
//! gRPC and the web UI share one port, and a browser can reach that port from any page
//! it shows: a page on another origin may send a "simple" cross-origin request (`POST`,
//! `Content-Type: text/plain`, `mode: "no-cors"`) without the browser asking the server
//! first, and a name the attacker controls may resolve to 127.0.0.1 (DNS rebinding), which
//! makes the attacker's page same-origin with the server. Every request therefore passes
//! [`dispatch`], which sends it down one of two paths by its path alone:
//!
//! 1. **gRPC** — a path under a package of a registered service (`/muster.v1.…`,
//!    `/grpc.health.v1.…`, `/grpc.reflection.v1.…`; the prefixes are derived from the
//!    services' names, [`Front::new`]) is served only when the request says
//!    `content-type: application/grpc…` *and* arrives over HTTP/2. A browser cannot send
//!    that cross-origin without a CORS preflight (the content type is not a simple one)
//!    and does not speak cleartext HTTP/2 at all, so a page's `fetch` never reaches a
//!    gRPC handler. Anything else gets **415** and a body saying what the endpoint takes.
//!    gRPC clients are not asked for a `Host` or an `Origin`: agents and peers reach a
//!    server under any name, and browsers are kept out by the rule above.
//! 2. **Web** (every other path: the studio, `/static/…`, `/healthz`, `/metrics`):
//!    - the request's host (`Host`, or the HTTP/2 `:authority`) must be one this server
//!      answers to ([`AllowedHosts`]: `localhost`, `127.0.0.1`, `[::1]` on any port, the
//!      names of `--web-host`, the host of this server's own `--advertise` address).
//!      A page reached through a rebound name carries that name as its host, so it gets
//!      **421** (Misdirected Request) with a body naming `--web-host`;
//!    - a request other than `GET`/`HEAD` must carry an `Origin` (or, failing that, a
//!      `Referer`) whose `host:port` is the request's own host: a write comes only from
//!      this server's own pages. Otherwise **403**, naming the origin it came from;
//!    - every answer carries the security headers of [`SECURITY_HEADERS`]: a
//!      Content-Security-Policy without `'unsafe-inline'` (the studio's pages have no
//!      inline script or style; their stylesheet is `/static/studio.css`), no framing
//!      (clickjacking), no content sniffing, no `Referer` to other sites, and a browsing
//!      context group of its own;
//!    - an unknown path gets the studio's 404 page (the web router's fallback) rather
//!      than tonic's empty `grpc-status: 12` answer.
//!
//! Refusals are logged (`info`) with the peer's address ([`ConnectionInfo`]).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;

use crate::ServerConfig;
use crate::listener::ConnectionInfo;

/// The headers every web answer carries, and why:
/// - `Content-Security-Policy`: scripts, styles and images from this server only, no
///   inline script or style (an injected `<script>` does not run), no framing, no `<base>`,
///   forms post only here;
/// - `X-Frame-Options: DENY`: no framing, for browsers that predate `frame-ancestors`;
/// - `X-Content-Type-Options: nosniff`: a log shown as text is never run as script;
/// - `Referrer-Policy: no-referrer`: run ids and paths do not leak to linked sites;
/// - `Cross-Origin-Opener-Policy: same-origin`: a page that opens the studio gets no
///   handle on its window.
pub(crate) const SECURITY_HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
];

/// What a refused gRPC request is told.
const GRPC_ONLY: &str =
    "gRPC endpoints take application/grpc over HTTP/2; use the muster CLI or a gRPC client\n";

/// The host names the web UI is served under on any port: this machine's loopback.
const LOOPBACK_HOSTS: &[&str] = &["localhost", "127.0.0.1", "[::1]"];

/// The host names (`Host`) the web UI answers to: loopback, the names given with
/// `--web-host` and the host of this server's own address.
#[derive(Debug, Clone, Default)]
pub(crate) struct AllowedHosts {
    /// Lowercase `host` (any port) or `host:port` (that port only) entries, beside
    /// [`LOOPBACK_HOSTS`].
    names: Vec<String>,
}

impl AllowedHosts {
    /// The hosts of `config`: `web_hosts`, and the host of `advertise` (or of this
    /// server's `peers` entry), any port.
    pub(crate) fn of(config: &ServerConfig) -> Self {
        let own = config
            .advertise
            .as_ref()
            .or_else(|| config.peers.get(&config.raft.id))
            .and_then(|a| split_authority(a).map(|(host, _)| host));
        Self {
            names: config
                .web_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .chain(own)
                .collect(),
        }
    }

    /// Whether the web UI answers to `authority` (`host` or `host:port`).
    fn allows(&self, authority: &str) -> bool {
        let authority = authority.to_ascii_lowercase();
        let Some((host, _port)) = split_authority(&authority) else {
            return false;
        };
        LOOPBACK_HOSTS.contains(&host.as_str())
            || self.names.iter().any(|n| *n == host || *n == authority)
    }

    /// The names accepted, for an error message.
    fn describe(&self) -> String {
        LOOPBACK_HOSTS
            .iter()
            .copied()
            .chain(self.names.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Splits `host[:port]` (`[v6]` with brackets) into its lowercase host and port; `None`
/// when it is not an authority (`user@`, a path, a bad port).
fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let parsed: axum::http::uri::Authority = authority.parse().ok()?;
    if parsed.as_str().contains('@') {
        return None;
    }
    // `Authority::host` keeps an IPv6 literal's brackets.
    let host = parsed.host().to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    let port = match &parsed.as_str()[parsed.host().len()..] {
        "" => None,
        rest => Some(rest.strip_prefix(':')?.parse::<u16>().ok()?),
    };
    Some((host, port))
}

/// Whether `name` is something `--web-host` takes: a host name or IP literal, with an
/// optional port.
pub(crate) fn validate_web_host(name: &str) -> Result<(), String> {
    split_authority(name).map(|_| ()).ok_or_else(|| {
        format!(
            "--web-host {name:?} is not a host name: give a name the web UI is reached at, \
             like muster.example.com or muster.example.com:7070 (no scheme, no path)"
        )
    })
}

/// The front's state: where each kind of request goes.
#[derive(Debug)]
struct Front {
    grpc: Router,
    web: Router,
    /// `/package.` of every gRPC service, e.g. `/muster.v1.`.
    grpc_prefixes: Vec<String>,
    hosts: AllowedHosts,
}

impl Front {
    /// The front of `grpc` (serving `services`, full names) and `web`.
    fn new(grpc: Router, services: &[&str], web: Router, hosts: AllowedHosts) -> Self {
        let mut grpc_prefixes: Vec<String> = services
            .iter()
            .map(|s| match s.rsplit_once('.') {
                Some((package, _)) => format!("/{package}."),
                None => format!("/{s}/"),
            })
            .collect();
        grpc_prefixes.sort();
        grpc_prefixes.dedup();
        Self {
            grpc,
            web,
            grpc_prefixes,
            hosts,
        }
    }

    fn is_grpc(&self, path: &str) -> bool {
        self.grpc_prefixes.iter().any(|p| path.starts_with(p))
    }
}

/// gRPC and the web UI behind the front's rules (the module doc): `grpc` serves the gRPC
/// `services` (full names, `package.Service`), `web` everything else.
pub(crate) fn app(grpc: Router, services: &[&str], web: Router, hosts: AllowedHosts) -> Router {
    Router::new()
        .fallback(dispatch)
        .with_state(Arc::new(Front::new(grpc, services, web, hosts)))
}

/// Every request: gRPC or web by its path, each checked by its own rules.
async fn dispatch(State(front): State<Arc<Front>>, req: Request) -> Response {
    if front.is_grpc(req.uri().path()) {
        if is_grpc_request(&req) {
            return call(&front.grpc, req).await;
        }
        refused(&req, "not gRPC over HTTP/2");
        let mut response = (StatusCode::UNSUPPORTED_MEDIA_TYPE, GRPC_ONLY).into_response();
        add_security_headers(response.headers_mut());
        return response;
    }
    let mut response = match check_web(&front.hosts, &req) {
        Ok(()) => call(&front.web, req).await,
        Err(refusal) => {
            refused(&req, refusal.status.as_str());
            (refusal.status, refusal.body).into_response()
        }
    };
    add_security_headers(response.headers_mut());
    response
}

/// Whether a request to a gRPC path is gRPC: HTTP/2 with an `application/grpc…` type.
fn is_grpc_request(req: &Request) -> bool {
    req.version() == Version::HTTP_2
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/grpc"))
}

/// `router`'s answer to `req`.
async fn call(router: &Router, req: Request) -> Response {
    match router.clone().oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Why a web request is refused: its status and a body saying what to do.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    body: String,
}

/// The web rules: an allowed host, and for a write an Origin (or Referer) of that host.
fn check_web(hosts: &AllowedHosts, req: &Request) -> Result<(), Refusal> {
    let Some(host) = request_host(req.uri(), req.headers()) else {
        return Err(Refusal {
            status: StatusCode::MISDIRECTED_REQUEST,
            body: "the request names no host (Host header): the web UI answers only to the \
                   host names it is reached at; see `muster server --web-host`\n"
                .into(),
        });
    };
    if !hosts.allows(&host) {
        return Err(Refusal {
            status: StatusCode::MISDIRECTED_REQUEST,
            body: format!(
                "this server's web UI does not answer to the host {host:?} (it answers to {}); \
                 if that is the name you reach it at, start the server with `--web-host {}`\n",
                hosts.describe(),
                split_authority(&host).map_or(host.clone(), |(h, _)| h)
            ),
        });
    }
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return Ok(());
    }
    let source = source_authority(req.headers());
    match &source {
        Some(Source::Authority(origin)) if origin.eq_ignore_ascii_case(&host) => Ok(()),
        _ => Err(Refusal {
            status: StatusCode::FORBIDDEN,
            body: format!(
                "{} {} refused: a request that changes something must come from this \
                 server's own pages (an Origin or Referer of http://{host}), and this one {}\n",
                req.method(),
                req.uri().path(),
                match source {
                    Some(Source::Authority(origin)) => format!("came from {origin}"),
                    Some(Source::Opaque(origin)) => format!("came from {origin:?}"),
                    None => "names no Origin or Referer".to_string(),
                }
            ),
        }),
    }
}

/// The host a request is for: the URI's authority (HTTP/2 `:authority`, or an
/// absolute-form HTTP/1.1 target, which RFC 9112 puts before `Host`), else `Host`.
fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    uri.authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .filter(|h| !h.is_empty())
}

/// Where a write came from, by its `Origin` (else `Referer`).
#[derive(Debug)]
enum Source {
    /// The `host[:port]` of the page that sent it.
    Authority(String),
    /// An origin with no host (`null`: a sandboxed frame, a `file:` page) or not a URL.
    Opaque(String),
}

fn source_authority(headers: &HeaderMap) -> Option<Source> {
    let value = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))?;
    let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
    Some(
        match text
            .parse::<Uri>()
            .ok()
            .filter(|u| u.scheme().is_some())
            .and_then(|u| u.authority().cloned())
        {
            Some(a) => Source::Authority(a.as_str().to_string()),
            None => Source::Opaque(text),
        },
    )
}

fn add_security_headers(headers: &mut HeaderMap) {
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
}

/// Logs a refused request with the peer's address.
fn refused(req: &Request, why: &str) {
    let peer = req
        .extensions()
        .get::<ConnectionInfo>()
        .map(|c| c.remote_addr.to_string())
        .unwrap_or_else(|| "unknown".into());
    tracing::info!(
        %peer,
        method = %req.method(),
        path = req.uri().path(),
        "HTTP front refused a request: {why}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> AllowedHosts {
        let mut config = ServerConfig::new("/nowhere");
        config.web_hosts = names.iter().map(|n| n.to_string()).collect();
        config.advertise = Some("10.0.0.1:7070".into());
        AllowedHosts::of(&config)
    }

    #[test]
    fn loopback_configured_and_advertised_hosts_are_allowed() {
        let h = hosts(&["Muster.Example.com", "other.example:8443"]);
        for ok in [
            "localhost",
            "localhost:7070",
            "127.0.0.1:1",
            "[::1]:7070",
            "[::1]",
            "muster.example.com",
            "MUSTER.example.com:7070",
            "other.example:8443",
            "10.0.0.1:7070",
            "10.0.0.1",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7070",
            "other.example:7070",
            "localhost.evil.example",
            "127.0.0.2",
            "user@localhost",
            "",
            "localhost:notaport",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
    }

    #[test]
    fn prefixes_are_the_packages_of_the_services() {
        let front = Front::new(
            Router::new(),
            &[
                "muster.v1.RunService",
                "muster.v1.AgentService",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
            ],
            Router::new(),
            AllowedHosts::default(),
        );
        assert_eq!(
            front.grpc_prefixes,
            ["/grpc.health.v1.", "/grpc.reflection.v1.", "/muster.v1."]
        );
        assert!(front.is_grpc("/muster.v1.RunService/SubmitRun"));
        assert!(front.is_grpc("/muster.v1.Nope/Method"));
        assert!(!front.is_grpc("/"));
        assert!(!front.is_grpc("/muster.v2.RunService/SubmitRun"));
        assert!(!front.is_grpc("/runs/muster.v1.x"));
    }

    #[test]
    fn web_host_values_are_checked() {
        assert!(validate_web_host("muster.example.com").is_ok());
        assert!(validate_web_host("muster.example.com:7070").is_ok());
        assert!(validate_web_host("[fd00::1]:7070").is_ok());
        for bad in ["", "http://x", "x/y", "a b", "u@x"] {
            let e = validate_web_host(bad).unwrap_err();
            assert!(e.contains("--web-host"), "{e}");
        }
    }
}
