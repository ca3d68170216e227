//! Metrics end to end: a run logs points to `$MUSTER_METRICS_FILE` and as `##muster[metric]`
//! stdout lines (and some malformed lines); `muster run metrics` prints every point once,
//! `run show` the last values and the malformed count, `--follow` sees points while the run
//! runs, and an ended run's metrics survive the loss of the leader that took them.

use std::process::Stdio;
use std::time::Duration;

use muster_core::RunSpec;
use muster_proto::Word;
use muster_proto::v1;
use muster_testkit::cluster::TestCluster;
use muster_testkit::{DevCluster, muster, muster_bin};
use muster_tests::{
    all_urls, cluster_agent, create_attached, submit_id, wait_done, wait_for_state, write,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

/// 40 points of `loss` to the file, 40 of `acc` on stdout, 3 malformed lines, and a last
/// file line without a newline.
const SCRIPT: &str = r###"i=1
while [ $i -le 40 ]; do
  echo "{\"name\":\"loss\",\"value\":$i.5,\"step\":$i}" >> "$MUSTER_METRICS_FILE"
  echo "##muster[metric] name=acc value=$((i * 2)) step=$i"
  echo "ordinary output $i"
  i=$((i + 1))
done
echo 'not json at all' >> "$MUSTER_METRICS_FILE"
echo '{"name":"loss"}' >> "$MUSTER_METRICS_FILE"
echo '##muster[metric] name=acc value=high'
printf '{"name":"tail","value":7}' >> "$MUSTER_METRICS_FILE"
"###;

fn points(v: &Value, name: &str) -> Vec<(u64, f64)> {
    v["metrics"][name]
        .as_array()
        .unwrap_or_else(|| panic!("no metric {name} in {v}"))
        .iter()
        .map(|p| (p["step"].as_u64().unwrap(), p["value"].as_f64().unwrap()))
        .collect()
}

fn expected_loss() -> Vec<(u64, f64)> {
    (1..=40).map(|i| (i, i as f64 + 0.5)).collect()
}

fn expected_acc() -> Vec<(u64, f64)> {
    (1..=40).map(|i| (i, (i * 2) as f64)).collect()
}

fn check_metrics(v: &Value) {
    assert_eq!(points(v, "loss"), expected_loss(), "{v}");
    assert_eq!(points(v, "acc"), expected_acc(), "{v}");
    assert_eq!(points(v, "tail"), [(0, 7.0)], "{v}");
    assert_eq!(v["malformed"], 3, "{v}");
    assert!(v["last_error"].is_string(), "{v}");
}

/// Submits `spec` through `url` (gRPC); the new run's id.
async fn submit_spec(url: &str, spec: RunSpec) -> String {
    muster_testkit::access::clients(url)
        .await
        .unwrap()
        .runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(spec.into()),
            idempotency_key: None,
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

/// Polls (bounded: 30 s) `url` for the run's metrics until `check` holds; none if it never did.
async fn poll_metrics(
    url: &str,
    id: &str,
    check: impl Fn(&v1::RunMetrics) -> bool,
) -> Option<v1::RunMetrics> {
    let mut c = muster_testkit::access::clients(url).await.unwrap();
    for _ in 0..600 {
        let m = c
            .metrics
            .get_run_metrics(v1::GetRunMetricsRequest {
                run_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if check(&m) {
            return Some(m);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_from_the_file_and_stdout_arrive_once_and_show_on_run_show() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "train.sh", SCRIPT);
    let id = submit_id(
        &dev.url(),
        project.path(),
        &["run", "submit", "--", "sh", "train.sh"],
    )
    .await;
    let done = wait_done(&dev.url(), &id).await;
    assert_eq!(
        done.state().word(),
        "completed",
        "malformed lines are never fatal: {done:?}"
    );

    let json = muster(
        &dev.url(),
        project.path(),
        &["run", "metrics", &id, "-o", "json"],
    )
    .await;
    assert_eq!(json.code, 0, "{json:?}");
    check_metrics(&serde_json::from_str(&json.stdout).unwrap());

    // The table: one row per point, and a note of the malformed lines.
    let table = muster(&dev.url(), project.path(), &["run", "metrics", &id]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert_eq!(
        table.stdout.lines().filter(|l| l.contains("loss")).count(),
        40,
        "{table:?}"
    );
    assert_eq!(
        table.stdout.lines().filter(|l| l.contains(" acc ")).count(),
        40,
        "{table:?}"
    );
    assert!(table.stderr.contains("3 malformed"), "{table:?}");
    let one = muster(
        &dev.url(),
        project.path(),
        &["run", "metrics", &id, "--name", "acc", "-o", "json"],
    )
    .await;
    let one: Value = serde_json::from_str(&one.stdout).unwrap();
    assert_eq!(points(&one, "acc"), expected_acc());
    assert!(one["metrics"].get("loss").is_none(), "{one}");
    let bad = muster(
        &dev.url(),
        project.path(),
        &["run", "metrics", &id, "--name", "a b"],
    )
    .await;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("name"), "{bad:?}");

    // `run show`: the last value of each metric and the malformed count.
    let show = muster(&dev.url(), project.path(), &["run", "show", &id]).await;
    assert!(show.stdout.contains("loss = 40.5 (step 40)"), "{show:?}");
    assert!(show.stdout.contains("acc = 80 (step 40)"), "{show:?}");
    assert!(show.stdout.contains("3 malformed"), "{show:?}");
    let show = muster(
        &dev.url(),
        project.path(),
        &["run", "show", &id, "-o", "json"],
    )
    .await;
    let v: Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(v["metrics"]["last"]["loss"]["value"], 40.5, "{v}");
    assert_eq!(v["metrics"]["malformed"], 3, "{v}");

    // A server restart keeps them (the series store is on disk; the run's are sealed too).
    let mut dev = dev;
    dev.restart().await.unwrap();
    let again = muster(
        &dev.url(),
        project.path(),
        &["run", "metrics", &id, "-o", "json"],
    )
    .await;
    check_metrics(&serde_json::from_str(&again.stdout).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_prints_points_while_the_run_is_running() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    let gate = project.path().join("go");
    // One point, then wait (bounded) for the test to open the gate, then two more. The
    // two come through different streams (the log, the metrics file), shipped on their
    // own ticks: a second apart, their order of arrival is their order of writing.
    write(
        project.path(),
        "train.sh",
        &format!(
            r#"echo '{{"name":"loss","value":1,"step":1}}' >> "$MUSTER_METRICS_FILE"
n=0; while [ ! -e '{gate}' ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
echo '##muster[metric] name=loss value=2 step=2'
sleep 1
echo '{{"name":"loss","value":3,"step":3}}' >> "$MUSTER_METRICS_FILE"
"#,
            gate = gate.display()
        ),
    );
    let id = submit_id(
        &dev.url(),
        project.path(),
        &["run", "submit", "--", "sh", "train.sh"],
    )
    .await;
    let mut child = tokio::process::Command::new(muster_bin())
        .args(["--server", &dev.url(), "run", "metrics", &id, "--follow"])
        .env_remove("MUSTER_SERVER")
        .env("MUSTER_TOKEN", dev.token())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // The first point arrives while the run waits at the gate.
    let first = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            seen.push(l.clone());
            if l.starts_with("loss") {
                return true;
            }
        }
        false
    })
    .await
    .expect("the first point within 60 s");
    assert!(first, "{seen:?}");
    let run = wait_for_state(&dev.url(), &id, "running").await;
    assert_eq!(run.state().word(), "running");
    std::fs::write(&gate, "").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            seen.push(l);
        }
        child.wait().await.unwrap()
    })
    .await
    .expect("follow ends with the run");
    assert!(status.success(), "{seen:?}");
    let rows: Vec<Vec<String>> = seen
        .iter()
        .filter(|l| l.starts_with("loss"))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    assert_eq!(
        rows,
        [["loss", "1", "1"], ["loss", "2", "2"], ["loss", "3", "3"]],
        "every point once, in order: {seen:?}"
    );
    assert_eq!(wait_done(&dev.url(), &id).await.state().word(), "completed");
}

/// In a container, `$MUSTER_METRICS_FILE` is under `/workspace/logs`, mounted from the
/// attempt's folder on the host, so the agent ships what the run writes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_run_logs_metrics_to_the_mapped_file() {
    let Some(docker) = muster_testkit::images::docker_or_skip().await else {
        return;
    };
    let image = muster_testkit::images::busybox_image(&docker)
        .await
        .unwrap();
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "train.sh", SCRIPT);
    write(
        project.path(),
        "where.sh",
        "echo \"file at $MUSTER_METRICS_FILE\"; sh train.sh\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &[
            "run", "submit", "--image", &image, "--stream", "--", "sh", "where.sh",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("file at /workspace/logs/metrics.jsonl"),
        "{out:?}"
    );
    let id = muster_tests::all_runs(&dev.url()).await[0].id.clone();
    let json = muster(
        &dev.url(),
        project.path(),
        &["run", "metrics", &id, "-o", "json"],
    )
    .await;
    check_metrics(&serde_json::from_str(&json.stdout).unwrap());
}

/// A run's metrics are sealed into a replicated blob when it ends: with the leader that
/// took them from the agent gone (and the agent stopped), both survivors serve them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_runs_metrics_are_served_by_a_survivor_of_the_leader() {
    let mut cluster = TestCluster::start(3).await.unwrap();
    let urls = all_urls(&cluster);
    create_attached(&cluster.urls(), "m-pool").await;
    let data = tempfile::tempdir().unwrap();
    let agent = cluster_agent(&cluster, data.path(), "m-pool", "metrics-node").await;
    let mut s = RunSpec::new(SCRIPT);
    s.compute = "m-pool".into();
    let mut id = None;
    for i in 0..60 {
        let Ok(mut c) = muster_testkit::access::clients(&urls[i % urls.len()]).await else {
            continue;
        };
        match c
            .runs
            .submit_run(v1::SubmitRunRequest {
                spec: Some(s.clone().into()),
                idempotency_key: Some("metrics-ha".into()),
            })
            .await
        {
            Ok(r) => {
                id = Some(r.into_inner().id);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let id = id.expect("submitted");
    let leader = cluster.leader().await.unwrap();
    let done = wait_done(&cluster.url(leader), &id).await;
    assert_eq!(done.state().word(), "completed", "{done:?}");
    agent.stop().await.unwrap();
    let leader = cluster.leader().await.unwrap();
    cluster.kill(leader).await.unwrap();
    let survivors: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    cluster.leader_among(&survivors).await.unwrap();
    for sid in survivors {
        let out = muster(
            &cluster.url(sid),
            data.path(),
            &["run", "metrics", &id, "-o", "json"],
        )
        .await;
        assert_eq!(out.code, 0, "server {sid}: {out:?}");
        check_metrics(&serde_json::from_str(&out.stdout).unwrap());
        let show = muster(&cluster.url(sid), data.path(), &["run", "show", &id]).await;
        assert!(show.stdout.contains("loss = 40.5 (step 40)"), "{show:?}");
    }
}

/// While a run runs, its points are on the leader; a follower relays them from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_relays_a_running_runs_metrics_from_the_leader() {
    let cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "m-pool").await;
    let data = tempfile::tempdir().unwrap();
    let agent = cluster_agent(&cluster, data.path(), "m-pool", "relay-node").await;
    let gate = data.path().join("go");
    let mut s = RunSpec::new(format!(
        r#"echo '{{"name":"loss","value":1,"step":1}}' >> "$MUSTER_METRICS_FILE"
n=0; while [ ! -e '{gate}' ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
echo '{{"name":"loss","value":2,"step":2}}' >> "$MUSTER_METRICS_FILE""#,
        gate = gate.display()
    ));
    s.compute = "m-pool".into();
    let leader = cluster.leader().await.unwrap();
    let id = submit_spec(&cluster.url(leader), s).await;
    let follower = cluster.ids().into_iter().find(|i| *i != leader).unwrap();
    let seen = poll_metrics(&cluster.url(follower), &id, |m| {
        m.series.iter().any(|s| !s.steps.is_empty())
    })
    .await;
    let m = seen.expect("the follower relays the first point within 30 s");
    assert!(!m.ended, "{m:?}");
    assert_eq!(m.series[0].name, "loss");
    assert_eq!(
        (m.series[0].steps.clone(), m.series[0].values.clone()),
        (vec![1], vec![1.0])
    );
    std::fs::write(&gate, "").unwrap();
    assert_eq!(
        wait_done(&cluster.url(leader), &id).await.state().word(),
        "completed"
    );
    let out = muster(
        &cluster.url(follower),
        data.path(),
        &["run", "metrics", &id, "-o", "json"],
    )
    .await;
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(points(&v, "loss"), [(1, 1.0), (2, 2.0)], "{v}");
    assert_eq!(v["ended"], true, "{v}");
    agent.stop().await.unwrap();
}

/// The leader that takes a running run's points dies: the agent reconnects to the new
/// leader, which asks for the metrics file (and log) from its own, empty, copy; the agent
/// resends, and every point is there exactly once when the run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_gets_a_running_runs_points_again_exactly_once() {
    let mut cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "m-pool").await;
    let data = tempfile::tempdir().unwrap();
    let agent = cluster_agent(&cluster, data.path(), "m-pool", "failover-node").await;
    let gate = data.path().join("go");
    let mut s = RunSpec::new(format!(
        r###"i=1; while [ $i -le 20 ]; do echo "{{\"name\":\"loss\",\"value\":$i,\"step\":$i}}" >> "$MUSTER_METRICS_FILE"; echo "##muster[metric] name=acc value=$i step=$i"; i=$((i + 1)); done
n=0; while [ ! -e '{gate}' ] && [ $n -lt 900 ]; do sleep 0.1; n=$((n + 1)); done
i=21; while [ $i -le 40 ]; do echo "{{\"name\":\"loss\",\"value\":$i,\"step\":$i}}" >> "$MUSTER_METRICS_FILE"; echo "##muster[metric] name=acc value=$i step=$i"; i=$((i + 1)); done"###,
        gate = gate.display()
    ));
    s.compute = "m-pool".into();
    let leader = cluster.leader().await.unwrap();
    let id = submit_spec(&cluster.url(leader), s).await;
    // The first 20 points of each metric reached the leader.
    let reached = poll_metrics(&cluster.url(leader), &id, |m| {
        m.series.len() == 2 && m.series.iter().all(|s| s.steps.len() == 20)
    })
    .await;
    assert!(
        reached.is_some(),
        "the leader got the first points within 30 s"
    );
    cluster.kill(leader).await.unwrap();
    let survivors: Vec<u64> = cluster.ids().into_iter().filter(|i| *i != leader).collect();
    let new_leader = cluster.leader_among(&survivors).await.unwrap();
    std::fs::write(&gate, "").unwrap();
    let done = wait_done(&cluster.url(new_leader), &id).await;
    assert_eq!(done.state().word(), "completed", "{done:?}");
    assert_eq!(
        done.attempt, 1,
        "the run kept running through the failover: {done:?}"
    );
    let expected: Vec<(u64, f64)> = (1..=40).map(|i| (i, i as f64)).collect();
    for sid in survivors {
        let out = muster(
            &cluster.url(sid),
            data.path(),
            &["run", "metrics", &id, "-o", "json"],
        )
        .await;
        assert_eq!(out.code, 0, "server {sid}: {out:?}");
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(points(&v, "loss"), expected, "server {sid}: {v}");
        assert_eq!(points(&v, "acc"), expected, "server {sid}: {v}");
        assert_eq!(v["malformed"], 0, "{v}");
    }
    agent.stop().await.unwrap();
}
