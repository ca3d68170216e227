//! # coordinator: the Raft handle and the applied state
//!
//! One server's member of the Raft group: it proposes commands (forwarding them to the
//! leader from a follower), reads the applied [`State`], and makes reads linearizable
//! (ReadIndex). Nothing else: stores live in `crate::store`, read models in `crate::views`,
//! what the leader decides in `crate::leader`.
//!
//! May import: muster-core, muster-raft, muster-proto (the cluster client it forwards
//! with) and its own files. Never the stores, views, transport or leader loops.
//!
//! - `machine.rs`: the state machine muster-raft applies entries to.
//! - `peers.rs`: where the other servers are, and the Raft transport to them.
//! - `liveness.rs`: what the leader knows in memory and never replicates (heartbeats, why
//!   runs wait).

pub mod liveness;
pub mod machine;
pub mod peers;

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use muster_client::Channel;
use muster_core::compute::{ComputeKind, ComputeSpec};
use muster_core::{Applied, ApplyError, Command, State};
use muster_proto::v1;
use muster_raft::{ProposeError, RaftConfig, RaftHandle, RaftNode, Role};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use machine::{ApplyResult, Machine};
use peers::{GrpcTransport, NetworkFilter, Peers};

/// Why a command did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ProposalError {
    /// The state machine rejected it (nothing changed).
    #[error(transparent)]
    Rejected(#[from] ApplyError),
    /// Raft could not commit it.
    #[error(transparent)]
    Raft(#[from] ProposeError),
    /// This server is a follower and could not reach the leader to forward the command.
    #[error("the leader (server {leader}) could not be reached: {cause}; retry")]
    Forward {
        /// The leader's id.
        leader: u64,
        /// What failed.
        cause: String,
    },
    /// The apply result (from this server's Raft or the leader it forwarded to) did not
    /// decode: the servers may run different muster versions.
    #[error(
        "the answer to a proposal could not be decoded ({0}): the servers may run different muster versions; run the same version on every server"
    )]
    Undecodable(String),
}

/// One server's Raft member and the state it applies.
#[derive(Debug)]
pub struct Coordinator {
    raft: RaftHandle,
    state: Arc<RwLock<State>>,
    applied: watch::Receiver<u64>,
    peers: Peers,
    network: Option<Arc<dyn NetworkFilter>>,
    shutdown: watch::Sender<bool>,
    proposals: Counter,
    /// The longest election timeout: how long a write waits for a leader to appear.
    election_timeout: Duration,
}

/// What starting a coordinator takes (from `ServerConfig`).
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The Raft node's settings.
    pub raft: RaftConfig,
    /// id → `host:port` of the servers `--peers` named (and `--advertise` for this one).
    pub book: std::collections::BTreeMap<u64, String>,
    /// Test hook: drops messages between servers.
    pub network: Option<Arc<dyn NetworkFilter>>,
    /// What this server presents to its peers.
    pub credentials: muster_client::Credentials,
}

/// How [`Coordinator::forward`] says the leader's port refused the connection.
const REFUSED: &str = "the leader refused the connection";

impl Coordinator {
    /// Starts Raft over the log in `raft_dir`, applying to `state`. Fails if the log is
    /// corrupt; never starts empty over an existing one. `proposals` counts what this
    /// server proposed.
    pub async fn start(
        config: CoordinatorConfig,
        raft_dir: &Path,
        state: Arc<RwLock<State>>,
        proposals: Counter,
    ) -> anyhow::Result<Arc<Coordinator>> {
        let (applied_tx, applied) = watch::channel(0);
        let machine = Machine::new(state.clone(), applied_tx);
        let raft_config = config.raft.clone();
        let election_timeout = raft_config.tick_interval * raft_config.max_election_tick as u32;
        if config.book.keys().any(|id| *id != config.raft.id) && raft_dir.join("raft.redb").exists()
        {
            tracing::info!(
                "the data directory already holds cluster state: --peers is ignored for membership (it comes from the log) and only fills in addresses the replicated state lacks"
            );
        }
        let peers = Peers::new(
            state.clone(),
            config.book.clone(),
            config.credentials.clone(),
        );
        let transport = Arc::new(GrpcTransport::new(
            raft_config.id,
            peers.clone(),
            config.network.clone(),
        ));
        let raft = RaftNode::start(raft_config, raft_dir, machine, transport)
            .with_context(|| format!("cannot open the replicated log in {}", raft_dir.display()))?;
        let coordinator = Arc::new(Coordinator {
            raft,
            state,
            applied,
            peers,
            network: config.network,
            shutdown: watch::channel(false).0,
            proposals,
            election_timeout,
        });
        tokio::spawn(coordinator.clone().record_addresses_when_leading());
        Ok(coordinator)
    }

    /// Creates the `local` compute target unless it exists (`muster dev`'s first start),
    /// and makes it the default workspace's serverless compute when it creates it, so
    /// Azure ML files with `compute: serverless` run as written.
    pub async fn ensure_local_compute(&self) -> anyhow::Result<()> {
        // The single voter needs a moment to elect itself after start.
        for _ in 0..100 {
            if self.read(|s| s.computes.contains_key("local")) {
                return Ok(());
            }
            let cmd = Command::CreateCompute {
                spec: ComputeSpec::new("local", ComputeKind::Local),
                at: now_ms(),
            };
            match self.propose(cmd).await {
                Ok(_) => {
                    let serverless = Command::Access {
                        change: Box::new(muster_core::access::AccessChange::SetServerlessCompute {
                            workspace: muster_core::access::DEFAULT_WORKSPACE.into(),
                            compute: Some("local".into()),
                        }),
                        by: "muster dev".into(),
                        at: now_ms(),
                    };
                    self.propose(serverless)
                        .await
                        .context("cannot make local the serverless compute target")?;
                    return Ok(());
                }
                Err(ProposalError::Rejected(ApplyError::ComputeExists(_))) => return Ok(()),
                Err(ProposalError::Raft(
                    ProposeError::NotLeader { .. } | ProposeError::Dropped,
                )) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e).context("cannot create the local compute target"),
            }
        }
        anyhow::bail!(
            "the server did not become leader within 5 s; cannot create the local compute target"
        )
    }

    /// While this server leads: each time it becomes leader, records in the replicated
    /// state the address of every member the state lacks, from what `--peers` (or gossip)
    /// told this server. Ends at shutdown.
    async fn record_addresses_when_leading(self: Arc<Self>) {
        let mut status = self.raft.watch_status();
        loop {
            let leading = tokio::select! {
                r = status.wait_for(|s| s.role == Role::Leader) => r.map(|s| s.term).ok(),
                _ = self.shutting_down() => None,
            };
            let Some(term) = leading else { return };
            self.record_missing_addresses(term).await;
            let stepped_down = tokio::select! {
                r = status.wait_for(|s| s.role != Role::Leader || s.term != term) => r.is_ok(),
                _ = self.shutting_down() => false,
            };
            if !stepped_down {
                return;
            }
        }
    }

    async fn record_missing_addresses(&self, term: u64) {
        // Apply everything committed before this leadership first, so the membership and
        // the recorded addresses read below are current.
        let mut index = None;
        for _ in 0..50 {
            let s = self.raft.status();
            if s.role != Role::Leader || s.term != term {
                return;
            }
            match self.raft.read_index().await {
                Ok(i) => {
                    index = Some(i);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let Some(index) = index else { return };
        if !self.wait_applied(index).await {
            return;
        }
        let s = self.raft.status();
        let missing: Vec<(u64, String)> = s
            .voters
            .iter()
            .chain(s.learners.iter())
            .filter(|id| self.peers.replicated(**id).is_none())
            .filter_map(|id| self.peers.unreplicated(*id).map(|a| (*id, a)))
            .collect();
        for (id, address) in missing {
            match self
                .propose(Command::SetServerAddress {
                    id,
                    address: address.clone(),
                })
                .await
            {
                Ok(_) => {
                    tracing::info!(server = id, %address, "recorded a server's address in the replicated state")
                }
                Err(e) => {
                    tracing::warn!(server = id, cause = %e, "could not record a server's address; the next leader will");
                    return;
                }
            }
        }
    }

    /// Proposes a command and waits until it is applied here. On a follower the command is
    /// forwarded to the leader, and the answer waits until this replica has applied it too
    /// (so a client reading from this server next sees its write).
    #[tracing::instrument(level = "debug", name = "propose", skip_all, fields(command = command.kind(), run_id = command.run_id()))]
    pub async fn propose(&self, command: Command) -> Result<Applied, ProposalError> {
        let encoded = command.encode();
        self.await_leader().await?;
        // A follower that knows its leader forwards at once: asking its own Raft thread first
        // would queue behind that thread's current Ready (an fsync, under load) only to hear
        // "not the leader". The status is at most one Ready old; if it is stale, the old
        // leader answers "not the leader" and the client retries, as it would anyway.
        // A leader that is gone (its port refuses: killed, restarting) never saw the write:
        // this server waits for the next leader and sends it there, so the client's answer
        // comes with the new leader instead of after its own retries (bounded: twice).
        let mut tries = 0;
        let bytes = loop {
            tries += 1;
            let status = self.raft.status();
            let sent = match status.leader {
                Some(leader) if status.role != Role::Leader && leader != self.raft.id() => {
                    self.forward(leader, encoded.clone()).await
                }
                _ => match self.raft.propose(encoded.clone()).await {
                    Ok(b) => Ok(b),
                    Err(ProposeError::NotLeader {
                        leader: Some(leader),
                    }) if leader != self.raft.id() => self.forward(leader, encoded.clone()).await,
                    Err(e) => return Err(e.into()),
                },
            };
            match sent {
                Err(ProposalError::Forward { leader, cause })
                    if tries < 3 && cause.contains(REFUSED) =>
                {
                    if !self.await_leader_other_than(leader).await {
                        return Err(ProposalError::Forward { leader, cause });
                    }
                }
                other => break other?,
            }
        };
        self.proposals.inc();
        let result: ApplyResult = serde_json::from_slice(&bytes)
            .map_err(|e| ProposalError::Undecodable(e.to_string()))?;
        Ok(result?)
    }

    /// Whether the test network (if any) lets this server reach `to`.
    pub fn reaches(&self, to: u64) -> bool {
        self.network
            .as_ref()
            .is_none_or(|n| n.allows(self.raft.id(), to))
    }

    async fn forward(&self, leader: u64, command: Vec<u8>) -> Result<Vec<u8>, ProposalError> {
        let fail = |cause: String| ProposalError::Forward { leader, cause };
        if !self.reaches(leader) {
            return Err(fail("the network to it is cut".into()));
        }
        let mut client = self
            .peers
            .client(leader)
            .ok_or_else(|| fail("its address is unknown to this server".into()))?;
        // A leader that froze (a stopped VM, a stalled disk) accepts the connection and never
        // answers: give up as soon as this server hears of another leader (or of none), so
        // the client retries at once instead of waiting out the call's deadline.
        let mut status = self.raft.watch_status();
        let moved = status.wait_for(|s| s.leader != Some(leader));
        let answer = tokio::select! {
            answer = client.forward(v1::ForwardRequest { command }) => answer
                .map_err(|s| {
                    // The connection was refused: the write never reached the leader.
                    let refused = s.code() == tonic::Code::Unavailable
                        && s.message().contains("tcp connect");
                    let cause = s.message().to_string();
                    fail(if refused { format!("{REFUSED}: {cause}") } else { cause })
                })?
                .into_inner(),
            _ = moved => return Err(fail(
                "the leader changed while the write was on its way; retry (a submission's idempotency key makes that safe)".into(),
            )),
        };
        if !self.wait_applied(answer.index).await {
            // Applied on the leader, but not (yet) here: a server being removed, or far
            // behind. The client retries elsewhere; its idempotency key finds the result.
            return Err(fail(format!(
                "the write was applied by the leader, but this server has not caught up to it (index {}); retry against another server",
                answer.index
            )));
        }
        Ok(answer.result)
    }

    /// A linearizable read may proceed once this replica has applied `index`.
    async fn caught_up(&self, index: u64, leader: u64) -> Result<(), ProposalError> {
        if self.wait_applied(index).await {
            return Ok(());
        }
        Err(ProposalError::Forward {
            leader,
            cause: format!(
                "this server has not caught up to index {index}; retry, or read with --stale"
            ),
        })
    }

    /// Waits (bounded: two election timeouts, time for this server to notice the loss and
    /// for an election) until a server other than `gone` leads; false if none did.
    async fn await_leader_other_than(&self, gone: u64) -> bool {
        let mut status = self.raft.watch_status();
        tokio::time::timeout(self.election_timeout * 2, async move {
            status
                .wait_for(|s| s.leader.is_some_and(|l| l != gone))
                .await
                .is_ok()
        })
        .await
        .unwrap_or(false)
    }

    /// Waits at most one election timeout until some server leads. Without a leader by
    /// then, `NotLeader { leader: None }`: this server cannot reach a majority (it is on the
    /// minority side of a partition) or elections keep failing. Every write checks this
    /// first (before a submission replicates its snapshot), so a cut-off server answers
    /// "no leader" within about a second instead of letting the client wait out its
    /// timeout, and the client tries another server.
    pub async fn await_leader(&self) -> Result<(), ProposalError> {
        let mut status = self.raft.watch_status();
        if status.borrow().leader.is_some() {
            return Ok(());
        }
        let found = tokio::time::timeout(self.election_timeout, async move {
            status.wait_for(|s| s.leader.is_some()).await.is_ok()
        })
        .await
        .unwrap_or(false);
        if found {
            Ok(())
        } else {
            Err(ProposalError::Raft(ProposeError::NotLeader {
                leader: None,
            }))
        }
    }

    /// Waits (bounded: 5 s) until this replica has applied `index`; false if it did not.
    pub async fn wait_applied(&self, index: u64) -> bool {
        let mut status = self.raft.watch_status();
        tokio::time::timeout(Duration::from_secs(5), async move {
            status.wait_for(|s| s.applied_index >= index).await.is_ok()
        })
        .await
        .unwrap_or(false)
    }

    /// Makes the next read linearizable: on the leader a ReadIndex round; on a follower the
    /// leader's read index, then waiting until this replica has applied it. `stale` skips it.
    pub async fn linearize(&self, stale: bool) -> Result<(), ProposalError> {
        if stale {
            return Ok(());
        }
        match self.raft.read_index().await {
            Ok(index) => self.caught_up(index, self.raft.id()).await,
            Err(ProposeError::NotLeader {
                leader: Some(leader),
            }) if leader != self.raft.id() => {
                let fail = |cause: String| ProposalError::Forward { leader, cause };
                let mut client = self
                    .peers
                    .client(leader)
                    .ok_or_else(|| fail("its address is unknown".into()))?;
                let index = client
                    .read_index(v1::ReadIndexRequest {})
                    .await
                    .map_err(|s| fail(s.message().to_string()))?
                    .into_inner()
                    .index;
                self.caught_up(index, leader).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The leader's address, when known.
    pub fn leader_address(&self) -> Option<String> {
        self.raft
            .status()
            .leader
            .and_then(|l| self.peers.address(l))
    }

    /// Reads the state under its lock (keep `f` short).
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.state.read().expect("state lock"))
    }

    /// A receiver of the applied index: it changes after every applied command.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Whether this server leads the Raft group.
    pub fn is_leader(&self) -> bool {
        self.raft.status().role == Role::Leader
    }

    /// The Raft handle.
    pub fn raft(&self) -> &RaftHandle {
        &self.raft
    }

    /// Where the other servers are.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// A lazily connected channel to a peer this server reaches (a partition test may cut
    /// it off), by its replicated address.
    pub fn peer_channel(&self, peer: u64) -> Option<Channel> {
        if !self.reaches(peer) {
            return None;
        }
        let address = self.peers.address(peer)?;
        self.peers
            .channel(&address, |e| e.connect_timeout(Duration::from_secs(1)))
    }

    /// A channel to the leader, when this server is a follower that knows and reaches it
    /// (a follower relays log and metric streams the leader holds).
    pub fn leader_channel(&self) -> Option<Channel> {
        if self.is_leader() {
            return None;
        }
        self.peer_channel(self.raft.status().leader?)
    }

    /// Resolves when the server begins shutting down.
    pub async fn shutting_down(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Tells long-lived streams to end.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Stops Raft and releases the data directory.
    pub async fn stop(&self) {
        self.begin_shutdown();
        self.raft.shutdown().await;
    }
}

/// Now, in Unix milliseconds (the server is where the clock is read).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The letters of generated ids.
pub const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A new id: `prefix` and 10 random lowercase letters and digits (ids are chosen by the
/// proposer: core has no randomness).
pub fn new_id(prefix: &str) -> String {
    let mut id = String::from(prefix);
    for _ in 0..10 {
        id.push(ID_ALPHABET[rand::random_range(0..ID_ALPHABET.len())] as char);
    }
    id
}

/// A token's public id: 12 random lowercase letters and digits.
pub fn new_token_id() -> String {
    new_id("")
        .chars()
        .chain(new_id("").chars())
        .take(12)
        .collect()
}

/// A token's secret: 32 random letters and digits (190 bits) from the thread's CSPRNG
/// (`rand`'s ChaCha12, seeded by the operating system).
pub fn new_secret() -> String {
    const BASE62: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..32)
        .map(|_| BASE62[rand::random_range(0..BASE62.len())] as char)
        .collect()
}

/// A new run id: `run-` and 10 random lowercase letters and digits.
pub fn new_run_id() -> String {
    new_id("run-")
}
