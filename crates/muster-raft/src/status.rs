//! What a node reports about itself ([`RaftStatus`]) and membership types.

use serde::{Deserialize, Serialize};

/// The raft role of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Follows a leader (or has none yet).
    #[default]
    Follower,
    /// Probing whether it could win an election (pre-vote), without disturbing the term.
    PreCandidate,
    /// Campaigning for leadership.
    Candidate,
    /// Leads the cluster: accepts proposals and reads.
    Leader,
}

impl From<raft::StateRole> for Role {
    fn from(role: raft::StateRole) -> Self {
        match role {
            raft::StateRole::Follower => Role::Follower,
            raft::StateRole::PreCandidate => Role::PreCandidate,
            raft::StateRole::Candidate => Role::Candidate,
            raft::StateRole::Leader => Role::Leader,
        }
    }
}

/// How the leader is replicating to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationState {
    /// Finding the last matching entry (after election or a rejection), one message at a time.
    Probe,
    /// Streaming entries.
    Replicate,
    /// A snapshot was sent; waiting for the peer to install it.
    Snapshot,
}

impl From<raft::ProgressState> for ReplicationState {
    fn from(state: raft::ProgressState) -> Self {
        match state {
            raft::ProgressState::Probe => ReplicationState::Probe,
            raft::ProgressState::Replicate => ReplicationState::Replicate,
            raft::ProgressState::Snapshot => ReplicationState::Snapshot,
        }
    }
}

/// The leader's view of one member's log (the leader itself included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerProgress {
    /// The member's raft id.
    pub id: u64,
    /// Highest log index known to be replicated on it.
    pub matched: u64,
    /// Next log index the leader will send it.
    pub next_index: u64,
    /// How the leader is replicating to it.
    pub state: ReplicationState,
    /// Whether it answered within the last election timeout.
    pub recent_active: bool,
}

/// A node's current state, published after every batch of work
/// ([`RaftHandle::status`](crate::RaftHandle::status)).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RaftStatus {
    /// This node's raft id.
    pub id: u64,
    /// Its role.
    pub role: Role,
    /// The leader it knows of, if any.
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
    /// Highest log index known to be committed.
    pub commit_index: u64,
    /// Highest log index applied to the state machine here.
    pub applied_index: u64,
    /// Durable writes of the log since this node started, each one fsync (many entries
    /// proposed at once share one).
    pub log_writes: u64,
    /// Times the node's loop woke (for a command, a message or a tick) since it started: a
    /// lone leader with nothing to do does not wake (about one per minute).
    #[serde(default)]
    pub wakeups: u64,
    /// Why the log cannot be written now (a full disk, an I/O error), while it cannot: the
    /// node refuses writes and reads, retries every second, and resumes by itself.
    #[serde(default)]
    pub storage_error: Option<String>,
    /// First log index still held (entries before it are covered by the snapshot).
    pub first_index: u64,
    /// Last log index held.
    pub last_index: u64,
    /// Log index of the latest state snapshot (0 if none).
    pub snapshot_index: u64,
    /// Voting members, as of the applied configuration.
    pub voters: Vec<u64>,
    /// Non-voting members (receive the log, do not vote).
    pub learners: Vec<u64>,
    /// On the leader: every member's replication progress, by id. Empty elsewhere.
    pub progress: Vec<PeerProgress>,
    /// The node has stopped (shut down, or after a fatal error).
    pub stopped: bool,
    /// Why the node stopped on its own (storage failure, state machine failure), if it did.
    pub fatal_error: Option<String>,
}

/// One membership change, applied with raft's ConfChangeV2 (several at once use joint
/// consensus).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipChange {
    /// Add a voter, or promote a learner to voter.
    AddVoter(u64),
    /// Add a learner, or demote a voter to learner.
    AddLearner(u64),
    /// Remove a voter or learner.
    Remove(u64),
}

/// The cluster membership after a change.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Membership {
    /// Voting members, sorted.
    pub voters: Vec<u64>,
    /// Learners, sorted.
    pub learners: Vec<u64>,
}

impl From<&raft::eraftpb::ConfState> for Membership {
    fn from(cs: &raft::eraftpb::ConfState) -> Self {
        let mut voters = cs.voters.clone();
        voters.sort_unstable();
        let mut learners = cs.learners.clone();
        learners.sort_unstable();
        Membership { voters, learners }
    }
}
