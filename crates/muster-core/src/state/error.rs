//! Why [`State::apply`](crate::State::apply) rejects a command: one variant per object and
//! rule, so callers (the server's status codes, tests) match on what went wrong instead of
//! parsing a message, and every message says what to do.
//!
//! These values travel inside apply results from the leader to the proposing server
//! (serde, `kind` + `detail`), so a variant's tag and fields are part of the protocol
//! between servers: add variants, don't rename them.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::spec::SpecError;

/// Why a command was rejected. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum ApplyError {
    /// The name is taken.
    #[error("compute target {0:?} already exists: pick another name, or delete it first")]
    ComputeExists(String),
    /// No such compute target.
    #[error(
        "compute target {0:?} does not exist: create it with `muster compute create`, or list them with `muster compute list`"
    )]
    UnknownCompute(String),
    /// The compute target is still used.
    #[error("compute target {name:?} is in use: {detail}")]
    ComputeInUse {
        /// Its name.
        name: String,
        /// By what.
        detail: String,
    },
    /// A spec (run, compute target, sweep, pipeline) failed validation: the field's path
    /// and the rule it breaks.
    #[error("{0}")]
    InvalidSpec(SpecError),
    /// A node name (an agent's `--name`, or one the autoscaler chose) breaks the naming rule.
    #[error("invalid node name {name:?}: {rule}")]
    InvalidNodeName {
        /// The rejected name.
        name: String,
        /// The rule it breaks, phrased as what to do.
        rule: String,
    },
    /// Server ids start at 1.
    #[error("server id {0}: server ids start at 1")]
    InvalidServerId(u64),
    /// A coordinator's address is empty, too long or has spaces.
    #[error(
        "server address {0:?}: give host:port (1 to {max} characters, no spaces)",
        max = crate::state::MAX_SERVER_ADDRESS_LEN
    )]
    InvalidServerAddress(String),
    /// A sealed log or metrics file whose hash is not a SHA-256.
    #[error("{blob} of run {run_id}: sha256 {sha256:?} is not 64 lowercase hex digits")]
    InvalidBlobHash {
        /// What was sealed.
        blob: SealedBlob,
        /// The run.
        run_id: String,
        /// The rejected hash.
        sha256: String,
    },
    /// A sealed log or metrics file for an attempt the run does not have.
    #[error("{blob} of run {run_id}: it has no attempt {attempt}")]
    UnknownAttempt {
        /// What was sealed.
        blob: SealedBlob,
        /// The run.
        run_id: String,
        /// The attempt named.
        attempt: u32,
    },
    /// A sealed log for a rank the attempt does not have.
    #[error("log of run {run_id}: attempt {attempt} has {ranks} rank(s), not rank {rank}")]
    UnknownRank {
        /// The run.
        run_id: String,
        /// The attempt.
        attempt: u32,
        /// How many ranks it has.
        ranks: u32,
        /// The rank named.
        rank: u32,
    },
    /// No such run.
    #[error("run {0:?} does not exist")]
    UnknownRun(String),
    /// A retention archive that cannot be recorded ([`Command::ArchiveRuns`](crate::Command::ArchiveRuns)).
    #[error("cannot archive these runs: {0}")]
    InvalidArchive(String),
    /// The id is taken (the proposer picks another).
    #[error("run id {0:?} is already taken")]
    RunExists(String),
    /// A component's versions are immutable.
    #[error(
        "component {name}:{version} already exists: versions never change; register it with another version"
    )]
    ComponentExists {
        /// Its name.
        name: String,
        /// The version.
        version: String,
    },
    /// The datastore name is taken in its workspace.
    #[error("datastore {0:?} already exists in this workspace")]
    DatastoreExists(String),
    /// A data asset's versions are immutable.
    #[error(
        "data asset {name}:{version} already exists: versions never change; make {name} with another --version"
    )]
    DataAssetExists {
        /// Its name.
        name: String,
        /// The version.
        version: String,
    },
    /// The run is over.
    #[error("run {run_id:?} already finished ({state})")]
    RunFinished {
        /// The run.
        run_id: String,
        /// Its terminal state.
        state: String,
    },
    /// No such node.
    #[error("node {0:?} is not registered")]
    UnknownNode(String),
    /// The node cannot be removed yet.
    #[error("node {node:?} cannot be removed: {why}")]
    NodeInUse {
        /// Its name.
        node: String,
        /// Why, and what to do.
        why: String,
    },
    /// Another node has this name.
    #[error(
        "node name {0:?} is already used by another node: give this agent another --name, or remove the other node"
    )]
    NodeNameTaken(String),
    /// A scheduler decision (a placement, a preemption, a scale decision) that does not fit
    /// the state, e.g. a stale one.
    #[error("scheduler decision rejected: {0}")]
    InvalidPlacement(String),
    /// No such sweep.
    #[error("sweep {0:?} does not exist: list sweeps with `muster sweep list`")]
    UnknownSweep(String),
    /// The sweep id is taken (the proposer picks another, or it is a keyed retry).
    #[error("sweep id {0:?} is already taken")]
    SweepExists(String),
    /// A sweep controller decision or a cancel that does not fit the sweep's state (often
    /// one decided twice across a leader change: nothing to do).
    #[error("sweep {sweep_id}: {rule}")]
    SweepRejected {
        /// The sweep.
        sweep_id: String,
        /// The rule the command breaks.
        rule: SweepRule,
    },
    /// No such pipeline.
    #[error("pipeline {0:?} does not exist: list pipelines with `muster pipeline list`")]
    UnknownPipeline(String),
    /// The pipeline id is taken (the proposer picks another, or it is a keyed retry).
    #[error("pipeline id {0:?} is already taken")]
    PipelineExists(String),
    /// A pipeline planner decision or a cancel that does not fit the pipeline's state (often
    /// one decided twice across a leader change: nothing to do).
    #[error("pipeline {pipeline_id}: {rule}")]
    PipelineRejected {
        /// The pipeline.
        pipeline_id: String,
        /// The rule the command breaks.
        rule: PipelineRule,
    },
    /// A log entry this server cannot decode: it was written by a different muster version.
    #[error(
        "a replicated command could not be decoded ({0}): the servers may run different muster versions; run the same version on every server"
    )]
    UndecodableCommand(String),
    /// A token, workspace or role change that breaks a rule of `access.rs`.
    #[error("{0}")]
    Access(crate::access::AccessError),
}

impl From<crate::access::AccessError> for ApplyError {
    fn from(e: crate::access::AccessError) -> ApplyError {
        ApplyError::Access(e)
    }
}

/// What a sealed blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SealedBlob {
    /// A rank's log.
    Log,
    /// An attempt's metrics file.
    Metrics,
    /// A run's checkpoint archive.
    Checkpoint,
}

impl fmt::Display for SealedBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SealedBlob::Log => "log",
            SealedBlob::Metrics => "metrics",
            SealedBlob::Checkpoint => "checkpoint",
        })
    }
}

/// The rule a sweep command breaks ([`ApplyError::SweepRejected`]).
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepRule {
    /// A cancel of a sweep that finished or is being canceled.
    #[error("it already finished or is being canceled")]
    FinishedOrCanceling,
    /// A decision for a finished sweep.
    #[error("it already finished")]
    Finished,
    /// A new trial of a sweep being canceled.
    #[error("it is being canceled")]
    Canceling,
    /// A `StartTrial` without the run id the proposer chooses.
    #[error("a new trial needs a run id")]
    MissingRunId,
    /// A `StartTrial` whose index is not the next one: it was already decided.
    #[error("trial {index} is not the next trial ({next}): already decided")]
    NotNextTrial {
        /// The index given.
        index: u32,
        /// The next index.
        next: u32,
    },
    /// The sweep has `max_total_trials` trials.
    #[error("max_total_trials reached")]
    MaxTotalTrials,
    /// The sweep has `max_concurrent_trials` active trials.
    #[error("max_concurrent_trials reached")]
    MaxConcurrentTrials,
    /// A `CancelTrial` of a trial the sweep does not have.
    #[error("no trial {0}")]
    UnknownTrial(u32),
    /// A `CancelTrial` of a trial already stopping.
    #[error("trial {0} is already stopping")]
    TrialStopping(u32),
    /// A `Finish` while this trial is active.
    #[error("trial {0} is still active")]
    TrialActive(u32),
    /// A `Finish` naming a best trial the sweep does not have.
    #[error("the best trial does not exist")]
    UnknownBestTrial,
}

/// The rule a pipeline command breaks ([`ApplyError::PipelineRejected`]).
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineRule {
    /// A cancel of a pipeline that finished or is being canceled.
    #[error("it already finished or is being canceled")]
    FinishedOrCanceling,
    /// A decision for a finished pipeline.
    #[error("it already finished")]
    Finished,
    /// A started step of a pipeline being canceled.
    #[error("it is being canceled")]
    Canceling,
    /// A decision about a step the pipeline does not have.
    #[error("no step {0}")]
    UnknownStep(String),
    /// A decision about a step that already has one.
    #[error("step {0} was already decided")]
    StepDecided(String),
    /// A `StartStep` whose run differs from the step's spec.
    #[error("step {0}'s run is not the one in its spec")]
    RunNotInSpec(String),
    /// A `StartStep` without the run id the proposer chooses.
    #[error("a started step needs a run id")]
    MissingRunId,
    /// A `Finish` while this step is not over.
    #[error("step {0} is not over")]
    StepNotOver(String),
}

impl From<SpecError> for ApplyError {
    fn from(e: SpecError) -> ApplyError {
        ApplyError::InvalidSpec(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_travel_between_servers_under_stable_tags() {
        let cases = [
            (
                ApplyError::UnknownRun("r1".into()),
                r#"{"kind":"unknown_run","detail":"r1"}"#,
            ),
            (
                ApplyError::InvalidSpec(SpecError::field("command", "give a command")),
                r#"{"kind":"invalid_spec","detail":{"path":"command","message":"give a command","location":null}}"#,
            ),
            (
                ApplyError::SweepRejected {
                    sweep_id: "sw".into(),
                    rule: SweepRule::NotNextTrial { index: 3, next: 4 },
                },
                r#"{"kind":"sweep_rejected","detail":{"sweep_id":"sw","rule":{"not_next_trial":{"index":3,"next":4}}}}"#,
            ),
            (
                ApplyError::PipelineRejected {
                    pipeline_id: "p".into(),
                    rule: PipelineRule::Canceling,
                },
                r#"{"kind":"pipeline_rejected","detail":{"pipeline_id":"p","rule":"canceling"}}"#,
            ),
        ];
        for (err, json) in cases {
            assert_eq!(serde_json::to_string(&err).unwrap(), json);
            assert_eq!(serde_json::from_str::<ApplyError>(json).unwrap(), err);
        }
    }

    #[test]
    fn an_invalid_spec_from_an_older_server_decodes_with_its_message() {
        let old = r#"{"kind":"invalid_spec","detail":"command: give a command"}"#;
        let err: ApplyError = serde_json::from_str(old).unwrap();
        assert_eq!(err.to_string(), "command: give a command");
    }

    #[test]
    fn messages_name_the_object_and_the_rule() {
        let e = ApplyError::SweepRejected {
            sweep_id: "sw".into(),
            rule: SweepRule::FinishedOrCanceling,
        };
        assert_eq!(
            e.to_string(),
            "sweep sw: it already finished or is being canceled"
        );
        assert_eq!(
            ApplyError::UnknownPipeline("p".into()).to_string(),
            "pipeline \"p\" does not exist: list pipelines with `muster pipeline list`"
        );
        assert!(
            ApplyError::UndecodableCommand("bad tag".into())
                .to_string()
                .contains("different muster versions")
        );
        assert_eq!(
            ApplyError::InvalidSpec(SpecError::field("x", "bad").under("jobs.a")).to_string(),
            "jobs.a.x: bad"
        );
    }
}
