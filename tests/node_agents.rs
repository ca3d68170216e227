//! Node agents on real machines: runs in containers through the Docker engine, GPUs by
//! UUID, agents that restart or die (issue 4's scenarios).

use muster_proto::Word;
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_testkit::agents::{AgentHandle, AgentProcess, agent_config};
use muster_testkit::images::{busybox_image, docker_or_skip};
use muster_testkit::{DevCluster, FakeGpuProbe, muster};
use muster_tests::{
    all_runs, http_get, short_grace_dev, submit_id, submit_sh, wait_done, wait_for_state, write,
};

async fn create_pool(url: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = muster(
        url,
        dir.path(),
        &["compute", "create", name, "--type", "attached"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
}

/// The Docker engine, the test image, and `muster dev` with compute target `pool` (none
/// when there is no engine and `MUSTER_REQUIRE_DOCKER` is unset).
async fn docker_cluster(pool: Option<&str>) -> Option<(bollard::Docker, String, DevCluster)> {
    let docker = docker_or_skip().await?;
    let image = busybox_image(&docker).await.unwrap();
    let dev = short_grace_dev().await;
    if let Some(pool) = pool {
        create_pool(&dev.url(), pool).await;
    }
    Some((docker, image, dev))
}

/// Polls (bounded: `tries` × 100 ms) until the engine no longer has container `name`.
async fn container_gone(docker: &bollard::Docker, name: &str, tries: u32) -> bool {
    for _ in 0..tries {
        if docker.inspect_container(name, None).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `run show ID -o json`, polled (bounded: 10 s) until its message contains `needle`; the last one.
async fn shown_once_message_has(
    url: &str,
    cwd: &std::path::Path,
    id: &str,
    needle: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = muster(url, cwd, &["run", "show", id, "-o", "json"]).await;
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        if v["message"].as_str().is_some_and(|m| m.contains(needle)) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_run_streams_logs_keeps_outputs_and_is_isolated() {
    let Some((_docker, image, dev)) = docker_cluster(None).await else {
        return;
    };
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "train.sh",
        "echo \"in $(hostname) rank $MUSTER_NODE_RANK\"; ls /.dockerenv; echo 42 > outputs/result.txt; touch read-only 2>/dev/null || echo 'code is read-only'; exit 3\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &[
            "run", "submit", "--image", &image, "--stream", "--", "sh", "train.sh",
        ],
    )
    .await;
    assert_eq!(out.code, 3, "{out:?}");
    let host = muster_agent::hostname();
    assert!(
        out.stdout.contains("rank 0") && !out.stdout.contains(&format!("in {host} ")),
        "own hostname: {out:?}"
    );
    assert!(
        out.stdout.contains("/.dockerenv") && out.stdout.contains("code is read-only"),
        "{out:?}"
    );
    let run = &all_runs(&dev.url()).await[0];
    assert_eq!((run.state().word(), run.exit_code), ("failed", Some(3)));
    let to = project.path().join("dl");
    let dl = muster(
        &dev.url(),
        project.path(),
        &["run", "download", &run.id, "--to", to.to_str().unwrap()],
    )
    .await;
    assert_eq!(dl.code, 0, "{dl:?}");
    assert_eq!(
        std::fs::read_to_string(to.join("outputs/result.txt")).unwrap(),
        "42\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_reads_a_datastore_input_read_only() {
    let Some((_docker, image, dev)) = docker_cluster(None).await else {
        return;
    };
    let project = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    write(share.path(), "sets/a/x.txt", "from the share\n");
    let made = muster(
        &dev.url(),
        project.path(),
        &[
            "datastore",
            "create",
            "shared",
            "--path",
            share.path().to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(made.code, 0, "{made:?}");
    write(
        project.path(),
        "job.yml",
        &format!(
            "command: cat ${{{{inputs.d}}}}/x.txt && (touch ${{{{inputs.d}}}}/new 2>/dev/null || echo read-only)\nenvironment: {image}\ninputs:\n  d:\n    type: uri_folder\n    path: azureml://datastores/shared/paths/sets/a\n"
        ),
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "job.yml", "--stream"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "from the share\nread-only\n", "{out:?}");
    assert!(!share.path().join("sets/a/new").exists());
}

/// A v1 run configuration with `docker.enabled` and a base image runs in that image, as
/// `az ml run submit-script -c NAME` would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_run_configuration_with_a_docker_base_image_runs_in_it() {
    let Some((_docker, image, dev)) = docker_cluster(None).await else {
        return;
    };
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "hello.sh",
        "test -e /.dockerenv && echo \"in a container, args: $*\"\n",
    );
    write(
        project.path(),
        ".azureml/boxed.runconfig",
        &format!(
            "script: hello.sh\narguments: [--epochs, 2]\ntarget: local\nframework: Python\ncommunicator: None\nnodeCount: 1\nenvironment:\n  python:\n    userManagedDependencies: true\n    interpreterPath: sh\n  docker:\n    enabled: true\n    baseImage: {image}\n    shmSize: 64m\n"
        ),
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-c", "boxed", "--stream"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "in a container, args: --epochs 2\n", "{out:?}");
    assert!(!out.stderr.contains("warning"), "{out:?}");
}

/// Uploaded inputs in a container: `ro_mount` (the default) is read-only and linked from
/// the node's cache (no copy), `download` a writable copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_gets_read_only_linked_inputs_and_writable_downloads() {
    let Some((_docker, image, dev)) = docker_cluster(None).await else {
        return;
    };
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "data/a.txt", "data\n");
    write(
        project.path(),
        "job.yml",
        &format!(
            "command: >-\n  cat ${{{{inputs.ro}}}}/a.txt && stat -c 'links=%h' ${{{{inputs.ro}}}}/a.txt &&\n  (touch ${{{{inputs.ro}}}}/new 2>/dev/null && echo ro-writable || echo ro-read-only) &&\n  (echo more >> ${{{{inputs.rw}}}}/a.txt && cat ${{{{inputs.rw}}}}/a.txt)\nenvironment: {image}\ninputs:\n  ro:\n    type: uri_folder\n    path: data\n  rw:\n    type: uri_folder\n    path: data\n    mode: download\n"
        ),
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "job.yml", "--stream"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "data", "{out:?}");
    let links: u32 = lines[1].strip_prefix("links=").unwrap().parse().unwrap();
    assert!(
        links >= 2,
        "a read-only input is a link to the cache: {out:?}"
    );
    assert_eq!(&lines[2..], ["ro-read-only", "data", "more"], "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_timeout_cancel_and_missing_images_end_runs_clearly() {
    let Some((docker, image, dev)) = docker_cluster(None).await else {
        return;
    };
    let p = tempfile::tempdir().unwrap();
    let url = dev.url();

    let oom = muster(
        &url,
        p.path(),
        &[
            "run",
            "submit",
            "--image",
            &image,
            "--memory",
            "32m",
            "--stream",
            "--",
            "sh",
            "-c",
            "x=a; while true; do x=\"$x$x\"; done",
        ],
    )
    .await;
    assert_ne!(oom.code, 0, "{oom:?}");
    assert!(oom.stderr.contains("OOM-killed"), "{oom:?}");

    let t0 = Instant::now();
    let timeout = muster(
        &url,
        p.path(),
        &[
            "run",
            "submit",
            "--image",
            &image,
            "--timeout",
            "1",
            "--stream",
            "--",
            "sleep",
            "60",
        ],
    )
    .await;
    assert_eq!(timeout.code, 124, "{timeout:?}");
    assert!(t0.elapsed() < Duration::from_secs(20));

    let t0 = Instant::now();
    let missing = muster(
        &url,
        p.path(),
        &[
            "run",
            "submit",
            "--image",
            "muster-test-missing:nope",
            "--stream",
            "--",
            "true",
        ],
    )
    .await;
    assert_ne!(missing.code, 0);
    assert!(
        missing
            .stderr
            .contains("image muster-test-missing:nope not found locally and could not be pulled"),
        "{missing:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "fails within seconds, took {:?}",
        t0.elapsed()
    );

    let id = submit_sh(
        &url,
        p.path(),
        &["--image", &image],
        "trap '' TERM; while true; do sleep 1; done",
    )
    .await;
    wait_for_state(&url, &id, "running").await;
    let name = format!("muster-{id}-1-0");
    assert!(
        docker.inspect_container(&name, None).await.is_ok(),
        "the container runs"
    );
    let cancel = muster(&url, p.path(), &["run", "cancel", &id]).await;
    assert_eq!(cancel.code, 0, "{cancel:?}");
    assert_eq!(
        muster(&url, p.path(), &["run", "wait", &id]).await.code,
        143,
        "a canceled run: 128 + SIGTERM"
    );
    assert!(
        container_gone(&docker, &name, 100).await,
        "the canceled run's container is removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_re_adopts_its_container_and_the_run_completes_as_attempt_1() {
    let Some((_docker, image, dev)) = docker_cluster(Some("box-pool")).await else {
        return;
    };
    let url = dev.url();
    let data = tempfile::tempdir().unwrap();
    let mut agent = AgentProcess::start(&url, "box-pool", "box-1", &data.path().join("a1"))
        .await
        .unwrap();
    let p = tempfile::tempdir().unwrap();
    let id = submit_sh(
        &url,
        p.path(),
        &["--compute", "box-pool", "--image", &image],
        "for i in $(seq 1 8); do echo line $i; sleep 0.5; done",
    )
    .await;
    wait_for_state(&url, &id, "running").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    agent.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.restart().await.unwrap();
    let run = wait_done(&url, &id).await;
    assert_eq!(
        (run.state().word(), run.attempt),
        ("completed", 1),
        "{run:?}"
    );
    let logs = muster(&url, p.path(), &["run", "logs", &id]).await;
    let expected: String = (1..=8).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        logs.stdout, expected,
        "complete logs, nothing lost or repeated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_agents_run_restarts_as_attempt_2_on_another_node() {
    let Some((docker, image, dev)) = docker_cluster(Some("two-pool")).await else {
        return;
    };
    let url = dev.url();
    let data = tempfile::tempdir().unwrap();
    let mut first = AgentProcess::start(&url, "two-pool", "node-a", &data.path().join("a"))
        .await
        .unwrap();
    let p = tempfile::tempdir().unwrap();
    let id = submit_sh(
        &url,
        p.path(),
        &["--compute", "two-pool", "--image", &image],
        "echo attempt $MUSTER_ATTEMPT restarted=${MUSTER_RESTARTED:-0}; sleep 2",
    )
    .await;
    wait_for_state(&url, &id, "running").await;
    let _second = AgentProcess::start(&url, "two-pool", "node-b", &data.path().join("b"))
        .await
        .unwrap();
    first.kill();
    let run = wait_done(&url, &id).await;
    assert_eq!(
        (run.state().word(), run.attempt),
        ("completed", 2),
        "{run:?}"
    );
    assert_eq!(run.attempts[0].end().word(), "node_lost");
    assert_eq!(run.attempts[1].placements[0].node_name, "node-b");
    let logs = muster(&url, p.path(), &["run", "logs", "--attempt", "2", &id]).await;
    assert_eq!(logs.stdout, "attempt 2 restarted=1\n");
    let nodes = muster(&url, p.path(), &["node", "show", "node-a", "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&nodes.stdout).unwrap();
    assert_eq!(v["state"], "lost");
    // node-a comes back: its stale container of attempt 1 is stopped (fenced) and removed.
    let stale = format!("muster-{id}-1-0");
    assert!(
        docker.inspect_container(&stale, None).await.is_ok(),
        "the dead agent's container outlived it"
    );
    first.restart().await.unwrap();
    assert!(
        container_gone(&docker, &stale, 150).await,
        "the returning agent stopped its stale container"
    );
    let after = wait_done(&url, &id).await;
    assert_eq!(
        (after.state().word(), after.attempt),
        ("completed", 2),
        "fencing changed nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_gpu_node_runs_two_two_gpu_runs_on_disjoint_gpus() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    create_pool(&url, "gpu-pool").await;
    let data = tempfile::tempdir().unwrap();
    let config = agent_config(
        &url,
        data.path(),
        "gpu-pool",
        "gpu-box",
        Arc::new(FakeGpuProbe::with("box", 4)),
    );
    let _agent = AgentHandle::start(&url, config).await.unwrap();
    let shown = muster(
        &url,
        data.path(),
        &["node", "show", "gpu-box", "-o", "json"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(v["gpus"].as_array().unwrap().len(), 4, "{v}");
    let p = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            submit_sh(
                &url,
                p.path(),
                &["--compute", "gpu-pool", "--gpus", "2"],
                "echo $NVIDIA_VISIBLE_DEVICES; sleep 1",
            )
            .await,
        );
    }
    let mut seen = Vec::new();
    for id in &ids {
        let run = wait_done(&url, id).await;
        assert_eq!(run.state().word(), "completed", "{run:?}");
        let logs = muster(&url, p.path(), &["run", "logs", id]).await;
        let gpus: Vec<String> = logs.stdout.trim().split(',').map(String::from).collect();
        assert_eq!(gpus.len(), 2, "{logs:?}");
        assert_eq!(gpus, run.attempts[0].placements[0].gpus);
        seen.extend(gpus);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4, "the two runs got disjoint GPUs: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_evict_move_runs_as_admins_expect() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    create_pool(&url, "admin-pool").await;
    let data = tempfile::tempdir().unwrap();
    let config = agent_config(
        &url,
        data.path(),
        "admin-pool",
        "lab-7",
        Arc::new(muster_agent::NoGpus),
    );
    let _agent = AgentHandle::start(&url, config).await.unwrap();
    let p = tempfile::tempdir().unwrap();
    let first = submit_id(
        &url,
        p.path(),
        &[
            "run",
            "submit",
            "--compute",
            "admin-pool",
            "--",
            "sleep",
            "30",
        ],
    )
    .await;
    wait_for_state(&url, &first, "running").await;
    let drained = muster(&url, p.path(), &["node", "drain", "lab-7"]).await;
    assert!(drained.stdout.contains("takes no new runs"), "{drained:?}");
    let second = submit_id(
        &url,
        p.path(),
        &["run", "submit", "--compute", "admin-pool", "--", "true"],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        wait_for_state(&url, &second, "queued").await.state().word(),
        "queued",
        "a drained node takes no new runs"
    );
    assert_eq!(
        wait_for_state(&url, &first, "running").await.attempt,
        1,
        "running ones carry on"
    );
    let evicted = muster(&url, p.path(), &["node", "evict", "lab-7"]).await;
    assert_eq!(evicted.code, 0, "{evicted:?}");
    let requeued = wait_for_state(&url, &first, "queued").await;
    assert_eq!(requeued.attempts[0].end().word(), "node_lost");
    assert_eq!(
        muster(&url, p.path(), &["node", "resume", "lab-7"])
            .await
            .code,
        0
    );
    wait_for_state(&url, &second, "completed").await;
    let again = wait_for_state(&url, &first, "running").await;
    assert_eq!(again.attempt, 2);
    let bad = muster(&url, p.path(), &["node", "drain", "nope"]).await;
    assert!(
        bad.stderr.contains("node \"nope\" is not registered"),
        "{bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_that_fails_is_withdrawn_and_schedulable_again_when_it_recovers() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    create_pool(&url, "flaky-pool").await;
    let data = tempfile::tempdir().unwrap();
    let probe = FakeGpuProbe::with("flaky", 2);
    let healthy = probe.gpus();
    let mut config = agent_config(
        &url,
        data.path(),
        "flaky-pool",
        "flaky-box",
        Arc::new(probe.clone()),
    );
    config.gpu_refresh = Duration::from_millis(200);
    let _agent = AgentHandle::start(&url, config).await.unwrap();
    let p = tempfile::tempdir().unwrap();
    let shown = muster(&url, p.path(), &["node", "show", "flaky-box"]).await;
    assert!(
        shown.stdout.contains("nvidia.com/driver-version=555.42.06")
            && shown.stdout.contains("nvidia.com/cuda-version=12.5"),
        "{shown:?}"
    );

    // One GPU fails (as after an XID error): the node offers one.
    probe.set(healthy[..1].to_vec());
    let mut offered = 2;
    for _ in 0..100 {
        let v: serde_json::Value = serde_json::from_str(
            &muster(&url, p.path(), &["node", "show", "flaky-box", "-o", "json"])
                .await
                .stdout,
        )
        .unwrap();
        offered = v["gpus"].as_array().unwrap().len();
        if offered == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        offered, 1,
        "the failed GPU is withdrawn without restarting the agent"
    );
    let id = submit_id(
        &url,
        p.path(),
        &[
            "run",
            "submit",
            "--compute",
            "flaky-pool",
            "--gpus",
            "2",
            "--",
            "true",
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        wait_for_state(&url, &id, "queued").await.state().word(),
        "queued",
        "a 2-GPU run waits"
    );

    // It recovers: the waiting run is placed on both.
    probe.set(healthy.clone());
    let done = wait_for_state(&url, &id, "completed").await;
    assert_eq!(done.attempts[0].placements[0].gpus.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_run_preempts_and_the_low_one_restarts_as_attempt_2() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    create_pool(&url, "prio-pool").await;
    let data = tempfile::tempdir().unwrap();
    let mut config = agent_config(
        &url,
        data.path(),
        "prio-pool",
        "one-cpu",
        Arc::new(muster_agent::NoGpus),
    );
    config.cpu_millis = Some(1000);
    let _agent = AgentHandle::start(&url, config).await.unwrap();
    let p = tempfile::tempdir().unwrap();
    let low = submit_sh(
        &url,
        p.path(),
        &["--compute", "prio-pool", "--priority", "low", "--cpu", "1"],
        "echo attempt $MUSTER_ATTEMPT restarted=${MUSTER_RESTARTED:-0}; sleep 30",
    )
    .await;
    wait_for_state(&url, &low, "running").await;
    let high = submit_id(
        &url,
        p.path(),
        &[
            "run",
            "submit",
            "--compute",
            "prio-pool",
            "--priority",
            "high",
            "--cpu",
            "1",
            "--",
            "echo",
            "urgent",
        ],
    )
    .await;
    assert_eq!(wait_done(&url, &high).await.state().word(), "completed");
    let first = wait_done_attempt(&url, &low, 2).await;
    assert_eq!(first.attempts[0].end().word(), "preempted", "{first:?}");
    // Its first line is shipped within a moment of starting.
    let mut log = String::new();
    for _ in 0..50 {
        log = muster(&url, p.path(), &["run", "logs", "--attempt", "2", &low])
            .await
            .stdout;
        if !log.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(log, "attempt 2 restarted=1\n");
    // A run that cannot fit says why it waits.
    let gpu = submit_id(
        &url,
        p.path(),
        &[
            "run",
            "submit",
            "--compute",
            "prio-pool",
            "--gpus",
            "1",
            "--",
            "true",
        ],
    )
    .await;
    let mut shown = String::new();
    for _ in 0..50 {
        shown = muster(&url, p.path(), &["run", "show", &gpu]).await.stdout;
        if shown.contains("waiting:") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        shown.contains("waiting:") && shown.contains("GPU"),
        "{shown}"
    );
    // The studio's run page gives the same reason.
    let addr = dev.addr;
    let path = format!("/runs/{gpu}");
    let (code, page) = tokio::task::spawn_blocking(move || http_get(addr, &path))
        .await
        .unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("<p>Waiting for placement: ") && page.contains("GPU"),
        "{page}"
    );
    muster(&url, p.path(), &["run", "cancel", &low]).await;
}

/// Waits (bounded: 30 s) until `id` runs attempt `n`.
async fn wait_done_attempt(url: &str, id: &str, n: u32) -> muster_proto::v1::Run {
    for _ in 0..300 {
        let r = wait_for_state(url, id, "running").await;
        if r.attempt >= n {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id} never ran attempt {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_selector_places_a_run_only_on_nodes_with_those_labels() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    create_pool(&url, "zoned").await;
    let data = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    for zone in ["a", "b"] {
        let mut config = agent_config(
            &url,
            &data.path().join(zone),
            "zoned",
            &format!("zone-{zone}"),
            Arc::new(FakeGpuProbe::with(zone, 0)),
        );
        config.labels.insert("zone".into(), zone.into());
        agents.push(AgentHandle::start(&url, config).await.unwrap());
    }
    let p = tempfile::tempdir().unwrap();
    let submit = |selector: &'static str| {
        let url = url.clone();
        let dir = p.path().to_path_buf();
        async move {
            submit_id(
                &url,
                &dir,
                &[
                    "run",
                    "submit",
                    "--compute",
                    "zoned",
                    "--node-selector",
                    selector,
                    "--",
                    "echo",
                    "placed",
                ],
            )
            .await
        }
    };
    for _ in 0..3 {
        let id = submit("zone=b").await;
        let run = wait_done(&url, &id).await;
        assert_eq!(run.state().word(), "completed", "{run:?}");
        assert_eq!(run.attempts[0].placements[0].node_name, "zone-b", "{run:?}");
    }
    // No node carries zone=c: the run waits, and says why.
    let id = submit("zone=c").await;
    let shown = shown_once_message_has(&url, p.path(), &id, "zone=c").await;
    assert_eq!(shown["state"], "queued", "{shown}");
    assert!(
        shown["message"].as_str().unwrap_or("").contains("waiting:")
            && shown["message"].as_str().unwrap_or("").contains("zone=c"),
        "{shown}"
    );
    // A selector that is not KEY=VALUE is refused before anything is submitted.
    let out = muster(
        &url,
        p.path(),
        &[
            "run",
            "submit",
            "--compute",
            "zoned",
            "--node-selector",
            "zone",
            "--",
            "true",
        ],
    )
    .await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("--node-selector"), "{out:?}");
    assert_eq!(all_runs(&url).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_runs_back_with_the_reason_and_lets_them_through_in_turn() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    let p = tempfile::tempdir().unwrap();
    let out = muster(
        &url,
        p.path(),
        &[
            "compute",
            "create",
            "capped",
            "--type",
            "attached",
            "--max-concurrent-runs",
            "1",
            "--max-cpus",
            "x",
        ],
    )
    .await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("--max-cpus"), "{out:?}");
    let out = muster(
        &url,
        p.path(),
        &[
            "compute",
            "create",
            "capped",
            "--type",
            "attached",
            "--max-concurrent-runs",
            "1",
            "--max-gpus",
            "8",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let shown = muster(&url, p.path(), &["compute", "show", "capped"]).await;
    assert!(
        shown
            .stdout
            .contains("quota        at most 8 GPUs, 1 active runs"),
        "{shown:?}"
    );
    // The agent's cache lives outside the code directory the CLI snapshots.
    let agent_dir = tempfile::tempdir().unwrap();
    let config = agent_config(
        &url,
        agent_dir.path(),
        "capped",
        "capped-node",
        Arc::new(FakeGpuProbe::with("cap", 0)),
    );
    let _agent = AgentHandle::start(&url, config).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            submit_id(
                &url,
                p.path(),
                &["run", "submit", "--compute", "capped", "--", "sleep", "2"],
            )
            .await,
        );
    }
    wait_for_state(&url, &ids[0], "running").await;
    let waiting = shown_once_message_has(&url, p.path(), &ids[1], "quota").await;
    assert_eq!(waiting["state"], "queued");
    assert!(
        waiting["message"]
            .as_str()
            .unwrap_or("")
            .contains("waiting: quota: 1/1 runs active"),
        "{waiting}"
    );
    for id in &ids {
        assert_eq!(wait_done(&url, id).await.state().word(), "completed");
    }
    let first = wait_done(&url, &ids[0]).await;
    let second = wait_done(&url, &ids[1]).await;
    assert!(
        second.attempts[0].placed_at_ms >= first.finished_at_ms.unwrap(),
        "the second run started only after the first ended"
    );
}

/// An agent whose executor is muster-testkit's fake: a run goes from `muster run submit`
/// through the server, the agent's plan (snapshot fetched, GPU by UUID, container spec)
/// and the executor, and ends as the fake says, without Docker or a process.
#[tokio::test]
async fn an_agent_runs_a_run_through_the_fake_executor() {
    muster_testkit::init_tracing();
    let dev = short_grace_dev().await;
    let url = dev.url();
    create_pool(&url, "fake-pool").await;
    let data = tempfile::tempdir().unwrap();
    let fake = muster_testkit::fake_executor::FakeExecutor::new();
    let mut config = agent_config(
        &url,
        data.path(),
        "fake-pool",
        "fake-node",
        Arc::new(FakeGpuProbe::with("f", 1)),
    );
    config.executor = Some(Arc::new(fake.clone()));
    let _agent = AgentHandle::start(&url, config).await.unwrap();
    let cwd = tempfile::tempdir().unwrap();
    write(cwd.path(), "train.sh", "echo hi\n");
    let id = submit_id(
        &url,
        cwd.path(),
        &[
            "run",
            "submit",
            "--compute",
            "fake-pool",
            "--gpus",
            "1",
            "--image",
            "img:1",
            "--",
            "sh",
            "train.sh",
        ],
    )
    .await;
    let launch = fake
        .wait_for_launch(0, Duration::from_secs(30))
        .await
        .unwrap();
    let env = |name: &str| {
        launch
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(env("MUSTER_RUN_ID"), Some(id.clone()));
    assert_eq!(
        env("NVIDIA_VISIBLE_DEVICES").as_deref(),
        Some("GPU-fake-f-0")
    );
    let container = launch.container.as_ref().expect("the run names an image");
    assert_eq!(container.image, "img:1");
    assert_eq!(container.gpus, ["GPU-fake-f-0"]);
    assert!(
        launch.workdir.join("train.sh").is_file(),
        "the code snapshot is in place before the launch"
    );
    wait_for_state(&url, &id, "running").await;
    fake.finish(0, 0).unwrap();
    let run = wait_done(&url, &id).await;
    assert_eq!(run.state().word(), "completed", "{run:?}");

    // A non-zero exit fails the run with that code.
    let failing = submit_id(
        &url,
        cwd.path(),
        &["run", "submit", "--compute", "fake-pool", "--", "false"],
    )
    .await;
    let launch = fake
        .wait_for_launch(1, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(launch.container.is_none(), "no image: a process launch");
    wait_for_state(&url, &failing, "running").await;
    fake.finish(1, 3).unwrap();
    let run = wait_done(&url, &failing).await;
    assert_eq!((run.state().word(), run.exit_code), ("failed", Some(3)));
}

/// An attached target whose machine is gone can be cleaned up: `node remove` once its agent
/// stopped (refused while it is ready), then `compute delete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_node_is_removed_and_its_attached_target_deleted() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    let p = tempfile::tempdir().unwrap();
    let made = muster(
        &url,
        p.path(),
        &["compute", "create", "old-farm", "--type", "attached"],
    )
    .await;
    assert_eq!(made.code, 0, "{made:?}");
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(
        &url,
        dir.path(),
        "old-farm",
        "old-box",
        Arc::new(muster_agent::NoGpus),
    );
    let agent = AgentHandle::start(&url, config).await.unwrap();
    let refused = muster(&url, p.path(), &["node", "remove", "old-box"]).await;
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains("stop its agent first"),
        "{refused:?}"
    );
    let busy = muster(&url, p.path(), &["compute", "delete", "old-farm"]).await;
    assert_ne!(busy.code, 0, "{busy:?}");
    agent.stop().await.unwrap();
    // The node turns lost after the grace period (3 s here).
    let mut removed = None;
    for _ in 0..100 {
        let out = muster(&url, p.path(), &["node", "remove", "old-box"]).await;
        if out.code == 0 {
            removed = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let removed = removed.expect("the node is removed once it is lost (within 20 s)");
    assert!(
        removed.stdout.contains("Node old-box is removed"),
        "{removed:?}"
    );
    let listed = muster(&url, p.path(), &["node", "list"]).await;
    assert!(!listed.stdout.contains("old-box"), "{listed:?}");
    let deleted = muster(&url, p.path(), &["compute", "delete", "old-farm"]).await;
    assert_eq!(deleted.code, 0, "{deleted:?}");
}

/// Counts to 100, one step per ~50 ms, keeping its count in `$MUSTER_CHECKPOINT_DIR/count`
/// (written atomically) and starting from it when `MUSTER_RESUMED=1`; the first line says
/// where it starts.
const COUNTER: &str = r#"f="$MUSTER_CHECKPOINT_DIR/count"; i=0
if [ "$MUSTER_RESUMED" = 1 ]; then i=$(cat "$f"); fi
echo "start $i resumed=$MUSTER_RESUMED"
while [ "$i" -lt 100 ]; do i=$((i+1)); echo "$i"; echo "$i" > "$f.tmp"; mv "$f.tmp" "$f"; sleep 0.05; done"#;

/// `run logs --attempt N ID`, polled (bounded: 30 s) until it has a line `needle`.
async fn log_with_line(url: &str, cwd: &std::path::Path, id: &str, n: u32, needle: &str) -> String {
    let mut log = String::new();
    for _ in 0..300 {
        log = muster(url, cwd, &["run", "logs", "--attempt", &n.to_string(), id])
            .await
            .stdout;
        if log.lines().any(|l| l == needle) {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("attempt {n} of {id} never logged {needle:?}: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_run_resumes_from_its_checkpoint_as_attempt_2() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    create_pool(&url, "ckpt-pool").await;
    let data = tempfile::tempdir().unwrap();
    let mut config = agent_config(
        &url,
        data.path(),
        "ckpt-pool",
        "one-slot",
        Arc::new(muster_agent::NoGpus),
    );
    config.cpu_millis = Some(1000);
    let _agent = AgentHandle::start(&url, config).await.unwrap();
    let p = tempfile::tempdir().unwrap();
    let low = submit_sh(
        &url,
        p.path(),
        &["--compute", "ckpt-pool", "--priority", "low", "--cpu", "1"],
        COUNTER,
    )
    .await;
    let first = log_with_line(&url, p.path(), &low, 1, "40").await;
    assert!(first.starts_with("start 0 resumed=0\n1\n"), "{first}");
    let high = submit_id(
        &url,
        p.path(),
        &[
            "run",
            "submit",
            "--compute",
            "ckpt-pool",
            "--priority",
            "high",
            "--cpu",
            "1",
            "--",
            "echo",
            "urgent",
        ],
    )
    .await;
    assert_eq!(wait_done(&url, &high).await.state().word(), "completed");
    wait_done_attempt(&url, &low, 2).await;
    let done = wait_done(&url, &low).await;
    assert_eq!(done.state().word(), "completed", "{done:?}");
    assert_eq!(done.attempts.len(), 2, "{done:?}");
    assert_eq!(done.attempts[0].end().word(), "preempted", "{done:?}");

    // Attempt 1 stopped where its checkpoint says; attempt 2 started there, not from 0.
    let first = muster(&url, p.path(), &["run", "logs", "--attempt", "1", &low])
        .await
        .stdout;
    let stopped_at: u32 = first.lines().rev().find_map(|l| l.parse().ok()).unwrap();
    let second = log_with_line(&url, p.path(), &low, 2, "100").await;
    let mut lines = second.lines();
    let start = lines.next().unwrap();
    let resumed_at: u32 = start
        .strip_prefix("start ")
        .and_then(|s| s.strip_suffix(" resumed=1"))
        .unwrap_or_else(|| panic!("attempt 2 did not resume: {second}"))
        .parse()
        .unwrap();
    assert!(resumed_at >= 40, "{second}");
    assert!(
        resumed_at == stopped_at || resumed_at + 1 == stopped_at,
        "resumed at {resumed_at}, attempt 1 stopped at {stopped_at}: {first}"
    );
    assert_eq!(
        lines.next(),
        Some((resumed_at + 1).to_string().as_str()),
        "{second}"
    );
    assert_eq!(second.lines().last(), Some("100"));
    assert!(!second.lines().any(|l| l == "1"), "{second}");

    // The run says which checkpoint attempt 2 started from.
    let c = done.attempts[1]
        .resumed_from
        .clone()
        .expect("attempt 2 resumed");
    assert_eq!(
        (c.attempt, c.files, c.cause),
        (1, 1, muster_proto::v1::CheckpointCause::Preempted as i32)
    );
    assert_eq!(done.attempts[0].resumed_from, None);
    let shown = muster(&url, p.path(), &["run", "show", &low]).await.stdout;
    assert!(
        shown.contains("attempt 2: resumed from the checkpoint of attempt 1 (1 file, ")
            && shown.contains(", taken when preempted)"),
        "{shown}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &muster(&url, p.path(), &["run", "show", &low, "-o", "json"])
            .await
            .stdout,
    )
    .unwrap();
    assert_eq!(json["attempts"][1]["resumed_from"]["attempt"], 1, "{json}");
    assert_eq!(
        json["attempts"][1]["resumed_from"]["cause"], "preempted",
        "{json}"
    );
    assert_eq!(json["attempts"][0]["resumed_from"], serde_json::Value::Null);
    // The studio's run page says it too.
    let (addr, path) = (dev.addr, format!("/runs/{low}"));
    let (code, page) = tokio::task::spawn_blocking(move || http_get(addr, &path))
        .await
        .unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("<tr><th>resumed</th><td>from the checkpoint of attempt 1 (1 file, "),
        "{page}"
    );
    // Attempt 2's end took the latest checkpoint: the count at 100.
    assert_eq!(json["checkpoint"]["attempt"], 2, "{json}");
    assert_eq!(json["checkpoint"]["cause"], "ended", "{json}");

    // A run that writes no checkpoint is not resumed: its folder stays empty.
    let plain = submit_sh(
        &url,
        p.path(),
        &["--compute", "ckpt-pool", "--cpu", "1"],
        "echo dir=${MUSTER_CHECKPOINT_DIR:+set} resumed=$MUSTER_RESUMED",
    )
    .await;
    assert_eq!(wait_done(&url, &plain).await.state().word(), "completed");
    let shown: serde_json::Value = serde_json::from_str(
        &muster(&url, p.path(), &["run", "show", &plain, "-o", "json"])
            .await
            .stdout,
    )
    .unwrap();
    assert_eq!(shown["checkpoint"], serde_json::Value::Null, "{shown}");
    let log = muster(&url, p.path(), &["run", "logs", &plain])
        .await
        .stdout;
    assert_eq!(log, "dir=set resumed=0\n");
}

/// `run show ID -o json`, polled (bounded: 30 s) until its `checkpoint.cause` is `cause`.
async fn checkpoint_once(
    url: &str,
    cwd: &std::path::Path,
    id: &str,
    cause: &str,
) -> serde_json::Value {
    let mut v = serde_json::Value::Null;
    for _ in 0..300 {
        let out = muster(url, cwd, &["run", "show", id, "-o", "json"]).await;
        v = serde_json::from_str(&out.stdout).unwrap();
        if v["checkpoint"]["cause"] == cause {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("run {id} never recorded a {cause} checkpoint: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_interval_uploads_the_folder_while_the_run_runs() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    let p = tempfile::tempdir().unwrap();
    let id = submit_sh(
        &url,
        p.path(),
        &["--checkpoint-interval", "10s"],
        "echo 5 > \"$MUSTER_CHECKPOINT_DIR/step\"; echo started; sleep 60",
    )
    .await;
    let shown = checkpoint_once(&url, p.path(), &id, "periodic").await;
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["checkpoint_interval_s"], 10, "{shown}");
    let c = &shown["checkpoint"];
    assert_eq!(
        (&c["attempt"], &c["seq"], &c["files"], &c["bytes"]),
        (&1.into(), &1.into(), &1.into(), &2.into()),
        "{shown}"
    );
    // Its end takes the last one, which supersedes the periodic one.
    let out = muster(&url, p.path(), &["run", "cancel", &id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(wait_done(&url, &id).await.state().word(), "canceled");
    let shown = checkpoint_once(&url, p.path(), &id, "ended").await;
    assert_eq!(shown["checkpoint"]["seq"], 2, "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_writes_its_checkpoint_under_workspace() {
    let Some((_docker, image, dev)) = docker_cluster(None).await else {
        return;
    };
    let url = dev.url();
    let p = tempfile::tempdir().unwrap();
    let id = submit_sh(
        &url,
        p.path(),
        &["--image", &image],
        "echo \"$MUSTER_CHECKPOINT_DIR resumed=$MUSTER_RESUMED\"; echo 7 > \"$MUSTER_CHECKPOINT_DIR/step\"",
    )
    .await;
    assert_eq!(wait_done(&url, &id).await.state().word(), "completed");
    let log = muster(&url, p.path(), &["run", "logs", &id]).await.stdout;
    assert_eq!(log, "/workspace/checkpoint resumed=0\n");
    let shown = checkpoint_once(&url, p.path(), &id, "ended").await;
    let c = &shown["checkpoint"];
    assert_eq!(
        (&c["attempt"], &c["files"], &c["bytes"]),
        (&1.into(), &1.into(), &2.into()),
        "{shown}"
    );
}
