//! Errors: [`RaftError`] for starting and feeding a node, [`ProposeError`] for requests that
//! wait on the log (propose, read index, membership, leader transfer).

use std::path::PathBuf;

/// Why a raft node could not start, or could not take a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    /// The [`RaftConfig`](crate::RaftConfig) is not usable; the message names the field.
    #[error("invalid raft configuration: {0}")]
    InvalidConfig(String),

    /// Another node (in this process or another one) holds the database open.
    #[error(
        "raft database {path} is already in use by another muster server (in this or another \
         process); stop that server first, or give this one its own data directory"
    )]
    DatabaseLocked {
        /// The database file.
        path: PathBuf,
    },

    /// The database exists but cannot be trusted. muster never starts empty over it.
    #[error(
        "raft database {path} is corrupt: {detail}. This server will not start over it with an \
         empty state. Restore the data directory from a backup, or remove this server from the \
         cluster, delete the directory and add the server back so it copies the state from the \
         leader"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    /// The database could not be opened or created (permissions, disk, ...).
    #[error("cannot open raft database {path}: {detail}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The underlying failure.
        detail: String,
    },

    /// The data directory was written by a different raft node id.
    #[error(
        "raft database {path} belongs to raft node {stored}, but this server is configured as \
         node {configured}; point it at the data directory of node {configured}, or fix the \
         configured id"
    )]
    WrongNode {
        /// The database file.
        path: PathBuf,
        /// The id recorded in the database.
        stored: u64,
        /// The id in the configuration.
        configured: u64,
    },

    /// The state machine could not load the snapshot stored in the database.
    #[error(
        "the state machine rejected the snapshot at log index {index} stored in {path}: {detail} \
         (was the data directory written by an incompatible muster version?)"
    )]
    Restore {
        /// The database file.
        path: PathBuf,
        /// The snapshot's log index.
        index: u64,
        /// The state machine's reason.
        detail: String,
    },

    /// Writing the database failed (a full disk, an I/O error): nothing of that write was
    /// kept, and the node retries it (reopening the database) until it succeeds.
    #[error("cannot write the raft log {path}: {detail}")]
    WriteFailed {
        /// The database file.
        path: PathBuf,
        /// The underlying failure.
        detail: String,
    },

    /// Reading or writing the database failed while running.
    #[error("raft storage failure on {path}: {detail}")]
    Storage {
        /// The database file.
        path: PathBuf,
        /// The underlying failure.
        detail: String,
    },

    /// raft-rs refused to build the node from the recovered state.
    #[error("raft: {0}")]
    Raft(String),

    /// A message handed to [`RaftHandle::step`](crate::RaftHandle::step) could not be decoded or
    /// was not addressed to this node.
    #[error("invalid raft message: {0}")]
    InvalidMessage(String),

    /// The node has been shut down (or stopped after a fatal error).
    #[error("the raft node is shut down")]
    Shutdown,
}

/// Why a proposal, read, membership change or leader transfer did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader. Nothing was proposed; send the request to `leader` (if known).
    #[error("this server is not the raft leader ({})", leader_hint(.leader))]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<u64>,
    },

    /// Leadership was lost before the entry was committed. The entry may still be committed by
    /// the next leader, or may be discarded: the caller cannot know whether it was applied, so
    /// only retry operations that are idempotent (or check the state first).
    #[error(
        "the request was dropped because this server lost raft leadership before it was \
         committed; it may or may not have been applied"
    )]
    Dropped,

    /// The request was refused before it entered the log; nothing was applied. The message says
    /// why (leader transfer in progress, invalid membership change, ...).
    #[error("the request was rejected: {0}")]
    Rejected(String),

    /// The node is shut down; nothing more will be applied here.
    #[error("the raft node is shut down")]
    Shutdown,

    /// The node stopped after a fatal failure: writing the log failed (the message names the
    /// file), or the state machine could not load the leader's snapshot or panicked.
    #[error("the raft node stopped after a failure: {0}")]
    Storage(String),

    /// The node cannot write its log now (a full disk, an I/O error) and refuses requests
    /// until a retry of the write succeeds; nothing of this request was applied. The message
    /// says why and what to do.
    #[error("{0}")]
    Unwritable(String),
}

fn leader_hint(leader: &Option<u64>) -> String {
    match leader {
        Some(id) => format!("the leader is node {id}"),
        None => "no leader is known right now; retry shortly".to_owned(),
    }
}
