//! Provisioners: turn the applied scale decisions into machines (DESIGN.md section 7).
//!
//! The leader reads, for every compute target with a `docker` or `command` provisioner,
//! which requested nodes still wait to be started and which are being released
//! ([`muster_core::state::Scaling`]), has the provisioner act, and reports each outcome
//! through Raft ([`Command::Provisioned`]). Acting only on the applied state, and
//! idempotently, is what makes a failover safe: a new leader repeats what it did not see
//! reported (a docker container of the same name is found, not started twice; a command
//! script must accept a repeat), and never starts a node no decision asked for.
//!
//! A machine can also go away without a decision: a low-priority VM reclaimed, an agent
//! container removed or killed on its host. The `docker` provisioner looks for that every
//! [`RECLAIM_CHECK_EVERY`] while it has nodes up, and evicts such a node through Raft at
//! once (its runs restart as new attempts, and the autoscaler releases and replaces it)
//! rather than waiting out the heartbeat grace period. For the `command` provisioner, whose
//! machines muster cannot see, the heartbeat grace period is the detector.

mod command;
mod docker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use muster_core::compute::Provisioner;
use muster_core::state::{ProvisionOutcome, ProvisionPhase};
use muster_core::{Command, Node, NodeState, State, Tier};

use crate::coordinator::now_ms;
use crate::server::Server;

/// After a failed action, the provisioner waits this long before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// A docker provisioner lists its containers (and removes strays) at least this often.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// While a docker provisioner has nodes up, it checks their containers this often.
const RECLAIM_CHECK_EVERY: Duration = Duration::from_secs(2);

/// What a provisioner has to do for one compute target now.
#[derive(Debug, Clone)]
pub(crate) struct Work {
    pub compute: String,
    pub size: Option<String>,
    pub tier: Tier,
    pub provisioner: Provisioner,
    /// Requested nodes not yet reported started.
    pub launch: Vec<String>,
    /// Nodes being released.
    pub release: Vec<String>,
    /// Every node the autoscaler keeps (requested or launched).
    pub keep: Vec<String>,
    /// Launched nodes whose agents joined and are up: (name, node id). One whose machine
    /// the provisioner finds gone was reclaimed.
    pub up: Vec<(String, String)>,
}

/// What each compute target's provisioner has to do, from the applied state.
pub(crate) fn plan(state: &State) -> Vec<Work> {
    // The registered nodes of launched names, found in one pass over the nodes.
    let launched: HashSet<&str> = state
        .scaling
        .values()
        .flat_map(|s| s.nodes.iter())
        .filter(|(_, p)| p.phase == ProvisionPhase::Launched)
        .map(|(n, _)| n.as_str())
        .collect();
    let registered: HashMap<&str, &Node> = if launched.is_empty() {
        HashMap::new()
    } else {
        state
            .nodes
            .values()
            .filter(|n| launched.contains(n.name.as_str()))
            .map(|n| (n.name.as_str(), n))
            .collect()
    };
    state
        .computes
        .values()
        .filter(|c| !c.spec.provisioner.is_static())
        .map(|c| {
            let scaling = state.scaling.get(&c.spec.name);
            let names = |phase: Option<ProvisionPhase>| -> Vec<String> {
                scaling
                    .map(|s| {
                        s.nodes
                            .iter()
                            .filter(|(_, p)| match phase {
                                Some(ph) => p.phase == ph,
                                None => p.phase != ProvisionPhase::Releasing,
                            })
                            .map(|(n, _)| n.clone())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            Work {
                compute: c.spec.name.clone(),
                size: c.spec.size.clone(),
                tier: c.spec.tier,
                provisioner: c.spec.provisioner.clone(),
                launch: names(Some(ProvisionPhase::Requested)),
                release: names(Some(ProvisionPhase::Releasing)),
                up: names(Some(ProvisionPhase::Launched))
                    .into_iter()
                    .filter_map(|name| {
                        let node = registered.get(name.as_str())?;
                        matches!(node.state, NodeState::Ready | NodeState::Draining)
                            .then(|| (name, node.id.clone()))
                    })
                    .collect(),
                keep: names(None),
            }
        })
        .collect()
}

/// The leader's provisioners and what they remember between passes (only to pace
/// retries; everything that matters is in the replicated state).
#[derive(Default)]
pub(crate) struct Provisioners {
    docker: Option<bollard::Docker>,
    /// compute → when it may act again after a failure, and the last failure's text.
    failed: HashMap<String, (Instant, String)>,
    /// compute → when its docker containers were last listed.
    synced: HashMap<String, Instant>,
}

impl Provisioners {
    /// Forgets pacing state (on losing leadership: a later term starts with a full resync).
    pub(crate) fn forget(&mut self) {
        self.failed.clear();
        self.synced.clear();
    }

    /// Acts for one compute target and reports the outcomes through Raft.
    pub(crate) async fn reconcile(&mut self, server: &Server, work: Work) {
        if let Some((until, _)) = self.failed.get(&work.compute)
            && Instant::now() < *until
        {
            return;
        }
        let servers = match &work.provisioner {
            Provisioner::Docker(d) if !d.servers.is_empty() => d.servers.clone(),
            _ => server.config.agent_servers.clone(),
        };
        let result = match &work.provisioner {
            Provisioner::Static => return,
            Provisioner::Docker(settings) => {
                let every = if work.up.is_empty() {
                    RESYNC_EVERY
                } else {
                    RECLAIM_CHECK_EVERY
                };
                let resync = self
                    .synced
                    .get(&work.compute)
                    .is_none_or(|t| t.elapsed() >= every);
                if work.launch.is_empty() && work.release.is_empty() && !resync {
                    return;
                }
                let docker = match self.docker().await {
                    Ok(d) => d,
                    Err(e) => {
                        self.report_failure(server, &work, &work.launch, e).await;
                        return;
                    }
                };
                let joins = join_tokens(server, &work).await;
                let out =
                    docker::reconcile(&docker, settings, &servers, &work, resync, &joins).await;
                if out.listed {
                    self.synced.insert(work.compute.clone(), Instant::now());
                }
                out.steps
            }
            Provisioner::Command(settings) => {
                let log_dir = server.config.data_dir.join("provision");
                let joins = join_tokens(server, &work).await;
                command::reconcile(settings, &servers, &work, &log_dir, &joins).await
            }
        };
        for step in result {
            match step {
                Step::Done(outcome, nodes) => {
                    tracing::info!(compute = %work.compute, ?nodes, outcome = outcome.as_str(), "provisioner");
                    self.failed.remove(&work.compute);
                    let cmd = Command::Provisioned {
                        compute: work.compute.clone(),
                        nodes,
                        outcome,
                        message: None,
                        at: now_ms(),
                    };
                    if let Err(e) = server.coordinator.propose(cmd).await {
                        tracing::debug!(cause = %e, "provisioner outcome not recorded");
                    }
                }
                Step::Failed(nodes, message) => {
                    self.report_failure(server, &work, &nodes, message).await;
                }
                Step::Reclaimed { node_id, name, why } => {
                    tracing::warn!(compute = %work.compute, node = %name, "{why}; evicting the node");
                    let reason = format!("node {name} was reclaimed: {why}");
                    server
                        .take_down(&node_id, NodeState::Evicted, reason, now_ms())
                        .await;
                }
            }
        }
    }

    /// The leader's Docker engine, connected (and pinged) on first use and kept.
    async fn docker(&mut self) -> Result<bollard::Docker, String> {
        if let Some(d) = &self.docker {
            return Ok(d.clone());
        }
        let d = muster_docker::connect()
            .await
            .map_err(|e| format!("the docker provisioner runs on the leader: {e}"))?;
        self.docker = Some(d.clone());
        Ok(d)
    }

    /// Waits [`RETRY_AFTER`] before the next try, and records the failure in the state's
    /// history unless it repeats the last one (a failing provisioner does not fill the log).
    async fn report_failure(
        &mut self,
        server: &Server,
        work: &Work,
        nodes: &[String],
        message: String,
    ) {
        tracing::warn!(compute = %work.compute, ?nodes, "provisioner failed: {message}");
        let repeat = self
            .failed
            .get(&work.compute)
            .is_some_and(|(_, last)| *last == message);
        self.failed.insert(
            work.compute.clone(),
            (Instant::now() + RETRY_AFTER, message.clone()),
        );
        let nodes: Vec<String> = nodes
            .iter()
            .filter(|n| work.keep.contains(n) || work.release.contains(n))
            .cloned()
            .collect();
        if repeat || nodes.is_empty() {
            return;
        }
        let cmd = Command::Provisioned {
            compute: work.compute.clone(),
            nodes,
            outcome: ProvisionOutcome::Failed,
            message: Some(message),
            at: now_ms(),
        };
        if let Err(e) = server.coordinator.propose(cmd).await {
            tracing::debug!(cause = %e, "provisioner failure not recorded");
        }
    }
}

/// One outcome of a provisioner's pass.
#[derive(Debug)]
pub(crate) enum Step {
    /// These nodes were started or stopped.
    Done(ProvisionOutcome, Vec<String>),
    /// These nodes could not be; why.
    Failed(Vec<String>, String),
    /// An up node's machine is gone though no decision released it.
    Reclaimed {
        node_id: String,
        name: String,
        why: String,
    },
}

/// A single-use join token for each node about to be launched (the leader makes them as
/// the server it is; they expire in an hour). A node whose token could not be recorded
/// gets none, and its agent says it needs one.
async fn join_tokens(server: &Server, work: &Work) -> BTreeMap<String, String> {
    use muster_core::access::{AccessChange, JOIN_PREFIX, JoinToken, format_token, hash_secret};
    let mut out = BTreeMap::new();
    let by = format!("server:{}", server.config.raft.id);
    for node in &work.launch {
        let id = crate::coordinator::new_token_id();
        let secret = crate::coordinator::new_secret();
        let at = now_ms();
        let join = JoinToken {
            id: id.clone(),
            hash: hash_secret(&secret),
            compute: work.compute.clone(),
            created_at: at,
            expires_at: at + 3_600_000,
            used: None,
            created_by: by.clone(),
        };
        let command = Command::Access {
            change: Box::new(AccessChange::CreateJoinToken { join }),
            by: by.clone(),
            at,
        };
        match server.coordinator.propose(command).await {
            Ok(_) => {
                out.insert(node.clone(), format_token(JOIN_PREFIX, &id, &secret));
            }
            Err(e) => tracing::warn!(%node, cause = %e, "no join token for a provisioned node"),
        }
    }
    out
}

/// The arguments of `muster agent` for a provisioned node (after the global `--server`).
pub(crate) fn agent_args(
    compute: &str,
    node: &str,
    tier: Tier,
    labels: &BTreeMap<String, String>,
    data_dir: &str,
) -> Vec<String> {
    let mut args = vec![
        "agent".to_string(),
        "--compute".into(),
        compute.into(),
        "--name".into(),
        node.into(),
        "--tier".into(),
        tier.as_str().into(),
        "--data-dir".into(),
        data_dir.into(),
    ];
    if !labels.is_empty() {
        args.push("--labels".into());
        args.push(
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    args
}
