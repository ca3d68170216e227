//! The attempt planner: the only code that turns an `Assignment` off the wire into what
//! this node will do for it. Pure: no I/O, no clock, no tasks, so every rule below is a
//! unit test without Docker.
//!
//! [`AttemptPlan::from`] converts the wire assignment to core types once, at this edge
//! (an unknown distribution type is a [`PlanError`], never a default), then decides:
//!
//! - where the attempt lives on the host (working directory, `code/`, the log file) and
//!   what to put there first (code snapshot, pipeline inputs, declared output folders,
//!   the MPI hostfile, the checkpoint to resume from);
//! - checkpoints: every rank gets `MUSTER_CHECKPOINT_DIR` (restored from the run's
//!   checkpoint when the assignment carries one, with `MUSTER_RESUMED=1`); rank 0's folder
//!   is what is uploaded, at the end and every `checkpoint.interval`;
//! - which executor runs it: a container when the run names an image and the node has a
//!   container executor, a process otherwise (or an error naming what to do);
//! - the environment: `MUSTER_*`, GPU visibility by UUID (`NVIDIA_VISIBLE_DEVICES`, and
//!   `CUDA_VISIBLE_DEVICES` for processes), the distribution's variables computed by
//!   `muster_core::distributed`, then the run's own variables (which win);
//! - the container: image, name, labels for re-adoption, CPU/memory/shm limits, GPUs,
//!   host network and the rsh helper mount for distributed ranks;
//! - the MPI gate of a multi-node run: rank 0 waits for its workers ([`Gate`]), a worker
//!   idles until the launcher's daemons are exec'd into it and watches the launcher.
//!
//! `attempt.rs` carries the plan out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use muster_core::distributed::{FIRST_MASTER_PORT, Layout, Peer, rank_setup};
use muster_core::spec::{Distribution, OutputKind, RunSpec};
use muster_proto::v1;

use crate::executor::confine::is_gpu_variable;
use crate::executor::docker::RSH_TARGET;
use crate::executor::{ContainerSpec, Launch, ProcessLimits};
use crate::rsh_server::Worker;

/// (run id, attempt number).
pub(crate) type Key = (String, u32);

/// Azure ML's default shared memory for a container.
pub(crate) const DEFAULT_SHM: u64 = 2 << 30;

/// Where an attempt's files are, below the agent's `work/` directory.
pub(crate) fn workdir(work_root: &Path, key: &Key) -> PathBuf {
    work_root.join(format!("{}.{}", key.0, key.1))
}

/// The checkpoint folder, below the attempt's `code/` (the workspace).
pub(crate) const CHECKPOINT_DIR: &str = "checkpoint";

/// The attempt's log file in its working directory.
pub(crate) fn log_path(workdir: &Path) -> PathBuf {
    workdir.join("output.log")
}

/// What the planner needs to know of this node (all of it fixed once the agent started).
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// This node's id (a container label, for re-adoption).
    pub id: String,
    /// The agent's `work/` directory: one folder per attempt below it.
    pub work_root: PathBuf,
    /// A container executor is available (the Docker engine answered, or a test's fake).
    pub containers: bool,
    /// Why there is none, in words.
    pub no_containers: Option<String>,
    /// Run an image's command as a process when there is no container executor (`muster dev`).
    pub process_fallback: bool,
    /// Ask the engine for GPUs with a device request.
    pub gpu_device_requests: bool,
    /// The node offers no limits (the `local` target): GPUs are not hidden from runs.
    pub unlimited: bool,
    /// The rsh helper (`muster-rsh`) to mount into the containers of distributed runs.
    pub rsh_helper: Option<PathBuf>,
}

/// What rank 0 of a multi-node MPI run does around its launcher: wait until these workers
/// are up and reachable, release them once it completed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Gate {
    /// Ranks 1.. and their agents' exec listeners.
    pub workers: Vec<Worker>,
    /// The attempt's secret.
    pub secret: String,
}

/// Everything this node does for one assignment, decided before anything is done.
#[derive(Debug, Clone)]
pub(crate) struct AttemptPlan {
    /// This node's rank in the run.
    pub rank: u32,
    /// The attempt's directory on the host.
    pub workdir: PathBuf,
    /// The manifest of the code snapshot to fetch into `launch.workdir`, if the run has code.
    pub snapshot: Option<String>,
    /// Pipeline inputs (name → `<archive sha256>/<folder>`), placed at `inputs/<name>`.
    pub inputs: BTreeMap<String, String>,
    /// `uri_file` inputs by URL (name → URL), fetched to `inputs/<name>/<file name>`.
    pub url_inputs: BTreeMap<String, String>,
    /// Local inputs uploaded with the submit (name → snapshot manifest), placed at
    /// `inputs/<name>/`.
    pub snapshot_inputs: BTreeMap<String, String>,
    /// Datastore inputs (name → host path): a process gets the link `inputs/<name>` to
    /// it; a container, a read-only bind mount there (in its container spec).
    pub host_inputs: BTreeMap<String, String>,
    /// Inputs in `mode: download`: writable copies (a container gets a writable mount of
    /// each); the rest are read-only.
    pub download_inputs: BTreeSet<String>,
    /// The declared folder outputs (the job's `outputs:` and a pipeline step's):
    /// `outputs/<name>` folders to create before the command starts.
    pub output_folders: Vec<String>,
    /// The MPI hostfile's text, written to `code/.muster/hostfile`.
    pub hostfile: Option<String>,
    /// The checkpoint archive (its SHA-256) to restore into `code/checkpoint/` before the
    /// command starts.
    pub resume: Option<String>,
    /// Rank 0: upload `code/checkpoint/` when the attempt ends (and every `checkpoint_every`
    /// while it runs); other ranks' folders are not kept.
    pub upload_checkpoint: bool,
    /// Rank 0 of a job with `checkpoint.interval`: how often to upload while it runs.
    pub checkpoint_every: Option<Duration>,
    /// Rank 0 of a multi-node MPI run: its workers, to wait for and release.
    pub gate: Option<Gate>,
    /// An MPI worker: rank 0's agent, whose launcher it watches.
    pub launcher: Option<Worker>,
    /// A distributed rank in a container: peers may exec into it with this secret.
    pub exec_secret: Option<String>,
    /// The run names this image but runs as a process (no container executor, fallback on).
    pub image_as_process: Option<String>,
    /// What the executor starts.
    pub launch: Launch,
    /// The run's secret values (files written when the attempt is prepared).
    pub secrets: crate::secrets::RunSecrets,
}

/// Why an assignment cannot be planned on this node. Each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PlanError {
    /// The assignment has no run spec.
    #[error(
        "the assignment of attempt {attempt} of run {run_id} carries no run spec: upgrade the servers"
    )]
    NoSpec {
        /// The run.
        run_id: String,
        /// The attempt.
        attempt: u32,
    },
    /// The spec does not convert to core (an unknown distribution type).
    #[error("the run's spec: {0}")]
    Spec(String),
    /// The run names an image and the node cannot run containers.
    #[error(
        "the run names image {image}, but this node has no Docker engine ({reason}); start dockerd on the node or submit without --image"
    )]
    NoContainers {
        /// The image.
        image: String,
        /// Why there is no engine.
        reason: String,
    },
    /// A multi-node MPI run in containers needs the rsh helper.
    #[error(
        "this MPI run spans nodes, but this agent has no rsh helper (muster-rsh): install it next to the muster binary or pass --rsh-helper"
    )]
    NoRshHelper,
    /// A multi-node MPI run needs the attempt's secret.
    #[error(
        "this MPI run spans nodes, but the server sent no attempt secret for its ranks' agents: upgrade the servers"
    )]
    NoSecret,
    /// A secret the run names did not come with the assignment.
    #[error("{0}")]
    Secret(String),
    /// A peer's agent has no exec listener.
    #[error(
        "this MPI run spans nodes, but node {node} advertises no exec port (its agent predates distributed runs): upgrade its agent"
    )]
    NoExecPort {
        /// The peer's node name.
        node: String,
    },
}

impl AttemptPlan {
    /// The inputs muster places as files of the run's own (uploaded, fetched, upstream
    /// outputs) that are read-only: all but `download` ones. Datastore inputs are the
    /// shared folder itself, never changed by muster.
    pub(crate) fn read_only_inputs(&self) -> impl Iterator<Item = &String> {
        self.inputs
            .keys()
            .chain(self.url_inputs.keys())
            .chain(self.snapshot_inputs.keys())
            .filter(|name| !self.download_inputs.contains(*name))
    }

    /// Plans assignment `a` on `node`. Pure: the same inputs give the same plan.
    pub(crate) fn from(a: &v1::Assignment, node: &Node) -> Result<AttemptPlan, PlanError> {
        let key: Key = (a.run_id.clone(), a.attempt);
        let wire = a.spec.clone().ok_or_else(|| PlanError::NoSpec {
            run_id: a.run_id.clone(),
            attempt: a.attempt,
        })?;
        let spec: RunSpec = muster_proto::spec_from_wire(wire).map_err(PlanError::Spec)?;
        let policy = muster_proto::run_policy_from_wire(a.run_policy.as_ref())
            .map_err(|e| PlanError::Spec(format!("the compute target's run policy: {e}")))?;
        let peers: Vec<Peer> = a
            .placements
            .iter()
            .map(|p| Peer {
                name: p.node_name.clone(),
                address: p.address.clone(),
                exec_port: u16::try_from(p.exec_port).ok().filter(|p| *p > 0),
            })
            .collect();
        let gpus: Vec<String> = a
            .placements
            .get(a.rank as usize)
            .map(|p| p.gpus.clone())
            .unwrap_or_default();
        let workdir = workdir(&node.work_root, &key);
        let code_dir = workdir.join("code");

        let (container_image, image_as_process) =
            choose_executor(spec.environment.image.clone(), node)?;
        let in_container = container_image.is_some();
        let workspace = if in_container {
            "/workspace".to_string()
        } else {
            code_dir.display().to_string()
        };

        let mut env = muster_env(a, &spec, &workspace, peers.len());
        env.extend(gpu_env(&gpus, node.unlimited, in_container));

        // Distributed runs: what every rank is told of the others (muster-core computes it).
        let distributed = peers.len() > 1;
        let is_mpi = matches!(spec.distribution, Some(Distribution::Mpi { .. }));
        let rsh_helper = node
            .rsh_helper
            .clone()
            .filter(|_| distributed && in_container);
        if distributed && is_mpi && in_container && rsh_helper.is_none() {
            return Err(PlanError::NoRshHelper);
        }
        let secret = Some(a.secret.clone()).filter(|s| !s.is_empty());
        let hostfile_path = format!("{workspace}/.muster/hostfile");
        let setup = rank_setup(&Layout {
            distribution: spec.distribution.as_ref(),
            peers: &peers,
            rank: a.rank,
            master_port: u16::try_from(a.master_port)
                .ok()
                .filter(|p| *p > 0)
                .unwrap_or(FIRST_MASTER_PORT),
            hostfile_path: &hostfile_path,
            rsh_path: rsh_helper.as_ref().map(|_| RSH_TARGET),
            secret: secret.as_deref(),
        });
        env.extend(setup.env);

        let mpi = if distributed && is_mpi && rsh_helper.is_some() {
            mpi_roles(&peers, a.rank, secret.as_deref())?
        } else {
            MpiRole::None
        };
        let (command, gate, launcher) = match mpi {
            MpiRole::None => (spec.command.clone(), None, None),
            MpiRole::Launcher(gate) => (spec.command.clone(), Some(gate), None),
            MpiRole::Worker(launcher) => {
                (format!("exec {RSH_TARGET} --idle"), None, Some(launcher))
            }
        };
        // A container's user is not root (unless allowed), and its root filesystem is
        // read-only: its home is the scratch tmpfs, unless the run says otherwise.
        if in_container && !policy.allow_root {
            env.push(("HOME".into(), "/tmp".into()));
        }
        // The run's own variables, except those that would show it GPUs it was not given
        // (the local target hides none, so there they pass).
        env.extend(
            spec.environment_variables
                .iter()
                .filter(|(k, _)| node.unlimited || !is_gpu_variable(k))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let secrets = crate::secrets::RunSecrets::from_assignment(&spec, &a.secrets)
            .map_err(PlanError::Secret)?;
        env.extend(secrets.env());

        let container =
            container_image.map(|image| ContainerSpec {
                name: format!("muster-{}-{}-{}", a.run_id, a.attempt, a.rank),
                labels: labels(a, &node.id, spec.timeout_s),
                image,
                cpu_millis: spec.resources.cpu_millis,
                memory_bytes: spec.resources.memory_bytes,
                shm_size: spec.shm_size.unwrap_or(DEFAULT_SHM),
                gpus,
                gpu_device_requests: node.gpu_device_requests,
                host_network: distributed,
                read_only_mounts: rsh_helper
                    .iter()
                    .map(|h| (h.clone(), RSH_TARGET.to_string()))
                    // Datastore inputs: the shared folder, read-only, at inputs/<name>.
                    .chain(spec.host_inputs.iter().map(|(name, host)| {
                        (PathBuf::from(host), format!("/workspace/inputs/{name}"))
                    }))
                    .collect(),
                // `download` inputs: writable copies in the otherwise read-only workspace.
                writable_mounts: spec
                    .download_inputs
                    .iter()
                    .map(|name| {
                        (
                            code_dir.join("inputs").join(name),
                            format!("/workspace/inputs/{name}"),
                        )
                    })
                    .collect(),
                allow_root: policy.allow_root,
                add_capabilities: policy.add_capabilities.clone(),
                max_processes: policy.max_processes(),
            });
        // Peers may exec into this rank's container (MPI) with the attempt's secret; a
        // release from rank 0 ends it as completed.
        let exec_secret = secret.filter(|_| container.is_some() && distributed);
        Ok(AttemptPlan {
            rank: a.rank,
            snapshot: spec.code.as_ref().map(|c| c.manifest.clone()),
            // A pipeline step's upstream outputs, and registered outputs the job names.
            inputs: a
                .inputs
                .clone()
                .into_iter()
                .chain(spec.output_inputs.clone())
                .collect(),
            url_inputs: spec.url_inputs.clone(),
            snapshot_inputs: spec.snapshot_inputs.clone(),
            host_inputs: spec.host_inputs.clone(),
            download_inputs: spec.download_inputs.clone(),
            output_folders: output_folders(&spec, &a.outputs)?,
            hostfile: setup.hostfile,
            resume: a.resume.as_ref().map(|c| c.sha256.clone()),
            upload_checkpoint: a.rank == 0,
            checkpoint_every: spec
                .checkpoint_interval_s
                .filter(|_| a.rank == 0)
                .map(Duration::from_secs),
            gate,
            launcher,
            exec_secret,
            image_as_process,
            launch: Launch {
                command,
                workdir: code_dir,
                env,
                log_path: log_path(&workdir),
                timeout: spec.timeout_s.map(Duration::from_secs),
                container,
                redact: secrets.redactor(),
                process_limits: ProcessLimits {
                    memory_bytes: spec.resources.memory_bytes,
                    max_processes: policy.max_processes(),
                },
            },
            secrets,
            workdir,
        })
    }
}

/// The executor: a container (its image) when the run names an image and the node can run
/// containers; else a process, saying which image it ignores (fallback on), or an error.
fn choose_executor(
    image: Option<String>,
    node: &Node,
) -> Result<(Option<String>, Option<String>), PlanError> {
    match image {
        Some(image) if node.containers => Ok((Some(image), None)),
        Some(image) if node.process_fallback => Ok((None, Some(image))),
        Some(image) => Err(PlanError::NoContainers {
            image,
            reason: node
                .no_containers
                .clone()
                .unwrap_or_else(|| "unreachable".into()),
        }),
        None => Ok((None, None)),
    }
}

/// A rank's part in a multi-node MPI run in containers.
enum MpiRole {
    /// Not one.
    None,
    /// Rank 0: runs the launcher once every worker's container is up.
    Launcher(Gate),
    /// Ranks 1..: idle until the launcher's daemons are exec'd into them; watch rank 0.
    Worker(Worker),
}

/// Rank `rank`'s MPI role, given every rank's node; the ranks' agents reach each other's
/// exec listeners with the attempt's `secret`.
fn mpi_roles(peers: &[Peer], rank: u32, secret: Option<&str>) -> Result<MpiRole, PlanError> {
    let secret = secret.ok_or(PlanError::NoSecret)?;
    if let Some(p) = peers.iter().find(|p| p.exec_port.is_none()) {
        return Err(PlanError::NoExecPort {
            node: p.name.clone(),
        });
    }
    let worker = |rank: usize, p: &Peer| Worker {
        rank: rank as u32,
        name: p.name.clone(),
        target: format!("{}:{}", p.address, p.exec_port.unwrap_or_default()),
    };
    Ok(if rank > 0 {
        match peers.first() {
            Some(p) => MpiRole::Worker(worker(0, p)),
            None => MpiRole::None,
        }
    } else {
        MpiRole::Launcher(Gate {
            workers: peers
                .iter()
                .enumerate()
                .skip(1)
                .map(|(rank, p)| worker(rank, p))
                .collect(),
            secret: secret.to_string(),
        })
    })
}

/// The folders to make under `outputs/`: the job's declared outputs and a pipeline
/// step's, except those declared `uri_file` (the command writes that file itself).
fn output_folders(spec: &RunSpec, step_outputs: &[String]) -> Result<Vec<String>, PlanError> {
    let mut folders: std::collections::BTreeSet<String> = spec
        .outputs
        .iter()
        .filter(|(_, kind)| **kind == OutputKind::UriFolder)
        .map(|(name, _)| name.clone())
        .collect();
    folders.extend(
        step_outputs
            .iter()
            .filter(|o| !spec.outputs.contains_key(*o))
            .cloned(),
    );
    // The server validated them; a name that would leave outputs/ (or inputs/) is
    // refused anyway.
    for name in &folders {
        muster_core::names::validate_output_name(name)
            .map_err(|e| PlanError::Spec(format!("outputs.{name}: {e}")))?;
    }
    for name in spec
        .url_inputs
        .keys()
        .chain(spec.snapshot_inputs.keys())
        .chain(spec.host_inputs.keys())
        .chain(spec.download_inputs.iter())
    {
        muster_core::names::validate_input_name(name)
            .map_err(|e| PlanError::Spec(format!("inputs.{name}: {e}")))?;
    }
    Ok(folders.into_iter().collect())
}

/// `MUSTER_*` and Azure ML's names: who the run is, where its outputs and metrics go.
fn muster_env(
    a: &v1::Assignment,
    spec: &RunSpec,
    workspace: &str,
    ranks: usize,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("MUSTER_RUN_ID".into(), a.run_id.clone()),
        ("MUSTER_ATTEMPT".into(), a.attempt.to_string()),
        ("MUSTER_NODE_RANK".into(), a.rank.to_string()),
        ("MUSTER_NODE_COUNT".into(), ranks.max(1).to_string()),
        ("MUSTER_EXPERIMENT".into(), spec.experiment.clone()),
        ("MUSTER_OUTPUTS_DIR".into(), format!("{workspace}/outputs")),
        (
            "MUSTER_CHECKPOINT_DIR".into(),
            format!("{workspace}/{CHECKPOINT_DIR}"),
        ),
        (
            "MUSTER_RESUMED".into(),
            if a.resume.is_some() { "1" } else { "0" }.into(),
        ),
        ("AZUREML_RUN_ID".into(), a.run_id.clone()),
        (
            "MUSTER_METRICS_FILE".into(),
            crate::metrics::env_value(workspace),
        ),
    ];
    if a.attempt > 1 {
        env.push(("MUSTER_RESTARTED".into(), "1".into()));
    }
    env
}

/// GPUs: exactly the assigned ones are visible, by UUID (none when none were asked for:
/// `void`), except on the local target, which offers no limits. A container's runtime
/// reads `NVIDIA_VISIBLE_DEVICES`; a process is limited with `CUDA_VISIBLE_DEVICES`.
fn gpu_env(gpus: &[String], unlimited: bool, in_container: bool) -> Vec<(String, String)> {
    if gpus.is_empty() && unlimited {
        return Vec::new();
    }
    let visible = gpus.join(",");
    let nvidia = if gpus.is_empty() {
        "void".to_string()
    } else {
        visible.clone()
    };
    let mut env = vec![("NVIDIA_VISIBLE_DEVICES".to_string(), nvidia)];
    if !in_container {
        env.push(("CUDA_VISIBLE_DEVICES".into(), visible));
    }
    env
}

/// The container's labels: enough to re-adopt it after an agent restart.
fn labels(a: &v1::Assignment, node_id: &str, timeout_s: Option<u64>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("muster.run_id".to_string(), a.run_id.clone()),
        ("muster.attempt".to_string(), a.attempt.to_string()),
        ("muster.rank".to_string(), a.rank.to_string()),
        ("muster.node_id".to_string(), node_id.to_string()),
    ]);
    if let Some(t) = timeout_s {
        labels.insert("muster.timeout_s".into(), t.to_string());
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            id: "n1".into(),
            work_root: "/data/work".into(),
            containers: true,
            no_containers: None,
            process_fallback: false,
            gpu_device_requests: true,
            unlimited: false,
            rsh_helper: Some("/usr/bin/muster-rsh".into()),
        }
    }

    fn placement(name: &str, gpus: &[&str], exec_port: u32) -> v1::Placement {
        v1::Placement {
            node_id: format!("id-{name}"),
            node_name: name.into(),
            address: format!("10.0.0.{}", name.len()),
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
            resources: None,
            exec_port,
        }
    }

    fn assignment(image: Option<&str>) -> v1::Assignment {
        v1::Assignment {
            run_id: "r1".into(),
            attempt: 1,
            rank: 0,
            spec: Some(v1::RunSpec {
                command: "python train.py".into(),
                experiment: "exp".into(),
                image: image.map(str::to_string),
                ..Default::default()
            }),
            placements: vec![placement("a", &[], 0)],
            ..Default::default()
        }
    }

    fn env<'a>(plan: &'a AttemptPlan, name: &str) -> Option<&'a str> {
        plan.launch
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_process_sees_exactly_its_gpus_by_uuid() {
        let mut a = assignment(None);
        a.placements = vec![placement("a", &["GPU-1111", "GPU-2222"], 0)];
        let plan = AttemptPlan::from(&a, &node()).unwrap();
        assert_eq!(
            env(&plan, "CUDA_VISIBLE_DEVICES"),
            Some("GPU-1111,GPU-2222")
        );
        assert_eq!(
            env(&plan, "NVIDIA_VISIBLE_DEVICES"),
            Some("GPU-1111,GPU-2222")
        );
        assert!(plan.launch.container.is_none());
        assert_eq!(plan.workdir, Path::new("/data/work/r1.1"));
        assert_eq!(plan.launch.workdir, Path::new("/data/work/r1.1/code"));
        assert_eq!(
            plan.launch.log_path,
            Path::new("/data/work/r1.1/output.log")
        );
        assert_eq!(
            env(&plan, "MUSTER_OUTPUTS_DIR"),
            Some("/data/work/r1.1/code/outputs")
        );
        assert_eq!(env(&plan, "MUSTER_RUN_ID"), Some("r1"));
        assert_eq!(env(&plan, "MUSTER_NODE_COUNT"), Some("1"));
        assert_eq!(env(&plan, "MUSTER_RESTARTED"), None);
        assert_eq!(
            env(&plan, "MUSTER_CHECKPOINT_DIR"),
            Some("/data/work/r1.1/code/checkpoint")
        );
        assert_eq!(env(&plan, "MUSTER_RESUMED"), Some("0"));
        assert_eq!(plan.resume, None);
        assert!(plan.upload_checkpoint);
        assert_eq!(plan.checkpoint_every, None);
    }

    #[test]
    fn an_attempt_with_a_checkpoint_resumes_from_it_and_only_rank_0_uploads() {
        let mut a = assignment(Some("img:1"));
        a.attempt = 2;
        a.resume = Some(v1::Checkpoint {
            sha256: "c".repeat(64),
            attempt: 1,
            ..Default::default()
        });
        a.spec.as_mut().unwrap().checkpoint_interval_s = Some(600);
        let plan = AttemptPlan::from(&a, &node()).unwrap();
        assert_eq!(env(&plan, "MUSTER_RESUMED"), Some("1"));
        assert_eq!(
            env(&plan, "MUSTER_CHECKPOINT_DIR"),
            Some("/workspace/checkpoint")
        );
        assert_eq!(plan.resume, Some("c".repeat(64)));
        assert_eq!(plan.checkpoint_every, Some(Duration::from_secs(600)));
        a.rank = 1;
        a.placements = vec![placement("a", &[], 0), placement("b", &[], 1)];
        let plan = AttemptPlan::from(&a, &node()).unwrap();
        assert_eq!(
            env(&plan, "MUSTER_RESUMED"),
            Some("1"),
            "every rank reads it"
        );
        assert!(!plan.upload_checkpoint);
        assert_eq!(plan.checkpoint_every, None);
    }

    #[test]
    fn declared_folder_outputs_and_a_step_s_get_folders_and_a_file_output_none() {
        let mut a = assignment(None);
        let spec = a.spec.as_mut().unwrap();
        spec.outputs = [
            ("model".to_string(), "uri_folder".to_string()),
            ("report".to_string(), "uri_file".to_string()),
        ]
        .into();
        a.outputs = vec!["prepped".into(), "report".into()];
        let plan = AttemptPlan::from(&a, &node()).unwrap();
        assert_eq!(plan.output_folders, ["model", "prepped"]);
        a.outputs = vec!["../escape".into()];
        assert!(AttemptPlan::from(&a, &node()).is_err());
    }

    #[test]
    fn a_datastore_input_is_a_read_only_mount_in_a_container() {
        let mut a = assignment(Some("img:1"));
        a.spec.as_mut().unwrap().host_inputs =
            [("images".to_string(), "/mnt/nfs/imagenet".to_string())].into();
        let plan = AttemptPlan::from(&a, &node()).unwrap();
        let c = plan.launch.container.as_ref().unwrap();
        assert_eq!(
            c.read_only_mounts,
            [(
                PathBuf::from("/mnt/nfs/imagenet"),
                "/workspace/inputs/images".to_string()
            )]
        );
        assert_eq!(
            plan.host_inputs.get("images").map(String::as_str),
            Some("/mnt/nfs/imagenet")
        );
    }

    #[test]
    fn no_gpus_asked_hides_them_all_except_on_the_local_target() {
        let plan = AttemptPlan::from(&assignment(Some("img:1")), &node()).unwrap();
        assert_eq!(env(&plan, "NVIDIA_VISIBLE_DEVICES"), Some("void"));
        // A container's GPUs are the runtime's business: no CUDA_VISIBLE_DEVICES.
        assert_eq!(env(&plan, "CUDA_VISIBLE_DEVICES"), None);
        let local = Node {
            unlimited: true,
            ..node()
        };
        let plan = AttemptPlan::from(&assignment(None), &local).unwrap();
        assert_eq!(env(&plan, "NVIDIA_VISIBLE_DEVICES"), None);
        assert_eq!(env(&plan, "CUDA_VISIBLE_DEVICES"), None);
    }

    #[test]
    fn a_run_s_own_gpu_variables_are_dropped_and_the_policy_reaches_the_container() {
        let mut a = assignment(Some("img:1"));
        a.spec.as_mut().unwrap().environment_variables = [
            ("CUDA_VISIBLE_DEVICES".to_string(), "0,1".to_string()),
            ("NVIDIA_VISIBLE_DEVICES".to_string(), "all".to_string()),
            ("KEEP".to_string(), "me".to_string()),
        ]
        .into();
        let plan = AttemptPlan::from(&a, &node()).unwrap();
        assert_eq!(env(&plan, "NVIDIA_VISIBLE_DEVICES"), Some("void"));
        assert_eq!(env(&plan, "CUDA_VISIBLE_DEVICES"), None);
        assert_eq!(env(&plan, "KEEP"), Some("me"));
        assert_eq!(env(&plan, "HOME"), Some("/tmp"));
        let c = plan.launch.container.as_ref().unwrap();
        assert!(!c.allow_root);
        assert_eq!(c.max_processes, 4096);
        // A process: CUDA's list is the agent's (empty), not the run's.
        let mut p = a.clone();
        p.spec.as_mut().unwrap().image = None;
        let plan = AttemptPlan::from(&p, &node()).unwrap();
        assert_eq!(env(&plan, "CUDA_VISIBLE_DEVICES"), Some(""));
        assert_eq!(plan.launch.process_limits.max_processes, 4096);
        // The compute target allows root and a capability.
        a.run_policy = Some(v1::RunPolicy {
            allow_root: true,
            add_capabilities: vec!["net_bind_service".into()],
            max_processes: 64,
        });
        let plan = AttemptPlan::from(&a, &node()).unwrap();
        let c = plan.launch.container.as_ref().unwrap();
        assert!(c.allow_root);
        assert_eq!(c.add_capabilities, ["NET_BIND_SERVICE"]);
        assert_eq!(c.max_processes, 64);
        assert_eq!(env(&plan, "HOME"), None);
        a.run_policy.as_mut().unwrap().add_capabilities = vec!["EVERYTHING".into()];
        let e = AttemptPlan::from(&a, &node()).unwrap_err();
        assert!(e.to_string().contains("runs.add_capabilities"), "{e}");
    }

    #[test]
    fn a_container_gets_limits_labels_and_its_gpus() {
        let mut a = assignment(Some("img:1"));
        a.attempt = 2;
        a.placements = vec![placement("a", &["GPU-aaaa"], 0)];
        let spec = a.spec.as_mut().unwrap();
        spec.resources = Some(v1::Resources {
            cpu_millis: 1500,
            memory_bytes: 1 << 30,
            gpus: 1,
        });
        spec.timeout_s = Some(60);
        spec.environment_variables = [("MUSTER_EXPERIMENT".to_string(), "mine".to_string())].into();
        let plan = AttemptPlan::from(&a, &node()).unwrap();
        let c = plan.launch.container.as_ref().unwrap();
        assert_eq!(c.image, "img:1");
        assert_eq!(c.name, "muster-r1-2-0");
        assert_eq!((c.cpu_millis, c.memory_bytes), (1500, 1 << 30));
        assert_eq!(c.shm_size, DEFAULT_SHM);
        assert_eq!(c.gpus, ["GPU-aaaa"]);
        assert!(c.gpu_device_requests);
        assert!(!c.host_network);
        assert!(c.read_only_mounts.is_empty());
        assert_eq!(c.labels["muster.node_id"], "n1");
        assert_eq!(c.labels["muster.attempt"], "2");
        assert_eq!(c.labels["muster.timeout_s"], "60");
        assert_eq!(plan.launch.timeout, Some(Duration::from_secs(60)));
        assert_eq!(env(&plan, "NVIDIA_VISIBLE_DEVICES"), Some("GPU-aaaa"));
        assert_eq!(env(&plan, "MUSTER_OUTPUTS_DIR"), Some("/workspace/outputs"));
        assert_eq!(
            env(&plan, "MUSTER_METRICS_FILE"),
            Some("/workspace/logs/metrics.jsonl")
        );
        assert_eq!(env(&plan, "MUSTER_RESTARTED"), Some("1"));
        // The run's own variables come last, so they win.
        assert_eq!(env(&plan, "MUSTER_EXPERIMENT"), Some("mine"));
        assert_eq!(plan.exec_secret, None);
    }

    #[test]
    fn an_image_without_an_engine_fails_or_falls_back() {
        let no_engine = Node {
            containers: false,
            no_containers: Some("no Docker engine at unix:///x".into()),
            ..node()
        };
        let e = AttemptPlan::from(&assignment(Some("img:1")), &no_engine).unwrap_err();
        assert_eq!(
            e,
            PlanError::NoContainers {
                image: "img:1".into(),
                reason: "no Docker engine at unix:///x".into()
            }
        );
        assert!(e.to_string().contains("start dockerd"), "{e}");
        let fallback = Node {
            process_fallback: true,
            ..no_engine
        };
        let plan = AttemptPlan::from(&assignment(Some("img:1")), &fallback).unwrap();
        assert!(plan.launch.container.is_none());
        assert_eq!(plan.image_as_process.as_deref(), Some("img:1"));
    }

    fn mpi(rank: u32) -> v1::Assignment {
        let mut a = assignment(Some("mpi:1"));
        a.rank = rank;
        a.secret = "s3cret".into();
        a.master_port = 29600;
        a.placements = vec![
            placement("a", &[], 7001),
            placement("bb", &[], 7002),
            placement("ccc", &[], 7003),
        ];
        a.spec.as_mut().unwrap().distribution = Some(v1::Distribution {
            r#type: "mpi".into(),
            process_count_per_instance: 2,
            ..Default::default()
        });
        a
    }

    #[test]
    fn mpi_rank_zero_gates_on_its_workers() {
        let plan = AttemptPlan::from(&mpi(0), &node()).unwrap();
        let gate = plan.gate.as_ref().unwrap();
        assert_eq!(gate.secret, "s3cret");
        let targets: Vec<_> = gate
            .workers
            .iter()
            .map(|w| (w.rank, w.name.as_str(), w.target.as_str()))
            .collect();
        assert_eq!(
            targets,
            [(1, "bb", "10.0.0.2:7002"), (2, "ccc", "10.0.0.3:7003")]
        );
        assert!(plan.launcher.is_none());
        assert_eq!(plan.launch.command, "python train.py");
        assert_eq!(plan.exec_secret.as_deref(), Some("s3cret"));
        let hostfile = plan.hostfile.as_deref().unwrap();
        assert!(hostfile.contains("a slots=2"), "{hostfile}");
        assert_eq!(
            env(&plan, "OMPI_MCA_orte_default_hostfile"),
            Some("/workspace/.muster/hostfile")
        );
        assert_eq!(env(&plan, "MUSTER_NODE_COUNT"), Some("3"));
        let c = plan.launch.container.as_ref().unwrap();
        assert!(c.host_network);
        assert_eq!(
            c.read_only_mounts,
            [(PathBuf::from("/usr/bin/muster-rsh"), RSH_TARGET.to_string())]
        );
    }

    #[test]
    fn an_mpi_worker_idles_and_watches_the_launcher() {
        let plan = AttemptPlan::from(&mpi(2), &node()).unwrap();
        assert!(plan.gate.is_none());
        let launcher = plan.launcher.as_ref().unwrap();
        assert_eq!(
            (launcher.rank, launcher.target.as_str()),
            (0, "10.0.0.1:7001")
        );
        assert_eq!(plan.launch.command, format!("exec {RSH_TARGET} --idle"));
        assert_eq!(env(&plan, "MUSTER_NODE_RANK"), Some("2"));
    }

    #[test]
    fn multi_node_mpi_needs_a_helper_a_secret_and_exec_ports() {
        let no_helper = Node {
            rsh_helper: None,
            ..node()
        };
        assert_eq!(
            AttemptPlan::from(&mpi(0), &no_helper).unwrap_err(),
            PlanError::NoRshHelper
        );
        let mut a = mpi(0);
        a.secret.clear();
        assert_eq!(
            AttemptPlan::from(&a, &node()).unwrap_err(),
            PlanError::NoSecret
        );
        let mut a = mpi(1);
        a.placements[2].exec_port = 0;
        assert_eq!(
            AttemptPlan::from(&a, &node()).unwrap_err(),
            PlanError::NoExecPort { node: "ccc".into() }
        );
    }

    #[test]
    fn pytorch_ranks_learn_the_master_and_the_world() {
        let mut a = mpi(1);
        a.spec.as_mut().unwrap().distribution = Some(v1::Distribution {
            r#type: "pytorch".into(),
            process_count_per_instance: 1,
            ..Default::default()
        });
        let plan = AttemptPlan::from(&a, &node()).unwrap();
        assert_eq!(env(&plan, "MASTER_ADDR"), Some("10.0.0.1"));
        assert_eq!(env(&plan, "MASTER_PORT"), Some("29600"));
        assert_eq!(env(&plan, "WORLD_SIZE"), Some("3"));
        assert_eq!(env(&plan, "NODE_RANK"), Some("1"));
        assert!(plan.gate.is_none() && plan.launcher.is_none());
        assert!(plan.hostfile.is_none());
        // Distributed in a container: peers may still exec in with the secret.
        assert_eq!(plan.exec_secret.as_deref(), Some("s3cret"));
    }

    #[test]
    fn an_unknown_distribution_is_an_error_not_a_default() {
        let mut a = assignment(None);
        a.spec.as_mut().unwrap().distribution = Some(v1::Distribution {
            r#type: "horovod".into(),
            ..Default::default()
        });
        let e = AttemptPlan::from(&a, &node()).unwrap_err();
        assert!(matches!(e, PlanError::Spec(_)), "{e}");
        assert!(e.to_string().contains("horovod"), "{e}");
        a.spec = None;
        assert!(matches!(
            AttemptPlan::from(&a, &node()).unwrap_err(),
            PlanError::NoSpec { .. }
        ));
    }
}
