//! The agent's life around its sessions: open the data directory and the exec listener,
//! find the executors (Docker when an engine answers, else processes), re-adopt the
//! containers that outlived a restart, hold one session after another (reconnecting with
//! `backon`'s backoff), and at shutdown leave containers running and stop processes.
//! A child of `session`, so it shares the agent's fields without widening them.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use muster_client::{Credentials, Servers};
use muster_proto::v1;
use tokio::sync::{mpsc, watch};

use super::{Agent, SessionError, entry};
use crate::attempt::{AttemptTask, Executors, Key};
use crate::blobs::Blobs;
use crate::executor::confine::RunUser;
use crate::executor::docker::DockerExecutor;
use crate::executor::process::ProcessExecutor;
use crate::executor::{Executor, Stop, StopReason};
use crate::plan::{self, Node};
use crate::{AgentConfig, AgentError, ConfigError};

/// The reconnect backoff: 100 ms doubling to 5 s, without end.
fn reconnect_backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_factor(2.0)
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .build()
}

/// How the agent reaches `servers`: 3 s to connect to each, and HTTP/2 keep-alive pings
/// every `keep_alive` (answered within 2 s), so a leader cut off by the network (no
/// reset) is noticed within about 3 s with the default 1 s and the agent moves to the new
/// leader about when the cluster elects it.
fn session_servers(servers: &[String], credentials: Credentials, keep_alive: Duration) -> Servers {
    Servers::new(servers)
        .with_credentials(credentials)
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(keep_alive, Duration::from_secs(2))
}

/// Under `--run-as`: the attempts' folder `work` is searchable but not listable (0711), and
/// every folder above it searchable by `user` (it must reach its working directory).
fn reachable_by(work: &std::path::Path, user: RunUser) -> Result<(), AgentError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o711)).map_err(|source| {
        AgentError::DataDir {
            path: work.to_path_buf(),
            source,
        }
    })?;
    let absolute = std::path::absolute(work).unwrap_or_else(|_| work.to_path_buf());
    for dir in absolute.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode();
        let searchable = mode & 0o001 != 0
            || (meta.uid() == user.uid && mode & 0o100 != 0)
            || (meta.gid() == user.gid && mode & 0o010 != 0);
        if !searchable {
            return Err(ConfigError::RunAsUnreachable {
                uid: user.uid,
                dir: dir.to_path_buf(),
                mode: mode & 0o7777,
            }
            .into());
        }
    }
    Ok(())
}

impl Agent {
    /// Takes the data directory and binds the exec listener; `config` is validated.
    pub(crate) fn open(config: AgentConfig) -> Result<Agent, AgentError> {
        let (lock, node_id) = crate::identity::open(&config.data_dir)?;
        for d in ["work", "cache/blobs"] {
            let path = config.data_dir.join(d);
            std::fs::create_dir_all(&path)
                .map_err(|source| AgentError::DataDir { path, source })?;
        }
        if let Some(user) = config.run_as {
            reachable_by(&config.data_dir.join("work"), user)?;
        }
        let (events_tx, events_rx) = mpsc::channel(1024);
        let listen_error = |source| AgentError::ExecListen {
            addr: config.exec_listen.clone(),
            source,
        };
        let exec_listener =
            std::net::TcpListener::bind(&config.exec_listen).map_err(listen_error)?;
        exec_listener.set_nonblocking(true).map_err(listen_error)?;
        let exec_port = exec_listener.local_addr().map_err(listen_error)?.port();
        let executors = Executors {
            container: None,
            process: config.executor.clone().unwrap_or_else(|| {
                Arc::new(ProcessExecutor {
                    run_as: config.run_as,
                })
            }),
            run_as: config.run_as,
            node: Node {
                id: node_id.clone(),
                work_root: config.data_dir.join("work"),
                containers: false,
                no_containers: None,
                process_fallback: config.process_fallback,
                gpu_device_requests: config.gpu_device_requests,
                unlimited: config.unlimited,
                rsh_helper: crate::find_rsh_helper(config.rsh_helper.as_deref()),
            },
            registry: Default::default(),
            peer_wait: config.peer_wait,
        };
        Ok(Agent {
            servers: Servers::new(Vec::<String>::new()),
            exec_listener: Some(exec_listener),
            exec_port,
            exec_task: None,
            credentials: Credentials::none(),
            executors,
            config,
            node_id,
            _lock: lock,
            attempts: HashMap::new(),
            events_tx,
            events_rx,
        })
    }

    /// Finds the executors, re-adopts what survived a restart, serves exec requests, and
    /// holds a session (reconnecting with backoff) until `shutdown`.
    pub(crate) async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        self.credentials = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            c = crate::credential::obtain(&self.config) => c?,
        };
        self.servers = session_servers(
            &self.config.servers,
            self.credentials.clone(),
            self.config.keep_alive,
        );
        let mut report = self.probe_gpus().await;
        if let Some(note) = &report.note {
            tracing::info!("{note}");
        }
        tracing::info!(node = %self.config.name, id = %self.node_id, compute = %self.config.compute, gpus = report.gpus.len(), "agent starting");
        let mut docker = None;
        if let Some(executor) = self.config.executor.clone() {
            tracing::info!(
                executor = executor.kind(),
                "runs use the configured executor"
            );
            self.set_container_executor(executor).await;
        } else {
            match DockerExecutor::connect().await {
                Ok(engine) => {
                    tracing::info!(
                        "Docker engine reachable: runs that name an image run in containers, others as processes"
                    );
                    let engine = Arc::new(engine);
                    docker = Some(engine.clone());
                    self.set_container_executor(engine).await;
                }
                Err(e) => {
                    let then = if self.config.process_fallback {
                        "run as processes"
                    } else {
                        "fail"
                    };
                    tracing::info!("{e}; runs run as processes (runs that name an image {then})");
                    self.executors.node.no_containers = Some(e.to_string());
                }
            }
        }
        if let Some(listener) = self.exec_listener.take() {
            let listen_error = |source| AgentError::ExecListen {
                addr: self.config.exec_listen.clone(),
                source,
            };
            let listener = tokio::net::TcpListener::from_std(listener).map_err(listen_error)?;
            self.exec_task = Some(tokio::spawn(crate::rsh_server::serve(
                listener,
                self.executors.registry.clone(),
                docker,
            )));
        }
        let mut backoff = reconnect_backoff();
        let result = loop {
            let attempt = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                r = self.serve(&mut report) => r,
            };
            let delay = match attempt {
                Err(SessionError::Refused(why)) => break Err(AgentError::Refused(why)),
                Err(e) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(cause = %e, retry_in = ?delay, "no session with a server");
                    delay
                }
                Ok(()) => {
                    tracing::info!("session ended; reconnecting");
                    backoff = reconnect_backoff();
                    backoff.next().unwrap_or_default()
                }
            };
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        };
        self.stop_all().await;
        if let Some(t) = self.exec_task.take() {
            t.abort();
        }
        result
    }

    /// Runs containers with `executor` from now on, and re-adopts what it still holds.
    pub(super) async fn set_container_executor(&mut self, executor: Arc<dyn Executor>) {
        self.executors.container = Some(executor.clone());
        self.executors.node.containers = true;
        self.adopt(executor).await;
    }

    /// Re-adopts the containers this node started before the agent restarted: their logs
    /// keep flowing and their ends are reported as if the agent had never gone.
    pub(super) async fn adopt(&mut self, executor: Arc<dyn Executor>) {
        let managed = match executor.managed(&self.node_id).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(cause = %e, "cannot list this node's containers; none re-adopted");
                return;
            }
        };
        if managed.is_empty() {
            return;
        }
        // Adopted attempts start before any session: their transfers connect on first use.
        let blobs = match Blobs::lazy(self.config.servers.clone(), self.credentials.clone()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(cause = %e, "no server to transfer through; no container re-adopted");
                return;
            }
        };
        for m in managed {
            let key = (m.run_id.clone(), m.attempt);
            if self.attempts.contains_key(&key) {
                continue;
            }
            tracing::info!(run_id = %m.run_id, attempt = m.attempt, running = m.running, "re-adopting container");
            let workdir = self.workdir(&key);
            let (stop, stop_rx) = watch::channel(None);
            let task = self.task(key.clone(), blobs.clone(), stop_rx);
            let handle = tokio::spawn(task.adopt(executor.clone(), m));
            self.attempts.insert(
                key,
                entry(workdir, v1::AttemptState::Running, stop, Some(handle), true),
            );
        }
    }

    /// The task of attempt `key`, transferring through `blobs`, stopped through `stop`.
    pub(super) fn task(
        &self,
        key: Key,
        blobs: Blobs,
        stop: watch::Receiver<Option<Stop>>,
    ) -> AttemptTask {
        let workdir = self.workdir(&key);
        AttemptTask {
            key,
            log_path: plan::log_path(&workdir),
            workdir,
            cache_dir: self.config.data_dir.join("cache/blobs"),
            blobs,
            events: self.events_tx.clone(),
            stop,
            executors: self.executors.clone(),
            upload_checkpoint: false,
            taken: Default::default(),
            launched: false,
        }
    }

    pub(super) fn workdir(&self, key: &Key) -> PathBuf {
        plan::workdir(&self.executors.node.work_root, key)
    }

    /// Agent shutdown: containers keep running (the agent re-adopts them when it returns);
    /// processes, which cannot be re-adopted, are stopped (the server restarts them).
    pub(super) async fn stop_all(&mut self) {
        for entry in self.attempts.values_mut().filter(|e| e.in_container) {
            if let Some(t) = entry.task.take() {
                t.abort();
            }
        }
        for entry in self.attempts.values() {
            entry.stop.send_replace(Some(Stop {
                reason: StopReason::Stale,
                grace: Duration::from_secs(2),
            }));
        }
        for entry in self.attempts.values_mut() {
            if let Some(t) = entry.task.take() {
                let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
            }
        }
    }

    pub(super) async fn probe_gpus(&self) -> crate::GpuReport {
        let probe = self.config.gpu_probe.clone();
        tokio::task::spawn_blocking(move || probe.probe())
            .await
            .unwrap_or_default()
    }
}
