//! The gRPC services. Domain errors become `tonic::Status` here and nowhere else.

mod agents;
mod blobs;
mod cluster;
mod compute;
mod metrics;
mod pipelines;
mod runs;
mod sweeps;

pub(crate) use metrics::run_metrics;
pub(crate) use sweeps::sweep_view;

use std::sync::Arc;

use muster_core::ApplyError;
use muster_proto::v1;
use muster_raft::ProposeError;
use tonic::Status;

use crate::coordinator::{Coordinator, ProposalError};

/// All gRPC services (plus health and reflection) as an axum router.
pub fn router(coordinator: Arc<Coordinator>) -> axum::Router {
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
    tokio::spawn(async move {
        health_reporter
            .set_serving::<v1::run_service_server::RunServiceServer<runs::Runs>>()
            .await;
    });
    tonic::service::Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(v1::compute_service_server::ComputeServiceServer::new(
            compute::Computes(coordinator.clone()),
        ))
        .add_service(v1::run_service_server::RunServiceServer::new(runs::Runs(
            coordinator.clone(),
        )))
        .add_service(
            v1::metrics_service_server::MetricsServiceServer::new(metrics::Metrics(
                coordinator.clone(),
            ))
            .max_encoding_message_size(64 << 20),
        )
        .add_service(
            v1::blob_service_server::BlobServiceServer::new(blobs::Blobs(coordinator.clone()))
                .max_decoding_message_size(8 << 20),
        )
        .add_service(
            v1::agent_service_server::AgentServiceServer::new(agents::Agents(coordinator.clone()))
                .max_decoding_message_size(8 << 20),
        )
        .add_service(v1::pipeline_service_server::PipelineServiceServer::new(
            pipelines::Pipelines(coordinator.clone()),
        ))
        .add_service(v1::sweep_service_server::SweepServiceServer::new(
            sweeps::Sweeps(coordinator.clone()),
        ))
        .add_service(
            v1::cluster_service_server::ClusterServiceServer::new(cluster::Cluster(coordinator))
                .max_decoding_message_size(512 << 20)
                .max_encoding_message_size(512 << 20),
        )
        .into_axum_router()
}

/// Maps a failed proposal to the status a client can act on.
pub(crate) fn status(err: ProposalError) -> Status {
    match err {
        ProposalError::Rejected(e) => rejected(e),
        ProposalError::Raft(ProposeError::NotLeader { leader }) => Status::unavailable(format!(
            "this server is not the leader{}; retry against the leader",
            leader
                .map(|l| format!(" (the leader is server {l})"))
                .unwrap_or_default()
        )),
        ProposalError::Raft(e @ ProposeError::Dropped) => Status::unavailable(e.to_string()),
        ProposalError::Raft(e @ (ProposeError::Shutdown | ProposeError::Rejected(_))) => {
            Status::unavailable(e.to_string())
        }
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
        | ApplyError::PipelineExists(_) => Status::already_exists(msg),
        ApplyError::InvalidSpec(_)
        | ApplyError::InvalidNodeName { .. }
        | ApplyError::InvalidServerId(_)
        | ApplyError::InvalidServerAddress(_)
        | ApplyError::InvalidBlobHash { .. }
        | ApplyError::UnknownAttempt { .. }
        | ApplyError::UnknownRank { .. } => Status::invalid_argument(msg),
        ApplyError::ComputeInUse { .. }
        | ApplyError::RunFinished { .. }
        | ApplyError::InvalidPlacement(_)
        | ApplyError::SweepRejected { .. }
        | ApplyError::PipelineRejected { .. } => Status::failed_precondition(msg),
        ApplyError::UndecodableCommand(_) => Status::internal(msg),
    }
}
