//! Distributed runs with real containers (issue 5, item 4): two in-process agents, each a
//! node of compute `pool`, ranks in containers on the nodes' network.
//!
//! - `pytorch`: the two ranks meet at `MASTER_ADDR:MASTER_PORT` using only muster's env;
//! - `mpi`: `mpirun` on rank 0 starts a process in both nodes' containers through muster's
//!   rsh helper (an Open MPI image built locally from the host's `openmpi-bin`);
//! - `tensorflow`: every rank gets the same cluster in `TF_CONFIG`, and its own task;
//! - a rank that exits 1 fails the attempt, names the rank, and its sleeping peer is
//!   stopped.

use muster_proto::Word;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::ListContainersOptionsBuilder;
use muster_agent::NoGpus;
use muster_testkit::agents::{AgentHandle, agent_config, rsh_helper_bin};
use muster_testkit::images::{busybox_image, docker_or_skip, remove_containers_labelled};
use muster_testkit::{DevCluster, muster};
use muster_tests::{all_runs, wait_done, write};

/// Distributed containers share the host's network, and each test's cluster picks ports
/// from 29500 on its own: the tests of this file run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `muster dev` plus two agents (`node-a`, `node-b`) of compute `pool`.
struct Pool {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    docker: bollard::Docker,
    dev: DevCluster,
    agents: Vec<AgentHandle>,
    /// Runs submitted: their containers are removed when the pool is dropped, even if the
    /// test failed before [`Pool::cleanup`].
    runs: std::sync::Mutex<Vec<String>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        let runs = std::mem::take(&mut *self.runs.lock().unwrap());
        if runs.is_empty() {
            return;
        }
        let docker = self.docker.clone();
        // Drop cannot await: remove them on a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                for id in runs {
                    let _ = remove_containers_labelled(&docker, "muster.run_id", &id).await;
                }
            });
        })
        .join();
    }
}

impl Pool {
    /// None when there is no Docker engine (and `MUSTER_REQUIRE_DOCKER` is unset).
    async fn start(with_rsh: bool) -> Option<Pool> {
        let docker = docker_or_skip().await?;
        let turn = ONE_AT_A_TIME.lock().await;
        let dev = DevCluster::start().await.unwrap();
        let url = dev.url();
        let scratch = tempfile::tempdir().unwrap();
        let out = muster(
            &url,
            scratch.path(),
            &["compute", "create", "pool", "--type", "attached"],
        )
        .await;
        assert_eq!(out.code, 0, "{out:?}");
        let mut agents = Vec::new();
        let mut dirs = vec![scratch];
        for name in ["node-a", "node-b"] {
            let dir = tempfile::tempdir().unwrap();
            let mut config = agent_config(&url, dir.path(), "pool", name, Arc::new(NoGpus));
            if with_rsh {
                config.rsh_helper = Some(rsh_helper_bin());
            }
            agents.push(AgentHandle::start(&url, config).await.unwrap());
            dirs.push(dir);
        }
        Some(Pool {
            _turn: turn,
            docker,
            dev,
            agents,
            runs: Default::default(),
            _dirs: dirs,
        })
    }

    /// Submits a 2-instance run of `job.yml` in `project` with `image`; returns its id.
    async fn submit(&self, project: &Path, image: &str) -> String {
        let out = muster(
            &self.dev.url(),
            project,
            &[
                "run",
                "submit",
                "-f",
                "job.yml",
                "--image",
                image,
                "--compute",
                "pool",
                "--timeout",
                "300",
            ],
        )
        .await;
        assert_eq!(out.code, 0, "{out:?}");
        let runs = all_runs(&self.dev.url()).await;
        assert_eq!(runs.len(), 1, "{runs:?}");
        self.runs.lock().unwrap().push(runs[0].id.clone());
        runs[0].id.clone()
    }

    /// The run's log as `muster run logs` prints it: the ranks' lines, each prefixed with
    /// `[rank N] `.
    async fn logs(&self, project: &Path, id: &str) -> String {
        let out = muster(&self.dev.url(), project, &["run", "logs", id]).await;
        assert_eq!(out.code, 0, "{out:?}");
        out.stdout
    }

    /// One rank's log of attempt 1, as the server keeps it (`muster run logs --rank N`:
    /// the ended rank's sealed log, unprefixed).
    async fn rank_log(&self, project: &Path, id: &str, rank: u32) -> String {
        let out = muster(
            &self.dev.url(),
            project,
            &[
                "run",
                "logs",
                id,
                "--attempt",
                "1",
                "--rank",
                &rank.to_string(),
            ],
        )
        .await;
        assert_eq!(out.code, 0, "{out:?}");
        out.stdout
    }

    /// The containers of run `id` still on the engine.
    async fn containers_of(&self, id: &str) -> usize {
        let filters = HashMap::from([("label", vec![format!("muster.run_id={id}")])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        self.docker
            .list_containers(Some(options))
            .await
            .unwrap()
            .len()
    }

    /// Stops the agents; the run's containers go when the pool is dropped.
    async fn cleanup(mut self) {
        for a in std::mem::take(&mut self.agents) {
            let _ = a.stop().await;
        }
    }
}

fn job(distribution: Option<&str>, command: &str) -> String {
    // `code: .`: the scripts beside the job file travel with it (no `code:`, no snapshot).
    let mut yaml = format!("code: .\ncommand: {command}\nresources:\n  instance_count: 2\n");
    if let Some(d) = distribution {
        yaml.push_str(&format!("distribution:\n  type: {d}\n"));
        if d == "mpi" {
            yaml.push_str("  process_count_per_instance: 2\n");
        }
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pytorch_ranks_meet_at_the_master_using_only_muster_env() {
    let Some(pool) = Pool::start(false).await else {
        return;
    };
    let image = busybox_image(&pool.docker).await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "job.yml",
        &job(Some("pytorch"), "sh rendezvous.sh"),
    );
    // Rank 0 listens on MASTER_PORT; rank 1 connects to MASTER_ADDR:MASTER_PORT (retrying,
    // bounded, until rank 0 listens); each sends a line and prints what it got.
    write(
        project.path(),
        "rendezvous.sh",
        r#"echo "rank $RANK of $WORLD_SIZE: node rank $NODE_RANK, local rank $LOCAL_RANK, master $MASTER_ADDR:$MASTER_PORT"
# Each side's handler runs on the connection: rank 0 greets and reads the reply, rank 1
# reads the greeting and replies; each writes what it got to outputs/got.
if [ "$RANK" = 0 ]; then
  nc -l -p "$MASTER_PORT" -e sh -c 'echo "hello from rank 0"; read line; echo "rank 0 got: $line" > outputs/got'
else
  i=0
  while [ ! -s outputs/got ] && [ $i -lt 300 ]; do
    nc -w 2 "$MASTER_ADDR" "$MASTER_PORT" -e sh -c 'read line; echo "rank $RANK got: $line" > outputs/got; echo "hello from rank $RANK"' 2>/dev/null
    [ -s outputs/got ] || sleep 0.2
    i=$((i + 1))
  done
fi
cat outputs/got
[ -s outputs/got ]
"#,
    );
    let id = pool.submit(project.path(), &image).await;
    let run = wait_done(&pool.dev.url(), &id).await;
    let logs = pool.logs(project.path(), &id).await;
    let rank1 = pool.rank_log(project.path(), &id, 1).await;
    assert_eq!(
        (run.state().word(), run.exit_code),
        ("completed", Some(0)),
        "{run:?}\n{logs}\n{rank1}"
    );
    assert!(
        logs.contains("[rank 0] rank 0 got: hello from rank 1"),
        "{logs}"
    );
    assert!(
        logs.contains("[rank 1] rank 1 got: hello from rank 0"),
        "{logs}"
    );
    assert!(
        logs.contains("[rank 1] rank 1 of 2: node rank 1, local rank 0"),
        "{logs}"
    );
    // Both ranks were told the same master, with the port muster chose.
    assert_eq!(logs.matches("master 127.0.0.1:29500").count(), 2, "{logs}");
    assert!(rank1.contains("rank 1 got: hello from rank 0"), "{rank1}");
    pool.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rank_fails_the_attempt_and_its_peer_is_stopped() {
    let Some(pool) = Pool::start(false).await else {
        return;
    };
    let image = busybox_image(&pool.docker).await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "job.yml", &job(None, "sh rank.sh"));
    // Rank 0 signals it is up (on AZ_BATCH_MASTER_NODE's port) and sleeps; rank 1 waits for
    // that signal (bounded), then fails.
    write(
        project.path(),
        "rank.sh",
        r#"port=${AZ_BATCH_MASTER_NODE##*:}
host=${AZ_BATCH_MASTER_NODE%:*}
if [ "$MUSTER_NODE_RANK" = 0 ]; then
  echo "rank 0 up, sleeping"
  nc -l -p "$port" -e sh -c 'echo up'
  sleep 600
else
  i=0
  until [ -s outputs/up ] || [ $i -ge 300 ]; do
    nc -w 2 "$host" "$port" -e sh -c 'read x; [ "$x" = up ] && echo "$x" > outputs/up' 2>/dev/null
    [ -s outputs/up ] || sleep 0.2
    i=$((i + 1))
  done
  echo "rank 1 saw rank 0; failing"
  exit 1
fi
"#,
    );
    let id = pool.submit(project.path(), &image).await;
    let run = wait_done(&pool.dev.url(), &id).await;
    assert_eq!(run.state().word(), "failed", "{run:?}");
    assert_eq!(run.exit_code, Some(1), "{run:?}");
    let message = run.message.clone().unwrap_or_default();
    assert!(message.contains("rank 1"), "{message}");
    // Rank 0 (sleeping 600 s) is stopped and its container removed (bounded wait).
    let mut left = usize::MAX;
    for _ in 0..300 {
        left = pool.containers_of(&id).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(left, 0, "rank 0's container was not stopped");
    // Both ranks' logs are kept (rank 0's is complete once its stopped end is recorded).
    let mut logs = String::new();
    for _ in 0..100 {
        logs = pool.logs(project.path(), &id).await;
        if logs.contains("rank 0 up") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(logs.contains("[rank 0] rank 0 up, sleeping"), "{logs}");
    assert!(
        logs.contains("[rank 1] rank 1 saw rank 0; failing"),
        "{logs}"
    );
    pool.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpirun_on_rank_0_starts_a_process_in_both_nodes_containers() {
    let Some(pool) = Pool::start(true).await else {
        return;
    };
    let image = muster_testkit::mpi_image::mpi_image(&pool.docker)
        .await
        .unwrap();
    let project = tempfile::tempdir().unwrap();
    // Two slots per node (process_count_per_instance: 2), four processes: each prints the
    // node rank of the container it runs in.
    write(
        project.path(),
        "job.yml",
        &job(
            Some("mpi"),
            "mpirun -np 4 sh -c 'echo \"mpi process on node rank $MUSTER_NODE_RANK\"'",
        ),
    );
    let id = pool.submit(project.path(), &image).await;
    let run = wait_done(&pool.dev.url(), &id).await;
    let logs = pool.logs(project.path(), &id).await;
    let rank1 = pool.rank_log(project.path(), &id, 1).await;
    assert_eq!(
        (run.state().word(), run.exit_code),
        ("completed", Some(0)),
        "{run:?}\n{logs}\n{rank1}"
    );
    assert_eq!(
        logs.matches("mpi process on node rank 0").count(),
        2,
        "{logs}"
    );
    assert_eq!(
        logs.matches("mpi process on node rank 1").count(),
        2,
        "{logs}"
    );
    assert!(
        logs.contains("[rank 1] muster: MPI worker (rank 1)"),
        "{logs}"
    );
    assert!(rank1.contains("MPI worker (rank 1)"), "{rank1}");
    pool.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorflow_ranks_get_one_tf_config_naming_each_task() {
    let Some(pool) = Pool::start(false).await else {
        return;
    };
    let image = busybox_image(&pool.docker).await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "job.yml",
        &job(Some("tensorflow"), "echo \"TF_CONFIG=$TF_CONFIG\""),
    );
    let id = pool.submit(project.path(), &image).await;
    let run = wait_done(&pool.dev.url(), &id).await;
    assert_eq!(run.state().word(), "completed", "{run:?}");
    let rank0 = pool.rank_log(project.path(), &id, 0).await;
    let rank1 = pool.rank_log(project.path(), &id, 1).await;
    let combined = pool.logs(project.path(), &id).await;
    assert!(combined.contains("[rank 1] TF_CONFIG="), "{combined}");
    let config = |log: &str| -> serde_json::Value {
        let line = log
            .lines()
            .find_map(|l| l.split_once("TF_CONFIG=").map(|(_, c)| c))
            .unwrap_or_else(|| panic!("no TF_CONFIG in {log:?}"));
        serde_json::from_str(line).unwrap()
    };
    let (c0, c1) = (config(&rank0), config(&rank1));
    let workers = serde_json::json!(["127.0.0.1:29500", "127.0.0.1:29500"]);
    assert_eq!(c0["cluster"]["worker"], workers);
    assert_eq!(c0["cluster"], c1["cluster"]);
    assert_eq!(
        c0["task"],
        serde_json::json!({"type": "worker", "index": 0})
    );
    assert_eq!(
        c1["task"],
        serde_json::json!({"type": "worker", "index": 1})
    );
    pool.cleanup().await;
}
