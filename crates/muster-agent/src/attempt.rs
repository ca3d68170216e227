//! One attempt on this node: prepare the working directory, choose the executor (a
//! container when the run names an image and the Docker engine is reachable, else a
//! process), run, upload outputs, and tell the session loop how it went (the session
//! loop ships logs and reports). A container found at start-up is re-adopted here too.

use std::path::PathBuf;
use std::sync::Arc;

use muster_core::AttemptEnd;
use muster_core::distributed::{FIRST_MASTER_PORT, Layout, Peer, rank_setup};
use muster_core::spec::Distribution;
use muster_proto::v1::{self, blob_service_client::BlobServiceClient};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;

use crate::executor::docker::{DockerExecutor, Managed, RSH_TARGET};
use crate::executor::{self, ContainerSpec, Launch, Outcome, Stop};
use crate::rsh_server::{self, Registry, Worker};
use crate::{inputs, outputs, snapshot};

/// (run id, attempt number).
pub(crate) type Key = (String, u32);

/// Azure ML's default shared memory for a container.
const DEFAULT_SHM: u64 = 2 << 30;

/// What an attempt tells the session loop.
#[derive(Debug)]
pub(crate) enum Event {
    /// Entered preparing or running.
    State(Key, v1::AttemptState),
    /// Over: how, and the outputs archive if one was uploaded.
    Ended(Key, Outcome, Option<String>),
}

/// How this node executes runs (shared by all its attempts).
#[derive(Debug, Clone)]
pub(crate) struct Executors {
    /// The Docker engine, when reachable.
    pub docker: Option<Arc<DockerExecutor>>,
    /// Why there is no engine.
    pub docker_error: Option<String>,
    /// Run an image's command as a process when there is no engine (`muster dev`).
    pub process_fallback: bool,
    /// Ask the engine for GPUs with a device request.
    pub gpu_device_requests: bool,
    /// The node offers no limits (the `local` target): GPUs are not hidden from runs.
    pub unlimited: bool,
    /// This node's id (a container label, for re-adoption).
    pub node_id: String,
    /// The rsh helper (`muster-rsh`) to mount into the containers of distributed runs.
    pub rsh_helper: Option<PathBuf>,
    /// The containers peers may exec into (this node's exec listener).
    pub registry: Registry,
    /// How long an MPI launcher waits for its workers to be up and reachable.
    pub peer_wait: std::time::Duration,
}

/// What rank 0 of a multi-node MPI run does around its launcher.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Gate {
    workers: Vec<Worker>,
    secret: String,
}

/// What a distributed rank keeps in its working directory (`exec.json`) so that a
/// restarted agent re-adopting its container still takes exec requests for it, releases
/// the workers (rank 0) or watches the launcher (a worker).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ExecState {
    secret: String,
    /// Rank 0 of a multi-node MPI run.
    gate: Option<Gate>,
    /// An MPI worker: rank 0's agent.
    launcher: Option<Worker>,
}

const EXEC_STATE: &str = "exec.json";

/// Everything an attempt needs.
pub(crate) struct AttemptTask {
    pub key: Key,
    pub workdir: PathBuf,
    pub log_path: PathBuf,
    pub cache_dir: PathBuf,
    pub blobs: BlobServiceClient<Channel>,
    /// Every server the agent knows: blob transfers fall back to them when the server
    /// `blobs` talks to is gone (a failover).
    pub servers: Vec<String>,
    pub events: mpsc::Sender<Event>,
    pub stop: watch::Receiver<Option<Stop>>,
    pub executors: Executors,
}

/// How the prepared attempt starts.
struct Prepared {
    launch: Launch,
    /// Rank 0 of a multi-node MPI run: wait for these workers first, release them after.
    gate: Option<Gate>,
    /// An MPI worker: the launcher to watch, and the way to end this rank when it is gone.
    watch: Option<LauncherWatch>,
}

/// An MPI worker's launcher (rank 0's agent), the attempt's secret, and the sender that
/// ends the worker when the launcher is gone.
type LauncherWatch = (Worker, String, Arc<watch::Sender<Option<Stop>>>);

impl AttemptTask {
    /// Runs a new assignment from the start.
    pub(crate) async fn run(mut self, assignment: v1::Assignment) {
        let _ = self
            .events
            .send(Event::State(self.key.clone(), v1::AttemptState::Preparing))
            .await;
        let outcome = match self.prepare(&assignment).await {
            Err(message) => Outcome {
                end: AttemptEnd::Failed,
                exit_code: None,
                message: Some(message),
            },
            Ok(prepared) => self.execute(prepared).await,
        };
        self.executors.registry.remove(&self.key);
        self.finish(outcome).await;
    }

    /// Follows a container this node started before the agent restarted.
    pub(crate) async fn adopt(mut self, docker: Arc<DockerExecutor>, managed: Managed) {
        let state = if managed.running {
            v1::AttemptState::Running
        } else {
            v1::AttemptState::Preparing
        };
        let _ = self
            .events
            .send(Event::State(self.key.clone(), state))
            .await;
        // A distributed rank: take exec requests again, and keep the launcher's promises.
        let exec: Option<ExecState> = tokio::fs::read(self.workdir.join(EXEC_STATE))
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut watcher = None;
        if let Some(state) = &exec {
            let stop = self.accept_exec(state.secret.clone(), managed.id.clone());
            if managed.running {
                self.executors.registry.set_running(&self.key);
            }
            watcher = state
                .launcher
                .clone()
                .map(|l| self.watch_launcher(l, &state.secret, stop));
        }
        let outcome = docker
            .adopt(&managed, &self.log_path, self.stop.clone())
            .await;
        if let Some(w) = watcher {
            w.abort();
        }
        if let Some(gate) = exec.and_then(|e| e.gate)
            && outcome.end == AttemptEnd::Completed
        {
            rsh_server::release(&gate.workers, &self.key.0, self.key.1, &gate.secret).await;
        }
        self.executors.registry.remove(&self.key);
        self.finish(outcome).await;
    }

    /// Takes exec requests for this attempt's `container` with `secret`; returns the sender
    /// through which a release (or the launcher's end) stops it.
    fn accept_exec(
        &mut self,
        secret: String,
        container: String,
    ) -> Arc<watch::Sender<Option<Stop>>> {
        let (tx, rx) = watch::channel(*self.stop.borrow());
        let tx = Arc::new(tx);
        let forward = tx.clone();
        let mut outer = self.stop.clone();
        tokio::spawn(async move {
            while outer.changed().await.is_ok() {
                let order = *outer.borrow();
                if order.is_some() {
                    forward.send_replace(order);
                }
            }
        });
        self.stop = rx;
        self.executors
            .registry
            .add(self.key.clone(), secret, container, tx.clone());
        tx
    }

    fn watch_launcher(
        &self,
        launcher: Worker,
        secret: &str,
        stop: Arc<watch::Sender<Option<Stop>>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(rsh_server::watch_launcher(
            launcher,
            self.key.0.clone(),
            self.key.1,
            secret.to_string(),
            self.executors.peer_wait + std::time::Duration::from_secs(30),
            stop,
        ))
    }

    async fn prepare(&mut self, a: &v1::Assignment) -> Result<Prepared, String> {
        let spec = a.spec.clone().unwrap_or_default();
        let code_dir = self.workdir.join("code");
        tokio::fs::create_dir_all(&code_dir).await.map_err(|e| {
            format!(
                "cannot create the working directory {}: {e}",
                code_dir.display()
            )
        })?;
        if let Some(code) = &spec.code {
            let mut fetched =
                snapshot::materialize(&mut self.blobs, &code.manifest, &self.cache_dir, &code_dir)
                    .await;
            if let Err(e) = &fetched {
                // The leader may have been lost mid-download: blobs are on a majority.
                tracing::warn!(cause = %format!("{e:#}"), "could not fetch the code snapshot; trying the other servers");
                for mut other in self.other_blob_clients().await {
                    fetched = snapshot::materialize(
                        &mut other,
                        &code.manifest,
                        &self.cache_dir,
                        &code_dir,
                    )
                    .await;
                    if fetched.is_ok() {
                        break;
                    }
                }
            }
            fetched.map_err(|e| format!("could not fetch the code snapshot: {e:#}"))?;
        }
        for d in ["outputs", "logs"] {
            tokio::fs::create_dir_all(code_dir.join(d))
                .await
                .map_err(|e| format!("cannot create {d}/: {e}"))?;
        }
        // A pipeline step: its declared outputs' folders, and its upstream outputs at inputs/.
        for o in &a.outputs {
            tokio::fs::create_dir_all(code_dir.join("outputs").join(o))
                .await
                .map_err(|e| format!("cannot create outputs/{o}/: {e}"))?;
        }
        let inputs = a.inputs.clone().into_iter().collect();
        let scratch = self.workdir.join(".inputs");
        let mut placed = inputs::place(
            &mut self.blobs,
            &inputs,
            &self.cache_dir,
            &scratch,
            &code_dir,
        )
        .await;
        if placed.is_err() {
            for mut other in self.other_blob_clients().await {
                placed =
                    inputs::place(&mut other, &inputs, &self.cache_dir, &scratch, &code_dir).await;
                if placed.is_ok() {
                    break;
                }
            }
        }
        placed?;
        let ex = &self.executors;
        let container = match (&spec.image, &ex.docker) {
            (Some(image), Some(_)) => Some(image.clone()),
            (Some(image), None) if ex.process_fallback => {
                tracing::info!(run_id = %a.run_id, image = %image, "no Docker engine: running the command as a process");
                None
            }
            (Some(image), None) => {
                return Err(format!(
                    "the run names image {image}, but this node has no Docker engine ({}); start dockerd on the node or submit without --image",
                    ex.docker_error.as_deref().unwrap_or("unreachable")
                ));
            }
            (None, _) => None,
        };
        let in_container = container.is_some();
        let workspace = if in_container {
            "/workspace".to_string()
        } else {
            code_dir.display().to_string()
        };
        let mut env: Vec<(String, String)> = vec![
            ("MUSTER_RUN_ID".into(), a.run_id.clone()),
            ("MUSTER_ATTEMPT".into(), a.attempt.to_string()),
            ("MUSTER_NODE_RANK".into(), a.rank.to_string()),
            (
                "MUSTER_NODE_COUNT".into(),
                a.placements.len().max(1).to_string(),
            ),
            ("MUSTER_EXPERIMENT".into(), spec.experiment.clone()),
            ("MUSTER_OUTPUTS_DIR".into(), format!("{workspace}/outputs")),
            ("AZUREML_RUN_ID".into(), a.run_id.clone()),
        ];
        env.push((
            "MUSTER_METRICS_FILE".into(),
            crate::metrics::env_value(&workspace),
        ));
        if a.attempt > 1 {
            env.push(("MUSTER_RESTARTED".into(), "1".into()));
        }
        // GPUs: exactly the assigned ones are visible (none when none were asked for),
        // except on the local target, which offers no limits.
        let gpus: Vec<String> = a
            .placements
            .get(a.rank as usize)
            .map(|p| p.gpus.clone())
            .unwrap_or_default();
        if !gpus.is_empty() || !ex.unlimited {
            let visible = gpus.join(",");
            env.push((
                "NVIDIA_VISIBLE_DEVICES".into(),
                if gpus.is_empty() {
                    "void".into()
                } else {
                    visible.clone()
                },
            ));
            if !in_container {
                env.push(("CUDA_VISIBLE_DEVICES".into(), visible));
            }
        }
        // Distributed runs: what every rank is told of the others (muster-core computes it).
        let distributed = a.placements.len() > 1;
        let distribution = muster_proto::spec_from_wire(spec.clone())
            .map_err(|e| format!("the run's spec: {e}"))?
            .distribution;
        let is_mpi = matches!(distribution, Some(Distribution::Mpi { .. }));
        let rsh_helper = ex
            .rsh_helper
            .clone()
            .filter(|_| distributed && in_container);
        if distributed && is_mpi && in_container && rsh_helper.is_none() {
            return Err(
                "this MPI run spans nodes, but this agent has no rsh helper (muster-rsh): install it next to the muster binary or pass --rsh-helper".into(),
            );
        }
        let peers: Vec<Peer> = a
            .placements
            .iter()
            .map(|p| Peer {
                name: p.node_name.clone(),
                address: p.address.clone(),
                exec_port: u16::try_from(p.exec_port).ok().filter(|p| *p > 0),
            })
            .collect();
        let hostfile_path = format!("{workspace}/.muster/hostfile");
        let setup = rank_setup(&Layout {
            distribution: distribution.as_ref(),
            peers: &peers,
            rank: a.rank,
            master_port: u16::try_from(a.master_port)
                .ok()
                .filter(|p| *p > 0)
                .unwrap_or(FIRST_MASTER_PORT),
            hostfile_path: &hostfile_path,
            rsh_path: rsh_helper.as_ref().map(|_| RSH_TARGET),
            secret: Some(a.secret.as_str()).filter(|s| !s.is_empty()),
        });
        env.extend(setup.env);
        if let Some(hostfile) = &setup.hostfile {
            let dir = code_dir.join(".muster");
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            tokio::fs::write(dir.join("hostfile"), hostfile)
                .await
                .map_err(|e| format!("cannot write the MPI hostfile: {e}"))?;
        }
        // Multi-node MPI in containers: rank 0 runs the launcher once every worker's
        // container is up; the workers idle until the launcher's daemons are exec'd into
        // them, and end when it is done.
        let mpi_ranks = distributed && is_mpi && rsh_helper.is_some();
        if mpi_ranks {
            if a.secret.is_empty() {
                return Err(
                    "this MPI run spans nodes, but the server sent no attempt secret for its ranks' agents: upgrade the servers".into(),
                );
            }
            if let Some(p) = peers.iter().find(|p| p.exec_port.is_none()) {
                return Err(format!(
                    "this MPI run spans nodes, but node {} advertises no exec port (its agent predates distributed runs): upgrade its agent",
                    p.name
                ));
            }
        }
        let mut command = spec.command.clone();
        let mut gate = None;
        let mut launcher = None;
        if mpi_ranks && a.rank > 0 {
            launcher = peers.first().map(|p| Worker {
                rank: 0,
                name: p.name.clone(),
                target: format!("{}:{}", p.address, p.exec_port.unwrap_or_default()),
            });
            command = format!("exec {RSH_TARGET} --idle");
            let note = format!(
                "muster: MPI worker (rank {}): waiting for the launcher on rank 0 to start processes here\n",
                a.rank
            );
            append_log(&self.log_path, &note).await?;
        } else if mpi_ranks {
            gate = Some(Gate {
                workers: peers
                    .iter()
                    .enumerate()
                    .skip(1)
                    .map(|(rank, p)| Worker {
                        rank: rank as u32,
                        name: p.name.clone(),
                        target: format!("{}:{}", p.address, p.exec_port.unwrap_or_default()),
                    })
                    .collect(),
                secret: a.secret.clone(),
            });
        }
        env.extend(spec.environment_variables.clone());
        let resources = spec.resources.unwrap_or_default();
        let timeout = spec.timeout_s.map(std::time::Duration::from_secs);
        let container = container.map(|image| {
            let mut labels = std::collections::BTreeMap::from([
                ("muster.run_id".to_string(), a.run_id.clone()),
                ("muster.attempt".to_string(), a.attempt.to_string()),
                ("muster.rank".to_string(), a.rank.to_string()),
                ("muster.node_id".to_string(), ex.node_id.clone()),
            ]);
            if let Some(t) = spec.timeout_s {
                labels.insert("muster.timeout_s".into(), t.to_string());
            }
            ContainerSpec {
                image,
                name: format!("muster-{}-{}-{}", a.run_id, a.attempt, a.rank),
                labels,
                cpu_millis: resources.cpu_millis,
                memory_bytes: resources.memory_bytes,
                shm_size: spec.shm_size.unwrap_or(DEFAULT_SHM),
                gpus,
                gpu_device_requests: ex.gpu_device_requests,
                host_network: distributed,
                read_only_mounts: rsh_helper
                    .iter()
                    .map(|h| (h.clone(), RSH_TARGET.to_string()))
                    .collect(),
            }
        });
        // Peers may exec into this rank's container (MPI) with the attempt's secret; a
        // release from rank 0 ends it as completed.
        let mut watch = None;
        if let Some(c) = &container
            && distributed
            && !a.secret.is_empty()
        {
            let state = ExecState {
                secret: a.secret.clone(),
                gate: gate.clone(),
                launcher: launcher.clone(),
            };
            let path = self.workdir.join(EXEC_STATE);
            write_private(&path, &serde_json::to_vec(&state).expect("serializes"))
                .await
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            let name = c.name.clone();
            let stop = self.accept_exec(a.secret.clone(), name);
            watch = launcher.map(|l| (l, a.secret.clone(), stop));
        }
        Ok(Prepared {
            launch: Launch {
                command,
                workdir: code_dir,
                env,
                log_path: self.log_path.clone(),
                timeout,
                container,
            },
            gate,
            watch,
        })
    }

    async fn execute(&mut self, prepared: Prepared) -> Outcome {
        let Prepared {
            launch,
            gate,
            watch,
        } = prepared;
        if let Some(gate) = &gate {
            let _ = append_log(
                &self.log_path,
                &format!(
                    "muster: MPI launcher: waiting for {} worker(s) to be up and reachable\n",
                    gate.workers.len()
                ),
            )
            .await;
            let ready = rsh_server::wait_ready(
                &gate.workers,
                &self.key.0,
                self.key.1,
                &gate.secret,
                self.executors.peer_wait,
            );
            tokio::select! {
                r = ready => if let Err(message) = r {
                    let _ = append_log(&self.log_path, &format!("muster: {message}\n")).await;
                    return Outcome { end: AttemptEnd::Failed, exit_code: None, message: Some(message) };
                },
                order = executor::process::wait_stop(&mut self.stop) => {
                    return executor::stopped(order.reason, None);
                }
            }
        }
        let (started_tx, started_rx) = oneshot::channel();
        let events = self.events.clone();
        let key = self.key.clone();
        let registry = self.executors.registry.clone();
        let watcher = watch.map(|(l, secret, stop)| self.watch_launcher(l, &secret, stop));
        let announce = tokio::spawn(async move {
            if started_rx.await.is_ok() {
                registry.set_running(&key);
                let _ = events
                    .send(Event::State(key, v1::AttemptState::Running))
                    .await;
            }
        });
        let executor = if launch.container.is_some() {
            "docker"
        } else {
            "process"
        };
        tracing::info!(run_id = %self.key.0, attempt = self.key.1, executor, "executing");
        let outcome = match (&launch.container, &self.executors.docker) {
            (Some(_), Some(docker)) => docker.run(launch, self.stop.clone(), started_tx).await,
            _ => executor::process::run(launch, self.stop.clone(), started_tx).await,
        };
        let _ = announce.await;
        if let Some(w) = watcher {
            w.abort();
        }
        if let Some(gate) = gate
            && outcome.end == AttemptEnd::Completed
        {
            rsh_server::release(&gate.workers, &self.key.0, self.key.1, &gate.secret).await;
        }
        outcome
    }

    /// Uploads `outputs/` and reports the end.
    async fn finish(mut self, mut outcome: Outcome) {
        let outputs_dir = self.workdir.join("code/outputs");
        let archive = self.workdir.join("outputs.tar");
        let mut uploaded = outputs::upload(&mut self.blobs, &outputs_dir, archive.clone()).await;
        if uploaded.is_err() {
            for mut other in self.other_blob_clients().await {
                uploaded = outputs::upload(&mut other, &outputs_dir, archive.clone()).await;
                if uploaded.is_ok() {
                    break;
                }
            }
        }
        let outputs = match uploaded {
            Ok(o) => o,
            Err(e) => {
                if outcome.end == AttemptEnd::Completed {
                    outcome.end = AttemptEnd::Failed;
                    outcome.message = Some(format!(
                        "the command succeeded but outputs/ could not be uploaded: {e:#}"
                    ));
                }
                None
            }
        };
        let _ = self
            .events
            .send(Event::Ended(self.key, outcome, outputs))
            .await;
    }
}

impl AttemptTask {
    /// Blob clients of every server that answers, to retry a transfer that failed against
    /// the one `blobs` talks to (it may be a leader that just died).
    async fn other_blob_clients(&self) -> Vec<BlobServiceClient<Channel>> {
        let mut out = Vec::new();
        for url in &self.servers {
            let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.clone()) else {
                continue;
            };
            if let Ok(channel) = endpoint
                .connect_timeout(std::time::Duration::from_secs(3))
                .connect()
                .await
            {
                out.push(BlobServiceClient::new(channel).max_decoding_message_size(8 << 20));
            }
        }
        out
    }
}

/// Appends a line of muster's own to the attempt's log.
async fn append_log(path: &std::path::Path, line: &str) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
    f.write_all(line.as_bytes())
        .await
        .map_err(|e| format!("cannot write the log file {}: {e}", path.display()))
}

/// Writes a file only the agent's user can read (the attempt's secret).
async fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await?;
    f.write_all(data).await?;
    f.flush().await
}
