//! One attempt on this node: prepare the working directory, choose the executor (a
//! container when the run names an image and the Docker engine is reachable, else a
//! process), run, upload outputs, and tell the session loop how it went (the session
//! loop ships logs and reports). A container found at start-up is re-adopted here too.

use std::path::PathBuf;
use std::sync::Arc;

use muster_core::AttemptEnd;
use muster_proto::v1::{self, blob_service_client::BlobServiceClient};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;

use crate::executor::docker::{DockerExecutor, Managed};
use crate::executor::{self, ContainerSpec, Launch, Outcome, Stop};
use crate::{outputs, snapshot};

/// (run id, attempt number).
pub(crate) type Key = (String, u32);

/// Azure ML's default shared memory for a container.
const DEFAULT_SHM: u64 = 2 << 30;

/// What an attempt tells the session loop.
#[derive(Debug)]
pub(crate) enum Event {
    /// Entered "preparing" or "running".
    State(Key, &'static str),
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
}

/// Everything an attempt needs.
pub(crate) struct AttemptTask {
    pub key: Key,
    pub workdir: PathBuf,
    pub log_path: PathBuf,
    pub cache_dir: PathBuf,
    pub blobs: BlobServiceClient<Channel>,
    pub events: mpsc::Sender<Event>,
    pub stop: watch::Receiver<Option<Stop>>,
    pub executors: Executors,
}

impl AttemptTask {
    /// Runs a new assignment from the start.
    pub(crate) async fn run(mut self, assignment: v1::Assignment) {
        let _ = self
            .events
            .send(Event::State(self.key.clone(), "preparing"))
            .await;
        let outcome = match self.prepare(&assignment).await {
            Err(message) => Outcome {
                end: AttemptEnd::Failed,
                exit_code: None,
                message: Some(message),
            },
            Ok(launch) => self.execute(launch).await,
        };
        self.finish(outcome).await;
    }

    /// Follows a container this node started before the agent restarted.
    pub(crate) async fn adopt(self, docker: Arc<DockerExecutor>, managed: Managed) {
        let state = if managed.running {
            "running"
        } else {
            "preparing"
        };
        let _ = self
            .events
            .send(Event::State(self.key.clone(), state))
            .await;
        let outcome = docker
            .adopt(&managed, &self.log_path, self.stop.clone())
            .await;
        self.finish(outcome).await;
    }

    async fn prepare(&mut self, a: &v1::Assignment) -> Result<Launch, String> {
        let spec = a.spec.clone().unwrap_or_default();
        let code_dir = self.workdir.join("code");
        tokio::fs::create_dir_all(&code_dir).await.map_err(|e| {
            format!(
                "cannot create the working directory {}: {e}",
                code_dir.display()
            )
        })?;
        if let Some(code) = &spec.code {
            snapshot::materialize(&mut self.blobs, &code.manifest, &self.cache_dir, &code_dir)
                .await
                .map_err(|e| format!("could not fetch the code snapshot: {e:#}"))?;
        }
        for d in ["outputs", "logs"] {
            tokio::fs::create_dir_all(code_dir.join(d))
                .await
                .map_err(|e| format!("cannot create {d}/: {e}"))?;
        }
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
            }
        });
        Ok(Launch {
            command: spec.command.clone(),
            workdir: code_dir,
            env,
            log_path: self.log_path.clone(),
            timeout,
            container,
        })
    }

    async fn execute(&mut self, launch: Launch) -> Outcome {
        let (started_tx, started_rx) = oneshot::channel();
        let events = self.events.clone();
        let key = self.key.clone();
        let announce = tokio::spawn(async move {
            if started_rx.await.is_ok() {
                let _ = events.send(Event::State(key, "running")).await;
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
        outcome
    }

    /// Uploads `outputs/` and reports the end.
    async fn finish(mut self, mut outcome: Outcome) {
        let outputs_dir = self.workdir.join("code/outputs");
        let archive = self.workdir.join("outputs.tar");
        let outputs = match outputs::upload(&mut self.blobs, &outputs_dir, archive).await {
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
