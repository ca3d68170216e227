//! # auth: who is calling, and may they (DESIGN.md section 14)
//!
//! Every gRPC request passes [`authorize`] before any handler runs:
//!
//! 1. **Who.** [`identify`] reads the caller from the request: over TLS, a server's or an
//!    agent's verified certificate names it (`tls.rs`); without TLS a server presents the
//!    cluster key and its id ([`muster_client::CLUSTER_KEY_HEADER`]); a user or an agent
//!    presents its token in `authorization: Bearer mst_…`, checked against the hashes in
//!    the replicated state ([`muster_core::access::Access::authenticate`]). No
//!    credentials is [`Caller::Anonymous`]; a bad one is refused outright
//!    (UNAUTHENTICATED, saying why: malformed, unknown, revoked, expired).
//! 2. **May they.** [`rule`] is the one table: method → which callers, and the lowest
//!    role a user needs (anywhere, or cluster-wide). A method without a rule is refused —
//!    `tests/auth_matrix.rs` enumerates every method of every service from the descriptor
//!    set, so a new RPC without a rule fails CI.
//! 3. **Which objects.** The rule only says a user may call the method at all; the handler
//!    checks the object's workspace with [`Caller::require`] / [`Caller::can_read`], and an
//!    object of a workspace the caller has no role in is NOT_FOUND, as if it did not exist.
//!
//! Denials are batched and recorded in the replicated audit log
//! ([`AccessChange::RecordDenials`]), at most one proposal per second per server, so a
//! flood of bad requests costs the log little.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use muster_client::{CLUSTER_KEY_HEADER, SERVER_ID_HEADER};
use muster_core::Command;
use muster_core::access::{
    AccessChange, AccessError, Denial, MAX_DENIALS_PER_BATCH, Principal, Role,
};
use tonic::Status;

use crate::coordinator::now_ms;
use crate::listener::ConnectionInfo;
use crate::server::Server;
use crate::tls::PeerIdentity;
pub(crate) use crate::views::access::Readable;
use crate::views::access::readable_by;

/// Who is calling, as the handlers see it (in the request's extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// No credentials.
    Anonymous,
    /// A user, by API token.
    User {
        /// The user's name.
        name: String,
        /// The token's public id.
        token_id: String,
    },
    /// A node's agent, by its credential.
    Agent {
        /// The node's name.
        node: String,
        /// The compute target it joined.
        compute: String,
        /// The credential's public id.
        token_id: String,
    },
    /// Another server of this cluster.
    Server {
        /// Its id.
        id: u64,
    },
}

impl Caller {
    /// `user:NAME`, `agent:NODE`, `server:N` or `anonymous`, for audit events and logs.
    pub fn label(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous".into(),
            Caller::User { name, .. } => format!("user:{name}"),
            Caller::Agent { node, .. } => format!("agent:{node}"),
            Caller::Server { id } => format!("server:{id}"),
        }
    }

    /// The caller of a request that passed [`authorize`].
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anonymous)
    }

    /// The caller's role in `workspace` (servers act for a caller a peer already
    /// authorized, so they count as admins; agents have no user role).
    pub fn role_in(&self, server: &Server, workspace: &str) -> Option<Role> {
        match self {
            Caller::Server { .. } => Some(Role::Admin),
            Caller::User { name, .. } => server
                .coordinator
                .read(|s| s.access.role_in(name, workspace)),
            Caller::Agent { .. } | Caller::Anonymous => None,
        }
    }

    /// The workspaces whose objects a list shows: `requested` (the request's
    /// `workspace`, which the caller must be able to read) or every one the caller can.
    pub fn readable(&self, server: &Server, requested: Option<&str>) -> Result<Readable, Status> {
        if let Some(w) = requested.map(str::trim).filter(|w| !w.is_empty()) {
            self.require(server, w, Role::Reader, &format!("workspace {w:?}"))?;
            return Ok(Readable::Only(BTreeSet::from([w.to_string()])));
        }
        Ok(match self {
            Caller::Server { .. } => Readable::All,
            Caller::User { name, .. } => readable_by(server, name),
            Caller::Agent { .. } | Caller::Anonymous => Readable::Only(BTreeSet::new()),
        })
    }

    /// Checks the caller has at least `role` in `workspace`. Without any role there, the
    /// object is `what` NOT_FOUND (it does not exist for them); with a lower role,
    /// PERMISSION_DENIED names the role needed.
    pub fn require(
        &self,
        server: &Server,
        workspace: &str,
        role: Role,
        what: &str,
    ) -> Result<(), Status> {
        match self.role_in(server, workspace) {
            Some(have) if have >= role => Ok(()),
            Some(have) => Err(Status::permission_denied(format!(
                "{} has the {have} role in workspace {workspace}; this needs {role}: ask an admin (`muster role grant`)",
                self.label()
            ))),
            None => Err(Status::not_found(format!("{what} does not exist"))),
        }
    }

    /// Checks the caller is a cluster-wide admin (or a server).
    pub fn require_cluster_admin(&self, server: &Server) -> Result<(), Status> {
        let ok = match self {
            Caller::Server { .. } => true,
            Caller::User { name, .. } => server
                .coordinator
                .read(|s| s.access.cluster_role(name))
                .is_some_and(|r| r == Role::Admin),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{} is not a cluster admin: this needs the admin role cluster-wide (`muster role grant USER admin`)",
                self.label()
            )))
        }
    }
}

/// Checks the caller has `role` in the workspace of run `id`; a run the caller cannot see
/// is NOT_FOUND, like one that does not exist. A run this server has not applied yet
/// passes: the handler answers NOT_FOUND itself, or relays to the leader, which checks
/// again (log relays carry the caller's own token; see `peers::relayed_request`).
pub(crate) fn allow_run(
    server: &Server,
    caller: &Caller,
    id: &str,
    role: Role,
) -> Result<(), Status> {
    let Some(workspace) = server
        .coordinator
        .read(|s| s.runs.get(id).map(|r| r.spec.workspace.clone()))
    else {
        return Ok(());
    };
    caller
        .require(server, &workspace, role, &format!("run {id:?}"))
        .map_err(|e| match e.code() {
            tonic::Code::NotFound => Status::not_found(format!(
                "run {id:?} does not exist: list runs with `muster run list`"
            )),
            _ => e,
        })
}

/// Checks the caller has `role` in `workspace` (an object's, `None` when this server does
/// not know the object: the handler answers for that); without any role there the answer
/// is `not_found()`, as for an object that does not exist.
pub(crate) fn allow_in(
    server: &Server,
    caller: &Caller,
    workspace: Option<String>,
    role: Role,
    not_found: impl Fn() -> Status,
) -> Result<(), Status> {
    let Some(workspace) = workspace else {
        return Ok(());
    };
    caller
        .require(server, &workspace, role, "")
        .map_err(|e| match e.code() {
            tonic::Code::NotFound => not_found(),
            _ => e,
        })
}

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rule {
    /// Anyone, without credentials (health checks, reflection, an agent's join).
    pub public: bool,
    /// Another server of the cluster.
    pub server: bool,
    /// A node's agent.
    pub agent: bool,
    /// A user with at least this role, somewhere (the handler narrows it to the object's
    /// workspace); `Some(Role::Reader)` with `any_user` lets in users without any grant.
    pub user: Option<Role>,
    /// The user's role must be cluster-wide.
    pub cluster: bool,
    /// Any authenticated user, with or without grants (whoami, their own tokens).
    pub any_user: bool,
}

const NOBODY: Rule = Rule {
    public: false,
    server: false,
    agent: false,
    user: None,
    cluster: false,
    any_user: false,
};

const fn users(role: Role) -> Rule {
    Rule {
        user: Some(role),
        ..NOBODY
    }
}

const fn users_and_servers(role: Role) -> Rule {
    Rule {
        user: Some(role),
        server: true,
        ..NOBODY
    }
}

const fn cluster(role: Role) -> Rule {
    Rule {
        user: Some(role),
        cluster: true,
        ..NOBODY
    }
}

/// The authorization table: every method of every service, by its gRPC path. `None`: no
/// rule, so nobody may call it.
pub(crate) fn rule(path: &str) -> Option<Rule> {
    use Role::*;
    let public = Rule {
        public: true,
        ..NOBODY
    };
    let any_user = Rule {
        any_user: true,
        ..NOBODY
    };
    let servers = Rule {
        server: true,
        ..NOBODY
    };
    let agents = Rule {
        agent: true,
        ..NOBODY
    };
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let rule = match (service, method) {
        ("grpc.health.v1.Health", "Check" | "Watch") => public,
        (
            "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        ) => public,

        ("muster.v1.RunService", "SubmitRun" | "CancelRun") => users(User),
        ("muster.v1.RunService", "GetRun" | "ListRuns" | "WaitRun") => users(Reader),
        // A follower relays log streams it cannot serve to the leader.
        ("muster.v1.RunService", "StreamLogs") => users_and_servers(Reader),

        (
            "muster.v1.ComputeService",
            "CreateCompute" | "UpdateCompute" | "SetComputeStopped" | "DeleteCompute"
            | "SetNodeState",
        ) => users(Operator),
        (
            "muster.v1.ComputeService",
            "ListComputes" | "GetCompute" | "ListNodes" | "GetComputeStatus",
        ) => users(Reader),

        ("muster.v1.SweepService", "SubmitSweep" | "CancelSweep") => users(User),
        ("muster.v1.SweepService", "GetSweep" | "ListSweeps") => users(Reader),
        ("muster.v1.PipelineService", "SubmitPipeline" | "CancelPipeline") => users(User),
        ("muster.v1.PipelineService", "GetPipeline" | "ListPipelines") => users(Reader),
        // Users of a workspace make its data assets, its readers see them; the handlers
        // check the workspace.
        ("muster.v1.DataService", "CreateData") => users(User),
        ("muster.v1.DataService", "GetData" | "ListData" | "ListDatastores") => users(Reader),
        ("muster.v1.ComponentService", "CreateComponent") => users(User),
        ("muster.v1.ComponentService", "GetComponent" | "ListComponents") => users(Reader),
        // A datastore mounts a host folder into runs: operators only.
        ("muster.v1.DataService", "CreateDatastore") => users(Operator),

        // Followers relay metric reads to the leader, which holds live series.
        ("muster.v1.MetricsService", "GetRunMetrics" | "StreamRunMetrics") => {
            users_and_servers(Reader)
        }

        // Users upload snapshots and download outputs; agents fetch snapshots and inputs
        // and upload outputs; servers copy blobs to their peers.
        ("muster.v1.BlobService", "MissingBlobs" | "PutBlob") => Rule {
            user: Some(User),
            agent: true,
            server: true,
            ..NOBODY
        },
        ("muster.v1.BlobService", "GetBlob") => Rule {
            user: Some(Reader),
            agent: true,
            server: true,
            ..NOBODY
        },

        // The join token is the credential of Join; the handler checks it.
        ("muster.v1.AgentService", "Join") => public,
        ("muster.v1.AgentService", "Register" | "Heartbeat" | "Session") => agents,

        ("muster.v1.ClusterService", "Status") => users_and_servers(Reader),
        (
            "muster.v1.ClusterService",
            "AddServer" | "RemoveServer" | "TransferLeader" | "Backup",
        ) => cluster(Admin),
        ("muster.v1.ClusterService", "Raft" | "Forward" | "ReadIndex") => servers,

        (
            "muster.v1.AccessService",
            "WhoAmI" | "CreateToken" | "ListTokens" | "RevokeToken" | "ListWorkspaces"
            | "ListGrants",
        ) => any_user,
        // Workspace admins grant roles in their workspace; the handler checks the scope.
        ("muster.v1.AccessService", "GrantRole" | "RevokeRole") => users(Admin),
        // Workspace operators choose its serverless compute; the handler checks the scope.
        ("muster.v1.AccessService", "SetServerlessCompute") => users(Operator),
        ("muster.v1.AccessService", "CreateWorkspace" | "DeleteWorkspace" | "ListAudit") => {
            cluster(Admin)
        }
        _ => return None,
    };
    Some(rule)
}

/// Reads who is calling. A credential that is present but wrong is an error (never
/// anonymous): the caller meant to be someone and should hear why they are not.
pub(crate) fn identify(
    server: &Server,
    peer: Option<&PeerIdentity>,
    headers: &axum::http::HeaderMap,
) -> Result<Caller, Status> {
    // A verified client certificate names a server or an agent. A server relaying a
    // caller's request carries the caller's token too: then the caller's rights count.
    let bearer = headers.contains_key(axum::http::header::AUTHORIZATION);
    match peer {
        Some(PeerIdentity::Server(id)) if !bearer => return Ok(Caller::Server { id: *id }),
        Some(PeerIdentity::Agent { compute, node }) if !bearer => {
            return Ok(Caller::Agent {
                node: node.clone(),
                compute: compute.clone(),
                token_id: String::new(),
            });
        }
        _ => {}
    }
    if let Some(key) = headers.get(CLUSTER_KEY_HEADER) {
        let Some(expected) = server.config.cluster_key.as_deref() else {
            return Err(Status::unauthenticated(
                "this server has no cluster key (--cluster-key-file): it accepts no server peers",
            ));
        };
        if !same_bytes(key.as_bytes(), expected.trim().as_bytes()) {
            return Err(Status::unauthenticated(
                "the cluster key does not match this cluster's: give every server the same --cluster-key-file",
            ));
        }
        let id = headers
            .get(SERVER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|id| *id > 0)
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "{SERVER_ID_HEADER}: a server id (1 or more) is required"
                ))
            })?;
        // A server relaying a caller's request carries the caller's token too: the
        // caller's rights are what count.
        if !headers.contains_key(axum::http::header::AUTHORIZATION) {
            return Ok(Caller::Server { id });
        }
    }
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(Caller::Anonymous);
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated(
                "authorization: expected `Bearer mst_…` (log in with `muster login`)",
            )
        })?;
    let now = now_ms();
    server.coordinator.read(|s| {
        let token = s
            .access
            .authenticate(presented, now)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        Ok(match &token.principal {
            Principal::User { name } => Caller::User {
                name: name.clone(),
                token_id: token.id.clone(),
            },
            Principal::Agent { node, compute } => Caller::Agent {
                node: node.clone(),
                compute: compute.clone(),
                token_id: token.id.clone(),
            },
        })
    })
}

fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks `caller` against `rule`; the error is the status to answer with.
pub(crate) fn check(server: &Server, rule: &Rule, caller: &Caller) -> Result<(), Status> {
    if rule.public {
        return Ok(());
    }
    let allowed = match caller {
        Caller::Anonymous => false,
        Caller::Server { .. } => rule.server,
        Caller::Agent { .. } => rule.agent,
        Caller::User { name, .. } => {
            if rule.any_user {
                true
            } else if let Some(need) = rule.user {
                let have = server.coordinator.read(|s| {
                    if rule.cluster {
                        s.access.cluster_role(name)
                    } else {
                        s.access.best_role(name)
                    }
                });
                match have {
                    Some(have) if have >= need => true,
                    Some(have) => {
                        return Err(Status::permission_denied(format!(
                            "user {name} has the {have} role; this needs {need}{}: ask an admin (`muster role grant`)",
                            if rule.cluster { " cluster-wide" } else { "" }
                        )));
                    }
                    None => {
                        return Err(Status::permission_denied(format!(
                            "user {name} has no role in any workspace: ask an admin to grant one (`muster role grant {name} user --workspace W`)"
                        )));
                    }
                }
            } else {
                false
            }
        }
    };
    if allowed {
        return Ok(());
    }
    Err(match caller {
        Caller::Anonymous => Status::unauthenticated(
            "no credentials: log in with `muster login` (muster dev writes your token for you), or pass MUSTER_TOKEN",
        ),
        other => Status::permission_denied(format!("{} may not call this method", other.label())),
    })
}

/// Denials waiting to be recorded in the audit log.
#[derive(Debug, Default)]
pub(crate) struct Denials {
    pending: Mutex<(Vec<Denial>, u64)>,
    /// Wakes the recorder when the first denial of a batch arrives.
    arrived: tokio::sync::Notify,
}

impl Denials {
    /// Remembers a denial (the first [`MAX_DENIALS_PER_BATCH`] of an interval in full).
    pub fn record(&self, caller: String, method: &str, reason: &str) {
        let mut pending = self.pending.lock().expect("denials lock");
        if pending.0.len() < MAX_DENIALS_PER_BATCH {
            pending.0.push(Denial {
                caller,
                method: method.chars().take(200).collect(),
                reason: reason.chars().take(300).collect(),
                at: now_ms(),
            });
        } else {
            pending.1 += 1;
        }
        self.arrived.notify_one();
    }

    fn take(&self) -> Option<(Vec<Denial>, u64)> {
        let mut pending = self.pending.lock().expect("denials lock");
        if pending.0.is_empty() && pending.1 == 0 {
            return None;
        }
        Some(std::mem::take(&mut *pending))
    }
}

/// Proposes the denials of each second, until the server stops. A batch that cannot be
/// proposed (no leader yet) is kept for the next try, merged with what came since.
pub(crate) async fn record_denials(server: Arc<Server>) {
    loop {
        // Asleep until a denial comes (an idle server does not wake), then a second to
        // gather the rest of the batch.
        server.denials.arrived.notified().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some((denials, more)) = server.denials.take() else {
            continue;
        };
        let command = Command::Access {
            change: Box::new(AccessChange::RecordDenials {
                denials: denials.clone(),
                more,
            }),
            by: format!("server:{}", server.config.raft.id),
            at: now_ms(),
        };
        if server.coordinator.propose(command).await.is_err() {
            let mut pending = server.denials.pending.lock().expect("denials lock");
            let room = MAX_DENIALS_PER_BATCH.saturating_sub(pending.0.len());
            let (keep, over) = denials.split_at(room.min(denials.len()));
            pending.0.extend_from_slice(keep);
            pending.1 += more + over.len() as u64;
            drop(pending);
            server.denials.arrived.notify_one();
        }
    }
}

/// The middleware in front of every gRPC service: identify, check the rule, record a
/// denial or hand the caller to the handler.
pub(crate) async fn authorize(
    State(server): State<Arc<Server>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    let peer = req
        .extensions()
        .get::<ConnectionInfo>()
        .and_then(|c| c.peer.clone());
    let caller = match identify(&server, peer.as_ref(), req.headers()) {
        Ok(caller) => caller,
        Err(status) => {
            server
                .denials
                .record("unauthenticated".into(), &path, status.message());
            return status_response(status);
        }
    };
    let Some(rule) = rule(&path) else {
        let status = Status::permission_denied(format!(
            "{path} has no authorization rule, so nobody may call it"
        ));
        server
            .denials
            .record(caller.label(), &path, status.message());
        return status_response(status);
    };
    if let Err(status) = check(&server, &rule, &caller) {
        server
            .denials
            .record(caller.label(), &path, status.message());
        return status_response(status);
    }
    req.extensions_mut().insert(caller);
    if !bounded(&path) {
        return next.run(req).await;
    }
    match tokio::time::timeout(UNARY_TIMEOUT, next.run(req)).await {
        Ok(response) => response,
        Err(_) => status_response(Status::deadline_exceeded(format!(
            "{path} took longer than {} s, the most a call may: retry; if it keeps happening the server is overloaded",
            UNARY_TIMEOUT.as_secs()
        ))),
    }
}

/// The longest a unary call may run on the server (streams are bounded by keep-alives and
/// their own ends; `WaitRun` by its `timeout_ms`; adding a server waits for it to catch
/// up).
pub(crate) const UNARY_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `path` is a unary call bounded by [`UNARY_TIMEOUT`]: every method neither side
/// of which streams, per the descriptor set, but those that wait on purpose.
fn bounded(path: &str) -> bool {
    static UNARY: std::sync::OnceLock<BTreeSet<String>> = std::sync::OnceLock::new();
    let unary = UNARY.get_or_init(|| {
        use prost::Message;
        let mut out = BTreeSet::new();
        let Ok(fds) = prost_types::FileDescriptorSet::decode(muster_proto::FILE_DESCRIPTOR_SET)
        else {
            return out;
        };
        for file in fds.file {
            for service in &file.service {
                for m in &service.method {
                    if !m.client_streaming() && !m.server_streaming() {
                        out.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            m.name()
                        ));
                    }
                }
            }
        }
        out
    });
    unary.contains(path)
        && !matches!(
            path,
            "/muster.v1.RunService/WaitRun" | "/muster.v1.ClusterService/AddServer"
        )
}

/// The metadata key every refusal of this layer carries (`muster-denied: authorization`),
/// so a client — and the authorization matrix test — tells a refused call from a handler's
/// answer.
pub(crate) const DENIED_HEADER: &str = "muster-denied";

fn status_response(mut status: Status) -> Response {
    status
        .metadata_mut()
        .insert(DENIED_HEADER, "authorization".parse().expect("ascii"));
    status.into_http::<axum::body::Body>().into_response()
}

/// The status an access rule's rejection answers with.
pub(crate) fn access_status(e: AccessError) -> Status {
    let msg = e.to_string();
    match e {
        AccessError::UnknownToken(_) | AccessError::UnknownWorkspace(_) => Status::not_found(msg),
        AccessError::TokenExists(_) | AccessError::WorkspaceExists(_) => {
            Status::already_exists(msg)
        }
        AccessError::UnknownRole(_)
        | AccessError::InvalidName { .. }
        | AccessError::ExpiresInPast => Status::invalid_argument(msg),
        AccessError::WorkspaceInUse { .. }
        | AccessError::NoSuchGrant { .. }
        | AccessError::LastAdmin(_)
        | AccessError::NotInWorkspace { .. } => Status::failed_precondition(msg),
        AccessError::BadJoin(_) => Status::permission_denied(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unary_calls_are_bounded_and_streams_and_waits_are_not() {
        for unary in [
            "/muster.v1.RunService/GetRun",
            "/muster.v1.RunService/SubmitRun",
            "/muster.v1.AccessService/CreateToken",
            "/muster.v1.ClusterService/Forward",
        ] {
            assert!(bounded(unary), "{unary}");
        }
        for open in [
            "/muster.v1.RunService/StreamLogs",
            "/muster.v1.RunService/WaitRun",
            "/muster.v1.BlobService/PutBlob",
            "/muster.v1.AgentService/Session",
            "/muster.v1.ClusterService/AddServer",
            "/grpc.health.v1.Health/Watch",
        ] {
            assert!(!bounded(open), "{open}");
        }
    }

    #[test]
    fn every_method_of_the_api_has_a_rule() {
        use prost::Message;
        let fds =
            prost_types::FileDescriptorSet::decode(muster_proto::FILE_DESCRIPTOR_SET).unwrap();
        for file in fds.file {
            for service in &file.service {
                for m in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), m.name());
                    assert!(rule(&path).is_some(), "{path} has no rule in the table");
                }
            }
        }
    }
}
