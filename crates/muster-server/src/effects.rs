//! # effects: carrying out what happens to attempts and nodes
//!
//! The few operations that need both a store and the coordinator, each in a fixed order
//! that keeps an invariant: a rank's log and metrics are sealed into the blob store and
//! onto a majority of servers *before* the replicated state records them, and a gone node's
//! ranks are sealed *before* the node is proposed lost (DESIGN.md invariant 5). Callers are
//! the agent session (`grpc/agents.rs`), the heartbeat loop and the provisioners.
//!
//! May import: `coordinator`, `store`, `views` and muster-core. Never the transport or
//! the leader loops.

use muster_core::state::SealedLog;
use muster_core::{Command, NodeState, State};

use crate::coordinator::ProposalError;
use crate::server::Server;
use crate::store::StoreError;
use crate::views::logs::sealed_log;

/// Why an effect was not carried out (nothing is recorded that is not stored).
#[derive(Debug, thiserror::Error)]
pub enum EffectError {
    /// Storing failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Recording it through Raft failed.
    #[error(transparent)]
    Proposal(#[from] ProposalError),
}

impl Server {
    /// Archives finished runs `run_ids` (retention, `leader/retention.rs`): writes them whole
    /// into one archive blob, copies it onto a majority of servers, and only then proposes
    /// their removal from the state with the archive's record. Returns how many left.
    pub(crate) async fn archive_runs(
        &self,
        run_ids: &[String],
        finished_before: u64,
    ) -> Result<usize, EffectError> {
        let blob = self.coordinator.read(|s| {
            let runs: Vec<&muster_core::state::Run> =
                run_ids.iter().filter_map(|id| s.runs.get(id)).collect();
            (runs.len() == run_ids.len()).then(|| muster_core::state::encode_archive(&runs))
        });
        let Some(blob) = blob else {
            return Ok(0);
        };
        let bytes = blob.len() as u64;
        let blobs = self.store.blobs.clone();
        let sha256 = tokio::task::spawn_blocking(move || blobs.put(&blob))
            .await
            .map_err(|e| StoreError::Io {
                what: "writing a run archive",
                source: std::io::Error::other(e),
            })?
            .map_err(StoreError::from)?;
        self.store
            .replicas
            .ensure_replicated(vec![sha256.clone()])
            .await?;
        self.coordinator
            .propose(Command::ArchiveRuns {
                run_ids: run_ids.to_vec(),
                archive: muster_core::state::RunArchive {
                    sha256,
                    runs: run_ids.len() as u64,
                    bytes,
                    finished_before,
                    at: crate::coordinator::now_ms(),
                },
            })
            .await?;
        Ok(run_ids.len())
    }

    /// The sealed log of `rank` of an attempt, if the replicated state records one.
    pub(crate) fn sealed_log(&self, run: &str, attempt: u32, rank: u32) -> Option<SealedLog> {
        self.coordinator.read(|s| sealed_log(s, run, attempt, rank))
    }

    /// Seals a rank's complete log (the agent reported its end and every byte is stored):
    /// into the blob store, onto a majority of servers, and into the replicated state. The
    /// caller proposes the rank's end only after this succeeded.
    pub(crate) async fn seal_log(
        &self,
        run: &str,
        attempt: u32,
        rank: u32,
    ) -> Result<SealedLog, EffectError> {
        let log = self.store.seal_log(run, attempt, rank).await?;
        let recorded = self
            .coordinator
            .propose(Command::SealLog {
                run_id: run.to_string(),
                attempt,
                rank,
                log: log.clone(),
            })
            .await;
        if let Err(e) = recorded {
            // Not sealed: the log takes the agent's bytes again (a later seal retries).
            self.store.logs.unseal(run, attempt, rank);
            return Err(e.into());
        }
        tracing::debug!(run_id = %run, attempt, rank, sha256 = %log.sha256, bytes = log.bytes, "log sealed");
        Ok(log)
    }

    /// Seals a run's metrics after a rank of `attempt` ended (its streams are complete):
    /// into the blob store, onto a majority of servers, and into the replicated state, so
    /// any server serves them once this one is gone. Nothing when the run logged none.
    pub(crate) async fn seal_metrics(
        &self,
        run: &str,
        attempt: u32,
        rank: u32,
    ) -> Result<(), EffectError> {
        let Some(metrics) = self.store.seal_metrics(run, attempt, rank).await? else {
            return Ok(());
        };
        self.coordinator
            .propose(Command::SealMetrics {
                run_id: run.to_string(),
                attempt,
                metrics,
            })
            .await?;
        Ok(())
    }

    /// Seals what this server (the leader) holds of every rank placed on `node_id` whose
    /// log is not sealed yet: the ranks of the attempts the node runs, and ranks of ended
    /// attempts whose agent never reported their end (a live log file is here). Called
    /// before the node is proposed lost, so the ranks' logs up to the loss outlive this
    /// server like any ended rank's (invariant 5); from then on the agent's further bytes
    /// for them are dropped. Returns how many logs it sealed.
    pub(crate) async fn seal_lost_node_logs(&self, node_id: &str) -> Result<usize, EffectError> {
        let live = self.store.logs.live().map_err(|source| StoreError::Io {
            what: "listing live logs",
            source,
        })?;
        let ranks = self
            .coordinator
            .read(|s| unsealed_ranks_on(s, node_id, live));
        for (run, attempt, rank) in &ranks {
            let log = self.seal_log(run, *attempt, *rank).await?;
            // Its metrics likewise, so they too outlive this leader.
            self.seal_metrics(run, *attempt, *rank).await?;
            tracing::info!(run_id = %run, attempt, rank, bytes = log.bytes, node = %node_id, "sealed the log and metrics of a rank on a lost node");
            if let Err(e) = self.store.logs.remove(run, *attempt, *rank) {
                tracing::warn!(run_id = %run, attempt, rank, cause = %e, "could not remove a sealed log file");
            }
        }
        Ok(ranks.len())
    }

    /// Marks a node that is gone (`Lost`, or `Evicted` by a provisioner that saw its machine
    /// reclaimed) through Raft, which ends its attempts so their runs restart as new attempts.
    /// Its ranks' logs are sealed first; if that fails the caller's next pass tries again.
    pub(crate) async fn take_down(&self, node_id: &str, state: NodeState, reason: String, at: u64) {
        if let Err(e) = self.seal_lost_node_logs(node_id).await {
            tracing::warn!(node = node_id, cause = %e, "could not seal the logs of a gone node's ranks; retrying");
            return;
        }
        let cmd = Command::SetNodeState {
            node_id: node_id.to_string(),
            state,
            reason: Some(reason),
            at,
        };
        if let Err(e) = self.coordinator.propose(cmd).await {
            tracing::debug!(cause = %e, "could not mark the node {}", state.as_str());
        }
    }
}

/// The ranks placed on `node_id` whose logs are not sealed: those of the attempts the node
/// runs, and those with a `live` log file here.
fn unsealed_ranks_on(
    s: &State,
    node_id: &str,
    live: Vec<(String, u32, u32)>,
) -> Vec<(String, u32, u32)> {
    let attempt_of = |run: &str, attempt: u32| {
        s.runs
            .get(run)
            .and_then(|r| r.attempts.get(attempt.checked_sub(1)? as usize))
    };
    let mut ranks: Vec<(String, u32, u32)> = s
        .nodes
        .get(node_id)
        .map(|n| {
            n.attempts
                .iter()
                .filter_map(|(run, attempt)| {
                    let a = attempt_of(run, *attempt)?;
                    let rank = a.placements.iter().position(|p| p.node_id == node_id)?;
                    Some((run.clone(), *attempt, rank as u32))
                })
                .collect()
        })
        .unwrap_or_default();
    ranks.extend(live.into_iter().filter(|(run, attempt, rank)| {
        attempt_of(run, *attempt)
            .and_then(|a| a.placements.get(*rank as usize))
            .is_some_and(|p| p.node_id == node_id)
    }));
    ranks.sort();
    ranks.dedup();
    ranks.retain(|(run, attempt, rank)| {
        attempt_of(run, *attempt).is_some_and(|a| !a.logs.contains_key(rank))
    });
    ranks
}

impl Server {
    /// Whether this server founds its cluster (a single server, or the first of `--peers`),
    /// and so makes the first admin's token.
    pub(crate) fn founds_cluster(&self) -> bool {
        self.config.raft.initial_voters.first() == Some(&self.config.raft.id)
    }

    /// Makes the first admin: the token is written to [`ServerConfig::admin_token_path`]
    /// (0600) *before* its hash is proposed, so an admin token the cluster accepts is
    /// never one nobody can read. Applying the bootstrap again is a no-op, so a restart
    /// proposes it again harmlessly; a bootstrap token that was revoked stays revoked.
    /// Retries until a leader takes it or the server stops.
    ///
    /// [`ServerConfig::admin_token_path`]: crate::ServerConfig::admin_token_path
    pub(crate) async fn bootstrap_admin(&self) -> anyhow::Result<()> {
        use muster_core::access::{
            AccessChange, Principal, TOKEN_PREFIX, Token, hash_secret, parse_token,
        };

        let path = self.config.admin_token_path();
        let presented = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = muster_core::access::format_token(
                    TOKEN_PREFIX,
                    &crate::coordinator::new_token_id(),
                    &crate::coordinator::new_secret(),
                );
                muster_client::write_secret_file(&path, &format!("{token}\n"), 0o600)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                token
            }
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        let (id, secret) = parse_token(TOKEN_PREFIX, &presented).ok_or_else(|| {
            anyhow::anyhow!(
                "{} does not hold a muster token (mst_<id>_<secret>): delete it and restart to make a new one",
                path.display()
            )
        })?;
        let at = crate::coordinator::now_ms();
        let command = Command::Access {
            change: Box::new(AccessChange::Bootstrap {
                token: Token {
                    id: id.to_string(),
                    principal: Principal::User {
                        name: "admin".into(),
                    },
                    name: "first admin".into(),
                    hash: hash_secret(secret),
                    created_at: at,
                    expires_at: None,
                    revoked_at: None,
                    created_by: format!("server:{}", self.config.raft.id),
                },
            }),
            by: format!("server:{}", self.config.raft.id),
            at,
        };
        for _ in 0..600 {
            if self.coordinator.read(|s| s.access.tokens.contains_key(id)) {
                return Ok(());
            }
            match self.coordinator.propose(command.clone()).await {
                Ok(_) => return Ok(()),
                Err(ProposalError::Rejected(e)) => anyhow::bail!("{e}"),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
        anyhow::bail!("no leader took the first admin token within two minutes")
    }
}
