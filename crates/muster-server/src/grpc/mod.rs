//! # grpc: the API as transport
//!
//! Each request first passes `auth.rs` (who is calling, and may they call this method);
//! then its service decodes it, checks the object's workspace, calls
//! the layer that does the work — `coordinator` to propose and read, `store` for bytes,
//! `views` for read models, `effects` for what must be stored before it is recorded — and
//! encodes the answer. Errors of every layer become `tonic::Status` here and nowhere else,
//! one `From` impl per error type (below).
//!
//! May import: every layer below (`effects`, `views`, `coordinator`, `store`), `listener`
//! (the per-connection facts in a request's extensions), muster-core and muster-proto.
//! Never `web/` or the leader loops. Requests reach these services only through the HTTP
//! front (`web/front.rs`), which lets through nothing but gRPC over HTTP/2.

mod access;
mod agents;
pub(crate) mod auth;
mod blobs;
mod cluster;
mod components;
mod compute;
mod data;
pub(crate) mod limits;
mod metrics;
mod pipelines;
pub(crate) mod replicas;
mod runs;
mod secrets;
mod sweeps;

use std::sync::Arc;

use muster_core::paging::{Listing, PageRequest, PageToken};
use muster_core::spec::CodeRef;
use muster_core::{Applied, ApplyError};
use muster_proto::v1;
use muster_raft::ProposeError;
use tonic::Status;

use crate::coordinator::ProposalError;
use crate::effects::EffectError;
use crate::server::Server;
use crate::store::{BlobError, SnapshotError, StoreError};

/// The gRPC routes and the services they serve.
#[derive(Debug)]
pub(crate) struct GrpcRoutes {
    /// Every service's methods (`/package.Service/Method`) as axum routes; tonic answers
    /// any other path with `grpc-status: 12` (unimplemented).
    pub(crate) router: axum::Router,
    /// The full name (`package.Service`) of each service in `router`, taken from the
    /// generated servers themselves (`NamedService::NAME`), so the HTTP front's notion of
    /// a gRPC path cannot drift from what is routed.
    pub(crate) services: Vec<&'static str>,
}

/// tonic's `Routes` and the name of every service added to them.
struct Services {
    routes: tonic::service::Routes,
    names: Vec<&'static str>,
}

impl Services {
    /// `Routes::add_service`, keeping the service's name.
    fn add<S>(mut self, svc: S) -> Self
    where
        S: tower::Service<axum::http::Request<tonic::body::Body>, Error = std::convert::Infallible>
            + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes = self.routes.add_service(svc);
        self
    }
}

/// Reads a list request's paging fields (`page_size`, `page_token` and the older `limit`;
/// runs.proto's `ListRunsRequest` says how they combine): how the answer pages, and where
/// its page starts. A token that is not one of `listing` is INVALID_ARGUMENT naming
/// `page_token`, saying what to send instead.
pub(crate) fn paging(
    listing: Listing,
    page_size: u32,
    page_token: &str,
    limit: u32,
) -> Result<(PageRequest, Option<PageToken>), Status> {
    let after = PageToken::parse_opt(listing, page_token).map_err(page_token_error)?;
    Ok((PageRequest::of(page_size, page_token, limit), after))
}

/// A page token the state could not page from, as INVALID_ARGUMENT naming the field.
pub(crate) fn page_token_error(why: String) -> Status {
    Status::invalid_argument(format!("page_token: {why}"))
}

/// A page's next token as the wire carries it (empty on the last page).
pub(crate) fn next_page_token(next: Option<PageToken>) -> String {
    next.map(|t| t.to_string()).unwrap_or_default()
}

/// All gRPC services (plus health and reflection) as an axum router, with their names.
pub(crate) fn router(server: Arc<Server>) -> GrpcRoutes {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(muster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("reflection v1 builds");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(muster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("reflection v1alpha builds");
    // SERVING while the Raft node runs; NOT_SERVING (for the server as a whole, "", and
    // RunService) while it cannot write its log and once it stopped, as `/healthz` is 503.
    let mut raft = server.coordinator.raft().watch_status();
    tokio::spawn(async move {
        type RunSvc = v1::run_service_server::RunServiceServer<runs::Runs>;
        health_reporter.set_serving::<RunSvc>().await;
        let mut serving = true;
        while raft.changed().await.is_ok() {
            let (stopped, storage) = {
                let s = raft.borrow_and_update();
                (s.stopped, s.storage_error.clone())
            };
            if stopped {
                break;
            }
            if serving == storage.is_none() {
                continue;
            }
            serving = storage.is_none();
            let status = if serving {
                tracing::info!("the raft log is writable again: health is SERVING");
                tonic_health::ServingStatus::Serving
            } else {
                tracing::error!(
                    cause = storage.as_deref().unwrap_or_default(),
                    "the raft log cannot be written: health is NOT_SERVING until it can"
                );
                tonic_health::ServingStatus::NotServing
            };
            health_reporter
                .set_service_status(<RunSvc as tonic::server::NamedService>::NAME, status)
                .await;
            health_reporter.set_service_status("", status).await;
        }
        let fatal = raft.borrow().fatal_error.clone();
        if let Some(why) = fatal {
            tracing::error!("the raft node stopped ({why}): health is NOT_SERVING");
        }
        health_reporter.set_not_serving::<RunSvc>().await;
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    });
    let services = Services {
        routes: tonic::service::Routes::default(),
        names: Vec::new(),
    }
    .add(health)
    .add(reflection_v1)
    .add(reflection_v1alpha)
    .add(v1::data_service_server::DataServiceServer::new(data::Data(
        server.clone(),
    )))
    .add(v1::component_service_server::ComponentServiceServer::new(
        components::Components(server.clone()),
    ))
    .add(v1::compute_service_server::ComputeServiceServer::new(
        compute::Computes(server.clone()),
    ))
    .add(v1::run_service_server::RunServiceServer::new(runs::Runs(
        server.clone(),
    )))
    .add(
        v1::metrics_service_server::MetricsServiceServer::new(metrics::Metrics(server.clone()))
            .max_encoding_message_size(64 << 20),
    )
    .add(
        v1::blob_service_server::BlobServiceServer::new(blobs::Blobs(server.clone()))
            .max_decoding_message_size(8 << 20),
    )
    .add(
        v1::agent_service_server::AgentServiceServer::new(agents::Agents(server.clone()))
            .max_decoding_message_size(8 << 20),
    )
    .add(v1::pipeline_service_server::PipelineServiceServer::new(
        pipelines::Pipelines(server.clone()),
    ))
    .add(v1::sweep_service_server::SweepServiceServer::new(
        sweeps::Sweeps(server.clone()),
    ))
    .add(v1::secret_service_server::SecretServiceServer::new(
        secrets::Secrets(server.clone()),
    ))
    .add(v1::access_service_server::AccessServiceServer::new(
        access::Accesses(server.clone()),
    ))
    .add(
        v1::cluster_service_server::ClusterServiceServer::new(cluster::Cluster(server.clone()))
            .max_decoding_message_size(512 << 20)
            .max_encoding_message_size(512 << 20),
    );
    GrpcRoutes {
        router: services
            .routes
            .into_axum_router()
            .layer(axum::middleware::from_fn_with_state(
                server,
                auth::authorize,
            )),
        services: services.names,
    }
}

/// Maps a failed proposal to the status a client can act on.
pub(crate) fn status(err: ProposalError) -> Status {
    match err {
        ProposalError::Rejected(e) => rejected(e),
        ProposalError::Raft(ProposeError::NotLeader { leader: None }) => Status::unavailable(
            "no leader: this server reaches no majority of the servers (it is on the minority side of a partition, or an election is under way); retry against another server (`--server a,b,c` tries each)",
        ),
        ProposalError::Raft(ProposeError::NotLeader {
            leader: Some(leader),
        }) => Status::unavailable(format!(
            "this server is not the leader (the leader is server {leader}); retry against the leader"
        )),
        ProposalError::Raft(e @ ProposeError::Dropped) => Status::unavailable(e.to_string()),
        ProposalError::Raft(
            e @ (ProposeError::Shutdown | ProposeError::Rejected(_) | ProposeError::Unwritable(_)),
        ) => Status::unavailable(e.to_string()),
        e @ ProposalError::Forward { .. } => Status::unavailable(e.to_string()),
        e @ ProposalError::Undecodable(_) => Status::internal(e.to_string()),
        ProposalError::Raft(e) => Status::internal(e.to_string()),
    }
}

pub(crate) fn rejected(e: ApplyError) -> Status {
    let msg = e.to_string();
    match e {
        ApplyError::UnknownCompute(_)
        | ApplyError::UnknownRun(_)
        | ApplyError::UnknownNode(_)
        | ApplyError::UnknownSweep(_)
        | ApplyError::UnknownPipeline(_) => Status::not_found(msg),
        ApplyError::ComputeExists(_)
        | ApplyError::NodeNameTaken(_)
        | ApplyError::RunExists(_)
        | ApplyError::SweepExists(_)
        | ApplyError::PipelineExists(_)
        | ApplyError::DataAssetExists { .. }
        | ApplyError::DatastoreExists(_)
        | ApplyError::ComponentExists { .. } => Status::already_exists(msg),
        ApplyError::InvalidSpec(_)
        | ApplyError::InvalidNodeName { .. }
        | ApplyError::InvalidServerId(_)
        | ApplyError::InvalidServerAddress(_)
        | ApplyError::InvalidBlobHash { .. }
        | ApplyError::UnknownAttempt { .. }
        | ApplyError::UnknownRank { .. } => Status::invalid_argument(msg),
        ApplyError::ComputeInUse { .. }
        | ApplyError::NodeInUse { .. }
        | ApplyError::RunFinished { .. }
        | ApplyError::InvalidPlacement(_)
        | ApplyError::SweepRejected { .. }
        | ApplyError::PipelineRejected { .. }
        | ApplyError::InvalidArchive(_) => Status::failed_precondition(msg),
        ApplyError::UndecodableCommand(_) => Status::internal(msg),
        ApplyError::Access(e) => auth::access_status(e),
        ApplyError::Secret(e) => {
            use muster_core::secrets::SecretError as E;
            match e {
                E::Unknown { .. } => Status::not_found(msg),
                E::InvalidName(_) | E::Empty(_) | E::TooLarge { .. } => {
                    Status::invalid_argument(msg)
                }
                E::TooMany(_) => Status::resource_exhausted(msg),
                E::WrongKey { .. } | E::Tampered(_) => Status::failed_precondition(msg),
            }
        }
    }
}

impl From<ProposalError> for Status {
    fn from(e: ProposalError) -> Status {
        status(e)
    }
}

impl From<BlobError> for Status {
    fn from(e: BlobError) -> Status {
        let msg = e.to_string();
        match e {
            BlobError::BadAddress(_) | BlobError::DigestMismatch { .. } => {
                Status::invalid_argument(msg)
            }
            BlobError::TooLarge { .. } | BlobError::DiskFull(_) => Status::resource_exhausted(msg),
            BlobError::NotFound(_) => Status::not_found(msg),
            BlobError::Io { .. } => Status::internal(msg),
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::Blob(e) => e.into(),
            e @ (StoreError::NoMajority { .. } | StoreError::Unavailable { .. }) => {
                Status::unavailable(e.to_string())
            }
            e @ (StoreError::Io { .. } | StoreError::Truncated { .. }) => {
                Status::internal(e.to_string())
            }
        }
    }
}

impl From<EffectError> for Status {
    fn from(e: EffectError) -> Status {
        match e {
            EffectError::Store(e) => e.into(),
            EffectError::Proposal(e) => e.into(),
        }
    }
}

/// Checks that the snapshot `code` names (the request's field `field`) is whole in this
/// server's store, and puts it on a majority of servers before the submission is accepted.
/// A job that names `compute: serverless` runs on its workspace's serverless compute
/// target: the spec names that target and keeps what the job asked for
/// (`requested_compute`). Without one, the job is refused with what to do. `field` is
/// where the compute was given (`compute`, `trial.compute`, `jobs.STEP.compute`).
pub(crate) fn resolve_serverless(
    server: &Server,
    spec: &mut muster_core::spec::RunSpec,
    field: &str,
) -> Result<(), Status> {
    if spec.compute != muster_core::spec::SERVERLESS {
        return Ok(());
    }
    let workspace = spec.workspace.clone();
    let (target, exists) = server.coordinator.read(|s| {
        let target = s.access.serverless.get(&workspace).cloned();
        let exists = target.as_ref().is_some_and(|t| {
            s.computes
                .get(t)
                .is_some_and(|c| c.spec.workspace == workspace)
        });
        (target, exists)
    });
    match target {
        Some(t) if exists => {
            spec.requested_compute = Some(muster_core::spec::SERVERLESS.to_string());
            spec.compute = t;
            Ok(())
        }
        Some(t) => Err(Status::failed_precondition(format!(
            "{field}: serverless: workspace {workspace:?} runs serverless jobs on compute target {t:?}, which no longer exists: an operator names another with `muster workspace update {workspace} --serverless-compute NAME`"
        ))),
        None => Err(Status::failed_precondition(format!(
            "{field}: serverless: workspace {workspace:?} has no serverless compute target: an operator names one with `muster workspace update {workspace} --serverless-compute NAME`, or submit to a compute target of `muster compute list`"
        ))),
    }
}

/// Resolves a spec's datastore inputs to host paths from the workspace's datastores
/// (`host_inputs`, which only the server sets: a submitted one is refused). `field` is
/// where the inputs were given (`inputs`, `trial.inputs`, `jobs.STEP.inputs`).
pub(crate) fn resolve_datastores(
    server: &Server,
    spec: &mut muster_core::spec::RunSpec,
    field: &str,
) -> Result<(), Status> {
    if !spec.host_inputs.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field}: host paths are set by the server from its datastores; name a datastore (azureml://datastores/NAME/paths/PATH)"
        )));
    }
    let workspace = spec.workspace.clone();
    let resolved = server.coordinator.read(|s| {
        spec.datastore_inputs
            .iter()
            .map(|(name, (store, rel))| {
                s.datastores
                    .get(&muster_core::data::scoped(&workspace, store))
                    .map(|d| (name.clone(), format!("{}/{rel}", d.path)))
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "{field}.{name}.path: workspace {workspace:?} has no datastore {store:?}: see `muster datastore list`, or an operator makes it with `muster datastore create {store} --path /mnt/...`"
                        ))
                    })
            })
            .collect::<Result<std::collections::BTreeMap<_, _>, Status>>()
    })?;
    spec.host_inputs = resolved;
    Ok(())
}

pub(crate) async fn check_code(
    server: &crate::server::Server,
    field: &str,
    code: &CodeRef,
) -> Result<(), Status> {
    // A server cut off from the majority says so now, not after the copies time out.
    server.coordinator.await_leader().await.map_err(status)?;
    let hashes = server.store.snapshot_blobs(code).map_err(|e| {
        let msg = format!("{field}: {e}");
        match e {
            SnapshotError::ManifestMissing(_) | SnapshotError::FileMissing(_) => {
                Status::failed_precondition(msg)
            }
            SnapshotError::ManifestUnreadable(_) | SnapshotError::ManifestInvalid(_) => {
                Status::invalid_argument(msg)
            }
        }
    })?;
    server.store.replicas.ensure_replicated(hashes).await?;
    Ok(())
}

/// Checks that each local input uploaded with `spec` (a run, a trial, a step) is on a
/// majority of servers, as its code must be; `at` prefixes the field (`trial.`, `jobs.S.`).
pub(crate) async fn check_uploaded_inputs(
    server: &crate::server::Server,
    at: &str,
    spec: &muster_core::spec::RunSpec,
) -> Result<(), Status> {
    for (name, manifest) in &spec.snapshot_inputs {
        let input = CodeRef::stored(manifest);
        check_code(server, &format!("{at}inputs.{name}"), &input).await?;
    }
    Ok(())
}

/// What [`propose_fresh`] got.
#[derive(Debug)]
pub(crate) enum Fresh {
    /// The submission was applied under this id.
    Applied(String, Applied),
    /// A keyed id (derived from the idempotency key) is taken: the first submission of
    /// the key.
    Exists(String),
}

/// Proposes a submission under a new id: `command(id)` for ids from `next_id`, at most five
/// (a random id collides with an existing one with negligible odds). `exists` tells the
/// rejection of an id in use; with `keyed` (the id is derived from an idempotency key, the
/// same on every try) that is [`Fresh::Exists`], else the next id is tried.
pub(crate) async fn propose_fresh(
    server: &crate::server::Server,
    what: &str,
    keyed: bool,
    mut next_id: impl FnMut() -> String,
    command: impl Fn(&str) -> muster_core::Command,
    exists: impl Fn(&ApplyError) -> bool,
) -> Result<Fresh, Status> {
    for _ in 0..5 {
        let id = next_id();
        match server.coordinator.propose(command(&id)).await {
            Ok(applied) => return Ok(Fresh::Applied(id, applied)),
            Err(ProposalError::Rejected(e)) if exists(&e) => {
                if keyed {
                    return Ok(Fresh::Exists(id));
                }
            }
            Err(e) => return Err(status(e)),
        }
    }
    Err(Status::internal(format!("could not allocate a {what} id")))
}
