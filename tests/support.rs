//! Shared helpers for the end-to-end scenarios.

use std::path::Path;
use std::time::Duration;

use muster_proto::Word;
use muster_proto::v1;
use muster_testkit::agents::{AgentHandle, agent_config};
use muster_testkit::cluster::TestCluster;

/// Writes `content` to `dir/rel`, creating directories.
pub fn write(dir: &Path, rel: &str, content: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
    std::fs::write(p, content).expect("write");
}

/// Polls (bounded: 30 s) until `run` reaches `state`.
pub async fn wait_for_state(server: &str, id: &str, state: &str) -> v1::Run {
    let mut c = muster_testkit::access::clients(server)
        .await
        .expect("connect");
    for _ in 0..600 {
        let r = c
            .runs
            .get_run(v1::GetRunRequest {
                id: id.into(),
                stale: false,
            })
            .await
            .expect("get")
            .into_inner();
        if r.state().word() == state {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {id} did not reach {state} within 30 s");
}

/// Waits (bounded: 60 s) for a run to end and returns it.
pub async fn wait_done(server: &str, id: &str) -> v1::Run {
    let mut c = muster_testkit::access::clients(server)
        .await
        .expect("connect");
    c.runs
        .wait_run(v1::WaitRunRequest {
            id: id.into(),
            timeout_ms: 60_000,
        })
        .await
        .expect("wait")
        .into_inner()
}

/// Lists every run.
pub async fn all_runs(server: &str) -> Vec<v1::Run> {
    let mut c = muster_testkit::access::clients(server)
        .await
        .expect("connect");
    c.runs
        .list_runs(v1::ListRunsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .runs
}

/// A plain HTTP/1.1 GET on 127.0.0.1 (the server's HTTP side shares the gRPC port), logged
/// in to the studio as the cluster's admin when the testkit knows its token. Returns the
/// status code and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let cookie = muster_testkit::access::admin_token(&format!("http://{addr}"))
        .map(|t| format!("Cookie: muster_session={t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{cookie}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A child process that is killed when the guard drops (a failing test leaves nothing behind).
#[derive(Debug)]
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// [`http_get`] off the async runtime: a studio page's status code and body.
pub async fn web_page(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || http_get(addr, &path))
        .await
        .expect("the GET task")
}

/// The rows of a studio table whose `<tr>` has class `class`, in page order.
pub fn rows<'a>(html: &'a str, class: &str) -> Vec<&'a str> {
    let open = format!("<tr class={class}>");
    html.split(open.as_str())
        .skip(1)
        .map(|r| r.split("</tr>").next().unwrap_or(r))
        .collect()
}

/// Runs `muster ARGS` (a `… submit`), asserts it succeeded and returns the id it printed.
pub async fn submit_id(server: &str, cwd: &Path, args: &[&str]) -> String {
    let out = muster_testkit::muster(server, cwd, args).await;
    assert_eq!(out.code, 0, "{out:?}");
    out.stdout.trim().to_string()
}

/// Creates the attached compute target `name` through `server` (gRPC).
pub async fn create_attached(server: &str, name: &str) {
    muster_testkit::access::create_attached(server, name)
        .await
        .unwrap();
}

/// Starts an in-process agent (process executor, no GPUs) in `pool` that knows every server.
pub async fn cluster_agent(
    cluster: &TestCluster,
    data: &Path,
    pool: &str,
    node: &str,
) -> AgentHandle {
    let mut config = agent_config(
        &cluster.url(1),
        data,
        pool,
        node,
        std::sync::Arc::new(muster_agent::NoGpus),
    );
    config.servers = all_urls(cluster);
    AgentHandle::start(&cluster.urls(), config).await.unwrap()
}

/// `muster dev` with a short node grace (3 s), so a stopped or dead agent is noticed in seconds.
pub async fn short_grace_dev() -> muster_testkit::DevCluster {
    muster_testkit::DevCluster::start_with(|c| {
        c.server.heartbeat_interval = Duration::from_millis(300);
        c.server.node_grace = Duration::from_secs(3);
    })
    .await
    .unwrap()
}

/// Submits `sh -c SCRIPT` with `run submit FLAGS`, asserts it succeeded; the new run's id.
pub async fn submit_sh(server: &str, cwd: &Path, flags: &[&str], script: &str) -> String {
    let mut args = vec!["run", "submit"];
    args.extend_from_slice(flags);
    args.extend(["--", "sh", "-c", script]);
    submit_id(server, cwd, &args).await
}

/// The URL of every server of `cluster`, one each.
pub fn all_urls(cluster: &TestCluster) -> Vec<String> {
    cluster
        .ids()
        .into_iter()
        .map(|id| cluster.url(id))
        .collect()
}

/// The URL of every server of `cluster` but `but` (e.g. the survivors of a killed leader).
pub fn urls_but(cluster: &TestCluster, but: u64) -> Vec<String> {
    cluster
        .ids()
        .into_iter()
        .filter(|id| *id != but)
        .map(|id| cluster.url(id))
        .collect()
}

/// A free port on 127.0.0.1 (bound, then released for a server process to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
