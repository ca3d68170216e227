//! AccessService: tokens, join tokens, workspaces, roles and the audit log. Who may call
//! each method is `auth.rs`'s table; the scope checks (a user's own tokens, an admin of the
//! workspace a grant is in) are here. Secrets are drawn here, shown once in the answer, and
//! only their hashes are proposed.

use std::sync::Arc;
use std::time::Duration;

use muster_core::Command;
use muster_core::access::{
    AccessChange, DEFAULT_WORKSPACE, Grant, JOIN_PREFIX, JoinToken, Principal, Role, TOKEN_PREFIX,
    Token, format_token, hash_secret, validate_name,
};
use muster_proto::v1::{self, access_service_server::AccessService};
use tonic::{Request, Response, Status};

use crate::coordinator::{new_secret, new_token_id, now_ms};
use crate::grpc::auth::Caller;
use crate::server::Server;

/// How long a user token lives unless told otherwise.
pub(crate) const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// How long a join token lives unless told otherwise.
pub(crate) const DEFAULT_JOIN_TTL: Duration = Duration::from_secs(3600);

pub(crate) struct Accesses(pub Arc<Server>);

fn token_info(t: &Token) -> v1::TokenInfo {
    v1::TokenInfo {
        id: t.id.clone(),
        principal: t.principal.label(),
        name: t.name.clone(),
        created_at_ms: t.created_at,
        expires_at_ms: t.expires_at,
        revoked_at_ms: t.revoked_at,
        created_by: t.created_by.clone(),
        used_by: None,
    }
}

fn join_info(j: &JoinToken) -> v1::TokenInfo {
    v1::TokenInfo {
        id: j.id.clone(),
        principal: format!("join:{}", j.compute),
        name: String::new(),
        created_at_ms: j.created_at,
        expires_at_ms: Some(j.expires_at),
        revoked_at_ms: None,
        created_by: j.created_by.clone(),
        used_by: j.used.as_ref().map(|(node, _)| node.clone()),
    }
}

fn grant_view(g: &Grant) -> v1::Grant {
    v1::Grant {
        user: g.user.clone(),
        workspace: g.workspace.clone().unwrap_or_default(),
        role: g.role.as_str().to_string(),
    }
}

fn grant_from_wire(g: Option<v1::Grant>) -> Result<Grant, Status> {
    let g = g.ok_or_else(|| Status::invalid_argument("grant: required"))?;
    let role =
        Role::parse(&g.role).map_err(|e| Status::invalid_argument(format!("grant.role: {e}")))?;
    validate_name("user", &g.user)
        .map_err(|e| Status::invalid_argument(format!("grant.user: {e}")))?;
    let workspace = (!g.workspace.trim().is_empty()).then(|| g.workspace.trim().to_string());
    Ok(Grant {
        user: g.user,
        workspace,
        role,
    })
}

/// A new token's expiry: `expires_in_s` from now, the default when 0, never only for an
/// admin who asks.
fn expiry(
    server: &Server,
    caller: &Caller,
    req: &v1::CreateTokenRequest,
    default: Duration,
    now: u64,
) -> Result<Option<u64>, Status> {
    if req.never_expires {
        if req.join {
            return Err(Status::invalid_argument(
                "never_expires: join tokens always expire; give --expires (e.g. 1h)",
            ));
        }
        caller.require_cluster_admin(server)?;
        return Ok(None);
    }
    let ttl = if req.expires_in_s == 0 {
        default
    } else {
        Duration::from_secs(req.expires_in_s)
    };
    Ok(Some(now.saturating_add(ttl.as_millis() as u64)))
}

impl Accesses {
    async fn propose(&self, caller: &Caller, change: AccessChange) -> Result<(), Status> {
        self.0
            .coordinator
            .propose(Command::Access {
                change: Box::new(change),
                by: caller.label(),
                at: now_ms(),
            })
            .await?;
        Ok(())
    }

    fn user_name(caller: &Caller) -> Result<&str, Status> {
        match caller {
            Caller::User { name, .. } => Ok(name),
            other => Err(Status::permission_denied(format!(
                "{} is not a user",
                other.label()
            ))),
        }
    }

    fn grants(&self, user: Option<&str>) -> v1::ListGrantsResponse {
        let grants = self.0.coordinator.read(|s| {
            s.access
                .grants
                .iter()
                .filter(|g| user.is_none_or(|u| g.user == u))
                .map(grant_view)
                .collect()
        });
        v1::ListGrantsResponse { grants }
    }

    /// Grants or revokes (`change`) the request's grant, if the caller may change it; the
    /// user's grants after.
    async fn change_grant(
        &self,
        req: Request<v1::RoleRequest>,
        change: impl FnOnce(Grant) -> AccessChange,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        let caller = Caller::of(&req);
        let grant = grant_from_wire(req.into_inner().grant)?;
        self.may_change(&caller, &grant)?;
        let user = grant.user.clone();
        self.propose(&caller, change(grant)).await?;
        Ok(Response::new(self.grants(Some(&user))))
    }

    /// Checks the caller may change `grant`: a cluster admin anywhere, a workspace admin
    /// in that workspace.
    fn may_change(&self, caller: &Caller, grant: &Grant) -> Result<(), Status> {
        match &grant.workspace {
            None => caller.require_cluster_admin(&self.0),
            Some(w) => caller.require(&self.0, w, Role::Admin, &format!("workspace {w:?}")),
        }
    }
}

#[tonic::async_trait]
impl AccessService for Accesses {
    async fn who_am_i(
        &self,
        req: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let caller = Caller::of(&req);
        let (token_id, grants, expires) = match &caller {
            Caller::User { name, token_id } => {
                let expires = self
                    .0
                    .coordinator
                    .read(|s| s.access.tokens.get(token_id).and_then(|t| t.expires_at));
                (token_id.clone(), self.grants(Some(name)).grants, expires)
            }
            Caller::Agent { token_id, .. } => (token_id.clone(), Vec::new(), None),
            _ => (String::new(), Vec::new(), None),
        };
        Ok(Response::new(v1::WhoAmIResponse {
            principal: caller.label(),
            token_id,
            grants,
            token_expires_at_ms: expires,
        }))
    }

    async fn create_token(
        &self,
        req: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let now = now_ms();
        let id = new_token_id();
        let secret = new_secret();
        if req.join {
            let compute = req.compute.trim().to_string();
            if compute.is_empty() {
                return Err(Status::invalid_argument(
                    "compute: a join token is for one compute target: give --compute NAME",
                ));
            }
            let workspace = self
                .0
                .coordinator
                .read(|s| s.computes.get(&compute).map(|c| c.spec.workspace.clone()))
                .ok_or_else(|| {
                    Status::not_found(format!("compute target {compute:?} does not exist"))
                })?;
            let what = format!("compute target {compute:?}");
            caller.require(&self.0, &workspace, Role::Operator, &what)?;
            let expires_at =
                expiry(&self.0, &caller, &req, DEFAULT_JOIN_TTL, now)?.expect("join tokens expire");
            let join = JoinToken {
                id: id.clone(),
                hash: hash_secret(&secret),
                compute,
                created_at: now,
                expires_at,
                used: None,
                created_by: caller.label(),
            };
            let info = join_info(&join);
            self.propose(&caller, AccessChange::CreateJoinToken { join })
                .await?;
            return Ok(Response::new(v1::CreateTokenResponse {
                token: format_token(JOIN_PREFIX, &id, &secret),
                info: Some(info),
            }));
        }
        if !req.compute.is_empty() {
            return Err(Status::invalid_argument(
                "compute: only a join token (--join) is for a compute target",
            ));
        }
        let me = Self::user_name(&caller)?;
        let user = if req.user.trim().is_empty() {
            me.to_string()
        } else {
            req.user.trim().to_string()
        };
        if user != me {
            caller.require_cluster_admin(&self.0)?;
        }
        validate_name("user", &user).map_err(|e| Status::invalid_argument(format!("user: {e}")))?;
        let token = Token {
            id: id.clone(),
            principal: Principal::User { name: user },
            name: req.name.trim().chars().take(100).collect(),
            hash: hash_secret(&secret),
            created_at: now,
            expires_at: expiry(&self.0, &caller, &req, DEFAULT_TOKEN_TTL, now)?,
            revoked_at: None,
            created_by: caller.label(),
        };
        let info = token_info(&token);
        self.propose(&caller, AccessChange::CreateToken { token })
            .await?;
        Ok(Response::new(v1::CreateTokenResponse {
            token: format_token(TOKEN_PREFIX, &id, &secret),
            info: Some(info),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        let caller = Caller::of(&req);
        let me = Self::user_name(&caller)?.to_string();
        let all = req.into_inner().all;
        if all {
            caller.require_cluster_admin(&self.0)?;
        }
        let tokens = self.0.coordinator.read(|s| {
            let mut out: Vec<v1::TokenInfo> = s
                .access
                .tokens
                .values()
                .filter(|t| all || t.principal == Principal::User { name: me.clone() })
                .map(token_info)
                .collect();
            if all {
                out.extend(s.access.joins.values().map(join_info));
            }
            out
        });
        Ok(Response::new(v1::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        let caller = Caller::of(&req);
        let id = req.into_inner().id.trim().to_string();
        let me = Self::user_name(&caller)?.to_string();
        let owner = self
            .0
            .coordinator
            .read(|s| s.access.tokens.get(&id).map(|t| t.principal.clone()));
        let not_found = || {
            Status::not_found(format!(
                "token {id:?} does not exist: list yours with `muster token list`"
            ))
        };
        // A join token: its maker, or an operator of its compute target's workspace.
        let join = self.0.coordinator.read(|s| {
            s.access.joins.get(&id).map(|j| {
                let workspace = s.computes.get(&j.compute).map(|c| c.spec.workspace.clone());
                (j.created_by.clone(), workspace)
            })
        });
        if owner.is_none()
            && let Some((maker, workspace)) = join
        {
            if maker != caller.label() {
                let workspace = workspace.ok_or_else(not_found)?;
                caller
                    .require(&self.0, &workspace, Role::Operator, "")
                    .map_err(|_| not_found())?;
            }
            self.propose(&caller, AccessChange::RevokeJoinToken { id: id.clone() })
                .await?;
            return Ok(Response::new(v1::RevokeTokenResponse { info: None }));
        }
        match owner {
            Some(Principal::User { name }) if name == me => {}
            Some(_) => caller
                .require_cluster_admin(&self.0)
                .map_err(|_| not_found())?,
            None => return Err(not_found()),
        }
        self.propose(&caller, AccessChange::RevokeToken { id: id.clone() })
            .await?;
        let info = self
            .0
            .coordinator
            .read(|s| s.access.tokens.get(&id).map(token_info));
        Ok(Response::new(v1::RevokeTokenResponse { info }))
    }

    async fn create_workspace(
        &self,
        req: Request<v1::CreateWorkspaceRequest>,
    ) -> Result<Response<v1::Workspace>, Status> {
        let caller = Caller::of(&req);
        let name = req.into_inner().name.trim().to_string();
        self.propose(
            &caller,
            AccessChange::CreateWorkspace { name: name.clone() },
        )
        .await?;
        Ok(Response::new(v1::Workspace {
            name,
            created_at_ms: now_ms(),
            created_by: caller.label(),
            role: Role::Admin.as_str().into(),
            serverless_compute: None,
        }))
    }

    async fn set_serverless_compute(
        &self,
        req: Request<v1::SetServerlessComputeRequest>,
    ) -> Result<Response<v1::Workspace>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let workspace = match req.workspace.trim() {
            "" => muster_core::access::DEFAULT_WORKSPACE.to_string(),
            w => w.to_string(),
        };
        // Operators of the workspace choose where its serverless jobs run.
        caller.require(
            &self.0,
            &workspace,
            Role::Operator,
            &format!("workspace {workspace:?}"),
        )?;
        let compute = req.compute.map(|c| c.trim().to_string());
        self.propose(
            &caller,
            AccessChange::SetServerlessCompute {
                workspace: workspace.clone(),
                compute: compute.clone(),
            },
        )
        .await?;
        let (created_at_ms, created_by) = self.0.coordinator.read(|s| {
            s.access
                .workspaces
                .get(&workspace)
                .map(|w| (w.created_at, w.created_by.clone()))
                .unwrap_or((0, String::new()))
        });
        let role = match &caller {
            Caller::User { name, .. } => self
                .0
                .coordinator
                .read(|s| s.access.role_in(name, &workspace))
                .map(|r| r.as_str().to_string())
                .unwrap_or_default(),
            _ => String::new(),
        };
        Ok(Response::new(v1::Workspace {
            name: workspace,
            created_at_ms,
            created_by,
            role,
            serverless_compute: compute,
        }))
    }

    async fn list_workspaces(
        &self,
        req: Request<v1::ListWorkspacesRequest>,
    ) -> Result<Response<v1::ListWorkspacesResponse>, Status> {
        let caller = Caller::of(&req);
        let me = Self::user_name(&caller)?.to_string();
        let workspaces = self.0.coordinator.read(|s| {
            s.access
                .workspaces_of(&me)
                .into_iter()
                .map(|(name, role)| {
                    let (created_at_ms, created_by) = s
                        .access
                        .workspaces
                        .get(&name)
                        .map(|w| (w.created_at, w.created_by.clone()))
                        .unwrap_or((0, String::new()));
                    v1::Workspace {
                        serverless_compute: s.access.serverless.get(&name).cloned(),
                        name,
                        created_at_ms,
                        created_by,
                        role: role.as_str().into(),
                    }
                })
                .collect()
        });
        Ok(Response::new(v1::ListWorkspacesResponse { workspaces }))
    }

    async fn delete_workspace(
        &self,
        req: Request<v1::DeleteWorkspaceRequest>,
    ) -> Result<Response<v1::DeleteWorkspaceResponse>, Status> {
        let caller = Caller::of(&req);
        let name = req.into_inner().name.trim().to_string();
        self.propose(&caller, AccessChange::DeleteWorkspace { name })
            .await?;
        Ok(Response::new(v1::DeleteWorkspaceResponse {}))
    }

    async fn grant_role(
        &self,
        req: Request<v1::RoleRequest>,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        self.change_grant(req, |grant| AccessChange::GrantRole { grant })
            .await
    }

    async fn revoke_role(
        &self,
        req: Request<v1::RoleRequest>,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        self.change_grant(req, |grant| AccessChange::RevokeRole { grant })
            .await
    }

    async fn list_grants(
        &self,
        req: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        let caller = Caller::of(&req);
        let me = Self::user_name(&caller)?.to_string();
        let user = req.into_inner().user.trim().to_string();
        let admin = caller.require_cluster_admin(&self.0).is_ok();
        let wanted = if user.is_empty() {
            (!admin).then_some(me)
        } else if user == me || admin {
            Some(user)
        } else {
            return Err(Status::permission_denied(
                "only cluster admins list other users' roles",
            ));
        };
        Ok(Response::new(self.grants(wanted.as_deref())))
    }

    async fn list_audit(
        &self,
        req: Request<v1::ListAuditRequest>,
    ) -> Result<Response<v1::ListAuditResponse>, Status> {
        let limit = match req.into_inner().limit {
            0 => 100,
            n => n as usize,
        };
        let (events, dropped) = self.0.coordinator.read(|s| {
            let skip = s.access.audit.len().saturating_sub(limit);
            let events = s.access.audit[skip..]
                .iter()
                .map(|e| v1::AuditEvent {
                    at_ms: e.at,
                    actor: e.actor.clone(),
                    action: e.action.clone(),
                    detail: e.detail.clone(),
                })
                .collect();
            (events, s.access.audit_dropped)
        });
        Ok(Response::new(v1::ListAuditResponse { events, dropped }))
    }
}

/// The workspace a request names: the default one when empty.
pub(crate) fn workspace_or_default(w: &str) -> String {
    match w.trim() {
        "" => DEFAULT_WORKSPACE.to_string(),
        w => w.to_string(),
    }
}
