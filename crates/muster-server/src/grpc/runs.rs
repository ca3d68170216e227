//! RunService: submit, get, list, cancel, wait, and follow logs.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use muster_client::Channel;
use muster_core::paging::{Listing, RunFilter};
use muster_core::state::SealedLog;
use muster_core::{Applied, ApplyError, Command, RunState};
use muster_proto::v1::{self, run_service_server::RunService};
use muster_proto::{run_to_wire, spec_from_wire};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::coordinator::{ProposalError, new_run_id, now_ms};
use crate::grpc::auth::{Caller, allow_in, allow_run};
use crate::grpc::{
    Fresh, check_code, next_page_token, page_token_error, paging, propose_fresh, status,
};
use crate::server::Server;
use crate::views;
use crate::views::logs::AttemptLogs;
use muster_core::access::Role;
use muster_core::compute::NodeFit;

pub(crate) struct Runs(pub Arc<Server>);

const LOG_CHUNK: usize = 64 * 1024;
/// How long `StreamLogs` waits to catch up with the leader before it serves what the
/// local replica holds.
const LINEARIZE_LOGS_WITHIN: Duration = Duration::from_secs(2);

fn not_found(id: &str) -> Status {
    Status::not_found(format!(
        "run {id:?} does not exist: list runs with `muster run list`"
    ))
}

impl Runs {
    fn get(&self, id: &str) -> Result<v1::Run, Status> {
        views::runs::run(&self.0, id).ok_or_else(|| not_found(id))
    }

    /// Run `id` from the state, or else from the retention archives (which the caller may
    /// read only with `role` in the run's workspace, as before it was archived).
    async fn get_or_archived(
        &self,
        caller: &Caller,
        id: &str,
        role: Role,
    ) -> Result<v1::Run, Status> {
        match self.get(id) {
            Ok(run) => Ok(run),
            Err(missing) => match self.archived(caller, id, role).await? {
                Some(run) => Ok(views::runs::archived(&self.0, &run.0, run.1)),
                None => Err(missing),
            },
        }
    }

    /// Run `id` if retention archived it and the caller has `role` in its workspace, with
    /// the archive it is in; NOT_FOUND when the caller may not see it.
    async fn archived(
        &self,
        caller: &Caller,
        id: &str,
        role: Role,
    ) -> Result<Option<(muster_core::state::Run, String)>, Status> {
        let Some(found) = self
            .0
            .archived
            .find(&self.0, id)
            .await
            .map_err(|e| Status::unavailable(format!("reading the run archives: {e}")))?
        else {
            return Ok(None);
        };
        allow_in(
            &self.0,
            caller,
            Some(found.0.spec.workspace.clone()),
            role,
            || not_found(id),
        )?;
        Ok(Some(found))
    }
}

type LogStream = Pin<Box<dyn Stream<Item = Result<v1::LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl RunService for Runs {
    #[tracing::instrument(name = "submit", skip_all, fields(run_id = tracing::field::Empty))]
    async fn submit_run(
        &self,
        req: Request<v1::SubmitRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let mut spec = spec_from_wire(
            req.spec
                .ok_or_else(|| Status::invalid_argument("spec: missing"))?,
        )
        .map_err(Status::invalid_argument)?;
        caller.require(
            &self.0,
            &spec.workspace,
            Role::User,
            &format!("workspace {:?}", spec.workspace),
        )?;
        crate::grpc::resolve_serverless(&self.0, &mut spec, "compute")?;
        crate::grpc::resolve_datastores(&self.0, &mut spec, "inputs")?;
        // Keys are per workspace: another tenant's key never names this tenant's run.
        let idempotency_key = req
            .idempotency_key
            .as_ref()
            .map(|k| format!("{}/{k}", spec.workspace));
        spec.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Every secret the run names must be one of its workspace's (names only: a run of
        // another workspace cannot name this one's).
        self.0
            .coordinator
            .read(|s| s.secrets.check_refs(&spec.workspace, &spec.secrets))
            .map_err(|e| match &e {
                muster_core::secrets::SecretError::Unknown { name, .. } => {
                    Status::invalid_argument(format!("secrets.{name}: {e}"))
                }
                _ => Status::invalid_argument(e.to_string()),
            })?;
        // A run its target can never hold is refused here, not left queued for ever. (Not
        // in `State::apply`: a rule there would change how logs written before it replay.)
        let fit = self.0.coordinator.read(|s| {
            let c = s
                .computes
                .get(&spec.compute)
                .filter(|c| c.spec.workspace == spec.workspace)?;
            if let Some(why) = c.spec.never_fits(&spec) {
                return Some(NodeFit::Never(why));
            }
            let nodes: Vec<_> = s
                .nodes
                .values()
                .filter(|n| n.compute == spec.compute)
                .collect();
            match c
                .spec
                .place_instance_type(&mut spec, nodes.iter().map(|n| &n.labels))
            {
                Err(why) => return Some(NodeFit::Never(why)),
                Ok(Some(warning)) => spec.warnings.push(warning),
                Ok(None) => {}
            }
            let capacities: Vec<_> = nodes.iter().map(|n| &n.capacity).collect();
            Some(c.spec.node_fit(&spec, &capacities))
        });
        match fit {
            Some(NodeFit::Never(why)) => return Err(Status::invalid_argument(why.to_string())),
            Some(NodeFit::WaitsForNode(warning)) => spec.warnings.push(warning),
            Some(NodeFit::Fits) | None => {}
        }
        if let Some(code) = &spec.code {
            // The snapshot must be on a majority of servers before the run is accepted.
            check_code(&self.0, "code", code).await?;
        }
        // So must every local input uploaded with it.
        crate::grpc::check_uploaded_inputs(&self.0, "", &spec).await?;
        if let Some(key) = &req.idempotency_key
            && (key.is_empty() || key.len() > 128)
        {
            return Err(Status::invalid_argument(
                "idempotency_key: use 1 to 128 characters",
            ));
        }
        // The idempotency key is the state machine's to match (it answers with the run
        // the key named first), so the id is random on every try.
        let fresh = propose_fresh(
            &self.0,
            "run",
            false,
            new_run_id,
            |id| Command::SubmitRun {
                run_id: id.to_string(),
                spec: Box::new(spec.clone()),
                idempotency_key: idempotency_key.clone(),
                at: now_ms(),
            },
            |e| matches!(e, ApplyError::RunExists(_)),
        )
        .await?;
        match fresh {
            Fresh::Applied(_, Applied::Submitted { run_id, .. }) => {
                tracing::Span::current().record("run_id", run_id.as_str());
                tracing::debug!("run accepted");
                self.0.metrics.runs_submitted.inc();
                self.get(&run_id).map(Response::new)
            }
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    async fn get_run(&self, req: Request<v1::GetRunRequest>) -> Result<Response<v1::Run>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        self.0.coordinator.linearize(req.stale).await?;
        allow_run(&self.0, &caller, &req.id, Role::Reader)?;
        self.get_or_archived(&caller, &req.id, Role::Reader)
            .await
            .map(Response::new)
    }

    async fn list_runs(
        &self,
        req: Request<v1::ListRunsRequest>,
    ) -> Result<Response<v1::ListRunsResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let readable = caller.readable(&self.0, req.workspace.as_deref())?;
        let state = match req.state {
            Some(s) => Some(
                muster_proto::decode_enum::<v1::RunState, RunState>(s)
                    .map_err(|e| Status::invalid_argument(format!("state: {e}")))?,
            ),
            None => None,
        };
        let (paging, after) = paging(Listing::Runs, req.page_size, &req.page_token, req.limit)?;
        self.0.coordinator.linearize(req.stale).await?;
        let filter = RunFilter {
            experiment: req.experiment,
            state,
            compute: req.compute,
            since: req.since_ms,
        };
        // Only the runs on the page are converted: the state pages from its index by
        // submission number, filtering as it walks.
        let (mut runs, next) = self
            .0
            .coordinator
            .read(|s| {
                let page = s.runs_page(after.as_ref(), paging.size(), |r| {
                    readable.contains(&r.spec.workspace) && filter.matches(r)
                })?;
                let runs: Vec<v1::Run> = page.items.iter().map(|r| run_to_wire(s, r)).collect();
                Ok::<_, String>((runs, page.next))
            })
            .map_err(page_token_error)?;
        if paging.oldest_first() {
            runs.reverse();
        }
        let next_page_token = next_page_token(next);
        Ok(Response::new(v1::ListRunsResponse {
            runs,
            next_page_token,
        }))
    }

    async fn cancel_run(
        &self,
        req: Request<v1::CancelRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        allow_run(&self.0, &caller, &req.id, Role::User)?;
        let proposed = self
            .0
            .coordinator
            .propose(Command::CancelRun {
                run_id: req.id.clone(),
                reason: req.reason,
                at: now_ms(),
            })
            .await;
        match proposed {
            Ok(_) => {}
            // A cancel again (a client's retry of one whose answer was lost, or a second
            // user's) is answered as the first was: the run is canceled.
            Err(ProposalError::Rejected(ApplyError::RunFinished { state, .. }))
                if state == RunState::Canceled.as_str() => {}
            Err(ProposalError::Rejected(ApplyError::UnknownRun(id))) => return Err(not_found(&id)),
            Err(e) => return Err(status(e)),
        }
        self.get(&req.id).map(Response::new)
    }

    type StreamLogsStream = LogStream;

    async fn stream_logs(
        &self,
        req: Request<v1::StreamLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let relayed = crate::coordinator::peers::is_replica(&req);
        let caller = Caller::of(&req);
        let metadata = req.metadata().clone();
        let req = req.into_inner();
        // A follower that lags would list fewer attempts than the leader has: catch up to
        // the leader's commit first. Without a leader (no quorum) the local replica still
        // serves what it holds, so logs stay readable through an outage.
        if !relayed {
            match tokio::time::timeout(LINEARIZE_LOGS_WITHIN, self.0.coordinator.linearize(false))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(cause = %e, "logs served from the local replica"),
                Err(_) => {
                    tracing::debug!("logs served from the local replica: no read index in time")
                }
            }
        }
        allow_run(&self.0, &caller, &req.id, Role::Reader)?;
        let in_state = self.get(&req.id).is_ok();
        let archived = if in_state {
            None
        } else {
            self.archived(&caller, &req.id, Role::Reader).await?
        };
        if !in_state && archived.is_none() {
            // A follower that has not applied the submission yet: the leader knows the run.
            if !relayed && let Some(mut client) = leader_runs(&self.0) {
                let stream = client
                    .stream_logs(crate::coordinator::peers::relayed_request(req, &metadata))
                    .await?
                    .into_inner();
                return Ok(Response::new(Box::pin(stream)));
            }
            return Err(not_found(&req.id));
        }
        if let Some(rank) = req.rank {
            if req.all_ranks {
                return Err(Status::invalid_argument(
                    "rank: give one rank or all_ranks, not both",
                ));
            }
            let count = self
                .0
                .coordinator
                .read(|s| s.runs.get(&req.id).map(|r| r.spec.instance_count))
                .or(archived.as_ref().map(|(r, _)| r.spec.instance_count))
                .unwrap_or(1);
            if rank >= count {
                return Err(Status::invalid_argument(format!(
                    "rank: run {} has {count} rank(s), numbered from 0; there is no rank {rank}",
                    req.id
                )));
            }
        }
        let (tx, rx) = mpsc::channel(16);
        let server = self.0.clone();
        let archived = archived.map(|(run, _)| run);
        tokio::spawn(async move {
            if let Err(e) = follow_logs(&server, &req, archived.as_ref(), relayed, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn wait_run(
        &self,
        req: Request<v1::WaitRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        allow_run(&self.0, &caller, &req.id, Role::Reader)?;
        let deadline = (req.timeout_ms > 0)
            .then(|| tokio::time::Instant::now() + Duration::from_millis(req.timeout_ms));
        let mut changes = self.0.coordinator.subscribe();
        loop {
            let run = self.get_or_archived(&caller, &req.id, Role::Reader).await?;
            let terminal = run.state().is_terminal();
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
                _ = self.0.coordinator.shutting_down() => return Err(Status::unavailable("the server is shutting down; retry")),
            }
        }
    }
}

/// A RunService client of the leader, when this server is a follower that knows it.
fn leader_runs(server: &Server) -> Option<v1::run_service_client::RunServiceClient<Channel>> {
    let channel = server.coordinator.leader_channel()?;
    Some(v1::run_service_client::RunServiceClient::new(channel).max_decoding_message_size(16 << 20))
}

/// Where the next bytes of a rank's log come from.
enum Source {
    /// The rank ended: its sealed blob, which every server can read.
    Sealed(SealedLog),
    /// The live log file on this server (the leader takes logs from the agents).
    Local,
    /// The live log on the leader, relayed by this follower.
    Leader(v1::run_service_client::RunServiceClient<Channel>),
}

/// The ranks of an attempt with `count` ranks that a request asks for: one, all, or rank 0
/// (requests that predate ranks).
fn wanted_ranks(req: &v1::StreamLogsRequest, count: u32) -> Vec<u32> {
    match (req.rank, req.all_ranks) {
        (Some(r), _) => (r < count).then_some(r).into_iter().collect(),
        (None, true) => (0..count).collect(),
        (None, false) => (0..count.min(1)).collect(),
    }
}

fn source(server: &Server, sealed: Option<&SealedLog>, relayed: bool) -> Source {
    if let Some(log) = sealed {
        return Source::Sealed(log.clone());
    }
    if relayed {
        return Source::Local;
    }
    match leader_runs(server) {
        Some(client) => Source::Leader(client),
        None => Source::Local,
    }
}

/// Relays attempt `attempt`'s live logs (the ranks the request asks for) from the leader,
/// each rank from its offset in `offsets` on (the leader's stream starts each at 0; what was
/// sent already is trimmed). Ends when the leader's stream does: at the end of what it
/// stores, or (with `follow`) when the attempt's logs are complete.
async fn relay(
    mut client: v1::run_service_client::RunServiceClient<Channel>,
    req: &v1::StreamLogsRequest,
    attempt: u32,
    offsets: &mut BTreeMap<u32, u64>,
    tx: &mpsc::Sender<Result<v1::LogChunk, Status>>,
) -> Result<(), Status> {
    tracing::debug!(run_id = %req.id, attempt, ?offsets, "relaying a live log from the leader");
    let mut stream = client
        .stream_logs(crate::coordinator::peers::replica_request(
            v1::StreamLogsRequest {
                id: req.id.clone(),
                attempt: Some(attempt),
                follow: req.follow,
                rank: req.rank,
                all_ranks: req.all_ranks,
            },
        ))
        .await?
        .into_inner();
    while let Some(chunk) = stream.message().await? {
        let Some(offset) = offsets.get_mut(&chunk.rank) else {
            continue;
        };
        let end = chunk.offset + chunk.data.len() as u64;
        if chunk.attempt != attempt || end <= *offset || chunk.offset > *offset {
            continue;
        }
        let data = chunk.data[(*offset - chunk.offset) as usize..].to_vec();
        let sent = v1::LogChunk {
            attempt,
            offset: *offset,
            data,
            rank: chunk.rank,
            ranks: chunk.ranks,
        };
        *offset = end;
        if tx.send(Ok(sent)).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Streams a run's logs: each attempt in turn (or only the one asked for), the ranks the
/// request asks for (rank 0 by default), until the run ends (with `follow`) or until what is
/// stored now has been sent. The ranks of an attempt are read in turns, a chunk at a time,
/// each chunk tagged with its rank and its offset in that rank's log. An ended rank's log
/// comes from its sealed blob on this server (repaired from a peer if missing); a live one
/// from this server's file on the leader, or relayed from the leader on a follower (never
/// relayed twice: `relayed` requests are answered from what is here). An `archived` run
/// (not in the state) is read like an ended one, from the sealed logs it records.
async fn follow_logs(
    server: &Server,
    req: &v1::StreamLogsRequest,
    archived: Option<&muster_core::state::Run>,
    relayed: bool,
    tx: &mpsc::Sender<Result<v1::LogChunk, Status>>,
) -> Result<(), Status> {
    let mut attempt = req.attempt.unwrap_or(1).max(1);
    // This attempt's ranks still to send, with the offset reached in each.
    let mut offsets: BTreeMap<u32, u64> = BTreeMap::new();
    let mut done: BTreeSet<u32> = BTreeSet::new();
    let mut state_changes = server.coordinator.subscribe();
    let mut log_changes = server.store.logs.subscribe();
    // The attempt whose live logs the leader finished relaying (wait for this replica to
    // apply their seals rather than relay them again).
    let mut relayed_to_end: Option<u32> = None;
    loop {
        let (attempts, run_terminal, logs) = server
            .coordinator
            .read(|s| {
                s.runs.get(&req.id).or(archived).map(|r| {
                    (
                        r.attempt_number(),
                        r.state.is_terminal(),
                        AttemptLogs::of(s, &server.config, r, attempt),
                    )
                })
            })
            .ok_or_else(|| not_found(&req.id))?;
        if let Some(logs) = logs {
            let wanted = wanted_ranks(req, logs.ranks);
            for rank in &wanted {
                offsets.entry(*rank).or_insert(0);
            }
            let mut sent = false;
            let mut on_leader = None;
            for &rank in &wanted {
                if done.contains(&rank) {
                    continue;
                }
                let offset = offsets.get_mut(&rank).expect("entered above");
                let sealed = logs.sealed[rank as usize].as_ref();
                let data = match source(server, sealed, relayed) {
                    Source::Sealed(log) => {
                        if *offset >= log.bytes {
                            done.insert(rank);
                            continue;
                        }
                        let data = server.store.read_sealed(&log, *offset, LOG_CHUNK).await?;
                        if data.is_empty() {
                            return Err(Status::internal(format!(
                                "the sealed log {} is shorter than the {} bytes recorded",
                                log.sha256, log.bytes
                            )));
                        }
                        data
                    }
                    Source::Local => {
                        let data = server
                            .store
                            .logs
                            .read(&req.id, attempt, rank, *offset, LOG_CHUNK)
                            .map_err(|e| Status::internal(format!("reading the log: {e}")))?;
                        if data.is_empty() {
                            // At the end of what is stored: without `follow` that is all;
                            // with it, the rank is complete once its log will not grow.
                            if !req.follow || logs.settled[rank as usize] {
                                done.insert(rank);
                            }
                            continue;
                        }
                        data
                    }
                    Source::Leader(client) => {
                        if relayed_to_end == Some(attempt) {
                            // Relayed through its end: wait for the seal to be applied here.
                            if logs.settled[rank as usize] {
                                done.insert(rank);
                            }
                        } else {
                            on_leader = Some(client);
                        }
                        continue;
                    }
                };
                let n = data.len() as u64;
                let chunk = v1::LogChunk {
                    attempt,
                    offset: *offset,
                    data,
                    rank,
                    ranks: logs.ranks,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
                *offset += n;
                sent = true;
            }
            if sent {
                continue;
            }
            if let Some(client) = on_leader {
                match relay(client, req, attempt, &mut offsets, tx).await {
                    Ok(()) if tx.is_closed() => return Ok(()),
                    Ok(()) if req.follow => {
                        relayed_to_end = Some(attempt);
                        continue;
                    }
                    // What the leader stores now was sent.
                    Ok(()) => done.extend(wanted.iter().copied()),
                    // With `follow`, a failover ends the leader's stream: look again
                    // (the logs may be sealed by now, or a new leader known).
                    Err(_) if req.follow => {}
                    Err(e) => {
                        return Err(Status::unavailable(format!(
                            "the live log of attempt {attempt} is on the leader, which did not answer ({}); retry",
                            e.message()
                        )));
                    }
                }
            }
            let complete = wanted.iter().all(|r| done.contains(r));
            // Without `follow`, only an ended attempt leads on to the next.
            if complete && (req.follow || logs.ended) {
                if req.attempt.is_some() {
                    return Ok(());
                }
                if attempt < attempts {
                    attempt += 1;
                    offsets.clear();
                    done.clear();
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
            _ = server.coordinator.shutting_down() => return Err(Status::unavailable("the server is shutting down; follow the logs again")),
            _ = tx.closed() => return Ok(()),
        }
    }
}
