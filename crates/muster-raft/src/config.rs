//! [`RaftConfig`]: a plain struct with defaults and [`RaftConfig::validate`].

use std::time::Duration;

use crate::RaftError;

/// How one raft node runs. Build it with struct update syntax over [`RaftConfig::default`] and
/// check it with [`RaftConfig::validate`] ([`RaftNode::start`](crate::RaftNode::start) does too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftConfig {
    /// This server's raft id (> 0, unique in the cluster, never reused).
    pub id: u64,
    /// The voters of a brand-new cluster, including `id`; used only when the data directory
    /// holds no raft state yet. Every founding member must be given the same list. Leave it empty
    /// on a server that joins an existing cluster: it waits until the leader adds it
    /// ([`RaftHandle::change_membership`](crate::RaftHandle::change_membership)) and sends it a
    /// snapshot.
    pub initial_voters: Vec<u64>,
    /// How often the raft clock ticks. Default 100 ms.
    pub tick_interval: Duration,
    /// Ticks without hearing from a leader before a follower campaigns (randomized in
    /// `[election_tick, max_election_tick)`). Default 8 (0.8 s).
    pub election_tick: usize,
    /// The upper bound (exclusive) of the randomized election timeout, in ticks; 0 means
    /// `2 * election_tick`. Default 12: timeouts between 0.8 and 1.2 s, so a killed leader
    /// is replaced in about a second while split votes stay rare.
    pub max_election_tick: usize,
    /// Ticks between leader heartbeats. Default 1 (100 ms).
    pub heartbeat_tick: usize,
    /// Pre-vote (raft thesis 9.6): a partitioned server rejoining does not disrupt the leader.
    /// Default true.
    pub pre_vote: bool,
    /// The leader steps down when it has not heard from a quorum for an election timeout.
    /// Default true.
    pub check_quorum: bool,
    /// Take a state machine snapshot and compact the log after this many entries were applied
    /// since the last snapshot. Default 10 000.
    pub snapshot_interval: u64,
    /// Log entries kept behind a snapshot when compacting, so a follower that is only slightly
    /// behind is caught up from the log instead of being sent the whole state. Default 1 000.
    pub log_retained_after_snapshot: u64,
    /// Append messages in flight to one follower before waiting for acknowledgements.
    /// Default 256.
    pub max_inflight_msgs: usize,
    /// Upper bound on the entry bytes in one append message. Default 1 MiB.
    pub max_size_per_msg: u64,
    /// Upper bound on the bytes of proposed but not yet committed entries; proposals beyond it
    /// are rejected (back-pressure when followers are slow). Default 256 MiB.
    pub max_uncommitted_size: u64,
    /// Test hook: while this switch is on, every write of the log fails as on a full disk.
    pub write_faults: Option<WriteFaults>,
}

/// A switch that makes a node's log writes fail while it is on ([`RaftConfig::write_faults`]).
#[derive(Debug, Clone, Default)]
pub struct WriteFaults(pub(crate) std::sync::Arc<std::sync::atomic::AtomicBool>);

impl WriteFaults {
    /// Turns the faults on or off.
    pub fn set(&self, on: bool) {
        self.0.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl PartialEq for WriteFaults {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for WriteFaults {}

impl Default for RaftConfig {
    /// A single-voter node with id 1 (`muster dev`), 100 ms ticks, 1 s election timeout.
    fn default() -> Self {
        Self {
            id: 1,
            initial_voters: vec![1],
            tick_interval: Duration::from_millis(100),
            election_tick: 8,
            max_election_tick: 12,
            heartbeat_tick: 1,
            pre_vote: true,
            check_quorum: true,
            snapshot_interval: 10_000,
            log_retained_after_snapshot: 1_000,
            max_inflight_msgs: 256,
            max_size_per_msg: 1024 * 1024,
            max_uncommitted_size: 256 * 1024 * 1024,
            write_faults: None,
        }
    }
}

impl RaftConfig {
    /// Checks that the configuration can run; the error names the field and what to change.
    pub fn validate(&self) -> Result<(), RaftError> {
        let invalid = |msg: String| Err(RaftError::InvalidConfig(msg));
        if self.id == 0 {
            return invalid("id must be greater than 0".to_owned());
        }
        if !self.initial_voters.is_empty() {
            if !self.initial_voters.contains(&self.id) {
                return invalid(format!(
                    "initial_voters {:?} must include this server's id {} (leave it empty to \
                     join an existing cluster)",
                    self.initial_voters, self.id
                ));
            }
            if self.initial_voters.contains(&0) {
                return invalid("initial_voters must not contain 0".to_owned());
            }
            let mut sorted = self.initial_voters.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != self.initial_voters.len() {
                return invalid(format!(
                    "initial_voters {:?} lists a server twice",
                    self.initial_voters
                ));
            }
        }
        if self.tick_interval.is_zero() {
            return invalid("tick_interval must be greater than 0".to_owned());
        }
        if self.heartbeat_tick == 0 {
            return invalid("heartbeat_tick must be greater than 0".to_owned());
        }
        if self.election_tick <= self.heartbeat_tick {
            return invalid(format!(
                "election_tick ({}) must be greater than heartbeat_tick ({}); 10x is usual",
                self.election_tick, self.heartbeat_tick
            ));
        }
        if self.snapshot_interval == 0 {
            return invalid("snapshot_interval must be greater than 0".to_owned());
        }
        if self.max_inflight_msgs == 0 {
            return invalid("max_inflight_msgs must be greater than 0".to_owned());
        }
        if self.max_uncommitted_size == 0 {
            return invalid("max_uncommitted_size must be greater than 0".to_owned());
        }
        self.to_raft(0)
            .validate()
            .or_else(|e| invalid(e.to_string()))
    }

    /// The raft-rs configuration for this node, restarting at `applied`.
    pub(crate) fn to_raft(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_tick,
            max_election_tick: self.max_election_tick,
            heartbeat_tick: self.heartbeat_tick,
            applied,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            check_quorum: self.check_quorum,
            pre_vote: self.pre_vote,
            max_uncommitted_size: self.max_uncommitted_size,
            ..raft::Config::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(RaftConfig::default().validate(), Ok(()));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                RaftConfig {
                    id: 0,
                    ..RaftConfig::default()
                },
                "id",
            ),
            (
                RaftConfig {
                    id: 4,
                    initial_voters: vec![1, 2, 3],
                    ..RaftConfig::default()
                },
                "initial_voters",
            ),
            (
                RaftConfig {
                    initial_voters: vec![1, 1],
                    ..RaftConfig::default()
                },
                "twice",
            ),
            (
                RaftConfig {
                    election_tick: 1,
                    ..RaftConfig::default()
                },
                "election_tick",
            ),
            (
                RaftConfig {
                    snapshot_interval: 0,
                    ..RaftConfig::default()
                },
                "snapshot_interval",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err:?} should mention {field}");
        }
    }

    #[test]
    fn joining_server_may_have_no_initial_voters() {
        let config = RaftConfig {
            id: 7,
            initial_voters: vec![],
            ..RaftConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
    }
}
