//! ClusterService: status and membership for admins; Raft transport, command forwarding and
//! read index between servers.

use std::sync::Arc;

use muster_core::Command;
use muster_core::state::validate_server_address;
use muster_proto::v1::{self, cluster_service_server::ClusterService};
use muster_raft::{MembershipChange, ProposeError, ReplicationState, Role};
use tonic::{Request, Response, Status};

use crate::coordinator::ProposalError;
use crate::grpc::status;
use crate::server::Server;

pub(crate) struct Cluster(pub Arc<Server>);

impl Cluster {
    fn snapshot(&self) -> v1::ClusterStatus {
        let s = self.0.coordinator.raft().status();
        let progress: std::collections::HashMap<u64, _> =
            s.progress.iter().map(|p| (p.id, p)).collect();
        let mut ids: Vec<(u64, bool)> = s.voters.iter().map(|v| (*v, true)).collect();
        ids.extend(s.learners.iter().map(|l| (*l, false)));
        ids.sort();
        v1::ClusterStatus {
            id: s.id,
            role: match s.role {
                Role::Leader => "leader",
                Role::Follower => "follower",
                Role::Candidate => "candidate",
                Role::PreCandidate => "pre_candidate",
            }
            .into(),
            leader: s.leader,
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            first_index: s.first_index,
            last_index: s.last_index,
            snapshot_index: s.snapshot_index,
            leader_address: s.leader.and_then(|l| self.0.coordinator.peers().address(l)),
            views: Vec::new(),
            state_digest: None,
            digest_index: 0,
            addresses: self
                .0
                .coordinator
                .read(|st| st.servers.clone())
                .into_iter()
                .collect(),
            members: ids
                .into_iter()
                .map(|(id, voter)| {
                    let p = progress.get(&id);
                    v1::ClusterMember {
                        id,
                        address: self.0.coordinator.peers().address(id).unwrap_or_default(),
                        address_replicated: self.0.coordinator.peers().replicated(id).is_some(),
                        voter,
                        matched_index: p.map(|p| p.matched).unwrap_or_default(),
                        replication: p
                            .map(|p| match p.state {
                                ReplicationState::Probe => "probe",
                                ReplicationState::Replicate => "replicate",
                                ReplicationState::Snapshot => "snapshot",
                            })
                            .unwrap_or_default()
                            .into(),
                        recently_active: p.is_some_and(|p| p.recent_active),
                    }
                })
                .collect(),
        }
    }

    fn not_leader(&self) -> Status {
        match self.0.coordinator.leader_address() {
            Some(addr) => Status::failed_precondition(format!(
                "membership changes go to the leader: run this against {addr}"
            )),
            None => Status::unavailable("the cluster has no leader right now; retry in a second"),
        }
    }

    async fn change(&self, changes: Vec<MembershipChange>) -> Result<(), Status> {
        match self.0.coordinator.raft().change_membership(changes).await {
            Ok(_) => Ok(()),
            Err(ProposeError::NotLeader { .. }) => Err(self.not_leader()),
            Err(ProposeError::Rejected(why)) => Err(Status::failed_precondition(why)),
            Err(e) => Err(status(ProposalError::Raft(e))),
        }
    }
}

/// A backup's bytes, as the blocking writer hands them over.
type BackupStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::BackupChunk, Status>> + Send>>;

/// A `Write` that sends what it is given as chunks of about 1 MiB (blocking: it runs on
/// a blocking thread, and waits while the client is slower than the disk).
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Result<v1::BackupChunk, Status>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(Ok(v1::BackupChunk { data }))
            .map_err(|_| std::io::Error::other("the client went away"))
    }
}

#[tonic::async_trait]
impl ClusterService for Cluster {
    type BackupStream = BackupStream;

    async fn backup(
        &self,
        req: Request<v1::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let with_blobs = !req.into_inner().no_blobs;
        // What a majority has committed, read here once this replica has applied it.
        self.0.coordinator.linearize(false).await.map_err(status)?;
        let applied_index = *self.0.coordinator.subscribe().borrow();
        let (state, (manifests, blobs)) = self
            .0
            .coordinator
            .read(|s| (s.to_snapshot(), s.referenced_blobs()));
        let missing_blobs = if with_blobs {
            self.0.store.gather(&manifests, &blobs).await
        } else {
            Vec::new()
        };
        let info = crate::store::backup::BackupInfo {
            format: crate::store::backup::FORMAT.into(),
            applied_index,
            taken_at_ms: crate::coordinator::now_ms(),
            server_id: self.0.config.raft.id,
            blobs: 0,
            missing_blobs,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let store = self.0.store.blobs.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = ChunkWriter {
                tx: tx.clone(),
                buf: Vec::new(),
            };
            let written = crate::store::backup::write(info, &state, &store, with_blobs, &mut out)
                .and_then(|()| std::io::Write::flush(&mut out));
            if let Err(e) = written {
                let _ = tx.blocking_send(Err(Status::internal(format!("the backup stopped: {e}"))));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn status(
        &self,
        req: Request<v1::ClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        let caller = crate::grpc::auth::Caller::of(&req);
        let req = req.into_inner();
        let mut status = self.snapshot();
        if req.state_digest {
            // One encoding of the whole state: for cluster admins (and servers) only.
            caller.require_cluster_admin(&self.0)?;
            use sha2::Digest;
            status.digest_index = *self.0.coordinator.subscribe().borrow();
            let bytes = self.0.coordinator.read(|s| s.to_snapshot());
            status.state_digest = Some(hex::encode(sha2::Sha256::digest(&bytes)));
        }
        if req.members {
            let me = status.id;
            let asks = status.members.iter().filter(|m| m.id != me).map(|m| {
                let client = self.0.coordinator.peers().client(m.id);
                async move {
                    let mut client = client?;
                    let answer = tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        client.status(v1::ClusterStatusRequest::default()),
                    )
                    .await;
                    answer.ok()?.ok().map(|r| r.into_inner())
                }
            });
            let mut views: Vec<v1::ClusterStatus> = futures::future::join_all(asks)
                .await
                .into_iter()
                .flatten()
                .collect();
            views.push(self.snapshot());
            views.sort_by_key(|v| v.id);
            status.views = views;
        }
        Ok(Response::new(status))
    }

    async fn add_server(
        &self,
        req: Request<v1::AddServerRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        let req = req.into_inner();
        if req.id == 0 || req.address.trim().is_empty() {
            return Err(Status::invalid_argument(
                "id and address: give the new server's id (> 0) and host:port",
            ));
        }
        validate_server_address(req.id, &req.address)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.0.coordinator.raft().status().voters.contains(&req.id) {
            return Err(Status::already_exists(format!(
                "server {} is already a voter",
                req.id
            )));
        }
        if !self.0.coordinator.is_leader() {
            return Err(self.not_leader());
        }
        // The new server must be able to reach every member (to forward writes, relay
        // logs, repair blobs): a server started alone with `--listen 0.0.0.0:...` and no
        // `--advertise` has no address anyone else can use.
        let members = self.0.coordinator.raft().status();
        if let Some(unknown) = members
            .voters
            .iter()
            .chain(members.learners.iter())
            .find(|id| self.0.coordinator.peers().address(**id).is_none())
        {
            return Err(Status::failed_precondition(format!(
                "server {unknown} has no address other servers can reach: restart it with --advertise HOST:PORT (or --listen on a specific address), then add server {} again",
                req.id
            )));
        }
        // Its address is replicated state before it becomes a member, so every server
        // (and every server restarted later) can reach it.
        self.0
            .coordinator
            .propose(Command::SetServerAddress {
                id: req.id,
                address: req.address.clone(),
            })
            .await?;
        // Learner first: it catches up (by snapshot) without affecting quorum.
        self.change(vec![MembershipChange::AddLearner(req.id)])
            .await?;
        let mut status = self.0.coordinator.raft().watch_status();
        let learner = req.id;
        let caught_up = tokio::time::timeout(std::time::Duration::from_secs(60), async move {
            status
                .wait_for(|s| {
                    s.progress.iter().any(|p| {
                        p.id == learner && p.matched > 0 && p.matched + 100 >= s.commit_index
                    })
                })
                .await
                .is_ok()
        })
        .await;
        if caught_up.is_err() {
            return Err(Status::deadline_exceeded(format!(
                "server {} joined as a learner but did not catch up within 60 s: is it running and reachable at {}?",
                req.id, req.address
            )));
        }
        self.change(vec![MembershipChange::AddVoter(req.id)])
            .await?;
        Ok(Response::new(self.snapshot()))
    }

    async fn remove_server(
        &self,
        req: Request<v1::RemoveServerRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        let id = req.into_inner().id;
        let s = self.0.coordinator.raft().status();
        let member = s.voters.contains(&id) || s.learners.contains(&id);
        let recorded = self.0.coordinator.peers().replicated(id).is_some();
        if !member && !recorded {
            return Err(Status::not_found(format!("server {id} is not a member")));
        }
        if member {
            self.change(vec![MembershipChange::Remove(id)]).await?;
        }
        // Then its address leaves the replicated state (run again if this step failed: the
        // server is no member any more, only its address is left to remove).
        if recorded {
            self.0
                .coordinator.propose(Command::RemoveServerAddress { id })
                .await
                .map_err(|e| {
                    Status::unavailable(format!(
                        "server {id} was removed, but its address could not be removed from the replicated state ({e}); run remove-server --id {id} again"
                    ))
                })?;
        }
        self.0.coordinator.peers().forget(id);
        Ok(Response::new(self.snapshot()))
    }

    async fn transfer_leader(
        &self,
        req: Request<v1::TransferLeaderRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        let to = req.into_inner().to;
        match self.0.coordinator.raft().transfer_leader(to).await {
            Ok(()) => {}
            Err(ProposeError::NotLeader { .. }) => return Err(self.not_leader()),
            Err(ProposeError::Rejected(why)) => return Err(Status::failed_precondition(why)),
            Err(e) => return Err(status(ProposalError::Raft(e))),
        }
        let mut watch = self.0.coordinator.raft().watch_status();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async move {
            watch.wait_for(|s| s.leader == Some(to)).await.is_ok()
        })
        .await;
        Ok(Response::new(self.snapshot()))
    }

    async fn raft(&self, req: Request<v1::RaftBatch>) -> Result<Response<v1::RaftAck>, Status> {
        // A server speaks only for itself: the batch's sender is the caller's own id.
        let caller = crate::grpc::auth::Caller::of(&req);
        let batch = req.into_inner();
        if caller != (crate::grpc::auth::Caller::Server { id: batch.from }) {
            return Err(Status::permission_denied(format!(
                "{} may not send Raft messages as server {}",
                caller.label(),
                batch.from
            )));
        }
        self.0.coordinator.peers().learn(batch.peers);
        for m in batch.messages {
            if let Err(e) = self.0.coordinator.raft().step(m) {
                tracing::debug!(from = batch.from, cause = %e, "raft message refused");
            }
        }
        Ok(Response::new(v1::RaftAck {}))
    }

    async fn forward(
        &self,
        req: Request<v1::ForwardRequest>,
    ) -> Result<Response<v1::ForwardResponse>, Status> {
        let command = req.into_inner().command;
        match self.0.coordinator.raft().propose(command).await {
            Ok(result) => Ok(Response::new(v1::ForwardResponse {
                result,
                index: self.0.coordinator.raft().status().applied_index,
            })),
            Err(e) => Err(status(ProposalError::Raft(e))),
        }
    }

    async fn secret_key(
        &self,
        _req: Request<v1::SecretKeyRequest>,
    ) -> Result<Response<v1::SecretKeyResponse>, Status> {
        let key = self
            .0
            .secret_key
            .get()
            .ok_or_else(|| crate::grpc::secrets::no_key(&self.0))?;
        Ok(Response::new(v1::SecretKeyResponse {
            key: key.as_bytes().to_vec(),
            key_id: key.id(),
        }))
    }

    async fn read_index(
        &self,
        _req: Request<v1::ReadIndexRequest>,
    ) -> Result<Response<v1::ReadIndexResponse>, Status> {
        match self.0.coordinator.raft().read_index().await {
            Ok(index) => Ok(Response::new(v1::ReadIndexResponse { index })),
            Err(e) => Err(status(ProposalError::Raft(e))),
        }
    }
}
