//! One attempt on this node: prepare the working directory, run, upload outputs, and tell
//! the session loop how it went (the session loop ships logs and reports).

use std::path::PathBuf;

use muster_core::AttemptEnd;
use muster_proto::v1::{self, blob_service_client::BlobServiceClient};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;

use crate::executor::{self, Launch, Outcome, Stop};
use crate::{outputs, snapshot};

/// (run id, attempt number).
pub(crate) type Key = (String, u32);

/// What an attempt tells the session loop.
#[derive(Debug)]
pub(crate) enum Event {
    /// Entered "preparing" or "running".
    State(Key, &'static str),
    /// Over: how, and the outputs archive if one was uploaded.
    Ended(Key, Outcome, Option<String>),
}

/// Everything an attempt needs.
pub(crate) struct AttemptTask {
    pub assignment: v1::Assignment,
    pub workdir: PathBuf,
    pub log_path: PathBuf,
    pub cache_dir: PathBuf,
    pub blobs: BlobServiceClient<Channel>,
    pub events: mpsc::Sender<Event>,
    pub stop: watch::Receiver<Option<Stop>>,
}

impl AttemptTask {
    pub(crate) async fn run(mut self) {
        let key = (self.assignment.run_id.clone(), self.assignment.attempt);
        let _ = self
            .events
            .send(Event::State(key.clone(), "preparing"))
            .await;
        let (outcome, outputs) = match self.prepare().await {
            Err(message) => (
                Outcome {
                    end: AttemptEnd::Failed,
                    exit_code: None,
                    message: Some(message),
                },
                None,
            ),
            Ok(launch) => self.execute(launch, &key).await,
        };
        let _ = self.events.send(Event::Ended(key, outcome, outputs)).await;
    }

    async fn prepare(&mut self) -> Result<Launch, String> {
        let spec = self.assignment.spec.clone().unwrap_or_default();
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
        let a = &self.assignment;
        let mut env: Vec<(String, String)> = vec![
            ("MUSTER_RUN_ID".into(), a.run_id.clone()),
            ("MUSTER_ATTEMPT".into(), a.attempt.to_string()),
            ("MUSTER_NODE_RANK".into(), a.rank.to_string()),
            (
                "MUSTER_NODE_COUNT".into(),
                a.placements.len().max(1).to_string(),
            ),
            ("MUSTER_EXPERIMENT".into(), spec.experiment.clone()),
            (
                "MUSTER_OUTPUTS_DIR".into(),
                code_dir.join("outputs").display().to_string(),
            ),
            ("AZUREML_RUN_ID".into(), a.run_id.clone()),
        ];
        if a.attempt > 1 {
            env.push(("MUSTER_RESTARTED".into(), "1".into()));
        }
        env.extend(spec.environment_variables.clone());
        Ok(Launch {
            command: spec.command.clone(),
            workdir: code_dir,
            env,
            log_path: self.log_path.clone(),
            timeout: spec.timeout_s.map(std::time::Duration::from_secs),
            container: None,
        })
    }

    async fn execute(&mut self, launch: Launch, key: &Key) -> (Outcome, Option<String>) {
        let outputs_dir = launch.workdir.join("outputs");
        let (started_tx, started_rx) = oneshot::channel();
        let events = self.events.clone();
        let running_key = key.clone();
        let announce = tokio::spawn(async move {
            if started_rx.await.is_ok() {
                let _ = events.send(Event::State(running_key, "running")).await;
            }
        });
        let mut outcome = executor::process::run(launch, self.stop.clone(), started_tx).await;
        let _ = announce.await;
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
        (outcome, outputs)
    }
}
