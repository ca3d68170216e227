//! High availability: a 3-server cluster that loses its leader, or has it cut off, loses and
//! duplicates nothing it acknowledged (DESIGN.md invariant 1).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use muster_core::RunSpec;
use muster_proto::Word;
use muster_proto::v1;
use muster_testkit::cluster::TestCluster;
use muster_tests::{all_urls, cluster_agent, create_attached};
use tonic::Code;

fn spec(i: usize) -> v1::RunSpec {
    let mut s = RunSpec::new(format!("python train.py --trial {i}"));
    s.compute = "ha-pool".into();
    s.experiment = "ha".into();
    s.into()
}

/// Submits with an idempotency key, retrying (bounded) on UNAVAILABLE against the next
/// server, as every muster client does. Returns the acknowledged run id.
async fn submit_with_retries(
    urls: &[String],
    first: usize,
    key: String,
    spec: v1::RunSpec,
) -> Option<String> {
    for attempt in 0..60 {
        let url = &urls[(first + attempt) % urls.len()];
        let Ok(mut c) = muster_testkit::access::clients(url).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        match c
            .runs
            .submit_run(v1::SubmitRunRequest {
                spec: Some(spec.clone()),
                idempotency_key: Some(key.clone()),
            })
            .await
        {
            Ok(r) => return Some(r.into_inner().id),
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("submission {key} refused: {s:?}"),
        }
    }
    None
}

async fn runs_on(url: &str, stale: bool) -> Vec<v1::Run> {
    let mut c = muster_testkit::access::clients(url).await.unwrap();
    c.runs
        .list_runs(v1::ListRunsRequest {
            stale,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_and_duplicates_nothing() {
    let mut cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "ha-pool").await;
    let urls: Arc<Vec<String>> = Arc::new(all_urls(&cluster));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..16usize {
        let urls = urls.clone();
        let acked = acked.clone();
        clients.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for n in 0..63usize {
                let i = client * 63 + n;
                let key = format!("ha-{i}");
                if let Some(id) = submit_with_retries(&urls, client, key.clone(), spec(i)).await {
                    acked.fetch_add(1, Ordering::Relaxed);
                    mine.push((key, id));
                }
            }
            mine
        }));
    }
    // Kill the leader while submissions are in flight.
    for _ in 0..200 {
        if acked.load(Ordering::Relaxed) >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let leader = cluster.leader().await.unwrap();
    cluster.kill(leader).await.unwrap();
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    for c in clients {
        acknowledged.extend(c.await.unwrap());
    }
    assert_eq!(
        acknowledged.len(),
        1008,
        "every submission was eventually acknowledged"
    );
    let survivors: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    let new_leader = cluster.leader_among(&survivors).await.unwrap();
    assert_ne!(new_leader, leader);
    let runs = runs_on(&cluster.url(new_leader), false).await;
    let ids: BTreeSet<&str> = runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), runs.len());
    assert_eq!(
        runs.len(),
        1008,
        "exactly one run per acknowledged submission"
    );
    for (key, id) in &acknowledged {
        let run = runs
            .iter()
            .find(|r| &r.id == id)
            .unwrap_or_else(|| panic!("acknowledged run {id} ({key}) was lost"));
        let i: usize = key.trim_start_matches("ha-").parse().unwrap();
        assert_eq!(
            run.spec.as_ref().unwrap().command,
            format!("python train.py --trial {i}"),
            "not half-applied"
        );
    }
    // The killed server comes back and converges on the same runs.
    cluster.restart(leader).await.unwrap();
    let mut converged = false;
    for _ in 0..100 {
        if runs_on(&cluster.url(leader), true).await.len() == 1008 {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(converged, "the restarted server caught up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_steps_down_and_the_majority_carries_on() {
    let cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "ha-pool").await;
    let old = cluster.leader().await.unwrap();
    let mut early = muster_testkit::access::clients(&cluster.url(old))
        .await
        .unwrap();
    cluster.isolate(old);
    // A write sent while it still believes it leads fails once it steps down (check-quorum,
    // about an election timeout), not after the client's timeout.
    let sent = std::time::Instant::now();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        early.runs.submit_run(v1::SubmitRunRequest {
            spec: Some(spec(0)),
            idempotency_key: Some("iso-early".into()),
        }),
    )
    .await
    .expect("answers within 10 s");
    assert_eq!(refused.unwrap_err().code(), Code::Unavailable);
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "refused after {:?}",
        sent.elapsed()
    );
    let majority: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != old).collect();
    let new = cluster.leader_among(&majority).await.unwrap();
    assert_ne!(new, old);
    // The old leader steps down (check-quorum) and refuses writes.
    let mut stepped_down = false;
    for _ in 0..60 {
        if cluster
            .status(old)
            .await
            .is_some_and(|s| s.role != "leader")
        {
            stepped_down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stepped_down, "the isolated leader stepped down");
    let mut c = muster_testkit::access::clients(&cluster.url(old))
        .await
        .unwrap();
    let sent = std::time::Instant::now();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        c.runs.submit_run(v1::SubmitRunRequest {
            spec: Some(spec(0)),
            idempotency_key: Some("iso-0".into()),
        }),
    )
    .await
    .expect("answers within 10 s")
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("no leader"), "{refused:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "refused after {:?}",
        sent.elapsed()
    );
    // The CLI, given only that server, says the same within its retry budget, before it
    // uploads anything anywhere.
    let project = tempfile::tempdir().unwrap();
    muster_tests::write(project.path(), "train.py", "print('minority')\n");
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        muster_testkit::muster(
            &cluster.url(old),
            project.path(),
            &["run", "submit", "--compute", "ha-pool", "--", "true"],
        ),
    )
    .await
    .expect("the CLI gives up within 15 s");
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("no leader"), "{out:?}");
    // The majority takes writes.
    for i in 1..=20 {
        assert!(
            submit_with_retries(&[cluster.url(new)], 0, format!("iso-{i}"), spec(i))
                .await
                .is_some()
        );
    }
    // Heal: the old leader catches up; nobody lost anything, "iso-0" never happened.
    cluster.heal();
    let mut same = false;
    for _ in 0..100 {
        let a = runs_on(&cluster.url(old), true).await;
        let b = runs_on(&cluster.url(new), false).await;
        if a.len() == 20 && a == b {
            same = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(same, "healing converges on the majority's 20 runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_uploaded_to_one_server_survives_its_loss() {
    let mut cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "ha-pool").await;
    let leader = cluster.leader().await.unwrap();
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let project = tempfile::tempdir().unwrap();
    muster_tests::write(project.path(), "train.py", "print('replicated')\n");
    muster_tests::write(project.path(), "data/config.json", "{\"lr\": 0.1}\n");
    let out = muster_testkit::muster(
        &cluster.url(follower),
        project.path(),
        &[
            "run",
            "submit",
            "--compute",
            "ha-pool",
            "-o",
            "json",
            "--",
            "python",
            "train.py",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let run: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let manifest = run["code"]["manifest"].as_str().unwrap().to_string();
    // The server that took the upload dies; the others can still serve every blob.
    cluster.kill(follower).await.unwrap();
    for id in cluster.ids().into_iter().filter(|id| *id != follower) {
        let mut c = muster_testkit::access::clients(&cluster.url(id))
            .await
            .unwrap();
        let bytes = c.blobs.download_bytes(&manifest).await.unwrap();
        let m: muster_core::snapshot::Manifest = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(m.files.len(), 2);
        for f in &m.files {
            c.blobs
                .download_bytes(&f.sha256)
                .await
                .unwrap_or_else(|e| panic!("server {id} lacks {}: {e}", f.path));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_missing_a_blob_repairs_it_from_a_peer() {
    let cluster = TestCluster::start(3).await.unwrap();
    let mut a = muster_testkit::access::clients(&cluster.url(1))
        .await
        .unwrap();
    let sha = a.blobs.upload_bytes(b"weights v1".to_vec()).await.unwrap();
    let mut b = muster_testkit::access::clients(&cluster.url(2))
        .await
        .unwrap();
    let got = b.blobs.download_bytes(&sha).await.unwrap();
    assert_eq!(got, b"weights v1");
    let missing = b.blobs.missing(vec![sha.clone()]).await.unwrap();
    assert!(missing.is_empty(), "server 2 keeps the repaired copy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_ten_thousand_entries_catches_up_by_snapshot() {
    let mut cluster = TestCluster::start_with(3, |c| {
        c.raft.snapshot_interval = 2_000;
        c.raft.log_retained_after_snapshot = 100;
    })
    .await
    .unwrap();
    create_attached(&cluster.urls(), "ha-pool").await;
    let leader = cluster.leader().await.unwrap();
    let behind = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    cluster.kill(behind).await.unwrap();
    // 10,000 entries it misses, from 32 clients.
    let url = cluster.url(leader);
    let mut tasks = Vec::new();
    for client in 0..32usize {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = muster_testkit::access::clients(&url).await.unwrap();
            for n in 0..313usize {
                let i = client * 313 + n;
                c.runs
                    .submit_run(v1::SubmitRunRequest {
                        spec: Some(spec(i)),
                        idempotency_key: None,
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let status = cluster.status(leader).await.unwrap();
    assert!(
        status.first_index > 1_000,
        "the leader compacted its log: {status:?}"
    );
    cluster.restart(behind).await.unwrap();
    let mut caught_up = false;
    for _ in 0..150 {
        if let Some(s) = cluster.status(behind).await
            && s.applied_index >= status.commit_index
        {
            caught_up = true;
            assert!(
                s.snapshot_index >= status.first_index - 1,
                "it installed a snapshot: {s:?}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(caught_up, "the follower caught up");
    assert_eq!(runs_on(&cluster.url(behind), true).await.len(), 32 * 313);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_added_and_removed_under_load() {
    let mut cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "ha-pool").await;
    let urls: Arc<Vec<String>> = Arc::new(all_urls(&cluster));
    let load = {
        let urls = urls.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..400usize {
                if let Some(id) = submit_with_retries(&urls, i, format!("load-{i}"), spec(i)).await
                {
                    acked.push(id);
                }
            }
            acked
        })
    };
    cluster.join(4).await.unwrap();
    // The leader has applied the promotion; server 4 learns it with the next entries.
    let mut status = None;
    for _ in 0..50 {
        status = cluster.status(4).await;
        if status
            .as_ref()
            .is_some_and(|s| s.members.iter().any(|m| m.id == 4 && m.voter))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        status
            .as_ref()
            .is_some_and(|s| s.members.iter().any(|m| m.id == 4 && m.voter)),
        "server 4 votes: {status:?}"
    );
    let leader = cluster.leader().await.unwrap();
    let victim = cluster
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != 4)
        .unwrap();
    cluster.remove(victim).await.unwrap();
    let acked = load.await.unwrap();
    assert_eq!(acked.len(), 400);
    let leader = cluster.leader().await.unwrap();
    let s = cluster.status(leader).await.unwrap();
    let voters: Vec<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert_eq!(voters.len(), 3, "{s:?}");
    assert!(voters.contains(&4) && !voters.contains(&victim));
    let mut converged = false;
    for _ in 0..100 {
        if runs_on(&cluster.url(4), true).await.len() == 400 {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(converged, "the new server holds every run");
}

/// Kill, restart, isolate, cut and heal at random points while clients submit and cancel,
/// with an agent running the runs; after every step check DESIGN.md invariants 1
/// (acknowledged runs exist exactly once), 4 (at most one active attempt per run) and 5
/// (a run reaches exactly one terminal state). `MUSTER_FAULT_SEED` replays a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_keep_the_invariants() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("MUSTER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_124);
    eprintln!("randomized fault test: seed {seed} (rerun with MUSTER_FAULT_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "ha-pool").await;
    let data = tempfile::tempdir().unwrap();
    let _agent = cluster_agent(&cluster, data.path(), "ha-pool", "fault-node").await;
    let mut down: BTreeSet<u64> = BTreeSet::new();
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    let mut terminal: BTreeMap<String, &str> = BTreeMap::new();
    let mut next = 0usize;
    for step in 0..24 {
        let ids = cluster.ids();
        let action = rng.random_range(0..6);
        let target = ids[rng.random_range(0..ids.len())];
        match action {
            0 if down.is_empty() => {
                cluster.kill(target).await.unwrap();
                down.insert(target);
            }
            1 => {
                if let Some(id) = down.pop_first() {
                    cluster.restart(id).await.unwrap();
                }
            }
            2 => cluster.isolate(target),
            3 => {
                let other = ids[rng.random_range(0..ids.len())];
                if other != target {
                    cluster.cut(target, other);
                }
            }
            _ => cluster.heal(),
        }
        let alive: Vec<String> = ids
            .iter()
            .filter(|id| !down.contains(id))
            .map(|id| cluster.url(*id))
            .collect();
        // Clients submit (with retries, as muster clients do) and cancel.
        for _ in 0..5 {
            let key = format!("fault-{next}");
            let mut s = spec(next);
            s.command = if next.is_multiple_of(3) {
                "sleep 0.3".into()
            } else {
                "true".into()
            };
            if let Some(id) = submit_with_retries(&alive, next, key.clone(), s).await {
                acknowledged.insert(key, id);
            }
            next += 1;
        }
        if let Some((_, victim)) = acknowledged
            .iter()
            .nth(rng.random_range(0..acknowledged.len().max(1)))
        {
            for url in &alive {
                if let Ok(mut c) = muster_testkit::access::clients(url).await
                    && tokio::time::timeout(
                        Duration::from_secs(3),
                        c.runs.cancel_run(v1::CancelRunRequest {
                            id: victim.clone(),
                            reason: None,
                        }),
                    )
                    .await
                    .is_ok()
                {
                    break;
                }
            }
        }
        // Check the invariants on the majority's view (heal first so one exists).
        cluster.heal();
        let leader = cluster
            .leader_among(
                &ids.iter()
                    .copied()
                    .filter(|id| !down.contains(id))
                    .collect::<Vec<_>>(),
            )
            .await;
        let leader = leader.unwrap_or_else(|e| panic!("seed {seed}, step {step}: {e}"));
        let runs = runs_on(&cluster.url(leader), false).await;
        let by_id: BTreeMap<&str, &v1::Run> = runs.iter().map(|r| (r.id.as_str(), r)).collect();
        assert_eq!(
            by_id.len(),
            runs.len(),
            "seed {seed}, step {step}: a run id appears twice"
        );
        for (key, id) in &acknowledged {
            assert!(
                by_id.contains_key(id.as_str()),
                "seed {seed}, step {step}: acknowledged {key} ({id}) was lost"
            );
        }
        for run in &runs {
            let active = run
                .attempts
                .iter()
                .filter(|a| a.state().word() != "ended")
                .count();
            assert!(
                active <= 1,
                "seed {seed}, step {step}: {} has {active} active attempts",
                run.id
            );
            if let Some(before) = terminal.get(&run.id) {
                assert_eq!(
                    *before,
                    run.state().word(),
                    "seed {seed}, step {step}: {} changed its terminal state",
                    run.id
                );
            } else if matches!(
                run.state().word(),
                "completed" | "failed" | "canceled" | "timed_out"
            ) {
                terminal.insert(run.id.clone(), run.state().word());
            }
        }
    }
    assert!(
        acknowledged.len() >= 100,
        "seed {seed}: only {} submissions were acknowledged",
        acknowledged.len()
    );
}

/// Every blob file under `dir/blobs` whose content is `content`.
fn blobs_holding(dir: &std::path::Path, content: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(shards) = std::fs::read_dir(dir.join("blobs")) else {
        return found;
    };
    for shard in shards.flatten() {
        if shard.file_name() == "tmp" {
            continue;
        }
        for blob in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read(blob.path()).is_ok_and(|b| b == content) {
                found.push(blob.path());
            }
        }
    }
    found
}

/// A run's log, taken by the leader from the agent, is sealed into a blob on a majority
/// before the run's end is applied: with that leader gone, any survivor serves every line,
/// once, even one that lost its copy of the blob (it repairs it from a peer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_runs_log_survives_the_loss_of_the_leader_that_took_it() {
    let mut cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "ha-pool").await;
    let data = tempfile::tempdir().unwrap();
    let agent = cluster_agent(&cluster, data.path(), "ha-pool", "log-node").await;
    let mut s =
        RunSpec::new("i=1; while [ $i -le 300 ]; do echo \"log line $i\"; i=$((i+1)); done");
    s.compute = "ha-pool".into();
    let run = submit_with_retries(&all_urls(&cluster), 0, "logs-1".into(), s.into())
        .await
        .expect("submitted");
    let leader = cluster.leader().await.unwrap();
    let done = muster_tests::wait_done(&cluster.url(leader), &run).await;
    assert_eq!(done.state().word(), "completed", "{done:?}");
    let expected: String = (1..=300).map(|i| format!("log line {i}\n")).collect();
    // The leader that took the log from the agent dies (the agent stops too: nothing can
    // ship the log again).
    agent.stop().await.unwrap();
    let leader = cluster.leader().await.unwrap();
    cluster.kill(leader).await.unwrap();
    let survivors: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    // Both survivors hold the sealed log (replicated before the end was applied).
    for id in &survivors {
        assert_eq!(
            blobs_holding(&cluster.data_dir(*id), expected.as_bytes()).len(),
            1,
            "server {id} holds the sealed log"
        );
    }
    // One survivor loses its copy: it repairs it from the other when asked.
    let (damaged, intact) = (survivors[0], survivors[1]);
    for p in blobs_holding(&cluster.data_dir(damaged), expected.as_bytes()) {
        std::fs::remove_file(p).unwrap();
    }
    cluster.leader_among(&survivors).await.unwrap();
    for id in [damaged, intact] {
        let out =
            muster_testkit::muster(&cluster.url(id), data.path(), &["run", "logs", &run]).await;
        assert_eq!(out.code, 0, "server {id}: {out:?}");
        assert_eq!(
            out.stdout, expected,
            "server {id} serves every line exactly once"
        );
    }
    assert_eq!(
        blobs_holding(&cluster.data_dir(damaged), expected.as_bytes()).len(),
        1,
        "the damaged server repaired its copy"
    );
}

/// Whether `s` lists `n` members, each with the address it listens on, taken from the
/// replicated state.
fn addresses_replicated(cluster: &TestCluster, s: &v1::ClusterStatus, n: usize) -> bool {
    s.members.len() == n
        && s.addresses.len() == n
        && s.members
            .iter()
            .all(|m| m.address_replicated && cluster.url(m.id) == format!("http://{}", m.address))
}

/// Server addresses are replicated state: after a fourth server joins with `add-server`,
/// every server restarted on its data directory alone (no `--peers`) still reaches the
/// others: they elect a leader, forward writes to it, and all apply them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_servers_find_each_other_from_replicated_addresses() {
    let mut cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "ha-pool").await;
    cluster.join(4).await.unwrap();
    let ids = cluster.ids();
    for id in &ids {
        let mut recorded = false;
        for _ in 0..100 {
            if cluster
                .status(*id)
                .await
                .is_some_and(|s| addresses_replicated(&cluster, &s, 4))
            {
                recorded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            recorded,
            "server {id} holds every member's address: {:?}",
            cluster.status(*id).await
        );
    }
    for id in &ids {
        cluster.kill(*id).await.unwrap();
    }
    for id in &ids {
        cluster.restart_from_data_dir(*id).await.unwrap();
    }
    let leader = cluster.leader().await.unwrap();
    let follower = ids.iter().copied().find(|id| *id != leader).unwrap();
    submit_with_retries(&[cluster.url(follower)], 0, "after-restart".into(), spec(0))
        .await
        .expect("a write through a follower reaches the leader");
    for id in &ids {
        let mut applied = false;
        for _ in 0..100 {
            if runs_on(&cluster.url(*id), true).await.len() == 1 {
                applied = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(applied, "server {id} applied the write");
        let s = cluster.status(*id).await.unwrap();
        assert!(addresses_replicated(&cluster, &s, 4), "{s:?}");
    }
    // A removed server's address leaves the replicated state.
    let victim = ids.iter().copied().find(|id| *id != leader).unwrap();
    cluster.remove(victim).await.unwrap();
    let leader = cluster.leader().await.unwrap();
    let s = cluster.status(leader).await.unwrap();
    assert!(addresses_replicated(&cluster, &s, 3), "{s:?}");
    assert!(s.members.iter().all(|m| m.id != victim));
    let mut expected: Vec<u64> = ids.iter().copied().filter(|id| *id != victim).collect();
    expected.sort();
    let mut recorded: Vec<u64> = s.addresses.keys().copied().collect();
    recorded.sort();
    assert_eq!(recorded, expected, "{s:?}");
}

/// `run logs --follow` against a follower relays the live log from the leader while the
/// run prints, then serves the rest from the sealed blob: every line arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_follows_a_live_log_through_its_end_without_repeating_a_line() {
    let cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "ha-pool").await;
    let data = tempfile::tempdir().unwrap();
    let _agent = cluster_agent(&cluster, data.path(), "ha-pool", "follow-node").await;
    let leader = cluster.leader().await.unwrap();
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let mut s = RunSpec::new(
        "i=1; while [ $i -le 40 ]; do echo \"live line $i\"; sleep 0.05; i=$((i+1)); done",
    );
    s.compute = "ha-pool".into();
    let run = submit_with_retries(&[cluster.url(follower)], 0, "follow-1".into(), s.into())
        .await
        .expect("submitted");
    // Follow from the moment it is queued: the follower relays the leader's live log.
    let mut c = muster_testkit::access::clients(&cluster.url(follower))
        .await
        .unwrap();
    let mut stream = c
        .runs
        .stream_logs(v1::StreamLogsRequest {
            id: run.clone(),
            attempt: None,
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let followed = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = stream.message().await.unwrap() {
            assert_eq!(chunk.attempt, 1);
            assert_eq!(chunk.offset, got.len() as u64, "chunks follow each other");
            got.extend_from_slice(&chunk.data);
        }
    })
    .await;
    assert!(followed.is_ok(), "the follow ended with the run");
    let expected: String = (1..=40).map(|i| format!("live line {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&got), expected);
    let done = muster_tests::wait_done(&cluster.url(follower), &run).await;
    assert_eq!(done.state().word(), "completed", "{done:?}");
    // Once ended, the CLI reads it from the sealed blob on the follower.
    let out =
        muster_testkit::muster(&cluster.url(follower), data.path(), &["run", "logs", &run]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, expected);
}

/// Starts `muster server ARGS` with its data in `dir/NAME` and the cluster key of
/// `dir/cluster.key` (made on first use).
fn server_process(dir: &std::path::Path, name: &str, args: &[&str]) -> muster_tests::ChildGuard {
    let key = dir.join("cluster.key");
    if !key.exists() {
        std::fs::write(&key, format!("{:064x}\n", rand::random::<u128>())).unwrap();
    }
    muster_tests::ChildGuard(
        std::process::Command::new(muster_testkit::muster_bin())
            .arg("server")
            .args(args)
            .arg("--cluster-key-file")
            .arg(&key)
            .arg("--data-dir")
            .arg(dir.join(name))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits (bounded) until `muster cluster status` answers with a leader on `url`.
async fn wait_leader(url: &str, cwd: &std::path::Path) {
    for _ in 0..200 {
        let out = muster_testkit::muster(url, cwd, &["cluster", "status"]).await;
        if out.code == 0 && !out.stdout.contains("leader none") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader at {url} within 10 s");
}

/// `muster cluster add-server --id 2 --address ADDRESS` against `url`.
async fn add_server(url: &str, cwd: &std::path::Path, address: &str) -> muster_testkit::CliOutput {
    let args = ["cluster", "add-server", "--id", "2", "--address", address];
    muster_testkit::muster(url, cwd, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_alone_grows_into_a_cluster_whose_members_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (muster_tests::free_port(), muster_tests::free_port());
    let (url1, url2) = (
        format!("http://127.0.0.1:{p1}"),
        format!("http://127.0.0.1:{p2}"),
    );
    // No --peers: the address it listens on is the one it advertises.
    let _one = server_process(
        dir.path(),
        "s1",
        &["--id", "1", "--listen", &format!("127.0.0.1:{p1}")],
    );
    let token =
        muster_testkit::access::await_admin_token(&dir.path().join("s1/admin-token"), &url1)
            .await
            .unwrap();
    muster_testkit::access::register(&url2, &token);
    wait_leader(&url1, dir.path()).await;
    let _two = server_process(
        dir.path(),
        "s2",
        &[
            "--id",
            "2",
            "--listen",
            &format!("127.0.0.1:{p2}"),
            "--join",
        ],
    );
    let added = add_server(&url1, dir.path(), &format!("127.0.0.1:{p2}")).await;
    assert_eq!(added.code, 0, "{added:?}");
    // A write sent to the new member is forwarded to server 1, which it reaches by the
    // address server 1 recorded for itself.
    let created = muster_testkit::muster(
        &url2,
        dir.path(),
        &["compute", "create", "grown", "--type", "attached"],
    )
    .await;
    assert_eq!(created.code, 0, "{created:?}");
    let status =
        muster_testkit::muster(&url2, dir.path(), &["-o", "json", "cluster", "status"]).await;
    assert_eq!(status.code, 0, "{status:?}");
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let members: BTreeMap<u64, (String, bool)> = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                (
                    m["address"].as_str().unwrap().to_string(),
                    m["reachable"].as_bool().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(
        members,
        BTreeMap::from([
            (1, (format!("127.0.0.1:{p1}"), true)),
            (2, (format!("127.0.0.1:{p2}"), true)),
        ]),
        "{s}"
    );

    // Listening on every interface with nothing to advertise, a lone server cannot be
    // grown: add-server says what to do and changes nothing.
    let p3 = muster_tests::free_port();
    let url3 = format!("http://127.0.0.1:{p3}");
    let _three = server_process(
        dir.path(),
        "s3",
        &["--listen", &format!("0.0.0.0:{p3}"), "--insecure-no-tls"],
    );
    muster_testkit::access::await_admin_token(&dir.path().join("s3/admin-token"), &url3)
        .await
        .unwrap();
    wait_leader(&url3, dir.path()).await;
    let refused = add_server(&url3, dir.path(), "127.0.0.1:9").await;
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains(
            "server 1 has no address other servers can reach: restart it with --advertise HOST:PORT"
        ),
        "{refused:?}"
    );
    let status =
        muster_testkit::muster(&url3, dir.path(), &["-o", "json", "cluster", "status"]).await;
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["members"].as_array().unwrap().len(), 1, "{s}");
}

/// The id of the leader `muster cluster status` reports on `urls`.
async fn leader_of(urls: &str, cwd: &std::path::Path) -> u64 {
    let out = muster_testkit::muster(urls, cwd, &["-o", "json", "cluster", "status"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let s: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    s["leader"]
        .as_u64()
        .unwrap_or_else(|| panic!("a leader in {s}"))
}

/// Sends `signal` to a server process.
fn signal(server: &muster_tests::ChildGuard, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(server.0.id() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
}

/// Three `muster server` processes on loopback (ids 1..=3), a leader, the admin token
/// registered for each URL, and an `attached` target `parked` (no nodes: runs wait there).
struct ThreeServers {
    servers: Vec<muster_tests::ChildGuard>,
    ports: Vec<u16>,
}

impl ThreeServers {
    async fn start(dir: &std::path::Path) -> ThreeServers {
        let ports: Vec<u16> = (0..3).map(|_| muster_tests::free_port()).collect();
        let peers = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let servers = (1..=3u64)
            .map(|id| {
                let listen = format!("127.0.0.1:{}", ports[id as usize - 1]);
                let id_arg = id.to_string();
                let args = ["--id", &id_arg, "--listen", &listen, "--peers", &peers];
                server_process(dir, &format!("s{id}"), &args)
            })
            .collect();
        let three = ThreeServers { servers, ports };
        let all = three.all();
        let token = muster_testkit::access::await_admin_token(&dir.join("s1/admin-token"), &all)
            .await
            .unwrap();
        for id in 1..=3 {
            muster_testkit::access::register(&three.url(id), &token);
        }
        wait_leader(&all, dir).await;
        let args = ["compute", "create", "parked", "--type", "attached"];
        let created = muster_testkit::muster(&all, dir, &args).await;
        assert_eq!(created.code, 0, "{created:?}");
        three
    }

    fn url(&self, id: u64) -> String {
        format!("http://127.0.0.1:{}", self.ports[id as usize - 1])
    }

    /// Every server, 1 first.
    fn all(&self) -> String {
        (1..=3).map(|id| self.url(id)).collect::<Vec<_>>().join(",")
    }

    fn server(&self, id: u64) -> &muster_tests::ChildGuard {
        &self.servers[id as usize - 1]
    }

    /// `muster run submit` of `code` (a fresh snapshot each time) through `servers`.
    async fn submit(
        &self,
        servers: &str,
        code: &std::path::Path,
        i: usize,
    ) -> muster_testkit::CliOutput {
        std::fs::create_dir_all(code).unwrap();
        std::fs::write(code.join("train.py"), format!("print({i})\n")).unwrap();
        let args = [
            "run",
            "submit",
            "--compute",
            "parked",
            "--",
            "python3",
            "train.py",
        ];
        muster_testkit::muster(servers, code, &args).await
    }

    /// The number of runs the cluster holds (asked until it answers, within 15 s: right
    /// after a leader is killed the list waits for the next one).
    async fn runs(&self, cwd: &std::path::Path) -> usize {
        let mut last = None;
        for _ in 0..30 {
            let listed =
                muster_testkit::muster(&self.all(), cwd, &["-o", "json", "run", "list", "--all"])
                    .await;
            if let Ok(serde_json::Value::Array(runs)) = serde_json::from_str(&listed.stdout) {
                return runs.len();
            }
            last = Some(listed);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("run list did not answer within 15 s: {last:?}");
    }
}

/// A frozen server (SIGSTOP: a paused VM, a stalled disk) still has its port open, so a
/// peer's connection succeeds and then nothing answers. Submits with a snapshot (whose
/// blobs go to a majority before the run is acknowledged) keep being acknowledged while one
/// follower is frozen, through the leader or the other follower, and after it thaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_follower_does_not_hold_up_submits() {
    use nix::sys::signal::Signal;
    let dir = tempfile::tempdir().unwrap();
    let three = ThreeServers::start(dir.path()).await;
    let all = three.all();
    let code = dir.path().join("code");
    let leader = leader_of(&all, dir.path()).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let other = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    signal(three.server(follower), Signal::SIGSTOP);
    for (i, via) in [leader, other, leader].into_iter().enumerate() {
        let started = std::time::Instant::now();
        let out = three.submit(&three.url(via), &code, i).await;
        assert_eq!(out.code, 0, "submit {i} via server {via}: {out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "submit {i} via server {via} took {:?} with server {follower} frozen",
            started.elapsed()
        );
    }
    signal(three.server(follower), Signal::SIGCONT);
    let out = three.submit(&all, &code, 3).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(three.runs(dir.path()).await, 4);
}

/// A leader frozen with SIGSTOP (a paused VM): the two others elect a new leader, and
/// submits through either of them (each CLI given that one server) are acknowledged within
/// 3 s; a follower forwarding to the frozen leader gives up once it hears of the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_does_not_hold_up_submits() {
    use nix::sys::signal::Signal;
    let dir = tempfile::tempdir().unwrap();
    let three = ThreeServers::start(dir.path()).await;
    let all = three.all();
    let code = dir.path().join("code");
    let leader = leader_of(&all, dir.path()).await;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    signal(three.server(leader), Signal::SIGSTOP);
    for (i, via) in [others[0], others[1], others[0]].into_iter().enumerate() {
        let started = std::time::Instant::now();
        let out = three.submit(&three.url(via), &code, i).await;
        assert_eq!(out.code, 0, "submit {i} via server {via}: {out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "submit {i} via server {via} took {:?} with the leader {leader} frozen",
            started.elapsed()
        );
    }
    signal(three.server(leader), Signal::SIGCONT);
    let out = three.submit(&all, &code, 3).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(three.runs(dir.path()).await, 4);
}

/// `kill -9` of the first server in `--server` while users submit (four loops of CLI
/// processes, so some submits are in flight at the kill): every submit succeeds (the CLI
/// goes on to the next server, uploading the snapshot again where needed, with the same
/// idempotency key), and there are exactly as many runs as submits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_first_server_of_the_list_fails_no_submit_and_duplicates_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut three = ThreeServers::start(dir.path()).await;
    let all = three.all();
    let (loops, each) = (4, 6);
    let three_ref = &three;
    let submitted = futures::future::join_all((0..loops).map(|l| {
        let (all, code) = (all.clone(), dir.path().join(format!("code-{l}")));
        async move {
            let mut failures = Vec::new();
            for i in 0..each {
                let out = three_ref.submit(&all, &code, l * 100 + i).await;
                if out.code != 0 {
                    failures.push(format!("loop {l} submit {i}: {out:?}"));
                }
            }
            failures
        }
    }));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(three_ref.server(1).0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    };
    let (failures, ()) = tokio::join!(submitted, kill);
    let failures: Vec<String> = failures.into_iter().flatten().collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(three.runs(dir.path()).await, loops * each);
    three.servers[0].0.wait().unwrap();
}
