//! AgentService: node registration, heartbeats, and the session stream on which a node
//! gets its assignments and stop orders and ships updates and logs.
//!
//! The session is level-triggered: on every state change it compares what the state says
//! the node should run with what it has told the node, so a reconnect or a failover needs
//! no special path (the node re-reports what it runs; stale attempts are stopped).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use muster_core::access::{
    AccessChange, Principal, TOKEN_PREFIX, Token, format_token, hash_secret,
};
use muster_core::compute::Tier;
use muster_core::names::validate_node_name;
use muster_core::node::{self, After, AttemptKey, Effect, Order, StopReason};
use muster_core::resources::Capacity;
use muster_core::state::AttemptEnd;
use muster_core::{Applied, ApplyError, AttemptReport, Command};
use muster_proto::v1::{self, agent_message, agent_service_server::AgentService, server_message};
use muster_proto::{Word, decode_enum, placement_to_assignment};
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
            },
            labels: req.labels.into_iter().collect::<BTreeMap<_, _>>(),
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
                        s.metadata_mut().insert("muster-leader", v);
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
            server: self.0.clone(),
            node_id: hello.node_id.clone(),
            tx,
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

struct Session {
    server: Arc<Server>,
    node_id: String,
    tx: Outbound,
    /// What this session told the node, and what the node runs (muster-core's protocol).
    told: node::Session,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<v1::AgentMessage>) {
        tracing::info!(node = %self.node_id, "agent session opened");
        self.server.heartbeats.beat(&self.node_id);
        let resumes: Vec<(String, u32)> = self.told.running.iter().cloned().collect();
        for (run_id, attempt) in resumes {
            self.send_resume(&run_id, attempt).await;
            // Metrics of a rank still live: ship from this server's copy (a new leader's
            // may be shorter than the last one's).
            let rank = self.rank(&run_id, attempt).unwrap_or(0);
            if self.server.sealed_log(&run_id, attempt, rank).is_none() {
                let offset = self.metric_len(&run_id, attempt);
                self.send_metric_resume(&run_id, attempt, offset).await;
            }
        }
        let mut changes = self.server.coordinator.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut leadership = self.server.coordinator.raft().watch_status();
        let result: Result<(), Status> = async {
            loop {
                self.dispatch().await?;
                tokio::select! {
                    msg = inbound.next() => match msg {
                        Some(Ok(m)) => self.on_message(m).await?,
                        Some(Err(e)) => return Err(e),
                        None => return Ok(()),
                    },
                    _ = changes.changed() => {}
                    _ = tick.tick() => {}
                    _ = self.server.coordinator.shutting_down() => {
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
            Ok(()) => tracing::info!(node = %self.node_id, "agent session closed"),
            Err(e) => {
                tracing::info!(node = %self.node_id, cause = %e.message(), "agent session ended");
                let _ = self.tx.send(Err(e)).await;
            }
        }
    }

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

    /// Sends what the state asks of this node and the agent has not been told yet
    /// (muster-core's `node::orders`), each assignment built into its wire form.
    async fn dispatch(&mut self) -> Result<(), Status> {
        let grace_ms = self.server.config.stop_grace.as_millis() as u64;
        let node_id = self.node_id.clone();
        let messages: Vec<server_message::Msg> = self.server.coordinator.read(|s| {
            node::orders(s, &node_id, &mut self.told)
                .into_iter()
                .filter_map(|order| match order {
                    Order::Assign { attempt, rank } => assignment(s, &attempt, rank),
                    Order::Stop { attempt, reason } => {
                        Some(stop_message(attempt, reason, grace_ms))
                    }
                })
                .collect()
        });
        for msg in messages {
            if let server_message::Msg::Assign(a) = &msg {
                tracing::debug!(node = %self.node_id, run_id = %a.run_id, attempt = a.attempt, "assigning");
            }
            self.send(msg).await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, msg: v1::AgentMessage) -> Result<(), Status> {
        self.server.heartbeats.beat(&self.node_id);
        match msg.msg {
            Some(agent_message::Msg::Heartbeat(h)) => {
                self.told.running = h
                    .running
                    .into_iter()
                    .map(|r| (r.run_id, r.attempt))
                    .collect();
            }
            Some(agent_message::Msg::Log(log)) => {
                let Some(rank) = self.rank(&log.run_id, log.attempt) else {
                    return Ok(());
                };
                if self
                    .server
                    .sealed_log(&log.run_id, log.attempt, rank)
                    .is_some()
                {
                    // Fenced: the rank's log was sealed (its end was reported, or its node
                    // was declared lost); a late agent's bytes are not part of it.
                    tracing::debug!(node = %self.node_id, run_id = %log.run_id, attempt = log.attempt, rank, "dropping log bytes of a sealed log");
                    return Ok(());
                }
                match self.server.store.logs.append(
                    &log.run_id,
                    log.attempt,
                    rank,
                    log.offset,
                    &log.data,
                ) {
                    Ok(Append::Stored(_)) => {
                        // Stdout metric lines come from the log bytes themselves.
                        if let Err(e) = self.server.store.feed_log_metrics(
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
                    Ok(Append::Gap(_)) => self.send_resume(&log.run_id, log.attempt).await,
                    Err(e) => return Err(Status::internal(format!("storing logs: {e}"))),
                }
            }
            Some(agent_message::Msg::Metrics(m)) => {
                let Some(rank) = self.rank(&m.run_id, m.attempt) else {
                    return Ok(());
                };
                if self.server.sealed_log(&m.run_id, m.attempt, rank).is_some() {
                    // Fenced with the log: the rank ended (or its node was declared lost)
                    // and its metrics are complete; a late agent's bytes are not part of them.
                    return Ok(());
                }
                let stream = MetricStream::File {
                    attempt: m.attempt,
                    rank,
                };
                match self
                    .server
                    .store
                    .series
                    .feed(&m.run_id, stream, m.offset, &m.data)
                {
                    Ok(Feed::Stored(_)) => {}
                    Ok(Feed::Gap(offset)) => {
                        self.send_metric_resume(&m.run_id, m.attempt, offset).await
                    }
                    Err(e) => return Err(Status::internal(format!("storing metrics: {e}"))),
                }
            }
            Some(agent_message::Msg::Update(u)) => self.on_update(u).await?,
            Some(agent_message::Msg::Hello(_)) | None => {}
        }
        Ok(())
    }

    #[tracing::instrument(name = "report", skip_all, fields(node = %self.node_id, run_id = %u.run_id, attempt = u.attempt, state = ?u.state))]
    async fn on_update(&mut self, u: v1::AttemptUpdate) -> Result<(), Status> {
        let report = node::Report {
            attempt: (u.run_id.clone(), u.attempt),
            report: attempt_report(&u)?,
            log_bytes: u.log_bytes,
            metric_bytes: u.metric_bytes,
        };
        let node_id = self.node_id.clone();
        let rank = self.rank(&u.run_id, u.attempt).unwrap_or(0);
        let held = node::Held {
            log_bytes: self.server.store.logs.len(&u.run_id, u.attempt, rank),
            metric_bytes: self.metric_len(&u.run_id, u.attempt),
        };
        let effects = self
            .server
            .coordinator
            .read(|s| node::on_report(s, &node_id, &report, held, now_ms()));
        let mut applied = None;
        for effect in effects {
            match effect {
                Effect::ResumeLog { attempt, .. } => {
                    // Logs are still missing: ask for them; the agent re-sends the end after.
                    self.send_resume(&attempt.0, attempt.1).await;
                }
                Effect::ResumeMetrics { attempt, offset } => {
                    self.send_metric_resume(&attempt.0, attempt.1, offset).await;
                }
                Effect::SealLog { attempt, rank } => {
                    self.server.seal_log(&attempt.0, attempt.1, rank).await?;
                }
                Effect::SealMetrics { attempt, rank } => {
                    self.server
                        .seal_metrics(&attempt.0, attempt.1, rank)
                        .await?;
                }
                Effect::ReplicateOutputs { sha256 } => {
                    self.server
                        .store
                        .replicas
                        .ensure_replicated(vec![sha256])
                        .await?;
                }
                Effect::Propose(cmd) => {
                    applied = Some(match self.server.coordinator.propose(*cmd).await {
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
        let Some(applied) = applied else {
            return Ok(());
        };
        let grace_ms = self.server.config.stop_grace.as_millis() as u64;
        let after = self
            .server
            .coordinator
            .read(|s| node::on_applied(s, &node_id, &mut self.told, &report, &applied));
        for step in after {
            match step {
                After::RemoveLiveLog { attempt, rank } => {
                    // The sealed blob is the log now; the file it was copied from can go.
                    if let Err(e) = self.server.store.logs.remove(&attempt.0, attempt.1, rank) {
                        tracing::warn!(cause = %e, "could not remove a sealed log file");
                    }
                }
                After::Ack { attempt } => {
                    self.send(server_message::Msg::Ack(v1::UpdateAck {
                        run_id: attempt.0,
                        attempt: attempt.1,
                        state: u.state,
                    }))
                    .await?;
                }
                After::Stop { attempt, reason } => {
                    self.send(stop_message(attempt, reason, grace_ms)).await?;
                }
            }
        }
        Ok(())
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
