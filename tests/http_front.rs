//! The HTTP front of the shared gRPC + web port (crates/muster-server/src/web/front.rs),
//! end to end against `muster dev`: gRPC paths take only gRPC over HTTP/2, web paths check
//! the Host and, for writes, the Origin, every web answer carries the security headers,
//! and a page on another origin, in a real browser, cannot submit or cancel a run.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use muster_core::RunSpec;
use muster_proto::Word;
use muster_proto::v1;
use muster_testkit::DevCluster;
use muster_tests::{all_runs, wait_for_state};
use prost::Message;

/// The security headers every web answer carries, with their values.
const SECURITY_HEADERS: &[(&str, &str)] = &[
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

/// What the server said to a raw HTTP/1.1 request.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Lowercase names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts every security header is there with its value.
    fn assert_security_headers(&self) {
        for (name, value) in SECURITY_HEADERS {
            assert_eq!(self.header(name), Some(*value), "{name} in {self:?}");
        }
    }
}

/// One HTTP/1.1 request (`Connection: close`) to `addr`: `method path`, the `Host`
/// header `host`, `headers`, and `body` (with its length). Blocking, bounded (10 s).
fn http1(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("an HTTP answer: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// [`http1`] off the async runtime.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let (method, path, host) = (method.to_string(), path.to_string(), host.to_string());
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let body = body.to_vec();
    tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http1(addr, &method, &path, &host, &headers, &body)
    })
    .await
    .expect("the request task")
}

/// `msg` as one gRPC message frame: uncompressed flag, 4-byte big-endian length, bytes.
fn grpc_frame(msg: &impl Message) -> Vec<u8> {
    let payload = msg.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// A SubmitRunRequest whose run would create `marker`.
fn submit_marker(marker: &Path) -> v1::SubmitRunRequest {
    v1::SubmitRunRequest {
        spec: Some(RunSpec::new(format!("touch {}", marker.display())).into()),
        idempotency_key: None,
    }
}

/// Submits a run that sleeps (through the gRPC client, HTTP/2) and waits until it runs.
async fn running_sleeper(dev: &DevCluster) -> String {
    let id = dev
        .clients()
        .await
        .unwrap()
        .runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(RunSpec::new("sleep 120").into()),
            idempotency_key: None,
        })
        .await
        .expect("gRPC over HTTP/2 submits")
        .into_inner()
        .id;
    wait_for_state(&dev.url(), &id, "running").await;
    id
}

/// Asserts the server holds only the run `id`, still running, and `marker` was not made;
/// a failure names every one of these that does not hold.
async fn assert_untouched(dev: &DevCluster, id: &str, marker: &Path) {
    let runs = all_runs(&dev.url()).await;
    let mut problems = Vec::new();
    let others: Vec<&str> = runs
        .iter()
        .map(|r| r.id.as_str())
        .filter(|r| *r != id)
        .collect();
    if !others.is_empty() {
        problems.push(format!("runs were submitted: {others:?}"));
    }
    match runs.iter().find(|r| r.id == id) {
        Some(r) if r.state().word() == "running" => {}
        Some(r) => problems.push(format!(
            "the test's own run {id} is {} ({:?}), not running",
            r.state().word(),
            r.message
        )),
        None => problems.push(format!("the test's own run {id} is gone")),
    }
    if marker.exists() {
        problems.push(format!("{} was created", marker.display()));
    }
    assert!(problems.is_empty(), "{}", problems.join("; "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_paths_take_only_grpc_over_http2() {
    let dev = DevCluster::start().await.unwrap();
    let own = running_sleeper(&dev).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let host = dev.addr.to_string();
    let submit = grpc_frame(&submit_marker(&marker));
    let cancel = grpc_frame(&v1::CancelRunRequest {
        id: own.clone(),
        reason: Some("cross-origin".into()),
    });
    for (path, body, content_type) in [
        ("/muster.v1.RunService/SubmitRun", &submit, "text/plain"),
        ("/muster.v1.RunService/CancelRun", &cancel, "text/plain"),
        // The right type over the wrong protocol is refused as well.
        (
            "/muster.v1.RunService/SubmitRun",
            &submit,
            "application/grpc",
        ),
        (
            "/muster.v1.RunService/CancelRun",
            &cancel,
            "application/grpc",
        ),
    ] {
        let answer = send(
            dev.addr,
            "POST",
            path,
            &host,
            &[("Content-Type", content_type)],
            body,
        )
        .await;
        assert_eq!(answer.status, 415, "{path} as {content_type}: {answer:?}");
        assert_eq!(
            answer.body,
            "gRPC endpoints take application/grpc over HTTP/2; use the muster CLI or a gRPC client\n"
        );
        assert!(
            answer
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{answer:?}"
        );
        assert!(answer.header("grpc-status").is_none(), "{answer:?}");
    }
    // Health and reflection are gRPC paths too.
    let health = send(
        dev.addr,
        "POST",
        "/grpc.health.v1.Health/Check",
        &host,
        &[("Content-Type", "text/plain")],
        &grpc_frame(&tonic_health::pb::HealthCheckRequest::default()),
    )
    .await;
    assert_eq!(health.status, 415, "{health:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The gRPC client (HTTP/2, application/grpc) still reads and writes.
    assert_untouched(&dev, &own, &marker).await;
    let mut c = dev.clients().await.unwrap();
    c.runs
        .cancel_run(v1::CancelRunRequest {
            id: own.clone(),
            reason: None,
        })
        .await
        .expect("gRPC over HTTP/2 cancels");
    wait_for_state(&dev.url(), &own, "canceled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_paths_check_host_and_origin_and_carry_security_headers() {
    let dev = DevCluster::start_with(|c| c.server.web_hosts = vec!["muster.example".into()])
        .await
        .unwrap();
    let addr = dev.addr;
    let port = addr.port();
    let own = format!("127.0.0.1:{port}");

    // A name that is not this server's (DNS rebinding) is refused, on every web path.
    for path in ["/", "/healthz", "/metrics", "/static/studio.css", "/nope"] {
        let rebound = send(addr, "GET", path, "evil.example", &[], b"").await;
        assert_eq!(rebound.status, 421, "{path}: {rebound:?}");
        assert!(
            rebound.body.contains("--web-host evil.example"),
            "the fix is named: {rebound:?}"
        );
        rebound.assert_security_headers();
    }
    let rebound = send(addr, "GET", "/", &format!("evil.example:{port}"), &[], b"").await;
    assert_eq!(rebound.status, 421, "{rebound:?}");

    // Loopback names and the configured name are served, with the headers.
    for host in [
        own.clone(),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        format!("muster.example:{port}"),
        "muster.example".to_string(),
    ] {
        let cookie = format!("muster_session={}", dev.token());
        let index = send(addr, "GET", "/", &host, &[("Cookie", &cookie)], b"").await;
        assert_eq!(index.status, 200, "{host}: {index:?}");
        index.assert_security_headers();
        assert!(
            index
                .body
                .contains("<link rel=stylesheet href=/static/studio.css>"),
            "{}",
            index.body
        );
        for inline in ["<script", "<style", "style="] {
            assert!(!index.body.contains(inline), "{inline} in {}", index.body);
        }
    }
    let css = send(addr, "GET", "/static/studio.css", &own, &[], b"").await;
    assert_eq!(css.status, 200, "{css:?}");
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
    assert!(css.body.contains("border-collapse"), "{css:?}");
    css.assert_security_headers();
    let health = send(addr, "GET", "/healthz", &own, &[], b"").await;
    assert_eq!(health.status, 200, "{health:?}");
    health.assert_security_headers();

    // A write needs an Origin (or Referer) of the server's own host.
    for (what, headers) in [
        ("another origin", vec![("Origin", "http://evil.example")]),
        ("another port", vec![("Origin", "http://127.0.0.1:1")]),
        ("an opaque origin", vec![("Origin", "null")]),
        (
            "another page",
            vec![("Referer", "http://evil.example/attack.html")],
        ),
        ("nothing", vec![]),
    ] {
        let write = send(addr, "POST", "/", &own, &headers, b"x").await;
        assert_eq!(write.status, 403, "{what}: {write:?}");
        assert!(
            write
                .body
                .contains("must come from this server's own pages"),
            "{what}: {write:?}"
        );
        write.assert_security_headers();
    }
    // The server's own pages pass the check (no web route takes a POST: 405 past it).
    let own_origin = format!("http://{own}");
    let own_referer = format!("http://{own}/runs/x");
    for headers in [
        [("Origin", own_origin.as_str())],
        [("Referer", own_referer.as_str())],
    ] {
        let write = send(addr, "POST", "/", &own, &headers, b"x").await;
        assert_eq!(write.status, 405, "{headers:?}: {write:?}");
        write.assert_security_headers();
    }

    // An unknown path gets the studio's 404 page, not tonic's empty gRPC answer.
    let missing = send(addr, "GET", "/no/such/page", &own, &[], b"").await;
    assert_eq!(missing.status, 404, "{missing:?}");
    assert_eq!(
        missing.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(missing.header("grpc-status").is_none(), "{missing:?}");
    assert!(
        missing.body.starts_with("<!doctype html>")
            && missing
                .body
                .contains("There is no page at <code>/no/such/page</code>"),
        "{}",
        missing.body
    );
    missing.assert_security_headers();
}

/// The Host a request to `addr` names.
fn own_addr(addr: SocketAddr) -> String {
    addr.to_string()
}

/// The value of the hidden `csrf` field of a studio page.
fn csrf_field(html: &str) -> String {
    html.split("name=csrf value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("a csrf field in {html}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studio_pages_need_a_session_and_show_only_the_viewers_workspaces() {
    let dev = DevCluster::start().await.unwrap();
    let addr = dev.addr;
    let own = addr.to_string();
    let origin = format!("http://{own}");

    // No session: every page sends the browser to the login form.
    for path in [
        "/",
        "/runs/run-x",
        "/sweeps/sweep-x",
        "/pipelines/pl-x",
        "/compute",
        "/compute/local",
        "/queue",
    ] {
        let page = send(addr, "GET", path, &own, &[], b"").await;
        assert_eq!(page.status, 303, "{path}: {page:?}");
        assert_eq!(page.header("location"), Some("/login"), "{path}");
    }
    let form = send(addr, "GET", "/login", &own, &[], b"").await;
    assert_eq!(form.status, 200, "{form:?}");
    assert!(
        form.body.contains("<form method=post action=/login>"),
        "{}",
        form.body
    );
    form.assert_security_headers();
    let bad = send(addr, "GET", "/login?token=mst_nope_nope", &own, &[], b"").await;
    assert_eq!(bad.status, 401, "{bad:?}");
    assert!(bad.body.contains("the token is not valid"), "{}", bad.body);
    assert!(bad.header("set-cookie").is_none());

    // The login link muster dev prints: a session cookie scripts and other sites cannot use.
    let login = send(
        addr,
        "GET",
        &format!("/login?token={}", dev.token()),
        &own,
        &[],
        b"",
    )
    .await;
    assert_eq!(login.status, 303, "{login:?}");
    let cookie = login
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_string();
    // The cookie holds a session token of its own, never the token that logged in.
    assert!(session.starts_with("muster_session=mst_"), "{session}");
    assert!(!cookie.contains(&dev.token()), "{cookie}");
    // The form posts the token the same way (with the page's own Origin).
    let body = format!("token={}", dev.token());
    let posted = send(
        addr,
        "POST",
        "/login",
        &own,
        &[
            ("Origin", origin.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(posted.status, 303, "{posted:?}");

    // Another workspace's user sees none of the default workspace's runs.
    let id = running_sleeper(&dev).await;
    let mut admin = dev.clients().await.unwrap();
    admin
        .access
        .create_workspace(v1::CreateWorkspaceRequest {
            name: "vision".into(),
        })
        .await
        .unwrap();
    let vera = muster_testkit::access::user_token(&dev.url(), "vera", "user", Some("vision"))
        .await
        .unwrap();
    let vera = format!("muster_session={vera}");
    let index = send(addr, "GET", "/", &own, &[("Cookie", &vera)], b"").await;
    assert_eq!(index.status, 200, "{index:?}");
    assert!(index.body.contains("Logged in as vera"), "{}", index.body);
    assert!(!index.body.contains(&id), "{}", index.body);
    let theirs = send(
        addr,
        "GET",
        &format!("/runs/{id}"),
        &own,
        &[("Cookie", &vera)],
        b"",
    )
    .await;
    assert_eq!(theirs.status, 404, "{theirs:?}");
    let mine = send(
        addr,
        "GET",
        &format!("/runs/{id}"),
        &own,
        &[("Cookie", &session)],
        b"",
    )
    .await;
    assert_eq!(mine.status, 200, "{mine:?}");
    let admin_index = send(addr, "GET", "/", &own, &[("Cookie", &session)], b"").await;
    assert!(admin_index.body.contains(&id), "{}", admin_index.body);

    // The compute pages and the queue: the viewer's workspaces only.
    let project = tempfile::tempdir().unwrap();
    let waiting =
        muster_tests::submit_sh(&dev.url(), project.path(), &["--gpus", "4"], "true").await;
    let page = |path: &'static str, cookie: String| async move {
        send(
            addr,
            "GET",
            path,
            &own_addr(addr),
            &[("Cookie", &cookie)],
            b"",
        )
        .await
    };
    let tab = page("/compute?tab=attached", session.clone()).await;
    assert_eq!(tab.status, 200, "{tab:?}");
    assert!(
        tab.body.contains("<a href=\"/compute/local\">local</a>"),
        "{}",
        tab.body
    );
    let local = page("/compute/local", session.clone()).await;
    assert_eq!(local.status, 200, "{local:?}");
    assert!(local.body.contains("<tr class=node>"), "{}", local.body);
    assert!(
        local.body.contains(&format!("href=\"/runs/{id}\"")),
        "{}",
        local.body
    );
    let queue = page("/queue", session.clone()).await;
    let states: Vec<(String, String)> = all_runs(&dev.url())
        .await
        .iter()
        .map(|r| (r.id.clone(), r.state().word().to_string()))
        .collect();
    assert!(queue.body.contains(&waiting), "{states:?} {}", queue.body);
    assert!(queue.body.contains("4 GPUs"), "{}", queue.body);
    assert!(
        queue.body.contains("waiting for") || queue.body.contains("needs"),
        "{}",
        queue.body
    );
    let bad_tab = page("/compute?tab=kubernetes", session.clone()).await;
    assert_eq!(bad_tab.status, 400, "{bad_tab:?}");
    let their_tab = page("/compute?tab=attached", vera.clone()).await;
    assert!(
        !their_tab.body.contains("/compute/local"),
        "{}",
        their_tab.body
    );
    assert_eq!(page("/compute/local", vera.clone()).await.status, 404);
    let their_queue = page("/queue", vera.clone()).await;
    assert!(!their_queue.body.contains(&waiting), "{}", their_queue.body);

    // Logging out is a state change: it needs the session's CSRF token.
    let csrf = csrf_field(&admin_index.body);
    let form = [
        ("Origin", origin.as_str()),
        ("Cookie", session.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    let forged = send(addr, "POST", "/logout", &own, &form, b"csrf=0000").await;
    assert_eq!(forged.status, 403, "{forged:?}");
    let out = send(
        addr,
        "POST",
        "/logout",
        &own,
        &form,
        format!("csrf={csrf}").as_bytes(),
    )
    .await;
    assert_eq!(out.status, 303, "{out:?}");
    assert!(
        out.header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0")),
        "{out:?}"
    );
    // Logging out revoked the session's token: the old cookie, replayed, opens nothing,
    // while the token that logged in still works.
    let replayed = send(addr, "GET", "/", &own, &[("Cookie", &session)], b"").await;
    assert_eq!(replayed.status, 303, "{replayed:?}");
    let sessions = admin
        .access
        .list_tokens(v1::ListTokensRequest { all: false })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert!(
        sessions
            .iter()
            .any(|t| t.name.starts_with("studio session of ") && t.revoked_at_ms.is_some()),
        "{sessions:?}"
    );
    // A revoked token ends its session at the next page.
    let who = admin
        .access
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    let spare = admin
        .access
        .create_token(v1::CreateTokenRequest {
            name: "studio".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A session opened with a token ends when that token is revoked.
    let opened = send(
        addr,
        "GET",
        &format!("/login?token={}", spare.token),
        &own,
        &[],
        b"",
    )
    .await;
    let spare_cookie = opened
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    let before = send(addr, "GET", "/", &own, &[("Cookie", &spare_cookie)], b"").await;
    assert_eq!(before.status, 200, "{before:?}");
    admin
        .access
        .revoke_token(v1::RevokeTokenRequest {
            id: spare.info.unwrap().id,
        })
        .await
        .unwrap();
    let after = send(addr, "GET", "/", &own, &[("Cookie", &spare_cookie)], b"").await;
    assert_eq!(after.status, 303, "{after:?}");
    assert_eq!(who.principal, "user:admin");
}

/// The headless browser: `chromium` (Debian), else `chromium-browser`. Its absence fails
/// the test (CI installs it, .ci/run).
fn chromium() -> String {
    for name in ["chromium", "chromium-browser"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return name.to_string();
        }
    }
    panic!(
        "this test needs Chromium on PATH (chromium or chromium-browser): \
         apt-get install -y --no-install-recommends chromium (.ci/run installs it)"
    );
}

/// Loads `url` in headless Chromium with profile `profile` (cookies live there), gives its
/// scripts `script_ms` of virtual time (none for a page that reloads itself, which would
/// still be loading when the time is up), and returns the DOM as the page then stands (after any
/// redirects). Chromium's stderr is in the panic if it fails.
async fn headless_dom(browser: &str, profile: &Path, url: &str, script_ms: Option<u32>) -> String {
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--dump-dom",
    ])
    .args(script_ms.map(|ms| format!("--virtual-time-budget={ms}")))
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finished within 90 s")
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Serves `page` as text/html to every request on a fresh 127.0.0.1 port; its address.
async fn serve_page(page: String) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let page = page.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
                    match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

/// `bytes` as a JavaScript array literal.
fn js_bytes(bytes: &[u8]) -> String {
    let items: Vec<String> = bytes.iter().map(u8::to_string).collect();
    format!("[{}]", items.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_cannot_submit_or_cancel_runs_in_a_browser() {
    let browser = chromium();
    let dev = DevCluster::start().await.unwrap();
    let own = running_sleeper(&dev).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let submit = grpc_frame(&submit_marker(&marker));
    let cancel = grpc_frame(&v1::CancelRunRequest {
        id: own.clone(),
        reason: Some("cross-origin".into()),
    });
    // The attack: "simple" cross-origin POSTs (no preflight), the gRPC frames as the body.
    let page = format!(
        r#"<!doctype html><html><body><p id=status>attack-pending</p><script>
const target = "http://{server}";
const calls = [
  ["/muster.v1.RunService/SubmitRun", new Uint8Array({submit})],
  ["/muster.v1.RunService/CancelRun", new Uint8Array({cancel})],
];
(async () => {{
  const results = [];
  for (const [path, body] of calls) {{
    try {{
      const r = await fetch(target + path, {{
        method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body,
      }});
      results.push(r.type);
    }} catch (e) {{
      results.push("error " + e);
    }}
  }}
  document.getElementById("status").textContent = "attack-sent " + results.join(",");
}})();
</script></body></html>"#,
        server = dev.addr,
        submit = js_bytes(&submit),
        cancel = js_bytes(&cancel),
    );
    let attack = serve_page(page).await;
    let profile = tempfile::tempdir().unwrap();
    let dom = headless_dom(
        &browser,
        profile.path(),
        &format!("http://{attack}/"),
        Some(5000),
    )
    .await;
    assert!(
        dom.contains("attack-sent opaque,opaque"),
        "the page's script ran and both requests were sent: {dom}"
    );
    // Had a request got through, the run would exist by now and soon make its marker.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_untouched(&dev, &own, &marker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_link_opens_the_studio_in_a_browser() {
    let browser = chromium();
    let mut dev = DevCluster::start().await.unwrap();
    let id = running_sleeper(&dev).await;
    let profile = tempfile::tempdir().unwrap();
    // Without a session the studio is the login form, and it shows no run.
    let bare = headless_dom(
        &browser,
        profile.path(),
        &format!("http://{}/", dev.addr),
        None,
    )
    .await;
    assert!(bare.contains("action=\"/login\""), "{bare}");
    assert!(!bare.contains(&id), "{bare}");
    // The link `muster dev` prints: the browser keeps the session cookie through the
    // redirect and lands on the run list, which shows the running run.
    let link = format!("http://{}/login?token={}", dev.addr, dev.token());
    let studio = headless_dom(&browser, profile.path(), &link, None).await;
    assert!(studio.contains("Logged in as admin"), "{studio}");
    assert!(studio.contains(&id), "{studio}");
    assert!(
        !studio.contains(&dev.token()),
        "the page never shows the token: {studio}"
    );
    dev.stop().await.unwrap();
}
