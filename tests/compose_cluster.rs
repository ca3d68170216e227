//! The Compose deployment (`deploy/compose.yml`: 3 servers, setup, 2 agents on a private
//! network, from the image `deploy/build-image.sh` builds) survives the loss of its leader's
//! network: `docker network disconnect` the leader, the other two elect a new one and take
//! submissions (through the follower too, which forwards), runs complete, and once the old
//! leader is connected back `muster cluster status` shows all three in sync. Every
//! acknowledged run exists exactly once (issue 3, "Containers").
//!
//! Most runs are plain commands: the agents run them as processes inside their containers
//! (busybox `sh`). A few name the busybox test image: the agents start those through the
//! host's engine (its socket is mounted into them), which checks that their work
//! directories exist at the same path on the host (`MUSTER_AGENT_ROOT`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use muster_core::RunSpec;
use muster_proto::Word;
use muster_proto::v1;
use muster_proto::v1::cluster_service_client::ClusterServiceClient;
use muster_testkit::compose::{MusterCompose, compose_or_skip};
use muster_testkit::images::{
    BUSYBOX_IMAGE, busybox_image, docker_or_skip, remove_containers_labelled,
};
use muster_testkit::{muster, muster_bin};
use serde_json::Value;
use tonic::Code;

/// One RPC or CLI call never waits longer than this.
const CALL: Duration = Duration::from_secs(10);

/// The command of run `key`: the key itself is the marker that finds it again.
fn command(key: &str) -> String {
    format!("echo compose-run {key}")
}

/// Run `key`'s spec; keys starting with `image-` run in the busybox test image.
fn spec(key: &str) -> v1::RunSpec {
    let mut s = RunSpec::new(command(key));
    s.compute = "pool".into();
    s.experiment = "compose".into();
    if key.starts_with("image-") {
        s.environment.image = Some(BUSYBOX_IMAGE.into());
    }
    s.into()
}

/// Removes the containers the agents started for `runs` through the host's engine (they are
/// not part of the Compose project), also when the test panics.
struct RunContainers {
    docker: bollard::Docker,
    runs: Vec<String>,
}

impl Drop for RunContainers {
    fn drop(&mut self) {
        let docker = self.docker.clone();
        let runs = std::mem::take(&mut self.runs);
        // Drop may run on an async worker: clean up on a thread of its own with its runtime.
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            rt.block_on(async {
                for run in runs {
                    let removed = tokio::time::timeout(
                        Duration::from_secs(30),
                        remove_containers_labelled(&docker, "muster.run_id", &run),
                    )
                    .await;
                    if !matches!(removed, Ok(Ok(()))) {
                        eprintln!("could not remove the containers of {run}: {removed:?}");
                    }
                }
            })
        })
        .join();
        if cleaned.is_err() {
            eprintln!("cleaning up the run containers panicked");
        }
    }
}

/// One server's own view of the cluster, or `None` if it does not answer within [`CALL`].
async fn own_status(url: &str) -> Option<v1::ClusterStatus> {
    let ask = async {
        let credentials = muster_testkit::access::admin(url);
        let channel = credentials
            .endpoint(url)
            .ok()?
            .connect_timeout(Duration::from_secs(2))
            .timeout(CALL)
            .connect()
            .await
            .ok()?;
        ClusterServiceClient::new(credentials.attach(channel))
            .status(v1::ClusterStatusRequest::default())
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    tokio::time::timeout(CALL, ask).await.ok().flatten()
}

/// `muster -o json cluster status` through every server's address, parsed.
async fn cli_status(compose: &MusterCompose) -> Option<Value> {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        muster(
            &compose.urls(),
            dir.path(),
            &["-o", "json", "cluster", "status"],
        ),
    )
    .await
    .ok()?;
    if out.code != 0 {
        return None;
    }
    serde_json::from_str(&out.stdout).ok()
}

/// True if the CLI's status shows a leader and every member reachable, on the leader's
/// term, with nothing left to apply.
fn all_in_sync(status: &Value) -> bool {
    let members = status["members"].as_array().cloned().unwrap_or_default();
    status["leader"].is_u64()
        && members.len() == 3
        && members.iter().all(|m| {
            m["reachable"] == true
                && m["voter"] == true
                && m["lag"] == 0
                && m["term"] == status["term"]
                && m["applied_index"].as_u64() >= status["commit_index"].as_u64()
        })
}

/// Submits run `key` through `urls` in turn (a client's failover), retrying (bounded) while
/// there is no leader. Returns the acknowledged id, or `None` if nobody acknowledged it.
async fn submit(urls: &[String], first: usize, key: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    while Instant::now() < deadline {
        let url = &urls[(first + attempt) % urls.len()];
        attempt += 1;
        let answer = tokio::time::timeout(CALL, async {
            let mut c = muster_testkit::access::clients(url).await.ok()?;
            Some(
                c.runs
                    .submit_run(v1::SubmitRunRequest {
                        spec: Some(spec(key)),
                        idempotency_key: Some(key.to_string()),
                    })
                    .await,
            )
        })
        .await;
        match answer {
            Ok(Some(Ok(r))) => return Some(r.into_inner().id),
            Ok(Some(Err(s)))
                if !matches!(
                    s.code(),
                    Code::Unavailable
                        | Code::Cancelled
                        | Code::Unknown
                        | Code::Internal
                        | Code::DeadlineExceeded
                ) =>
            {
                panic!("submission {key} refused: {s:?}")
            }
            // No answer, no connection, or no leader right now: the next server.
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    None
}

/// Every run, read (linearizably) through `url`; `None` if that fails within [`CALL`].
async fn runs_via(url: &str, stale: bool) -> Option<Vec<v1::Run>> {
    tokio::time::timeout(CALL, async {
        let mut c = muster_testkit::access::clients(url).await.ok()?;
        c.runs
            .list_runs(v1::ListRunsRequest {
                stale,
                ..Default::default()
            })
            .await
            .ok()
            .map(|r| r.into_inner().runs)
    })
    .await
    .ok()
    .flatten()
}

/// Waits (bounded: `limit`) until every run of `ids` has completed, reading through `urls`.
async fn wait_completed(urls: &[String], ids: &[String], limit: Duration) -> Vec<v1::Run> {
    let deadline = Instant::now() + limit;
    let mut last = Vec::new();
    let mut i = 0;
    while Instant::now() < deadline {
        i += 1;
        if let Some(runs) = runs_via(&urls[i % urls.len()], false).await {
            let done = ids.iter().all(|id| {
                runs.iter().any(|r| {
                    &r.id == id && r.state().word() == "completed" && r.exit_code == Some(0)
                })
            });
            if done {
                return runs;
            }
            last = runs;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let states: Vec<_> = last
        .iter()
        .map(|r| (r.id.as_str(), r.state().word()))
        .collect();
    panic!("runs did not all complete within {limit:?}: {states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_survives_a_disconnected_leader() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    if !compose_or_skip() {
        return;
    }
    let started = Instant::now();
    busybox_image(&docker).await.unwrap();
    // Declared before the project, so dropped after it: the agents are gone by then.
    let mut run_containers = RunContainers {
        docker,
        runs: Vec::new(),
    };
    let compose = MusterCompose::up(&muster_bin()).await.unwrap();
    let all: Vec<String> = (1..=3).map(|id| compose.url(id)).collect();

    // A leader, every member in sync, and both agents ready in the pool the setup created.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let synced = cli_status(&compose).await.is_some_and(|s| all_in_sync(&s));
        let dir = tempfile::tempdir().unwrap();
        let nodes = muster(&compose.urls(), dir.path(), &["-o", "json", "node", "list"]).await;
        let ready = serde_json::from_str::<Value>(&nodes.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|n| n.iter().filter(|n| n["state"] == "ready").count() == 2);
        if synced && ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no leader with both agents ready within 120 s: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Runs through every server complete before anything goes wrong.
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..6 {
        let key = format!("before-{i}");
        let id = submit(&all, i, &key).await.expect("acknowledged");
        acked.insert(key, id);
    }
    for i in 0..2 {
        let key = format!("image-{i}");
        let id = submit(&all, i, &key).await.expect("acknowledged");
        run_containers.runs.push(id.clone());
        acked.insert(key, id);
    }
    let ids: Vec<String> = acked.values().cloned().collect();
    wait_completed(&all, &ids, Duration::from_secs(120)).await;

    // Cut the leader off the network.
    let old = own_status(&all[0])
        .await
        .and_then(|s| s.leader)
        .expect("server 1 knows the leader");
    let service = MusterCompose::service(old);
    let aliases = compose
        .project
        .disconnect(&service, MusterCompose::NETWORK)
        .await
        .unwrap();
    let cut_at = Instant::now();
    let others: Vec<String> = (1..=3)
        .filter(|&id| id != old)
        .map(|id| compose.url(id))
        .collect();

    // The other two elect a new leader among themselves (bounded).
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = loop {
        let mut views = Vec::new();
        for url in &others {
            views.push(own_status(url).await.and_then(|s| s.leader));
        }
        if let [Some(a), Some(b)] = views[..]
            && a == b
            && a != old
        {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader among the others within 30 s: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The old leader, alone, steps down (check-quorum): it knows no leader any more. Asked
    // from inside its container (its published port went with its network), over TLS, as
    // the admin.
    let deadline = Instant::now() + Duration::from_secs(30);
    let token = format!(
        "MUSTER_TOKEN={}",
        muster_testkit::access::admin_token(&compose.urls()).expect("logged in")
    );
    loop {
        let health = compose
            .project
            .exec(
                &service,
                &[
                    "env",
                    &token,
                    "muster",
                    "--ca-file",
                    "/tls/ca.pem",
                    "--server",
                    "https://127.0.0.1:7070",
                    "-o",
                    "json",
                    "cluster",
                    "status",
                ],
            )
            .await;
        if let Ok(h) = &health
            && let Ok(v) = serde_json::from_str::<Value>(&h.stdout)
            && v.get("leader").is_some_and(Value::is_null)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cut-off leader {old} did not step down within 30 s: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Submissions continue through the other two (the follower forwards to the new leader),
    // and complete on the agents, which follow the new leader.
    let mut during = Vec::new();
    for i in 0..12 {
        let key = format!("during-{i}");
        let id = submit(&others, i, &key)
            .await
            .unwrap_or_else(|| panic!("{key} was not acknowledged within 60 s"));
        during.push(id.clone());
        acked.insert(key, id);
    }
    wait_completed(&others, &during, Duration::from_secs(120)).await;
    let during_done = cut_at.elapsed();

    // Connect it back: every member in sync again (bounded), the leader unchanged or not.
    compose
        .project
        .connect(&service, MusterCompose::NETWORK, &aliases)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = cli_status(&compose).await;
        if let Some(s) = &status
            && all_in_sync(s)
        {
            break s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the members were not all in sync within 60 s of reconnecting: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_ne!(status["leader"], Value::Null, "{status}");

    // Every acknowledged run exists exactly once, under the id it was acknowledged with,
    // and completed; nothing else exists. Read through each server, and from the rejoined
    // one's own replica too.
    for (url, stale) in [
        (compose.url(1), false),
        (compose.url(2), false),
        (compose.url(3), false),
        (compose.url(old), true),
    ] {
        let runs = runs_via(&url, stale)
            .await
            .unwrap_or_else(|| panic!("listing the runs through {url} failed"));
        for (key, id) in &acked {
            let same: Vec<&v1::Run> = runs
                .iter()
                .filter(|r| r.spec.as_ref().is_some_and(|s| s.command == command(key)))
                .collect();
            assert_eq!(same.len(), 1, "{key} via {url} (stale {stale}): {same:?}");
            assert_eq!(&same[0].id, id, "{key} via {url}");
            assert_eq!(same[0].state().word(), "completed", "{key} via {url}");
        }
        assert_eq!(runs.len(), acked.len(), "via {url}: {runs:?}");
    }
    eprintln!(
        "leader {old} cut off, {new} elected, {} runs acknowledged exactly once; the runs \
         submitted during the cut completed {during_done:?} after it; {:?} in all",
        acked.len(),
        started.elapsed()
    );
}
