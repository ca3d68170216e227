//! The loop that owns the `RawNode`: it takes commands from the mailbox, ticks the raft clock,
//! and handles each `Ready` in the order the raft-rs documentation gives.
//!
//! It runs on a thread of its own because every `Ready` ends in an fsync (a redb commit), and
//! applying entries runs the application's state machine: neither should stall an async
//! runtime's worker. Everything else reaches it through the mailbox, and every request carries a
//! reply channel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message,
    MessageType,
};
use raft::{RawNode, ReadState, Ready, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};

use crate::storage::{RaftStorage, WriteBatch};
use crate::{
    Membership, MembershipChange, PeerProgress, ProposeError, RaftError, RaftStatus, StateMachine,
    Transport,
};

/// Most commands taken from the mailbox before the next `Ready` is handled.
const MAX_COMMANDS_PER_READY: usize = 4096;
/// Longest a lone leader waits for a command before looking again (it needs no ticks).
const ALONE_WAIT: Duration = Duration::from_secs(60);
/// How often a write of the log that failed (a full disk) is tried again.
const STALL_RETRY: Duration = Duration::from_secs(1);

/// A `Ready` whose write failed, kept until the write succeeds.
struct Stalled {
    ready: Ready,
    batch: Box<WriteBatch>,
    /// Why the last try failed.
    error: String,
    /// When the first try failed.
    since: Instant,
    retry_at: Instant,
}

type Reply<T> = oneshot::Sender<Result<T, ProposeError>>;

/// A request to the raft loop.
pub(crate) enum Command {
    Propose {
        data: Vec<u8>,
        reply: Reply<Vec<u8>>,
    },
    Step(Box<Message>),
    ReadIndex {
        reply: Reply<u64>,
    },
    ChangeMembership {
        changes: Vec<MembershipChange>,
        reply: Reply<Membership>,
    },
    TransferLeader {
        to: u64,
        reply: Reply<()>,
    },
    Shutdown,
}

/// Settings of the loop (from `RaftConfig`).
pub(crate) struct DriverConfig {
    pub id: u64,
    pub tick_interval: Duration,
    pub snapshot_interval: u64,
    pub log_retained_after_snapshot: u64,
    /// How long a leader transfer may take before it is reported as failed.
    pub transfer_timeout: Duration,
}

/// Who waits for a proposed entry.
enum Waiter {
    Apply(Reply<Vec<u8>>),
    Membership(Reply<Membership>),
}

impl Waiter {
    fn fail(self, err: ProposeError) {
        // A caller that stopped waiting is not an error.
        match self {
            Waiter::Apply(reply) => drop(reply.send(Err(err))),
            Waiter::Membership(reply) => drop(reply.send(Err(err))),
        }
    }
}

/// A proposal appended to the leader's log, waiting to be applied. The entry is identified by
/// (index, term), which names one entry in any log, and carries `context` to check it.
struct Pending {
    index: u64,
    term: u64,
    context: [u8; 16],
    waiter: Waiter,
}

/// A successful answer, sent after the status reflecting it has been published (so a caller
/// that reads the status after its request resolves sees its effect).
enum Answer {
    Applied(Reply<Vec<u8>>, Vec<u8>),
    Membership(Reply<Membership>, Membership),
    Read(Reply<u64>, u64),
}

impl Answer {
    fn send(self) {
        // A caller that stopped waiting is not an error.
        match self {
            Answer::Applied(reply, output) => drop(reply.send(Ok(output))),
            Answer::Membership(reply, membership) => drop(reply.send(Ok(membership))),
            Answer::Read(reply, index) => drop(reply.send(Ok(index))),
        }
    }
}

struct Transfer {
    to: u64,
    deadline: Instant,
    reply: Reply<()>,
}

/// A fatal failure: the loop stops and every waiter gets this message.
struct Fatal(String);

pub(crate) struct Driver<S: StateMachine> {
    config: DriverConfig,
    node: RawNode<RaftStorage>,
    sm: S,
    transport: Arc<dyn Transport>,
    mailbox: Receiver<Command>,
    status: Arc<watch::Sender<RaftStatus>>,

    /// Last index applied to the state machine.
    applied: u64,
    /// Durable writes of the log and hard state since start (one fsync each).
    log_writes: u64,
    /// Times the loop woke since start ([`RaftStatus::wakeups`]).
    wakeups: u64,
    /// Index of the latest snapshot taken or installed.
    last_snapshot_index: u64,
    /// Distinguishes this run's entry contexts from those of earlier runs of this node.
    context_nonce: u64,
    next_context: u64,

    proposals: VecDeque<Pending>,
    /// Membership changes that entered a joint configuration; answered once it is left.
    awaiting_joint_exit: Vec<Reply<Membership>>,
    /// Reads not yet handed to raft (waiting for this leader to commit in its term).
    new_reads: Vec<Reply<u64>>,
    /// Reads handed to raft, by request context, waiting for leadership confirmation.
    sent_reads: HashMap<Vec<u8>, Vec<Reply<u64>>>,
    /// Confirmed reads: (read index, replies), answered once applied reaches the index.
    confirmed_reads: Vec<(u64, Vec<Reply<u64>>)>,
    transfers: Vec<Transfer>,
    /// Answers to send once the status is published.
    answers: Vec<Answer>,
    /// The term in which this node was last seen leading (None: not leader).
    leader_term: Option<u64>,
    /// Campaign as soon as possible (a single voter need not wait for an election timeout).
    campaign_when_ready: bool,
    /// Peers a snapshot was sent to in the current `Ready`.
    snapshot_recipients: Vec<u64>,
    stopping: bool,
    /// The `Ready` whose write failed, while it does.
    stalled: Option<Stalled>,
}

impl<S: StateMachine> Driver<S> {
    pub(crate) fn new(
        config: DriverConfig,
        node: RawNode<RaftStorage>,
        sm: S,
        transport: Arc<dyn Transport>,
        mailbox: Receiver<Command>,
        status: Arc<watch::Sender<RaftStatus>>,
    ) -> Self {
        let applied = node.store().snapshot_index();
        Self {
            config,
            node,
            sm,
            transport,
            mailbox,
            status,
            applied,
            log_writes: 0,
            wakeups: 0,
            last_snapshot_index: applied,
            context_nonce: random_u64(),
            next_context: 0,
            proposals: VecDeque::new(),
            awaiting_joint_exit: Vec::new(),
            new_reads: Vec::new(),
            sent_reads: HashMap::new(),
            confirmed_reads: Vec::new(),
            transfers: Vec::new(),
            answers: Vec::new(),
            leader_term: None,
            campaign_when_ready: true,
            snapshot_recipients: Vec::new(),
            stopping: false,
            stalled: None,
        }
    }

    /// The status as it is now.
    pub(crate) fn current_status(&self) -> RaftStatus {
        let raft = &self.node.raft;
        let store = self.node.store();
        let cs = store.conf_state();
        let mut voters = cs.voters.clone();
        voters.sort_unstable();
        let mut learners = cs.learners.clone();
        learners.sort_unstable();
        let mut progress = Vec::new();
        if raft.state == StateRole::Leader {
            progress = raft
                .prs()
                .iter()
                .map(|(&id, pr)| PeerProgress {
                    id,
                    matched: pr.matched,
                    next_index: pr.next_idx,
                    state: pr.state.into(),
                    recent_active: pr.recent_active,
                })
                .collect();
            progress.sort_unstable_by_key(|p| p.id);
        }
        RaftStatus {
            id: self.config.id,
            role: raft.state.into(),
            leader: (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id),
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            log_writes: self.log_writes,
            wakeups: self.wakeups,
            storage_error: self.stalled.as_ref().map(|s| s.error.clone()),
            first_index: store.first(),
            last_index: raft.raft_log.last_index(),
            snapshot_index: store.snapshot_index(),
            voters,
            learners,
            progress,
            stopped: false,
            fatal_error: None,
        }
    }

    /// Runs until shut down, until every handle is dropped, or until a fatal failure.
    pub(crate) fn run(mut self) {
        let tick = self.config.tick_interval;
        let mut next_tick = Instant::now() + tick;
        let mut fatal = None;
        loop {
            self.wakeups += 1;
            self.issue_reads();
            if let Err(Fatal(msg)) = self.on_ready().and_then(|()| self.maybe_snapshot()) {
                tracing::error!(error = %msg, "raft node stops after a fatal failure");
                fatal = Some(msg);
                break;
            }
            self.after_ready();
            self.publish_status();
            for answer in self.answers.drain(..) {
                answer.send();
            }
            if self.stopping {
                break;
            }

            let timeout = if let Some(stalled) = &self.stalled {
                stalled.retry_at.saturating_duration_since(Instant::now())
            } else if self.node.has_ready() || self.reads_ready() {
                Duration::ZERO
            } else if self.leads_alone() {
                // Nothing a tick drives (elections, heartbeats, quorum checks) has anyone to
                // reach, so a lone leader sleeps until a command comes: an idle `muster dev`
                // wakes for nothing. The bound only keeps the wait finite.
                ALONE_WAIT
            } else {
                next_tick.saturating_duration_since(Instant::now())
            };
            match self.mailbox.recv_timeout(timeout) {
                Ok(command) => {
                    self.on_command(command);
                    for _ in 0..MAX_COMMANDS_PER_READY {
                        match self.mailbox.try_recv() {
                            Ok(command) => self.on_command(command),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick && self.stalled.is_none() {
                self.node.tick();
                next_tick += tick;
                if next_tick <= now {
                    next_tick = now + tick;
                }
            }
        }
        self.stop(fatal);
    }

    fn on_command(&mut self, command: Command) {
        if let Some(refused) = self.stalled_error() {
            // Raft must not move while a `Ready` is not durable: refuse what would move it,
            // drop peers' messages (they are sent again), keep shutdown.
            match command {
                Command::Propose { reply, .. } => drop(reply.send(Err(refused))),
                Command::ReadIndex { reply } => drop(reply.send(Err(refused))),
                Command::ChangeMembership { reply, .. } => drop(reply.send(Err(refused))),
                Command::TransferLeader { reply, .. } => drop(reply.send(Err(refused))),
                Command::Step(_) => {}
                Command::Shutdown => self.stopping = true,
            }
            return;
        }
        match command {
            Command::Propose { data, reply } => self.on_propose(data, reply),
            Command::Step(message) => self.on_step(*message),
            Command::ReadIndex { reply } => {
                if self.is_leader() {
                    self.new_reads.push(reply);
                } else {
                    let _ = reply.send(Err(self.not_leader()));
                }
            }
            Command::ChangeMembership { changes, reply } => {
                self.on_change_membership(changes, reply)
            }
            Command::TransferLeader { to, reply } => self.on_transfer_leader(to, reply),
            Command::Shutdown => self.stopping = true,
        }
    }

    fn on_propose(&mut self, data: Vec<u8>, reply: Reply<Vec<u8>>) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let context = self.new_context();
        match self.node.propose(context.to_vec(), data) {
            Ok(()) => self.track(context, Waiter::Apply(reply)),
            Err(err) => {
                let _ = reply.send(Err(self.proposal_refused(err)));
            }
        }
    }

    fn on_step(&mut self, message: Message) {
        let (from, msg_type) = (message.from, message.get_msg_type());
        if let Err(err) = self.node.step(message) {
            tracing::debug!(from, ?msg_type, error = %err, "raft message ignored");
        }
    }

    fn on_change_membership(&mut self, changes: Vec<MembershipChange>, reply: Reply<Membership>) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let rejected = |reason: String| Err(ProposeError::Rejected(reason));
        if changes.is_empty() {
            let _ = reply.send(rejected("no membership change was given".to_owned()));
            return;
        }
        if changes.iter().any(|c| node_of(c) == 0) {
            let _ = reply.send(rejected("node id 0 is not a valid raft id".to_owned()));
            return;
        }
        if self.node.raft.has_pending_conf() {
            let _ = reply.send(rejected(
                "another membership change is still being applied; retry once it completes"
                    .to_owned(),
            ));
            return;
        }
        let mut cc = ConfChangeV2::default();
        cc.set_changes(
            changes
                .iter()
                .map(|change| {
                    let mut single = ConfChangeSingle::default();
                    let (ty, id) = match *change {
                        MembershipChange::AddVoter(id) => (ConfChangeType::AddNode, id),
                        MembershipChange::AddLearner(id) => (ConfChangeType::AddLearnerNode, id),
                        MembershipChange::Remove(id) => (ConfChangeType::RemoveNode, id),
                    };
                    single.set_change_type(ty);
                    single.node_id = id;
                    single
                })
                .collect(),
        );
        // Check the change against the current configuration before it enters the log.
        let mut changer = raft::Changer::new(self.node.raft.prs());
        let check = match cc.enter_joint() {
            Some(auto_leave) => changer.enter_joint(auto_leave, &cc.changes).map(drop),
            None => changer.simple(&cc.changes).map(drop),
        };
        if let Err(err) = check {
            let _ = reply.send(rejected(format!(
                "invalid membership change {changes:?}: {err}"
            )));
            return;
        }
        let context = self.new_context();
        match self.node.propose_conf_change(context.to_vec(), cc) {
            Ok(()) => self.track(context, Waiter::Membership(reply)),
            Err(err) => {
                let _ = reply.send(Err(self.proposal_refused(err)));
            }
        }
    }

    fn on_transfer_leader(&mut self, to: u64, reply: Reply<()>) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if to == self.config.id {
            let _ = reply.send(Ok(()));
            return;
        }
        if !self.node.store().conf_state().voters.contains(&to) {
            let _ = reply.send(Err(ProposeError::Rejected(format!(
                "node {to} is not a voter, so it cannot lead"
            ))));
            return;
        }
        self.node.transfer_leader(to);
        self.transfers.push(Transfer {
            to,
            deadline: Instant::now() + self.config.transfer_timeout,
            reply,
        });
    }

    /// Hands waiting reads to raft once this leader has committed an entry in its term (raft-rs
    /// silently drops read requests before that). All reads of a batch share one request.
    fn issue_reads(&mut self) {
        if self.new_reads.is_empty()
            || !self.is_leader()
            || !self.node.raft.commit_to_current_term()
        {
            return;
        }
        let context = self.new_context().to_vec();
        self.node.read_index(context.clone());
        let replies = std::mem::take(&mut self.new_reads);
        self.sent_reads.insert(context, replies);
    }

    /// Handles one `Ready`, in the documented order.
    fn on_ready(&mut self) -> Result<(), Fatal> {
        let (ready, batch, stalled_since) = match self.stalled.take() {
            Some(stalled) if Instant::now() < stalled.retry_at => {
                self.stalled = Some(stalled);
                return Ok(());
            }
            // Retry the write that failed: redb wants a reopen after a failed commit.
            Some(stalled) => match self.node.mut_store().reopen() {
                Ok(()) => (stalled.ready, Some(*stalled.batch), Some(stalled.since)),
                Err(e) => {
                    self.stall(stalled.ready, stalled.batch, e.to_string(), stalled.since);
                    return Ok(());
                }
            },
            None => {
                if !self.node.has_ready() {
                    return Ok(());
                }
                let (ready, batch) = self.take_ready()?;
                (ready, batch, None)
            }
        };
        if let Some(batch) = batch {
            match self.node.mut_store().persist_or_keep(batch) {
                Ok(()) => {
                    self.log_writes += 1;
                    if let Some(since) = stalled_since {
                        tracing::info!(stalled_for = ?since.elapsed(), "the raft log is writable again; resuming");
                    }
                }
                Err((RaftError::WriteFailed { detail, .. }, batch)) => {
                    let since = stalled_since.unwrap_or_else(Instant::now);
                    if stalled_since.is_none() {
                        tracing::error!(error = %detail, "cannot write the raft log; refusing writes and retrying every second");
                    }
                    self.stall(ready, batch, detail, since);
                    return Ok(());
                }
                Err((e, _)) => return Err(Fatal(e.to_string())),
            }
        }
        self.finish_ready(ready);
        Ok(())
    }

    /// Steps 1–5 of a `Ready`: messages the leader may send first, reads, a snapshot from
    /// the leader, committed entries; returns the `Ready` and what it makes durable (none when
    /// only the commit index moved).
    fn take_ready(&mut self) -> Result<(Ready, Option<WriteBatch>), Fatal> {
        let mut ready = self.node.ready();

        // 1. Messages the leader may send before persisting.
        self.send_messages(ready.take_messages());
        for read_state in ready.take_read_states() {
            self.on_read_state(read_state);
        }

        // 2. A snapshot from the leader.
        let mut batch = WriteBatch::default();
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(&snapshot)?;
            batch.snapshot = Some(snapshot);
        }

        // 3. Committed entries (already durable).
        self.apply_entries(ready.take_committed_entries());

        // 4 and 5. New entries and hard state: one transaction, one fsync.
        batch.entries = ready.take_entries();
        batch.hard_state = ready.hs().cloned();
        if batch.snapshot.is_none() && batch.entries.is_empty() && !ready.must_sync() {
            // Only the commit index moved: no need to fsync for it, write it with the next batch.
            if let Some(hs) = batch.hard_state.take() {
                self.node.mut_store().set_commit(hs.commit);
            }
        }
        let write =
            batch.snapshot.is_some() || !batch.entries.is_empty() || batch.hard_state.is_some();
        Ok((ready, write.then_some(batch)))
    }

    /// Steps 6–7, once the `Ready` is durable: messages that must follow the write, then
    /// advance and the light ready.
    fn finish_ready(&mut self, ready: Ready) {
        // 6. Messages that must follow the write (votes, append responses).
        let mut ready = ready;
        self.send_messages(ready.take_persisted_messages());

        // 7. Advance, then the light ready: commit index, messages, committed entries.
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.node.mut_store().set_commit(commit);
        }
        self.send_messages(light.take_messages());
        self.apply_entries(light.take_committed_entries());
        self.node.advance_apply();

        // A snapshot was handed to the transport: let raft probe the peer again; if the snapshot
        // was lost, the peer's rejection makes the leader send it again.
        for to in std::mem::take(&mut self.snapshot_recipients) {
            self.node.report_snapshot(to, SnapshotStatus::Finish);
        }
    }

    /// Holds a `Ready` whose write failed: until the write succeeds the node takes no
    /// message, tick or proposal (so a leader stops heartbeating and the others elect a new
    /// one), refuses writes and reads with the reason, and reports it in its status.
    fn stall(&mut self, ready: Ready, batch: Box<WriteBatch>, error: String, since: Instant) {
        self.stalled = Some(Stalled {
            ready,
            batch,
            error,
            since,
            retry_at: Instant::now() + STALL_RETRY,
        });
    }

    /// Why a request is refused while the log cannot be written.
    fn stalled_error(&self) -> Option<ProposeError> {
        self.stalled.as_ref().map(|s| {
            ProposeError::Unwritable(format!(
                "this server cannot write its raft log ({}); it retries every {} s and resumes by itself once the disk takes writes again: free space on it, or use another server",
                s.error,
                STALL_RETRY.as_secs()
            ))
        })
    }

    /// Checks leadership, answers reads and transfers, campaigns if due.
    fn after_ready(&mut self) {
        let raft = &self.node.raft;
        let now_leading = (raft.state == StateRole::Leader).then_some(raft.term);
        if self.leader_term.is_some() && self.leader_term != now_leading {
            self.on_leadership_lost();
        }
        self.leader_term = now_leading;

        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.confirmed_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.confirmed_reads = waiting;
        for (index, replies) in ready {
            self.answers
                .extend(replies.into_iter().map(|reply| Answer::Read(reply, index)));
        }

        if !self.transfers.is_empty() {
            let leader = self.node.raft.leader_id;
            let now = Instant::now();
            for transfer in std::mem::take(&mut self.transfers) {
                if leader == transfer.to {
                    let _ = transfer.reply.send(Ok(()));
                } else if now >= transfer.deadline {
                    let _ = transfer.reply.send(Err(ProposeError::Rejected(format!(
                        "leadership did not move to node {} within {:?}; it may be behind or \
                         unreachable",
                        transfer.to, self.config.transfer_timeout
                    ))));
                } else {
                    self.transfers.push(transfer);
                }
            }
        }

        if self.campaign_when_ready {
            let raft = &self.node.raft;
            let cs = self.node.store().conf_state();
            let sole_voter = cs.voters == [self.config.id] && cs.voters_outgoing.is_empty();
            // raft-rs refuses to campaign while committed conf changes are unapplied.
            if !sole_voter || raft.state == StateRole::Leader {
                self.campaign_when_ready = false;
            } else if raft.raft_log.applied >= raft.raft_log.committed {
                self.campaign_when_ready = false;
                if let Err(err) = self.node.campaign() {
                    tracing::warn!(error = %err, "single voter could not campaign");
                }
            }
        }
    }

    fn on_leadership_lost(&mut self) {
        tracing::info!(
            pending = self.proposals.len(),
            "lost raft leadership; failing pending proposals"
        );
        for pending in std::mem::take(&mut self.proposals) {
            pending.waiter.fail(ProposeError::Dropped);
        }
        for reply in std::mem::take(&mut self.awaiting_joint_exit) {
            let _ = reply.send(Err(ProposeError::Dropped));
        }
        let not_leader = self.not_leader();
        let unconfirmed = std::mem::take(&mut self.new_reads)
            .into_iter()
            .chain(std::mem::take(&mut self.sent_reads).into_values().flatten());
        for reply in unconfirmed {
            let _ = reply.send(Err(not_leader.clone()));
        }
    }

    fn on_read_state(&mut self, read_state: ReadState) {
        if let Some(replies) = self.sent_reads.remove(&read_state.request_ctx) {
            self.confirmed_reads.push((read_state.index, replies));
        }
    }

    fn install_snapshot(&mut self, snapshot: &raft::eraftpb::Snapshot) -> Result<(), Fatal> {
        let index = snapshot.get_metadata().index;
        tracing::info!(
            index,
            bytes = snapshot.data.len(),
            "installing snapshot from the leader"
        );
        self.sm.restore(&snapshot.data).map_err(|err| {
            Fatal(format!(
                "the state machine rejected the leader's snapshot at index {index}: {err}"
            ))
        })?;
        self.applied = index;
        self.last_snapshot_index = index;
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            let pending = self.take_pending(&entry);
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if entry.data.is_empty() && entry.context.is_empty() {
                        // A new leader's empty entry: nothing to apply.
                        if let Some(pending) = pending {
                            pending.waiter.fail(ProposeError::Dropped);
                        }
                    } else {
                        let output = self.sm.apply(entry.index, &entry.data);
                        match pending.map(|p| p.waiter) {
                            Some(Waiter::Apply(reply)) => {
                                self.answers.push(Answer::Applied(reply, output));
                            }
                            Some(waiter) => waiter.fail(ProposeError::Dropped),
                            None => {}
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&entry, pending.map(|p| p.waiter));
                }
            }
            self.applied = entry.index;
        }
    }

    fn apply_conf_change(&mut self, entry: &Entry, waiter: Option<Waiter>) {
        let applied = if entry.get_entry_type() == EntryType::EntryConfChange {
            ConfChange::parse_from_bytes(&entry.data)
                .map_err(|e| e.to_string())
                .and_then(|cc| self.node.apply_conf_change(&cc).map_err(|e| e.to_string()))
        } else {
            ConfChangeV2::parse_from_bytes(&entry.data)
                .map_err(|e| e.to_string())
                .and_then(|cc| self.node.apply_conf_change(&cc).map_err(|e| e.to_string()))
        };
        match applied {
            Ok(cs) => {
                let membership = Membership::from(&cs);
                let joint = !cs.voters_outgoing.is_empty();
                tracing::info!(
                    index = entry.index,
                    ?membership,
                    joint,
                    "membership changed"
                );
                self.node.mut_store().set_conf_state(cs);
                match waiter {
                    Some(Waiter::Membership(reply)) => self.awaiting_joint_exit.push(reply),
                    Some(waiter) => waiter.fail(ProposeError::Dropped),
                    None => {}
                }
                if !joint {
                    for reply in std::mem::take(&mut self.awaiting_joint_exit) {
                        self.answers
                            .push(Answer::Membership(reply, membership.clone()));
                    }
                }
            }
            Err(err) => {
                tracing::warn!(index = entry.index, error = %err, "membership change not applied");
                if let Some(waiter) = waiter {
                    waiter.fail(ProposeError::Rejected(format!(
                        "the membership change was committed but could not be applied: {err}"
                    )));
                }
            }
        }
    }

    /// The waiter of the entry being applied, if this node proposed it. Proposals at lower
    /// indexes were overwritten (another leader's entries took their place).
    fn take_pending(&mut self, entry: &Entry) -> Option<Pending> {
        while let Some(front) = self.proposals.front() {
            if front.index > entry.index {
                return None;
            }
            let pending = self.proposals.pop_front()?;
            if pending.index < entry.index || pending.term != entry.term {
                pending.waiter.fail(ProposeError::Dropped);
                continue;
            }
            if entry.context.as_ref() != pending.context {
                // Same index and term: our entry, but raft replaced it when it was proposed (a
                // conf change refused because another one was pending). Nothing was applied.
                pending.waiter.fail(ProposeError::Rejected(
                    "raft refused the membership change (another change was in progress); retry"
                        .to_owned(),
                ));
                return None;
            }
            return Some(pending);
        }
        None
    }

    /// Takes a snapshot and compacts the log every `snapshot_interval` applied entries, or when
    /// raft needs a newer snapshot to send to a follower.
    fn maybe_snapshot(&mut self) -> Result<(), Fatal> {
        if self.stalled.is_some() {
            return Ok(());
        }
        let since_last = self.applied - self.last_snapshot_index;
        let wanted = self.node.store().take_snapshot_wanted();
        if since_last < self.config.snapshot_interval && !(wanted && since_last > 0) {
            return Ok(());
        }
        let started = Instant::now();
        let data = self.sm.snapshot();
        let bytes = data.len();
        let index = self.applied;
        let compact_to = index.saturating_sub(self.config.log_retained_after_snapshot);
        match self.node.mut_store().save_snapshot(data, index, compact_to) {
            Ok(()) => {}
            Err(RaftError::WriteFailed { detail, .. }) => {
                // The log stays as it is (longer); the next interval tries again.
                tracing::warn!(error = %detail, index, "cannot write a snapshot of the raft log; trying again later");
                self.last_snapshot_index = index;
                return Ok(());
            }
            Err(e) => return Err(Fatal(e.to_string())),
        }
        self.last_snapshot_index = index;
        tracing::debug!(
            index,
            bytes,
            first_index = self.node.store().first(),
            elapsed = ?started.elapsed(),
            "snapshot taken, log compacted"
        );
        Ok(())
    }

    fn send_messages(&mut self, messages: Vec<Message>) {
        for message in messages {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshot_recipients.push(message.to);
            }
            match message.write_to_bytes() {
                Ok(bytes) => self.transport.send(message.to, bytes),
                Err(err) => {
                    tracing::error!(to = message.to, error = %err, "cannot encode raft message")
                }
            }
        }
    }

    fn track(&mut self, context: [u8; 16], waiter: Waiter) {
        let index = self.node.raft.raft_log.last_index();
        // Older proposals at this index or later were cut from the log (this node lost and
        // regained leadership within one batch): they will not be applied.
        while self.proposals.back().is_some_and(|p| p.index >= index) {
            if let Some(stale) = self.proposals.pop_back() {
                stale.waiter.fail(ProposeError::Dropped);
            }
        }
        self.proposals.push_back(Pending {
            index,
            term: self.node.raft.term,
            context,
            waiter,
        });
    }

    fn new_context(&mut self) -> [u8; 16] {
        self.next_context += 1;
        let mut context = [0; 16];
        context[..8].copy_from_slice(&self.context_nonce.to_be_bytes());
        context[8..].copy_from_slice(&self.next_context.to_be_bytes());
        context
    }

    /// Whether this node leads a group of one voter and no learners, with no leadership
    /// transfer under way.
    /// A lone leader with nothing in flight: no reads waiting (a read that came before the
    /// leader's first commit of its term is issued on a later pass), no transfer.
    fn leads_alone(&self) -> bool {
        let cs = self.node.store().conf_state();
        self.is_leader()
            && cs.learners.is_empty()
            && cs.voters == [self.node.raft.id]
            && self.transfers.is_empty()
            && self.new_reads.is_empty()
            && self.sent_reads.is_empty()
            && self.confirmed_reads.is_empty()
    }

    /// Reads are waiting and may be issued now (the pass at the top of the loop ran before
    /// the commit that allows them).
    fn reads_ready(&self) -> bool {
        !self.new_reads.is_empty() && self.is_leader() && self.node.raft.commit_to_current_term()
    }

    fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    fn not_leader(&self) -> ProposeError {
        let leader = self.node.raft.leader_id;
        ProposeError::NotLeader {
            leader: (leader != raft::INVALID_ID && leader != self.config.id).then_some(leader),
        }
    }

    fn proposal_refused(&self, err: raft::Error) -> ProposeError {
        match err {
            raft::Error::ProposalDropped if !self.is_leader() => self.not_leader(),
            raft::Error::ProposalDropped if self.node.raft.prs().get(self.config.id).is_none() => {
                ProposeError::Rejected(
                    "this server was removed from the cluster; send requests to a member"
                        .to_owned(),
                )
            }
            raft::Error::ProposalDropped if self.node.raft.lead_transferee.is_some() => {
                ProposeError::Rejected(
                    "a leadership transfer is in progress; retry with the new leader".to_owned(),
                )
            }
            raft::Error::ProposalDropped => ProposeError::Rejected(
                "too many uncommitted entries (followers are slow or unreachable); retry later"
                    .to_owned(),
            ),
            other => ProposeError::Rejected(other.to_string()),
        }
    }

    fn publish_status(&self) {
        let status = self.current_status();
        self.status.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }

    /// Answers everyone still waiting and publishes the final status.
    fn stop(mut self, fatal: Option<String>) {
        for answer in std::mem::take(&mut self.answers) {
            answer.send();
        }
        let err = match &fatal {
            Some(msg) => ProposeError::Storage(msg.clone()),
            None => ProposeError::Shutdown,
        };
        for pending in std::mem::take(&mut self.proposals) {
            pending.waiter.fail(err.clone());
        }
        let reads = std::mem::take(&mut self.new_reads)
            .into_iter()
            .chain(std::mem::take(&mut self.sent_reads).into_values().flatten())
            .chain(
                std::mem::take(&mut self.confirmed_reads)
                    .into_iter()
                    .flat_map(|(_, replies)| replies),
            );
        for reply in reads {
            let _ = reply.send(Err(err.clone()));
        }
        for reply in std::mem::take(&mut self.awaiting_joint_exit) {
            let _ = reply.send(Err(err.clone()));
        }
        for transfer in std::mem::take(&mut self.transfers) {
            let _ = transfer.reply.send(Err(err.clone()));
        }
        let mut status = self.current_status();
        status.role = crate::Role::Follower;
        status.leader = None;
        status.progress.clear();
        status.stopped = true;
        status.fatal_error = fatal;
        self.status.send_replace(status);
        tracing::info!(path = %self.node.store().path().display(), "raft node stopped");
    }
}

fn node_of(change: &MembershipChange) -> u64 {
    match *change {
        MembershipChange::AddVoter(id)
        | MembershipChange::AddLearner(id)
        | MembershipChange::Remove(id) => id,
    }
}

/// A random number without a dependency: std's hasher keys are random per process.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    hasher.finish()
}
