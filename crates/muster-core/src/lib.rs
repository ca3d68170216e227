//! # muster-core: what muster decides
//!
//! Everything in this crate is pure: no I/O, no clocks, no randomness, no async runtime.
//! Time (`now`, in Unix milliseconds), ids and random seeds are chosen by the caller and
//! passed in, so every function here is deterministic and testable without a runtime.
//!
//! - [`names`]: the naming rules for compute targets and experiments.
//! - [`resources`]: CPU, memory and GPUs a node offers and a run asks for.
//! - [`distributed`]: the environment and MPI hostfile of each rank of a distributed run.
//! - [`compute`]: compute targets (`local`, `cluster`, `instance`, `attached`) and Azure ML compute YAML.
//! - [`sizes`]: what a target's `size` means (Azure VM sizes, `cpu=4,memory=16g,gpus=1`).
//! - [`spec`]: the run spec and Azure ML v2 command-job YAML parsing and validation.
//! - [`loglines`]: the combined, rank-prefixed log of a multi-instance attempt.
//! - [`snapshot`]: the manifest of a content-addressed code snapshot.
//! - [`state`]: the replicated state machine: [`Command`], [`State::apply`], [`State::sanity_check`].
//! - [`autoscale`](mod@autoscale): the autoscaler: `autoscale(&State, now)` decides which
//!   nodes each autoscaled compute target gains or loses.
//! - [`schedule`](mod@schedule): the scheduler: `schedule(&State, now) -> Schedule` (placements, preemptions,
//!   and why each waiting run waits).
//! - [`metrics`]: metric lines (`MUSTER_METRICS_FILE` JSON lines and `##muster[metric]` stdout
//!   lines) and per-metric series.
//! - [`sweep`]: hyperparameter sweeps: sweep YAML, samplers (random, grid, TPE),
//!   early-termination policies and the controller step.
//! - [`pipeline`]: pipeline jobs: YAML into a validated DAG, reuse keys and the planner.
//! - [`secrets`]: workspace secrets: the sealed form the state keeps (ChaCha20-Poly1305
//!   from `ring`), the table of them, and the log [`secrets::Redactor`].
//! - [`paging`]: paged listings (runs newest first from an index by submission number,
//!   sweeps, pipelines, nodes) and their page tokens.
//!
//! Crate choices: `serde` + `serde_json` for the versioned command encoding (readable in a
//! log dump, tagged enums so an old log replays on a newer server), `yaml_serde` for YAML
//! (serde_yaml is deprecated, serde_yml unsound) and `serde_path_to_error` to name the full
//! path of a bad or unknown key. `rand` + `rand_chacha` (ChaCha8, whose stream for a seed
//! is fixed across versions and platforms) for the sweep samplers, seeded by the caller;
//! `sha2` for pipeline reuse keys.

pub mod access;
pub mod attach;
pub mod autoscale;
mod component;
pub mod compute;
pub mod data;
pub mod distributed;
pub mod loglines;
pub mod metrics;
pub mod names;
pub mod node;
pub mod paging;
pub mod pipeline;
pub mod resources;
pub mod runconfig;
pub mod schedule;
pub mod secrets;
pub mod sizes;
pub mod snapshot;
pub mod spec;
pub mod state;
pub mod sweep;

pub use autoscale::{ScaleDecision, autoscale};
pub use compute::{ComputeKind, ComputeSpec, Provisioner, Quota, QuotaUsage, Tier};
pub use resources::{Capacity, Gpu, Resources};
pub use schedule::{Decision, Placement, Schedule, Waiting, schedule};
pub use spec::RunSpec;
pub use state::{
    Applied, ApplyError, Attempt, AttemptEnd, AttemptReport, AttemptState, Command, Node,
    NodeState, Run, RunState, State,
};

/// Unix time in milliseconds, as chosen by the proposer of a command.
pub type Millis = u64;
