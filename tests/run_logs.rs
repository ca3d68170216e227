//! Logs as a user reads them: every rank of a multi-instance run, combined and prefixed by
//! rank, from any server; one rank's log as it is; and the partial log of a rank whose node
//! was lost, sealed by the leader so it outlives that leader, closed to a late agent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use muster_proto::Word;
use muster_proto::v1::{self, agent_message, server_message};
use muster_testkit::agents::AgentProcess;
use muster_testkit::cluster::TestCluster;
use muster_testkit::{DevCluster, muster};
use muster_tests::{cluster_agent, create_attached, submit_id, submit_sh};
use tokio_stream::StreamExt;

fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// Rank `rank`'s log as the script below prints it: 25 lines, each written in two parts
/// (so a chunk may end mid-line), then a last line without a newline.
fn rank_log(rank: u32) -> String {
    let mut text: String = (1..=25)
        .map(|i| format!("rank {rank} says line {i}\n"))
        .collect();
    text.push_str(&format!("rank {rank} ends without a newline"));
    text
}

const TWO_RANKS: &str = "i=1; while [ $i -le 25 ]; do printf \"rank $MUSTER_NODE_RANK says \"; sleep 0.02; echo \"line $i\"; i=$((i+1)); done; printf \"rank $MUSTER_NODE_RANK ends without a newline\"";

/// Checks a combined view of the two ranks: every line of both, once, whole, each with its
/// rank's prefix, each rank's lines in order.
fn assert_combined(combined: &str, what: &str) {
    let mut by_rank: BTreeMap<u32, String> = BTreeMap::new();
    for line in combined.lines() {
        let (rank, rest) = line
            .strip_prefix("[rank 0] ")
            .map(|r| (0, r))
            .or_else(|| line.strip_prefix("[rank 1] ").map(|r| (1, r)))
            .unwrap_or_else(|| panic!("{what}: a line without a rank prefix: {line:?}"));
        let text = by_rank.entry(rank).or_default();
        text.push_str(rest);
        text.push('\n');
    }
    for rank in [0, 1] {
        assert_eq!(
            by_rank.get(&rank).map(String::as_str),
            Some(format!("{}\n", rank_log(rank)).as_str()),
            "{what}: rank {rank}'s lines, each once and in order"
        );
    }
    assert_eq!(combined.lines().count(), 52, "{what}: nothing else");
}

/// A 2-instance run on two agents: `run submit --stream` (following the live logs through a
/// server that may be a follower), `run logs` on every server, the web page, `--rank`, and
/// `run download` all show every line of both ranks exactly once, prefixed by rank where
/// combined and byte-exact where not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_instance_runs_ranks_are_combined_and_prefixed_on_every_server() {
    let cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "gang-pool").await;
    let data = tempfile::tempdir().unwrap();
    let _a = cluster_agent(&cluster, &data.path().join("gang-a"), "gang-pool", "gang-a").await;
    let _b = cluster_agent(&cluster, &data.path().join("gang-b"), "gang-pool", "gang-b").await;
    let work = tempfile::tempdir().unwrap();
    let leader = cluster.leader().await.unwrap();
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    // Submitted and followed through a follower: it relays the leader's live logs.
    let streamed = muster(
        &cluster.url(follower),
        work.path(),
        &[
            "run",
            "submit",
            "--stream",
            "--compute",
            "gang-pool",
            "--instance-count",
            "2",
            "--",
            "sh",
            "-c",
            TWO_RANKS,
        ],
    )
    .await;
    assert_eq!(streamed.code, 0, "{streamed:?}");
    assert_combined(&streamed.stdout, "run submit --stream");
    let runs = muster_tests::all_runs(&cluster.url(leader)).await;
    let run = runs.last().unwrap();
    assert_eq!(
        (run.state().word(), run.attempt),
        ("completed", 1),
        "{run:?}"
    );
    assert_eq!(run.attempts[0].placements.len(), 2);
    let id = run.id.clone();
    for server in cluster.ids() {
        let url = cluster.url(server);
        let out = muster(&url, work.path(), &["run", "logs", &id]).await;
        assert_eq!(out.code, 0, "server {server}: {out:?}");
        assert_combined(&out.stdout, &format!("run logs on server {server}"));
        for rank in [0u32, 1] {
            let out = muster(
                &url,
                work.path(),
                &["run", "logs", &id, "--rank", &rank.to_string()],
            )
            .await;
            assert_eq!(out.code, 0, "server {server}: {out:?}");
            assert_eq!(
                out.stdout,
                rank_log(rank),
                "server {server}: rank {rank} as it is"
            );
        }
        let (code, page) = muster_tests::http_get(addr(&url), &format!("/runs/{id}"));
        assert_eq!(code, 200, "server {server}: {page}");
        for rank in [0, 1] {
            for i in [1, 13, 25] {
                let line = format!("[rank {rank}] rank {rank} says line {i}\n");
                assert_eq!(
                    page.matches(&line).count(),
                    1,
                    "server {server}'s page shows {line:?} once"
                );
            }
            let last = format!("[rank {rank}] rank {rank} ends without a newline\n");
            assert_eq!(
                page.matches(&last).count(),
                1,
                "server {server}'s page: {page}"
            );
        }
    }
    // A rank that does not exist is refused, naming the field.
    let out = muster(
        &cluster.url(follower),
        work.path(),
        &["run", "logs", &id, "--rank", "2"],
    )
    .await;
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("rank: run") && out.stderr.contains("2 rank(s)"),
        "{out:?}"
    );
    // `run download` keeps each rank's log in its own file, byte for byte.
    let to = work.path().join("dl");
    let out = muster(
        &cluster.url(follower),
        work.path(),
        &["run", "download", &id, "--to", to.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    for rank in [0u32, 1] {
        let saved =
            std::fs::read_to_string(to.join(format!("logs/attempt-1.rank-{rank}.std_log.txt")))
                .unwrap();
        assert_eq!(saved, rank_log(rank));
    }
    // A client that predates ranks (neither rank nor all_ranks) gets rank 0, unprefixed.
    let mut c = muster_testkit::access::clients(&cluster.url(follower))
        .await
        .unwrap();
    let mut stream = c
        .runs
        .stream_logs(v1::StreamLogsRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut old = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!((chunk.rank, chunk.ranks), (0, 2));
        old.extend(chunk.data);
    }
    assert_eq!(String::from_utf8(old).unwrap(), rank_log(0));
}

/// One rank fails: the attempt fails and the other rank, still running, is stopped; the
/// followed combined log has both ranks' lines (the stopped rank's log is sealed when its
/// agent reports the stop), and each rank's log is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_ranks_and_its_stopped_peers_logs_are_both_kept() {
    let cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "fail-pool").await;
    let data = tempfile::tempdir().unwrap();
    let _a = cluster_agent(&cluster, &data.path().join("fail-a"), "fail-pool", "fail-a").await;
    let _b = cluster_agent(&cluster, &data.path().join("fail-b"), "fail-pool", "fail-b").await;
    let work = tempfile::tempdir().unwrap();
    // Rank 1 fails once rank 0 is up (both run on this machine: a file says so).
    let mark = work.path().join("rank-0-is-up");
    let script = "if [ \"$MUSTER_NODE_RANK\" = 0 ]; then echo \"rank 0 is up\"; touch \"$MARK\"; sleep 60; echo \"rank 0 was not stopped\"; else i=0; while [ ! -e \"$MARK\" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo \"rank 1 fails\"; exit 3; fi";
    let streamed = muster(
        &cluster.urls(),
        work.path(),
        &[
            "run",
            "submit",
            "--stream",
            "--compute",
            "fail-pool",
            "--instance-count",
            "2",
            "--env",
            &format!("MARK={}", mark.display()),
            "--",
            "sh",
            "-c",
            script,
        ],
    )
    .await;
    assert_eq!(streamed.code, 3, "{streamed:?}");
    let mut lines: Vec<&str> = streamed.stdout.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        ["[rank 0] rank 0 is up", "[rank 1] rank 1 fails"],
        "{streamed:?}"
    );
    let run = muster_tests::all_runs(&cluster.urls()).await.pop().unwrap();
    assert_eq!(run.state().word(), "failed", "{run:?}");
    for server in cluster.ids() {
        let url = cluster.url(server);
        for (rank, text) in [("0", "rank 0 is up\n"), ("1", "rank 1 fails\n")] {
            let out = muster(&url, work.path(), &["run", "logs", &run.id, "--rank", rank]).await;
            assert_eq!(
                (out.code, out.stdout.as_str()),
                (0, text),
                "server {server}: {out:?}"
            );
        }
    }
}

fn ghost_hello(node_id: &str, running: &[(String, u32)]) -> v1::AgentMessage {
    v1::AgentMessage {
        msg: Some(agent_message::Msg::Hello(v1::Hello {
            node_id: node_id.into(),
            running: running
                .iter()
                .map(|(run_id, attempt)| v1::RunningAttempt {
                    run_id: run_id.clone(),
                    attempt: *attempt,
                })
                .collect(),
        })),
    }
}

fn ghost_log(run_id: &str, offset: u64, data: &str) -> v1::AgentMessage {
    v1::AgentMessage {
        msg: Some(agent_message::Msg::Log(v1::LogData {
            run_id: run_id.into(),
            attempt: 1,
            offset,
            data: data.as_bytes().to_vec(),
        })),
    }
}

fn ghost_update(run_id: &str, state: v1::AttemptState, log_bytes: u64) -> v1::AgentMessage {
    let ended = state == v1::AttemptState::Ended;
    v1::AgentMessage {
        msg: Some(agent_message::Msg::Update(v1::AttemptUpdate {
            run_id: run_id.into(),
            attempt: 1,
            state: state.into(),
            end: if ended {
                v1::AttemptEnd::Completed.into()
            } else {
                v1::AttemptEnd::Unspecified.into()
            },
            exit_code: ended.then_some(0),
            log_bytes,
            ..Default::default()
        })),
    }
}

async fn register_ghost(
    url: &str,
) -> v1::agent_service_client::AgentServiceClient<muster_client::Channel> {
    // A hand-made agent joins like a real one: a join token, traded for its credential,
    // which it keeps (as an agent keeps it in its data directory) for when it returns.
    static CREDENTIALS: std::sync::Mutex<BTreeMap<String, String>> =
        std::sync::Mutex::new(BTreeMap::new());
    let kept = CREDENTIALS.lock().unwrap().get(url).cloned();
    let credential = match kept {
        Some(c) => c,
        None => {
            let join = muster_testkit::access::join_token(url, "ghost-pool")
                .await
                .unwrap();
            let (_, anonymous) = muster_client::Servers::new([url]).connect().await.unwrap();
            let credential = v1::agent_service_client::AgentServiceClient::new(anonymous)
                .join(v1::JoinRequest {
                    join_token: join,
                    node_name: "ghost".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .credential;
            CREDENTIALS
                .lock()
                .unwrap()
                .insert(url.to_string(), credential.clone());
            credential
        }
    };
    let (_, channel) = muster_client::Servers::new([url])
        .with_credentials(muster_client::Credentials::bearer(&credential).unwrap())
        .connect()
        .await
        .unwrap();
    let mut agents = v1::agent_service_client::AgentServiceClient::new(channel);
    agents
        .register(v1::RegisterRequest {
            node_id: "ghost-node-id".into(),
            name: "ghost".into(),
            compute: "ghost-pool".into(),
            capacity: Some(v1::Resources {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    agents
}

/// The next server message on a ghost session (bounded: 30 s).
async fn next_message(inbound: &mut tonic::Streaming<v1::ServerMessage>) -> server_message::Msg {
    tokio::time::timeout(Duration::from_secs(30), inbound.message())
        .await
        .expect("the server said something within 30 s")
        .expect("the session stays open")
        .expect("a message")
        .msg
        .expect("a message body")
}

/// An agent that reports an end this server does not know (a newer agent) is refused with
/// a message naming the field and the value: the run is not marked failed on a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_attempt_end_is_refused_not_taken_as_failed() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let pool = tempfile::tempdir().unwrap();
    let out = muster(
        &url,
        pool.path(),
        &["compute", "create", "ghost-pool", "--type", "attached"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let mut agents = register_ghost(&url).await;
    let work = tempfile::tempdir().unwrap();
    let id = submit_id(
        &url,
        work.path(),
        &["run", "submit", "--compute", "ghost-pool", "--", "train"],
    )
    .await;
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
    out_tx
        .send(ghost_hello("ghost-node-id", &[]))
        .await
        .unwrap();
    let mut inbound = agents
        .session(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .await
        .unwrap()
        .into_inner();
    loop {
        if let server_message::Msg::Assign(a) = next_message(&mut inbound).await {
            assert_eq!((a.run_id.as_str(), a.attempt), (id.as_str(), 1));
            break;
        }
    }
    out_tx
        .send(ghost_update(&id, v1::AttemptState::Running, 0))
        .await
        .unwrap();
    muster_tests::wait_for_state(&url, &id, "running").await;
    let mut end = ghost_update(&id, v1::AttemptState::Ended, 0);
    if let Some(agent_message::Msg::Update(u)) = &mut end.msg {
        u.end = 99;
    }
    out_tx.send(end).await.unwrap();
    let refused = loop {
        match tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .expect("the server answers within 30 s")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the session ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().starts_with(
            "update.end: unknown attempt end 99: the sender may run a different muster version"
        ),
        "{refused:?}"
    );
    let run = muster_tests::wait_for_state(&url, &id, "running").await;
    assert_eq!(
        run.attempts[0].end(),
        v1::AttemptEnd::Unspecified,
        "{run:?}"
    );
}

/// A node that goes silent mid-run is declared lost: the leader seals what it took of the
/// rank's log (it ends as node_lost, its log readable). When that agent
/// returns and ships more bytes of the stale attempt, from where it stopped or all over
/// again, they are dropped: the sealed log does not change, and the server resumes the
/// agent at the sealed length rather than asking for the whole log again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nodes_log_is_sealed_and_a_late_agents_bytes_are_dropped() {
    // One server (no election can move the leader away from the ghost mid-scenario); the
    // seal reaching every server is shown with real agents below.
    let dev = DevCluster::start_with(|c| {
        c.server.heartbeat_interval = Duration::from_millis(500);
        c.server.node_grace = Duration::from_secs(3);
    })
    .await
    .unwrap();
    let url = dev.url();
    let pool = tempfile::tempdir().unwrap();
    let out = muster(
        &url,
        pool.path(),
        &["compute", "create", "ghost-pool", "--type", "attached"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let mut agents = register_ghost(&url).await;
    let work = tempfile::tempdir().unwrap();
    let id = submit_id(
        &url,
        work.path(),
        &[
            "run",
            "submit",
            "--compute",
            "ghost-pool",
            "--max-attempts",
            "1",
            "--",
            "train",
        ],
    )
    .await;
    // The ghost's first life: it takes the assignment, starts, ships two lines, goes silent.
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
    out_tx
        .send(ghost_hello("ghost-node-id", &[]))
        .await
        .unwrap();
    let mut inbound = agents
        .session(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .await
        .unwrap()
        .into_inner();
    loop {
        if let server_message::Msg::Assign(a) = next_message(&mut inbound).await {
            assert_eq!((a.run_id.as_str(), a.attempt), (id.as_str(), 1));
            break;
        }
    }
    let shipped = "line 1\nline 2\n";
    out_tx
        .send(ghost_update(&id, v1::AttemptState::Running, 0))
        .await
        .unwrap();
    out_tx.send(ghost_log(&id, 0, shipped)).await.unwrap();
    muster_tests::wait_for_state(&url, &id, "running").await;
    // What the leader took is readable while the node lives (from the leader's file).
    let mut live = String::new();
    for _ in 0..200 {
        live = muster(&url, work.path(), &["run", "logs", &id])
            .await
            .stdout;
        if live == shipped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(live, shipped);
    drop(out_tx);
    drop(inbound);
    let run = muster_tests::wait_done(&url, &id).await;
    assert_eq!(run.state().word(), "failed", "{run:?}");
    assert_eq!(run.attempts[0].end().word(), "node_lost", "{run:?}");
    let out = muster(&url, work.path(), &["run", "logs", &id]).await;
    assert_eq!((out.code, out.stdout.as_str()), (0, shipped), "{out:?}");
    // The ghost returns, still holding attempt 1, with more of its log.
    let mut agents = register_ghost(&url).await;
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
    out_tx
        .send(ghost_hello("ghost-node-id", &[(id.clone(), 1)]))
        .await
        .unwrap();
    let mut inbound = agents
        .session(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .await
        .unwrap()
        .into_inner();
    let mut resumed_at = None;
    let mut stopped = false;
    while resumed_at.is_none() || !stopped {
        match next_message(&mut inbound).await {
            server_message::Msg::Resume(r) if r.run_id == id => resumed_at = Some(r.offset),
            server_message::Msg::Stop(s) if s.run_id == id => {
                assert_eq!((s.attempt, s.reason()), (1, v1::StopReason::Stale));
                stopped = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        resumed_at,
        Some(shipped.len() as u64),
        "resumed at the sealed length"
    );
    let late = "line 3 (late)\n";
    out_tx
        .send(ghost_log(&id, shipped.len() as u64, late))
        .await
        .unwrap();
    let whole = format!("{shipped}{late}");
    out_tx.send(ghost_log(&id, 0, &whole)).await.unwrap();
    out_tx
        .send(ghost_update(
            &id,
            v1::AttemptState::Ended,
            whole.len() as u64,
        ))
        .await
        .unwrap();
    // Its end is acknowledged (stale, changing nothing) once everything before it was handled.
    loop {
        if let server_message::Msg::Ack(a) = next_message(&mut inbound).await {
            assert_eq!((a.run_id.as_str(), a.attempt), (id.as_str(), 1));
            break;
        }
    }
    let out = muster(&url, work.path(), &["run", "logs", &id]).await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, shipped),
        "the late bytes were dropped: {out:?}"
    );
    let after = muster_tests::wait_done(&url, &id).await;
    assert_eq!(
        (after.state().word(), after.attempt),
        ("failed", 1),
        "{after:?}"
    );
    assert!(
        !dev.data_dir
            .join("server/logs")
            .join(&id)
            .join("1.0.log")
            .exists(),
        "no live log file is left behind on the leader"
    );
}

/// A real agent process killed mid-run: its node is declared lost, the run restarts as
/// attempt 2 on another node, and attempt 1's partial log (what reached the leader) is
/// readable from every server, and still after that leader is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_partial_log_outlives_the_leader_that_took_it() {
    let mut cluster = TestCluster::start_with(3, |c| {
        c.heartbeat_interval = Duration::from_millis(500);
        c.node_grace = Duration::from_secs(3);
    })
    .await
    .unwrap();
    create_attached(&cluster.urls(), "lost-pool").await;
    let data = tempfile::tempdir().unwrap();
    let mut first = AgentProcess::start(
        &cluster.urls(),
        "lost-pool",
        "doomed",
        &data.path().join("doomed"),
    )
    .await
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let id = submit_sh(
        &cluster.urls(),
        work.path(),
        &["--compute", "lost-pool"],
        "if [ \"$MUSTER_ATTEMPT\" = 1 ]; then i=1; while [ $i -le 60 ]; do echo \"first $i\"; sleep 0.1; i=$((i+1)); done; else echo \"attempt $MUSTER_ATTEMPT\"; fi",
    )
    .await;
    // Kill the agent once the leader holds a few lines.
    let mut seen = String::new();
    for _ in 0..300 {
        seen = muster(&cluster.urls(), work.path(), &["run", "logs", &id])
            .await
            .stdout;
        if seen.contains("first 5\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.contains("first 5\n"), "{seen:?}");
    first.kill();
    let _second = cluster_agent(
        &cluster,
        &data.path().join("survivor"),
        "lost-pool",
        "survivor",
    )
    .await;
    let run = muster_tests::wait_done(&cluster.urls(), &id).await;
    assert_eq!(
        (run.state().word(), run.attempt),
        ("completed", 2),
        "{run:?}"
    );
    assert_eq!(run.attempts[0].end().word(), "node_lost", "{run:?}");
    assert_eq!(run.attempts[1].placements[0].node_name, "survivor");
    let full: String = (1..=60).map(|i| format!("first {i}\n")).collect();
    let mut partial = None;
    for server in cluster.ids() {
        let out = muster(
            &cluster.url(server),
            work.path(),
            &["run", "logs", "--attempt", "1", &id],
        )
        .await;
        assert_eq!(out.code, 0, "server {server}: {out:?}");
        assert!(
            out.stdout.starts_with(&seen),
            "server {server} has what was seen before the kill: {out:?}"
        );
        assert!(
            full.starts_with(&out.stdout),
            "server {server}: a prefix of the run's output: {out:?}"
        );
        assert_eq!(
            *partial.get_or_insert(out.stdout.clone()),
            out.stdout,
            "server {server}: the same log"
        );
    }
    let partial = partial.unwrap();
    let leader = cluster.leader().await.unwrap();
    cluster.kill(leader).await.unwrap();
    let survivors: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    cluster.leader_among(&survivors).await.unwrap();
    for server in survivors {
        let out = muster(&cluster.url(server), work.path(), &["run", "logs", &id]).await;
        assert_eq!(out.code, 0, "server {server}: {out:?}");
        assert_eq!(
            out.stdout,
            format!("{partial}attempt 2\n"),
            "server {server}: attempt 1's partial log, then attempt 2's"
        );
    }
}

/// A chatty run's page shows the end of its log (where the error is), from the start of a
/// line, and says how much comes before and how to read it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_page_shows_the_end_of_a_long_log_and_says_what_it_left_out() {
    let dev = muster_testkit::DevCluster::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // About 1.3 MB of numbered lines (more than a page shows), then the line that matters.
    let id = muster_tests::submit_sh(
        &dev.url(),
        dir.path(),
        &[],
        "seq 1 200000; echo the-error-is-here",
    )
    .await;
    let run = muster_tests::wait_done(&dev.url(), &id).await;
    assert_eq!(run.state().word(), "completed", "{run:?}");
    let (code, page) = muster_tests::web_page(dev.addr, &format!("/runs/{id}")).await;
    assert_eq!(code, 200);
    assert!(page.contains("the-error-is-here"), "the end is shown");
    assert!(!page.contains("<pre>1\n2\n"), "not the start");
    assert!(
        page.contains(&format!(
            "more before these lines: `muster run logs {id} --attempt 1` prints it whole."
        )),
        "{}",
        &page[..page.len().min(4000)]
    );
    // From the start of a line: the first line shown is a whole number of the sequence.
    let shown = page.split("<pre>").nth(1).unwrap();
    let first = shown.lines().next().unwrap();
    let n: u64 = first.parse().expect("a whole line");
    assert!(n > 1 && n < 200000, "{first}");
}
