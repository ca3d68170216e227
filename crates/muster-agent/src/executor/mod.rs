//! Executors start an attempt's process and report how it ended, behind one trait,
//! [`Executor`]: `run` a [`Launch`] (what `plan.rs` decided) until it ends, list what
//! survived an agent restart (`managed`) and `adopt` it. Stop orders reach a running
//! attempt through its [`StopOrders`] channel (the session, a cancel, a preemption, or an
//! MPI release all send on it), so every executor stops the same way.
//!
//! - `process`: `sh -c` in the node's own userland (the `local` target; Azure ML's
//!   user-managed environment). Nothing to re-adopt: a process dies with its agent.
//! - `docker`: a container per attempt through the Docker engine (bollard), labelled so a
//!   restarted agent re-adopts it.
//!
//! muster-testkit has a fake that records launches and lets a test end them.

pub mod confine;
pub mod docker;
pub mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use muster_core::AttemptEnd;
use tokio::sync::{oneshot, watch};

pub use docker::DockerError;

/// The stop orders of one attempt: `None` until someone orders it to stop.
pub type StopOrders = watch::Receiver<Option<Stop>>;

/// Runs attempts on this node.
///
/// Object-safe (the agent holds `Arc<dyn Executor>`, tests give it a fake), so the async
/// methods return boxed futures.
pub trait Executor: Send + Sync + std::fmt::Debug {
    /// What it runs in, for logs: `docker`, `process`, `fake`.
    fn kind(&self) -> &'static str;

    /// Runs `launch` until it exits, an order on `stop` stops it, or `launch.timeout`
    /// passes; `started` fires once the command runs. Never fails: a failure to start is
    /// an [`Outcome`] with [`AttemptEnd::Failed`] and the reason.
    fn run(
        &self,
        launch: Launch,
        stop: StopOrders,
        started: oneshot::Sender<()>,
    ) -> BoxFuture<'_, Outcome>;

    /// What this executor started for node `node_id` before the agent restarted and still
    /// holds (running or exited, not yet cleaned up).
    fn managed<'a>(
        &'a self,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Managed>, ExecutorError>>;

    /// Follows one of [`managed`](Self::managed)'s results to its end as `run` does,
    /// appending its output to `log_path` without repeating what the file holds.
    fn adopt<'a>(
        &'a self,
        managed: &'a Managed,
        log_path: &'a Path,
        stop: StopOrders,
    ) -> BoxFuture<'a, Outcome>;
}

/// Why an executor could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The Docker engine refused or is gone.
    #[error(transparent)]
    Docker(#[from] DockerError),
}

/// Something an executor started before the agent restarted (see [`Executor::managed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Managed {
    /// The executor's id for it (the container id).
    pub id: String,
    /// Its run (label `muster.run_id`).
    pub run_id: String,
    /// Its attempt number (label `muster.attempt`; 0 if missing or malformed).
    pub attempt: u32,
    /// Its node rank (label `muster.rank`; 0 if missing or malformed).
    pub rank: u32,
    /// Whether it is still running (false: exited, or created and never started).
    pub running: bool,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Run with `sh -c`.
    pub command: String,
    /// Host path of the working directory: the code snapshot, with `outputs/` and `logs/` in it.
    pub workdir: PathBuf,
    /// Variables added to the environment.
    pub env: Vec<(String, String)>,
    /// Combined stdout and stderr are appended here (also image-pull progress).
    pub log_path: PathBuf,
    /// `limits.timeout`.
    pub timeout: Option<Duration>,
    /// Run in a container (the Docker executor); `None` for the process executor.
    pub container: Option<ContainerSpec>,
    /// The values of the run's secrets, replaced with `***` in the log as it is written
    /// (`crate::secrets`); empty for a run without secrets.
    pub redact: muster_core::secrets::Redactor,
    /// The limits of a process run under `muster agent --run-as` (rlimits).
    pub process_limits: ProcessLimits,
}

/// What a process run under `muster agent --run-as` may use (set as rlimits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessLimits {
    /// The run's memory request in bytes, its data segment's limit (`RLIMIT_DATA`; 0: none).
    pub memory_bytes: u64,
    /// The most processes the run user holds (`RLIMIT_NPROC`, per user; 0: none).
    pub max_processes: u32,
}

/// The container-specific part of a launch.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// The image reference.
    pub image: String,
    /// The container name (`muster-<run>-<attempt>-<rank>`).
    pub name: String,
    /// Labels: `muster.run_id`, `muster.attempt`, `muster.rank`, `muster.node_id`, and
    /// `muster.timeout_s` when the run has a timeout (so an adopted container keeps it).
    pub labels: BTreeMap<String, String>,
    /// CPU limit in millicores (0: none).
    pub cpu_millis: u64,
    /// Memory limit in bytes (0: none).
    pub memory_bytes: u64,
    /// /dev/shm size in bytes.
    pub shm_size: u64,
    /// GPUs by UUID (also given as `NVIDIA_VISIBLE_DEVICES` in `Launch::env`).
    pub gpus: Vec<String>,
    /// Ask the engine for the GPUs with an NVIDIA device request (false for fake GPUs).
    pub gpu_device_requests: bool,
    /// Share the node's network (distributed runs: ranks reach each other at their nodes'
    /// addresses, as with Azure ML's distributed jobs).
    pub host_network: bool,
    /// Extra read-only bind mounts: (host path, path in the container), e.g. the rsh helper.
    pub read_only_mounts: Vec<(PathBuf, String)>,
    /// Writable bind mounts inside the read-only workspace: (host path, path in the
    /// container), e.g. an input in `mode: download`.
    pub writable_mounts: Vec<(PathBuf, String)>,
    /// Run as the image's user (often root) instead of a non-root one: the compute
    /// target's `runs.allow_root`.
    pub allow_root: bool,
    /// Capabilities added back after all are dropped: the compute target's
    /// `runs.add_capabilities`.
    pub add_capabilities: Vec<String>,
    /// The most processes the container holds (0: [`muster_core::compute::DEFAULT_MAX_PROCESSES`]).
    pub max_processes: u32,
}

/// Why an attempt is being stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A user canceled the run.
    Canceled,
    /// A higher-priority run needs the resources; the run restarts later as a new attempt.
    Preempted,
    /// The server no longer wants this attempt (fenced) or the agent is shutting down.
    Stale,
    /// An MPI worker's idle container is no longer needed: the launcher on rank 0 finished.
    /// The rank ends as completed.
    Released,
}

/// A stop order: why, and how long between SIGTERM and SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    /// Why.
    pub reason: StopReason,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
}

/// How the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// How.
    pub end: AttemptEnd,
    /// The exit code, when there was a process.
    pub exit_code: Option<i32>,
    /// Why, in words.
    pub message: Option<String>,
}

/// The outcome of a stop order, shared by the executors (and muster-testkit's fake).
pub fn stopped(reason: StopReason, code: Option<i32>) -> Outcome {
    let (end, message) = match reason {
        StopReason::Canceled => (AttemptEnd::Canceled, "canceled"),
        StopReason::Preempted => (
            AttemptEnd::Preempted,
            "preempted by a higher-priority run; it restarts as a new attempt",
        ),
        StopReason::Stale => (
            AttemptEnd::Canceled,
            "stopped: the attempt is no longer current",
        ),
        StopReason::Released => {
            return Outcome {
                end: AttemptEnd::Completed,
                exit_code: Some(0),
                message: Some("released: the MPI launcher on rank 0 finished".into()),
            };
        }
    };
    Outcome {
        end,
        exit_code: code,
        message: Some(message.into()),
    }
}
