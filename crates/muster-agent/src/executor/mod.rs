//! Executors start an attempt's process and report how it ended. The process executor
//! runs in the node's own userland (the `local` target, Azure ML's user-managed
//! environment).

pub(crate) mod process;

use std::path::PathBuf;
use std::time::Duration;

use muster_core::AttemptEnd;

/// What to start.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    /// Run with `sh -c`.
    pub command: String,
    /// The working directory (the code snapshot, with `outputs/` and `logs/`).
    pub workdir: PathBuf,
    /// Variables added to the environment.
    pub env: Vec<(String, String)>,
    /// Combined stdout and stderr are appended here.
    pub log_path: PathBuf,
    /// `limits.timeout`.
    pub timeout: Option<Duration>,
}

/// Why an attempt is being stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// A user canceled the run.
    Canceled,
    /// The server no longer wants this attempt (fenced) or the agent is shutting down.
    Stale,
}

/// A stop order: why, and how long between SIGTERM and SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stop {
    pub reason: StopReason,
    pub grace: Duration,
}

/// How the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub end: AttemptEnd,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
}
