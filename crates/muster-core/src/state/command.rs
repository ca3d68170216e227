//! Commands (the Raft log's entries) and what applying them gives back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Millis;
use crate::compute::{ComputeSpec, Tier};
use crate::pipeline::PipelineSpec;
use crate::resources::Capacity;
use crate::schedule::Placement;
use crate::spec::RunSpec;
use crate::state::{AttemptEnd, NodeState, RunArchive, SealedLog, SealedMetrics};
use crate::sweep::SweepSpec;

/// A change to the replicated state. Each variant carries an explicit, versioned tag so a
/// newer server can replay an older log; a changed variant gets a new tag (`.v2`) and the
/// old one stays decodable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd")]
pub enum Command {
    /// Create a compute target.
    #[serde(rename = "create_compute.v1")]
    CreateCompute {
        /// Its definition.
        spec: ComputeSpec,
        /// When.
        at: Millis,
    },
    /// Replace a compute target's definition (`muster compute update`): its scaling bounds,
    /// idle time, tier, description and quota. Its name, type, workspace and provisioner
    /// cannot change.
    #[serde(rename = "update_compute.v1")]
    UpdateCompute {
        /// The new definition.
        spec: ComputeSpec,
        /// When.
        at: Millis,
    },
    /// Stop or start a compute instance (`muster compute stop|start`): stopped, its
    /// provisioner releases its node once no run holds it and starts none, and its runs
    /// wait; started, it gets its one node again.
    #[serde(rename = "set_compute_stopped.v1")]
    SetComputeStopped {
        /// The instance.
        name: String,
        /// Stopped (true) or started (false).
        stopped: bool,
        /// When.
        at: Millis,
    },
    /// Delete a compute target that has no nodes and no unfinished runs. Nodes its
    /// autoscaler started do not block it: they are released first (drained, stopped by
    /// the provisioner), and the target goes with the last one.
    #[serde(rename = "delete_compute.v1")]
    DeleteCompute {
        /// Its name.
        name: String,
        /// When.
        at: Millis,
    },
    /// Register a node, or re-register it with new capacity (same id).
    #[serde(rename = "register_node.v1")]
    RegisterNode {
        /// Stable id from the agent's data dir.
        node_id: String,
        /// Unique name.
        name: String,
        /// Compute target.
        compute: String,
        /// What it offers.
        capacity: Capacity,
        /// Labels.
        labels: BTreeMap<String, String>,
        /// Tier.
        tier: Tier,
        /// Address for peers.
        address: String,
        /// When.
        at: Millis,
    },
    /// Change a node's standing. Lost or Evicted requeues its active attempts.
    #[serde(rename = "set_node_state.v1")]
    SetNodeState {
        /// The node.
        node_id: String,
        /// New standing.
        state: NodeState,
        /// Why.
        reason: Option<String>,
        /// When.
        at: Millis,
    },
    /// Remove a node whose agent is gone (`muster node remove`): it must not be ready nor
    /// hold an active attempt, and must not belong to an autoscaled target (the autoscaler
    /// releases those). Its agent's credentials are revoked, so the machine comes back only
    /// with a new join token.
    #[serde(rename = "remove_node.v1")]
    RemoveNode {
        /// The node.
        node_id: String,
        /// When.
        at: Millis,
    },
    /// Accept a submission.
    #[serde(rename = "submit_run.v1")]
    SubmitRun {
        /// New id, chosen by the proposer.
        run_id: String,
        /// What to run.
        spec: Box<RunSpec>,
        /// A retry with the same key returns the first run instead of a new one.
        idempotency_key: Option<String>,
        /// When.
        at: Millis,
    },
    /// Start attempt `attempt` of a queued run on these nodes (a scheduler decision).
    #[serde(rename = "place_run.v1")]
    PlaceRun {
        /// The run.
        run_id: String,
        /// Must be the run's next attempt number.
        attempt: u32,
        /// One per instance, rank order.
        placements: Vec<Placement>,
        /// When.
        at: Millis,
        /// A random secret, chosen by the proposer, that the ranks of a distributed attempt
        /// present to each other's agents (the MPI rsh helper); stored as
        /// [`crate::Attempt::secret`]. `None` in older logs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
    },
    /// An agent's report on one rank of an attempt.
    #[serde(rename = "report_attempt.v1")]
    ReportAttempt {
        /// The run.
        run_id: String,
        /// The attempt reported on; a stale one is ignored.
        attempt: u32,
        /// The reporting node.
        node_id: String,
        /// What happened.
        report: AttemptReport,
        /// When.
        at: Millis,
    },
    /// Stop the active attempt `attempt` of `run_id` to make room for the higher-priority
    /// queued run `for_run` (a scheduler decision). The attempt keeps its resources until
    /// its agents report its end, which is then recorded as Preempted and the run requeued.
    #[serde(rename = "preempt_attempt.v1")]
    PreemptAttempt {
        /// The run to preempt (the victim).
        run_id: String,
        /// Its active attempt.
        attempt: u32,
        /// The queued run it makes room for: same compute, strictly higher priority.
        for_run: String,
        /// When.
        at: Millis,
    },
    /// Record that the log of one rank of an attempt is sealed in the blob store (and on a
    /// majority of servers). The leader proposes it before it proposes that rank's end, so
    /// an ended rank's log is readable from any server. Idempotent: the first record of a
    /// rank stays.
    #[serde(rename = "seal_log.v1")]
    SealLog {
        /// The run.
        run_id: String,
        /// The attempt (any of the run's attempts, current or not).
        attempt: u32,
        /// The rank (0-based, below the attempt's instance count).
        rank: u32,
        /// Where the log is and how long it is.
        log: SealedLog,
    },
    /// Record (or change) the address at which the other servers reach coordinator `id`.
    #[serde(rename = "set_server_address.v1")]
    SetServerAddress {
        /// The server's Raft id (> 0).
        id: u64,
        /// `host:port` (or a URL).
        address: String,
    },
    /// Forget the address of coordinator `id` (it left the cluster). Forgetting an unknown
    /// server changes nothing.
    #[serde(rename = "remove_server_address.v1")]
    RemoveServerAddress {
        /// The server's Raft id.
        id: u64,
    },
    /// An autoscaler decision for one compute target: request new nodes and/or release
    /// idle ones it requested earlier. Releasing drains a registered node; the provisioner
    /// acts on the applied state and reports with [`Command::Provisioned`]. Rejected (a
    /// stale decision) if it would go above `max_instances`, reuse a name, or release a
    /// node that is not the autoscaler's, is already going, or has active attempts.
    #[serde(rename = "scale_compute.v1")]
    ScaleCompute {
        /// The compute target.
        compute: String,
        /// Names of the nodes to provision (new, unused).
        add: Vec<String>,
        /// Names of the nodes to release.
        remove: Vec<String>,
        /// Why, in words (shown in `muster compute show`).
        reason: String,
        /// When.
        at: Millis,
    },
    /// What a provisioner did about some of a compute target's requested nodes. `Released`
    /// forgets them and removes their nodes from the state.
    #[serde(rename = "provisioned.v1")]
    Provisioned {
        /// The compute target.
        compute: String,
        /// The nodes concerned.
        nodes: Vec<String>,
        /// What happened.
        outcome: ProvisionOutcome,
        /// Details (an error's text).
        message: Option<String>,
        /// When.
        at: Millis,
    },
    /// A user's cancel.
    #[serde(rename = "cancel_run.v1")]
    CancelRun {
        /// The run.
        run_id: String,
        /// Why (shown on the run).
        reason: Option<String>,
        /// When.
        at: Millis,
    },
    /// Accept a sweep (see `state/sweep.rs`).
    #[serde(rename = "submit_sweep.v1")]
    SubmitSweep {
        /// New id, chosen by the proposer.
        sweep_id: String,
        /// What it searches.
        spec: Box<SweepSpec>,
        /// The sampler's seed (the file's, or drawn by the proposer).
        seed: u64,
        /// When.
        at: Millis,
    },
    /// A sweep controller decision (start, cancel a trial; finish).
    #[serde(rename = "sweep_decision.v1")]
    SweepDecision {
        /// The sweep.
        sweep_id: String,
        /// The decision.
        decision: crate::sweep::SweepDecision,
        /// The new trial's run id (for a start), chosen by the proposer.
        run_id: Option<String>,
        /// When.
        at: Millis,
    },
    /// A user's cancel of a sweep: its active trials are canceled, no trial starts, and it
    /// finishes as canceled once they are over.
    #[serde(rename = "cancel_sweep.v1")]
    CancelSweep {
        /// The sweep.
        sweep_id: String,
        /// Why.
        reason: Option<String>,
        /// When.
        at: Millis,
    },
    /// Accept a pipeline (see `state/pipeline.rs`).
    #[serde(rename = "submit_pipeline.v1")]
    SubmitPipeline {
        /// New id, chosen by the proposer.
        pipeline_id: String,
        /// The DAG.
        spec: Box<PipelineSpec>,
        /// When.
        at: Millis,
    },
    /// A pipeline planner decision (start, reuse, fail a step; finish).
    #[serde(rename = "pipeline_decision.v1")]
    PipelineDecision {
        /// The pipeline.
        pipeline_id: String,
        /// The decision.
        decision: crate::pipeline::PipelineDecision,
        /// The step's run id (for a start), chosen by the proposer.
        run_id: Option<String>,
        /// When.
        at: Millis,
    },
    /// A user's cancel of a pipeline: its running steps are canceled, pending ones fail.
    #[serde(rename = "cancel_pipeline.v1")]
    CancelPipeline {
        /// The pipeline.
        pipeline_id: String,
        /// Why.
        reason: Option<String>,
        /// When.
        at: Millis,
    },
    /// Record that a run's metrics, as they stood when a rank of `attempt` ended, are
    /// sealed in the blob store (and on a majority of servers), so any server can serve an
    /// ended run's metrics once the leader that took them from the agents is gone. The
    /// blob holds the run's whole metrics log (every attempt so far); a record with more
    /// lines replaces one with fewer, so concurrent seals of two ranks keep the fuller one.
    #[serde(rename = "seal_metrics.v1")]
    SealMetrics {
        /// The run.
        run_id: String,
        /// The attempt (any of the run's attempts, current or not).
        attempt: u32,
        /// Where the metrics are and how many lines they hold.
        metrics: SealedMetrics,
    },
    /// Record a run's latest checkpoint (`state/checkpoint.rs`): the archive of what rank
    /// 0 of `checkpoint.attempt` wrote to `MUSTER_CHECKPOINT_DIR`, already on a majority of
    /// servers. Fenced: stale (ignored) unless that attempt is the run's latest, `node_id`
    /// holds its rank 0, and it is newer than the recorded one.
    #[serde(rename = "record_checkpoint.v1")]
    RecordCheckpoint {
        /// The run.
        run_id: String,
        /// The node that took it (rank 0's).
        node_id: String,
        /// The checkpoint.
        checkpoint: crate::state::Checkpoint,
    },
    /// Retention: remove these finished runs (and their idempotency keys) from the state,
    /// recording the archive blob that holds them whole (`state/archive.rs`). The blob is
    /// on a majority of servers before this is proposed.
    #[serde(rename = "archive_runs.v1")]
    ArchiveRuns {
        /// The runs, each finished before the archive's cut-off.
        run_ids: Vec<String>,
        /// The archive they are in.
        archive: RunArchive,
    },
    /// Makes a version of a data asset (`data.rs`); its bytes are already on a majority.
    #[serde(rename = "create_data_asset.v1")]
    CreateDataAsset {
        /// The asset.
        asset: Box<crate::data::DataAsset>,
    },
    /// Names a folder the nodes share as a datastore of a workspace (`data.rs`).
    #[serde(rename = "create_datastore.v1")]
    CreateDatastore {
        /// The datastore.
        store: crate::data::Datastore,
    },
    /// Registers a version of a command component (`data.rs`); its code is already on a
    /// majority.
    #[serde(rename = "create_component.v1")]
    CreateComponent {
        /// The component.
        component: Box<crate::data::Component>,
    },
    /// A change to tokens, workspaces or roles (`access.rs`), audited.
    #[serde(rename = "access.v1")]
    Access {
        /// The change.
        change: Box<crate::access::AccessChange>,
        /// Who asked for it (a principal label, or `server:N` for the servers' own).
        by: String,
        /// When.
        at: Millis,
    },
}

impl Command {
    /// Gives a `PlaceRun` the attempt's secret (random, chosen by the proposer: core has no
    /// randomness); other commands are returned unchanged.
    pub fn with_secret(self, secret: String) -> Command {
        match self {
            Command::PlaceRun {
                run_id,
                attempt,
                placements,
                at,
                ..
            } => Command::PlaceRun {
                run_id,
                attempt,
                placements,
                at,
                secret: Some(secret),
            },
            other => other,
        }
    }

    /// Encodes the command for the Raft log.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("commands serialize")
    }

    /// Decodes a command from the Raft log.
    pub fn decode(bytes: &[u8]) -> Result<Command, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("undecodable command: {e}"))
    }

    /// The command's name as the log spells it (without its version), for tracing.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateCompute { .. } => "create_compute",
            Command::DeleteCompute { .. } => "delete_compute",
            Command::RegisterNode { .. } => "register_node",
            Command::SetNodeState { .. } => "set_node_state",
            Command::RemoveNode { .. } => "remove_node",
            Command::UpdateCompute { .. } => "update_compute",
            Command::SetComputeStopped { .. } => "set_compute_stopped",
            Command::SubmitRun { .. } => "submit_run",
            Command::PlaceRun { .. } => "place_run",
            Command::ReportAttempt { .. } => "report_attempt",
            Command::PreemptAttempt { .. } => "preempt_attempt",
            Command::SealLog { .. } => "seal_log",
            Command::SetServerAddress { .. } => "set_server_address",
            Command::RemoveServerAddress { .. } => "remove_server_address",
            Command::ScaleCompute { .. } => "scale_compute",
            Command::Provisioned { .. } => "provisioned",
            Command::CancelRun { .. } => "cancel_run",
            Command::SubmitSweep { .. } => "submit_sweep",
            Command::SweepDecision { .. } => "sweep_decision",
            Command::CancelSweep { .. } => "cancel_sweep",
            Command::SubmitPipeline { .. } => "submit_pipeline",
            Command::PipelineDecision { .. } => "pipeline_decision",
            Command::CancelPipeline { .. } => "cancel_pipeline",
            Command::SealMetrics { .. } => "seal_metrics",
            Command::ArchiveRuns { .. } => "archive_runs",
            Command::RecordCheckpoint { .. } => "record_checkpoint",
            Command::CreateDataAsset { .. } => "create_data_asset",
            Command::CreateDatastore { .. } => "create_datastore",
            Command::CreateComponent { .. } => "create_component",
            Command::Access { .. } => "access",
        }
    }

    /// The run a command is about, if it is about one (for tracing a run through the log).
    pub fn run_id(&self) -> Option<&str> {
        match self {
            Command::SubmitRun { run_id, .. }
            | Command::PlaceRun { run_id, .. }
            | Command::ReportAttempt { run_id, .. }
            | Command::PreemptAttempt { run_id, .. }
            | Command::SealLog { run_id, .. }
            | Command::CancelRun { run_id, .. }
            | Command::SealMetrics { run_id, .. }
            | Command::RecordCheckpoint { run_id, .. } => Some(run_id),
            _ => None,
        }
    }
}

/// What a provisioner reports with [`Command::Provisioned`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProvisionOutcome {
    /// It started the nodes (their agents will register).
    Launched,
    /// It stopped the nodes: they are forgotten and removed from the state.
    Released,
    /// It tried and failed; it will try again (recorded in the history only).
    Failed,
}

impl ProvisionOutcome {
    /// The lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            ProvisionOutcome::Launched => "launched",
            ProvisionOutcome::Released => "released",
            ProvisionOutcome::Failed => "failed",
        }
    }
}

/// What an agent reports about its rank of an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AttemptReport {
    /// Fetching code or image.
    Preparing,
    /// The process started.
    Running,
    /// The rank is over.
    Ended {
        /// How.
        end: AttemptEnd,
        /// Exit code, if the process exited.
        exit_code: Option<i32>,
        /// Why, in words (OOM-killed, image missing, ...).
        message: Option<String>,
        /// SHA-256 of the uploaded outputs archive, if any.
        outputs: Option<String>,
    },
}

/// The result of applying a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Applied {
    /// The change was made.
    Done,
    /// A submission: the run's id; `existing` when an idempotency key matched an earlier run.
    Submitted {
        /// The run.
        run_id: String,
        /// True when no new run was created.
        existing: bool,
    },
    /// A report for an attempt that is not current (or already over): ignored. The
    /// reporting agent must stop that attempt (fencing).
    Stale {
        /// The run.
        run_id: String,
        /// The attempt reported on.
        attempt: u32,
    },
}
