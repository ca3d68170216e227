//! AgentService: node registration, heartbeats, and the session stream on which a node
//! gets its assignments and stop orders and ships updates and logs.
//!
//! The session is level-triggered: on every state change it compares what the state says
//! the node should run with what it has told the node, so a reconnect or a failover needs
//! no special path (the node re-reports what it runs; stale attempts are stopped).

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use muster_core::compute::Tier;
use muster_core::names::validate_node_name;
use muster_core::resources::Capacity;
use muster_core::state::AttemptEnd;
use muster_core::{Applied, ApplyError, AttemptReport, Command};
use muster_proto::v1::{self, agent_message, agent_service_server::AgentService, server_message};
use muster_proto::{Word, decode_enum, placement_to_assignment};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::coordinator::{Coordinator, ProposalError, now_ms};
use crate::grpc::{rejected, status};
use crate::logs::Append;
use crate::series::{Feed, Stream as MetricStream};

pub(crate) struct Agents(pub Arc<Coordinator>);

type Outbound = mpsc::Sender<Result<v1::ServerMessage, Status>>;
type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Agents {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let req = req.into_inner();
        validate_node_name(&req.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
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
        self.0.propose(cmd).await.map_err(status)?;
        self.0.heartbeat(&req.node_id);
        Ok(Response::new(v1::RegisterResponse {
            node_id: req.node_id,
            heartbeat_interval_ms: self.0.config.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let node_id = req.into_inner().node_id;
        if !self.0.read(|s| s.nodes.contains_key(&node_id)) {
            return Err(Status::not_found(format!(
                "node {node_id} is not registered: register first"
            )));
        }
        self.0.heartbeat(&node_id);
        Ok(Response::new(v1::HeartbeatResponse {}))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        // Sessions live on the leader (it schedules and watches heartbeats); a follower
        // points the agent at it.
        if !self.0.is_leader() {
            return Err(match self.0.leader_address() {
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
        if !self.0.read(|s| s.nodes.contains_key(&hello.node_id)) {
            return Err(Status::failed_precondition(format!(
                "node {} is not registered: call Register first",
                hello.node_id
            )));
        }
        let (tx, rx) = mpsc::channel(256);
        let session = Session {
            coordinator: self.0.clone(),
            node_id: hello.node_id.clone(),
            tx,
            running: hello
                .running
                .iter()
                .map(|r| (r.run_id.clone(), r.attempt))
                .collect(),
            assigned: HashSet::new(),
            stopped: HashSet::new(),
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    coordinator: Arc<Coordinator>,
    node_id: String,
    tx: Outbound,
    /// What the agent says it runs.
    running: HashSet<(String, u32)>,
    /// Assignments sent on this session.
    assigned: HashSet<(String, u32)>,
    /// Stop orders sent on this session.
    stopped: HashSet<(String, u32)>,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<v1::AgentMessage>) {
        tracing::info!(node = %self.node_id, "agent session opened");
        self.coordinator.heartbeat(&self.node_id);
        let resumes: Vec<(String, u32)> = self.running.iter().cloned().collect();
        for (run_id, attempt) in resumes {
            self.send_resume(&run_id, attempt).await;
            // Metrics of a rank still live: ship from this server's copy (a new leader's
            // may be shorter than the last one's).
            let rank = self.rank(&run_id, attempt).unwrap_or(0);
            if self
                .coordinator
                .sealed_log(&run_id, attempt, rank)
                .is_none()
            {
                let offset = self.metric_len(&run_id, attempt);
                self.send_metric_resume(&run_id, attempt, offset).await;
            }
        }
        let mut changes = self.coordinator.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut leadership = self.coordinator.raft().watch_status();
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
                    _ = self.coordinator.shutting_down() => {
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
        let offset = match self.coordinator.sealed_log(run_id, attempt, rank) {
            Some(log) => log.bytes,
            None => self.coordinator.logs.len(run_id, attempt, rank),
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
        self.coordinator
            .series
            .stream_len(run_id, MetricStream::File { attempt, rank })
            .unwrap_or(0)
    }

    fn rank(&self, run_id: &str, attempt: u32) -> Option<u32> {
        self.coordinator.read(|s| {
            let a = s
                .runs
                .get(run_id)?
                .attempts
                .get(attempt.checked_sub(1)? as usize)?;
            a.placements
                .iter()
                .position(|p| p.node_id == self.node_id)
                .map(|r| r as u32)
        })
    }

    /// Sends what the state asks of this node and the agent has not been told yet.
    async fn dispatch(&mut self) -> Result<(), Status> {
        let grace_ms = self.coordinator.config.stop_grace.as_millis() as u64;
        let (assign, stop) = self.coordinator.read(|s| {
            let mut assign = Vec::new();
            let mut stop = Vec::new();
            let Some(node) = s.nodes.get(&self.node_id) else {
                return (assign, stop);
            };
            for (run_id, attempt) in &node.attempts {
                let key = (run_id.clone(), *attempt);
                let Some(run) = s.runs.get(run_id) else {
                    continue;
                };
                let stopping = if run.cancel_requested {
                    Some(v1::StopReason::Canceled)
                } else if run.preempt_requested.is_some() {
                    Some(v1::StopReason::Preempted)
                } else {
                    None
                };
                if let Some(reason) = stopping {
                    if !self.stopped.contains(&key) {
                        stop.push((key, reason));
                    }
                    continue;
                }
                if self.assigned.contains(&key) || self.running.contains(&key) {
                    continue;
                }
                let Some(a) = run.attempts.last() else {
                    continue;
                };
                let rank = a
                    .placements
                    .iter()
                    .position(|p| p.node_id == self.node_id)
                    .unwrap_or(0);
                // A pipeline step: the upstream outputs to place, its declared outputs.
                let (step_inputs, step_outputs) = s.pipeline_step_io(run);
                assign.push(v1::Assignment {
                    run_id: run_id.clone(),
                    attempt: *attempt,
                    rank: rank as u32,
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
                });
            }
            // Attempts the agent runs that are not (or no longer) placed here: fence them.
            for key in &self.running {
                if !node.attempts.contains(key) && !self.stopped.contains(key) {
                    stop.push((key.clone(), v1::StopReason::Stale));
                }
            }
            (assign, stop)
        });
        for a in assign {
            self.assigned.insert((a.run_id.clone(), a.attempt));
            tracing::debug!(node = %self.node_id, run_id = %a.run_id, attempt = a.attempt, "assigning");
            self.send(server_message::Msg::Assign(a)).await?;
        }
        for ((run_id, attempt), reason) in stop {
            self.stopped.insert((run_id.clone(), attempt));
            self.send(server_message::Msg::Stop(v1::StopAttempt {
                run_id,
                attempt,
                reason: reason.into(),
                grace_ms,
            }))
            .await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, msg: v1::AgentMessage) -> Result<(), Status> {
        self.coordinator.heartbeat(&self.node_id);
        match msg.msg {
            Some(agent_message::Msg::Heartbeat(h)) => {
                self.running = h
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
                    .coordinator
                    .sealed_log(&log.run_id, log.attempt, rank)
                    .is_some()
                {
                    // Fenced: the rank's log was sealed (its end was reported, or its node
                    // was declared lost); a late agent's bytes are not part of it.
                    tracing::debug!(node = %self.node_id, run_id = %log.run_id, attempt = log.attempt, rank, "dropping log bytes of a sealed log");
                    return Ok(());
                }
                match self.coordinator.logs.append(
                    &log.run_id,
                    log.attempt,
                    rank,
                    log.offset,
                    &log.data,
                ) {
                    Ok(Append::Stored(_)) => {
                        // Stdout metric lines come from the log bytes themselves.
                        if let Err(e) = self.coordinator.feed_log_metrics(
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
                if self
                    .coordinator
                    .sealed_log(&m.run_id, m.attempt, rank)
                    .is_some()
                {
                    // Fenced with the log: the rank ended (or its node was declared lost)
                    // and its metrics are complete; a late agent's bytes are not part of them.
                    return Ok(());
                }
                let stream = MetricStream::File {
                    attempt: m.attempt,
                    rank,
                };
                match self
                    .coordinator
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

    async fn on_update(&mut self, u: v1::AttemptUpdate) -> Result<(), Status> {
        let key = (u.run_id.clone(), u.attempt);
        let state = v1::AttemptState::from_wire(u.state)
            .map_err(|e| Status::invalid_argument(format!("update.state: {e}")))?;
        let report = match state {
            v1::AttemptState::Preparing => AttemptReport::Preparing,
            v1::AttemptState::Running => AttemptReport::Running,
            v1::AttemptState::Ended => {
                let end: AttemptEnd = decode_enum::<v1::AttemptEnd, _>(u.end)
                    .map_err(|e| Status::invalid_argument(format!("update.end: {e}")))?;
                if let Some(rank) = self.rank(&u.run_id, u.attempt)
                    && self
                        .coordinator
                        .sealed_log(&u.run_id, u.attempt, rank)
                        .is_none()
                {
                    let stored = self.coordinator.logs.len(&u.run_id, u.attempt, rank);
                    if stored < u.log_bytes {
                        // Logs are still missing: ask for them; the agent re-sends the end after.
                        self.send_resume(&u.run_id, u.attempt).await;
                        return Ok(());
                    }
                    let metrics = self.metric_len(&u.run_id, u.attempt);
                    if metrics < u.metric_bytes {
                        // Metrics are still missing: ask for them; the end comes again after.
                        self.send_metric_resume(&u.run_id, u.attempt, metrics).await;
                        return Ok(());
                    }
                    // The whole log is here: into the blob store, onto a majority of servers
                    // and into the state, before the end is proposed (invariant 5).
                    self.coordinator
                        .seal_log(&u.run_id, u.attempt, rank)
                        .await?;
                    // The metrics likewise (after the log: its last stdout lines count).
                    self.coordinator
                        .seal_metrics(&u.run_id, u.attempt, rank)
                        .await?;
                }
                if let Some(outputs) = &u.outputs {
                    // Outputs are on a majority before the attempt's end records them.
                    self.coordinator
                        .ensure_replicated(vec![outputs.clone()])
                        .await?;
                }
                AttemptReport::Ended {
                    end,
                    exit_code: u.exit_code,
                    message: u.message.clone(),
                    outputs: u.outputs.clone(),
                }
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "update.state: an agent reports preparing, running or ended, not {}",
                    other.word()
                )));
            }
        };
        let ended = matches!(report, AttemptReport::Ended { .. });
        let cmd = Command::ReportAttempt {
            run_id: u.run_id.clone(),
            attempt: u.attempt,
            node_id: self.node_id.clone(),
            report,
            at: now_ms(),
        };
        let applied = match self.coordinator.propose(cmd).await {
            Ok(a) => a,
            // A report for a run that no longer exists is as stale as can be.
            Err(ProposalError::Rejected(ApplyError::UnknownRun(_))) => Applied::Stale {
                run_id: u.run_id.clone(),
                attempt: u.attempt,
            },
            Err(ProposalError::Rejected(e)) => return Err(rejected(e)),
            Err(e) => return Err(status(e)),
        };
        if ended {
            // The sealed blob is the log now; the file it was copied from can go.
            if let Some(rank) = self.rank(&u.run_id, u.attempt)
                && self
                    .coordinator
                    .sealed_log(&u.run_id, u.attempt, rank)
                    .is_some()
                && let Err(e) = self.coordinator.logs.remove(&u.run_id, u.attempt, rank)
            {
                tracing::warn!(run_id = %u.run_id, attempt = u.attempt, cause = %e, "could not remove a sealed log file");
            }
            self.running.remove(&key);
            self.send(server_message::Msg::Ack(v1::UpdateAck {
                run_id: u.run_id,
                attempt: u.attempt,
                state: u.state,
            }))
            .await?;
        } else {
            self.running.insert(key.clone());
            if matches!(applied, Applied::Stale { .. }) && !self.stopped.contains(&key) {
                self.stopped.insert(key.clone());
                self.send(server_message::Msg::Stop(v1::StopAttempt {
                    run_id: key.0,
                    attempt: key.1,
                    reason: v1::StopReason::Stale.into(),
                    grace_ms: self.coordinator.config.stop_grace.as_millis() as u64,
                }))
                .await?;
            }
        }
        Ok(())
    }
}
