//! Autoscaling compute clusters (issue 5, item 6): a cluster grows for waiting runs and
//! shrinks after its idle time, through the `docker` provisioner (agent containers from
//! the `muster:local` image) and the `command` provisioner (an admin's scripts).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use muster_proto::Word;
use muster_proto::v1;
use muster_testkit::cluster::TestCluster;
use muster_testkit::images::{docker_or_skip, remove_containers_labelled};
use muster_testkit::{DevCluster, muster, muster_bin};
use muster_tests::{short_grace_dev, submit_sh, urls_but};

/// A compute name unique to this test process.
fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id())
}

async fn try_status(url: &str, name: &str) -> anyhow::Result<v1::ComputeStatus> {
    let mut c = muster_testkit::access::clients(url).await?;
    Ok(c.compute
        .get_compute_status(v1::GetComputeRequest { name: name.into() })
        .await?
        .into_inner())
}

async fn status(url: &str, name: &str) -> v1::ComputeStatus {
    try_status(url, name).await.expect("compute status")
}

/// Polls (bounded by `limit`) until `check` holds on the compute target's status.
async fn wait_status(
    url: &str,
    name: &str,
    what: &str,
    limit: Duration,
    mut check: impl FnMut(&v1::ComputeStatus) -> bool,
) -> v1::ComputeStatus {
    // Errors (a server going away, an election) are retried until the deadline.
    let t0 = Instant::now();
    loop {
        let s = try_status(url, name).await;
        if let Ok(s) = &s
            && check(s)
        {
            return s.clone();
        }
        assert!(
            t0.elapsed() < limit,
            "{what} did not happen within {limit:?}; last status: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn submit(url: &str, dir: &Path, compute: &str, cpu: &str, secs: u32) -> String {
    let sleep = format!("sleep {secs}");
    submit_sh(url, dir, &["--compute", compute, "--cpu", cpu], &sleep).await
}

async fn try_get_run(url: &str, id: &str) -> anyhow::Result<v1::Run> {
    let mut c = muster_testkit::access::clients(url).await?;
    Ok(c.runs
        .get_run(v1::GetRunRequest {
            id: id.into(),
            stale: true,
        })
        .await?
        .into_inner())
}

async fn get_run(url: &str, id: &str) -> v1::Run {
    try_get_run(url, id).await.expect("get run")
}

/// Polls (bounded by `limit`) until run `id` is running.
async fn wait_running(url: &str, id: &str, limit: Duration) {
    let t0 = Instant::now();
    while get_run(url, id).await.state().word() != "running" {
        assert!(t0.elapsed() < limit, "run {id} never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) for every run to complete; returns the node each ran on.
async fn wait_completed(url: &str, ids: &[String], limit: Duration) -> Vec<String> {
    let t0 = Instant::now();
    let mut nodes = Vec::new();
    for id in ids {
        loop {
            let Ok(r) = try_get_run(url, id).await else {
                assert!(
                    t0.elapsed() < limit,
                    "run {id} could not be read within {limit:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            if r.state().word() == "completed" {
                let a = r.attempts.last().expect("an attempt");
                nodes.push(a.placements[0].node_name.clone());
                break;
            }
            assert!(
                !matches!(r.state().word(), "failed" | "canceled" | "timed_out"),
                "run {id} ended {}: {:?}",
                r.state().word(),
                r.message
            );
            assert!(
                t0.elapsed() < limit,
                "run {id} did not complete within {limit:?}: {r:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    nodes
}

fn actions(s: &v1::ComputeStatus) -> Vec<(String, Vec<String>)> {
    s.history
        .iter()
        .map(|e| (e.action.clone(), e.nodes.clone()))
        .collect()
}

/// Removes the test's agent containers, whatever happened.
struct Containers {
    compute: String,
}

impl Drop for Containers {
    fn drop(&mut self) {
        let compute = self.compute.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(d) = bollard::Docker::connect_with_defaults() {
                    let _ = remove_containers_labelled(&d, "muster.compute", &compute).await;
                }
            });
        })
        .join();
    }
}

/// The CPUs an agent container offers: the engine's (its containers have no CPU limit).
async fn engine_cpus(docker: &bollard::Docker) -> String {
    let n = docker.info().await.unwrap().ncpu.unwrap_or(1).max(1);
    n.to_string()
}

/// Builds `muster:local` from the test's muster binary with deploy/build-image.sh.
async fn build_agent_image() {
    let bin = muster_bin();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/build-image.sh");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .arg(script)
            .arg(bin)
            .output()
            .expect("build-image.sh runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "deploy/build-image.sh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates `name`, a `docker`-provisioned cluster of 0 to `max` nodes idle 5 s at most,
/// with any `extra` flags; asserts it was created.
async fn create_docker_cluster(
    url: &str,
    dir: &Path,
    name: &str,
    max: &str,
    extra: &[&str],
) -> muster_testkit::CliOutput {
    let mut args = vec![
        "compute",
        "create",
        name,
        "--type",
        "cluster",
        "--min-instances",
        "0",
        "--max-instances",
        max,
        "--idle-time-before-scale-down",
        "5",
        "--provisioner",
        "docker",
    ];
    args.extend_from_slice(extra);
    let out = muster(url, dir, &args).await;
    assert_eq!(out.code, 0, "{out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_cluster_grows_to_two_nodes_for_two_runs_and_shrinks_to_zero() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    build_agent_image().await;
    let dev = short_grace_dev().await;
    let url = dev.url();
    let name = unique("dock");
    let _cleanup = Containers {
        compute: name.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let out = create_docker_cluster(&url, dir.path(), &name, "2", &[]).await;
    assert!(
        out.stdout
            .contains("provisioner  docker (image muster:local, network host"),
        "{out:?}"
    );
    assert_eq!(status(&url, &name).await.compute.unwrap().nodes, 0);

    // Each run asks for every CPU of a node (the agents in the containers offer the
    // engine's), so only one fits per node: two waiting runs need two nodes.
    let cpus = engine_cpus(&docker).await;
    let a = submit(&url, dir.path(), &name, &cpus, 4).await;
    let b = submit(&url, dir.path(), &name, &cpus, 4).await;
    let grown = wait_status(
        &url,
        &name,
        "growing to 2 nodes",
        Duration::from_secs(120),
        |s| s.nodes.len() == 2 && s.nodes.iter().all(|n| n.state().word() == "ready"),
    )
    .await;
    let names: BTreeSet<String> = grown.nodes.iter().map(|n| n.name.clone()).collect();
    let expected: BTreeSet<String> =
        [format!("muster-{name}-0"), format!("muster-{name}-1")].into();
    assert_eq!(names, expected);
    // They are containers of the image, labelled for the compute target, on the host network.
    for node in &expected {
        let c = docker.inspect_container(node, None).await.unwrap();
        let labels = c.config.as_ref().unwrap().labels.clone().unwrap();
        assert_eq!(labels.get("muster.compute"), Some(&name));
        assert_eq!(c.config.unwrap().image.as_deref(), Some("muster:local"));
        assert_eq!(c.host_config.unwrap().network_mode.as_deref(), Some("host"));
    }
    let ran_on: BTreeSet<String> = wait_completed(&url, &[a, b], Duration::from_secs(120))
        .await
        .into_iter()
        .collect();
    assert_eq!(ran_on, expected, "one run per node");

    // Idle for 5 s: both drained, stopped, removed from the state and the engine.
    let shrunk = wait_status(
        &url,
        &name,
        "shrinking to 0",
        Duration::from_secs(90),
        |s| s.nodes.is_empty() && s.provisioned.is_empty(),
    )
    .await;
    for node in &expected {
        assert!(
            docker.inspect_container(node, None).await.is_err(),
            "container {node} is still there"
        );
    }
    let acts = actions(&shrunk);
    let did = |action: &str| -> BTreeSet<String> {
        acts.iter()
            .filter(|(a, _)| a == action)
            .flat_map(|(_, n)| n.clone())
            .collect()
    };
    for action in ["scale_up", "launched", "scale_down", "released"] {
        assert_eq!(did(action), expected, "{action}: {acts:?}");
    }
    assert!(!acts.iter().any(|(a, _)| a == "failed"), "{acts:?}");
    // What a person reads.
    let shown = muster(&url, dir.path(), &["compute", "show", &name]).await;
    assert_eq!(shown.code, 0, "{shown:?}");
    assert!(shown.stdout.contains("last actions"), "{shown:?}");
    assert!(shown.stdout.contains("released"), "{shown:?}");
    assert!(shown.stdout.contains("nodes        0"), "{shown:?}");
    // Nothing left: the compute target can be deleted.
    let out = muster(&url, dir.path(), &["compute", "delete", &name]).await;
    assert_eq!(out.code, 0, "{out:?}");
}

/// The agent containers of `compute` the engine has, by name.
async fn containers_of(docker: &bollard::Docker, compute: &str) -> BTreeSet<String> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let filters =
        std::collections::HashMap::from([("label", vec![format!("muster.compute={compute}")])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    docker
        .list_containers(Some(options))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| {
            c.names?
                .first()
                .map(|n| n.trim_start_matches('/').to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_adopts_the_agent_containers_and_still_scales_down() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    build_agent_image().await;
    let mut dev = short_grace_dev().await;
    let url = dev.url();
    let name = unique("adopt");
    let _cleanup = Containers {
        compute: name.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    // min 1: one node from the start, kept for ever; the busy node goes after 3 s idle.
    let yaml = format!(
        "name: {name}\ntype: amlcompute\nmin_instances: 1\nmax_instances: 2\nidle_time_before_scale_down: 3\nprovisioner:\n  type: docker\n"
    );
    std::fs::write(dir.path().join("compute.yml"), yaml).unwrap();
    let out = muster(
        &url,
        dir.path(),
        &["compute", "create", "-f", "compute.yml"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let first = format!("muster-{name}-0");
    wait_status(
        &url,
        &name,
        "reaching min_instances",
        Duration::from_secs(120),
        |s| s.nodes.len() == 1 && s.nodes[0].state().word() == "ready",
    )
    .await;
    let cpus = engine_cpus(&docker).await;
    let a = submit(&url, dir.path(), &name, &cpus, 8).await;
    let b = submit(&url, dir.path(), &name, &cpus, 8).await;
    wait_status(
        &url,
        &name,
        "growing to 2 nodes",
        Duration::from_secs(120),
        |s| s.nodes.len() == 2 && s.nodes.iter().all(|n| n.state().word() == "ready"),
    )
    .await;
    let both: BTreeSet<String> = [first.clone(), format!("muster-{name}-1")].into();
    assert_eq!(containers_of(&docker, &name).await, both);
    // Both running (their code fetched), so the restart interrupts nothing but the leader.
    for id in [&a, &b] {
        wait_running(&url, id, Duration::from_secs(60)).await;
    }

    // A new leader (the server restarts on its data) starts with an empty memory: it reads
    // the requested nodes from the state, finds their containers, and starts nothing more.
    dev.restart().await.unwrap();
    let ran_on: BTreeSet<String> = wait_completed(&url, &[a, b], Duration::from_secs(120))
        .await
        .into_iter()
        .collect();
    assert_eq!(ran_on, both);
    let shrunk = wait_status(
        &url,
        &name,
        "shrinking to 1",
        Duration::from_secs(90),
        |s| s.nodes.len() == 1 && s.provisioned.len() == 1,
    )
    .await;
    let kept = shrunk.nodes[0].name.clone();
    assert_eq!(containers_of(&docker, &name).await, [kept].into());
    let ups: Vec<String> = shrunk
        .history
        .iter()
        .filter(|e| e.action == "scale_up")
        .flat_map(|e| e.nodes.clone())
        .collect();
    assert_eq!(
        ups.len(),
        2,
        "no node requested twice: {:?}",
        shrunk.history
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaimed_agent_container_evicts_its_node_and_its_run_restarts_on_a_replacement() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    build_agent_image().await;
    // A heartbeat grace longer than the test: only the provisioner can notice the reclaim.
    let dev = DevCluster::start_with(|c| {
        c.server.heartbeat_interval = Duration::from_millis(300);
        c.server.node_grace = Duration::from_secs(600);
    })
    .await
    .unwrap();
    let url = dev.url();
    let name = unique("reclaim");
    let _cleanup = Containers {
        compute: name.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    create_docker_cluster(&url, dir.path(), &name, "1", &["--tier", "low_priority"]).await;
    // The first attempt runs until its machine is taken; the restarted one says so and ends.
    let id = submit_sh(
        &url,
        dir.path(),
        &["--compute", &name],
        "[ \"$MUSTER_ATTEMPT\" = 1 ] && sleep 600; echo attempt $MUSTER_ATTEMPT restarted=${MUSTER_RESTARTED:-0}",
    )
    .await;
    let first = format!("muster-{name}-0");
    wait_running(&url, &id, Duration::from_secs(120)).await;

    // The machine is reclaimed: its agent container, and the run inside it, are gone.
    use bollard::query_parameters::RemoveContainerOptionsBuilder;
    docker
        .remove_container(
            &first,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await
        .unwrap();
    let second = format!("muster-{name}-1");
    let ran_on = wait_completed(&url, std::slice::from_ref(&id), Duration::from_secs(120)).await;
    assert_eq!(
        ran_on,
        vec![second.clone()],
        "restarted on a replacement node"
    );
    let run = get_run(&url, &id).await;
    assert_eq!(run.attempts.len(), 2, "{run:#?}");
    let gone = &run.attempts[0];
    assert_eq!(gone.end().word(), "node_lost", "{gone:?}");
    assert!(
        gone.message.as_deref().is_some_and(|m| m.contains(&format!(
            "node {first} was reclaimed: its agent container {first} was removed from the Docker host"
        ))),
        "{gone:?}"
    );
    let logs = muster(&url, dir.path(), &["run", "logs", &id]).await;
    assert_eq!(logs.stdout, "attempt 2 restarted=1\n", "{logs:?}");
    // The evicted node was released, and the replacement asked for in the same decision.
    let s = status(&url, &name).await;
    let evicted = s
        .history
        .iter()
        .find(|e| e.action == "scale_down" && e.nodes == [first.clone()])
        .unwrap_or_else(|| panic!("no scale-down of {first}: {:?}", s.history));
    assert!(evicted.message.contains("evicted"), "{evicted:?}");
    assert!(
        s.history
            .iter()
            .any(|e| e.action == "scale_up" && e.nodes == [second.clone()]),
        "{:?}",
        s.history
    );
}

/// Kills the agents the scale-up script started, whatever happened.
struct Agents {
    dir: PathBuf,
}

impl Drop for Agents {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "pid")
                && let Ok(pid) = std::fs::read_to_string(e.path())
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Writes the executable shell script `dir/name` with `body` after the `#!/bin/sh` line.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A scale-up script body: `prelude`, then for each node named: `guard`, start its agent
/// (its pid in `dir/NODE.pid`), `after`.
fn scale_up(dir: &Path, prelude: &str, guard: &str, after: &str) -> String {
    format!(
        r#"{prelude}shift 2
for node in "$@"; do
{guard}  '{bin}' agent --compute "$MUSTER_COMPUTE" --name "$node" --data-dir '{dir}'/"$node" --cpus 1 > '{dir}'/"$node.log" 2>&1 &
  echo $! > '{dir}'/"$node.pid"
{after}done
"#,
        dir = dir.display(),
        bin = muster_bin().display()
    )
}

/// A scale-down script body that kills each named node's agent (logging the call if `log`).
fn scale_down(dir: &Path, log: bool) -> String {
    let log = if log {
        format!("echo \"down $*\" >> '{}/calls.log'\n", dir.display())
    } else {
        String::new()
    };
    format!(
        r#"{log}shift 2
for node in "$@"; do
  if [ -f '{dir}'/"$node.pid" ]; then kill "$(cat '{dir}'/"$node.pid")"; rm -f '{dir}'/"$node.pid"; fi
done
"#,
        dir = dir.display()
    )
}

/// `muster compute create NAME FLAGS` with the `command` provisioner's two scripts; it must succeed.
async fn create_command_compute(
    url: &str,
    cwd: &Path,
    name: &str,
    flags: &[&str],
    up: &Path,
    down: &Path,
) {
    let mut args = vec!["compute", "create", name];
    args.extend_from_slice(flags);
    args.extend([
        "--provisioner",
        "command",
        "--scale-up",
        up.to_str().unwrap(),
        "--scale-down",
        down.to_str().unwrap(),
    ]);
    let out = muster(url, cwd, &args).await;
    assert_eq!(out.code, 0, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_provisioner_runs_the_scripts_with_compute_size_and_node_names() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    let name = unique("cmd");
    let scripts = tempfile::tempdir().unwrap();
    let dir = scripts.path().to_path_buf();
    let _agents = Agents { dir: dir.clone() };
    let d = dir.display();
    let up = script(
        &dir,
        "scale-up.sh",
        &scale_up(
            &dir,
            &format!(
                "set -e\necho \"up $*\" >> '{d}/calls.log'\necho \"env $MUSTER_COMPUTE|$MUSTER_SIZE|$MUSTER_NODES|$MUSTER_SERVER\" >> '{d}/calls.log'\n"
            ),
            "",
            "",
        ),
    );
    let down = script(&dir, "scale-down.sh", &scale_down(&dir, true));
    let work = tempfile::tempdir().unwrap();
    create_command_compute(
        &url,
        work.path(),
        &name,
        &[
            "--type",
            "cluster",
            "--size",
            "small",
            "--max-instances",
            "2",
            "--idle-time-before-scale-down",
            "3",
        ],
        &up,
        &down,
    )
    .await;

    // The agents offer 1 CPU each; each run needs 1: two runs, two nodes.
    let a = submit(&url, work.path(), &name, "1", 3).await;
    let b = submit(&url, work.path(), &name, "1", 3).await;
    let ran_on: BTreeSet<String> = wait_completed(&url, &[a, b], Duration::from_secs(90))
        .await
        .into_iter()
        .collect();
    let expected: BTreeSet<String> =
        [format!("muster-{name}-0"), format!("muster-{name}-1")].into();
    assert_eq!(ran_on, expected);
    wait_status(
        &url,
        &name,
        "shrinking to 0",
        Duration::from_secs(60),
        |s| s.nodes.is_empty() && s.provisioned.is_empty(),
    )
    .await;

    // The scripts were called with the compute, its size and the node names.
    let calls = std::fs::read_to_string(dir.join("calls.log")).unwrap();
    let nodes_of = |verb: &str| -> BTreeSet<String> {
        calls
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{verb} {name} small ")))
            .flat_map(|rest| rest.split(' ').map(str::to_string))
            .collect()
    };
    assert_eq!(nodes_of("up"), expected, "{calls}");
    assert_eq!(nodes_of("down"), expected, "{calls}");
    let server = dev.addr.to_string();
    assert!(
        calls.lines().filter(|l| l.starts_with("env ")).all(|l| l
            .starts_with(&format!("env {name}|small|muster-{name}-"))
            && l.ends_with(&format!("|{server}"))),
        "{calls}"
    );
    // Every agent it started was stopped by scale-down.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .collect();
    assert!(left.is_empty(), "agents left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_provisioner_settings_are_refused_with_the_field_and_change_nothing() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--type", "cluster", "--scale-up", "/bin/true"],
            "--scale-up: only for --provisioner command",
        ),
        (
            &[
                "--type",
                "cluster",
                "--provisioner",
                "command",
                "--scale-up",
                "/bin/true",
            ],
            "--scale-down: missing",
        ),
        (
            &["--type", "attached", "--provisioner", "docker"],
            "provisioner: attached targets never provision",
        ),
        (
            &["--type", "cluster", "--provisioner", "cloud"],
            "--provisioner: unknown provisioner",
        ),
    ];
    for (flags, error) in cases {
        let mut args = vec!["compute", "create", "badprov"];
        args.extend_from_slice(flags);
        let out = muster(&url, dir.path(), &args).await;
        assert_ne!(out.code, 0, "{args:?}: {out:?}");
        assert!(out.stderr.contains(error), "{args:?}: {out:?}");
    }
    std::fs::write(
        dir.path().join("c.yml"),
        "name: badprov\nprovisioner:\n  type: docker\n  imag: muster:local\n",
    )
    .unwrap();
    let out = muster(&url, dir.path(), &["compute", "create", "-f", "c.yml"]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("provisioner.imag"), "{out:?}");
    let list = muster(&url, dir.path(), &["compute", "list"]).await;
    assert!(!list.stdout.contains("badprov"), "{list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_scale_up_is_shown_with_its_output_and_retried() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    let name = unique("retry");
    let scripts = tempfile::tempdir().unwrap();
    let dir = scripts.path().to_path_buf();
    let _agents = Agents { dir: dir.clone() };
    let d = dir.display();
    // Fails until the admin "fixes the rack" (creates the file), then starts the agents.
    let up = script(
        &dir,
        "up.sh",
        &scale_up(
            &dir,
            &format!(
                "if [ ! -f '{d}/fixed' ]; then echo \"rack 7 has no power\" >&2; exit 3; fi\n"
            ),
            "",
            "",
        ),
    );
    let down = script(&dir, "down.sh", &scale_down(&dir, false));
    let work = tempfile::tempdir().unwrap();
    create_command_compute(
        &url,
        work.path(),
        &name,
        &["--type", "instance"],
        &up,
        &down,
    )
    .await;
    // An instance is one node, started at once; the script fails and says why.
    let node = format!("muster-{name}-0");
    let failed = wait_status(
        &url,
        &name,
        "a failed scale-up",
        Duration::from_secs(30),
        |s| s.history.iter().any(|e| e.action == "failed"),
    )
    .await;
    let e = failed
        .history
        .iter()
        .find(|e| e.action == "failed")
        .unwrap();
    assert_eq!(e.nodes, vec![node.clone()]);
    assert!(
        e.message.contains("rack 7 has no power") && e.message.contains("exit status: 3"),
        "{e:?}"
    );
    let shown = muster(&url, work.path(), &["compute", "show", &name]).await;
    assert!(shown.stdout.contains("rack 7 has no power"), "{shown:?}");
    assert!(
        shown
            .stdout
            .contains(&format!("provisioning {node} (requested)")),
        "{shown:?}"
    );
    // Fixed: the next try starts it, and a run goes through.
    std::fs::write(dir.join("fixed"), "").unwrap();
    let id = submit(&url, work.path(), &name, "1", 0).await;
    assert_eq!(
        wait_completed(&url, &[id], Duration::from_secs(60)).await,
        vec![node.clone()]
    );
    let s = status(&url, &name).await;
    assert_eq!(s.nodes.len(), 1);
    // The same failure is recorded once, not on every retry.
    let failures = s.history.iter().filter(|e| e.action == "failed").count();
    assert_eq!(failures, 1, "{:?}", s.history);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_agent_image_is_reported_and_nothing_starts() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let dev = short_grace_dev().await;
    let url = dev.url();
    let name = unique("noimg");
    let _cleanup = Containers {
        compute: name.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let out = muster(
        &url,
        dir.path(),
        &[
            "compute",
            "create",
            &name,
            "--type",
            "cluster",
            "--min-instances",
            "1",
            "--max-instances",
            "1",
            "--provisioner",
            "docker",
            "--docker-image",
            "muster-test-no-such-image:never",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let s = wait_status(
        &url,
        &name,
        "a failed start",
        Duration::from_secs(30),
        |s| s.history.iter().any(|e| e.action == "failed"),
    )
    .await;
    let e = s.history.iter().find(|e| e.action == "failed").unwrap();
    assert!(
        e.message
            .contains("image muster-test-no-such-image:never is not on the Docker host"),
        "{e:?}"
    );
    assert!(containers_of(&docker, &name).await.is_empty());
    assert!(s.nodes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_failover_mid_scale_up_neither_starts_a_node_twice_nor_forgets_one() {
    // A grace long enough for the agents to find the new leader on a loaded machine: a
    // node lost meanwhile would be (rightly) replaced, which is not what this test counts.
    let mut cluster = TestCluster::start_with(3, |c| {
        c.heartbeat_interval = Duration::from_millis(300);
        c.node_grace = Duration::from_secs(15);
    })
    .await
    .unwrap();
    let urls = cluster.urls();
    let name = unique("fail");
    let scripts = tempfile::tempdir().unwrap();
    let dir = scripts.path().to_path_buf();
    let _agents = Agents { dir: dir.clone() };
    let d = dir.display();
    // Slow to act (the leader can die meanwhile: its script is killed with it), and
    // idempotent per node, as DESIGN.md asks of a command provisioner's scripts.
    let up = script(
        &dir,
        "up.sh",
        &scale_up(
            &dir,
            &format!("echo \"up $*\" >> '{d}/calls.log'\nsleep 3\n"),
            &format!(
                "  if [ -f '{d}'/\"$node.pid\" ] && kill -0 \"$(cat '{d}'/\"$node.pid\")\" 2>/dev/null; then continue; fi\n"
            ),
            &format!("  echo \"start $node\" >> '{d}/calls.log'\n"),
        ),
    );
    let down = script(&dir, "down.sh", &scale_down(&dir, true));
    let work = tempfile::tempdir().unwrap();
    create_command_compute(
        &urls,
        work.path(),
        &name,
        &[
            "--type",
            "cluster",
            "--max-instances",
            "2",
            "--idle-time-before-scale-down",
            "3",
        ],
        &up,
        &down,
    )
    .await;
    let a = submit(&urls, work.path(), &name, "1", 3).await;
    let b = submit(&urls, work.path(), &name, "1", 3).await;
    // The decision is in the log; the leader is running the script: stop the leader now.
    wait_status(
        &urls,
        &name,
        "a scale-up decision",
        Duration::from_secs(30),
        |s| s.provisioned.len() == 2,
    )
    .await;
    let t0 = Instant::now();
    while !std::fs::read_to_string(dir.join("calls.log")).is_ok_and(|c| c.contains("up ")) {
        assert!(t0.elapsed() < Duration::from_secs(30), "scale-up never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = cluster.leader().await.unwrap();
    cluster.kill(leader).await.unwrap();
    let urls = urls_but(&cluster, leader).join(",");

    // The new leader finishes the scale-up, the runs go through, the nodes go after idling.
    let ran_on: BTreeSet<String> = wait_completed(&urls, &[a, b], Duration::from_secs(120))
        .await
        .into_iter()
        .collect();
    let expected: BTreeSet<String> =
        [format!("muster-{name}-0"), format!("muster-{name}-1")].into();
    // Usually one run per node; but when the new leader re-runs the (slow) scale-up, the
    // first node may finish run a before the second node is up, and then take run b too.
    assert!(
        !ran_on.is_empty() && ran_on.is_subset(&expected),
        "ran on {ran_on:?}, expected nodes among {expected:?}"
    );
    let s = wait_status(
        &urls,
        &name,
        "shrinking to 0",
        Duration::from_secs(60),
        |s| s.nodes.is_empty() && s.provisioned.is_empty(),
    )
    .await;
    let requested: Vec<String> = s
        .history
        .iter()
        .filter(|e| e.action == "scale_up")
        .flat_map(|e| e.nodes.clone())
        .collect();
    assert_eq!(
        requested.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "{:?}",
        s.history
    );
    assert_eq!(
        requested.len(),
        2,
        "a node requested twice: {:?}",
        s.history
    );
    let calls = std::fs::read_to_string(dir.join("calls.log")).unwrap();
    for node in &expected {
        let starts = calls
            .lines()
            .filter(|l| *l == format!("start {node}"))
            .count();
        assert_eq!(starts, 1, "{node} started {starts} times:\n{calls}");
    }
    assert!(calls.contains("down "), "{calls}");
    eprintln!("scripts called:\n{calls}");
}

/// `compute update` under load: a cluster held at one node grows to two as soon as its
/// max is raised, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_max_instances_under_load_grows_the_cluster_at_once() {
    let dev = short_grace_dev().await;
    let url = dev.url();
    let name = unique("upd");
    let scripts = tempfile::tempdir().unwrap();
    let dir = scripts.path().to_path_buf();
    let _agents = Agents { dir: dir.clone() };
    let up = script(&dir, "scale-up.sh", &scale_up(&dir, "set -e\n", "", ""));
    let down = script(&dir, "scale-down.sh", &scale_down(&dir, false));
    let work = tempfile::tempdir().unwrap();
    create_command_compute(
        &url,
        work.path(),
        &name,
        &[
            "--type",
            "cluster",
            "--max-instances",
            "1",
            "--idle-time-before-scale-down",
            "3",
        ],
        &up,
        &down,
    )
    .await;
    // Each agent offers 1 CPU; each run needs 1 for 8 s: one node holds one at a time.
    let a = submit(&url, work.path(), &name, "1", 8).await;
    let b = submit(&url, work.path(), &name, "1", 8).await;
    wait_running(&url, &a, Duration::from_secs(60)).await;
    assert_eq!(status(&url, &name).await.nodes.len(), 1);
    let updated = muster(
        &url,
        work.path(),
        &[
            "compute",
            "update",
            &name,
            "--max-instances",
            "2",
            "--max-gpus",
            "4",
        ],
    )
    .await;
    assert_eq!(updated.code, 0, "{updated:?}");
    let shown = muster(&url, work.path(), &["compute", "show", &name, "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(v["max_instances"], 2, "{v}");
    // The second run starts on a second node while the first still runs.
    wait_running(&url, &b, Duration::from_secs(60)).await;
    let first = get_run(&url, &a).await;
    assert_eq!(first.state().word(), "running", "{first:?}");
    let ran_on: BTreeSet<String> = wait_completed(&url, &[a, b], Duration::from_secs(90))
        .await
        .into_iter()
        .collect();
    assert_eq!(ran_on.len(), 2, "{ran_on:?}");
    // What cannot change says so and changes nothing.
    let bad = muster(
        &url,
        work.path(),
        &["compute", "update", &name, "--min-instances", "5"],
    )
    .await;
    assert_ne!(bad.code, 0, "{bad:?}");
    assert!(bad.stderr.contains("min_instances"), "{bad:?}");
}

/// A compute instance under the `docker` provisioner, sized `cpu=1,memory=256m`: its one
/// node's container has those limits (and its agent offers them), runs image runs through
/// the engine's socket, and the instance stops (its node, container and data volume go;
/// runs wait, saying why) and starts again (a new node takes the waiting run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sized_docker_instance_runs_image_runs_and_stops_and_starts() {
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    build_agent_image().await;
    let image = muster_testkit::images::busybox_image(&docker)
        .await
        .unwrap();
    let dev = short_grace_dev().await;
    let url = dev.url();
    let name = unique("box");
    let _cleanup = Containers {
        compute: name.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "compute",
        "create",
        &name,
        "--type",
        "instance",
        "--provisioner",
        "docker",
        "--vm-size",
        "cpu=1,memory=256m",
    ];
    let out = muster(&url, dir.path(), &args).await;
    assert_eq!(out.code, 0, "{out:?}");
    let node = format!("muster-{name}-0");
    let up = wait_status(&url, &name, "its node", Duration::from_secs(120), |s| {
        s.nodes.len() == 1 && s.nodes[0].state().word() == "ready"
    })
    .await;
    let n = &up.nodes[0];
    assert_eq!(n.name, node);
    let cap = n.capacity.unwrap();
    assert_eq!(
        (cap.cpu_millis, cap.memory_bytes),
        (1000, 256 << 20),
        "{n:?}"
    );
    assert_eq!(
        n.labels.get("size").map(String::as_str),
        Some("cpu=1,memory=256m")
    );
    let c = docker.inspect_container(&node, None).await.unwrap();
    let host = c.host_config.unwrap();
    assert_eq!(host.nano_cpus, Some(1_000_000_000));
    assert_eq!(host.memory, Some(256 << 20));
    let binds = host.binds.unwrap_or_default();
    assert!(
        binds
            .iter()
            .any(|b| b.starts_with(&format!("muster-{node}:"))),
        "{binds:?}"
    );

    // An image run, started by the agent in the container through the host's engine.
    let out = muster(
        &url,
        dir.path(),
        &[
            "run",
            "submit",
            "--compute",
            &name,
            "--image",
            &image,
            "--stream",
            "--",
            "sh",
            "-c",
            "echo in-image; test -d /workspace",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("in-image"), "{out:?}");

    // Stopped: the node, its container and its volume go; a new run waits and says why.
    let out = muster(&url, dir.path(), &["compute", "stop", &name]).await;
    assert_eq!(out.code, 0, "{out:?}");
    wait_status(&url, &name, "stopping", Duration::from_secs(60), |s| {
        s.nodes.is_empty() && s.provisioned.is_empty()
    })
    .await;
    assert!(docker.inspect_container(&node, None).await.is_err());
    assert!(
        docker
            .inspect_volume(&format!("muster-{node}"))
            .await
            .is_err()
    );
    let shown = muster(&url, dir.path(), &["compute", "show", &name]).await;
    assert!(shown.stdout.contains("state        stopped"), "{shown:?}");
    let waiting = submit_sh(&url, dir.path(), &["--compute", &name], "echo after-start").await;
    let t0 = Instant::now();
    loop {
        let show = muster(&url, dir.path(), &["run", "show", &waiting]).await;
        if show
            .stdout
            .contains(&format!("compute instance {name} is stopped"))
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{show:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A cluster does not stop (it scales); started, the instance gets a new node.
    let out = muster(&url, dir.path(), &["compute", "stop", "local"]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("only a compute instance stops"),
        "{out:?}"
    );
    let out = muster(&url, dir.path(), &["compute", "start", &name]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let ran_on = wait_completed(&url, &[waiting], Duration::from_secs(120)).await;
    assert_eq!(ran_on, [format!("muster-{name}-1")]);
}
