//! MetricsService: a run's metric series. An ended run's metrics come from its sealed blob
//! (any server, fetched from a peer if this one missed it); a live run's from the leader's
//! series store, relayed by a follower.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use muster_core::metrics::validate_name;
use muster_proto::v1::{self, metrics_service_server::MetricsService};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::coordinator::peers::is_replica;
use crate::grpc::auth::{Caller, allow_run};
use crate::server::Server;
use crate::views::metrics::run_metrics;
use muster_core::access::Role;

pub(crate) struct Metrics(pub Arc<Server>);

type MetricStream = Pin<Box<dyn Stream<Item = Result<v1::RunMetrics, Status>> + Send>>;

fn check_name(name: Option<&str>) -> Result<(), Status> {
    if let Some(n) = name {
        validate_name(n).map_err(|e| {
            Status::invalid_argument(format!("name: {e}; give a metric name the run logs"))
        })?;
    }
    Ok(())
}

#[tonic::async_trait]
impl MetricsService for Metrics {
    async fn get_run_metrics(
        &self,
        req: Request<v1::GetRunMetricsRequest>,
    ) -> Result<Response<v1::RunMetrics>, Status> {
        let relayed = is_replica(&req);
        let caller = Caller::of(&req);
        let req = req.into_inner();
        allow_run(&self.0, &caller, &req.run_id, Role::Reader)?;
        check_name(req.name.as_deref())?;
        run_metrics(&self.0, &req, relayed).await.map(Response::new)
    }

    type StreamRunMetricsStream = MetricStream;

    async fn stream_run_metrics(
        &self,
        req: Request<v1::StreamRunMetricsRequest>,
    ) -> Result<Response<MetricStream>, Status> {
        let relayed = is_replica(&req);
        let caller = Caller::of(&req);
        let req = req.into_inner();
        allow_run(&self.0, &caller, &req.run_id, Role::Reader)?;
        check_name(req.name.as_deref())?;
        let mut get = v1::GetRunMetricsRequest {
            run_id: req.run_id.clone(),
            name: req.name.clone(),
            skip: HashMap::new(),
            last_only: false,
        };
        // The first answer (or its error) before the stream starts: a bad id fails the call.
        let first = run_metrics(&self.0, &get, relayed).await?;
        let (tx, rx) = mpsc::channel(16);
        let server = self.0.clone();
        tokio::spawn(async move {
            let mut changes = server.store.series.subscribe();
            let mut applied = server.coordinator.subscribe();
            let mut next = Ok(first);
            let mut malformed = None;
            loop {
                let m = match next {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                for s in &m.series {
                    get.skip
                        .insert(s.name.clone(), s.points_before + s.steps.len() as u64);
                }
                let ended = m.ended;
                let news = m.series.iter().any(|s| !s.steps.is_empty())
                    || malformed != Some(m.malformed)
                    || ended;
                malformed = Some(m.malformed);
                if news && tx.send(Ok(m)).await.is_err() {
                    return;
                }
                if !req.follow || ended {
                    return;
                }
                // New points, a state change (the run ended), or a relay's poll interval.
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = applied.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = tx.closed() => return,
                    _ = server.coordinator.shutting_down() => {
                        let _ = tx.send(Err(Status::unavailable("the server is shutting down; retry"))).await;
                        return;
                    }
                }
                // Batch bursts of points.
                tokio::time::sleep(Duration::from_millis(50)).await;
                next = run_metrics(&server, &get, relayed).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
