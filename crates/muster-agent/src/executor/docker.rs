//! The Docker executor: one container per attempt through the Docker engine (bollard).
//!
//! The container runs `sh -c COMMAND` with the code snapshot mounted read-only at
//! `/workspace` and its `outputs/` and `logs/` mounted writable over it. Its stdout and
//! stderr are followed into the attempt's log file. A stop order becomes `docker stop`
//! (SIGTERM, then SIGKILL after the grace); the container runs under the engine's init with
//! `TINI_KILL_PROCESS_GROUP=1`, so the SIGTERM reaches the command's whole process group, as
//! the process executor does. Containers carry labels (`muster.node_id`, `muster.run_id`, …)
//! so a restarted agent finds them again ([`DockerExecutor::managed`]) and re-adopts them
//! ([`DockerExecutor::adopt`]) without losing or duplicating log lines.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerSummaryStateEnum, DeviceRequest, HostConfig, Mount, MountType,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use muster_core::AttemptEnd;
use muster_core::compute::DEFAULT_MAX_PROCESSES;
use muster_core::resources::format_bytes;
use muster_core::secrets::Redactor;
use muster_docker::{EngineError, message as engine_message, status_of};
use tokio::fs::File;
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, watch};

pub use super::Managed;
use super::confine;
use super::process::wait_stop;
use super::{ContainerSpec, Launch, Outcome, Stop, StopReason, stopped};

/// The longest an image pull may take before the attempt fails.
const PULL_LIMIT: Duration = Duration::from_secs(10 * 60);
/// The grace between SIGTERM and SIGKILL when `limits.timeout` ends an attempt.
const TIMEOUT_GRACE: Duration = Duration::from_secs(10);
/// How long the log stream may take to drain once the container has exited.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// The request timeout of the client used for long requests (wait, follow logs, stop):
/// bollard applies its timeout to every request, and these legitimately last for hours.
const LONG_REQUEST_LIMIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Where the agent's working directory appears inside the container.
const WORKSPACE: &str = "/workspace";
/// Where the rsh helper of distributed runs is mounted (read-only) in their containers.
pub const RSH_TARGET: &str = "/opt/muster/bin/muster-rsh";

/// Label: the node that started the container.
const LABEL_NODE: &str = "muster.node_id";
/// Label: the run.
const LABEL_RUN: &str = "muster.run_id";
/// Label: the attempt number.
const LABEL_ATTEMPT: &str = "muster.attempt";
/// Label: the node rank.
const LABEL_RANK: &str = "muster.rank";
/// Label: `limits.timeout` in seconds, when the run has one.
const LABEL_TIMEOUT: &str = "muster.timeout_s";
/// Label (added by this executor): the length of the log file when the container was
/// created, i.e. where the container's own output starts in it (image-pull progress comes
/// before). [`DockerExecutor::adopt`] uses it to skip what the file already holds.
const LABEL_LOG_OFFSET: &str = "muster.log_offset";

/// Runs attempts as containers of one Docker engine.
#[derive(Debug, Clone)]
pub struct DockerExecutor {
    /// For short requests (bollard's default two-minute timeout).
    docker: Docker,
    /// The same connection without a practical timeout, for wait, follow and stop.
    long: Docker,
}

/// What went wrong talking to the Docker engine. Each reads as a sentence's end for a
/// person ("could not create the container x: <this>").
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// No engine answers.
    #[error(transparent)]
    NoEngine(#[from] muster_docker::NoEngine),
    /// The engine refused a request; what it said.
    #[error("{0}")]
    Engine(String),
    /// Listing a node's containers failed.
    #[error("could not list the containers of node {node}: {cause}")]
    List {
        /// The node id.
        node: String,
        /// What the engine said.
        cause: String,
    },
    /// A registry that cannot be reached (a pull status line saying so).
    #[error("{0}")]
    Unreachable(String),
    /// The pull took longer than [`PULL_LIMIT`].
    #[error("the pull took longer than {minutes} min")]
    PullTimeout {
        /// The limit.
        minutes: u64,
    },
    /// The pull ended without the image.
    #[error("the pull ended but the engine does not have the image")]
    PullIncomplete,
    /// The attempt's log file.
    #[error("cannot open the log file {}: {source}", path.display())]
    Log {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl From<&EngineError> for DockerError {
    fn from(e: &EngineError) -> DockerError {
        DockerError::Engine(engine_message(e))
    }
}

impl super::Executor for DockerExecutor {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn run(
        &self,
        launch: Launch,
        stop: super::StopOrders,
        started: oneshot::Sender<()>,
    ) -> futures::future::BoxFuture<'_, Outcome> {
        Box::pin(DockerExecutor::run(self, launch, stop, started))
    }

    fn managed<'a>(
        &'a self,
        node_id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Vec<Managed>, super::ExecutorError>> {
        Box::pin(async move { Ok(DockerExecutor::managed(self, node_id).await?) })
    }

    fn adopt<'a>(
        &'a self,
        managed: &'a Managed,
        log_path: &'a Path,
        stop: super::StopOrders,
    ) -> futures::future::BoxFuture<'a, Outcome> {
        Box::pin(DockerExecutor::adopt(self, managed, log_path, stop))
    }
}

/// How the wait for a container ended.
enum Ended {
    /// It exited by itself; the exit code reported by the wait, if any.
    Exited(Result<Option<i64>, DockerError>),
    /// A stop order stopped it.
    Stopped(StopReason),
    /// `limits.timeout` stopped it.
    TimedOut,
}

impl DockerExecutor {
    /// Connects to the engine (`DOCKER_HOST` honoured, else the local socket), negotiates
    /// the API version down to the engine's, and pings it.
    ///
    /// The error is a sentence for a person, e.g. "no Docker engine at
    /// unix:///var/run/docker.sock: <cause>; start dockerd or set DOCKER_HOST".
    pub async fn connect() -> Result<DockerExecutor, DockerError> {
        let docker = muster_docker::connect().await?;
        let long = docker.clone().with_timeout(LONG_REQUEST_LIMIT);
        Ok(DockerExecutor { docker, long })
    }

    /// Runs one attempt in a container until it exits, is stopped, or times out; `started`
    /// fires once the container runs. The container is removed before this returns.
    ///
    /// Steps: use the image if present, else pull it (progress goes to the log file); create
    /// the container (`sh -c COMMAND` in `/workspace`, limits, labels, GPUs) after removing
    /// any leftover of the same name; start it and follow its output into the log file;
    /// wait for it, racing the stop order and `limits.timeout`; inspect it for the outcome
    /// (OOM kill, exit code); drain the log stream; remove it.
    pub async fn run(
        &self,
        launch: Launch,
        mut stop: watch::Receiver<Option<Stop>>,
        started: oneshot::Sender<()>,
    ) -> Outcome {
        let Some(spec) = launch.container.as_ref() else {
            return failed(
                None,
                "the Docker executor was given no container spec (image, name, labels)".into(),
            );
        };
        let mut log = match open_log(&launch.log_path).await {
            Ok(f) => f,
            Err(e) => return failed(None, e.to_string()),
        };

        // 1. The image: local, else pulled (a stop order interrupts the pull).
        let image = tokio::select! {
            r = self.ensure_image(&spec.image, &mut log) => r,
            order = wait_stop(&mut stop) => return stopped(order.reason, None),
        };
        if let Err(reason) = image {
            let message = format!(
                "image {} not found locally and could not be pulled: {reason}",
                spec.image
            );
            let _ = log
                .write_all(format!("muster: {message}\n").as_bytes())
                .await;
            let _ = log.flush().await;
            return failed(None, message);
        }

        // 2. The container.
        let workdir = match std::path::absolute(&launch.workdir) {
            Ok(p) => p,
            Err(e) => {
                return failed(
                    None,
                    format!("bad working directory {}: {e}", launch.workdir.display()),
                );
            }
        };
        for sub in ["outputs", "logs", crate::plan::CHECKPOINT_DIR] {
            if let Err(e) = tokio::fs::create_dir_all(workdir.join(sub)).await {
                return failed(
                    None,
                    format!("cannot create {}: {e}", workdir.join(sub).display()),
                );
            }
        }
        // What the run may touch: no host path outside its own, a non-root user owning
        // what it writes.
        if let Some(why) = spec
            .read_only_mounts
            .iter()
            .chain(&spec.writable_mounts)
            .find_map(|(source, _)| confine::forbidden_mount(source))
        {
            return failed(None, format!("refused to start the container: {why}"));
        }
        let user = confine::container_user(spec.allow_root);
        if let Some(user) = user.filter(|_| confine::agent_is_root()) {
            let writable: Vec<std::path::PathBuf> =
                ["outputs", "logs", crate::plan::CHECKPOINT_DIR]
                    .iter()
                    .map(|sub| workdir.join(sub))
                    .chain(
                        spec.writable_mounts
                            .iter()
                            .map(|(source, _)| source.clone()),
                    )
                    .collect();
            let root = workdir.clone();
            let given = tokio::task::spawn_blocking(move || {
                share_workspace(&root, user)?;
                writable
                    .iter()
                    .try_for_each(|dir| confine::give_to(dir, user))
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
            if let Err(e) = given {
                return failed(
                    None,
                    format!(
                        "cannot give the run's writable folders in {} to uid {}: {e}",
                        workdir.display(),
                        user.uid
                    ),
                );
            }
        }
        let log_offset = match log.metadata().await {
            Ok(m) => m.len(),
            Err(e) => {
                return failed(
                    None,
                    format!(
                        "cannot read the log file {}: {e}",
                        launch.log_path.display()
                    ),
                );
            }
        };
        if let Err(e) = self.remove(&spec.name).await {
            return failed(
                None,
                format!("could not remove the leftover container {}: {e}", spec.name),
            );
        }
        let body = container_body(&launch, spec, &workdir, log_offset, user);
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let id = match self.docker.create_container(Some(options), body).await {
            Ok(r) => r.id,
            Err(e) => {
                return failed(
                    None,
                    format!(
                        "could not create the container {}: {}",
                        spec.name,
                        engine_message(&e)
                    ),
                );
            }
        };

        // 3. Start it.
        if let Err(e) = self.docker.start_container(&id, None).await {
            let _ = self.remove(&id).await;
            return failed(
                None,
                format!(
                    "could not start the container {}: {}",
                    spec.name,
                    engine_message(&e)
                ),
            );
        }
        let _ = started.send(());

        // 4.–6. Follow, wait, inspect, remove.
        let timeout = launch.timeout.map(|t| (t, t.as_secs()));
        let redact = launch.redact.clone();
        self.supervise(&id, log, 0, redact, timeout, &mut stop)
            .await
    }

    /// The containers of this node (label `muster.node_id == node_id`), running or exited,
    /// not yet removed.
    pub async fn managed(&self, node_id: &str) -> Result<Vec<Managed>, DockerError> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_NODE}={node_id}")])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| DockerError::List {
                node: node_id.to_string(),
                cause: engine_message(&e),
            })?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let id = c.id?;
                let labels = c.labels.unwrap_or_default();
                let number = |key: &str| {
                    labels
                        .get(key)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_default()
                };
                Some(Managed {
                    run_id: labels.get(LABEL_RUN).cloned().unwrap_or_default(),
                    attempt: number(LABEL_ATTEMPT),
                    rank: number(LABEL_RANK),
                    running: matches!(
                        c.state,
                        Some(
                            ContainerSummaryStateEnum::RUNNING
                                | ContainerSummaryStateEnum::PAUSED
                                | ContainerSummaryStateEnum::RESTARTING
                        )
                    ),
                    id,
                })
            })
            .collect())
    }

    /// Re-adopts a container after an agent restart: keeps appending its output to
    /// `log_path` without repeating what the file already holds, waits for it with what is
    /// left of its timeout (label `muster.timeout_s`, counted from its start) and the stop
    /// order, then decides the outcome and removes it as [`run`](Self::run) does. Works for
    /// a container that exited while the agent was down.
    ///
    /// The engine replays a container's output as the same byte sequence, so the first
    /// `file length − muster.log_offset` bytes of it are already in the file and skipped.
    pub async fn adopt(
        &self,
        managed: &Managed,
        log_path: &Path,
        mut stop: watch::Receiver<Option<Stop>>,
    ) -> Outcome {
        let id = managed.id.as_str();
        let info = match self.docker.inspect_container(id, None).await {
            Ok(i) => i,
            Err(e) => {
                return failed(
                    None,
                    format!("could not re-adopt container {id}: {}", engine_message(&e)),
                );
            }
        };
        let state = info.state.clone().unwrap_or_default();
        if state.status == Some(ContainerStateStatusEnum::CREATED) {
            let _ = self.remove(id).await;
            return failed(
                None,
                "the container was created but never started (the agent stopped in between)".into(),
            );
        }
        let log = match open_log(log_path).await {
            Ok(f) => f,
            Err(e) => {
                let _ = self.remove(id).await;
                return failed(None, e.to_string());
            }
        };
        let file_len = match log.metadata().await {
            Ok(m) => m.len(),
            Err(e) => {
                let _ = self.remove(id).await;
                return failed(
                    None,
                    format!("cannot read the log file {}: {e}", log_path.display()),
                );
            }
        };
        let labels = info
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let offset = labels
            .get(LABEL_LOG_OFFSET)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let skip = file_len.saturating_sub(offset);
        let timeout = labels
            .get(LABEL_TIMEOUT)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|secs| {
                let left = remaining(secs, state.started_at.as_deref(), SystemTime::now());
                (left, secs)
            });
        // (A re-adopted attempt's secrets went with the agent that started it.)
        self.supervise(id, log, skip, Redactor::default(), timeout, &mut stop)
            .await
    }

    /// The engine client without a practical request timeout (for `docker exec` streams
    /// that last as long as an MPI job).
    pub(crate) fn engine(&self) -> &Docker {
        &self.long
    }

    /// Removes a container by id or name (forcibly: a running one is killed); a container
    /// that does not exist is not an error.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.long.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err((&e).into()),
        }
    }

    /// Whether the engine has `image` locally.
    pub async fn has_image(&self, image: &str) -> bool {
        self.docker.inspect_image(image).await.is_ok()
    }

    /// Uses the image if present, else pulls it (bounded by [`PULL_LIMIT`]), writing progress
    /// lines to the log. The error is the reason in words.
    async fn ensure_image(&self, image: &str, log: &mut File) -> Result<(), DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err((&e).into()),
        }
        let _ = log
            .write_all(format!("muster: pulling image {image}: not found locally\n").as_bytes())
            .await;
        let (name, tag) = split_reference(image);
        let options = CreateImageOptionsBuilder::default()
            .from_image(name)
            .tag(tag)
            .build();
        let mut progress = self.long.create_image(Some(options), None, None);
        let mut last: HashMap<String, String> = HashMap::new();
        let pull = async {
            while let Some(item) = progress.next().await {
                let info = item.map_err(|e| DockerError::from(&e))?;
                let Some(status) = info.status else { continue };
                // The engine retries layer downloads on network errors; a registry that
                // cannot be reached at all will not become reachable by retrying.
                let lower = status.to_lowercase();
                if lower.contains("no such host") || lower.contains("connection refused") {
                    return Err(DockerError::Unreachable(status));
                }
                let layer = info.id.unwrap_or_default();
                // One line per change of a layer's status, not per byte of progress.
                if last.get(&layer) == Some(&status) {
                    continue;
                }
                let line = if layer.is_empty() {
                    format!("muster: pulling image {image}: {status}\n")
                } else {
                    format!("muster: pulling image {image}: {layer}: {status}\n")
                };
                last.insert(layer, status);
                let _ = log.write_all(line.as_bytes()).await;
            }
            Ok::<_, DockerError>(())
        };
        let result = match tokio::time::timeout(PULL_LIMIT, pull).await {
            Ok(r) => r,
            Err(_) => Err(DockerError::PullTimeout {
                minutes: PULL_LIMIT.as_secs() / 60,
            }),
        };
        let _ = log.flush().await;
        result?;
        if self.has_image(image).await {
            Ok(())
        } else {
            Err(DockerError::PullIncomplete)
        }
    }

    /// Steps 3 to 6 for a started container: follows its output into `log` (skipping the
    /// first `skip` bytes), waits for it racing `stop` and `timeout` (what is left of it,
    /// and the configured seconds for the message), decides the outcome, removes it.
    async fn supervise(
        &self,
        id: &str,
        log: File,
        skip: u64,
        redact: Redactor,
        timeout: Option<(Duration, u64)>,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) -> Outcome {
        // Everything runs in this future (nothing spawned): if the caller drops it (an agent
        // going away), the log stream stops with it, and a later adopt() carries on.
        let mut pump = std::pin::pin!(follow_logs(
            self.long.clone(),
            id.to_string(),
            log,
            skip,
            redact
        ));
        let mut pump_done = false;
        let ended = {
            let mut watcher = std::pin::pin!(self.watch(id, timeout.map(|t| t.0), stop));
            loop {
                tokio::select! {
                    ended = &mut watcher => break ended,
                    () = &mut pump, if !pump_done => pump_done = true,
                }
            }
        };
        let info = self.docker.inspect_container(id, None).await;
        // The engine ends the log stream once the container has stopped; bounded anyway.
        if !pump_done && tokio::time::timeout(DRAIN_LIMIT, &mut pump).await.is_err() {
            tracing::warn!(
                container = id,
                "the log stream did not end after the container stopped"
            );
        }
        if let Err(e) = self.remove(id).await {
            tracing::warn!(container = id, "could not remove the container: {e}");
        }
        outcome(ended, info, timeout.map(|t| t.1))
    }

    /// Waits until the container stops by itself, or stops it on a stop order or at the
    /// timeout. An exit wins over the other two when they are ready at once.
    async fn watch(
        &self,
        id: &str,
        timeout: Option<Duration>,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) -> Ended {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut wait = self.long.wait_container(id, Some(options));
        let exited = async {
            match wait.next().await {
                Some(Ok(r)) => Ok(Some(r.status_code)),
                Some(Err(EngineError::DockerContainerWaitError { code, .. })) => Ok(Some(code)),
                Some(Err(e)) => Err(DockerError::from(&e)),
                None => Ok(None),
            }
        };
        let limit = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            r = exited => Ended::Exited(r),
            order = wait_stop(stop) => {
                self.stop_container(id, order.grace).await;
                Ended::Stopped(order.reason)
            }
            () = limit => {
                self.stop_container(id, TIMEOUT_GRACE).await;
                Ended::TimedOut
            }
        }
    }

    /// `docker stop -t GRACE`: SIGTERM, then SIGKILL after the grace (rounded up to whole
    /// seconds, the engine's unit). Falls back to SIGKILL if the engine refuses.
    async fn stop_container(&self, id: &str, grace: Duration) {
        let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let options = StopContainerOptionsBuilder::default()
            .t(i32::try_from(secs).unwrap_or(i32::MAX))
            .build();
        match self.long.stop_container(id, Some(options)).await {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => {
                tracing::warn!(
                    container = id,
                    "docker stop failed, killing: {}",
                    engine_message(&e)
                );
                let kill = KillContainerOptionsBuilder::default()
                    .signal("SIGKILL")
                    .build();
                let _ = self.docker.kill_container(id, Some(kill)).await;
            }
        }
    }
}

/// Follows a container's stdout and stderr (in arrival order) into `log`, skipping the
/// first `skip` bytes. Ends when the engine ends the stream (the container stopped).
async fn follow_logs(
    docker: Docker,
    id: String,
    mut log: File,
    mut skip: u64,
    mut redact: Redactor,
) {
    let options = LogsOptionsBuilder::default()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .build();
    let mut stream = docker.logs(&id, Some(options));
    while let Some(item) = stream.next().await {
        let chunk = match item {
            Ok(output) => output.into_bytes(),
            Err(e) => {
                tracing::warn!(
                    container = id,
                    "the log stream broke: {}",
                    engine_message(&e)
                );
                break;
            }
        };
        let chunk = if skip > 0 {
            let n = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
            skip -= n as u64;
            chunk.slice(n..)
        } else {
            chunk
        };
        // Secret values never reach the file (held back across chunk boundaries).
        let chunk = redact.push(&chunk);
        if chunk.is_empty() {
            continue;
        }
        if log.write_all(&chunk).await.is_err() {
            break;
        }
        let _ = log.flush().await;
    }
    let _ = log.write_all(&redact.finish()).await;
    let _ = log.sync_all().await;
}

/// The outcome from how the wait ended and the container's final state.
fn outcome(
    ended: Ended,
    info: Result<ContainerInspectResponse, EngineError>,
    timeout_secs: Option<u64>,
) -> Outcome {
    let state = info
        .as_ref()
        .ok()
        .and_then(|i| i.state.clone())
        .unwrap_or_default();
    let code = state.exit_code.and_then(|c| i32::try_from(c).ok());
    match ended {
        Ended::TimedOut => Outcome {
            end: AttemptEnd::TimedOut,
            exit_code: code,
            message: Some(format!(
                "stopped after limits.timeout ({} s)",
                timeout_secs.unwrap_or_default()
            )),
        },
        Ended::Stopped(reason) => stopped(reason, code),
        Ended::Exited(Err(message)) => failed(
            code,
            format!("lost track of the container (is the Docker engine still running?): {message}"),
        ),
        Ended::Exited(Ok(waited)) => {
            let waited = waited.and_then(|c| i32::try_from(c).ok());
            let info = match info {
                Ok(i) => i,
                Err(e) => {
                    return failed(
                        waited,
                        format!(
                            "could not inspect the exited container: {}",
                            engine_message(&e)
                        ),
                    );
                }
            };
            if state.running == Some(true) {
                return failed(
                    None,
                    "lost track of the container: the engine stopped reporting on it while it ran"
                        .into(),
                );
            }
            let limit = info
                .host_config
                .as_ref()
                .and_then(|h| h.memory)
                .and_then(|m| u64::try_from(m).ok())
                .filter(|m| *m > 0);
            exited(code.or(waited), state.oom_killed == Some(true), limit)
        }
    }
}

/// The outcome of a command that exited on its own, from its exit code, the engine's
/// OOM flag and the container's memory limit.
///
/// The engine's flag is container-wide and depends on the engine and kernel: some set it
/// when any process in the container was OOM-killed (a worker of a data loader, say) while
/// the command went on and exited on its own, others only report the kill of the main
/// process, or not at all on cgroup v2. An OOM kill is always SIGKILL, so the flag explains
/// the end only for exit code 137 or no code; with another code it is a note beside the
/// code, and a command that exited 0 completes with the note. A SIGKILL no one in muster
/// sent, in a container with a memory limit, names the limit even without the flag: that
/// is how the kernel enforces it.
fn exited(code: Option<i32>, oom_flag: bool, limit: Option<u64>) -> Outcome {
    let killed = matches!(code, None | Some(137));
    let limit_text = limit.map(format_bytes);
    let note = || match &limit_text {
        Some(l) => format!("a process in the container was OOM-killed (memory limit {l})"),
        None => "a process in the container was OOM-killed (the node ran out of memory)".into(),
    };
    match (code, oom_flag) {
        (_, true) if killed => failed(
            code,
            match &limit_text {
                Some(l) => format!("OOM-killed: the container exceeded its memory limit of {l}"),
                None => {
                    "OOM-killed: the node ran out of memory (the container has no memory limit)"
                        .into()
                }
            },
        ),
        (Some(137), false) if limit_text.is_some() => failed(
            Some(137),
            format!(
                "exited with code 137 (SIGKILL), most likely OOM-killed: the container has a \
                 memory limit of {}; ask for more memory if the job needs it",
                limit_text.unwrap_or_default()
            ),
        ),
        (Some(0), true) => Outcome {
            end: AttemptEnd::Completed,
            exit_code: Some(0),
            message: Some(format!("{}; the command still exited 0", note())),
        },
        (Some(0), false) => Outcome {
            end: AttemptEnd::Completed,
            exit_code: Some(0),
            message: None,
        },
        (Some(c), true) => failed(Some(c), format!("{}; {}", describe_exit(c), note())),
        (Some(c), false) => failed(Some(c), describe_exit(c)),
        (None, _) => failed(None, "the container ended without an exit code".into()),
    }
}

/// Lets the run's user read the workspace itself (its group becomes the user's, with
/// read and search), whatever mode the agent's folder had.
fn share_workspace(workdir: &Path, user: confine::RunUser) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::os::unix::fs::lchown(workdir, None, Some(user.gid))?;
    let mode = std::fs::metadata(workdir)?.mode() & 0o7777;
    if mode & 0o050 != 0o050 {
        std::fs::set_permissions(workdir, std::fs::Permissions::from_mode(mode | 0o050))?;
    }
    Ok(())
}

/// The create request: `sh -c COMMAND` in `/workspace` (the working directory read-only,
/// its `outputs/`, `logs/` and `checkpoint/` writable), the engine's init forwarding signals to the
/// command's process group, limits, GPUs, and the labels plus [`LABEL_LOG_OFFSET`].
///
/// Hardened whatever the spec says: never privileged; every capability dropped but the
/// compute target's `add_capabilities`; `no-new-privileges`; the engine's default seccomp
/// profile (nothing unconfines it); a read-only root filesystem with a tmpfs at `/tmp`; a
/// pids limit; `user` (none: the image's, when the compute target allows root).
fn container_body(
    launch: &Launch,
    spec: &ContainerSpec,
    workdir: &Path,
    log_offset: u64,
    user: Option<confine::RunUser>,
) -> ContainerCreateBody {
    let mut labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_LOG_OFFSET.into(), log_offset.to_string());
    let mount = |source: &Path, target: &str, read_only: bool| Mount {
        source: Some(source.to_string_lossy().into_owned()),
        target: Some(target.into()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Default::default()
    };
    // One value per variable, the last given (the run's own come after muster's).
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, (k, _)) in launch.env.iter().enumerate() {
        last.insert(k.as_str(), i);
    }
    let mut env: Vec<String> = launch
        .env
        .iter()
        .enumerate()
        .filter(|(i, (k, _))| last.get(k.as_str()) == Some(i))
        .map(|(_, (k, v))| format!("{k}={v}"))
        .collect();
    // The engine's init (tini) sends SIGTERM to the command's whole process group, as the
    // process executor does, rather than to `sh` alone.
    env.push("TINI_KILL_PROCESS_GROUP=1".into());
    let positive = |v: u64| (v > 0).then(|| to_i64(v));
    let mut mounts = vec![
        mount(workdir, WORKSPACE, true),
        mount(&workdir.join("outputs"), "/workspace/outputs", false),
        mount(&workdir.join("logs"), "/workspace/logs", false),
        mount(
            &workdir.join(crate::plan::CHECKPOINT_DIR),
            "/workspace/checkpoint",
            false,
        ),
    ];
    mounts.extend(
        spec.read_only_mounts
            .iter()
            .map(|(source, target)| mount(source, target, true))
            .chain(
                spec.writable_mounts
                    .iter()
                    .map(|(source, target)| mount(source, target, false)),
            ),
    );
    let host_config = HostConfig {
        mounts: Some(mounts),
        network_mode: spec.host_network.then(|| "host".to_string()),
        init: Some(true),
        nano_cpus: positive(spec.cpu_millis.saturating_mul(1_000_000)),
        memory: positive(spec.memory_bytes),
        // Swap equal to the limit: no swap, so the limit is real.
        memory_swap: positive(spec.memory_bytes),
        shm_size: positive(spec.shm_size),
        device_requests: (spec.gpu_device_requests && !spec.gpus.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                device_ids: Some(spec.gpus.clone()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]
        }),
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: (!spec.add_capabilities.is_empty()).then(|| spec.add_capabilities.clone()),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([(
            "/tmp".to_string(),
            "rw,nosuid,nodev,mode=1777".to_string(),
        )])),
        pids_limit: Some(i64::from(if spec.max_processes == 0 {
            DEFAULT_MAX_PROCESSES
        } else {
            spec.max_processes
        })),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: Some(vec!["sh".into(), "-c".into(), launch.command.clone()]),
        env: Some(env),
        user: user.map(|u| format!("{}:{}", u.uid, u.gid)),
        working_dir: Some(WORKSPACE.into()),
        labels: Some(labels),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// What is left of a `timeout_secs` timeout for a container that started at `started_at`
/// (the engine's RFC 3339 time); the whole timeout if that time cannot be read.
fn remaining(timeout_secs: u64, started_at: Option<&str>, now: SystemTime) -> Duration {
    let elapsed = started_at
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| now.duration_since(t).ok())
        .unwrap_or_default();
    Duration::from_secs(timeout_secs).saturating_sub(elapsed)
}

fn failed(code: Option<i32>, message: String) -> Outcome {
    Outcome {
        end: AttemptEnd::Failed,
        exit_code: code,
        message: Some(message),
    }
}

/// "exited with code N", naming the signal for the shell's 128 + N convention.
fn describe_exit(code: i32) -> String {
    let signal = (129..=159)
        .contains(&code)
        .then(|| nix::sys::signal::Signal::try_from(code - 128).ok())
        .flatten();
    match signal {
        Some(s) => format!("exited with code {code} ({})", s.as_str()),
        None => format!("exited with code {code}"),
    }
}

async fn open_log(path: &Path) -> Result<File, DockerError> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|source| DockerError::Log {
            path: path.to_path_buf(),
            source,
        })
}

/// Splits an image reference into the name and the tag (or digest) for a pull; no tag
/// means `latest` (without one, the engine would pull every tag).
fn split_reference(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name, digest);
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], &image[last_slash + i + 1..]),
        None => (image, "latest"),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_name_and_tag() {
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
        assert_eq!(split_reference("busybox:1.36"), ("busybox", "1.36"));
        assert_eq!(
            split_reference("localhost:5000/team/img"),
            ("localhost:5000/team/img", "latest")
        );
        assert_eq!(
            split_reference("localhost:5000/team/img:v2"),
            ("localhost:5000/team/img", "v2")
        );
        assert_eq!(
            split_reference("ghcr.io/x/y@sha256:abcd"),
            ("ghcr.io/x/y", "sha256:abcd")
        );
    }

    #[test]
    fn sizes_read_like_a_person_writes_them() {
        assert_eq!(format_bytes(32 * 1024 * 1024), "32 MiB");
        assert_eq!(format_bytes(3 * 512 * 1024 * 1024), "1.5 GiB");
        assert_eq!(format_bytes(100), "100 B");
    }

    #[test]
    fn the_create_request_mounts_limits_and_labels() {
        let launch = Launch {
            command: "python train.py".into(),
            workdir: "/w".into(),
            env: vec![("A".into(), "1".into())],
            log_path: "/w/log".into(),
            timeout: None,
            container: None,
            redact: Default::default(),
            process_limits: Default::default(),
        };
        let spec = ContainerSpec {
            image: "img:1".into(),
            name: "muster-r-1-0".into(),
            labels: [("muster.run_id".to_string(), "r".to_string())].into(),
            cpu_millis: 1500,
            memory_bytes: 1 << 30,
            shm_size: 0,
            gpus: vec!["GPU-a".into(), "GPU-b".into()],
            gpu_device_requests: true,
            ..Default::default()
        };
        let body = container_body(&launch, &spec, Path::new("/w"), 42, Some(confine::NOBODY));
        assert_eq!(body.user.as_deref(), Some("65534:65534"));
        assert_eq!(
            body.cmd,
            Some(vec!["sh".into(), "-c".into(), "python train.py".into()])
        );
        assert_eq!(body.working_dir.as_deref(), Some("/workspace"));
        assert!(body.env.unwrap().contains(&"A=1".to_string()));
        let labels = body.labels.unwrap();
        assert_eq!(labels["muster.run_id"], "r");
        assert_eq!(labels[LABEL_LOG_OFFSET], "42");
        let host = body.host_config.unwrap();
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.memory, Some(1 << 30));
        assert_eq!(host.memory_swap, Some(1 << 30));
        assert_eq!(host.shm_size, None);
        // Hardened: no privileges, no capabilities, nothing gained, a read-only root.
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(host.cap_add, None);
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges:true".to_string()])
        );
        assert_eq!(host.readonly_rootfs, Some(true));
        assert!(host.tmpfs.as_ref().unwrap().contains_key("/tmp"));
        assert_eq!(host.pids_limit, Some(4096));
        let mounts: Vec<_> = host
            .mounts
            .unwrap()
            .into_iter()
            .map(|m| (m.source.unwrap(), m.target.unwrap(), m.read_only.unwrap()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("/w".into(), "/workspace".into(), true),
                ("/w/outputs".into(), "/workspace/outputs".into(), false),
                ("/w/logs".into(), "/workspace/logs".into(), false),
                (
                    "/w/checkpoint".into(),
                    "/workspace/checkpoint".into(),
                    false
                ),
            ]
        );
        let gpus = host.device_requests.unwrap();
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(
            gpus[0].device_ids,
            Some(vec!["GPU-a".to_string(), "GPU-b".to_string()])
        );
        assert_eq!(gpus[0].capabilities, Some(vec![vec!["gpu".to_string()]]));

        // Fake GPUs: no device request (they are only named in the environment).
        assert_eq!(host.network_mode, None);
        let fake = ContainerSpec {
            gpu_device_requests: false,
            ..spec.clone()
        };
        let body = container_body(&launch, &fake, Path::new("/w"), 0, None);
        assert_eq!(body.user, None);
        assert_eq!(body.host_config.unwrap().device_requests, None);

        // A distributed rank: the node's network and the rsh helper, read-only.
        let distributed = ContainerSpec {
            host_network: true,
            read_only_mounts: vec![("/usr/bin/muster-rsh".into(), RSH_TARGET.into())],
            ..spec
        };
        let host = container_body(&launch, &distributed, Path::new("/w"), 0, None)
            .host_config
            .unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("host"));
        let last = host.mounts.unwrap().pop().unwrap();
        assert_eq!(
            (last.source.unwrap(), last.target.unwrap(), last.read_only),
            (
                "/usr/bin/muster-rsh".to_string(),
                RSH_TARGET.to_string(),
                Some(true)
            )
        );
    }

    #[test]
    fn capabilities_come_back_only_as_listed_and_the_last_value_of_a_variable_wins() {
        let launch = Launch {
            command: "true".into(),
            workdir: "/w".into(),
            env: vec![
                ("HOME".into(), "/tmp".into()),
                ("A".into(), "1".into()),
                ("HOME".into(), "/home/me".into()),
            ],
            log_path: "/w/log".into(),
            timeout: None,
            container: None,
            redact: Default::default(),
            process_limits: Default::default(),
        };
        let spec = ContainerSpec {
            image: "img:1".into(),
            add_capabilities: vec!["NET_BIND_SERVICE".into()],
            max_processes: 64,
            ..Default::default()
        };
        let body = container_body(&launch, &spec, Path::new("/w"), 0, None);
        let env = body.env.unwrap();
        assert!(env.contains(&"HOME=/home/me".to_string()), "{env:?}");
        assert!(!env.contains(&"HOME=/tmp".to_string()), "{env:?}");
        assert!(env.contains(&"A=1".to_string()));
        let host = body.host_config.unwrap();
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(host.cap_add, Some(vec!["NET_BIND_SERVICE".to_string()]));
        assert_eq!(host.pids_limit, Some(64));
        assert_eq!(host.privileged, Some(false));
    }

    #[test]
    fn an_adopted_timeout_counts_from_the_container_start() {
        let start = humantime::parse_rfc3339("2025-01-02T03:04:05.123456789Z").unwrap();
        let now = start + Duration::from_secs(20);
        assert_eq!(
            remaining(60, Some("2025-01-02T03:04:05.123456789Z"), now),
            Duration::from_secs(40)
        );
        assert_eq!(
            remaining(10, Some("2025-01-02T03:04:05.123456789Z"), now),
            Duration::ZERO
        );
        // Never started (the engine's zero time is in the past too) or unreadable.
        assert_eq!(remaining(60, Some("garbage"), now), Duration::from_secs(60));
        assert_eq!(remaining(60, None, now), Duration::from_secs(60));
    }

    #[test]
    fn exit_codes_name_their_signal() {
        assert_eq!(describe_exit(3), "exited with code 3");
        assert_eq!(describe_exit(137), "exited with code 137 (SIGKILL)");
    }

    #[test]
    fn the_oom_flag_explains_only_a_sigkill() {
        let mib = Some(32 * 1024 * 1024);
        let end = |o: Outcome| (o.end, o.exit_code, o.message);
        assert_eq!(
            end(exited(Some(137), true, mib)),
            (
                AttemptEnd::Failed,
                Some(137),
                Some("OOM-killed: the container exceeded its memory limit of 32 MiB".into())
            )
        );
        assert_eq!(
            end(exited(None, true, None)).2.as_deref(),
            Some("OOM-killed: the node ran out of memory (the container has no memory limit)")
        );
        // Engines that do not flag it: the SIGKILL still names the limit.
        let (e, _, m) = end(exited(Some(137), false, mib));
        assert_eq!(e, AttemptEnd::Failed);
        assert!(m.unwrap().contains("most likely OOM-killed"));
        // No limit and no flag: a plain SIGKILL.
        assert_eq!(
            end(exited(Some(137), false, None)).2.as_deref(),
            Some("exited with code 137 (SIGKILL)")
        );
        // A worker was killed but the command went on and exited on its own.
        assert_eq!(
            end(exited(Some(0), true, mib)),
            (
                AttemptEnd::Completed,
                Some(0),
                Some(
                    "a process in the container was OOM-killed (memory limit 32 MiB); \
                     the command still exited 0"
                        .into()
                )
            )
        );
        assert_eq!(
            end(exited(Some(1), true, mib)).2.as_deref(),
            Some(
                "exited with code 1; a process in the container was OOM-killed (memory limit 32 MiB)"
            )
        );
        assert_eq!(
            end(exited(Some(0), false, mib)),
            (AttemptEnd::Completed, Some(0), None)
        );
    }
}
