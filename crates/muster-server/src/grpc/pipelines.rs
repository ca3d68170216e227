//! PipelineService: submit (the YAML, validated by muster-core, with each step's uploaded
//! code snapshot), get, list, cancel. The leader's pipeline loop (`leader/pipelines.rs`)
//! starts the steps.

use std::sync::Arc;

use muster_core::paging::Listing;
use muster_core::pipeline::parse_pipeline_yaml;
use muster_core::spec::CodeRef;
use muster_core::{ApplyError, Command};
use muster_proto::v1::{self, pipeline_service_server::PipelineService};
use muster_proto::{Word, pipeline_state_to_wire, pipeline_to_wire};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::coordinator::{new_id, now_ms};
use crate::grpc::auth::{Caller, allow_in};
use crate::grpc::{Fresh, check_code, next_page_token, page_token_error, paging, propose_fresh};
use crate::server::Server;
use crate::views::access::pipeline_workspace;
use muster_core::access::Role;

pub(crate) struct Pipelines(pub Arc<Server>);

fn not_found(id: &str) -> Status {
    Status::not_found(format!(
        "pipeline {id:?} does not exist: list pipelines with `muster pipeline list`"
    ))
}

/// The id a submission with idempotency key `key` gets: the same on every retry, so a
/// retry finds the first pipeline instead of creating a second one.
fn keyed_pipeline_id(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("pl-{}", &hex::encode(digest)[..16])
}

impl Pipelines {
    /// Checks the caller has `role` in the pipeline's workspace (else it is NOT_FOUND).
    fn allow(&self, caller: &Caller, id: &str, role: Role) -> Result<(), Status> {
        let workspace = self.0.coordinator.read(|s| {
            s.pipelines
                .get(id)
                .map(|p| pipeline_workspace(p).to_string())
        });
        allow_in(&self.0, caller, workspace, role, || not_found(id))
    }

    fn get(&self, id: &str) -> Result<v1::Pipeline, Status> {
        self.0
            .coordinator
            .read(|s| s.pipelines.get(id).map(|p| pipeline_to_wire(s, p)))
            .ok_or_else(|| not_found(id))
    }
}

#[tonic::async_trait]
impl PipelineService for Pipelines {
    async fn submit_pipeline(
        &self,
        req: Request<v1::SubmitPipelineRequest>,
    ) -> Result<Response<v1::Pipeline>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let workspace = crate::grpc::access::workspace_or_default(&req.workspace);
        caller.require(
            &self.0,
            &workspace,
            Role::User,
            &format!("workspace {workspace:?}"),
        )?;
        let experiment = if req.default_experiment.is_empty() {
            "default"
        } else {
            req.default_experiment.as_str()
        };
        let mut spec = parse_pipeline_yaml(&req.yaml, experiment)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        for (step, code) in req.code {
            let Some(s) = spec.steps.get_mut(&step) else {
                return Err(Status::invalid_argument(format!(
                    "code.{step}: the pipeline has no step {step:?} (its steps are under jobs:)"
                )));
            };
            let code: CodeRef = muster_proto::code_from_wire(code);
            check_code(&self.0, &format!("code.{step}"), &code).await?;
            s.run.code = Some(code);
            s.run
                .validate()
                .map_err(|e| Status::invalid_argument(format!("jobs.{step}.{e}")))?;
        }
        // Each step's local inputs uploaded with the submit must be on a majority too.
        for (name, step) in &spec.steps {
            crate::grpc::check_uploaded_inputs(&self.0, &format!("jobs.{name}."), &step.run)
                .await?;
        }
        for (name, step) in spec.steps.iter_mut() {
            step.run.workspace = workspace.clone();
            crate::grpc::resolve_serverless(
                &self.0,
                &mut step.run,
                &format!("jobs.{name}.compute"),
            )?;
            crate::grpc::resolve_datastores(
                &self.0,
                &mut step.run,
                &format!("jobs.{name}.inputs"),
            )?;
        }
        let unknown = self.0.coordinator.read(|s| {
            spec.steps
                .iter()
                .find(|(_, step)| {
                    s.computes
                        .get(&step.run.compute)
                        .is_none_or(|c| c.spec.workspace != workspace)
                })
                .map(|(name, step)| (name.clone(), step.run.compute.clone()))
        });
        if let Some((step, compute)) = unknown {
            return Err(Status::not_found(format!(
                "jobs.{step}.compute: compute target {compute:?} does not exist: create it with `muster compute create {compute}` or pick one from `muster compute list`"
            )));
        }
        let keyed = match &req.idempotency_key {
            Some(key) if key.is_empty() || key.len() > 128 => {
                return Err(Status::invalid_argument(
                    "idempotency_key: use 1 to 128 characters",
                ));
            }
            Some(key) => Some(keyed_pipeline_id(&format!("{workspace}/{key}"))),
            None => None,
        };
        if let Some(id) = &keyed
            && let Ok(existing) = self.get(id)
        {
            return Ok(Response::new(existing));
        }
        let fresh = propose_fresh(
            &self.0,
            "pipeline",
            keyed.is_some(),
            || keyed.clone().unwrap_or_else(|| new_id("pl-")),
            |id| Command::SubmitPipeline {
                pipeline_id: id.to_string(),
                spec: Box::new(spec.clone()),
                at: now_ms(),
            },
            |e| matches!(e, ApplyError::PipelineExists(_)),
        )
        .await?;
        // A keyed id that exists: the same key applied meanwhile (a retry racing the first
        // try): that one.
        let (Fresh::Applied(id, _) | Fresh::Exists(id)) = fresh;
        self.get(&id).map(Response::new)
    }

    async fn get_pipeline(
        &self,
        req: Request<v1::GetPipelineRequest>,
    ) -> Result<Response<v1::Pipeline>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        self.0.coordinator.linearize(false).await?;
        self.allow(&caller, &req.id, Role::Reader)?;
        self.get(&req.id).map(Response::new)
    }

    async fn list_pipelines(
        &self,
        req: Request<v1::ListPipelinesRequest>,
    ) -> Result<Response<v1::ListPipelinesResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let readable = caller.readable(&self.0, req.workspace.as_deref())?;
        let state = req
            .state
            .map(v1::PipelineState::from_wire)
            .transpose()
            .map_err(|e| Status::invalid_argument(format!("state: {e}")))?;
        let (paging, after) = paging(
            Listing::Pipelines,
            req.page_size,
            &req.page_token,
            req.limit,
        )?;
        self.0.coordinator.linearize(false).await?;
        let (mut pipelines, next) = self
            .0
            .coordinator
            .read(|s| {
                let page = s.pipelines_page(after.as_ref(), paging.size(), |p| {
                    readable.contains(pipeline_workspace(p))
                        && req
                            .experiment
                            .as_ref()
                            .is_none_or(|e| &p.spec.experiment == e)
                        && state.is_none_or(|st| pipeline_state_to_wire(p) == st)
                        && req.since_ms.is_none_or(|t| p.created_at >= t)
                })?;
                let pipelines: Vec<v1::Pipeline> =
                    page.items.iter().map(|p| pipeline_to_wire(s, p)).collect();
                Ok::<_, String>((pipelines, page.next))
            })
            .map_err(page_token_error)?;
        if paging.oldest_first() {
            pipelines.reverse();
        }
        let next_page_token = next_page_token(next);
        Ok(Response::new(v1::ListPipelinesResponse {
            pipelines,
            next_page_token,
        }))
    }

    async fn cancel_pipeline(
        &self,
        req: Request<v1::CancelPipelineRequest>,
    ) -> Result<Response<v1::Pipeline>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        self.allow(&caller, &req.id, Role::User)?;
        let current = self.get(&req.id)?;
        if matches!(
            current.state(),
            v1::PipelineState::Completed | v1::PipelineState::Failed | v1::PipelineState::Canceled
        ) {
            return Err(Status::failed_precondition(format!(
                "pipeline {} already ended ({}): there is nothing to cancel",
                req.id,
                current.state().word()
            )));
        }
        if current.state() != v1::PipelineState::Canceling {
            self.0
                .coordinator
                .propose(Command::CancelPipeline {
                    pipeline_id: req.id.clone(),
                    reason: req.reason,
                    at: now_ms(),
                })
                .await?;
        }
        self.get(&req.id).map(Response::new)
    }
}
