//! A run's metrics as this server can best answer: sealed once the run ended (from any
//! server's blob, repaired from a peer if missed), else live from this server's series
//! store on the leader, else relayed from the leader. Shared by MetricsService and the
//! studio's run page.

use muster_client::Channel;
use muster_proto::metrics_to_wire;
use muster_proto::v1;
use tonic::Status;

use crate::coordinator::peers::replica_request;
use crate::server::Server;

/// A MetricsService client of the leader, when this server is a follower that knows it.
fn leader_metrics(
    server: &Server,
) -> Option<v1::metrics_service_client::MetricsServiceClient<Channel>> {
    let channel = server.coordinator.leader_channel()?;
    Some(
        v1::metrics_service_client::MetricsServiceClient::new(channel)
            .max_decoding_message_size(64 << 20),
    )
}

/// A run's metrics as this server can best answer: sealed once the run ended, else live
/// from this server's store on the leader (or for a relayed request), else from the leader.
pub(crate) async fn run_metrics(
    server: &Server,
    req: &v1::GetRunMetricsRequest,
    relayed: bool,
) -> Result<v1::RunMetrics, Status> {
    let terminal = server
        .coordinator
        .read(|s| s.runs.get(&req.run_id).map(|r| r.state.is_terminal()));
    let ended = match terminal {
        Some(t) => t,
        None => {
            // A follower that has not applied the submission yet: the leader knows the run.
            if !relayed && let Some(mut client) = leader_metrics(server) {
                return Ok(client
                    .get_run_metrics(replica_request(req.clone()))
                    .await?
                    .into_inner());
            }
            return Err(Status::not_found(format!(
                "run {:?} does not exist: list runs with `muster run list`",
                req.run_id
            )));
        }
    };
    if ended {
        server
            .store
            .ensure_sealed_metrics_local(&req.run_id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
    } else if !relayed && let Some(mut client) = leader_metrics(server) {
        return Ok(client
            .get_run_metrics(replica_request(req.clone()))
            .await
            .map_err(|s| {
                Status::unavailable(format!(
                    "the live metrics of run {} are on the leader, which did not answer ({}); retry",
                    req.run_id,
                    s.message()
                ))
            })?
            .into_inner());
    }
    let mut answer = server
        .store
        .series
        .with_log(&req.run_id, |log| {
            metrics_to_wire(
                &req.run_id,
                log,
                req.name.as_deref(),
                &req.skip,
                req.last_only,
            )
        })
        .map_err(|e| Status::internal(format!("reading metrics: {e}")))?;
    answer.ended = ended;
    Ok(answer)
}
