//! What a run may touch (issue 19, items 1 and 2): probe runs print what they can see and
//! the tests assert it. A container has no capabilities, `no-new-privileges`, a non-root
//! user, a read-only root and code with writable outputs, no Docker socket, a pids limit
//! that caps a fork bomb, and no GPU it was not given; a compute target may allow root and
//! add a capability back. A process under `--run-as nobody` runs as uid 65534 and cannot
//! read another run's working directory.
//!
//! Real containers: each test skips (with a note) where there is no Docker engine, unless
//! `MUSTER_REQUIRE_DOCKER=1`.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_proto::Word;
use muster_testkit::agents::{AgentHandle, agent_config};
use muster_testkit::images::{busybox_image, docker_or_skip};
use muster_testkit::{DevCluster, FakeGpuProbe, muster};
use muster_tests::{short_grace_dev, submit_sh, wait_done, wait_for_state, write};

/// Compute target `name` of `dev` (an attached target plus `extra_yaml`), and an
/// in-process agent in it with `gpus` fake GPUs, its config changed by `tweak`.
async fn pool_with_agent(
    dev: &DevCluster,
    name: &str,
    extra_yaml: &str,
    gpus: usize,
    tweak: impl FnOnce(&mut muster_agent::AgentConfig),
) -> (AgentHandle, Dirs) {
    let url = dev.url();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "compute.yml",
        &format!("name: {name}\ntype: attached\n{extra_yaml}"),
    );
    let out = muster(
        &url,
        dir.path(),
        &["compute", "create", "-f", "compute.yml"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    // Apart from the project folder, which a submit snapshots.
    let agent_dir = tempfile::tempdir().unwrap();
    let data = agent_dir.path().join("agent");
    std::fs::create_dir_all(&data).unwrap();
    let mut config = agent_config(
        &url,
        &data,
        name,
        &format!("{name}-box"),
        Arc::new(FakeGpuProbe::with(name, gpus)),
    );
    config.max_runs = Some(4);
    tweak(&mut config);
    let agent = AgentHandle::start(&url, config).await.unwrap();
    (
        agent,
        Dirs {
            project: dir,
            _agent: agent_dir,
        },
    )
}

/// A test's project folder (the submits' working directory) and its agent's folder.
struct Dirs {
    project: tempfile::TempDir,
    _agent: tempfile::TempDir,
}

impl Dirs {
    fn path(&self) -> &std::path::Path {
        self.project.path()
    }
}

/// Runs `script` to its end with `flags`; its state word and its log.
async fn run_to_end(
    url: &str,
    cwd: &std::path::Path,
    flags: &[&str],
    script: &str,
) -> (String, String) {
    let id = submit_sh(url, cwd, flags, script).await;
    let run = wait_done(url, &id).await;
    let logs = muster(url, cwd, &["run", "logs", &id]).await;
    (run.state().word().to_string(), logs.stdout)
}

/// What the probe prints: capabilities, no_new_privs, uid, and what it may write.
const PROBE: &str = "grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; echo uid=$(id -u); \
    touch /probe 2>/dev/null && echo root=writable || echo root=read-only; \
    touch /workspace/probe 2>/dev/null && echo code=writable || echo code=read-only; \
    echo x > /workspace/outputs/probe && echo outputs=writable; \
    echo x > /workspace/checkpoint/probe && echo checkpoint=writable; \
    echo x > /tmp/probe && echo tmp=writable; \
    test -e /var/run/docker.sock && echo docker.sock=present || echo docker.sock=absent";

fn field<'a>(log: &'a str, key: &str) -> Option<&'a str> {
    log.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix([':', '=']))
            .map(str::trim)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_has_no_privileges_and_writes_only_its_own_folders() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let image = busybox_image(&docker).await.unwrap();
    let dev = short_grace_dev().await;
    let url = dev.url();
    let (_agent, dir) = pool_with_agent(&dev, "hardened", "", 0, |_| {}).await;
    let (state, log) = run_to_end(
        &url,
        dir.path(),
        &["--compute", "hardened", "--image", &image],
        PROBE,
    )
    .await;
    assert_eq!(state, "completed", "{log}");
    assert_eq!(field(&log, "CapEff"), Some("0000000000000000"), "{log}");
    assert_eq!(field(&log, "NoNewPrivs"), Some("1"), "{log}");
    let uid = field(&log, "uid").unwrap_or_default();
    assert!(!uid.is_empty() && uid != "0", "{log}");
    assert_eq!(field(&log, "root"), Some("read-only"), "{log}");
    assert_eq!(field(&log, "code"), Some("read-only"), "{log}");
    assert_eq!(field(&log, "outputs"), Some("writable"), "{log}");
    assert_eq!(field(&log, "checkpoint"), Some("writable"), "{log}");
    assert_eq!(field(&log, "tmp"), Some("writable"), "{log}");
    assert_eq!(field(&log, "docker.sock"), Some("absent"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_target_may_allow_root_and_add_a_capability_back() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let image = busybox_image(&docker).await.unwrap();
    let dev = short_grace_dev().await;
    let url = dev.url();
    let (_agent, dir) = pool_with_agent(
        &dev,
        "rooted",
        "runs:\n  allow_root: true\n  add_capabilities: [NET_BIND_SERVICE]\n",
        0,
        |_| {},
    )
    .await;
    let (state, log) = run_to_end(
        &url,
        dir.path(),
        &["--compute", "rooted", "--image", &image],
        PROBE,
    )
    .await;
    assert_eq!(state, "completed", "{log}");
    let shown = muster(&url, dir.path(), &["compute", "show", "rooted"]).await;
    assert!(
        shown.stdout.contains(
            "run policy   containers may run as root, capabilities NET_BIND_SERVICE, at most 4096 processes"
        ),
        "{shown:?}"
    );
    // CAP_NET_BIND_SERVICE is bit 10; nothing else.
    assert_eq!(field(&log, "CapEff"), Some("0000000000000400"), "{log}");
    assert_eq!(field(&log, "NoNewPrivs"), Some("1"), "{log}");
    assert_eq!(field(&log, "uid"), Some("0"), "{log}");
    // Root or not, the root filesystem and the code stay read-only.
    assert_eq!(field(&log, "root"), Some("read-only"), "{log}");
    assert_eq!(field(&log, "code"), Some("read-only"), "{log}");
    assert_eq!(field(&log, "outputs"), Some("writable"), "{log}");
    // A capability muster does not know is refused, naming the field.
    write(
        dir.path(),
        "bad.yml",
        "name: bad\ntype: attached\nruns:\n  add_capabilities: [ALL]\n",
    );
    let out = muster(&url, dir.path(), &["compute", "create", "-f", "bad.yml"]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("runs.add_capabilities"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_capped_by_the_pids_limit_and_the_node_survives() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let image = busybox_image(&docker).await.unwrap();
    let dev = short_grace_dev().await;
    let url = dev.url();
    let (_agent, dir) =
        pool_with_agent(&dev, "bombed", "runs:\n  max_processes: 64\n", 0, |_| {}).await;
    let t0 = Instant::now();
    let (_state, log) = run_to_end(
        &url,
        dir.path(),
        &["--compute", "bombed", "--image", &image],
        "i=0; while [ $i -lt 10000 ]; do sleep 30 & i=$((i+1)); done; echo all-spawned",
    )
    .await;
    // Far fewer than 10,000 processes: forks fail at the limit, and the run ends without
    // waiting for its sleeps.
    assert!(
        log.contains("can't fork") || log.contains("Resource temporarily unavailable"),
        "{log}"
    );
    assert!(t0.elapsed() < Duration::from_secs(28), "{:?}", t0.elapsed());
    // The node still runs what comes next.
    let (state, log) = run_to_end(
        &url,
        dir.path(),
        &["--compute", "bombed", "--image", &image],
        "echo still-here",
    )
    .await;
    assert_eq!((state.as_str(), log.trim()), ("completed", "still-here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_variables_a_run_sets_do_not_show_it_gpus_it_was_not_given() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let image = busybox_image(&docker).await.unwrap();
    let dev = short_grace_dev().await;
    let url = dev.url();
    let (_agent, dir) = pool_with_agent(&dev, "gpus", "", 2, |_| {}).await;
    let script =
        "echo nvidia=${NVIDIA_VISIBLE_DEVICES-unset}; echo cuda=${CUDA_VISIBLE_DEVICES-unset}";
    let env = [
        "-e",
        "CUDA_VISIBLE_DEVICES=0,1",
        "-e",
        "NVIDIA_VISIBLE_DEVICES=all",
    ];
    // In a container: the runtime's variable says none; CUDA's is not the run's.
    let mut flags = vec!["--compute", "gpus", "--image", &image];
    flags.extend(env);
    let (state, log) = run_to_end(&url, dir.path(), &flags, script).await;
    assert_eq!(state, "completed", "{log}");
    assert_eq!(field(&log, "nvidia"), Some("void"), "{log}");
    assert_eq!(field(&log, "cuda"), Some("unset"), "{log}");
    // As a process: both name no GPU.
    let mut flags = vec!["--compute", "gpus"];
    flags.extend(env);
    let (state, log) = run_to_end(&url, dir.path(), &flags, script).await;
    assert_eq!(state, "completed", "{log}");
    assert_eq!(field(&log, "nvidia"), Some("void"), "{log}");
    assert_eq!(field(&log, "cuda"), Some(""), "{log}");
    // A run given one GPU sees exactly that one, whatever it set.
    let mut flags = vec!["--compute", "gpus", "--gpus", "1"];
    flags.extend(env);
    let (state, log) = run_to_end(&url, dir.path(), &flags, script).await;
    assert_eq!(state, "completed", "{log}");
    let given = field(&log, "cuda").unwrap_or_default();
    assert!(given.starts_with("GPU-") && !given.contains(','), "{log}");
    assert_eq!(field(&log, "nvidia"), Some(given), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_run_as_nobody_cannot_read_another_run_s_working_directory() {
    if !nix::unistd::geteuid().is_root() {
        // --run-as needs a root agent; CI runs these tests as root.
        assert!(
            std::env::var("MUSTER_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "MUSTER_REQUIRE_DOCKER=1 but the tests do not run as root: --run-as cannot be tested"
        );
        return;
    }
    let dev = short_grace_dev().await;
    let url = dev.url();
    let nobody = muster_agent::executor::confine::resolve_run_as("nobody").unwrap();
    let (_agent, dir) = pool_with_agent(&dev, "confined", "", 0, |c| {
        c.run_as = Some(nobody);
        // The run user must reach its working directory below the data dir.
        for d in c.data_dir.ancestors() {
            let mode = std::fs::metadata(d)
                .map(|m| m.permissions().mode())
                .unwrap_or(0);
            if mode & 0o001 == 0 {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o711)).unwrap();
            }
        }
    })
    .await;
    // Run A writes a secret in its working directory and stays.
    let a = submit_sh(
        &url,
        dir.path(),
        &["--compute", "confined"],
        "echo dir=$(pwd); echo uid=$(id -u); echo s3cret > secret; sleep 20",
    )
    .await;
    wait_for_state(&url, &a, "running").await;
    let mut a_dir = String::new();
    for _ in 0..100 {
        let logs = muster(&url, dir.path(), &["run", "logs", &a]).await;
        if let Some(d) = field(&logs.stdout, "dir").filter(|_| logs.stdout.contains("uid=")) {
            assert_eq!(field(&logs.stdout, "uid"), Some("65534"), "{logs:?}");
            a_dir = d.to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!a_dir.is_empty(), "run A never said where it runs");
    // Run B, the same user, tries to read it, to list it and to read A's log.
    let (state, log) = run_to_end(
        &url,
        dir.path(),
        &["--compute", "confined"],
        &format!(
            "echo uid=$(id -u); echo me > mine && echo own=writable; \
             cat {a_dir}/secret 2>/dev/null && echo secret=read || echo secret=denied; \
             ls {a_dir} >/dev/null 2>&1 && echo list=allowed || echo list=denied; \
             ls {a_dir}/.. >/dev/null 2>&1 && echo attempt=listed || echo attempt=denied; \
             cat {a_dir}/../output.log >/dev/null 2>&1 && echo log=read || echo log=denied"
        ),
    )
    .await;
    assert_eq!(state, "completed", "{log}");
    assert_eq!(field(&log, "uid"), Some("65534"), "{log}");
    assert_eq!(field(&log, "own"), Some("writable"), "{log}");
    assert_eq!(field(&log, "secret"), Some("denied"), "{log}");
    assert_eq!(field(&log, "list"), Some("denied"), "{log}");
    assert_eq!(field(&log, "attempt"), Some("denied"), "{log}");
    assert_eq!(field(&log, "log"), Some("denied"), "{log}");
    // A's secret is there all the same (the run wrote it), owned by the run user.
    let secret = std::path::Path::new(&a_dir).join("secret");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "s3cret\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&secret).unwrap().uid(), 65534);
    let _ = muster(&url, dir.path(), &["run", "cancel", &a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_cluster_admin_loosens_a_compute_target_s_runs() {
    use muster_proto::v1;
    let dev = short_grace_dev().await;
    let url = dev.url();
    let token = muster_testkit::access::user_token(&url, "olga", "operator", Some("default"))
        .await
        .unwrap();
    let mut operator =
        muster_client::connect(&url, muster_client::Credentials::bearer(&token).unwrap())
            .await
            .unwrap();
    let target = |name: &str, policy: Option<v1::RunPolicy>| v1::ComputeTarget {
        name: name.into(),
        r#type: "attached".into(),
        run_policy: policy,
        ..Default::default()
    };
    let root = Some(v1::RunPolicy {
        allow_root: true,
        ..Default::default()
    });
    // An operator creates a hardened target, but not a loosened one.
    let denied = operator
        .compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(target("loose", root.clone())),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().starts_with("runs: "), "{denied:?}");
    operator
        .compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(target("tight", None)),
        })
        .await
        .unwrap();
    let denied = operator
        .compute
        .update_compute(v1::UpdateComputeRequest {
            compute: Some(target("tight", root.clone())),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    // The cluster admin may; the target then says so, and an operator's other changes
    // keep it.
    let mut admin = dev.clients().await.unwrap();
    admin
        .compute
        .update_compute(v1::UpdateComputeRequest {
            compute: Some(target("tight", root.clone())),
        })
        .await
        .unwrap();
    let mut kept = target("tight", root.clone());
    kept.description = Some("legacy images".into());
    let updated = operator
        .compute
        .update_compute(v1::UpdateComputeRequest {
            compute: Some(kept),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.run_policy, root);
    assert_eq!(updated.description.as_deref(), Some("legacy images"));
}

#[tokio::test]
async fn an_agent_refuses_a_run_as_user_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    for (user, says) in [
        (
            "no-such-user-here",
            "--run-as: no user \"no-such-user-here\"",
        ),
        ("root", "--run-as: \"root\" is root"),
    ] {
        let out = muster(
            "http://127.0.0.1:9",
            dir.path(),
            &[
                "agent",
                "--compute",
                "pool",
                "--data-dir",
                dir.path().join("agent").to_str().unwrap(),
                "--run-as",
                user,
            ],
        )
        .await;
        assert_ne!(out.code, 0, "{out:?}");
        assert!(out.stderr.contains(says), "{out:?}");
    }
}
