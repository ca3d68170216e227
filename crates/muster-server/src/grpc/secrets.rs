//! SecretService: set, list and delete a workspace's secrets. No method returns a value:
//! a value comes in with SetSecret, is sealed here under the cluster's secret key
//! (`store/secret_key.rs`, AEAD in `muster_core::secrets`) before it is proposed, so the
//! Raft log and every snapshot hold only ciphertext, and goes out only in the assignment of
//! an attempt that names it (`grpc/agents.rs`). Operators of a workspace set and delete its
//! secrets (as they manage its compute and datastores: Azure ML's Key Vault and Vault put
//! writing secrets above submitting jobs); its readers list the names; another workspace's
//! secrets do not exist for a caller without a role there.

use std::sync::Arc;

use muster_core::Command;
use muster_core::access::Role;
use muster_core::secrets::{self, MAX_SECRET_BYTES, Secret};
use muster_proto::v1::{self, secret_service_server::SecretService};
use tonic::{Request, Response, Status};

use crate::coordinator::now_ms;
use crate::grpc::access::workspace_or_default;
use crate::grpc::auth::Caller;
use crate::server::Server;

pub(crate) struct Secrets(pub Arc<Server>);

fn info(s: &Secret) -> v1::SecretInfo {
    v1::SecretInfo {
        workspace: s.workspace.clone(),
        name: s.name.clone(),
        set_by: s.set_by.clone(),
        set_at_ms: s.set_at,
        version: s.version,
    }
}

/// The answer for a server that was not given the cluster's secret key.
pub(crate) fn no_key(server: &Server) -> Status {
    Status::failed_precondition(format!(
        "this server has no secret key ({}): copy secret.key (0600) from the data directory of the server that founded the cluster",
        crate::store::secret_key::path(&server.config.data_dir).display()
    ))
}

#[tonic::async_trait]
impl SecretService for Secrets {
    async fn set_secret(
        &self,
        req: Request<v1::SetSecretRequest>,
    ) -> Result<Response<v1::SecretInfo>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let workspace = workspace_or_default(&req.workspace);
        caller.require(
            &self.0,
            &workspace,
            Role::Operator,
            &format!("workspace {workspace:?}"),
        )?;
        secrets::validate_name(&req.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        // Errors never echo the value.
        if req.value.is_empty() {
            return Err(Status::invalid_argument(format!(
                "value: secret {:?} is empty: give a value (--value-stdin or --from-file)",
                req.name
            )));
        }
        if req.value.len() > MAX_SECRET_BYTES {
            return Err(Status::invalid_argument(format!(
                "value: {} bytes is over the limit of {MAX_SECRET_BYTES} for one secret",
                req.value.len()
            )));
        }
        let key = self.0.secret_key.get().ok_or_else(|| no_key(&self.0))?;
        let nonce =
            crate::store::secret_key::nonce().map_err(|e| Status::unavailable(e.to_string()))?;
        let sealed = secrets::seal(key, nonce, &workspace, &req.name, &req.value);
        drop(req.value);
        let (by, at) = (caller.label(), now_ms());
        self.0
            .coordinator
            .propose(Command::SetSecret {
                workspace: workspace.clone(),
                name: req.name.clone(),
                sealed,
                by: by.clone(),
                at,
            })
            .await?;
        // A follower may not have applied it yet: then what it knows (version unknown, 0).
        let shown = self
            .0
            .coordinator
            .read(|s| s.secrets.get(&workspace, &req.name).map(info))
            .unwrap_or(v1::SecretInfo {
                workspace,
                name: req.name,
                set_by: by,
                set_at_ms: at,
                version: 0,
            });
        Ok(Response::new(shown))
    }

    async fn list_secrets(
        &self,
        req: Request<v1::ListSecretsRequest>,
    ) -> Result<Response<v1::ListSecretsResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let readable = caller.readable(&self.0, Some(req.workspace.as_str()))?;
        let secrets = self.0.coordinator.read(|s| {
            s.secrets
                .by_key
                .values()
                .filter(|x| readable.contains(&x.workspace))
                .map(info)
                .collect()
        });
        Ok(Response::new(v1::ListSecretsResponse { secrets }))
    }

    async fn delete_secret(
        &self,
        req: Request<v1::DeleteSecretRequest>,
    ) -> Result<Response<v1::DeleteSecretResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let workspace = workspace_or_default(&req.workspace);
        let not_found = || {
            Status::not_found(format!(
                "secret {:?} does not exist in workspace {workspace:?}: list them with `muster secret list`",
                req.name
            ))
        };
        caller
            .require(&self.0, &workspace, Role::Operator, "")
            .map_err(|e| match e.code() {
                tonic::Code::NotFound => not_found(),
                _ => e,
            })?;
        self.0
            .coordinator
            .propose(Command::DeleteSecret {
                workspace: workspace.clone(),
                name: req.name.clone(),
                by: caller.label(),
                at: now_ms(),
            })
            .await?;
        Ok(Response::new(v1::DeleteSecretResponse {}))
    }
}

/// The values of the secrets `spec` names, opened for one attempt's assignment. A secret
/// that is gone (deleted since the run was submitted) or does not open is left out, with a
/// warning naming it (never the value): the agent fails the attempt, saying which is
/// missing.
pub(crate) fn values_for(
    state: &muster_core::State,
    key: Option<&secrets::SecretKey>,
    spec: &muster_core::RunSpec,
) -> Vec<v1::SecretValue> {
    let mut out = Vec::new();
    for r in &spec.secrets {
        let Some(secret) = state.secrets.get(&spec.workspace, &r.name) else {
            tracing::warn!(secret = %r.name, workspace = %spec.workspace, "a run names a secret that no longer exists");
            continue;
        };
        let Some(key) = key else {
            tracing::warn!(secret = %r.name, "this server has no secret key: the secret is not delivered");
            continue;
        };
        match secrets::open(key, &secret.sealed, &spec.workspace, &r.name) {
            Ok(value) => out.push(v1::SecretValue {
                name: r.name.clone(),
                env: r.env.clone(),
                value,
            }),
            Err(e) => tracing::warn!(secret = %r.name, cause = %e, "a secret does not open"),
        }
    }
    out
}
