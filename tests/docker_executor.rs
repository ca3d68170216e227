//! The Docker executor against a real engine: logs, exit codes, mounts, isolation, limits,
//! timeout, cancel, a missing image, labels, and re-adoption after an agent restart.
//!
//! Each test skips (with a note) where there is no Docker engine, unless
//! `MUSTER_REQUIRE_DOCKER=1`. The image is built locally from the host's `/bin/busybox`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use muster_agent::executor::docker::{DockerExecutor, Managed};
use muster_agent::executor::{ContainerSpec, Launch, Outcome, Stop, StopReason};
use muster_core::AttemptEnd;
use muster_testkit::images::bollard::Docker;
use muster_testkit::images::{busybox_image, docker_or_skip, remove_containers_labelled};
use tokio::sync::{oneshot, watch};

/// One test's world: a connected executor, a unique node id, a working directory.
struct World {
    docker: Docker,
    exec: DockerExecutor,
    image: String,
    node: String,
    dir: tempfile::TempDir,
}

impl World {
    async fn new(docker: Docker) -> World {
        let image = busybox_image(&docker)
            .await
            .expect("the busybox test image");
        let exec = DockerExecutor::connect().await.expect("connect");
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("time")
            .subsec_nanos();
        let node = format!(
            "t{}-{}-{nanos:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["outputs", "logs"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        World {
            docker,
            exec,
            image,
            node,
            dir,
        }
    }

    fn workdir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("attempt.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn container_name(&self) -> String {
        format!("muster-test-{}", self.node)
    }

    /// A launch of `command` in the busybox image, labelled with this world's node.
    fn launch(&self, command: &str) -> Launch {
        let labels = BTreeMap::from([
            ("muster.node_id".to_string(), self.node.clone()),
            ("muster.run_id".to_string(), format!("run-{}", self.node)),
            ("muster.attempt".to_string(), "2".to_string()),
            ("muster.rank".to_string(), "1".to_string()),
        ]);
        Launch {
            command: command.into(),
            workdir: self.workdir().to_path_buf(),
            env: vec![("GREETING".into(), "hello from muster".into())],
            log_path: self.log_path(),
            timeout: None,
            container: Some(ContainerSpec {
                image: self.image.clone(),
                name: self.container_name(),
                labels,
                ..Default::default()
            }),
            redact: Default::default(),
            process_limits: Default::default(),
        }
    }

    /// Runs to the end with no stop order.
    async fn run(&self, launch: Launch) -> Outcome {
        let (_stop_tx, stop) = watch::channel(None);
        let (started, _) = oneshot::channel();
        self.exec.run(launch, stop, started).await
    }

    async fn container_exists(&self, name: &str) -> bool {
        self.docker.inspect_container(name, None).await.is_ok()
    }

    async fn cleanup(&self) {
        remove_containers_labelled(&self.docker, "muster.node_id", &self.node)
            .await
            .expect("cleanup");
    }
}

/// Polls (bounded) until `check` holds.
async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within {limit:?}");
}

#[tokio::test]
async fn output_reaches_the_log_and_the_exit_code_fails_the_attempt() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    let out = w
        .run(w.launch("echo \"$GREETING\"; echo to-stderr >&2; echo last; exit 3"))
        .await;
    assert_eq!(out.end, AttemptEnd::Failed, "{out:?}");
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.message.as_deref(), Some("exited with code 3"));
    // stdout and stderr are separate pipes: their lines interleave in arrival order.
    let log = w.log();
    let mut lines: Vec<&str> = log.lines().collect();
    let stdout: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| *l != "to-stderr")
        .collect();
    assert_eq!(stdout, ["hello from muster", "last"], "log: {log}");
    lines.sort_unstable();
    assert_eq!(
        lines,
        ["hello from muster", "last", "to-stderr"],
        "log: {log}"
    );
    assert!(
        !w.container_exists(&w.container_name()).await,
        "the container is removed"
    );
    w.cleanup().await;
}

#[tokio::test]
async fn outputs_are_writable_and_the_workspace_is_read_only() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    std::fs::write(w.workdir().join("train.py"), "print('hi')\n").expect("write");
    let out = w
        .run(w.launch(
            "set -e; pwd; cat train.py; echo result > /workspace/outputs/x; \
             echo note > /workspace/logs/extra.log; \
             if touch /workspace/y 2>/dev/null; then echo WRITABLE; exit 1; fi; echo read-only",
        ))
        .await;
    assert_eq!(out.end, AttemptEnd::Completed, "{out:?} log: {}", w.log());
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(w.log(), "/workspace\nprint('hi')\nread-only\n");
    assert_eq!(
        std::fs::read_to_string(w.workdir().join("outputs/x")).expect("outputs/x on the host"),
        "result\n"
    );
    assert_eq!(
        std::fs::read_to_string(w.workdir().join("logs/extra.log")).expect("logs/extra.log"),
        "note\n"
    );
    assert!(!w.workdir().join("y").exists());
    w.cleanup().await;
}

#[tokio::test]
async fn the_command_runs_isolated_in_a_container() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    let out = w
        .run(w.launch("hostname; test -f /.dockerenv && echo in-a-container"))
        .await;
    assert_eq!(out.end, AttemptEnd::Completed, "{out:?}");
    let log = w.log();
    let mut lines = log.lines();
    let inside = lines.next().expect("a hostname");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("host name");
    assert_ne!(inside, host.trim());
    assert_eq!(lines.next(), Some("in-a-container"));
    w.cleanup().await;
}

#[tokio::test]
async fn exceeding_the_memory_limit_is_an_oom_kill() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    // The command itself outgrows the limit (`exec`: dd is the main process).
    let mut launch = w.launch("echo start; exec dd if=/dev/zero of=/dev/null bs=128M count=4");
    if let Some(spec) = launch.container.as_mut() {
        spec.memory_bytes = 32 * 1024 * 1024;
    }
    let out = w.run(launch).await;
    assert_eq!(
        (out.end, out.exit_code),
        (AttemptEnd::Failed, Some(137)),
        "{out:?} log: {}",
        w.log()
    );
    // Whether the engine flags the kill depends on its version and the cgroup version;
    // either way the message names the limit.
    let message = out.message.unwrap_or_default();
    assert!(
        message.starts_with("OOM-killed: the container exceeded its memory limit of 32 MiB")
            || message
                .contains("most likely OOM-killed: the container has a memory limit of 32 MiB"),
        "{message}"
    );
    w.cleanup().await;
}

#[tokio::test]
async fn a_killed_worker_does_not_fail_a_command_that_goes_on() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    let mut launch =
        w.launch("echo start; dd if=/dev/zero of=/dev/null bs=128M count=4; echo survived");
    if let Some(spec) = launch.container.as_mut() {
        spec.memory_bytes = 32 * 1024 * 1024;
    }
    let out = w.run(launch).await;
    assert_eq!(
        (out.end, out.exit_code),
        (AttemptEnd::Completed, Some(0)),
        "{out:?} log: {}",
        w.log()
    );
    // stdout and the shell's "Killed" on stderr reach the log in either order.
    assert!(w.log().lines().any(|l| l == "survived"), "{}", w.log());
    // An engine that flags the worker's kill gets a note beside the success.
    if let Some(message) = out.message {
        assert!(
            message.contains("OOM-killed (memory limit 32 MiB)"),
            "{message}"
        );
    }
    w.cleanup().await;
}

#[tokio::test]
async fn the_timeout_stops_the_container() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    let mut launch = w.launch("echo begin; sleep 30; echo end");
    launch.timeout = Some(Duration::from_secs(1));
    let t0 = Instant::now();
    let out = w.run(launch).await;
    assert_eq!(out.end, AttemptEnd::TimedOut, "{out:?}");
    assert_eq!(
        out.message.as_deref(),
        Some("stopped after limits.timeout (1 s)")
    );
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert_eq!(w.log(), "begin\n");
    assert!(!w.container_exists(&w.container_name()).await);
    w.cleanup().await;
}

#[tokio::test]
async fn cancel_sends_sigterm_then_sigkill_after_the_grace() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    // The shell notes SIGTERM and carries on, so only SIGKILL after the grace ends it.
    let launch = w.launch("trap 'echo got TERM' TERM; echo ready; while true; do sleep 0.2; done");
    let (stop_tx, stop) = watch::channel(None);
    let (started, started_rx) = oneshot::channel();
    let exec = w.exec.clone();
    let task = tokio::spawn(async move { exec.run(launch, stop, started).await });
    started_rx.await.expect("started");
    eventually(
        "the command printing",
        Duration::from_secs(10),
        async || w.log().contains("ready"),
    )
    .await;
    let t0 = Instant::now();
    stop_tx.send_replace(Some(Stop {
        reason: StopReason::Canceled,
        grace: Duration::from_secs(1),
    }));
    let out = task.await.expect("the run task");
    let took = t0.elapsed();
    assert_eq!(out.end, AttemptEnd::Canceled, "{out:?}");
    assert_eq!(out.message.as_deref(), Some("canceled"));
    assert_eq!(out.exit_code, Some(137), "SIGKILL ended it");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(w.log().contains("got TERM"), "log: {}", w.log());
    assert!(
        !w.container_exists(&w.container_name()).await,
        "the container is gone"
    );
    w.cleanup().await;
}

#[tokio::test]
async fn a_missing_image_fails_quickly_with_the_reason() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    let mut launch = w.launch("true");
    if let Some(spec) = launch.container.as_mut() {
        spec.image = "muster-test-missing:nope".into();
    }
    assert!(!w.exec.has_image("muster-test-missing:nope").await);
    assert!(w.exec.has_image(&w.image).await);
    let t0 = Instant::now();
    let out = w.run(launch).await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(out.end, AttemptEnd::Failed);
    let message = out.message.expect("a message");
    let prefix = "image muster-test-missing:nope not found locally and could not be pulled: ";
    assert!(
        message.starts_with(prefix) && message.len() > prefix.len(),
        "{message}"
    );
    assert!(w.log().contains(&message), "log: {}", w.log());
    assert!(!w.container_exists(&w.container_name()).await);
    w.cleanup().await;
}

#[tokio::test]
async fn the_container_carries_labels_and_limits() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    let mut launch = w.launch("sleep 30");
    if let Some(spec) = launch.container.as_mut() {
        spec.cpu_millis = 500;
        spec.memory_bytes = 64 * 1024 * 1024;
        spec.shm_size = 16 * 1024 * 1024;
    }
    let (stop_tx, stop) = watch::channel(None);
    let (started, started_rx) = oneshot::channel();
    let exec = w.exec.clone();
    let task = tokio::spawn(async move { exec.run(launch, stop, started).await });
    started_rx.await.expect("started");

    let info = w
        .docker
        .inspect_container(&w.container_name(), None)
        .await
        .expect("the container while it runs");
    let labels = info
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    assert_eq!(labels.get("muster.node_id"), Some(&w.node));
    assert_eq!(
        labels.get("muster.run_id"),
        Some(&format!("run-{}", w.node))
    );
    assert_eq!(labels.get("muster.attempt").map(String::as_str), Some("2"));
    assert_eq!(labels.get("muster.rank").map(String::as_str), Some("1"));
    let host = info.host_config.expect("host config");
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.memory, Some(64 * 1024 * 1024));
    assert_eq!(host.memory_swap, Some(64 * 1024 * 1024));
    assert_eq!(host.shm_size, Some(16 * 1024 * 1024));
    let config = info.config.expect("config");
    assert_eq!(config.working_dir.as_deref(), Some("/workspace"));
    assert!(
        config
            .env
            .unwrap_or_default()
            .contains(&"GREETING=hello from muster".to_string())
    );

    let managed = w.exec.managed(&w.node).await.expect("managed");
    assert_eq!(managed.len(), 1, "{managed:?}");
    assert!(managed[0].running);
    assert_eq!((managed[0].attempt, managed[0].rank), (2, 1));

    stop_tx.send_replace(Some(Stop {
        reason: StopReason::Stale,
        grace: Duration::from_secs(1),
    }));
    let out = task.await.expect("the run task");
    assert_eq!(out.end, AttemptEnd::Canceled, "{out:?}");
    assert_eq!(
        out.message.as_deref(),
        Some("stopped: the attempt is no longer current")
    );
    assert!(w.exec.managed(&w.node).await.expect("managed").is_empty());
    w.cleanup().await;
}

/// Starts `launch` in a task, waits until the log holds `marker`, then aborts the task
/// (the agent going away) and returns the container it left behind.
async fn start_then_abandon(w: &World, launch: Launch, marker: &str) -> Managed {
    let (_stop_tx, stop) = watch::channel(None);
    let (started, started_rx) = oneshot::channel();
    let exec = w.exec.clone();
    let task = tokio::spawn(async move { exec.run(launch, stop, started).await });
    started_rx.await.expect("started");
    eventually("the log to fill", Duration::from_secs(20), async || {
        w.log().contains(marker)
    })
    .await;
    task.abort();
    assert!(task.await.is_err(), "the task was aborted, not finished");
    let managed = w.exec.managed(&w.node).await.expect("managed");
    assert_eq!(managed.len(), 1, "{managed:?}");
    let m = managed.into_iter().next().expect("one");
    assert_eq!(m.run_id, format!("run-{}", w.node));
    assert_eq!((m.attempt, m.rank), (2, 1));
    m
}

fn numbered_lines(n: u32) -> String {
    (0..n).map(|i| format!("line {i}\n")).collect()
}

#[tokio::test]
async fn a_restarted_agent_adopts_a_running_container_without_duplicating_logs() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    // Something before the container's output (as image-pull progress would be).
    std::fs::write(w.log_path(), "muster: preamble\n").expect("write");
    let launch = w.launch("i=0; while [ $i -lt 30 ]; do echo line $i; i=$((i+1)); sleep 0.1; done");
    let m = start_then_abandon(&w, launch, "line 5\n").await;
    assert!(m.running, "{m:?}");

    let (_stop_tx, stop) = watch::channel(None);
    let out = w.exec.adopt(&m, &w.log_path(), stop).await;
    assert_eq!(out.end, AttemptEnd::Completed, "{out:?}");
    assert_eq!(w.log(), format!("muster: preamble\n{}", numbered_lines(30)));
    assert!(!w.container_exists(&m.id).await, "removed after adoption");
    w.cleanup().await;
}

#[tokio::test]
async fn adoption_works_for_a_container_that_exited_meanwhile() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    let launch =
        w.launch("i=0; while [ $i -lt 10 ]; do echo line $i; i=$((i+1)); sleep 0.1; done; exit 4");
    let m = start_then_abandon(&w, launch, "line 2\n").await;
    eventually(
        "the container to exit",
        Duration::from_secs(20),
        async || {
            w.exec
                .managed(&w.node)
                .await
                .is_ok_and(|l| l.iter().all(|c| !c.running))
        },
    )
    .await;

    let (_stop_tx, stop) = watch::channel(None);
    let out = w.exec.adopt(&m, &w.log_path(), stop).await;
    assert_eq!(out.end, AttemptEnd::Failed, "{out:?}");
    assert_eq!(out.exit_code, Some(4));
    assert_eq!(w.log(), numbered_lines(10));
    assert!(!w.container_exists(&m.id).await);
    w.cleanup().await;
}

#[tokio::test]
async fn an_adopted_container_keeps_its_timeout() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    let mut launch = w.launch("echo begin; sleep 60");
    launch.timeout = Some(Duration::from_secs(3));
    if let Some(spec) = launch.container.as_mut() {
        spec.labels.insert("muster.timeout_s".into(), "3".into());
    }
    let t0 = Instant::now();
    let m = start_then_abandon(&w, launch, "begin\n").await;
    // The agent stays down for 2 s (not a synchronisation: the time being away).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_stop_tx, stop) = watch::channel(None);
    let adopted = Instant::now();
    let out = w.exec.adopt(&m, &w.log_path(), stop).await;
    assert_eq!(out.end, AttemptEnd::TimedOut, "{out:?}");
    assert_eq!(
        out.message.as_deref(),
        Some("stopped after limits.timeout (3 s)")
    );
    // Counted from the container's start, not from the adoption.
    let (total, after_adoption) = (t0.elapsed(), adopted.elapsed());
    assert!(total >= Duration::from_millis(2900), "{total:?}");
    assert!(
        after_adoption < Duration::from_millis(2500),
        "{after_adoption:?}"
    );
    assert_eq!(w.log(), "begin\n");
    w.cleanup().await;
}

#[tokio::test]
async fn secret_values_are_redacted_from_a_containers_log() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let w = World::new(docker).await;
    // A secret file mounted read-only (as the agent mounts /run/secrets), echoed both
    // whole and in two writes.
    let secrets = tempfile::tempdir().expect("tempdir");
    std::fs::write(secrets.path().join("TOKEN"), "docker-canary-42").expect("write");
    let mut launch = w.launch(
        "cat /run/secrets/TOKEN; echo; printf 'docker-can'; sleep 0.2; printf 'ary-42\\n'; echo \"env=$TOKEN\"",
    );
    launch.env.push(("TOKEN".into(), "docker-canary-42".into()));
    launch.redact = muster_core::secrets::Redactor::new([b"docker-canary-42".as_slice()]);
    if let Some(c) = launch.container.as_mut() {
        c.read_only_mounts
            .push((secrets.path().to_path_buf(), "/run/secrets".into()));
    }
    let out = w.run(launch).await;
    assert_eq!(out.end, AttemptEnd::Completed, "{out:?}: {}", w.log());
    let log = w.log();
    assert!(!log.contains("docker-canary-42"), "log: {log}");
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        ["***", "***", "env=***"],
        "log: {log}"
    );
    w.cleanup().await;
}
