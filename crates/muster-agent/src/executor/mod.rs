//! Executors start an attempt's process and report how it ended.
//!
//! - `process`: `sh -c` in the node's own userland (the `local` target; Azure ML's
//!   user-managed environment).
//! - `docker`: a container per attempt through the Docker engine (bollard), labelled so a
//!   restarted agent re-adopts it.

pub mod docker;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use muster_core::AttemptEnd;

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

/// The outcome of a stop order, shared by the executors.
pub(crate) fn stopped(reason: StopReason, code: Option<i32>) -> Outcome {
    let (end, message) = match reason {
        StopReason::Canceled => (AttemptEnd::Canceled, "canceled"),
        StopReason::Preempted => (
            AttemptEnd::Preempted,
            "preempted by a higher-priority run; it restarts from scratch",
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
