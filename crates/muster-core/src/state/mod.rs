//! The replicated state machine (DESIGN.md section 4).
//!
//! Every change to cluster state is a [`Command`] appended to the Raft log and applied by
//! [`State::apply`] on every server in log order. `apply` is deterministic: it reads no
//! clock (times travel inside commands), uses no randomness and iterates only ordered
//! maps. A rejected command changes nothing.
//!
//! ## Preemption, as the server carries it out
//!
//! The scheduler decides that a running attempt must make room for a higher-priority run
//! ([`crate::Decision::Preempt`]); the leader proposes it as [`Command::PreemptAttempt`].
//! Applying it sets [`Run::preempt_requested`] (and [`Attempt::preempted_for`]). The
//! attempt keeps its nodes, GPUs and quota until its agents report its end:
//!
//! - an agent session must stop every attempt placed on its node whose run has
//!   `preempt_requested.is_some()`, exactly as it does for `cancel_requested` (SIGTERM, the
//!   grace period, SIGKILL), with reason `preempted`;
//! - whatever end the agent then reports (even exit 0 after SIGTERM), `apply` records it as
//!   [`AttemptEnd::Preempted`], releases the resources and requeues the run as a new
//!   attempt (with backoff, within `max_attempts`); `preempt_requested` goes back to `None`.
//!
//! A cancel that arrives meanwhile wins: the run ends Canceled.

mod apply;
mod archive;
mod check;
mod checkpoint;
mod command;
mod error;
mod pipeline;
mod sweep;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use serde::{Deserialize, Serialize};

#[cfg(test)]
pub(crate) use apply::live_node_count;
pub use apply::{MAX_SERVER_ADDRESS_LEN, validate_server_address};
pub use archive::{ARCHIVE_FORMAT, MAX_ARCHIVE_RUNS, RunArchive, decode_archive, encode_archive};
pub use checkpoint::{Checkpoint, CheckpointCause, human_bytes};
pub use command::{Applied, AttemptReport, Command, ProvisionOutcome};
pub use error::{ApplyError, PipelineRule, SealedBlob, SweepRule};
pub use pipeline::{Pipeline, PipelineFinish, StepRecord};
pub use sweep::{Sweep, SweepFinish, Trial};

use crate::Millis;
use crate::compute::{ComputeSpec, QuotaUsage, Tier};
use crate::resources::{Capacity, Resources};
use crate::schedule::Placement;
use crate::spec::RunSpec;

/// A compute target as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeTarget {
    /// Its definition.
    pub spec: ComputeSpec,
    /// When it was created.
    pub created_at: Millis,
}

/// A node's standing with the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Takes new runs.
    Ready,
    /// Takes no new runs; running ones finish.
    Draining,
    /// Missed heartbeats past the grace period; its attempts were requeued.
    Lost,
    /// Reclaimed or evicted; its attempts were requeued.
    Evicted,
}

impl NodeState {
    /// The lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Lost => "lost",
            NodeState::Evicted => "evicted",
        }
    }
}

/// One machine running `muster agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Stable id, kept in the agent's data dir.
    pub id: String,
    /// Unique name (default: the hostname).
    pub name: String,
    /// The compute target it belongs to.
    pub compute: String,
    /// What it offers.
    pub capacity: Capacity,
    /// Labels for placement constraints.
    pub labels: BTreeMap<String, String>,
    /// Dedicated or low-priority.
    pub tier: Tier,
    /// The address peers of a distributed run use to reach it.
    pub address: String,
    /// Its standing.
    pub state: NodeState,
    /// Why it is in that state (for lost/evicted/draining).
    pub state_reason: Option<String>,
    /// First registration.
    pub registered_at: Millis,
    /// Last change of state or registration.
    pub updated_at: Millis,
    /// Sum of the resources of the active attempts placed here.
    pub allocated: Resources,
    /// GPUs held by active attempts.
    pub allocated_gpus: BTreeSet<String>,
    /// Active attempts placed here: (run id, attempt number).
    pub attempts: BTreeSet<(String, u32)>,
    /// Since when it has had no active attempt (set at registration and whenever its last
    /// attempt ends, cleared by a placement); what the autoscaler's idle time counts from.
    /// `None` in states written before autoscaling existed: then `updated_at` counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<Millis>,
}

impl Node {
    /// Since when the node has been idle (nothing active placed on it), if it is.
    pub fn idle_since(&self) -> Option<Millis> {
        if !self.attempts.is_empty() {
            return None;
        }
        Some(self.idle_since.unwrap_or(self.updated_at))
    }
}

/// How many entries [`Scaling::history`] keeps (the oldest go first).
pub const SCALE_HISTORY: usize = 20;

/// What the autoscaler asked of one compute target's provisioner, and what it did: the
/// nodes it owns and the last actions. Replicated, so a new leader neither provisions a
/// node twice nor forgets one (its provisioner reconciles against this).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scaling {
    /// The nodes the autoscaler requested and has not yet seen released, by node name.
    pub nodes: BTreeMap<String, ProvisionedNode>,
    /// The number in the next requested node's name (`muster-<compute>-<n>`).
    pub next_index: u64,
    /// The last scale decisions and provisioner outcomes, oldest first (at most
    /// [`SCALE_HISTORY`]).
    pub history: Vec<ScaleEvent>,
    /// The target was deleted while the autoscaler had nodes: they are being released,
    /// it takes no runs and no scale decisions, and it is removed with its last node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

/// A node the autoscaler requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionedNode {
    /// Where the provisioner is with it.
    pub phase: ProvisionPhase,
    /// When it was requested.
    pub requested_at: Millis,
    /// When its release was decided.
    pub releasing_since: Option<Millis>,
}

/// Where a provisioner is with one requested node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProvisionPhase {
    /// Decided; the provisioner has not reported starting it.
    Requested,
    /// The provisioner started it; its agent registers as a node of the same name.
    Launched,
    /// Decided to go: drained, to be stopped by the provisioner and then removed.
    Releasing,
}

impl ProvisionPhase {
    /// The lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            ProvisionPhase::Requested => "requested",
            ProvisionPhase::Launched => "launched",
            ProvisionPhase::Releasing => "releasing",
        }
    }
}

/// One entry of [`Scaling::history`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleEvent {
    /// When.
    pub at: Millis,
    /// `scale_up`, `scale_down`, `launched`, `released` or `failed`.
    pub action: String,
    /// The nodes concerned.
    pub nodes: Vec<String>,
    /// Why, or what went wrong.
    pub message: String,
}

/// The state of a run (DESIGN.md section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waiting for placement.
    Queued,
    /// Placed; the agents have not started it yet.
    Scheduled,
    /// Agents are fetching code/images.
    Preparing,
    /// Its process is running.
    Running,
    /// Exited 0.
    Completed,
    /// Exited non-zero, could not start, or ran out of attempts.
    Failed,
    /// Canceled by a user.
    Canceled,
    /// Ran past `limits.timeout`.
    TimedOut,
}

impl RunState {
    /// Completed, Failed, Canceled or TimedOut.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Completed | RunState::Failed | RunState::Canceled | RunState::TimedOut
        )
    }

    /// Scheduled, Preparing or Running: an attempt holds resources.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            RunState::Scheduled | RunState::Preparing | RunState::Running
        )
    }

    /// The lowercase name used in flags and output.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Scheduled => "scheduled",
            RunState::Preparing => "preparing",
            RunState::Running => "running",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
            RunState::Canceled => "canceled",
            RunState::TimedOut => "timed_out",
        }
    }

    /// Parses a state name (case-insensitive; `timedout` and `cancelled` accepted).
    pub fn parse(s: &str) -> Result<RunState, String> {
        Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "queued" => RunState::Queued,
            "scheduled" => RunState::Scheduled,
            "preparing" => RunState::Preparing,
            "running" => RunState::Running,
            "completed" => RunState::Completed,
            "failed" => RunState::Failed,
            "canceled" | "cancelled" => RunState::Canceled,
            "timed_out" | "timedout" => RunState::TimedOut,
            other => {
                return Err(format!(
                    "unknown run state {other:?}: use queued, scheduled, preparing, running, completed, failed, canceled or timed_out"
                ));
            }
        })
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptEnd {
    /// Exit code 0.
    Completed,
    /// Non-zero exit, OOM kill, or failure to start.
    Failed,
    /// Stopped on a user's request.
    Canceled,
    /// Stopped at `limits.timeout`.
    TimedOut,
    /// Stopped to make room for a higher-priority run; the run gets a new attempt.
    Preempted,
    /// Its node was lost or evicted; the run gets a new attempt.
    NodeLost,
}

impl AttemptEnd {
    /// Whether the run is requeued as a new attempt after this end.
    pub fn restarts(self) -> bool {
        matches!(self, AttemptEnd::Preempted | AttemptEnd::NodeLost)
    }

    /// The lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptEnd::Completed => "completed",
            AttemptEnd::Failed => "failed",
            AttemptEnd::Canceled => "canceled",
            AttemptEnd::TimedOut => "timed_out",
            AttemptEnd::Preempted => "preempted",
            AttemptEnd::NodeLost => "node_lost",
        }
    }
}

/// Where an attempt is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptState {
    /// Placed, not yet started.
    Scheduled,
    /// Preparing (code, image).
    Preparing,
    /// Running.
    Running,
    /// Over.
    Ended(AttemptEnd),
}

/// How one rank (one node) of an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankEnd {
    /// How it ended.
    pub end: AttemptEnd,
    /// Its exit code, if its process exited.
    pub exit_code: Option<i32>,
}

/// One execution of a run, on one node per instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based.
    pub number: u32,
    /// Where each rank runs, rank order.
    pub placements: Vec<Placement>,
    /// Where it is.
    pub state: AttemptState,
    /// When it was placed.
    pub placed_at: Millis,
    /// When its first rank started running.
    pub started_at: Option<Millis>,
    /// When it ended.
    pub finished_at: Option<Millis>,
    /// The exit code (rank 0's, or the first failing rank's).
    pub exit_code: Option<i32>,
    /// Why it ended as it did.
    pub message: Option<String>,
    /// How each rank ended so far.
    pub rank_ends: BTreeMap<u32, RankEnd>,
    /// SHA-256 of the outputs archive (rank 0's), when uploaded.
    pub outputs: Option<String>,
    /// The higher-priority run this attempt was preempted for, once a `PreemptAttempt`
    /// was applied to it (kept after the attempt ends, as history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempted_for: Option<String>,
    /// The port rank 0 listens on for its peers (`MASTER_PORT`; every rank's port for
    /// TensorFlow), chosen when the attempt is placed so that no two active attempts that
    /// share a node use the same one (see [`crate::distributed::choose_master_port`]).
    /// Set for distributed attempts (more than one instance, or a `distribution`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_port: Option<u16>,
    /// The secret the ranks of a multi-node attempt present to each other's agents (from
    /// `PlaceRun`; kept only when the run has more than one instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The sealed log of each rank that ended, by rank: its combined stdout/stderr, in the
    /// blob store (on a majority of servers), so any server can serve it once the server
    /// that took it from the agent is gone. Recorded by [`Command::SealLog`] before the
    /// rank's end is proposed; absent in states written before logs were sealed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub logs: BTreeMap<u32, SealedLog>,
    /// The run's metrics as they stood when this attempt ended, sealed in the blob store
    /// (recorded by [`Command::SealMetrics`] before the rank's end is proposed); absent
    /// when none were logged or in states written before metrics were sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SealedMetrics>,
    /// The run's checkpoint when this attempt was placed, which its agent restores into
    /// `MUSTER_CHECKPOINT_DIR` before the command starts (`MUSTER_RESUMED=1`); `None` on a
    /// first attempt or when no checkpoint was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<Checkpoint>,
}

/// A run's metrics log, sealed into the content-addressed blob store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedMetrics {
    /// SHA-256 of the encoded metrics (its blob address).
    pub sha256: String,
    /// Its length in bytes.
    pub bytes: u64,
    /// Lines it accounts for: points plus malformed lines.
    pub lines: u64,
}

/// A rank's complete log, sealed into the content-addressed blob store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedLog {
    /// SHA-256 of the log's bytes (its blob address).
    pub sha256: String,
    /// Its length in bytes.
    pub bytes: u64,
}

/// One submission of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Stable id, chosen by the proposer.
    pub id: String,
    /// Submission order (ties in priority go to the earlier submission).
    pub seq: u64,
    /// What to run.
    pub spec: RunSpec,
    /// Where it is.
    pub state: RunState,
    /// When it was submitted.
    pub created_at: Millis,
    /// When its first attempt started running.
    pub started_at: Option<Millis>,
    /// When it reached a terminal state.
    pub finished_at: Option<Millis>,
    /// Exit code of the last attempt.
    pub exit_code: Option<i32>,
    /// Why it is in its state (a failure, a cancel, a wait).
    pub message: Option<String>,
    /// A user asked to cancel it; its agents are stopping it.
    pub cancel_requested: bool,
    /// Its current attempt is being preempted for this higher-priority run: its agents must
    /// stop it (as for `cancel_requested`); its end, however reported, is recorded as
    /// [`AttemptEnd::Preempted`] and the run is requeued. `None` again once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempt_requested: Option<String>,
    /// Earliest time a requeued run may be placed again (backoff).
    pub not_before: Option<Millis>,
    /// The attempts, oldest first.
    pub attempts: Vec<Attempt>,
    /// The client's idempotency key, if it gave one.
    pub idempotency_key: Option<String>,
    /// Its latest checkpoint (`state/checkpoint.rs`), which its next attempt resumes from;
    /// absent before one was recorded (and in states written before checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

impl Run {
    /// Whether blob `sha256` belongs to this run: its code snapshot's manifest, or an
    /// attempt's outputs archive, sealed log or sealed metrics. A user may download a blob
    /// only through a run of a workspace they may read (muster-server's BlobService).
    pub fn references_blob(&self, sha256: &str) -> bool {
        self.spec
            .code
            .as_ref()
            .is_some_and(|c| c.manifest == sha256)
            || self.spec.snapshot_inputs.values().any(|m| m == sha256)
            || self.attempts.iter().any(|a| {
                a.outputs.as_deref() == Some(sha256)
                    || a.logs.values().any(|l| l.sha256 == sha256)
                    || a.metrics.as_ref().is_some_and(|m| m.sha256 == sha256)
                    || a.resumed_from.as_ref().is_some_and(|c| c.sha256 == sha256)
            })
            || self.checkpoint.as_ref().is_some_and(|c| c.sha256 == sha256)
    }

    /// The latest attempt, if any.
    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// The number of the latest attempt (0 before the first placement).
    pub fn attempt_number(&self) -> u32 {
        self.attempts.len() as u32
    }
}

/// A waiting run's place in the queue: higher priority first, then submission order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueKey {
    /// Negated priority, so that ascending order is highest priority first.
    pub neg_priority: i64,
    /// Submission order.
    pub seq: u64,
    /// The run.
    pub run_id: String,
    /// Its compute target (never decides the order: `run_id` is unique), so the scheduler
    /// can skip runs of targets with no free node without looking them up.
    pub compute: String,
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Compute targets by name.
    pub computes: BTreeMap<String, ComputeTarget>,
    /// Nodes by id.
    pub nodes: BTreeMap<String, Node>,
    /// Runs by id.
    pub runs: BTreeMap<String, Run>,
    /// Queued runs in placement order.
    pub queue: BTreeSet<QueueKey>,
    /// Idempotency key → run id.
    pub idempotency: BTreeMap<String, String>,
    /// The next submission's sequence number.
    pub next_seq: u64,
    /// Where each coordinator server is reached by the others: server id → `host:port`
    /// ([`Command::SetServerAddress`], [`Command::RemoveServerAddress`]). Servers read their
    /// peers' addresses from here; absent in states written before addresses were replicated.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub servers: BTreeMap<u64, String>,
    /// What the autoscaler asked of each autoscaled compute target, by compute name.
    /// Absent in states written before autoscaling existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scaling: BTreeMap<String, Scaling>,
    /// Sweeps by id (absent from snapshots taken before sweeps existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sweeps: BTreeMap<String, Sweep>,
    /// Pipelines by id (absent from snapshots taken before pipelines existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pipelines: BTreeMap<String, Pipeline>,
    /// Tokens, workspaces, grants and the audit log (absent from snapshots taken before
    /// access control existed).
    #[serde(default, skip_serializing_if = "crate::access::Access::is_empty")]
    pub access: crate::access::Access,
    /// Where retention put the finished runs it removed, oldest first (`state/archive.rs`;
    /// absent from snapshots taken before retention existed, or with nothing archived).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub archives: Vec<RunArchive>,
    /// Data assets by `WORKSPACE/NAME`, each name's versions oldest first (`data.rs`;
    /// absent from snapshots taken before data assets existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data_assets: BTreeMap<String, Vec<crate::data::DataAsset>>,
    /// Datastores by `WORKSPACE/NAME` (`data.rs`; absent from older snapshots).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub datastores: BTreeMap<String, crate::data::Datastore>,
    /// Registered components by `WORKSPACE/NAME`, versions oldest first (absent from
    /// older snapshots).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, Vec<crate::data::Component>>,
    /// A summary of the active runs of each compute target: what they hold against its
    /// quota, their priorities, how many are being preempted. Derived from `runs`: kept up
    /// to date by `apply`, rebuilt by [`State::from_snapshot`], never serialized, and
    /// ignored by `==` (`sanity_check` compares it with a recount).
    #[serde(skip)]
    active: Derived<BTreeMap<String, ActiveSummary>>,
    /// The queue again, per compute target, with what the scheduler needs of each run
    /// beside its key, so that a pass reads it in order without looking every run up.
    /// Derived like `active`.
    #[serde(skip)]
    queued: Derived<BTreeMap<String, BTreeMap<QueueKey, Queued>>>,
    /// Every run's id by its submission number ([`Run::seq`]): the order listings page in,
    /// newest first ([`State::runs_newest_first`]), so that a page reads only the runs on
    /// it instead of sorting every run. Derived like `active`: kept by `apply`, rebuilt by
    /// [`State::from_snapshot`], never serialized (snapshots are as they were before it).
    #[serde(skip)]
    by_seq: Derived<BTreeMap<u64, String>>,
}

/// What the active runs of one compute target hold and are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ActiveSummary {
    /// What they hold against the quota.
    pub usage: QuotaUsage,
    /// How many have each priority.
    pub priorities: BTreeMap<i32, u32>,
    /// How many are being preempted.
    pub preempting: u32,
    /// Their current attempts, by run submission number: what preemption planning reads,
    /// without looking up each run by id (thousands of lookups in a map of every run ever
    /// submitted cost more than the rest of a scheduling pass).
    pub attempts: BTreeMap<u64, ActiveAttempt>,
}

/// An active run's current attempt, as the scheduler needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ActiveAttempt {
    /// The run.
    pub run_id: String,
    /// The attempt's number.
    pub attempt: u32,
    /// The run's priority.
    pub priority: i32,
    /// Per instance: the node, the GPUs it holds, what it holds in all.
    pub placements: Vec<(String, u64, Resources)>,
    /// What it holds against the quota.
    pub usage: QuotaUsage,
    /// The run is being canceled or preempted: its attempt is stopping.
    pub stopping: bool,
    /// The run it is being preempted for.
    pub preempted_for: Option<String>,
}

impl ActiveSummary {
    /// Counts in the active run `run` (its current attempt).
    pub(crate) fn add(&mut self, run: &Run) {
        let Some(a) = run.current_attempt() else {
            return;
        };
        let usage = attempt_usage(a);
        self.usage.add(&usage);
        *self.priorities.entry(run.spec.priority).or_default() += 1;
        if run.preempt_requested.is_some() {
            self.preempting += 1;
        }
        self.attempts.insert(
            run.seq,
            ActiveAttempt {
                run_id: run.id.clone(),
                attempt: a.number,
                priority: run.spec.priority,
                placements: a
                    .placements
                    .iter()
                    .map(|p| (p.node_id.clone(), p.gpus.len() as u64, p.resources))
                    .collect(),
                usage,
                stopping: run.cancel_requested || run.preempt_requested.is_some(),
                preempted_for: run.preempt_requested.clone(),
            },
        );
    }

    /// Counts out the run with submission number `seq`; true when none is left.
    pub(crate) fn remove(&mut self, seq: u64) -> bool {
        if let Some(a) = self.attempts.remove(&seq) {
            self.usage.sub(&a.usage);
            if let Some(n) = self.priorities.get_mut(&a.priority) {
                *n -= 1;
                if *n == 0 {
                    self.priorities.remove(&a.priority);
                }
            }
            if a.preempted_for.is_some() {
                self.preempting -= 1;
            }
        }
        self.attempts.is_empty()
    }

    /// Marks the attempt of run `seq` as stopping, for `preempted_for` if it is preempted.
    pub(crate) fn stopping(&mut self, seq: u64, preempted_for: Option<&str>) {
        if let Some(a) = self.attempts.get_mut(&seq) {
            a.stopping = true;
            if let Some(p) = preempted_for
                && a.preempted_for.is_none()
            {
                a.preempted_for = Some(p.to_string());
                self.preempting += 1;
            }
        }
    }
}

/// What the scheduler needs of a queued run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Queued {
    /// One instance's request.
    pub resources: Resources,
    /// Instances (nodes).
    pub instance_count: u32,
    /// Its priority.
    pub priority: i32,
    /// Backoff.
    pub not_before: Option<Millis>,
    /// The attempt a placement starts.
    pub next_attempt: u32,
    /// It has a node selector (read from the run).
    pub selective: bool,
}

impl Queued {
    pub(crate) fn of(run: &Run) -> Queued {
        Queued {
            resources: run.spec.resources,
            instance_count: run.spec.instance_count,
            priority: run.spec.priority,
            not_before: run.not_before,
            next_attempt: run.attempt_number() + 1,
            selective: !run.spec.node_selector.is_empty(),
        }
    }
}

/// A cache derived from the rest of the state: equal to any other, so it never makes two
/// states with the same contents differ.
#[derive(Debug, Clone, Default)]
pub(crate) struct Derived<T>(pub(crate) T);

impl<T> PartialEq for Derived<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Derived<T> {}

impl State {
    /// The blobs the state refers to, as (snapshot manifests, other blobs): runs' code
    /// and uploaded inputs (manifests), their attempts' outputs, sealed logs and metrics,
    /// data assets' snapshots (manifests) and registered outputs, components' code
    /// (manifests), retention archives. A manifest's files are named inside it. What a
    /// backup must hold (muster-server's `backup`).
    pub fn referenced_blobs(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut manifests = BTreeSet::new();
        let mut blobs = BTreeSet::new();
        for run in self.runs.values() {
            manifests.extend(run.spec.code.iter().map(|c| c.manifest.clone()));
            manifests.extend(run.spec.snapshot_inputs.values().cloned());
            for a in &run.attempts {
                blobs.extend(a.outputs.iter().cloned());
                blobs.extend(a.logs.values().map(|l| l.sha256.clone()));
                blobs.extend(a.metrics.iter().map(|m| m.sha256.clone()));
                blobs.extend(a.resumed_from.iter().map(|c| c.sha256.clone()));
            }
            blobs.extend(run.checkpoint.iter().map(|c| c.sha256.clone()));
        }
        for asset in self.data_assets.values().flatten() {
            match &asset.source {
                crate::data::DataSource::Snapshot { manifest, .. } => {
                    manifests.insert(manifest.clone());
                }
                crate::data::DataSource::Output { archive, .. } => {
                    blobs.insert(archive.clone());
                }
                crate::data::DataSource::Url { .. } => {}
            }
        }
        manifests.extend(
            self.components
                .values()
                .flatten()
                .filter_map(|c| c.code.clone()),
        );
        blobs.extend(self.archives.iter().map(|a| a.sha256.clone()));
        (manifests, blobs)
    }

    /// Decodes a snapshot produced by [`State::to_snapshot`].
    pub fn from_snapshot(bytes: &[u8]) -> Result<State, String> {
        let mut state: State =
            serde_json::from_slice(bytes).map_err(|e| format!("state snapshot is corrupt: {e}"))?;
        state.active.0 = state.summarize_active();
        state.queued.0 = state.summarize_queue();
        state.by_seq.0 = state.index_by_seq();
        Ok(state)
    }

    /// Rebuilds the index of the runs by submission number (what `by_seq` must equal).
    pub(crate) fn index_by_seq(&self) -> BTreeMap<u64, String> {
        self.runs.values().map(|r| (r.seq, r.id.clone())).collect()
    }

    /// The runs submitted before submission number `before` (every run without it), newest
    /// first (descending [`Run::seq`]). Read from the index by submission number: taking
    /// the first N looks at N runs, whatever the state holds.
    ///
    /// A state whose `runs` were edited outside [`State::apply`] (tests do) may not match
    /// its index; then the runs are sorted here instead, so the order is right either way.
    pub fn runs_newest_first(&self, before: Option<u64>) -> Box<dyn Iterator<Item = &Run> + '_> {
        let end = before.map_or(Bound::Unbounded, Bound::Excluded);
        if self.by_seq.0.len() == self.runs.len() {
            return Box::new(
                self.by_seq
                    .0
                    .range((Bound::Unbounded, end))
                    .rev()
                    .filter_map(|(seq, id)| self.runs.get(id).filter(|r| r.seq == *seq)),
            );
        }
        let mut runs: Vec<&Run> = self
            .runs
            .values()
            .filter(|r| before.is_none_or(|b| r.seq < b))
            .collect();
        runs.sort_unstable_by_key(|r| std::cmp::Reverse(r.seq));
        Box::new(runs.into_iter())
    }

    /// The queue of each compute target in placement order, with each run's summary.
    pub(crate) fn queued(&self) -> &BTreeMap<String, BTreeMap<QueueKey, Queued>> {
        &self.queued.0
    }

    /// Rebuilds the summaries of the queued runs (what `queued` must equal).
    pub(crate) fn summarize_queue(&self) -> BTreeMap<String, BTreeMap<QueueKey, Queued>> {
        let mut queued: BTreeMap<String, BTreeMap<QueueKey, Queued>> = BTreeMap::new();
        for k in &self.queue {
            if let Some(r) = self.runs.get(&k.run_id) {
                queued
                    .entry(k.compute.clone())
                    .or_default()
                    .insert(k.clone(), Queued::of(r));
            }
        }
        queued
    }

    /// What the active runs of `compute` hold against its quota.
    pub fn quota_usage(&self, compute: &str) -> QuotaUsage {
        self.active
            .0
            .get(compute)
            .map(|a| a.usage)
            .unwrap_or_default()
    }

    /// The summary of the active runs of `compute`, if it has some.
    pub(crate) fn active_summary(&self, compute: &str) -> Option<&ActiveSummary> {
        self.active.0.get(compute)
    }

    /// Recounts the summaries of the active runs (what `active` must equal).
    pub(crate) fn summarize_active(&self) -> BTreeMap<String, ActiveSummary> {
        let mut active: BTreeMap<String, ActiveSummary> = BTreeMap::new();
        for run in self.runs.values().filter(|r| r.state.is_active()) {
            active.entry(run.spec.compute.clone()).or_default().add(run);
        }
        active
    }

    /// Encodes the whole state for a Raft snapshot.
    pub fn to_snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("state serializes")
    }

    /// Finds a node by name.
    pub fn node_by_name(&self, name: &str) -> Option<&Node> {
        self.nodes.values().find(|n| n.name == name)
    }

    /// Why node `node_id` may not join compute instance `compute`: an instance is one
    /// machine, and another node of it is up (ready or draining). `None` for other kinds
    /// of target, and when the instance's node is this one or gone.
    pub fn second_instance_node(&self, compute: &str, node_id: &str) -> Option<String> {
        let target = self.computes.get(compute)?;
        if target.spec.kind != crate::compute::ComputeKind::Instance {
            return None;
        }
        let other = self.nodes.values().find(|n| {
            n.compute == compute
                && n.id != node_id
                && matches!(n.state, NodeState::Ready | NodeState::Draining)
        })?;
        Some(format!(
            "compute instance {compute:?} is one machine, and node {} is it already: stop that node's agent and remove it (`muster node remove {}`) first, or join a cluster or attached target, which take several machines",
            other.name, other.name
        ))
    }

    /// Runs of one compute target that are queued.
    pub fn queued_on<'a>(&'a self, compute: &'a str) -> impl Iterator<Item = &'a Run> + 'a {
        self.queue
            .iter()
            .filter_map(|k| self.runs.get(&k.run_id))
            .filter(move |r| r.spec.compute == compute)
    }
}

/// What one attempt holds against its compute target's quota.
pub(crate) fn attempt_usage(a: &Attempt) -> QuotaUsage {
    let mut u = QuotaUsage {
        runs: 1,
        ..QuotaUsage::default()
    };
    for p in &a.placements {
        u.gpus += p.gpus.len() as u64;
        u.cpu_millis = u.cpu_millis.saturating_add(p.resources.cpu_millis);
    }
    u
}

#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod tests;

impl State {
    /// The component `name` of `workspace`: that version, or the latest made.
    pub fn component(
        &self,
        workspace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Option<&crate::data::Component> {
        let versions = self.components.get(&crate::data::scoped(workspace, name))?;
        match version {
            Some(v) => versions.iter().find(|c| c.version == v),
            None => versions.last(),
        }
    }

    /// The data asset `name` of `workspace`: that version, or the latest made.
    pub fn data_asset(
        &self,
        workspace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Option<&crate::data::DataAsset> {
        let versions = self
            .data_assets
            .get(&crate::data::scoped(workspace, name))?;
        match version {
            Some(v) => versions.iter().find(|a| a.version == v),
            None => versions.last(),
        }
    }
}
