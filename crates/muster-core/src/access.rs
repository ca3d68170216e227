//! # access: who may do what (DESIGN.md section 14)
//!
//! The replicated part of authentication and authorization, pure like the rest of core:
//!
//! - **Tokens.** A user's API token (`mst_<id>_<secret>`), an agent's credential (the same
//!   shape, bound to one node) and a single-use **join token** (`msj_<id>_<secret>`) an
//!   agent trades for its credential. The proposer draws the secret; the state keeps only
//!   its SHA-256 ([`hash_secret`]) beside the public id, so a snapshot or a stolen data
//!   directory gives away no credential. Secrets are 32 random base-62 characters (190
//!   bits), so a plain hash is enough — no password-stretching is needed for keys nobody
//!   chose.
//! - **Workspaces and roles.** A workspace holds a tenant's compute targets, runs,
//!   experiments, sweeps and pipelines. A [`Grant`] gives a user a [`Role`] in one
//!   workspace, or cluster-wide (`workspace: None`). Roles are ordered: a higher one may
//!   do everything a lower one may. Default deny: a user without a grant sees nothing.
//! - **Audit.** Every change here (token created or revoked, agent joined, workspace
//!   created or deleted, role granted or revoked) and every batch of denials the servers
//!   recorded is an [`AuditEvent`] in the replicated state, in order.
//!
//! What each RPC needs is the server's rule table (`muster-server/src/grpc/auth.rs`); this
//! module answers the questions it asks ([`Access::authenticate`], [`Access::role_in`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::Millis;
use crate::names::validate_node_name;

/// The workspace objects belong to when nothing else is said.
pub const DEFAULT_WORKSPACE: &str = "default";

/// The default workspace, for `#[serde(default)]` on objects that belong to one.
pub fn default_workspace() -> String {
    DEFAULT_WORKSPACE.to_string()
}

/// Whether a workspace is the default one (left out of what is serialized, so logs and
/// snapshots of objects in it read as before workspaces existed).
pub fn is_default_workspace(w: &str) -> bool {
    w == DEFAULT_WORKSPACE
}

/// The prefix of API tokens and agent credentials.
pub const TOKEN_PREFIX: &str = "mst_";

/// The prefix of join tokens.
pub const JOIN_PREFIX: &str = "msj_";

/// How many audit events the state keeps; older ones are dropped and counted in
/// [`Access::audit_dropped`] (part 2's audit log ships them out before that).
pub const MAX_AUDIT_EVENTS: usize = 50_000;

/// How long a token is kept after it expired or was revoked (shown by `muster token list`,
/// refused with a precise reason); after that the next new token drops it, so tokens made
/// for every studio session do not pile up. Its events stay in the audit log.
pub const ENDED_TOKEN_KEPT: Millis = 7 * 24 * 3600 * 1000;

/// The most denials one [`AccessChange::RecordDenials`] carries; the rest are counted.
pub const MAX_DENIALS_PER_BATCH: usize = 100;

/// What a caller may do, lowest first: each role may do everything the ones below may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees runs, logs, metrics, compute targets.
    Reader,
    /// Also submits and cancels runs, sweeps and pipelines.
    User,
    /// Also manages compute targets and nodes (create, delete, drain).
    Operator,
    /// Everything: tokens, roles, workspaces, cluster membership.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 4] = [Role::Reader, Role::User, Role::Operator, Role::Admin];

    /// The role's name (`reader`, `user`, `operator`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::User => "user",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// A role by name.
    pub fn parse(name: &str) -> Result<Role, AccessError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == name.trim())
            .ok_or_else(|| AccessError::UnknownRole(name.to_string()))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whom a token speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Principal {
    /// A person (or a script acting for one): roles come from grants.
    User {
        /// The user's name.
        name: String,
    },
    /// The agent of one node: may call the agent API, as that node only.
    Agent {
        /// The node's name.
        node: String,
        /// The compute target it joined.
        compute: String,
    },
}

impl Principal {
    /// `user:NAME` or `agent:NODE`, as audit events and errors name it.
    pub fn label(&self) -> String {
        match self {
            Principal::User { name } => format!("user:{name}"),
            Principal::Agent { node, .. } => format!("agent:{node}"),
        }
    }
}

/// A stored API token or agent credential (the secret itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// The public id: the `<id>` of `mst_<id>_<secret>`, the key it is looked up by.
    pub id: String,
    /// Whom it speaks for.
    pub principal: Principal,
    /// What it is for (`--name`), shown in `muster token list`.
    pub name: String,
    /// SHA-256 of the secret, lowercase hex.
    pub hash: String,
    /// When it was made.
    pub created_at: Millis,
    /// When it stops working, if ever.
    pub expires_at: Option<Millis>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Millis>,
    /// Who made it (a principal label, or `server:N`).
    pub created_by: String,
}

impl Token {
    /// Usable at `now`: neither revoked nor expired.
    pub fn is_live(&self, now: Millis) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }

    /// When it stopped working (revoked or expired), if it has by `now`.
    pub fn ended_at(&self, now: Millis) -> Option<Millis> {
        let expired = self.expires_at.filter(|e| *e <= now);
        match (self.revoked_at, expired) {
            (Some(r), Some(e)) => Some(r.min(e)),
            (r, e) => r.or(e),
        }
    }
}

/// A single-use token an agent trades for its credential (`muster agent --join`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The public id.
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: String,
    /// The compute target the node joins.
    pub compute: String,
    /// When it was made.
    pub created_at: Millis,
    /// When it stops working (join tokens always expire).
    pub expires_at: Millis,
    /// The node that used it, and when (it works once).
    pub used: Option<(String, Millis)>,
    /// Who made it.
    pub created_by: String,
}

/// A workspace: a tenant's compute targets, runs, experiments, sweeps and pipelines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workspace {
    /// Its name.
    pub name: String,
    /// When it was made.
    pub created_at: Millis,
    /// Who made it.
    pub created_by: String,
}

/// A role given to a user, in one workspace or (`workspace: None`) in all of them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// The user's name.
    pub user: String,
    /// The workspace, or `None` for cluster-wide.
    pub workspace: Option<String>,
    /// The role.
    pub role: Role,
}

/// A request a server refused, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// Who asked (a principal label, `anonymous`, or `token:<id>` for a dead token).
    pub caller: String,
    /// The RPC (`/muster.v1.RunService/SubmitRun`).
    pub method: String,
    /// Why it was refused.
    pub reason: String,
    /// When (the refusing server's clock).
    pub at: Millis,
}

/// One entry of the replicated audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When.
    pub at: Millis,
    /// Who did it (a principal label or `server:N`).
    pub actor: String,
    /// What happened (`token.create`, `role.grant`, `denied`, …).
    pub action: String,
    /// The details, in words, without any secret.
    pub detail: String,
}

/// A change to who may do what (inside [`crate::state::Command::Access`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum AccessChange {
    /// Store a new API token or agent credential.
    CreateToken {
        /// The token.
        token: Token,
    },
    /// Revoke a token (it stops working at once, everywhere).
    RevokeToken {
        /// Its public id.
        id: String,
    },
    /// Revoke a join token not yet used: no agent can join with it any more.
    RevokeJoinToken {
        /// Its public id.
        id: String,
    },
    /// Store a new join token.
    CreateJoinToken {
        /// The join token.
        join: JoinToken,
    },
    /// Spend a join token: the node's credential is stored in the same step, so a join
    /// token is used once or not at all.
    Join {
        /// The join token's public id.
        join_id: String,
        /// The joining node's name.
        node: String,
        /// The agent's new credential (principal `Agent { node, compute }`).
        credential: Token,
    },
    /// Make a workspace.
    CreateWorkspace {
        /// Its name.
        name: String,
    },
    /// Name the compute target a workspace's `compute: serverless` jobs run on (`None`:
    /// none; such jobs are refused with what to do).
    SetServerlessCompute {
        /// The workspace.
        workspace: String,
        /// A compute target of that workspace.
        compute: Option<String>,
    },
    /// Remove an empty workspace (the state checks it holds no compute target and no
    /// unfinished run) and every grant in it.
    DeleteWorkspace {
        /// Its name.
        name: String,
    },
    /// Give a user a role.
    GrantRole {
        /// The grant.
        grant: Grant,
    },
    /// Take a role back.
    RevokeRole {
        /// The grant to remove.
        grant: Grant,
    },
    /// The first admin of a new cluster: its token and a cluster-wide admin grant, once.
    /// Applying it again (a restart of the founding server) changes nothing, and a
    /// bootstrap token that was revoked stays revoked.
    Bootstrap {
        /// The admin's token.
        token: Token,
    },
    /// Requests the servers refused, batched.
    RecordDenials {
        /// Up to [`MAX_DENIALS_PER_BATCH`] of them.
        denials: Vec<Denial>,
        /// How many more there were in the batch's interval.
        more: u64,
    },
}

impl AccessChange {
    /// The audit action name.
    pub fn action(&self) -> &'static str {
        match self {
            AccessChange::CreateToken { .. } => "token.create",
            AccessChange::RevokeToken { .. } => "token.revoke",
            AccessChange::RevokeJoinToken { .. } => "join_token.revoke",
            AccessChange::CreateJoinToken { .. } => "join_token.create",
            AccessChange::Join { .. } => "agent.join",
            AccessChange::CreateWorkspace { .. } => "workspace.create",
            AccessChange::DeleteWorkspace { .. } => "workspace.delete",
            AccessChange::SetServerlessCompute { .. } => "workspace.serverless",
            AccessChange::GrantRole { .. } => "role.grant",
            AccessChange::RevokeRole { .. } => "role.revoke",
            AccessChange::Bootstrap { .. } => "bootstrap",
            AccessChange::RecordDenials { .. } => "denied",
        }
    }
}

/// Why an access change or a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum AccessError {
    /// Not `reader`, `user`, `operator` or `admin`.
    #[error("unknown role {0:?}: use reader, user, operator or admin")]
    UnknownRole(String),
    /// A user or workspace name breaks the naming rule.
    #[error(
        "invalid {what} name {name:?}: use 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    InvalidName {
        /// `user` or `workspace`.
        what: String,
        /// The name.
        name: String,
    },
    /// The token id is taken (the proposer draws another).
    #[error("token id {0:?} is taken")]
    TokenExists(String),
    /// No such token.
    #[error("token {0:?} does not exist: list tokens with `muster token list`")]
    UnknownToken(String),
    /// An expiry not after the creation time.
    #[error("the token would expire before it is made: give a positive --expires")]
    ExpiresInPast,
    /// No such workspace.
    #[error(
        "workspace {0:?} does not exist: create it with `muster workspace create`, or list them with `muster workspace list`"
    )]
    UnknownWorkspace(String),
    /// The workspace exists.
    #[error("workspace {0:?} already exists")]
    WorkspaceExists(String),
    /// The workspace still holds something.
    #[error("workspace {name:?} is not empty: {detail}")]
    WorkspaceInUse {
        /// Its name.
        name: String,
        /// What it holds, and what to do.
        detail: String,
    },
    /// The user has no such grant.
    #[error("{user} has no {role} role in {scope}: see `muster role list`")]
    NoSuchGrant {
        /// The user.
        user: String,
        /// The role.
        role: Role,
        /// `workspace W` or `the cluster`.
        scope: String,
    },
    /// The last cluster-wide admin cannot be removed (nobody could grant anything again).
    #[error(
        "{0} is the last cluster-wide admin: grant admin to another user first (`muster role grant USER admin`)"
    )]
    LastAdmin(String),
    /// The join token does not exist, was used, or expired.
    #[error("{0}")]
    BadJoin(String),
    /// A workspace's serverless compute must be one of its own compute targets.
    #[error(
        "compute target {compute:?} is not in workspace {workspace:?}: name one of its compute targets (`muster compute list --workspace {workspace}`)"
    )]
    NotInWorkspace {
        /// The compute target.
        compute: String,
        /// The workspace.
        workspace: String,
    },
}

/// Why a presented credential does not identify anyone.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    /// Not `mst_<id>_<secret>`.
    #[error(
        "the token is malformed: API tokens look like mst_<id>_<secret>; create one with `muster token create`"
    )]
    Malformed,
    /// No token has this id, or the secret does not match.
    #[error("the token is not valid: log in again with `muster login` and a current token")]
    Unknown,
    /// It was revoked.
    #[error("the token was revoked: ask an admin for a new one (`muster token create`)")]
    Revoked,
    /// It expired.
    #[error("the token expired: ask an admin for a new one (`muster token create`)")]
    Expired,
}

/// The replicated access state: tokens, workspaces, grants and the audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// API tokens and agent credentials by public id.
    #[serde(default)]
    pub tokens: BTreeMap<String, Token>,
    /// Join tokens by public id.
    #[serde(default)]
    pub joins: BTreeMap<String, JoinToken>,
    /// Workspaces by name (the default workspace exists without an entry).
    #[serde(default)]
    pub workspaces: BTreeMap<String, Workspace>,
    /// Every grant.
    #[serde(default)]
    pub grants: BTreeSet<Grant>,
    /// Each workspace's serverless compute target: where its `compute: serverless` jobs
    /// run (Azure ML's serverless compute, on machines the farm owns).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub serverless: BTreeMap<String, String>,
    /// The audit log, oldest first (at most [`MAX_AUDIT_EVENTS`]).
    #[serde(default)]
    pub audit: Vec<AuditEvent>,
    /// Audit events dropped from the front of `audit`.
    #[serde(default)]
    pub audit_dropped: u64,
}

/// The SHA-256 of a token secret, lowercase hex: what the state stores.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token a user is shown: `<prefix><id>_<secret>`.
pub fn format_token(prefix: &str, id: &str, secret: &str) -> String {
    format!("{prefix}{id}_{secret}")
}

/// Splits `<prefix><id>_<secret>` into id and secret.
pub fn parse_token<'a>(prefix: &str, presented: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = presented.trim().strip_prefix(prefix)?;
    let (id, secret) = rest.split_once('_')?;
    let ok =
        |s: &str| !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric());
    (ok(id) && ok(secret)).then_some((id, secret))
}

/// Compares two hashes in time independent of where they differ.
fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Checks a user or workspace name (the node-name rule: 1 to 63 of `[A-Za-z0-9._-]`).
pub fn validate_name(what: &str, name: &str) -> Result<(), AccessError> {
    validate_node_name(name).map_err(|_| AccessError::InvalidName {
        what: what.to_string(),
        name: name.to_string(),
    })
}

fn scope_words(workspace: &Option<String>) -> String {
    match workspace {
        Some(w) => format!("workspace {w}"),
        None => "the cluster".to_string(),
    }
}

impl Access {
    /// Nothing recorded yet (a state from before access control).
    pub fn is_empty(&self) -> bool {
        *self == Access::default()
    }

    /// The token `presented` (`mst_<id>_<secret>`) if it is known, matches and is live.
    pub fn authenticate(&self, presented: &str, now: Millis) -> Result<&Token, AuthError> {
        let (id, secret) = parse_token(TOKEN_PREFIX, presented).ok_or(AuthError::Malformed)?;
        let token = self.tokens.get(id).ok_or(AuthError::Unknown)?;
        if !same_hash(&token.hash, &hash_secret(secret)) {
            return Err(AuthError::Unknown);
        }
        if token.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        if !token.is_live(now) {
            return Err(AuthError::Expired);
        }
        Ok(token)
    }

    /// The join token `presented` (`msj_<id>_<secret>`) if it matches, is unused and live;
    /// otherwise a message that says what to do.
    pub fn check_join(&self, presented: &str, now: Millis) -> Result<&JoinToken, AccessError> {
        let bad = |why: &str| {
            AccessError::BadJoin(format!(
                "{why}: create a new one with `muster token create --join --compute NAME` and start the agent with --join NEW_TOKEN"
            ))
        };
        let (id, secret) = parse_token(JOIN_PREFIX, presented).ok_or_else(|| {
            bad("the join token is malformed (join tokens look like msj_<id>_<secret>)")
        })?;
        let join = self
            .joins
            .get(id)
            .filter(|j| same_hash(&j.hash, &hash_secret(secret)))
            .ok_or_else(|| bad("the join token is not known to this cluster"))?;
        if let Some((node, _)) = &join.used {
            return Err(bad(&format!(
                "the join token was already used (by node {node})"
            )));
        }
        if now >= join.expires_at {
            return Err(bad("the join token expired"));
        }
        Ok(join)
    }

    /// Whether the workspace exists (the default one always does).
    pub fn workspace_exists(&self, name: &str) -> bool {
        name == DEFAULT_WORKSPACE || self.workspaces.contains_key(name)
    }

    /// The user's highest role in `workspace` (cluster-wide grants count everywhere).
    pub fn role_in(&self, user: &str, workspace: &str) -> Option<Role> {
        self.grants
            .iter()
            .filter(|g| g.user == user)
            .filter(|g| g.workspace.as_deref().is_none_or(|w| w == workspace))
            .map(|g| g.role)
            .max()
    }

    /// The user's cluster-wide role, if any.
    pub fn cluster_role(&self, user: &str) -> Option<Role> {
        self.grants
            .iter()
            .filter(|g| g.user == user && g.workspace.is_none())
            .map(|g| g.role)
            .max()
    }

    /// The user's highest role anywhere (what "may call this at all" asks).
    pub fn best_role(&self, user: &str) -> Option<Role> {
        self.grants
            .iter()
            .filter(|g| g.user == user)
            .map(|g| g.role)
            .max()
    }

    /// Every workspace the user has a role in, with that role (all of them for a
    /// cluster-wide grant).
    pub fn workspaces_of(&self, user: &str) -> BTreeMap<String, Role> {
        let mut names: Vec<String> = vec![DEFAULT_WORKSPACE.to_string()];
        names.extend(self.workspaces.keys().cloned());
        names
            .into_iter()
            .filter_map(|w| self.role_in(user, &w).map(|r| (w, r)))
            .collect()
    }

    /// Applies a change by `actor` at `at`; `in_use` says what a workspace still holds
    /// (from the rest of the state), `compute_workspace` the workspace of a compute target
    /// that exists.
    /// Nothing changes on an error.
    pub fn apply(
        &mut self,
        change: &AccessChange,
        actor: &str,
        at: Millis,
        in_use: impl Fn(&str) -> Option<String>,
        compute_workspace: impl Fn(&str) -> Option<String>,
    ) -> Result<(), AccessError> {
        let detail = match change {
            AccessChange::CreateToken { token } => {
                self.check_new_token(token)?;
                let detail = format!(
                    "token {} ({:?}) for {}{}",
                    token.id,
                    token.name,
                    token.principal.label(),
                    token
                        .expires_at
                        .map(|e| format!(", expires at {e}"))
                        .unwrap_or_default()
                );
                self.tokens.retain(|_, t| {
                    t.ended_at(at)
                        .is_none_or(|end| at.saturating_sub(end) < ENDED_TOKEN_KEPT)
                });
                self.tokens.insert(token.id.clone(), token.clone());
                detail
            }
            AccessChange::RevokeToken { id } => {
                let token = self
                    .tokens
                    .get_mut(id)
                    .ok_or_else(|| AccessError::UnknownToken(id.clone()))?;
                if token.revoked_at.is_none() {
                    token.revoked_at = Some(at);
                }
                format!("token {id} of {}", token.principal.label())
            }
            AccessChange::RevokeJoinToken { id } => {
                let join = self
                    .joins
                    .get(id)
                    .ok_or_else(|| AccessError::UnknownToken(id.clone()))?;
                if let Some((node, _)) = &join.used {
                    return Err(AccessError::BadJoin(format!(
                        "join token {id} was used already, by node {node}: revoke that node's credential with `muster node remove {node}` once its agent is stopped"
                    )));
                }
                let compute = join.compute.clone();
                self.joins.remove(id);
                format!("join token {id} for compute {compute}")
            }
            AccessChange::CreateJoinToken { join } => {
                if self.joins.contains_key(&join.id) || self.tokens.contains_key(&join.id) {
                    return Err(AccessError::TokenExists(join.id.clone()));
                }
                if join.expires_at <= at {
                    return Err(AccessError::ExpiresInPast);
                }
                if compute_workspace(&join.compute).is_none() {
                    return Err(AccessError::BadJoin(format!(
                        "compute target {:?} does not exist: create it first (`muster compute create`)",
                        join.compute
                    )));
                }
                self.joins.insert(join.id.clone(), join.clone());
                format!(
                    "join token {} for compute {}, expires at {}",
                    join.id, join.compute, join.expires_at
                )
            }
            AccessChange::Join {
                join_id,
                node,
                credential,
            } => {
                let join = self
                    .joins
                    .get(join_id)
                    .ok_or_else(|| AccessError::BadJoin(format!("join token {join_id:?} is not known: create one with `muster token create --join`")))?;
                if let Some((by, _)) = &join.used {
                    return Err(AccessError::BadJoin(format!(
                        "the join token was already used (by node {by}): create a new one with `muster token create --join`"
                    )));
                }
                if at >= join.expires_at {
                    return Err(AccessError::BadJoin(
                        "the join token expired: create a new one with `muster token create --join`".into(),
                    ));
                }
                let expected = Principal::Agent {
                    node: node.clone(),
                    compute: join.compute.clone(),
                };
                if credential.principal != expected {
                    return Err(AccessError::BadJoin(format!(
                        "the credential must be for {} of compute {}",
                        expected.label(),
                        join.compute
                    )));
                }
                validate_name("node", node)?;
                self.check_new_token(credential)?;
                let compute = join.compute.clone();
                self.joins.get_mut(join_id).expect("checked above").used = Some((node.clone(), at));
                self.tokens
                    .insert(credential.id.clone(), credential.clone());
                format!("node {node} joined compute {compute} with join token {join_id}")
            }
            AccessChange::CreateWorkspace { name } => {
                validate_name("workspace", name)?;
                if self.workspace_exists(name) {
                    return Err(AccessError::WorkspaceExists(name.clone()));
                }
                self.workspaces.insert(
                    name.clone(),
                    Workspace {
                        name: name.clone(),
                        created_at: at,
                        created_by: actor.to_string(),
                    },
                );
                format!("workspace {name}")
            }
            AccessChange::SetServerlessCompute { workspace, compute } => {
                if !self.workspace_exists(workspace) {
                    return Err(AccessError::UnknownWorkspace(workspace.clone()));
                }
                match compute {
                    Some(c) => {
                        if compute_workspace(c).as_deref() != Some(workspace.as_str()) {
                            return Err(AccessError::NotInWorkspace {
                                compute: c.clone(),
                                workspace: workspace.clone(),
                            });
                        }
                        self.serverless.insert(workspace.clone(), c.clone());
                        format!("serverless compute of workspace {workspace}: {c}")
                    }
                    None => {
                        self.serverless.remove(workspace);
                        format!("no serverless compute in workspace {workspace}")
                    }
                }
            }
            AccessChange::DeleteWorkspace { name } => {
                if name == DEFAULT_WORKSPACE {
                    return Err(AccessError::WorkspaceInUse {
                        name: name.clone(),
                        detail: "the default workspace cannot be deleted".into(),
                    });
                }
                if !self.workspaces.contains_key(name) {
                    return Err(AccessError::UnknownWorkspace(name.clone()));
                }
                if let Some(detail) = in_use(name) {
                    return Err(AccessError::WorkspaceInUse {
                        name: name.clone(),
                        detail,
                    });
                }
                self.workspaces.remove(name);
                self.serverless.remove(name);
                self.grants
                    .retain(|g| g.workspace.as_deref() != Some(name.as_str()));
                format!("workspace {name} and its grants")
            }
            AccessChange::GrantRole { grant } => {
                validate_name("user", &grant.user)?;
                if let Some(w) = &grant.workspace
                    && !self.workspace_exists(w)
                {
                    return Err(AccessError::UnknownWorkspace(w.clone()));
                }
                self.grants.insert(grant.clone());
                format!(
                    "{} to user {} in {}",
                    grant.role,
                    grant.user,
                    scope_words(&grant.workspace)
                )
            }
            AccessChange::RevokeRole { grant } => {
                if !self.grants.contains(grant) {
                    return Err(AccessError::NoSuchGrant {
                        user: grant.user.clone(),
                        role: grant.role,
                        scope: scope_words(&grant.workspace),
                    });
                }
                let admins = self
                    .grants
                    .iter()
                    .filter(|g| g.workspace.is_none() && g.role == Role::Admin)
                    .count();
                if grant.workspace.is_none() && grant.role == Role::Admin && admins == 1 {
                    return Err(AccessError::LastAdmin(grant.user.clone()));
                }
                self.grants.remove(grant);
                format!(
                    "{} from user {} in {}",
                    grant.role,
                    grant.user,
                    scope_words(&grant.workspace)
                )
            }
            AccessChange::Bootstrap { token } => {
                if self.tokens.contains_key(&token.id) {
                    return Ok(());
                }
                let Principal::User { name } = &token.principal else {
                    return Err(AccessError::BadJoin(
                        "the bootstrap token must be a user's".into(),
                    ));
                };
                self.check_new_token(token)?;
                self.tokens.insert(token.id.clone(), token.clone());
                self.grants.insert(Grant {
                    user: name.clone(),
                    workspace: None,
                    role: Role::Admin,
                });
                format!("first admin {name} with token {}", token.id)
            }
            AccessChange::RecordDenials { denials, more } => {
                let mut detail: Vec<String> = denials
                    .iter()
                    .take(MAX_DENIALS_PER_BATCH)
                    .map(|d| format!("{} {} at {}: {}", d.caller, d.method, d.at, d.reason))
                    .collect();
                let more = more + denials.len().saturating_sub(MAX_DENIALS_PER_BATCH) as u64;
                if more > 0 {
                    detail.push(format!("and {more} more"));
                }
                detail.join("; ")
            }
        };
        self.record(actor, change.action(), detail, at);
        Ok(())
    }

    /// Appends an audit event (other parts of the state audit their changes too, such as
    /// `secret.set`), dropping the oldest beyond [`MAX_AUDIT_EVENTS`]. `detail` must hold no
    /// secret.
    pub fn record(&mut self, actor: &str, action: &str, detail: String, at: Millis) {
        self.audit.push(AuditEvent {
            at,
            actor: actor.to_string(),
            action: action.to_string(),
            detail,
        });
        if self.audit.len() > MAX_AUDIT_EVENTS {
            let excess = self.audit.len() - MAX_AUDIT_EVENTS;
            self.audit.drain(..excess);
            self.audit_dropped += excess as u64;
        }
    }

    fn check_new_token(&self, token: &Token) -> Result<(), AccessError> {
        if self.tokens.contains_key(&token.id) || self.joins.contains_key(&token.id) {
            return Err(AccessError::TokenExists(token.id.clone()));
        }
        if token.expires_at.is_some_and(|e| e <= token.created_at) {
            return Err(AccessError::ExpiresInPast);
        }
        match &token.principal {
            Principal::User { name } => validate_name("user", name),
            Principal::Agent { node, .. } => validate_name("node", node),
        }
    }
}

#[cfg(test)]
mod tests;
