//! # The node protocol, pure
//!
//! What the leader says to a node's agent on its session stream, and what it does with the
//! agent's reports, as functions of the replicated [`State`] and of what this session has
//! told the node — no I/O, no clock (tako's reactor, openraft's engine). The server's
//! session (`muster-server/src/grpc/agents.rs`) only carries the results out: it turns an
//! [`Order`] into a wire message and each [`Effect`] into a store call, a proposal, or a
//! message, in the order given.
//!
//! The protocol is level-triggered: on every state change [`orders`] compares what the
//! state asks of the node with what the session told it, so a reconnect or a failover needs
//! no special path (the node re-reports what it runs; stale attempts are fenced).
//!
//! An attempt's end is taken only whole: [`on_report`] first asks the agent for any log or
//! metric bytes the server lacks (a resume from an offset; the agent re-sends its end
//! after them), then seals the rank's log and metrics, replicates the outputs, and only then
//! proposes the end (DESIGN.md invariant 5). [`on_applied`] acknowledges the end once it is
//! in the state — also when the agent re-sent an end whose acknowledgement was lost (the
//! state then calls the report stale, and the agent still needs its ack).
//!
//! A checkpoint (rank 0's `MUSTER_CHECKPOINT_DIR`, uploaded by its agent) comes with an
//! end, or alone while the attempt runs ([`on_checkpoint`]): its blob goes on a majority of
//! servers, then `RecordCheckpoint` is proposed — before the end, so the run is requeued
//! with it.

use std::collections::BTreeSet;

use crate::state::{Applied, AttemptReport, Checkpoint, CheckpointCause, Command, State};

/// An attempt, by run id and attempt number.
pub type AttemptKey = (String, u32);

/// What one session has told its node, and what the node says it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// The attempts the agent says it runs (its hello and heartbeats).
    pub running: BTreeSet<AttemptKey>,
    /// Assignments sent on this session.
    pub assigned: BTreeSet<AttemptKey>,
    /// Stop orders sent on this session.
    pub stopped: BTreeSet<AttemptKey>,
}

/// Why a node is told to stop an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The run was canceled.
    Canceled,
    /// A higher-priority run needs the room.
    Preempted,
    /// The attempt is no longer placed on this node (fencing).
    Stale,
}

impl StopReason {
    /// The reason as the agent protocol spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Canceled => "canceled",
            StopReason::Preempted => "preempted",
            StopReason::Stale => "stale",
        }
    }
}

/// An order to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Start rank `rank` of an attempt.
    Assign {
        /// The attempt.
        attempt: AttemptKey,
        /// This node's rank in it.
        rank: u32,
    },
    /// Stop an attempt.
    Stop {
        /// The attempt.
        attempt: AttemptKey,
        /// Why.
        reason: StopReason,
    },
}

/// What the state asks of node `node_id` that `session` has not told it yet: assignments
/// first, then stops (cancel, preempt, and a fence for each attempt the agent runs that is
/// not placed here). Records each order in `session`, so an order is given once.
pub fn orders(s: &State, node_id: &str, session: &mut Session) -> Vec<Order> {
    let mut assign = Vec::new();
    let mut stop = Vec::new();
    let Some(node) = s.nodes.get(node_id) else {
        return assign;
    };
    for key in &node.attempts {
        let Some(run) = s.runs.get(&key.0) else {
            continue;
        };
        let stopping = if run.cancel_requested {
            Some(StopReason::Canceled)
        } else if run.preempt_requested.is_some() {
            Some(StopReason::Preempted)
        } else {
            None
        };
        if let Some(reason) = stopping {
            if session.stopped.insert(key.clone()) {
                stop.push(Order::Stop {
                    attempt: key.clone(),
                    reason,
                });
            }
            continue;
        }
        if session.assigned.contains(key) || session.running.contains(key) {
            continue;
        }
        let Some(a) = run.attempts.last() else {
            continue;
        };
        let rank = a
            .placements
            .iter()
            .position(|p| p.node_id == node_id)
            .unwrap_or(0);
        session.assigned.insert(key.clone());
        assign.push(Order::Assign {
            attempt: key.clone(),
            rank: rank as u32,
        });
    }
    let stale: Vec<AttemptKey> = session
        .running
        .iter()
        .filter(|key| !node.attempts.contains(*key) && !session.stopped.contains(*key))
        .cloned()
        .collect();
    for key in stale {
        session.stopped.insert(key.clone());
        stop.push(Order::Stop {
            attempt: key,
            reason: StopReason::Stale,
        });
    }
    assign.extend(stop);
    assign
}

/// An agent's report about its rank of an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The attempt.
    pub attempt: AttemptKey,
    /// What happened.
    pub report: AttemptReport,
    /// How many log bytes the agent wrote for the rank (with an end).
    pub log_bytes: u64,
    /// How many metric-file bytes it wrote (with an end).
    pub metric_bytes: u64,
    /// Rank 0's checkpoint, uploaded when the rank ended (with an end).
    pub checkpoint: Option<TakenCheckpoint>,
}

/// A checkpoint an agent took and uploaded (its blob is on the server it reports to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenCheckpoint {
    /// SHA-256 of its archive.
    pub sha256: String,
    /// Its number among the attempt's checkpoints, from 1.
    pub seq: u64,
    /// Files in it.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// When it was taken.
    pub cause: CheckpointCause,
}

/// How much of a rank's log and metrics this server holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Bytes of the live log.
    pub log_bytes: u64,
    /// Bytes of the metrics file.
    pub metric_bytes: u64,
}

/// What the server does about a report, in this order; a failed effect stops the rest
/// (the agent re-sends its report until it is acknowledged).
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Ask the agent to re-send the rank's log from `offset`; it re-sends its end after.
    ResumeLog {
        /// The attempt.
        attempt: AttemptKey,
        /// Where this server's copy ends.
        offset: u64,
    },
    /// Ask the agent to re-send the rank's metrics file from `offset`.
    ResumeMetrics {
        /// The attempt.
        attempt: AttemptKey,
        /// Where this server's copy ends.
        offset: u64,
    },
    /// Seal the rank's log: blob store, a majority of servers, `SealLog`.
    SealLog {
        /// The attempt.
        attempt: AttemptKey,
        /// The rank.
        rank: u32,
    },
    /// Seal the run's metrics after the rank (its last stdout lines count).
    SealMetrics {
        /// The attempt.
        attempt: AttemptKey,
        /// The rank.
        rank: u32,
    },
    /// Put the outputs archive on a majority of servers before the end records it.
    ReplicateOutputs {
        /// Its SHA-256.
        sha256: String,
    },
    /// Put a checkpoint's archive on a majority of servers before it is recorded.
    ReplicateCheckpoint {
        /// Its SHA-256.
        sha256: String,
    },
    /// Propose this `RecordCheckpoint`; a stale or rejected record does not stop the
    /// effects after it (the end is still recorded).
    RecordCheckpoint(Box<Command>),
    /// Propose this command (the report itself) and hand its result to [`on_applied`].
    Propose(Box<Command>),
}

/// This node's rank in an attempt, if the attempt is placed on it.
pub fn rank_of(s: &State, node_id: &str, (run, attempt): (&str, u32)) -> Option<u32> {
    let a = s
        .runs
        .get(run)?
        .attempts
        .get(attempt.checked_sub(1)? as usize)?;
    a.placements
        .iter()
        .position(|p| p.node_id == node_id)
        .map(|r| r as u32)
}

/// Whether the state records rank `rank`'s log of an attempt as sealed.
pub fn is_sealed(s: &State, (run, attempt): (&str, u32), rank: u32) -> bool {
    s.runs
        .get(run)
        .and_then(|r| r.attempts.get(attempt.checked_sub(1)? as usize))
        .is_some_and(|a| a.logs.contains_key(&rank))
}

/// What to do about `report` from node `node_id`, given what this server holds of the
/// rank's streams. `now` stamps the proposal.
pub fn on_report(s: &State, node_id: &str, report: &Report, held: Held, now: u64) -> Vec<Effect> {
    let (run, attempt) = (&report.attempt.0, report.attempt.1);
    let mut effects = Vec::new();
    if let AttemptReport::Ended { outputs, .. } = &report.report {
        let rank = rank_of(s, node_id, (run, attempt));
        let sealed = rank.is_some_and(|rank| is_sealed(s, (run, attempt), rank));
        if let Some(rank) = rank
            && !sealed
        {
            if held.log_bytes < report.log_bytes {
                return vec![Effect::ResumeLog {
                    attempt: report.attempt.clone(),
                    offset: held.log_bytes,
                }];
            }
            if held.metric_bytes < report.metric_bytes {
                return vec![Effect::ResumeMetrics {
                    attempt: report.attempt.clone(),
                    offset: held.metric_bytes,
                }];
            }
            effects.push(Effect::SealLog {
                attempt: report.attempt.clone(),
                rank,
            });
            effects.push(Effect::SealMetrics {
                attempt: report.attempt.clone(),
                rank,
            });
        }
        if let Some(sha256) = outputs {
            effects.push(Effect::ReplicateOutputs {
                sha256: sha256.clone(),
            });
        }
        if let Some(taken) = &report.checkpoint {
            effects.extend(on_checkpoint(s, node_id, (run, attempt), taken, now));
        }
    }
    effects.push(Effect::Propose(Box::new(Command::ReportAttempt {
        run_id: run.clone(),
        attempt,
        node_id: node_id.to_string(),
        report: report.report.clone(),
        at: now,
    })));
    effects
}

/// What to do about checkpoint `taken` of an attempt from node `node_id`: replicate it and
/// propose its record, or nothing when the state would call it stale (the node is not the
/// attempt's rank 0, the attempt is not the run's latest, or a checkpoint as new is
/// recorded already: a re-sent end). `now` stamps the record.
pub fn on_checkpoint(
    s: &State,
    node_id: &str,
    (run, attempt): (&str, u32),
    taken: &TakenCheckpoint,
    now: u64,
) -> Vec<Effect> {
    let checkpoint = Checkpoint {
        sha256: taken.sha256.clone(),
        attempt,
        seq: taken.seq,
        files: taken.files,
        bytes: taken.bytes,
        cause: taken.cause,
        at: now,
    };
    let Some(r) = s.runs.get(run) else {
        return Vec::new();
    };
    let latest = r.attempt_number() == attempt;
    let newer = r
        .checkpoint
        .as_ref()
        .is_none_or(|c| checkpoint.is_newer_than(c));
    if !latest || !newer || rank_of(s, node_id, (run, attempt)) != Some(0) {
        return Vec::new();
    }
    vec![
        Effect::ReplicateCheckpoint {
            sha256: taken.sha256.clone(),
        },
        Effect::RecordCheckpoint(Box::new(Command::RecordCheckpoint {
            run_id: run.to_string(),
            node_id: node_id.to_string(),
            checkpoint,
        })),
    ]
}

/// What the server does once a report's proposal was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Remove the rank's live log file: its sealed blob replaced it.
    RemoveLiveLog {
        /// The attempt.
        attempt: AttemptKey,
        /// The rank.
        rank: u32,
    },
    /// Acknowledge the report (the agent stops re-sending it).
    Ack {
        /// The attempt.
        attempt: AttemptKey,
    },
    /// Tell the agent to stop the attempt.
    Stop {
        /// The attempt.
        attempt: AttemptKey,
        /// Why.
        reason: StopReason,
    },
}

/// What follows an applied report (`applied` is its result; a report for a run that no
/// longer exists counts as stale). An end is acknowledged whether it changed the state or
/// was stale (a re-sent end whose ack was lost); a stale start is fenced once.
pub fn on_applied(
    s: &State,
    node_id: &str,
    session: &mut Session,
    report: &Report,
    applied: &Applied,
) -> Vec<After> {
    let key = report.attempt.clone();
    if matches!(report.report, AttemptReport::Ended { .. }) {
        let mut after = Vec::new();
        if let Some(rank) = rank_of(s, node_id, (&key.0, key.1))
            && is_sealed(s, (&key.0, key.1), rank)
        {
            after.push(After::RemoveLiveLog {
                attempt: key.clone(),
                rank,
            });
        }
        session.running.remove(&key);
        after.push(After::Ack { attempt: key });
        return after;
    }
    session.running.insert(key.clone());
    if matches!(applied, Applied::Stale { .. }) && session.stopped.insert(key.clone()) {
        return vec![After::Stop {
            attempt: key,
            reason: StopReason::Stale,
        }];
    }
    Vec::new()
}

#[cfg(test)]
mod tests;
