//! How muster agrees: a raft-rs `RawNode` driver with durable storage, knowing nothing about
//! what a run is.
//!
//! The application gives it a [`StateMachine`] (what the log entries mean) and a [`Transport`]
//! (how raft messages reach peers), and gets back a [`RaftHandle`] to propose entries, feed peer
//! messages, read linearizably and change membership.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use muster_raft::{RaftConfig, RaftNode, StateMachine, Transport};
//!
//! #[derive(Default)]
//! struct Counter(u64);
//! impl StateMachine for Counter {
//!     fn apply(&mut self, _index: u64, _data: &[u8]) -> Vec<u8> {
//!         self.0 += 1;
//!         self.0.to_be_bytes().to_vec()
//!     }
//!     fn snapshot(&self) -> Vec<u8> { self.0.to_be_bytes().to_vec() }
//!     fn restore(&mut self, data: &[u8]) -> Result<(), String> {
//!         self.0 = u64::from_be_bytes(data.try_into().map_err(|_| "bad snapshot")?);
//!         Ok(())
//!     }
//! }
//! struct NoPeers;
//! impl Transport for NoPeers { fn send(&self, _to: u64, _message: Vec<u8>) {} }
//!
//! let raft = RaftNode::start(RaftConfig::default(), "/var/lib/muster".as_ref(), Counter::default(), Arc::new(NoPeers))?;
//! let output = raft.propose(b"+1".to_vec()).await?;
//! raft.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! One thread owns the `RawNode`; the handle talks to it through a mailbox. On each wake it
//! takes every queued command (many proposals per `Ready`), ticks the clock every
//! [`RaftConfig::tick_interval`], and handles the `Ready` in the order the raft-rs documentation
//! gives: send messages, install a snapshot, apply committed entries, append entries and persist
//! the hard state in one redb transaction (one fsync), send the messages that must follow the
//! write, advance, then the light ready (commit index, messages, committed entries) and
//! `advance_apply`.
//!
//! Storage (`data_dir/raft.redb`) holds the log, the hard state and the latest snapshot (state
//! machine data plus membership). Every [`RaftConfig::snapshot_interval`] applied entries the
//! state machine is snapshotted and the log compacted behind it. On restart the state machine is
//! restored from the snapshot and the committed entries after it are applied again.
//!
//! raft-rs logs through `slog`; this crate forwards those records to `tracing` (target `raft`).

mod config;
mod driver;
mod error;
mod logger;
mod node;
mod status;
mod storage;

pub use config::{RaftConfig, WriteFaults};
pub use error::{ProposeError, RaftError};
pub use node::{MAX_MESSAGE_BYTES, RaftHandle, RaftNode, StateMachine, Transport, decode_message};
pub use status::{Membership, MembershipChange, PeerProgress, RaftStatus, ReplicationState, Role};
