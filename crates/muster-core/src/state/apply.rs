//! `State::apply`: the only code that mutates the replicated state.

use std::collections::{BTreeMap, BTreeSet};

use crate::Millis;
use crate::compute::{ComputeKind, QuotaUsage};
use crate::names::validate_node_name;
use crate::schedule::Placement;
use crate::snapshot::is_sha256_hex;
use crate::spec::{RunSpec, SpecError};
use crate::state::{
    Applied, ApplyError, Attempt, AttemptEnd, AttemptReport, AttemptState, Command, ComputeTarget,
    Derived, Node, NodeState, ProvisionOutcome, ProvisionPhase, ProvisionedNode, QueueKey, Queued,
    RankEnd, Run, RunState, SCALE_HISTORY, ScaleEvent, Scaling, SealedBlob, SealedLog,
    SealedMetrics, State,
};

/// A node name that breaks the naming rule, as a rejection.
fn node_name_error(e: crate::names::NameError) -> ApplyError {
    ApplyError::InvalidNodeName {
        name: e.name,
        rule: e.rule,
    }
}

/// The longest server address accepted.
pub const MAX_SERVER_ADDRESS_LEN: usize = 256;

/// Checks a coordinator's id and address (`set_server_address.v1`, `add-server`).
pub fn validate_server_address(id: u64, address: &str) -> Result<(), ApplyError> {
    if id == 0 {
        return Err(ApplyError::InvalidServerId(id));
    }
    if address.is_empty()
        || address.len() > MAX_SERVER_ADDRESS_LEN
        || address.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApplyError::InvalidServerAddress(address.to_string()));
    }
    Ok(())
}

/// The nodes of `compute` that count against its `max_instances`: the autoscaler's
/// requested nodes not being released, and the other registered nodes that are ready or
/// draining.
pub(crate) fn live_node_count(state: &State, compute: &str, scaling: &Scaling) -> u64 {
    let owned = scaling
        .nodes
        .values()
        .filter(|p| p.phase != ProvisionPhase::Releasing)
        .count() as u64;
    let others = state
        .nodes
        .values()
        .filter(|n| n.compute == compute && !scaling.nodes.contains_key(&n.name))
        .filter(|n| matches!(n.state, NodeState::Ready | NodeState::Draining))
        .count() as u64;
    owned + others
}

fn push_event(scaling: &mut Scaling, at: Millis, action: &str, nodes: &[String], message: &str) {
    scaling.history.push(ScaleEvent {
        at,
        action: action.to_string(),
        nodes: nodes.to_vec(),
        message: message.to_string(),
    });
    if scaling.history.len() > SCALE_HISTORY {
        let extra = scaling.history.len() - SCALE_HISTORY;
        scaling.history.drain(..extra);
    }
}

/// Base delay before a preempted or node-lost run may be placed again; doubles per attempt.
pub const REQUEUE_BACKOFF_MS: u64 = 1_000;
/// The longest backoff between attempts.
pub const MAX_REQUEUE_BACKOFF_MS: u64 = 60_000;

impl State {
    /// Applies one command. Deterministic; on error nothing is changed.
    pub fn apply(&mut self, command: &Command) -> Result<Applied, ApplyError> {
        match command {
            Command::CreateCompute { spec, at } => {
                spec.validate()?;
                if !self.access.workspace_exists(&spec.workspace) {
                    return Err(crate::access::AccessError::UnknownWorkspace(
                        spec.workspace.clone(),
                    )
                    .into());
                }
                if self.computes.contains_key(&spec.name) {
                    return Err(ApplyError::ComputeExists(spec.name.clone()));
                }
                self.computes.insert(
                    spec.name.clone(),
                    ComputeTarget {
                        spec: spec.clone(),
                        created_at: *at,
                    },
                );
                Ok(Applied::Done)
            }
            Command::UpdateCompute { spec, .. } => {
                spec.validate()?;
                let target = self
                    .computes
                    .get_mut(&spec.name)
                    .ok_or_else(|| ApplyError::UnknownCompute(spec.name.clone()))?;
                let fixed = |field: &str, what: &str| {
                    ApplyError::InvalidSpec(SpecError::field(
                        field,
                        format!(
                            "a compute target's {what} cannot change: create another target (and delete this one)"
                        ),
                    ))
                };
                if target.spec.kind != spec.kind {
                    return Err(fixed("type", "type"));
                }
                if target.spec.workspace != spec.workspace {
                    return Err(fixed("workspace", "workspace"));
                }
                if !target.spec.provisioner.same_but_labels(&spec.provisioner) {
                    return Err(fixed("provisioner", "provisioner"));
                }
                let stopped = target.spec.stopped;
                target.spec = spec.clone();
                target.spec.stopped = stopped;
                Ok(Applied::Done)
            }
            Command::SetComputeStopped { name, stopped, .. } => {
                let target = self
                    .computes
                    .get_mut(name)
                    .ok_or_else(|| ApplyError::UnknownCompute(name.clone()))?;
                if target.spec.kind != ComputeKind::Instance {
                    return Err(ApplyError::InvalidSpec(SpecError::field(
                        "type",
                        format!(
                            "compute target {name:?} is a {}: only a compute instance stops and starts (a cluster scales with `muster compute update {name} --min-instances 0`; a node is drained with `muster node drain`)",
                            target.spec.kind.as_str()
                        ),
                    )));
                }
                if target.spec.provisioner.is_static() {
                    return Err(ApplyError::InvalidSpec(SpecError::field(
                        "provisioner",
                        format!(
                            "compute instance {name:?} has the static provisioner, so muster cannot stop or start its machine: stop its agent there, or take it out of service with `muster node drain`"
                        ),
                    )));
                }
                target.spec.stopped = *stopped;
                Ok(Applied::Done)
            }
            Command::DeleteCompute { name, at } => self.delete_compute(name, *at),
            Command::RegisterNode {
                node_id,
                name,
                compute,
                capacity,
                labels,
                tier,
                address,
                at,
            } => {
                validate_node_name(name).map_err(node_name_error)?;
                if !self.computes.contains_key(compute) {
                    return Err(ApplyError::UnknownCompute(compute.clone()));
                }
                if self
                    .nodes
                    .values()
                    .any(|n| n.name == *name && n.id != *node_id)
                {
                    return Err(ApplyError::NodeNameTaken(name.clone()));
                }
                match self.nodes.get_mut(node_id) {
                    Some(node) => {
                        // A returning node: new capacity and address. A lost node is ready
                        // again (its stale attempts were already requeued); a drained or
                        // evicted one stays so until an admin resumes it.
                        node.name = name.clone();
                        node.compute = compute.clone();
                        node.capacity = capacity.clone();
                        node.labels = labels.clone();
                        node.tier = *tier;
                        node.address = address.clone();
                        if node.state == NodeState::Lost {
                            node.state = NodeState::Ready;
                            node.state_reason = None;
                        }
                        node.updated_at = *at;
                    }
                    None => {
                        self.nodes.insert(
                            node_id.clone(),
                            Node {
                                id: node_id.clone(),
                                name: name.clone(),
                                compute: compute.clone(),
                                capacity: capacity.clone(),
                                labels: labels.clone(),
                                tier: *tier,
                                address: address.clone(),
                                state: NodeState::Ready,
                                state_reason: None,
                                registered_at: *at,
                                updated_at: *at,
                                allocated: Default::default(),
                                allocated_gpus: BTreeSet::new(),
                                attempts: BTreeSet::new(),
                                idle_since: Some(*at),
                            },
                        );
                    }
                }
                Ok(Applied::Done)
            }
            Command::RemoveNode { node_id, at } => self.remove_node(node_id, *at),
            Command::SetNodeState {
                node_id,
                state,
                reason,
                at,
            } => {
                let node = self
                    .nodes
                    .get_mut(node_id)
                    .ok_or_else(|| ApplyError::UnknownNode(node_id.clone()))?;
                node.state = *state;
                node.state_reason = reason.clone();
                node.updated_at = *at;
                if matches!(state, NodeState::Lost | NodeState::Evicted) {
                    let victims: Vec<(String, u32)> = node.attempts.iter().cloned().collect();
                    let why = reason
                        .clone()
                        .unwrap_or_else(|| format!("node {} was {}", node.name, state.as_str()));
                    for (run_id, attempt) in victims {
                        self.end_attempt(
                            &run_id,
                            attempt,
                            AttemptEnd::NodeLost,
                            None,
                            Some(why.clone()),
                            None,
                            *at,
                        );
                    }
                }
                Ok(Applied::Done)
            }
            Command::SubmitRun {
                run_id,
                spec,
                idempotency_key,
                at,
            } => self.submit(run_id, spec, idempotency_key.as_deref(), *at),
            Command::PlaceRun {
                run_id,
                attempt,
                placements,
                at,
                secret,
            } => self.place(run_id, *attempt, placements, secret.as_deref(), *at),
            Command::PreemptAttempt {
                run_id,
                attempt,
                for_run,
                at: _,
            } => self.preempt(run_id, *attempt, for_run),
            Command::ReportAttempt {
                run_id,
                attempt,
                node_id,
                report,
                at,
            } => self.report(run_id, *attempt, node_id, report, *at),
            Command::SealLog {
                run_id,
                attempt,
                rank,
                log,
            } => self.seal_log(run_id, *attempt, *rank, log),
            Command::SealMetrics {
                run_id,
                attempt,
                metrics,
            } => self.seal_metrics(run_id, *attempt, metrics),
            Command::ArchiveRuns { run_ids, archive } => self.archive_runs(run_ids, archive),
            Command::RecordCheckpoint {
                run_id,
                node_id,
                checkpoint,
            } => self.record_checkpoint(run_id, node_id, checkpoint),
            Command::CreateComponent { component } => {
                component.validate()?;
                let versions = self
                    .components
                    .entry(crate::data::scoped(&component.workspace, &component.name))
                    .or_default();
                if versions.iter().any(|c| c.version == component.version) {
                    return Err(ApplyError::ComponentExists {
                        name: component.name.clone(),
                        version: component.version.clone(),
                    });
                }
                versions.push((**component).clone());
                Ok(Applied::Done)
            }
            Command::CreateDatastore { store } => {
                store.validate()?;
                if !self.access.workspace_exists(&store.workspace) {
                    return Err(ApplyError::InvalidSpec(crate::spec::SpecError::field(
                        "workspace",
                        format!("workspace {:?} does not exist", store.workspace),
                    )));
                }
                let key = crate::data::scoped(&store.workspace, &store.name);
                if self.datastores.contains_key(&key) {
                    return Err(ApplyError::DatastoreExists(store.name.clone()));
                }
                self.datastores.insert(key, store.clone());
                Ok(Applied::Done)
            }
            Command::CreateDataAsset { asset } => {
                asset.validate()?;
                if !self.access.workspace_exists(&asset.workspace) {
                    return Err(ApplyError::InvalidSpec(crate::spec::SpecError::field(
                        "workspace",
                        format!("workspace {:?} does not exist", asset.workspace),
                    )));
                }
                let versions = self
                    .data_assets
                    .entry(crate::data::scoped(&asset.workspace, &asset.name))
                    .or_default();
                if versions.iter().any(|a| a.version == asset.version) {
                    return Err(ApplyError::DataAssetExists {
                        name: asset.name.clone(),
                        version: asset.version.clone(),
                    });
                }
                versions.push((**asset).clone());
                Ok(Applied::Done)
            }
            Command::SetServerAddress { id, address } => {
                validate_server_address(*id, address)?;
                self.servers.insert(*id, address.clone());
                Ok(Applied::Done)
            }
            Command::RemoveServerAddress { id } => {
                self.servers.remove(id);
                Ok(Applied::Done)
            }
            Command::ScaleCompute {
                compute,
                add,
                remove,
                reason,
                at,
            } => self.scale_compute(compute, add, remove, reason, *at),
            Command::Provisioned {
                compute,
                nodes,
                outcome,
                message,
                at,
            } => self.provisioned(compute, nodes, *outcome, message.as_deref(), *at),
            Command::CancelRun { run_id, reason, at } => {
                let run = self
                    .runs
                    .get_mut(run_id)
                    .ok_or_else(|| ApplyError::UnknownRun(run_id.clone()))?;
                if run.state.is_terminal() {
                    return Err(ApplyError::RunFinished {
                        run_id: run_id.clone(),
                        state: run.state.as_str().to_string(),
                    });
                }
                let why = reason
                    .clone()
                    .unwrap_or_else(|| "canceled by user".to_string());
                if run.state == RunState::Queued {
                    let key = queue_key(run);
                    run.state = RunState::Canceled;
                    run.finished_at = Some(*at);
                    run.message = Some(why);
                    run.not_before = None;
                    dequeue(&mut self.queue, &mut self.queued, &key);
                } else {
                    run.cancel_requested = true;
                    run.message = Some(format!("{why}; stopping"));
                    if let Some(summary) = self.active.0.get_mut(&run.spec.compute) {
                        summary.stopping(run.seq, None);
                    }
                }
                Ok(Applied::Done)
            }
            Command::SubmitSweep {
                sweep_id,
                spec,
                seed,
                at,
            } => self.submit_sweep(sweep_id, spec, *seed, *at),
            Command::SweepDecision {
                sweep_id,
                decision,
                run_id,
                at,
            } => self.apply_sweep_decision(sweep_id, decision, run_id.as_deref(), *at),
            Command::CancelSweep {
                sweep_id,
                reason,
                at,
            } => self.cancel_sweep(sweep_id, reason.as_deref(), *at),
            Command::SubmitPipeline {
                pipeline_id,
                spec,
                at,
            } => self.submit_pipeline(pipeline_id, spec, *at),
            Command::PipelineDecision {
                pipeline_id,
                decision,
                run_id,
                at,
            } => self.apply_pipeline_decision(pipeline_id, decision, run_id.as_deref(), *at),
            Command::CancelPipeline {
                pipeline_id,
                reason,
                at,
            } => self.cancel_pipeline(pipeline_id, reason.as_deref(), *at),
            Command::Access { change, by, at } => {
                let mut access = std::mem::take(&mut self.access);
                let result = access.apply(
                    change,
                    by,
                    *at,
                    |w| self.workspace_contents(w),
                    |c| self.computes.get(c).map(|c| c.spec.workspace.clone()),
                );
                self.access = access;
                result?;
                Ok(Applied::Done)
            }
        }
    }

    /// What a workspace still holds that keeps it from being deleted, in words; `None`
    /// when it is empty (finished runs do not count: they stay, readable by cluster admins).
    fn workspace_contents(&self, workspace: &str) -> Option<String> {
        if let Some(c) = self
            .computes
            .values()
            .find(|c| c.spec.workspace == workspace)
        {
            return Some(format!(
                "compute target {:?} is in it: delete it first (`muster compute delete`)",
                c.spec.name
            ));
        }
        if let Some(r) = self
            .runs
            .values()
            .find(|r| r.spec.workspace == workspace && !r.state.is_terminal())
        {
            return Some(format!(
                "run {} has not finished: cancel it first (`muster run cancel`)",
                r.id
            ));
        }
        None
    }

    /// The attempt a sealed blob (`what`: log or metrics) belongs to, once its hash is
    /// well formed and the attempt exists.
    fn sealed_attempt(
        &mut self,
        blob: SealedBlob,
        run_id: &str,
        attempt: u32,
        sha256: &str,
    ) -> Result<&mut Attempt, ApplyError> {
        if !is_sha256_hex(sha256) {
            return Err(ApplyError::InvalidBlobHash {
                blob,
                run_id: run_id.to_string(),
                sha256: sha256.to_string(),
            });
        }
        let run = self
            .runs
            .get_mut(run_id)
            .ok_or_else(|| ApplyError::UnknownRun(run_id.to_string()))?;
        attempt
            .checked_sub(1)
            .and_then(|i| run.attempts.get_mut(i as usize))
            .ok_or_else(|| ApplyError::UnknownAttempt {
                blob,
                run_id: run_id.to_string(),
                attempt,
            })
    }

    fn seal_log(
        &mut self,
        run_id: &str,
        attempt: u32,
        rank: u32,
        log: &SealedLog,
    ) -> Result<Applied, ApplyError> {
        let a = self.sealed_attempt(SealedBlob::Log, run_id, attempt, &log.sha256)?;
        if rank as usize >= a.placements.len() {
            return Err(ApplyError::UnknownRank {
                run_id: run_id.to_string(),
                attempt,
                ranks: a.placements.len() as u32,
                rank,
            });
        }
        a.logs.entry(rank).or_insert_with(|| log.clone());
        Ok(Applied::Done)
    }

    fn seal_metrics(
        &mut self,
        run_id: &str,
        attempt: u32,
        metrics: &SealedMetrics,
    ) -> Result<Applied, ApplyError> {
        let a = self.sealed_attempt(SealedBlob::Metrics, run_id, attempt, &metrics.sha256)?;
        if a.metrics.as_ref().is_none_or(|m| m.lines < metrics.lines) {
            a.metrics = Some(metrics.clone());
        }
        Ok(Applied::Done)
    }

    fn delete_compute(&mut self, name: &str, at: Millis) -> Result<Applied, ApplyError> {
        let target = self
            .computes
            .get(name)
            .ok_or_else(|| ApplyError::UnknownCompute(name.to_string()))?;
        if target.spec.kind == ComputeKind::Local && name == "local" {
            return Err(ApplyError::ComputeInUse {
                name: name.to_string(),
                detail: "the built-in local target cannot be deleted".to_string(),
            });
        }
        let scaling = self.scaling.get(name).cloned().unwrap_or_default();
        if scaling.deleting {
            return Err(ApplyError::ComputeInUse {
                name: name.to_string(),
                detail: format!(
                    "it is already being deleted; its provisioner is stopping {} node(s)",
                    scaling.nodes.len()
                ),
            });
        }
        // Nodes the autoscaler did not start (agents joined by hand) must be stopped first.
        let nodes = self
            .nodes
            .values()
            .filter(|n| n.compute == name && !scaling.nodes.contains_key(&n.name))
            .count();
        if nodes > 0 {
            return Err(ApplyError::ComputeInUse {
                name: name.to_string(),
                detail: format!("{nodes} node(s) belong to it; stop their agents first"),
            });
        }
        let unfinished = self
            .runs
            .values()
            .filter(|r| r.spec.compute == name && !r.state.is_terminal())
            .count();
        if unfinished > 0 {
            return Err(ApplyError::ComputeInUse {
                name: name.to_string(),
                detail: format!("{unfinished} unfinished run(s) target it; cancel them first"),
            });
        }
        if !scaling.nodes.is_empty() {
            // Its provisioner stops the nodes it started (no run is left to hold them); the
            // target goes when the last is reported released.
            let scaling = self.scaling.get_mut(name).expect("not empty");
            scaling.deleting = true;
            let mut going = Vec::new();
            for (node, p) in scaling.nodes.iter_mut() {
                if p.phase != ProvisionPhase::Releasing {
                    p.phase = ProvisionPhase::Releasing;
                    p.releasing_since = Some(at);
                    going.push(node.clone());
                }
            }
            if !going.is_empty() {
                push_event(
                    scaling,
                    at,
                    "scale_down",
                    &going,
                    "the compute target is being deleted",
                );
            }
            for n in self.nodes.values_mut().filter(|n| n.compute == name) {
                if n.state == NodeState::Ready {
                    n.state = NodeState::Draining;
                    n.state_reason = Some("the compute target is being deleted".into());
                    n.updated_at = at;
                }
            }
            return Ok(Applied::Done);
        }
        self.computes.remove(name);
        self.scaling.remove(name);
        Ok(Applied::Done)
    }

    fn scale_compute(
        &mut self,
        compute: &str,
        add: &[String],
        remove: &[String],
        reason: &str,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        let target = self
            .computes
            .get(compute)
            .ok_or_else(|| ApplyError::UnknownCompute(compute.to_string()))?;
        let stale = |why: String| Err(ApplyError::InvalidPlacement(why));
        let Some((_, max)) = target.spec.scale_bounds() else {
            return stale(format!("compute target {compute:?} does not autoscale"));
        };
        if add.is_empty() && remove.is_empty() {
            return stale("a scale decision with nothing to add or remove".into());
        }
        let scaling = self.scaling.get(compute).cloned().unwrap_or_default();
        if scaling.deleting {
            return stale(format!("compute target {compute:?} is being deleted"));
        }
        let mut seen = BTreeSet::new();
        for name in add {
            validate_node_name(name).map_err(node_name_error)?;
            if !seen.insert(name.as_str())
                || scaling.nodes.contains_key(name)
                || self.nodes.values().any(|n| &n.name == name)
            {
                return stale(format!("node name {name:?} is already in use"));
            }
        }
        for name in remove {
            match scaling.nodes.get(name) {
                None => {
                    return stale(format!(
                        "node {name:?} was not provisioned by the autoscaler of {compute:?}"
                    ));
                }
                Some(p) if p.phase == ProvisionPhase::Releasing => {
                    return stale(format!("node {name:?} is already being released"));
                }
                Some(_) => {}
            }
            if !seen.insert(name.as_str()) {
                return stale(format!("node {name:?} is both added and removed"));
            }
            if let Some(n) = self
                .nodes
                .values()
                .find(|n| &n.name == name && n.compute == compute)
                && !n.attempts.is_empty()
            {
                return stale(format!("node {name:?} is running attempts"));
            }
        }
        let live = live_node_count(self, compute, &scaling);
        let live = live.saturating_sub(remove.len() as u64);
        if !add.is_empty() && live + add.len() as u64 > max as u64 {
            return stale(format!(
                "{live} node(s) plus {} would exceed max_instances ({max})",
                add.len()
            ));
        }
        let scaling = self.scaling.entry(compute.to_string()).or_default();
        for name in add {
            scaling.nodes.insert(
                name.clone(),
                ProvisionedNode {
                    phase: ProvisionPhase::Requested,
                    requested_at: at,
                    releasing_since: None,
                },
            );
        }
        scaling.next_index += add.len() as u64;
        for name in remove {
            let p = scaling.nodes.get_mut(name).expect("checked above");
            p.phase = ProvisionPhase::Releasing;
            p.releasing_since = Some(at);
        }
        for (action, nodes) in [("scale_up", add), ("scale_down", remove)] {
            if !nodes.is_empty() {
                push_event(scaling, at, action, nodes, reason);
            }
        }
        for name in remove {
            if let Some(n) = self
                .nodes
                .values_mut()
                .find(|n| &n.name == name && n.compute == compute)
                && n.state == NodeState::Ready
            {
                n.state = NodeState::Draining;
                n.state_reason = Some(format!("scaling down: {reason}"));
                n.updated_at = at;
            }
        }
        Ok(Applied::Done)
    }

    fn provisioned(
        &mut self,
        compute: &str,
        nodes: &[String],
        outcome: ProvisionOutcome,
        message: Option<&str>,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        if !self.computes.contains_key(compute) {
            return Err(ApplyError::UnknownCompute(compute.to_string()));
        }
        let Some(scaling) = self.scaling.get_mut(compute) else {
            return Err(ApplyError::InvalidPlacement(format!(
                "compute target {compute:?} has no provisioned nodes"
            )));
        };
        // Only the nodes still in the phase the outcome moves them from count; a report
        // repeated by a new leader changes nothing.
        let from = match outcome {
            ProvisionOutcome::Launched => Some(ProvisionPhase::Requested),
            ProvisionOutcome::Released => Some(ProvisionPhase::Releasing),
            ProvisionOutcome::Failed => None,
        };
        let affected: Vec<String> = nodes
            .iter()
            .filter(|n| {
                scaling
                    .nodes
                    .get(*n)
                    .is_some_and(|p| from.is_none_or(|f| p.phase == f))
            })
            .cloned()
            .collect();
        if affected.is_empty() {
            return Err(ApplyError::InvalidPlacement(format!(
                "none of {nodes:?} is waiting for a {} report",
                outcome.as_str()
            )));
        }
        for name in &affected {
            match outcome {
                ProvisionOutcome::Launched => {
                    scaling.nodes.get_mut(name).expect("filtered").phase = ProvisionPhase::Launched;
                }
                ProvisionOutcome::Released => {
                    scaling.nodes.remove(name);
                }
                ProvisionOutcome::Failed => {}
            }
        }
        let text = message.unwrap_or(match outcome {
            ProvisionOutcome::Launched => "started",
            ProvisionOutcome::Released => "stopped and removed",
            ProvisionOutcome::Failed => "failed",
        });
        push_event(scaling, at, outcome.as_str(), &affected, text);
        if outcome == ProvisionOutcome::Released {
            let gone: Vec<String> = self
                .nodes
                .values()
                .filter(|n| n.compute == compute && affected.contains(&n.name))
                .map(|n| n.id.clone())
                .collect();
            for id in gone {
                // Drained before its release was decided, so normally idle; anything still
                // placed there restarts elsewhere.
                let victims: Vec<(String, u32)> =
                    self.nodes[&id].attempts.iter().cloned().collect();
                for (run_id, attempt) in victims {
                    self.end_attempt(
                        &run_id,
                        attempt,
                        AttemptEnd::NodeLost,
                        None,
                        Some("its node was released by the autoscaler".into()),
                        None,
                        at,
                    );
                }
                self.nodes.remove(&id);
            }
            if self
                .scaling
                .get(compute)
                .is_some_and(|s| s.deleting && s.nodes.is_empty())
            {
                self.scaling.remove(compute);
                self.computes.remove(compute);
            }
        }
        Ok(Applied::Done)
    }

    fn remove_node(&mut self, node_id: &str, at: Millis) -> Result<Applied, ApplyError> {
        let node = self
            .nodes
            .get(node_id)
            .ok_or_else(|| ApplyError::UnknownNode(node_id.to_string()))?;
        let in_use = |why: String| ApplyError::NodeInUse {
            node: node.name.clone(),
            why,
        };
        if self
            .scaling
            .get(&node.compute)
            .is_some_and(|s| s.nodes.contains_key(&node.name))
        {
            return Err(in_use(format!(
                "compute target {} made it with its provisioner, which releases it when it is idle: lower the target's max_instances, or delete the target",
                node.compute
            )));
        }
        if !node.attempts.is_empty() {
            return Err(in_use(format!(
                "it holds {} active attempt(s): `muster node evict {}` restarts them elsewhere, or wait for them to end",
                node.attempts.len(),
                node.name
            )));
        }
        if node.state == NodeState::Ready {
            return Err(in_use(format!(
                "it is ready: stop its agent first (the node turns lost after the heartbeat grace period), or `muster node drain {}` and then stop it",
                node.name
            )));
        }
        let name = node.name.clone();
        for token in self.access.tokens.values_mut() {
            if matches!(&token.principal, crate::access::Principal::Agent { node, .. } if *node == name)
                && token.revoked_at.is_none()
            {
                token.revoked_at = Some(at);
            }
        }
        self.nodes.remove(node_id);
        Ok(Applied::Done)
    }

    fn submit(
        &mut self,
        run_id: &str,
        spec: &RunSpec,
        idempotency_key: Option<&str>,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        if let Some(key) = idempotency_key
            && let Some(existing) = self.idempotency.get(key)
        {
            return Ok(Applied::Submitted {
                run_id: existing.clone(),
                existing: true,
            });
        }
        spec.validate()?;
        // A compute target of another workspace is as unknown as one that does not exist.
        if self
            .computes
            .get(&spec.compute)
            .is_none_or(|c| c.spec.workspace != spec.workspace)
        {
            return Err(ApplyError::UnknownCompute(spec.compute.clone()));
        }
        if self.scaling.get(&spec.compute).is_some_and(|s| s.deleting) {
            return Err(ApplyError::ComputeInUse {
                name: spec.compute.clone(),
                detail: "it is being deleted; submit to another compute target".into(),
            });
        }
        if self.runs.contains_key(run_id) {
            return Err(ApplyError::RunExists(run_id.to_string()));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let run = Run {
            id: run_id.to_string(),
            seq,
            spec: spec.clone(),
            state: RunState::Queued,
            created_at: at,
            started_at: None,
            finished_at: None,
            exit_code: None,
            message: None,
            cancel_requested: false,
            preempt_requested: None,
            not_before: None,
            attempts: Vec::new(),
            idempotency_key: idempotency_key.map(str::to_string),
            checkpoint: None,
        };
        enqueue(&mut self.queue, &mut self.queued, &run);
        self.by_seq.0.insert(seq, run_id.to_string());
        self.runs.insert(run_id.to_string(), run);
        if let Some(key) = idempotency_key {
            self.idempotency.insert(key.to_string(), run_id.to_string());
        }
        Ok(Applied::Submitted {
            run_id: run_id.to_string(),
            existing: false,
        })
    }

    fn place(
        &mut self,
        run_id: &str,
        attempt: u32,
        placements: &[Placement],
        secret: Option<&str>,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        let run = self
            .runs
            .get(run_id)
            .ok_or_else(|| ApplyError::UnknownRun(run_id.to_string()))?;
        let bad = |m: String| {
            Err(ApplyError::InvalidPlacement(format!(
                "placement of run {run_id}: {m}"
            )))
        };
        if run.state != RunState::Queued {
            return bad(format!("it is {}, not queued", run.state.as_str()));
        }
        if attempt != run.attempt_number() + 1 {
            return bad(format!(
                "attempt {attempt} is not the next attempt ({})",
                run.attempt_number() + 1
            ));
        }
        if placements.len() != run.spec.instance_count as usize {
            return bad(format!(
                "{} placements for {} instances",
                placements.len(),
                run.spec.instance_count
            ));
        }
        let mut seen_nodes = BTreeSet::new();
        for p in placements {
            let Some(node) = self.nodes.get(&p.node_id) else {
                return bad(format!("node {} is not registered", p.node_id));
            };
            if !seen_nodes.insert(&p.node_id) {
                return bad(format!("node {} appears twice", node.name));
            }
            if node.state != NodeState::Ready {
                return bad(format!("node {} is {}", node.name, node.state.as_str()));
            }
            if node.compute != run.spec.compute {
                return bad(format!(
                    "node {} is not in compute {}",
                    node.name, run.spec.compute
                ));
            }
            if let Some((k, v)) = run
                .spec
                .node_selector
                .iter()
                .find(|(k, v)| node.labels.get(*k) != Some(*v))
            {
                return bad(format!("node {} lacks label {k}={v}", node.name));
            }
            if p.resources != run.spec.resources.with_gpus(p.gpus.len() as u32)
                || p.gpus.len() as u32 != run.spec.resources.gpus
            {
                return bad(format!(
                    "resources on node {} differ from the run's request",
                    node.name
                ));
            }
            let mut free = node.capacity_resources();
            free.sub(&node.allocated);
            if (node.capacity.cpu_millis > 0 && p.resources.cpu_millis > free.cpu_millis)
                || (node.capacity.memory_bytes > 0 && p.resources.memory_bytes > free.memory_bytes)
            {
                return bad(format!("node {} lacks free CPU or memory", node.name));
            }
            let mut gpus = BTreeSet::new();
            for g in &p.gpus {
                if !node.capacity.gpus.iter().any(|x| x.uuid == *g) {
                    return bad(format!("node {} has no GPU {g}", node.name));
                }
                if node.allocated_gpus.contains(g) || !gpus.insert(g) {
                    return bad(format!("GPU {g} on node {} is already assigned", node.name));
                }
            }
        }
        let need = QuotaUsage::of_run(&run.spec.resources, run.spec.instance_count);
        if let Some(target) = self.computes.get(&run.spec.compute)
            && let Err(why) = target
                .spec
                .quota
                .admits(&self.quota_usage(&run.spec.compute), &need)
        {
            return bad(why);
        }
        let master_port = (run.spec.instance_count > 1 || run.spec.distribution.is_some())
            .then(|| self.master_port_for(placements));
        // Only ranks on several nodes talk to each other's agents.
        let secret = secret.filter(|_| run.spec.instance_count > 1);
        // Validated: now mutate.
        let run = self.runs.get_mut(run_id).expect("checked above");
        let key = queue_key(run);
        dequeue(&mut self.queue, &mut self.queued, &key);
        run.state = RunState::Scheduled;
        run.not_before = None;
        run.message = None;
        run.attempts.push(Attempt {
            number: attempt,
            placements: placements.to_vec(),
            state: AttemptState::Scheduled,
            placed_at: at,
            started_at: None,
            finished_at: None,
            exit_code: None,
            message: None,
            rank_ends: Default::default(),
            outputs: None,
            preempted_for: None,
            logs: BTreeMap::new(),
            metrics: None,
            master_port,
            secret: secret.map(str::to_string),
            resumed_from: run.checkpoint.clone(),
        });
        let run = &self.runs[run_id];
        self.active
            .0
            .entry(run.spec.compute.clone())
            .or_default()
            .add(run);
        for p in placements {
            let node = self.nodes.get_mut(&p.node_id).expect("checked above");
            node.allocated.add(&p.resources);
            node.allocated_gpus.extend(p.gpus.iter().cloned());
            node.attempts.insert((run_id.to_string(), attempt));
            node.idle_since = None;
        }
        Ok(Applied::Done)
    }

    /// The lowest free port for a new attempt on these nodes (distributed.rs).
    fn master_port_for(&self, placements: &[Placement]) -> u16 {
        let used = placements
            .iter()
            .filter_map(|p| self.nodes.get(&p.node_id))
            .flat_map(|n| n.attempts.iter())
            .filter_map(|(run_id, number)| {
                let run = self.runs.get(run_id)?;
                run.attempts
                    .get(number.checked_sub(1)? as usize)?
                    .master_port
            });
        crate::distributed::choose_master_port(used)
    }

    fn preempt(
        &mut self,
        run_id: &str,
        attempt: u32,
        for_run: &str,
    ) -> Result<Applied, ApplyError> {
        let bad = |m: String| {
            Err(ApplyError::InvalidPlacement(format!(
                "preemption of run {run_id}: {m}"
            )))
        };
        let preemptor = self
            .runs
            .get(for_run)
            .ok_or_else(|| ApplyError::UnknownRun(for_run.to_string()))?;
        let run = self
            .runs
            .get(run_id)
            .ok_or_else(|| ApplyError::UnknownRun(run_id.to_string()))?;
        let current = run.current_attempt();
        if !run.state.is_active()
            || current
                .is_none_or(|a| a.number != attempt || matches!(a.state, AttemptState::Ended(_)))
        {
            return bad(format!("attempt {attempt} is not its active attempt"));
        }
        if run.cancel_requested {
            return bad("it is being canceled already".to_string());
        }
        if let Some(other) = &run.preempt_requested {
            return bad(format!("it is being preempted for run {other} already"));
        }
        if preemptor.state != RunState::Queued {
            return bad(format!(
                "run {for_run} is {}, not queued",
                preemptor.state.as_str()
            ));
        }
        if preemptor.spec.priority <= run.spec.priority {
            return bad(format!(
                "run {for_run} has priority {}, not higher than {}",
                preemptor.spec.priority, run.spec.priority
            ));
        }
        if preemptor.spec.compute != run.spec.compute {
            return bad(format!(
                "run {for_run} targets compute {}, not {}",
                preemptor.spec.compute, run.spec.compute
            ));
        }
        // Validated: now mutate.
        let run = self.runs.get_mut(run_id).expect("checked above");
        if let Some(summary) = self.active.0.get_mut(&run.spec.compute) {
            summary.stopping(run.seq, Some(for_run));
        }
        run.preempt_requested = Some(for_run.to_string());
        run.message = Some(format!(
            "preempted for higher-priority run {for_run}; stopping"
        ));
        let current = run.attempts.last_mut().expect("checked above");
        current.preempted_for = Some(for_run.to_string());
        Ok(Applied::Done)
    }

    fn report(
        &mut self,
        run_id: &str,
        attempt: u32,
        node_id: &str,
        report: &AttemptReport,
        at: Millis,
    ) -> Result<Applied, ApplyError> {
        let run = self
            .runs
            .get_mut(run_id)
            .ok_or_else(|| ApplyError::UnknownRun(run_id.to_string()))?;
        let stale = Applied::Stale {
            run_id: run_id.to_string(),
            attempt,
        };
        let Some(current) = run.attempts.last_mut() else {
            return Ok(stale);
        };
        if current.number != attempt || matches!(current.state, AttemptState::Ended(_)) {
            return Ok(stale);
        }
        let Some(rank) = current.placements.iter().position(|p| p.node_id == node_id) else {
            return Ok(stale);
        };
        let rank = rank as u32;
        // An attempt being preempted ends as Preempted however it stops (a process that
        // exits 0 on SIGTERM has not finished its work); a user's cancel still wins.
        let preempted = (!run.cancel_requested)
            .then(|| run.preempt_requested.clone())
            .flatten();
        match report {
            AttemptReport::Preparing => {
                if current.state == AttemptState::Scheduled {
                    current.state = AttemptState::Preparing;
                    run.state = RunState::Preparing;
                }
                Ok(Applied::Done)
            }
            AttemptReport::Running => {
                if matches!(
                    current.state,
                    AttemptState::Scheduled | AttemptState::Preparing
                ) {
                    current.state = AttemptState::Running;
                    current.started_at = Some(at);
                    run.state = RunState::Running;
                    run.started_at.get_or_insert(at);
                }
                Ok(Applied::Done)
            }
            AttemptReport::Ended {
                end,
                exit_code,
                message,
                outputs,
            } => {
                let (end, message) = match &preempted {
                    Some(for_run) => (
                        &AttemptEnd::Preempted,
                        Some(format!("preempted for higher-priority run {for_run}")),
                    ),
                    None => (end, message.clone()),
                };
                if current.rank_ends.contains_key(&rank) {
                    return Ok(stale);
                }
                current.rank_ends.insert(
                    rank,
                    RankEnd {
                        end: *end,
                        exit_code: *exit_code,
                    },
                );
                if rank == 0 && outputs.is_some() {
                    current.outputs = outputs.clone();
                }
                let all_ended = current.rank_ends.len() == current.placements.len();
                // A rank that did not complete ends the whole attempt (no hung survivors);
                // its peers are stopped by their agents when they see the attempt is over.
                if *end != AttemptEnd::Completed || all_ended {
                    let code = if *end == AttemptEnd::Completed {
                        current.rank_ends.get(&0).and_then(|r| r.exit_code)
                    } else {
                        *exit_code
                    };
                    let message = if current.placements.len() > 1 && *end != AttemptEnd::Completed {
                        Some(format!(
                            "rank {rank}: {}",
                            message.clone().unwrap_or_else(|| end.as_str().to_string())
                        ))
                    } else {
                        message.clone()
                    };
                    self.end_attempt(run_id, attempt, *end, code, message, outputs.clone(), at);
                }
                Ok(Applied::Done)
            }
        }
    }

    /// Ends an active attempt: releases its resources and moves the run on (terminal, or
    /// requeued as a new attempt for Preempted/NodeLost while attempts remain).
    #[allow(clippy::too_many_arguments)]
    fn end_attempt(
        &mut self,
        run_id: &str,
        attempt: u32,
        end: AttemptEnd,
        exit_code: Option<i32>,
        message: Option<String>,
        outputs: Option<String>,
        at: Millis,
    ) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let Some(current) = run.attempts.last_mut() else {
            return;
        };
        if current.number != attempt || matches!(current.state, AttemptState::Ended(_)) {
            return;
        }
        if let Some(summary) = self.active.0.get_mut(&run.spec.compute)
            && summary.remove(run.seq)
        {
            self.active.0.remove(&run.spec.compute);
        }
        run.preempt_requested = None;
        current.state = AttemptState::Ended(end);
        // The ranks' shared secret served only while they ran; an ended attempt (kept in
        // the state, snapshots and archives for good) does not carry it.
        current.secret = None;
        current.finished_at = Some(at);
        current.exit_code = exit_code;
        current.message = message.clone();
        if current.outputs.is_none() {
            current.outputs = outputs;
        }
        for p in &current.placements {
            if let Some(node) = self.nodes.get_mut(&p.node_id) {
                node.allocated.sub(&p.resources);
                for g in &p.gpus {
                    node.allocated_gpus.remove(g);
                }
                node.attempts.remove(&(run_id.to_string(), attempt));
                if node.attempts.is_empty() {
                    node.idle_since = Some(at);
                }
            }
        }
        run.exit_code = exit_code;
        let terminal = |run: &mut Run, state: RunState, message: Option<String>| {
            run.state = state;
            run.finished_at = Some(at);
            run.message = message;
        };
        if run.cancel_requested {
            let m = run
                .message
                .clone()
                .map(|m| m.trim_end_matches("; stopping").to_string());
            terminal(run, RunState::Canceled, m);
            return;
        }
        match end {
            AttemptEnd::Completed => {
                let archive = run.attempts.last().and_then(|a| a.outputs.clone());
                let note = register_outputs(&mut self.data_assets, run, archive.as_deref(), at);
                terminal(run, RunState::Completed, message.or(note));
            }
            AttemptEnd::Failed => terminal(run, RunState::Failed, message),
            AttemptEnd::Canceled => terminal(run, RunState::Canceled, message),
            AttemptEnd::TimedOut => terminal(run, RunState::TimedOut, message),
            AttemptEnd::Preempted | AttemptEnd::NodeLost => {
                let why = message.unwrap_or_else(|| end.as_str().to_string());
                if run.attempt_number() >= run.spec.max_attempts {
                    terminal(
                        run,
                        RunState::Failed,
                        Some(format!(
                            "attempt {attempt} ended: {why}; max_attempts ({}) reached",
                            run.spec.max_attempts
                        )),
                    );
                } else {
                    let backoff = REQUEUE_BACKOFF_MS
                        .saturating_mul(1 << (attempt.saturating_sub(1)).min(16))
                        .min(MAX_REQUEUE_BACKOFF_MS);
                    run.state = RunState::Queued;
                    run.not_before = Some(at + backoff);
                    let how = if run.checkpoint.is_some() {
                        "resuming from its checkpoint"
                    } else {
                        "restarting from scratch"
                    };
                    run.message = Some(format!(
                        "attempt {attempt} ended: {why}; {how} as attempt {}",
                        attempt + 1
                    ));
                    enqueue(&mut self.queue, &mut self.queued, run);
                }
            }
        }
    }
}

/// Registers a completed run's named outputs (`outputs.X.name`) as data assets of its
/// workspace: each a folder of its outputs archive, at the version asked for, or one more
/// than the latest numbered version. A version that exists already is left as it is; the
/// returned note says so (it becomes the run's message).
fn register_outputs(
    assets: &mut BTreeMap<String, Vec<crate::data::DataAsset>>,
    run: &Run,
    archive: Option<&str>,
    at: Millis,
) -> Option<String> {
    use crate::data::{DataAsset, DataSource};
    let mut notes = Vec::new();
    for (output, (name, version)) in &run.spec.output_assets {
        let Some(archive) = archive else {
            notes.push(format!(
                "output {output} was not registered as {name}: the run kept no outputs"
            ));
            continue;
        };
        let versions = assets
            .entry(crate::data::scoped(&run.spec.workspace, name))
            .or_default();
        let version = version.clone().unwrap_or_else(|| {
            let latest = versions
                .iter()
                .filter_map(|a| a.version.parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            (latest + 1).to_string()
        });
        if versions.iter().any(|a| a.version == version) {
            notes.push(format!(
                "output {output} was not registered: data asset {name}:{version} already exists"
            ));
            continue;
        }
        versions.push(DataAsset {
            name: name.clone(),
            version,
            workspace: run.spec.workspace.clone(),
            kind: crate::spec::OutputKind::UriFolder,
            source: DataSource::Output {
                archive: archive.to_string(),
                folder: output.clone(),
            },
            description: Some(format!("output {output} of run {}", run.id)),
            created_at: at,
            created_by: format!("run {}", run.id),
        });
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}

/// Puts a queued run in the queue, with its summary for the scheduler beside it.
fn enqueue(
    queue: &mut BTreeSet<QueueKey>,
    queued: &mut Derived<BTreeMap<String, BTreeMap<QueueKey, Queued>>>,
    run: &Run,
) {
    let key = queue_key(run);
    queued
        .0
        .entry(key.compute.clone())
        .or_default()
        .insert(key.clone(), Queued::of(run));
    queue.insert(key);
}

/// Takes a run out of the queue.
fn dequeue(
    queue: &mut BTreeSet<QueueKey>,
    queued: &mut Derived<BTreeMap<String, BTreeMap<QueueKey, Queued>>>,
    key: &QueueKey,
) {
    if let Some(q) = queued.0.get_mut(&key.compute) {
        q.remove(key);
        if q.is_empty() {
            queued.0.remove(&key.compute);
        }
    }
    queue.remove(key);
}

/// The queue position of a run.
pub(crate) fn queue_key(run: &Run) -> QueueKey {
    QueueKey {
        neg_priority: -(run.spec.priority as i64),
        seq: run.seq,
        run_id: run.id.clone(),
        compute: run.spec.compute.clone(),
    }
}

impl Node {
    /// The node's capacity as plain resources (GPU count).
    pub fn capacity_resources(&self) -> crate::Resources {
        crate::Resources {
            cpu_millis: self.capacity.cpu_millis,
            memory_bytes: self.capacity.memory_bytes,
            gpus: self.capacity.gpus.len() as u32,
        }
    }
}
