//! RunService: submit, get, list, cancel, wait, and follow logs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use muster_core::state::{AttemptState, SealedLog};
use muster_core::{Applied, ApplyError, Command, RunState};
use muster_proto::v1::{self, run_service_server::RunService};
use muster_proto::{run_to_wire, spec_from_wire};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::coordinator::{Coordinator, ProposalError, new_run_id, now_ms};
use crate::grpc::status;

pub(crate) struct Runs(pub Arc<Coordinator>);

const LOG_CHUNK: usize = 64 * 1024;

fn not_found(id: &str) -> Status {
    Status::not_found(format!(
        "run {id:?} does not exist: list runs with `muster run list`"
    ))
}

impl Runs {
    fn get(&self, id: &str) -> Result<v1::Run, Status> {
        self.0
            .read(|s| {
                s.runs.get(id).map(|r| {
                    let mut wire = run_to_wire(s, r);
                    // A queued run says why it waits ("needs 2 nodes with 4 free GPUs; 1 available").
                    if r.state == RunState::Queued
                        && let Some(reason) = self.0.waiting_reason(r)
                    {
                        wire.message = Some(match &wire.message {
                            Some(m) => format!("{m}; waiting: {reason}"),
                            None => format!("waiting: {reason}"),
                        });
                    }
                    wire
                })
            })
            .ok_or_else(|| not_found(id))
    }
}

type LogStream = Pin<Box<dyn Stream<Item = Result<v1::LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl RunService for Runs {
    async fn submit_run(
        &self,
        req: Request<v1::SubmitRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let req = req.into_inner();
        let spec = spec_from_wire(
            req.spec
                .ok_or_else(|| Status::invalid_argument("spec: missing"))?,
        )
        .map_err(Status::invalid_argument)?;
        spec.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(code) = &spec.code {
            // The snapshot must be on a majority of servers before the run is accepted.
            let manifest = self.0.blobs.get(&code.manifest).map_err(|_| {
                Status::failed_precondition(format!(
                    "code: snapshot manifest {} is not in the blob store: upload the snapshot before submitting",
                    code.manifest
                ))
            })?;
            let manifest: muster_core::snapshot::Manifest = serde_json::from_slice(&manifest)
                .map_err(|e| {
                    Status::invalid_argument(format!(
                        "code: the snapshot manifest is not valid: {e}"
                    ))
                })?;
            manifest
                .validate()
                .map_err(|e| Status::invalid_argument(format!("code: {e}")))?;
            let mut hashes: Vec<String> = manifest.files.iter().map(|f| f.sha256.clone()).collect();
            if let Some(missing) = hashes.iter().find(|h| !self.0.blobs.has(h)) {
                return Err(Status::failed_precondition(format!(
                    "code: file blob {missing} of the snapshot was not uploaded: upload the snapshot before submitting"
                )));
            }
            hashes.push(code.manifest.clone());
            self.0.ensure_replicated(hashes).await?;
        }
        if let Some(key) = &req.idempotency_key
            && (key.is_empty() || key.len() > 128)
        {
            return Err(Status::invalid_argument(
                "idempotency_key: use 1 to 128 characters",
            ));
        }
        // A fresh id collides with an existing one with negligible odds; retry if it does.
        for _ in 0..5 {
            let cmd = Command::SubmitRun {
                run_id: new_run_id(),
                spec: Box::new(spec.clone()),
                idempotency_key: req.idempotency_key.clone(),
                at: now_ms(),
            };
            match self.0.propose(cmd).await {
                Ok(Applied::Submitted { run_id, .. }) => {
                    self.0.metrics.runs_submitted.inc();
                    return self.get(&run_id).map(Response::new);
                }
                Ok(other) => {
                    return Err(Status::internal(format!(
                        "unexpected apply result {other:?}"
                    )));
                }
                Err(ProposalError::Rejected(ApplyError::RunExists(_))) => continue,
                Err(e) => return Err(status(e)),
            }
        }
        Err(Status::internal("could not allocate a run id"))
    }

    async fn get_run(&self, req: Request<v1::GetRunRequest>) -> Result<Response<v1::Run>, Status> {
        let req = req.into_inner();
        self.0.linearize(req.stale).await.map_err(status)?;
        self.get(&req.id).map(Response::new)
    }

    async fn list_runs(
        &self,
        req: Request<v1::ListRunsRequest>,
    ) -> Result<Response<v1::ListRunsResponse>, Status> {
        let req = req.into_inner();
        self.0.linearize(req.stale).await.map_err(status)?;
        let state = match &req.state {
            Some(s) => Some(
                RunState::parse(s).map_err(|e| Status::invalid_argument(format!("state: {e}")))?,
            ),
            None => None,
        };
        let runs = self.0.read(|s| {
            let mut runs: Vec<_> = s
                .runs
                .values()
                .filter(|r| {
                    req.experiment
                        .as_ref()
                        .is_none_or(|e| &r.spec.experiment == e)
                })
                .filter(|r| req.compute.as_ref().is_none_or(|c| &r.spec.compute == c))
                .filter(|r| state.is_none_or(|st| r.state == st))
                .collect();
            runs.sort_by_key(|r| r.seq);
            if req.limit > 0 && runs.len() > req.limit as usize {
                runs.drain(..runs.len() - req.limit as usize);
            }
            runs.into_iter().map(|r| run_to_wire(s, r)).collect()
        });
        Ok(Response::new(v1::ListRunsResponse { runs }))
    }

    async fn cancel_run(
        &self,
        req: Request<v1::CancelRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let req = req.into_inner();
        self.0
            .propose(Command::CancelRun {
                run_id: req.id.clone(),
                reason: req.reason,
                at: now_ms(),
            })
            .await
            .map_err(|e| match e {
                ProposalError::Rejected(ApplyError::UnknownRun(id)) => not_found(&id),
                e => status(e),
            })?;
        self.get(&req.id).map(Response::new)
    }

    type StreamLogsStream = LogStream;

    async fn stream_logs(
        &self,
        req: Request<v1::StreamLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let relayed = crate::replication::is_replica(&req);
        let req = req.into_inner();
        if self.get(&req.id).is_err() {
            // A follower that has not applied the submission yet: the leader knows the run.
            if !relayed && let Some(mut client) = leader_runs(&self.0) {
                let stream = client
                    .stream_logs(crate::replication::replica_request(req))
                    .await?
                    .into_inner();
                return Ok(Response::new(Box::pin(stream)));
            }
            return Err(not_found(&req.id));
        }
        let (tx, rx) = mpsc::channel(16);
        let coordinator = self.0.clone();
        tokio::spawn(async move {
            if let Err(e) = follow_logs(&coordinator, &req, relayed, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn wait_run(
        &self,
        req: Request<v1::WaitRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let req = req.into_inner();
        let deadline = (req.timeout_ms > 0)
            .then(|| tokio::time::Instant::now() + Duration::from_millis(req.timeout_ms));
        let mut changes = self.0.subscribe();
        loop {
            let run = self.get(&req.id)?;
            let terminal = RunState::parse(&run.state).is_ok_and(RunState::is_terminal);
            if terminal || deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(Response::new(run));
            }
            let wait = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, changes.changed())
                        .await
                        .map(|r| r.is_ok())
                        .unwrap_or(true),
                    None => changes.changed().await.is_ok(),
                }
            };
            tokio::select! {
                alive = wait => if !alive { return Err(Status::unavailable("the server is shutting down")) },
                _ = self.0.shutting_down() => return Err(Status::unavailable("the server is shutting down; retry")),
            }
        }
    }
}

/// A RunService client of the leader, when this server is a follower that knows it.
fn leader_runs(
    coordinator: &Coordinator,
) -> Option<v1::run_service_client::RunServiceClient<Channel>> {
    if coordinator.is_leader() {
        return None;
    }
    let leader = coordinator.raft().status().leader?;
    coordinator.run_client(leader)
}

/// Where the next bytes of an attempt's log (rank 0) come from.
enum Source {
    /// The rank ended: its sealed blob, which every server can read.
    Sealed(SealedLog),
    /// The live log file on this server (the leader takes logs from the agents).
    Local,
    /// The live log on the leader, relayed by this follower.
    Leader(v1::run_service_client::RunServiceClient<Channel>),
}

fn source(coordinator: &Coordinator, run: &str, attempt: u32, relayed: bool) -> Source {
    if let Some(log) = coordinator.sealed_log(run, attempt, 0) {
        return Source::Sealed(log);
    }
    if relayed {
        return Source::Local;
    }
    match leader_runs(coordinator) {
        Some(client) => Source::Leader(client),
        None => Source::Local,
    }
}

/// Relays attempt `attempt`'s live log from the leader, from `offset` on (the leader's
/// stream starts at 0; what was sent already is trimmed). Ends when the leader's stream
/// does: at the end of what it stores, or (with `follow`) when the attempt's log is complete.
async fn relay(
    mut client: v1::run_service_client::RunServiceClient<Channel>,
    req: &v1::StreamLogsRequest,
    attempt: u32,
    offset: &mut u64,
    tx: &mpsc::Sender<Result<v1::LogChunk, Status>>,
) -> Result<(), Status> {
    tracing::debug!(run_id = %req.id, attempt, offset = *offset, "relaying a live log from the leader");
    let mut stream = client
        .stream_logs(crate::replication::replica_request(v1::StreamLogsRequest {
            id: req.id.clone(),
            attempt: Some(attempt),
            follow: req.follow,
        }))
        .await?
        .into_inner();
    while let Some(chunk) = stream.message().await? {
        let end = chunk.offset + chunk.data.len() as u64;
        if chunk.attempt != attempt || end <= *offset || chunk.offset > *offset {
            continue;
        }
        let data = chunk.data[(*offset - chunk.offset) as usize..].to_vec();
        let sent = v1::LogChunk {
            attempt,
            offset: *offset,
            data,
        };
        *offset = end;
        if tx.send(Ok(sent)).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Streams a run's logs: each attempt in turn (or only the one asked for), from rank 0,
/// until the run ends (with `follow`) or until what is stored now has been sent. An ended
/// rank's log comes from its sealed blob on this server (repaired from a peer if missing);
/// a live one from this server's file on the leader, or relayed from the leader on a
/// follower (never relayed twice: `relayed` requests are answered from what is here).
async fn follow_logs(
    coordinator: &Coordinator,
    req: &v1::StreamLogsRequest,
    relayed: bool,
    tx: &mpsc::Sender<Result<v1::LogChunk, Status>>,
) -> Result<(), Status> {
    let mut attempt = req.attempt.unwrap_or(1).max(1);
    let mut offset = 0u64;
    let mut state_changes = coordinator.subscribe();
    let mut log_changes = coordinator.logs.subscribe();
    // The attempt whose live log the leader finished relaying (wait for this replica to
    // apply its end rather than relay it again).
    let mut relayed_to_end: Option<u32> = None;
    loop {
        let (attempts, attempt_ended, run_terminal) = coordinator
            .read(|s| {
                s.runs.get(&req.id).map(|r| {
                    let ended = r
                        .attempts
                        .get(attempt as usize - 1)
                        .map(|a| matches!(a.state, AttemptState::Ended(_)));
                    (r.attempt_number(), ended, r.state.is_terminal())
                })
            })
            .ok_or_else(|| not_found(&req.id))?;
        if attempt <= attempts {
            // Whether everything of this attempt's log has been sent.
            let complete = match source(coordinator, &req.id, attempt, relayed) {
                Source::Sealed(log) => {
                    if offset < log.bytes {
                        let data = coordinator.read_sealed(&log, offset, LOG_CHUNK).await?;
                        if data.is_empty() {
                            return Err(Status::internal(format!(
                                "the sealed log {} is shorter than the {} bytes recorded",
                                log.sha256, log.bytes
                            )));
                        }
                        let n = data.len() as u64;
                        let chunk = v1::LogChunk {
                            attempt,
                            offset,
                            data,
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return Ok(());
                        }
                        offset += n;
                        continue;
                    }
                    true
                }
                Source::Local => {
                    let data = coordinator
                        .logs
                        .read(&req.id, attempt, 0, offset, LOG_CHUNK)
                        .map_err(|e| Status::internal(format!("reading the log: {e}")))?;
                    if !data.is_empty() {
                        let n = data.len() as u64;
                        let chunk = v1::LogChunk {
                            attempt,
                            offset,
                            data,
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return Ok(());
                        }
                        offset += n;
                        continue;
                    }
                    // At the end of what is stored. An ended attempt's log is complete (it
                    // is sealed before the end is applied).
                    attempt_ended == Some(true)
                }
                Source::Leader(_) if relayed_to_end == Some(attempt) => attempt_ended == Some(true),
                Source::Leader(client) => {
                    match relay(client, req, attempt, &mut offset, tx).await {
                        Ok(()) if tx.is_closed() => return Ok(()),
                        Ok(()) if req.follow => {
                            relayed_to_end = Some(attempt);
                            continue;
                        }
                        Ok(()) => attempt_ended == Some(true),
                        // With `follow`, a failover ends the leader's stream: look again
                        // (the log may be sealed by now, or a new leader known).
                        Err(_) if req.follow => false,
                        Err(e) => {
                            return Err(Status::unavailable(format!(
                                "the live log of attempt {attempt} is on the leader, which did not answer ({}); retry",
                                e.message()
                            )));
                        }
                    }
                }
            };
            if complete {
                if req.attempt.is_some() {
                    return Ok(());
                }
                if attempt < attempts {
                    attempt += 1;
                    offset = 0;
                    continue;
                }
                if run_terminal {
                    return Ok(());
                }
            }
        } else if run_terminal {
            return Ok(());
        }
        if !req.follow {
            return Ok(());
        }
        tokio::select! {
            _ = state_changes.changed() => {}
            _ = log_changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = coordinator.shutting_down() => return Err(Status::unavailable("the server is shutting down; follow the logs again")),
            _ = tx.closed() => return Ok(()),
        }
    }
}
