//! Starting a node ([`RaftNode::start`]) and talking to it ([`RaftHandle`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use protobuf::Message as _;
use raft::RawNode;
use raft::eraftpb::Message;
use tokio::sync::{oneshot, watch};

use crate::driver::{Command, Driver, DriverConfig};
use crate::storage::RaftStorage;
use crate::{Membership, MembershipChange, ProposeError, RaftConfig, RaftError, RaftStatus};

/// The replicated state machine the log drives. It knows what the entries mean; raft does not.
///
/// Every method runs on the raft thread: keep them quick and never block on the network.
pub trait StateMachine: Send + 'static {
    /// Applies one committed entry's data, in log order, exactly once per start (after a restart
    /// the entries after the last snapshot are applied again, to the restored state).
    /// The returned bytes go to the proposer if it is waiting on this node.
    /// Must be deterministic: same state and data, same result, on every server.
    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8>;

    /// Serializes the whole state. Must be deterministic.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the whole state with a snapshot's data.
    fn restore(&mut self, data: &[u8]) -> Result<(), String>;
}

/// Delivers raft messages to peers. Each message is a raft-rs `eraftpb::Message` encoded as
/// protobuf bytes, so the application can carry it in its own RPC; the receiver hands the bytes
/// to [`RaftHandle::step`].
///
/// `send` is called on the raft thread and must not block: queue internally or spawn (the raft
/// thread runs inside the tokio runtime that called [`RaftNode::start`], so `tokio::spawn`
/// works). Messages may be dropped when a peer is unreachable; raft retries. Deliver messages to
/// one peer in order when you can (a stream per peer).
pub trait Transport: Send + Sync + 'static {
    /// Sends `message` to raft node `to`.
    fn send(&self, to: u64, message: Vec<u8>);
}

/// Starts raft nodes.
#[derive(Debug, Clone, Copy)]
pub struct RaftNode;

impl RaftNode {
    /// Opens (or creates) `data_dir/raft.redb`, recovers the hard state, snapshot and log,
    /// restores `sm` from the snapshot, and starts the raft loop on a thread of its own. The
    /// committed entries after the snapshot are applied again by that loop (so `sm` catches up
    /// shortly after this returns; watch [`RaftStatus::applied_index`]).
    ///
    /// On an empty data directory, `config.initial_voters` bootstraps a new cluster whose state
    /// is `sm` as given (`sm.snapshot()` becomes the first snapshot); with no initial voters the
    /// node waits to be added to an existing cluster. A node that is the only voter elects
    /// itself at once.
    ///
    /// Fails with a message saying which file and what to do if the database is corrupt, held
    /// by another node, or belongs to another raft id; it never starts empty over existing state.
    pub fn start<S: crate::StateMachine>(
        config: RaftConfig,
        data_dir: &Path,
        mut sm: S,
        transport: Arc<dyn crate::Transport>,
    ) -> Result<RaftHandle, RaftError> {
        config.validate()?;
        std::fs::create_dir_all(data_dir).map_err(|e| RaftError::Open {
            path: data_dir.to_owned(),
            detail: format!("cannot create the data directory: {e}"),
        })?;
        let path = data_dir.join("raft.redb");
        let mut storage =
            RaftStorage::open(&path, config.id, &config.initial_voters, || sm.snapshot())?;
        storage.set_fail_writes(config.write_faults.as_ref().map(|f| f.0.clone()));

        let snapshot_index = storage.snapshot_index();
        if snapshot_index > 0 {
            sm.restore(storage.snapshot_data())
                .map_err(|detail| RaftError::Restore {
                    path: path.clone(),
                    index: snapshot_index,
                    detail,
                })?;
        }
        let node = RawNode::new(
            &config.to_raft(snapshot_index),
            storage,
            &crate::logger::logger(),
        )
        .map_err(|e| RaftError::Raft(e.to_string()))?;

        let (mailbox, commands) = mpsc::channel();
        let (status_tx, status_rx) = watch::channel(RaftStatus::default());
        let status_tx = Arc::new(status_tx);
        let (stopped_tx, stopped_rx) = watch::channel(false);
        let election_timeout = config.tick_interval * config.election_tick as u32;
        let driver = Driver::new(
            DriverConfig {
                id: config.id,
                tick_interval: config.tick_interval,
                snapshot_interval: config.snapshot_interval,
                log_retained_after_snapshot: config.log_retained_after_snapshot,
                transfer_timeout: election_timeout * 2 + Duration::from_millis(500),
            },
            node,
            sm,
            transport,
            commands,
            Arc::clone(&status_tx),
        );
        status_tx.send_replace(driver.current_status());

        let runtime = tokio::runtime::Handle::try_current().ok();
        let id = config.id;
        let guard = StopGuard {
            stopped: stopped_tx,
            status: status_tx,
        };
        std::thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || {
                let guard = guard;
                let _runtime = runtime.as_ref().map(|rt| rt.enter());
                let span = tracing::info_span!("raft", id);
                let _span = span.enter();
                driver.run();
                drop(guard);
            })
            .map_err(|e| RaftError::Raft(format!("cannot start the raft thread: {e}")))?;

        tracing::info!(
            id,
            path = %path.display(),
            snapshot_index,
            "raft node started"
        );
        Ok(RaftHandle {
            inner: Arc::new(Inner {
                id,
                mailbox,
                status: status_rx,
                stopped: stopped_rx,
            }),
        })
    }
}

/// Marks the node stopped once the raft thread has let go of everything (the database
/// included), also if it panicked.
struct StopGuard {
    stopped: watch::Sender<bool>,
    status: Arc<watch::Sender<RaftStatus>>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.status.send_modify(|status| {
                status.stopped = true;
                status.role = crate::Role::Follower;
                status.leader = None;
                status.fatal_error = Some("the raft thread panicked (see the log)".to_owned());
            });
        }
        self.stopped.send_replace(true);
    }
}

/// A cheap, cloneable handle to a running raft node.
#[derive(Clone)]
pub struct RaftHandle {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    mailbox: mpsc::Sender<Command>,
    status: watch::Receiver<RaftStatus>,
    stopped: watch::Receiver<bool>,
}

impl std::fmt::Debug for RaftHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftHandle")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl RaftHandle {
    /// This node's raft id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Proposes one entry. Resolves with the state machine's output once the entry is committed
    /// and applied on this node.
    ///
    /// Errors: [`ProposeError::NotLeader`] on a follower (nothing proposed; the request is not
    /// forwarded), [`ProposeError::Dropped`] if leadership was lost before the commit (the entry
    /// may or may not be applied), [`ProposeError::Rejected`], [`ProposeError::Shutdown`],
    /// [`ProposeError::Storage`].
    pub async fn propose(&self, data: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Propose { data, reply })?;
        self.answer(answer).await
    }

    /// Hands over a message received from a peer (bytes as given to [`Transport::send`]).
    /// Accept these only from cluster peers: decoding hostile input is not hardened.
    pub fn step(&self, message: Vec<u8>) -> Result<(), RaftError> {
        let message = decode_message(&message, self.inner.id, MAX_MESSAGE_BYTES)?;
        self.inner
            .mailbox
            .send(Command::Step(Box::new(message)))
            .map_err(|_| RaftError::Shutdown)
    }

    /// Linearizable read barrier (ReadIndex): resolves with a log index once this node has
    /// confirmed with a quorum that it still leads and has applied up to that index; state
    /// read from the local state machine afterwards is up to date.
    /// [`ProposeError::NotLeader`] on followers.
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::ReadIndex { reply })?;
        self.answer(answer).await
    }

    /// Changes the membership with one ConfChangeV2 (several changes go through joint
    /// consensus). Resolves with the new membership once it is applied on this node (and the
    /// joint configuration, if any, has been left). One change at a time: while another is in
    /// progress this returns [`ProposeError::Rejected`].
    pub async fn change_membership(
        &self,
        changes: Vec<MembershipChange>,
    ) -> Result<Membership, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::ChangeMembership { changes, reply })?;
        self.answer(answer).await
    }

    /// Asks this leader to hand leadership to voter `to`; resolves once `to` is known to lead,
    /// or fails with [`ProposeError::Rejected`] after about two election timeouts.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::TransferLeader { to, reply })?;
        self.answer(answer).await
    }

    /// The node's current status (a copy of the latest published one).
    pub fn status(&self) -> RaftStatus {
        self.inner.status.borrow().clone()
    }

    /// A receiver that sees every status change (role, leader, term, indexes, membership).
    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.inner.status.clone()
    }

    /// Stops the node: waiting requests fail with [`ProposeError::Shutdown`], and the database
    /// is closed when this returns, so the data directory can be opened again.
    pub async fn shutdown(&self) {
        // If the loop is gone already, the send fails and there is nothing to stop.
        let _ = self.inner.mailbox.send(Command::Shutdown);
        let mut stopped = self.inner.stopped.clone();
        // An error means the thread is gone, which is what we wait for.
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }

    fn send(&self, command: Command) -> Result<(), ProposeError> {
        self.inner
            .mailbox
            .send(command)
            .map_err(|_| self.stopped_error())
    }

    async fn answer<T>(
        &self,
        answer: oneshot::Receiver<Result<T, ProposeError>>,
    ) -> Result<T, ProposeError> {
        answer.await.unwrap_or_else(|_| Err(self.stopped_error()))
    }

    fn stopped_error(&self) -> ProposeError {
        match &self.inner.status.borrow().fatal_error {
            Some(msg) => ProposeError::Storage(msg.clone()),
            None => ProposeError::Shutdown,
        }
    }
}

/// The largest encoded raft message [`RaftHandle::step`] decodes: the cap the coordinator's
/// cluster service puts on a whole gRPC request (`RaftBatch`), so no message that arrived
/// whole is refused for its size.
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// Decodes one raft message received from a peer, refusing one over `max_bytes`, one that is
/// not a valid `eraftpb::Message`, or one addressed to a node other than `to`. Pure: what
/// [`RaftHandle::step`] does before the message reaches the driver (and what the fuzz target
/// `raft_message` drives).
pub fn decode_message(bytes: &[u8], to: u64, max_bytes: usize) -> Result<Message, RaftError> {
    if bytes.len() > max_bytes {
        return Err(RaftError::InvalidMessage(format!(
            "the message is {} bytes, over the {max_bytes} a raft message may be",
            bytes.len()
        )));
    }
    let message =
        Message::parse_from_bytes(bytes).map_err(|e| RaftError::InvalidMessage(e.to_string()))?;
    if message.to != to {
        return Err(RaftError::InvalidMessage(format!(
            "the message is addressed to raft node {}, but this is node {to}",
            message.to
        )));
    }
    Ok(message)
}
