//! ComputeService: create, list, show and delete compute targets; list nodes.

use std::sync::Arc;

use muster_core::paging::{Listing, PageRequest};
use muster_core::{Command, NodeState};
use muster_proto::v1::{self, compute_service_server::ComputeService};
use muster_proto::{compute_spec_from_wire, compute_to_wire};
use tonic::{Request, Response, Status};

use crate::coordinator::now_ms;
use crate::grpc::auth::Caller;
use crate::grpc::{next_page_token, page_token_error, paging};
use crate::server::Server;
use crate::views;
use muster_core::access::Role;

pub(crate) struct Computes(pub Arc<Server>);

/// A compute target's `runs:` loosens the hardened defaults of every run on its nodes
/// (root, capabilities): only a cluster admin sets or changes it.
fn loosening(server: &Server, caller: &Caller) -> Result<(), Status> {
    caller.require_cluster_admin(server).map_err(|e| {
        Status::permission_denied(format!(
            "runs: allowing root, adding capabilities or changing the process limit of a compute target's runs needs a cluster admin: {}",
            e.message()
        ))
    })
}

#[tonic::async_trait]
impl ComputeService for Computes {
    async fn create_compute(
        &self,
        req: Request<v1::CreateComputeRequest>,
    ) -> Result<Response<v1::ComputeTarget>, Status> {
        let caller = Caller::of(&req);
        let wire = req
            .into_inner()
            .compute
            .ok_or_else(|| Status::invalid_argument("compute: missing"))?;
        let spec = compute_spec_from_wire(&wire).map_err(Status::invalid_argument)?;
        caller.require(
            &self.0,
            &spec.workspace,
            Role::Operator,
            &format!("workspace {:?}", spec.workspace),
        )?;
        if !spec.run_policy.is_default() {
            loosening(&self.0, &caller)?;
        }
        spec.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if spec.name == muster_core::spec::SERVERLESS {
            return Err(Status::invalid_argument(
                "name: `serverless` is how jobs ask for their workspace's serverless compute target: pick another name, then `muster workspace update WORKSPACE --serverless-compute NAME`",
            ));
        }
        let name = spec.name.clone();
        self.0
            .coordinator
            .propose(Command::CreateCompute { spec, at: now_ms() })
            .await?;
        self.get(&name)
    }

    async fn update_compute(
        &self,
        req: Request<v1::UpdateComputeRequest>,
    ) -> Result<Response<v1::ComputeTarget>, Status> {
        let caller = Caller::of(&req);
        let wire = req
            .into_inner()
            .compute
            .ok_or_else(|| Status::invalid_argument("compute: missing"))?;
        let spec = compute_spec_from_wire(&wire).map_err(Status::invalid_argument)?;
        // Operators of the target's own workspace; another workspace's target is unknown.
        let known = self
            .0
            .coordinator
            .read(|s| s.computes.get(&spec.name).map(|c| c.spec.workspace.clone()));
        let workspace = known.ok_or_else(|| {
            Status::not_found(format!(
                "compute target {:?} does not exist: list them with `muster compute list`",
                spec.name
            ))
        })?;
        self.allow(&caller, &spec.name, Role::Operator)
            .map_err(|_| {
                Status::not_found(format!("compute target {:?} does not exist", spec.name))
            })?;
        if spec.workspace != workspace {
            return Err(Status::invalid_argument(
                "workspace: a compute target's workspace cannot change: create another target (and delete this one)",
            ));
        }
        let policy = self.0.coordinator.read(|s| {
            s.computes
                .get(&spec.name)
                .map(|c| c.spec.run_policy.clone())
        });
        if policy.as_ref() != Some(&spec.run_policy) && !spec.run_policy.is_default() {
            loosening(&self.0, &caller)?;
        }
        spec.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = spec.name.clone();
        self.0
            .coordinator
            .propose(Command::UpdateCompute { spec, at: now_ms() })
            .await?;
        self.get(&name)
    }

    async fn list_computes(
        &self,
        req: Request<v1::ListComputesRequest>,
    ) -> Result<Response<v1::ListComputesResponse>, Status> {
        let caller = Caller::of(&req);
        let readable = caller.readable(&self.0, req.get_ref().workspace.as_deref())?;
        let computes = self.0.coordinator.read(|s| {
            s.computes
                .values()
                .filter(|c| readable.contains(&c.spec.workspace))
                .map(|c| compute_to_wire(s, c))
                .collect()
        });
        Ok(Response::new(v1::ListComputesResponse { computes }))
    }

    async fn get_compute(
        &self,
        req: Request<v1::GetComputeRequest>,
    ) -> Result<Response<v1::ComputeTarget>, Status> {
        let caller = Caller::of(&req);
        let name = req.into_inner().name;
        self.allow(&caller, &name, Role::Reader)?;
        self.get(&name)
    }

    async fn set_compute_stopped(
        &self,
        req: Request<v1::SetComputeStoppedRequest>,
    ) -> Result<Response<v1::ComputeTarget>, Status> {
        let caller = Caller::of(&req);
        let v1::SetComputeStoppedRequest { name, stopped } = req.into_inner();
        self.allow(&caller, &name, Role::Operator)?;
        self.0
            .coordinator
            .propose(Command::SetComputeStopped {
                name: name.clone(),
                stopped,
                at: now_ms(),
            })
            .await?;
        self.get(&name)
    }

    async fn delete_compute(
        &self,
        req: Request<v1::DeleteComputeRequest>,
    ) -> Result<Response<v1::DeleteComputeResponse>, Status> {
        let caller = Caller::of(&req);
        let name = req.into_inner().name;
        self.allow(&caller, &name, Role::Operator)?;
        self.0
            .coordinator
            .propose(Command::DeleteCompute { name, at: now_ms() })
            .await?;
        Ok(Response::new(v1::DeleteComputeResponse {}))
    }

    async fn get_compute_status(
        &self,
        req: Request<v1::GetComputeRequest>,
    ) -> Result<Response<v1::ComputeStatus>, Status> {
        let caller = Caller::of(&req);
        let name = req.into_inner().name;
        self.allow(&caller, &name, Role::Reader)?;
        views::compute::compute_status(&self.0, &name)
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "compute target {name:?} does not exist: list them with `muster compute list`"
                ))
            })
    }

    async fn list_nodes(
        &self,
        req: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let compute = req.compute;
        if let Some(name) = &compute {
            self.allow(&caller, name, Role::Reader)?;
        }
        let (paging, after) = paging(Listing::Nodes, req.page_size, &req.page_token, 0)?;
        let readable = caller.readable(&self.0, None)?;
        let visible = self.0.coordinator.read(|s| {
            s.computes
                .values()
                .filter(|c| readable.contains(&c.spec.workspace))
                .map(|c| c.spec.name.clone())
                .collect::<std::collections::BTreeSet<_>>()
        });
        if matches!(paging, PageRequest::Legacy(_)) {
            // Not paged (clients that predate paging): every node, as before.
            let nodes = views::compute::nodes(&self.0, compute.as_deref())
                .into_iter()
                .filter(|n| visible.contains(&n.compute))
                .collect();
            return Ok(Response::new(v1::ListNodesResponse {
                nodes,
                next_page_token: String::new(),
            }));
        }
        let (nodes, next) = views::compute::nodes_page(
            &self.0,
            compute.as_deref(),
            |c| visible.contains(c),
            after.as_ref(),
            paging.size(),
        )
        .map_err(page_token_error)?;
        Ok(Response::new(v1::ListNodesResponse {
            nodes,
            next_page_token: next_page_token(next),
        }))
    }

    async fn set_node_state(
        &self,
        req: Request<v1::SetNodeStateRequest>,
    ) -> Result<Response<v1::Node>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let (state, verb) = match req.action.as_str() {
            "drain" => (Some(NodeState::Draining), "drained"),
            "evict" => (Some(NodeState::Evicted), "evicted"),
            "resume" => (Some(NodeState::Ready), "resumed"),
            "remove" => (None, "removed"),
            other => {
                return Err(Status::invalid_argument(format!(
                    "action: unknown action {other:?}: use drain, evict, resume or remove"
                )));
            }
        };
        let (node_id, compute) = self
            .0
            .coordinator
            .read(|s| {
                s.nodes
                    .values()
                    .find(|n| n.name == req.node || n.id == req.node)
                    .map(|n| (n.id.clone(), n.compute.clone()))
            })
            .ok_or_else(|| {
                Status::not_found(format!(
                    "node {:?} is not registered: list nodes with `muster node list`",
                    req.node
                ))
            })?;
        self.allow(&caller, &compute, Role::Operator)
            .map_err(|_| Status::not_found(format!("node {:?} is not registered", req.node)))?;
        let Some(state) = state else {
            // Removed: answered with the node as it was.
            let node = views::compute::node(&self.0, &node_id)
                .ok_or_else(|| Status::not_found("the node was removed meanwhile"))?;
            self.0
                .coordinator
                .propose(Command::RemoveNode {
                    node_id,
                    at: now_ms(),
                })
                .await?;
            return Ok(Response::new(node));
        };
        let reason = req
            .reason
            .or_else(|| (state != NodeState::Ready).then(|| format!("{verb} by an admin")));
        self.0
            .coordinator
            .propose(Command::SetNodeState {
                node_id: node_id.clone(),
                state,
                reason,
                at: now_ms(),
            })
            .await?;
        let node = views::compute::node(&self.0, &node_id)
            .ok_or_else(|| Status::not_found("the node was removed meanwhile"))?;
        Ok(Response::new(node))
    }
}

impl Computes {
    /// Checks the caller has `role` in the compute target's workspace; one the caller
    /// cannot see is NOT_FOUND. An unknown one passes (the handler says it is unknown).
    fn allow(&self, caller: &Caller, name: &str, role: Role) -> Result<(), Status> {
        let Some(workspace) = self
            .0
            .coordinator
            .read(|s| s.computes.get(name).map(|c| c.spec.workspace.clone()))
        else {
            return Ok(());
        };
        caller
            .require(&self.0, &workspace, role, "")
            .map_err(|e| match e.code() {
                tonic::Code::NotFound => Status::not_found(format!(
                    "compute target {name:?} does not exist: list them with `muster compute list`"
                )),
                _ => e,
            })
    }

    fn get(&self, name: &str) -> Result<Response<v1::ComputeTarget>, Status> {
        self.0
            .coordinator
            .read(|s| s.computes.get(name).map(|c| compute_to_wire(s, c)))
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "compute target {name:?} does not exist: list them with `muster compute list`"
                ))
            })
    }
}
