//! RunService: submit, get, list, cancel, wait, and follow logs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use muster_core::state::AttemptState;
use muster_core::{Applied, ApplyError, Command, RunState};
use muster_proto::v1::{self, run_service_server::RunService};
use muster_proto::{run_to_wire, spec_from_wire};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
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
        let req = req.into_inner();
        // Logs are shipped to the leader: a follower relays the leader's stream.
        if !self.0.is_leader()
            && let Some(leader) = self.0.raft().status().leader
            && let Some(mut client) = self.0.run_client(leader)
        {
            let stream = client.stream_logs(req).await?.into_inner();
            return Ok(Response::new(Box::pin(stream)));
        }
        self.get(&req.id)?;
        let (tx, rx) = mpsc::channel(16);
        let coordinator = self.0.clone();
        tokio::spawn(async move {
            if let Err(e) = follow_logs(&coordinator, &req, &tx).await {
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

/// Streams a run's logs: each attempt in turn (or only the one asked for), until the run
/// ends (with `follow`) or until what is stored now has been sent. A single-instance
/// attempt's log is passed through as stored; the ranks of a distributed attempt are
/// combined line by line, each line prefixed with `[rank N] `.
///
/// A distributed attempt is over when one rank fails; its stopped peers' last lines may
/// reach the server just after, so a live stream can miss them — a later `run logs` has them.
async fn follow_logs(
    coordinator: &Coordinator,
    req: &v1::StreamLogsRequest,
    tx: &mpsc::Sender<Result<v1::LogChunk, Status>>,
) -> Result<(), Status> {
    let mut attempt = req.attempt.unwrap_or(1).max(1);
    let mut offset = 0u64;
    let mut ranks = RankLines::default();
    let mut state_changes = coordinator.subscribe();
    let mut log_changes = coordinator.logs.subscribe();
    loop {
        let (attempts, attempt_ended, run_terminal, rank_count) = coordinator
            .read(|s| {
                s.runs.get(&req.id).map(|r| {
                    let a = r.attempts.get(attempt as usize - 1);
                    let ended = a.map(|a| matches!(a.state, AttemptState::Ended(_)));
                    let count = a.map_or(1, |a| a.placements.len().max(1));
                    (r.attempt_number(), ended, r.state.is_terminal(), count)
                })
            })
            .ok_or_else(|| not_found(&req.id))?;
        if attempt <= attempts {
            let data = if rank_count > 1 {
                ranks
                    .read(coordinator, &req.id, attempt, rank_count)
                    .map_err(|e| Status::internal(format!("reading the log: {e}")))?
            } else {
                coordinator
                    .logs
                    .read(&req.id, attempt, 0, offset, LOG_CHUNK)
                    .map_err(|e| Status::internal(format!("reading the log: {e}")))?
            };
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
            // At the end of what is stored. An ended attempt's log is complete (it is sealed
            // before the end is applied).
            if attempt_ended == Some(true) {
                let rest = ranks.flush();
                if !rest.is_empty() {
                    let chunk = v1::LogChunk {
                        attempt,
                        offset,
                        data: rest,
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return Ok(());
                    }
                }
                if req.attempt.is_some() {
                    return Ok(());
                }
                if attempt < attempts {
                    attempt += 1;
                    offset = 0;
                    ranks = RankLines::default();
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

/// The combined log of a distributed attempt: every rank's log read on, whole lines
/// prefixed with `[rank N] `; a rank's unfinished last line waits for its newline (or the
/// attempt's end, [`RankLines::flush`]).
#[derive(Debug, Default)]
struct RankLines {
    /// Per rank: bytes read so far, and the unfinished line.
    ranks: Vec<(u64, Vec<u8>)>,
}

impl RankLines {
    /// New whole lines of every rank (empty when none arrived).
    fn read(
        &mut self,
        coordinator: &Coordinator,
        run: &str,
        attempt: u32,
        count: usize,
    ) -> std::io::Result<Vec<u8>> {
        self.ranks.resize_with(count, Default::default);
        let mut out = Vec::new();
        for (rank, (read, partial)) in self.ranks.iter_mut().enumerate() {
            let data = coordinator
                .logs
                .read(run, attempt, rank as u32, *read, LOG_CHUNK)?;
            *read += data.len() as u64;
            partial.extend_from_slice(&data);
            if let Some(end) = partial.iter().rposition(|b| *b == b'\n') {
                let lines: Vec<u8> = partial.drain(..=end).collect();
                prefix_lines(rank, &lines, &mut out);
            }
        }
        Ok(out)
    }

    /// The unfinished last lines, each ended with a newline.
    fn flush(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for (rank, (_, partial)) in self.ranks.iter_mut().enumerate() {
            if !partial.is_empty() {
                partial.push(b'\n');
                prefix_lines(rank, partial, &mut out);
                partial.clear();
            }
        }
        out
    }
}

/// Appends `lines` (ending with a newline) to `out`, each prefixed with `[rank N] `.
fn prefix_lines(rank: usize, lines: &[u8], out: &mut Vec<u8>) {
    let prefix = format!("[rank {rank}] ");
    for line in lines.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_lines_are_prefixed_and_unfinished_lines_flushed() {
        let mut out = Vec::new();
        prefix_lines(1, b"a\nb\n", &mut out);
        assert_eq!(out, b"[rank 1] a\n[rank 1] b\n");
        let mut lines = RankLines {
            ranks: vec![(3, b"tail".to_vec()), (0, Vec::new())],
        };
        assert_eq!(lines.flush(), b"[rank 0] tail\n");
        assert!(lines.flush().is_empty());
    }
}
