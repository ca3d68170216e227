//! SweepService: submit, get, list and cancel sweeps. The sweep controller itself is the
//! leader loop in `leader/sweeps.rs`.

use std::sync::Arc;

use muster_core::paging::Listing;
use muster_core::state::Sweep;
use muster_core::{ApplyError, Command};
use muster_proto::v1::{self, sweep_service_server::SweepService};
use muster_proto::{Word, sweep_spec_from_wire, sweep_state_to_wire};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::coordinator::{ID_ALPHABET, new_id, now_ms};
use crate::grpc::auth::{Caller, allow_in};
use crate::grpc::{Fresh, check_code, next_page_token, page_token_error, paging, propose_fresh};
use crate::server::Server;
use crate::views::access::sweep_workspace;
use crate::views::sweeps::sweep_view;
use muster_core::access::Role;

pub(crate) struct Sweeps(pub Arc<Server>);

fn not_found(id: &str) -> Status {
    Status::not_found(format!(
        "sweep {id:?} does not exist: list sweeps with `muster sweep list`"
    ))
}

/// A new sweep id: `sweep-` and 10 lowercase letters and digits; derived from the
/// idempotency key when there is one (so a retry proposes the same id and finds the first
/// sweep), random otherwise.
fn sweep_id(key: Option<&str>) -> String {
    let Some(key) = key else {
        return new_id("sweep-");
    };
    let digest = Sha256::digest(format!("muster-sweep-key:{key}").as_bytes());
    let mut id = String::from("sweep-");
    for b in digest.iter().take(10) {
        id.push(ID_ALPHABET[*b as usize % ID_ALPHABET.len()] as char);
    }
    id
}

impl Sweeps {
    /// Checks the caller has `role` in the sweep's workspace (else it is NOT_FOUND).
    fn allow(&self, caller: &Caller, id: &str, role: Role) -> Result<(), Status> {
        let workspace = self
            .0
            .coordinator
            .read(|s| s.sweeps.get(id).map(|w| sweep_workspace(w).to_string()));
        allow_in(&self.0, caller, workspace, role, || not_found(id))
    }

    fn get(&self, id: &str) -> Result<v1::Sweep, Status> {
        let sweep = self
            .0
            .coordinator
            .read(|s| s.sweeps.get(id).cloned())
            .ok_or_else(|| not_found(id))?;
        Ok(sweep_view(&self.0, &sweep))
    }
}

#[tonic::async_trait]
impl SweepService for Sweeps {
    async fn submit_sweep(
        &self,
        req: Request<v1::SubmitSweepRequest>,
    ) -> Result<Response<v1::Sweep>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let mut spec = sweep_spec_from_wire(
            req.spec
                .ok_or_else(|| Status::invalid_argument("spec: missing"))?,
        )
        .map_err(Status::invalid_argument)?;
        spec.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let workspace = spec.trial.workspace.clone();
        caller.require(
            &self.0,
            &workspace,
            Role::User,
            &format!("workspace {workspace:?}"),
        )?;
        crate::grpc::resolve_serverless(&self.0, &mut spec.trial, "trial.compute")?;
        crate::grpc::resolve_datastores(&self.0, &mut spec.trial, "trial.inputs")?;
        // Keys are per workspace: another tenant's key never names this tenant's sweep.
        let key = req
            .idempotency_key
            .as_ref()
            .map(|k| format!("{workspace}/{k}"));
        if let Some(key) = &req.idempotency_key
            && (key.is_empty() || key.len() > 128)
        {
            return Err(Status::invalid_argument(
                "idempotency_key: use 1 to 128 characters",
            ));
        }
        if let Some(code) = &spec.trial.code {
            // The trial's snapshot must be on a majority of servers before the sweep is
            // accepted (as for a run).
            check_code(&self.0, "trial.code", code).await?;
        }
        // So must every local input uploaded with it.
        crate::grpc::check_uploaded_inputs(&self.0, "trial.", &spec.trial).await?;
        let keyed = req.idempotency_key.is_some();
        // A fresh random id collides with an existing one with negligible odds; retry if
        // it does. A keyed id that exists is the first submission of this key.
        let fresh = propose_fresh(
            &self.0,
            "sweep",
            keyed,
            || sweep_id(key.as_deref()),
            |id| Command::SubmitSweep {
                sweep_id: id.to_string(),
                spec: Box::new(spec.clone()),
                seed: spec.seed_or(rand::random()),
                at: now_ms(),
            },
            |e| matches!(e, ApplyError::SweepExists(_)),
        )
        .await?;
        match fresh {
            Fresh::Applied(id, _) => self.get(&id).map(Response::new),
            // The first submission of this key.
            Fresh::Exists(id) => {
                let first = self
                    .0
                    .coordinator
                    .read(|s| s.sweeps.get(&id).cloned())
                    .ok_or_else(|| not_found(&id))?;
                if first.spec != spec {
                    return Err(Status::already_exists(format!(
                        "idempotency_key: it was used for another sweep ({id}): use a new key"
                    )));
                }
                Ok(Response::new(sweep_view(&self.0, &first)))
            }
        }
    }

    async fn get_sweep(
        &self,
        req: Request<v1::GetSweepRequest>,
    ) -> Result<Response<v1::Sweep>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        self.0.coordinator.linearize(req.stale).await?;
        self.allow(&caller, &req.id, Role::Reader)?;
        self.get(&req.id).map(Response::new)
    }

    async fn list_sweeps(
        &self,
        req: Request<v1::ListSweepsRequest>,
    ) -> Result<Response<v1::ListSweepsResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let readable = caller.readable(&self.0, req.workspace.as_deref())?;
        let state = req
            .state
            .map(v1::SweepState::from_wire)
            .transpose()
            .map_err(|e| Status::invalid_argument(format!("state: {e}")))?;
        let (paging, after) = paging(Listing::Sweeps, req.page_size, &req.page_token, 0)?;
        self.0.coordinator.linearize(req.stale).await?;
        // Only the sweeps on the page are cloned (their view reads the metric store, which
        // is not done under the state's lock).
        let (mut sweeps, next): (Vec<Sweep>, _) = self
            .0
            .coordinator
            .read(|s| {
                let page = s.sweeps_page(after.as_ref(), paging.size(), |w| {
                    readable.contains(sweep_workspace(w))
                        && req
                            .experiment
                            .as_ref()
                            .is_none_or(|e| &w.spec.experiment == e)
                        && state.is_none_or(|st| sweep_state_to_wire(w) == st)
                        && req.since_ms.is_none_or(|t| w.created_at >= t)
                })?;
                let sweeps = page.items.into_iter().cloned().collect();
                Ok::<_, String>((sweeps, page.next))
            })
            .map_err(page_token_error)?;
        if paging.oldest_first() {
            sweeps.reverse();
        }
        let sweeps = sweeps.iter().map(|s| sweep_view(&self.0, s)).collect();
        let next_page_token = next_page_token(next);
        Ok(Response::new(v1::ListSweepsResponse {
            sweeps,
            next_page_token,
        }))
    }

    async fn cancel_sweep(
        &self,
        req: Request<v1::CancelSweepRequest>,
    ) -> Result<Response<v1::Sweep>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        self.allow(&caller, &req.id, Role::User)?;
        let sweep = self
            .0
            .coordinator
            .read(|s| s.sweeps.get(&req.id).cloned())
            .ok_or_else(|| not_found(&req.id))?;
        if sweep.finished.is_some() {
            return Err(Status::failed_precondition(format!(
                "sweep {} already ended ({}): nothing to cancel",
                req.id,
                muster_proto::sweep_state(&sweep)
            )));
        }
        if sweep.cancel_requested.is_some() {
            // Canceling twice is not an error: the first cancel is under way.
            return self.get(&req.id).map(Response::new);
        }
        self.0
            .coordinator
            .propose(Command::CancelSweep {
                sweep_id: req.id.clone(),
                reason: req.reason,
                at: now_ms(),
            })
            .await?;
        self.get(&req.id).map(Response::new)
    }
}
