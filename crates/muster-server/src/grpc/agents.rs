//! AgentService: node registration, heartbeats, and the session stream on which a node
//! gets its assignments and stop orders and ships updates and logs.
//!
//! The session is level-triggered: on every state change it compares what the state says
//! the node should run with what it has told the node, so a reconnect or a failover needs
//! no special path (the node re-reports what it runs; stale attempts are stopped).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use muster_core::access::{
    AccessChange, Principal, TOKEN_PREFIX, Token, format_token, hash_secret,
};
use muster_core::compute::Tier;
use muster_core::names::validate_node_name;
use muster_core::node::{self, After, AttemptKey, Effect, Order, StopReason};
use muster_core::resources::Capacity;
use muster_core::sizes::SIZE_LABEL;
use muster_core::state::{AttemptEnd, CheckpointCause};
use muster_core::{Applied, ApplyError, AttemptReport, Command};
use muster_proto::v1::{self, agent_message, agent_service_server::AgentService, server_message};
use muster_proto::{Word, checkpoint_to_wire, decode_enum, placement_to_assignment};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::coordinator::{ProposalError, new_secret, new_token_id, now_ms};
use crate::grpc::auth::Caller;
use crate::grpc::{rejected, status};
use crate::server::Server;
use crate::store::{Append, Feed, Stream as MetricStream};

pub(crate) struct Agents(pub Arc<Server>);

type Outbound = mpsc::Sender<Result<v1::ServerMessage, Status>>;
type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::ServerMessage, Status>> + Send>>;

impl Agents {
    /// Checks that the calling agent is node `node_id` (or, registering, will be): an
    /// agent's credential names one node of one compute target, and it may speak only for
    /// that node — never for another node's id.
    fn own_node(&self, caller: &Caller, node_id: &str) -> Result<(), Status> {
        let Caller::Agent { node, .. } = caller else {
            return Err(Status::permission_denied(format!(
                "{} is not an agent",
                caller.label()
            )));
        };
        match self
            .0
            .coordinator
            .read(|s| s.nodes.get(node_id).map(|n| n.name.clone()))
        {
            Some(name) if name != *node => Err(Status::permission_denied(format!(
                "node id {node_id} belongs to node {name}; this agent's credential is for node {node}"
            ))),
            _ => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl AgentService for Agents {
    async fn join(
        &self,
        req: Request<v1::JoinRequest>,
    ) -> Result<Response<v1::JoinResponse>, Status> {
        let req = req.into_inner();
        validate_node_name(&req.node_name)
            .map_err(|e| Status::invalid_argument(format!("node_name: {e}")))?;
        // A name in use stays its node's: the join token is not spent on a clash.
        if self
            .0
            .coordinator
            .read(|s| s.nodes.values().any(|n| n.name == req.node_name))
        {
            return Err(rejected(ApplyError::NodeNameTaken(req.node_name)));
        }
        let now = now_ms();
        let (join_id, compute) = self
            .0
            .coordinator
            .read(|s| {
                s.access
                    .check_join(&req.join_token, now)
                    .map(|j| (j.id.clone(), j.compute.clone()))
            })
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        // A certificate for the node's own key, when this server signs agents' requests.
        let (certificate_pem, ca_pem) = match (req.csr_pem.trim(), &self.0.config.tls) {
            ("", _) => (String::new(), String::new()),
            (csr, Some(files)) if files.ca_key.is_some() => {
                let read = |p: &std::path::Path| {
                    std::fs::read_to_string(p)
                        .map_err(|e| Status::internal(format!("{}: {e}", p.display())))
                };
                let ca = muster_client::pki::Ca {
                    cert_pem: read(&files.ca)?,
                    key_pem: read(files.ca_key.as_deref().expect("checked"))?,
                };
                let cert = ca
                    .sign_agent(csr, &compute, &req.node_name)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                (cert, ca.cert_pem)
            }
            // The servers do not sign: the node joins with its token alone.
            _ => (String::new(), String::new()),
        };
        let id = new_token_id();
        let secret = new_secret();
        let credential = Token {
            id: id.clone(),
            principal: Principal::Agent {
                node: req.node_name.clone(),
                compute: compute.clone(),
            },
            name: format!("agent of {}", req.node_name),
            hash: hash_secret(&secret),
            created_at: now,
            expires_at: None,
            revoked_at: None,
            created_by: format!("join:{join_id}"),
        };
        self.0
            .coordinator
            .propose(Command::Access {
                change: Box::new(AccessChange::Join {
                    join_id,
                    node: req.node_name.clone(),
                    credential,
                }),
                by: format!("agent:{}", req.node_name),
                at: now,
            })
            .await?;
        Ok(Response::new(v1::JoinResponse {
            credential: format_token(TOKEN_PREFIX, &id, &secret),
            compute,
            certificate_pem,
            ca_pem,
        }))
    }

    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        validate_node_name(&req.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        if let Caller::Agent { node, compute, .. } = &caller
            && (req.name != *node || req.compute != *compute)
        {
            return Err(Status::permission_denied(format!(
                "this agent's credential is for node {node} of compute {compute}; it cannot register as {} of {}: join again with a new join token to change",
                req.name, req.compute
            )));
        }
        self.own_node(&caller, &req.node_id)?;
        if req.node_id.is_empty() || req.node_id.len() > 64 {
            return Err(Status::invalid_argument(
                "node_id: give the node's stable id (1 to 64 characters)",
            ));
        }
        let tier = if req.tier.is_empty() {
            Tier::Dedicated
        } else {
            Tier::parse(&req.tier).map_err(|e| Status::invalid_argument(format!("tier: {e}")))?
        };
        let mut labels = req.labels.into_iter().collect::<BTreeMap<_, _>>();
        let size = self.0.coordinator.read(|s| {
            s.second_instance_node(&req.compute, &req.node_id)
                .map(Err)
                .unwrap_or_else(|| {
                    Ok(s.computes
                        .get(&req.compute)
                        .and_then(|c| c.spec.size.clone()))
                })
        });
        // Every node of a sized target carries the size as its label, for
        // `resources.instance_type` to select (an agent's own `size` label stands).
        if let Some(size) = size.map_err(Status::already_exists)? {
            labels.entry(SIZE_LABEL.to_string()).or_insert(size);
        }
        let capacity = req.capacity.unwrap_or_default();
        let mut gpus: Vec<muster_core::Gpu> = req.gpus.into_iter().map(Into::into).collect();
        gpus.sort();
        let cmd = Command::RegisterNode {
            node_id: req.node_id.clone(),
            name: req.name,
            compute: req.compute,
            capacity: Capacity {
                cpu_millis: capacity.cpu_millis,
                memory_bytes: capacity.memory_bytes,
                gpus,
                max_runs: req.max_runs,
            },
            labels,
            tier,
            address: req.address,
            at: now_ms(),
        };
        self.0.coordinator.propose(cmd).await?;
        self.0.heartbeats.beat(&req.node_id);
        Ok(Response::new(v1::RegisterResponse {
            node_id: req.node_id,
            heartbeat_interval_ms: self.0.config.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let caller = Caller::of(&req);
        let node_id = req.into_inner().node_id;
        self.own_node(&caller, &node_id)?;
        if !self.0.coordinator.read(|s| s.nodes.contains_key(&node_id)) {
            return Err(Status::not_found(format!(
                "node {node_id} is not registered: register first"
            )));
        }
        self.0.heartbeats.beat(&node_id);
        Ok(Response::new(v1::HeartbeatResponse {}))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        // Sessions live on the leader (it schedules and watches heartbeats); a follower
        // points the agent at it.
        if !self.0.coordinator.is_leader() {
            return Err(match self.0.coordinator.leader_address() {
                Some(addr) => {
                    let mut s = Status::unavailable(format!(
                        "this server is not the leader; the leader is at {addr}"
                    ));
                    if let Ok(v) = addr.parse() {
                        s.metadata_mut().insert(muster_client::LEADER_HEADER, v);
                    }
                    s
                }
                None => {
                    Status::unavailable("the cluster has no leader right now; retry in a second")
                }
            });
        }
        let caller = Caller::of(&req);
        let mut inbound = req.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(v1::AgentMessage {
                msg: Some(agent_message::Msg::Hello(h)),
            })) => h,
            Some(Err(e)) => return Err(e),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Hello",
                ));
            }
        };
        self.own_node(&caller, &hello.node_id)?;
        if !self
            .0
            .coordinator
            .read(|s| s.nodes.contains_key(&hello.node_id))
        {
            return Err(Status::failed_precondition(format!(
                "node {} is not registered: call Register first",
                hello.node_id
            )));
        }
        let (tx, rx) = mpsc::channel(256);
        let session = Session {
            link: Link {
                server: self.0.clone(),
                node_id: hello.node_id.clone(),
                tx,
            },
            reports: Reports::default(),
            told: node::Session {
                running: hello
                    .running
                    .iter()
                    .map(|r| (r.run_id.clone(), r.attempt))
                    .collect(),
                ..node::Session::default()
            },
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What a session's tasks share: the server, the node, and the stream to the agent.
#[derive(Clone)]
struct Link {
    server: Arc<Server>,
    node_id: String,
    tx: Outbound,
}

/// An attempt's report carried out (its effects stored and its command applied), to be
/// followed up on the session loop: `None` when there was nothing to apply.
type Carried = (
    AttemptKey,
    Result<Option<(node::Report, Applied, i32)>, Status>,
);

/// The reports in flight on one session: one chain per attempt, so an attempt's reports
/// are carried out in the order the agent sent them, while different attempts' proceed at
/// once (their proposals share Raft's batches and fsyncs instead of queueing one by one
/// behind each other: a node finishing many short runs is not held to one commit at a time).
#[derive(Default)]
struct Reports {
    /// Attempts with a report in flight, and their reports waiting behind it.
    waiting: HashMap<AttemptKey, VecDeque<v1::AttemptUpdate>>,
    in_flight: FuturesUnordered<BoxFuture<'static, Carried>>,
}

impl Reports {
    /// Takes `u`: returns it to start now, or queues it behind its attempt's report in
    /// flight. A queued progress report that a later one of the same attempt supersedes
    /// (preparing, then running) is dropped: applying the later one alone leaves the same
    /// state.
    fn queue(&mut self, u: v1::AttemptUpdate) -> Option<v1::AttemptUpdate> {
        let key = (u.run_id.clone(), u.attempt);
        let Some(queue) = self.waiting.get_mut(&key) else {
            self.waiting.insert(key, VecDeque::new());
            return Some(u);
        };
        if u.state == v1::AttemptState::Running as i32
            && queue
                .back()
                .is_some_and(|q| q.state == v1::AttemptState::Preparing as i32)
        {
            queue.pop_back();
        }
        queue.push_back(u);
        None
    }

    /// After `key`'s report finished: its next one to start, if any.
    fn done(&mut self, key: &AttemptKey) -> Option<v1::AttemptUpdate> {
        let next = self.waiting.get_mut(key).and_then(VecDeque::pop_front);
        if next.is_none() {
            self.waiting.remove(key);
        }
        next
    }

    /// Carries out `u` beside the session loop.
    fn start(&mut self, link: &Link, u: v1::AttemptUpdate) {
        let key = (u.run_id.clone(), u.attempt);
        self.in_flight
            .push(Box::pin(carry_out(link.clone(), key, u)));
    }

    /// The next finished report (pending forever while none is in flight).
    async fn finished(&mut self) -> Carried {
        match self.in_flight.next().await {
            Some(done) => done,
            None => std::future::pending().await,
        }
    }
}

struct Session {
    link: Link,
    /// What this session told the node, and what the node runs (muster-core's protocol).
    told: node::Session,
    reports: Reports,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<v1::AgentMessage>) {
        let link = self.link.clone();
        tracing::info!(node = %link.node_id, "agent session opened");
        link.server.heartbeats.beat(&link.node_id);
        let resumes: Vec<(String, u32)> = self.told.running.iter().cloned().collect();
        for (run_id, attempt) in resumes {
            link.send_resume(&run_id, attempt).await;
            // Metrics of a rank still live: ship from this server's copy (a new leader's
            // may be shorter than the last one's).
            let rank = link.rank(&run_id, attempt).unwrap_or(0);
            if link.server.sealed_log(&run_id, attempt, rank).is_none() {
                let offset = link.metric_len(&run_id, attempt);
                link.send_metric_resume(&run_id, attempt, offset).await;
            }
        }
        let mut changes = link.server.coordinator.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut leadership = link.server.coordinator.raft().watch_status();
        let result: Result<(), Status> = async {
            loop {
                self.dispatch().await?;
                tokio::select! {
                    msg = inbound.next() => match msg {
                        Some(Ok(m)) => self.on_message(m).await?,
                        Some(Err(e)) => return Err(e),
                        None => return Ok(()),
                    },
                    (key, carried) = self.reports.finished() => {
                        if let Some(next) = self.reports.done(&key) {
                            self.reports.start(&link, next);
                        }
                        if let Some((report, applied, state)) = carried? {
                            self.after(&report, &applied, state).await?;
                        }
                    }
                    _ = changes.changed() => {}
                    _ = tick.tick() => {}
                    _ = link.server.coordinator.shutting_down() => {
                        return Err(Status::unavailable("the server is shutting down; reconnect"));
                    }
                    _ = async { leadership.wait_for(|s| s.role != muster_raft::Role::Leader).await.is_ok() } => {
                        return Err(Status::unavailable("this server lost leadership; reconnect to the new leader"));
                    }
                }
            }
        }
        .await;
        match result {
            Ok(()) => tracing::info!(node = %link.node_id, "agent session closed"),
            Err(e) => {
                tracing::info!(node = %link.node_id, cause = %e.message(), "agent session ended");
                let _ = link.tx.send(Err(e)).await;
            }
        }
    }

    /// Sends what the state asks of this node and the agent has not been told yet
    /// (muster-core's `node::orders`), each assignment built into its wire form.
    async fn dispatch(&mut self) -> Result<(), Status> {
        let grace_ms = self.link.server.config.stop_grace.as_millis() as u64;
        let node_id = self.link.node_id.clone();
        let messages: Vec<server_message::Msg> = self.link.server.coordinator.read(|s| {
            node::orders(s, &node_id, &mut self.told)
                .into_iter()
                .filter_map(|order| match order {
                    Order::Assign { attempt, rank } => {
                        assignment(s, self.link.server.secret_key.get(), &attempt, rank)
                    }
                    Order::Stop { attempt, reason } => {
                        Some(stop_message(attempt, reason, grace_ms))
                    }
                })
                .collect()
        });
        for msg in messages {
            if let server_message::Msg::Assign(a) = &msg {
                tracing::debug!(node = %self.link.node_id, run_id = %a.run_id, attempt = a.attempt, "assigning");
            }
            self.link.send(msg).await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, msg: v1::AgentMessage) -> Result<(), Status> {
        let link = &self.link;
        link.server.heartbeats.beat(&link.node_id);
        match msg.msg {
            Some(agent_message::Msg::Heartbeat(h)) => {
                self.told.running = h
                    .running
                    .into_iter()
                    .map(|r| (r.run_id, r.attempt))
                    .collect();
            }
            Some(agent_message::Msg::Log(log)) => {
                let Some(rank) = link.rank(&log.run_id, log.attempt) else {
                    return Ok(());
                };
                if link
                    .server
                    .sealed_log(&log.run_id, log.attempt, rank)
                    .is_some()
                {
                    // Fenced: the rank's log was sealed (its end was reported, or its node
                    // was declared lost); a late agent's bytes are not part of it.
                    tracing::debug!(node = %link.node_id, run_id = %log.run_id, attempt = log.attempt, rank, "dropping log bytes of a sealed log");
                    return Ok(());
                }
                match link.server.store.logs.append(
                    &log.run_id,
                    log.attempt,
                    rank,
                    log.offset,
                    &log.data,
                ) {
                    Ok(Append::Stored(_)) => {
                        // Stdout metric lines come from the log bytes themselves.
                        if let Err(e) = link.server.store.feed_log_metrics(
                            &log.run_id,
                            log.attempt,
                            rank,
                            log.offset,
                            &log.data,
                        ) {
                            tracing::warn!(run_id = %log.run_id, cause = %e, "cannot store metrics from the log");
                        }
                    }
                    Ok(Append::Sealed) => {}
                    Ok(Append::Gap(_)) => link.send_resume(&log.run_id, log.attempt).await,
                    Err(e) => return Err(Status::internal(format!("storing logs: {e}"))),
                }
            }
            Some(agent_message::Msg::Metrics(m)) => {
                let Some(rank) = link.rank(&m.run_id, m.attempt) else {
                    return Ok(());
                };
                if link.server.sealed_log(&m.run_id, m.attempt, rank).is_some() {
                    // Fenced with the log: the rank ended (or its node was declared lost)
                    // and its metrics are complete; a late agent's bytes are not part of them.
                    return Ok(());
                }
                let stream = MetricStream::File {
                    attempt: m.attempt,
                    rank,
                };
                match link
                    .server
                    .store
                    .series
                    .feed(&m.run_id, stream, m.offset, &m.data)
                {
                    Ok(Feed::Stored(_)) => {}
                    Ok(Feed::Gap(offset)) => {
                        link.send_metric_resume(&m.run_id, m.attempt, offset).await
                    }
                    Err(e) => return Err(Status::internal(format!("storing metrics: {e}"))),
                }
            }
            // A periodic checkpoint: replicated and recorded beside the session loop; the
            // next one supersedes it, so nothing is answered.
            Some(agent_message::Msg::Checkpoint(c)) => {
                let taken = taken_checkpoint(c.checkpoint.as_ref(), "checkpoint.checkpoint")?
                    .ok_or_else(|| Status::invalid_argument("checkpoint.checkpoint: missing"))?;
                tokio::spawn(record_checkpoint(
                    self.link.clone(),
                    (c.run_id, c.attempt),
                    taken,
                ));
            }
            // Carried out beside the session loop (logs and heartbeats keep flowing).
            Some(agent_message::Msg::Update(u)) => {
                // An unknown state or end ends the session at once, naming the field.
                attempt_report(&u)?;
                taken_checkpoint(u.checkpoint.as_ref(), "update.checkpoint")?;
                if let Some(u) = self.reports.queue(u) {
                    self.reports.start(&self.link, u);
                }
            }
            Some(agent_message::Msg::Hello(_)) | None => {}
        }
        Ok(())
    }

    /// What follows an applied report (muster-core's `node::on_applied`): remove the live
    /// log of a sealed rank, acknowledge an end, fence a stale start.
    async fn after(
        &mut self,
        report: &node::Report,
        applied: &Applied,
        state: i32,
    ) -> Result<(), Status> {
        let link = &self.link;
        let grace_ms = link.server.config.stop_grace.as_millis() as u64;
        let after = link
            .server
            .coordinator
            .read(|s| node::on_applied(s, &link.node_id, &mut self.told, report, applied));
        for step in after {
            match step {
                After::RemoveLiveLog { attempt, rank } => {
                    // The sealed blob is the log now; the file it was copied from can go.
                    if let Err(e) = link.server.store.logs.remove(&attempt.0, attempt.1, rank) {
                        tracing::warn!(cause = %e, "could not remove a sealed log file");
                    }
                }
                After::Ack { attempt } => {
                    link.send(server_message::Msg::Ack(v1::UpdateAck {
                        run_id: attempt.0,
                        attempt: attempt.1,
                        state,
                    }))
                    .await?;
                }
                After::Stop { attempt, reason } => {
                    link.send(stop_message(attempt, reason, grace_ms)).await?;
                }
            }
        }
        Ok(())
    }
}

/// Carries out one report of an attempt (muster-core's `node::on_report`): asks for
/// missing log or metric bytes, seals the rank's log and metrics, replicates its outputs,
/// and proposes the report.
#[tracing::instrument(name = "report", skip_all, fields(node = %link.node_id, run_id = %u.run_id, attempt = u.attempt, state = ?u.state))]
async fn carry_out(link: Link, key: AttemptKey, u: v1::AttemptUpdate) -> Carried {
    let result = carry_out_report(&link, &u).await;
    (key, result)
}

async fn carry_out_report(
    link: &Link,
    u: &v1::AttemptUpdate,
) -> Result<Option<(node::Report, Applied, i32)>, Status> {
    let report = node::Report {
        attempt: (u.run_id.clone(), u.attempt),
        report: attempt_report(u)?,
        log_bytes: u.log_bytes,
        metric_bytes: u.metric_bytes,
        checkpoint: taken_checkpoint(u.checkpoint.as_ref(), "update.checkpoint")?,
    };
    let server = &link.server;
    let rank = link.rank(&u.run_id, u.attempt).unwrap_or(0);
    let held = node::Held {
        log_bytes: server.store.logs.len(&u.run_id, u.attempt, rank),
        metric_bytes: link.metric_len(&u.run_id, u.attempt),
    };
    let effects = server
        .coordinator
        .read(|s| node::on_report(s, &link.node_id, &report, held, now_ms()));
    let mut applied = None;
    for effect in effects {
        match effect {
            Effect::ReplicateCheckpoint { sha256 } => {
                server
                    .store
                    .replicas
                    .ensure_replicated(vec![sha256])
                    .await?;
            }
            Effect::RecordCheckpoint(cmd) => propose_checkpoint(server, *cmd).await?,
            Effect::ResumeLog { attempt, .. } => {
                // Logs are still missing: ask for them; the agent re-sends the end after.
                link.send_resume(&attempt.0, attempt.1).await;
            }
            Effect::ResumeMetrics { attempt, offset } => {
                link.send_metric_resume(&attempt.0, attempt.1, offset).await;
            }
            Effect::SealLog { attempt, rank } => {
                server.seal_log(&attempt.0, attempt.1, rank).await?;
            }
            Effect::SealMetrics { attempt, rank } => {
                server.seal_metrics(&attempt.0, attempt.1, rank).await?;
            }
            Effect::ReplicateOutputs { sha256 } => {
                server
                    .store
                    .replicas
                    .ensure_replicated(vec![sha256])
                    .await?;
            }
            Effect::Propose(cmd) => {
                applied = Some(match server.coordinator.propose(*cmd).await {
                    Ok(a) => a,
                    // A report for a run that no longer exists is as stale as can be.
                    Err(ProposalError::Rejected(ApplyError::UnknownRun(_))) => Applied::Stale {
                        run_id: u.run_id.clone(),
                        attempt: u.attempt,
                    },
                    Err(ProposalError::Rejected(e)) => return Err(rejected(e)),
                    Err(e) => return Err(status(e)),
                });
            }
        }
    }
    Ok(applied.map(|a| (report, a, u.state)))
}

/// Proposes a `RecordCheckpoint`. A stale record is no error (a newer checkpoint is
/// recorded), nor is a rejected one (the run is gone): neither is retried; a proposal that
/// did not reach the log is, with the report that carries it.
async fn propose_checkpoint(server: &Server, cmd: Command) -> Result<(), Status> {
    match server.coordinator.propose(cmd).await {
        Ok(Applied::Stale { run_id, attempt }) => {
            tracing::debug!(run_id = %run_id, attempt, "stale checkpoint not recorded");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(ProposalError::Rejected(e)) => {
            tracing::warn!(cause = %e, "checkpoint not recorded");
            Ok(())
        }
        Err(e) => Err(status(e)),
    }
}

/// Replicates and records a periodic checkpoint of `key` (muster-core's
/// `node::on_checkpoint`); a failure is logged: the attempt's next checkpoint, or its end's,
/// supersedes this one.
#[tracing::instrument(name = "checkpoint", skip_all, fields(node = %link.node_id, run_id = %key.0, attempt = key.1))]
async fn record_checkpoint(link: Link, key: AttemptKey, taken: node::TakenCheckpoint) {
    let server = &link.server;
    let effects = server
        .coordinator
        .read(|s| node::on_checkpoint(s, &link.node_id, (&key.0, key.1), &taken, now_ms()));
    for effect in effects {
        let done = match effect {
            Effect::ReplicateCheckpoint { sha256 } => server
                .store
                .replicas
                .ensure_replicated(vec![sha256])
                .await
                .map_err(Status::from),
            Effect::RecordCheckpoint(cmd) => propose_checkpoint(server, *cmd).await,
            _ => Ok(()),
        };
        if let Err(e) = done {
            tracing::warn!(cause = %e.message(), "periodic checkpoint not recorded");
            return;
        }
    }
}

/// A checkpoint an agent reports, in core's terms (`field` names it in errors); unset is
/// none. A hash that is not a SHA-256 or an unknown cause is an error naming the field.
fn taken_checkpoint(
    c: Option<&v1::Checkpoint>,
    field: &str,
) -> Result<Option<node::TakenCheckpoint>, Status> {
    let Some(c) = c else {
        return Ok(None);
    };
    if !muster_core::snapshot::is_sha256_hex(&c.sha256) {
        return Err(Status::invalid_argument(format!(
            "{field}.sha256: {:?} is not 64 lowercase hex digits",
            c.sha256
        )));
    }
    let cause: CheckpointCause = decode_enum::<v1::CheckpointCause, CheckpointCause>(c.cause)
        .map_err(|e| Status::invalid_argument(format!("{field}.cause: {e}")))?;
    Ok(Some(node::TakenCheckpoint {
        sha256: c.sha256.clone(),
        seq: c.seq,
        files: c.files,
        bytes: c.bytes,
        cause,
    }))
}

impl Link {
    async fn send(&self, msg: server_message::Msg) -> Result<(), Status> {
        self.tx
            .send(Ok(v1::ServerMessage { msg: Some(msg) }))
            .await
            .map_err(|_| Status::cancelled("the agent went away"))
    }

    async fn send_resume(&self, run_id: &str, attempt: u32) {
        let rank = self.rank(run_id, attempt).unwrap_or(0);
        // A sealed log takes nothing more: the agent need not re-send what it holds.
        let offset = match self.server.sealed_log(run_id, attempt, rank) {
            Some(log) => log.bytes,
            None => self.server.store.logs.len(run_id, attempt, rank),
        };
        let _ = self
            .send(server_message::Msg::Resume(v1::LogResume {
                run_id: run_id.to_string(),
                attempt,
                offset,
            }))
            .await;
    }

    async fn send_metric_resume(&self, run_id: &str, attempt: u32, offset: u64) {
        let _ = self
            .send(server_message::Msg::MetricResume(v1::MetricResume {
                run_id: run_id.to_string(),
                attempt,
                offset,
            }))
            .await;
    }

    /// Where this server's copy of an attempt's metrics file ends.
    fn metric_len(&self, run_id: &str, attempt: u32) -> u64 {
        let rank = self.rank(run_id, attempt).unwrap_or(0);
        self.server
            .store
            .series
            .stream_len(run_id, MetricStream::File { attempt, rank })
            .unwrap_or(0)
    }

    fn rank(&self, run_id: &str, attempt: u32) -> Option<u32> {
        self.server
            .coordinator
            .read(|s| node::rank_of(s, &self.node_id, (run_id, attempt)))
    }
}

/// The report an agent's update carries, in core's terms; an unknown state or end is an
/// error naming the field, never a default.
fn attempt_report(u: &v1::AttemptUpdate) -> Result<AttemptReport, Status> {
    let state = v1::AttemptState::from_wire(u.state)
        .map_err(|e| Status::invalid_argument(format!("update.state: {e}")))?;
    Ok(match state {
        v1::AttemptState::Preparing => AttemptReport::Preparing,
        v1::AttemptState::Running => AttemptReport::Running,
        v1::AttemptState::Ended => AttemptReport::Ended {
            end: decode_enum::<v1::AttemptEnd, AttemptEnd>(u.end)
                .map_err(|e| Status::invalid_argument(format!("update.end: {e}")))?,
            exit_code: u.exit_code,
            message: u.message.clone(),
            outputs: u.outputs.clone(),
        },
        other => {
            return Err(Status::invalid_argument(format!(
                "update.state: an agent reports preparing, running or ended, not {}",
                other.word()
            )));
        }
    })
}

/// The wire assignment of rank `rank` of an attempt placed on this node.
fn assignment(
    s: &muster_core::State,
    key: Option<&muster_core::secrets::SecretKey>,
    (run_id, attempt): &AttemptKey,
    rank: u32,
) -> Option<server_message::Msg> {
    let run = s.runs.get(run_id)?;
    let a = run.attempts.last()?;
    // A pipeline step: the upstream outputs to place, its declared outputs.
    let (step_inputs, step_outputs) = s.pipeline_step_io(run);
    Some(server_message::Msg::Assign(v1::Assignment {
        run_id: run_id.clone(),
        attempt: *attempt,
        rank,
        spec: Some(run.spec.clone().into()),
        placements: a
            .placements
            .iter()
            .map(|p| placement_to_assignment(s, p))
            .collect(),
        master_port: a.master_port.map_or(0, u32::from),
        secret: a.secret.clone().unwrap_or_default(),
        inputs: step_inputs.into_iter().collect(),
        outputs: step_outputs,
        resume: a.resumed_from.clone().map(checkpoint_to_wire),
        secrets: crate::grpc::secrets::values_for(s, key, &run.spec),
        run_policy: s
            .computes
            .get(&run.spec.compute)
            .and_then(|c| muster_proto::run_policy_to_wire(&c.spec.run_policy)),
    }))
}

fn stop_message(
    (run_id, attempt): AttemptKey,
    reason: StopReason,
    grace_ms: u64,
) -> server_message::Msg {
    server_message::Msg::Stop(v1::StopAttempt {
        run_id,
        attempt,
        reason: match reason {
            StopReason::Canceled => v1::StopReason::Canceled,
            StopReason::Preempted => v1::StopReason::Preempted,
            StopReason::Stale => v1::StopReason::Stale,
        }
        .into(),
        grace_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(run: &str, state: v1::AttemptState) -> v1::AttemptUpdate {
        v1::AttemptUpdate {
            run_id: run.into(),
            attempt: 1,
            state: state.into(),
            ..Default::default()
        }
    }

    fn states(r: &mut Reports, run: &str) -> Vec<v1::AttemptState> {
        let key = (run.to_string(), 1);
        std::iter::from_fn(|| r.done(&key))
            .map(|u| v1::AttemptState::try_from(u.state).unwrap())
            .collect()
    }

    #[test]
    fn reports_of_one_attempt_go_in_order_and_others_at_once() {
        use v1::AttemptState::{Ended, Preparing, Running};
        let mut r = Reports::default();
        assert!(
            r.queue(update("a", Preparing)).is_some(),
            "nothing in flight"
        );
        assert!(r.queue(update("b", Preparing)).is_some(), "another attempt");
        assert!(
            r.queue(update("a", Running)).is_none(),
            "behind a's preparing"
        );
        assert!(r.queue(update("a", Ended)).is_none());
        assert_eq!(states(&mut r, "a"), [Running, Ended]);
        assert!(
            !r.waiting.contains_key(&("a".to_string(), 1)),
            "a is idle again"
        );
        assert!(
            r.queue(update("a", Ended)).is_some(),
            "a re-sent end starts at once"
        );
    }

    #[test]
    fn a_queued_preparing_is_superseded_by_running_but_never_an_end() {
        use v1::AttemptState::{Ended, Preparing, Running};
        let mut r = Reports::default();
        assert!(r.queue(update("a", Preparing)).is_some());
        r.queue(update("a", Preparing));
        r.queue(update("a", Running));
        assert_eq!(states(&mut r, "a"), [Running]);
        assert!(r.queue(update("a", Preparing)).is_some(), "a was idle");
        r.queue(update("a", Running));
        r.queue(update("a", Running));
        r.queue(update("a", Ended));
        assert_eq!(states(&mut r, "a"), [Running, Running, Ended]);
    }
}
