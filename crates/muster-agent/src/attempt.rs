//! One attempt on this node, carrying out its [`AttemptPlan`]: prepare the working
//! directory (code snapshot, inputs, output folders, the checkpoint it resumes from, the
//! MPI hostfile and exec state), run the launch through the planned executor (waiting for
//! the MPI workers first on rank 0; uploading the checkpoint folder every
//! `checkpoint.interval` on rank 0), upload outputs and the checkpoint folder once the
//! process is gone (after a stop's SIGTERM and grace too), and tell the session loop how it
//! went (the session loop ships logs and reports). A container found at start-up is
//! re-adopted here too.
//!
//! What to do is decided in `plan.rs`; this file only does it, in order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use muster_core::AttemptEnd;
use muster_core::state::CheckpointCause;
use muster_proto::v1;
use tokio::sync::{Mutex, mpsc, oneshot, watch};

use crate::blobs::Blobs;
use crate::executor::{self, Executor, Managed, Outcome, Stop, StopOrders};
use crate::plan::{AttemptPlan, Gate, Node, PlanError};
use crate::rsh_server::{self, Registry, Worker};
use crate::{checkpoint, inputs, outputs, snapshot};

pub(crate) use crate::plan::Key;

/// What an attempt tells the session loop.
#[derive(Debug)]
pub(crate) enum Event {
    /// Entered preparing or running.
    State(Key, v1::AttemptState),
    /// Over: how, the outputs archive if one was uploaded, and rank 0's checkpoint if
    /// its folder held anything.
    Ended(Key, Outcome, Option<String>, Option<v1::Checkpoint>),
    /// Rank 0 uploaded a periodic checkpoint (`checkpoint.interval`).
    Checkpoint(Key, v1::Checkpoint),
}

/// The checkpoints an attempt took: how many, and the last one's archive (an unchanged
/// folder is not reported again). Held while one is packed, so two never overlap. The
/// count is kept in the attempt's directory ([`SEQ_FILE`]), so an agent that restarts and
/// re-adopts the attempt numbers its next checkpoint after the ones the server recorded.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    seq: Option<u64>,
    last: Option<String>,
}

/// The attempt's checkpoint count, in its working directory.
const SEQ_FILE: &str = "checkpoint.seq";

/// How this node executes runs (shared by all its attempts).
#[derive(Debug, Clone)]
pub(crate) struct Executors {
    /// Runs containers: the Docker engine when reachable (or a test's fake).
    pub container: Option<Arc<dyn Executor>>,
    /// Runs processes.
    pub process: Arc<dyn Executor>,
    /// What the planner knows of this node.
    pub node: Node,
    /// The containers peers may exec into (this node's exec listener).
    pub registry: Registry,
    /// How long an MPI launcher waits for its workers to be up and reachable.
    pub peer_wait: std::time::Duration,
    /// The user processes run as (`muster agent --run-as`), if not the agent's.
    pub run_as: Option<executor::confine::RunUser>,
}

/// Why preparing an attempt or uploading its outputs failed (the attempt fails with this
/// message).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    /// A directory of the attempt.
    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The code snapshot, from every server tried.
    #[error("could not fetch the code snapshot: {0:#}")]
    Snapshot(anyhow::Error),
    /// The pipeline inputs.
    #[error(transparent)]
    Inputs(#[from] inputs::InputError),
    /// The URL inputs.
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    /// A datastore input whose folder this node does not see.
    #[error(
        "input {input}: {path} is not on this node: mount the datastore's share here, or keep the run off this node (node_selector)"
    )]
    DatastoreMissing {
        /// The input.
        input: String,
        /// Its host path.
        path: String,
    },
    /// The checkpoint to resume from.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::RestoreError),
    /// A local input uploaded with the submit, from every server tried.
    #[error("could not fetch the uploaded input {input}: {cause:#}")]
    InputSnapshot {
        /// The input.
        input: String,
        /// Why.
        cause: anyhow::Error,
    },
    /// The outputs archive, to every server tried.
    #[error("{0:#}")]
    Upload(anyhow::Error),
    /// A file the attempt needs.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
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
    /// Blob transfers, falling back to the other servers (a failover).
    pub blobs: Blobs,
    pub events: mpsc::Sender<Event>,
    pub stop: StopOrders,
    pub executors: Executors,
    /// Rank 0: its checkpoint folder is uploaded (set from the plan, or from a re-adopted
    /// container's rank).
    pub upload_checkpoint: bool,
    /// The checkpoints taken so far.
    pub taken: Arc<Mutex<Taken>>,
    /// The command was handed to the executor (or re-adopted): only then can the folder
    /// hold anything the attempt wrote, rather than what was restored into it.
    pub launched: bool,
}

/// How the prepared attempt starts.
struct Prepared {
    launch: executor::Launch,
    /// Rank 0 of a multi-node MPI run: wait for these workers first, release them after.
    gate: Option<Gate>,
    /// An MPI worker: the launcher to watch, and the way to end this rank when it is gone.
    watch: Option<LauncherWatch>,
    /// Upload the checkpoint folder this often while the command runs.
    checkpoint_every: Option<std::time::Duration>,
    /// The run's secret files, removed when this is dropped (the attempt is over).
    secret_files: Option<crate::secrets::SecretFiles>,
}

/// An MPI worker's launcher (rank 0's agent), the attempt's secret, and the sender that
/// ends the worker when the launcher is gone.
type LauncherWatch = (Worker, String, Arc<watch::Sender<Option<Stop>>>);

fn failed(message: String) -> Outcome {
    Outcome {
        end: AttemptEnd::Failed,
        exit_code: None,
        message: Some(message),
    }
}

impl AttemptTask {
    /// Runs a new assignment from the start, as planned (a plan that failed fails the
    /// attempt with its reason).
    #[tracing::instrument(name = "attempt", skip_all, fields(run_id = %self.key.0, attempt = self.key.1))]
    pub(crate) async fn run(mut self, plan: Result<AttemptPlan, PlanError>) {
        let _ = self
            .events
            .send(Event::State(self.key.clone(), v1::AttemptState::Preparing))
            .await;
        if let Ok(plan) = &plan {
            self.upload_checkpoint = plan.upload_checkpoint;
        }
        let outcome = match plan {
            Err(e) => failed(e.to_string()),
            Ok(plan) => match self.prepare(plan).await {
                Err(e) => failed(e.to_string()),
                Ok(prepared) => self.execute(prepared).await,
            },
        };
        self.executors.registry.remove(&self.key);
        self.finish(outcome).await;
    }

    /// Follows a container this node started before the agent restarted.
    #[tracing::instrument(name = "adopt", skip_all, fields(run_id = %self.key.0, attempt = self.key.1))]
    pub(crate) async fn adopt(mut self, executor: Arc<dyn Executor>, managed: Managed) {
        self.upload_checkpoint = managed.rank == 0;
        self.launched = true;
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
        let outcome = executor
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

    /// Carries out the plan's preparation: the working directory, the code snapshot, the
    /// pipeline's folders and inputs, the MPI hostfile, and for a distributed rank in a
    /// container its exec state (peers may exec into it from now on).
    async fn prepare(&mut self, plan: AttemptPlan) -> Result<Prepared, AttemptError> {
        let code_dir = plan.launch.workdir.clone();
        create_dir(&code_dir).await?;
        if let Some(manifest) = &plan.snapshot {
            let cache = &self.cache_dir;
            let dest = &code_dir;
            self.blobs
                .with_failover("fetching the code snapshot", |mut c| async move {
                    snapshot::materialize(&mut c, manifest, cache, dest, snapshot::Place::Copy)
                        .await
                        .map_err(AttemptError::Snapshot)
                })
                .await?;
        }
        for d in ["outputs", "logs"] {
            create_dir(&code_dir.join(d)).await?;
        }
        // The checkpoint folder holds only what the run wrote: a `checkpoint/` of the code
        // snapshot is not one. Then the run's checkpoint, where the command finds it
        // (MUSTER_RESUMED=1).
        let checkpoint_dir = code_dir.join(crate::plan::CHECKPOINT_DIR);
        let _ = tokio::fs::remove_dir_all(&checkpoint_dir).await;
        create_dir(&checkpoint_dir).await?;
        if let Some(sha) = &plan.resume {
            let (cache, dir) = (&self.cache_dir, &checkpoint_dir);
            self.blobs
                .with_failover("fetching the checkpoint", |mut c| async move {
                    checkpoint::restore(&mut c, sha, cache, dir)
                        .await
                        .map_err(AttemptError::Checkpoint)
                })
                .await?;
            tracing::info!(run_id = %self.key.0, attempt = self.key.1, checkpoint = %sha, "restored the run's checkpoint");
        }
        // A pipeline step: its declared outputs' folders, and its upstream outputs at inputs/.
        for o in &plan.output_folders {
            create_dir(&code_dir.join("outputs").join(o)).await?;
        }
        if !plan.inputs.is_empty() {
            let scratch = plan.workdir.join(".inputs");
            let (inputs, cache, scratch, dest) =
                (&plan.inputs, &self.cache_dir, &scratch, &code_dir);
            self.blobs
                .with_failover("placing the inputs", |mut c| async move {
                    inputs::place(&mut c, inputs, cache, scratch, dest).await
                })
                .await?;
        }
        // Local inputs uploaded with the submit: snapshots, like the code. A container
        // sees the workspace read-only, so a read-only input there is linked from the
        // cache, not copied.
        let in_container = plan.launch.container.is_some();
        for (name, manifest) in &plan.snapshot_inputs {
            let cache = &self.cache_dir;
            let dest = code_dir.join("inputs").join(name);
            let dest = &dest;
            let place = if in_container && !plan.download_inputs.contains(name) {
                snapshot::Place::Link
            } else {
                snapshot::Place::Copy
            };
            self.blobs
                .with_failover("fetching an uploaded input", |mut c| async move {
                    snapshot::materialize(&mut c, manifest, cache, dest, place)
                        .await
                        .map_err(|cause| AttemptError::InputSnapshot {
                            input: name.clone(),
                            cause,
                        })
                })
                .await?;
        }
        // Datastore inputs: a link for a process; a mount point for a container's mount.
        for (name, host) in &plan.host_inputs {
            if tokio::fs::metadata(host).await.is_err() {
                return Err(AttemptError::DatastoreMissing {
                    input: name.clone(),
                    path: host.clone(),
                });
            }
            let at = code_dir.join("inputs").join(name);
            create_dir(&code_dir.join("inputs")).await?;
            let placed = if plan.launch.container.is_some() {
                tokio::fs::create_dir_all(&at).await
            } else {
                tokio::fs::symlink(host, &at).await
            };
            placed.map_err(|source| AttemptError::Write { path: at, source })?;
        }
        // URL inputs, through the node's cache.
        crate::fetch::place(
            &plan.url_inputs,
            &self.cache_dir.with_file_name("urls"),
            &code_dir,
        )
        .await?;
        // A process cannot be given a read-only mount: its read-only inputs' files are
        // made read-only instead (a `download` input stays a writable copy).
        if in_container {
            // A writable mount's source must exist, even for an empty input.
            for name in &plan.download_inputs {
                create_dir(&code_dir.join("inputs").join(name)).await?;
            }
        } else {
            for name in plan.read_only_inputs() {
                let at = code_dir.join("inputs").join(name);
                make_read_only(at.clone())
                    .await
                    .map_err(|source| AttemptError::Write { path: at, source })?;
            }
        }
        if let Some(image) = &plan.image_as_process {
            tracing::info!(run_id = %self.key.0, image = %image, "no Docker engine: running the command as a process");
        }
        if let Some(hostfile) = &plan.hostfile {
            let dir = code_dir.join(".muster");
            create_dir(&dir).await?;
            let path = dir.join("hostfile");
            tokio::fs::write(&path, hostfile)
                .await
                .map_err(|source| AttemptError::Write { path, source })?;
        }
        if plan.launcher.is_some() {
            let note = format!(
                "muster: MPI worker (rank {}): waiting for the launcher on rank 0 to start processes here\n",
                plan.rank
            );
            append_log(&self.log_path, &note).await?;
        }
        // Peers may exec into this rank's container (MPI) with the attempt's secret; a
        // release from rank 0 ends it as completed.
        let mut watch = None;
        if let (Some(secret), Some(c)) = (&plan.exec_secret, &plan.launch.container) {
            let state = ExecState {
                secret: secret.clone(),
                gate: plan.gate.clone(),
                launcher: plan.launcher.clone(),
            };
            let path = plan.workdir.join(EXEC_STATE);
            let bytes = serde_json::to_vec(&state).unwrap_or_default();
            write_private(&path, &bytes)
                .await
                .map_err(|source| AttemptError::Write { path, source })?;
            let stop = self.accept_exec(secret.clone(), c.name.clone());
            watch = plan.launcher.clone().map(|l| (l, secret.clone(), stop));
        }
        let mut launch = plan.launch;
        let secret_files = if plan.secrets.is_empty() {
            None
        } else {
            let tag = format!("{}-{}-{}", self.key.0, self.key.1, plan.rank);
            let files =
                plan.secrets
                    .write(&tag, &plan.workdir)
                    .map_err(|source| AttemptError::Write {
                        path: plan.workdir.join("secrets"),
                        source,
                    })?;
            // Readable by the run's user alone: a container's (non-root unless allowed),
            // or `--run-as`'s user (with the attempt's group, as its process runs).
            if executor::confine::agent_is_root() {
                let dir = files.dir().to_path_buf();
                let user = match &launch.container {
                    Some(c) => executor::confine::container_user(c.allow_root),
                    None => self.executors.run_as.map(|u| executor::confine::RunUser {
                        uid: u.uid,
                        gid: executor::confine::attempt_gid(&launch.workdir),
                    }),
                };
                let given = user.map_or(Ok(()), |user| executor::confine::give_to(&dir, user));
                given.map_err(|source| AttemptError::Write {
                    path: dir.clone(),
                    source,
                })?;
            }
            let seen = match &mut launch.container {
                Some(c) => {
                    c.read_only_mounts.push((
                        files.dir().to_path_buf(),
                        crate::secrets::CONTAINER_DIR.to_string(),
                    ));
                    crate::secrets::CONTAINER_DIR.to_string()
                }
                None => files.dir().display().to_string(),
            };
            launch.env.push(("MUSTER_SECRETS_DIR".into(), seen));
            Some(files)
        };
        Ok(Prepared {
            launch,
            gate: plan.gate,
            watch,
            checkpoint_every: plan.checkpoint_every,
            secret_files,
        })
    }

    async fn execute(&mut self, prepared: Prepared) -> Outcome {
        let Prepared {
            launch,
            gate,
            watch,
            checkpoint_every,
            secret_files,
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
                r = ready => if let Err(e) = r {
                    let message = e.to_string();
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
        let executor = match (&launch.container, &self.executors.container) {
            (Some(_), Some(container)) => container.clone(),
            _ => self.executors.process.clone(),
        };
        tracing::info!(run_id = %self.key.0, attempt = self.key.1, executor = executor.kind(), "executing");
        self.launched = true;
        let periodic = checkpoint_every.map(|every| tokio::spawn(self.periodic(every)));
        let outcome = executor.run(launch, self.stop.clone(), started_tx).await;
        // The command is over: its secrets go.
        drop(secret_files);
        if let Some(p) = periodic {
            p.abort();
        }
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

    /// Uploads the checkpoint folder every `every` while the command runs (the first after
    /// one interval), reporting each that changed; a failed upload is logged and retried at
    /// the next tick.
    fn periodic(&self, every: std::time::Duration) -> impl Future<Output = ()> + use<> {
        let (key, events, blobs, taken) = (
            self.key.clone(),
            self.events.clone(),
            self.blobs.clone(),
            self.taken.clone(),
        );
        let workdir = self.workdir.clone();
        async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match take(&blobs, &workdir, &taken, CheckpointCause::Periodic).await {
                    Ok(Some(c)) => {
                        let _ = events.send(Event::Checkpoint(key.clone(), c)).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(run_id = %key.0, attempt = key.1, cause = %e, "periodic checkpoint not uploaded");
                    }
                }
            }
        }
    }

    /// Uploads `outputs/` and (rank 0) the checkpoint folder, and reports the end.
    async fn finish(self, mut outcome: Outcome) {
        let outputs_dir = self.workdir.join("code/outputs");
        let archive = self.workdir.join("outputs.tar");
        let (dir, archive) = (&outputs_dir, &archive);
        let uploaded = self
            .blobs
            .with_failover("uploading outputs/", |mut c| async move {
                outputs::upload(&mut c, dir, archive.clone())
                    .await
                    .map_err(AttemptError::Upload)
            })
            .await;
        let outputs = match uploaded {
            Ok(o) => o,
            Err(e) => {
                if outcome.end == AttemptEnd::Completed {
                    outcome.end = AttemptEnd::Failed;
                    outcome.message = Some(format!(
                        "the command succeeded but outputs/ could not be uploaded: {e}"
                    ));
                }
                None
            }
        };
        // The process is gone (after a stop: SIGTERM, then its exit or the grace's end):
        // what it left in its checkpoint folder is the run's checkpoint.
        let mut checkpoint = None;
        if self.upload_checkpoint && self.launched {
            let cause = if outcome.end == AttemptEnd::Preempted {
                CheckpointCause::Preempted
            } else {
                CheckpointCause::Ended
            };
            match take(&self.blobs, &self.workdir, &self.taken, cause).await {
                Ok(c) => checkpoint = c,
                Err(e) => {
                    tracing::warn!(run_id = %self.key.0, attempt = self.key.1, cause = %e, "checkpoint not uploaded");
                    let _ = append_log(
                        &self.log_path,
                        &format!("muster: the checkpoint folder could not be uploaded: {e}\n"),
                    )
                    .await;
                }
            }
        }
        let _ = self
            .events
            .send(Event::Ended(self.key, outcome, outputs, checkpoint))
            .await;
    }
}

/// Packs and uploads the attempt's checkpoint folder as checkpoint number `taken.seq + 1`;
/// `None` when it is empty or, for a periodic one, unchanged since the last. An end's
/// checkpoint is reported even unchanged, so it supersedes every periodic one.
async fn take(
    blobs: &Blobs,
    workdir: &Path,
    taken: &Mutex<Taken>,
    cause: CheckpointCause,
) -> Result<Option<v1::Checkpoint>, AttemptError> {
    let mut taken = taken.lock().await;
    let dir = workdir.join("code").join(crate::plan::CHECKPOINT_DIR);
    let archive = workdir.join("checkpoint.tar");
    let (dir, archive) = (&dir, &archive);
    let packed = blobs
        .with_failover("uploading the checkpoint folder", |mut c| async move {
            checkpoint::upload(&mut c, dir, archive)
                .await
                .map_err(AttemptError::Upload)
        })
        .await?;
    let Some(packed) = packed else {
        return Ok(None);
    };
    if cause == CheckpointCause::Periodic && taken.last.as_deref() == Some(&packed.sha256) {
        return Ok(None);
    }
    let seq_file = workdir.join(SEQ_FILE);
    let before = match taken.seq {
        Some(n) => n,
        None => tokio::fs::read_to_string(&seq_file)
            .await
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0),
    };
    let seq = before + 1;
    tokio::fs::write(&seq_file, seq.to_string())
        .await
        .map_err(|source| AttemptError::Write {
            path: seq_file,
            source,
        })?;
    taken.seq = Some(seq);
    taken.last = Some(packed.sha256.clone());
    Ok(Some(packed.to_wire(seq, cause)))
}

/// Appends a line of muster's own to the attempt's log.
async fn append_log(path: &Path, line: &str) -> Result<(), AttemptError> {
    use tokio::io::AsyncWriteExt;
    let write = async {
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        f.write_all(line.as_bytes()).await
    };
    write.await.map_err(|source| AttemptError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Takes write permission off every file under `root` (not through links; folders keep
/// theirs, so the attempt's directory can still be removed). A process that is not root
/// then cannot change a read-only input.
async fn make_read_only(root: PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::PermissionsExt;
        let mut pending = vec![root];
        while let Some(path) = pending.pop() {
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                for entry in std::fs::read_dir(&path)? {
                    pending.push(entry?.path());
                }
            } else if meta.is_file() {
                let mode = meta.permissions().mode() & !0o222;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

async fn create_dir(path: &Path) -> Result<(), AttemptError> {
    tokio::fs::create_dir_all(path)
        .await
        .map_err(|source| AttemptError::CreateDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes a file only the agent's user can read (the attempt's secret).
async fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
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
