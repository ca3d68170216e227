//! `State::sanity_check`: the invariants of DESIGN.md section 13 that the state alone can show.

use std::collections::{BTreeMap, BTreeSet};

use crate::resources::Resources;
use crate::state::apply::queue_key;
use crate::state::{AttemptState, NodeState, RunState, State};

impl State {
    /// Checks the state's internal consistency; tests call it after every step.
    /// Returns the first violation found, in words.
    pub fn sanity_check(&self) -> Result<(), String> {
        let mut allocated: BTreeMap<&str, Resources> = BTreeMap::new();
        let mut gpu_owner: BTreeMap<(&str, &str), (&str, u32)> = BTreeMap::new();
        let mut node_attempts: BTreeMap<&str, BTreeSet<(String, u32)>> = BTreeMap::new();
        for (id, run) in &self.runs {
            if id != &run.id {
                return Err(format!("run {id} is stored under another id ({})", run.id));
            }
            if !self.computes.contains_key(&run.spec.compute) && !run.state.is_terminal() {
                return Err(format!("unfinished run {id} targets a missing compute"));
            }
            let queued = self.queue.contains(&queue_key(run));
            if queued != (run.state == RunState::Queued) {
                return Err(format!("run {id} is {:?} but queued={queued}", run.state));
            }
            if run.state.is_terminal() != run.finished_at.is_some() {
                return Err(format!(
                    "run {id} is {:?} with finished_at {:?}",
                    run.state, run.finished_at
                ));
            }
            // A checkpoint comes from one of the run's attempts, and an attempt resumes
            // only from an earlier attempt's.
            if let Some(c) = &run.checkpoint
                && (c.attempt == 0 || c.attempt > run.attempt_number())
            {
                return Err(format!(
                    "run {id}: its checkpoint is of attempt {}, but it has {} attempt(s)",
                    c.attempt,
                    run.attempt_number()
                ));
            }
            if let Some(a) = run.attempts.iter().find(|a| {
                a.resumed_from
                    .as_ref()
                    .is_some_and(|c| c.attempt >= a.number)
            }) {
                return Err(format!(
                    "run {id}: attempt {} resumed from a checkpoint of its own or a later attempt",
                    a.number
                ));
            }
            // Invariant 4: at most one active attempt, and it is the last one.
            for (i, a) in run.attempts.iter().enumerate() {
                if a.number != i as u32 + 1 {
                    return Err(format!("run {id}: attempt {} at position {i}", a.number));
                }
                let active = !matches!(a.state, AttemptState::Ended(_));
                if active && i + 1 != run.attempts.len() {
                    return Err(format!(
                        "run {id}: attempt {} is active but not the latest",
                        a.number
                    ));
                }
                if active != run.state.is_active() && i + 1 == run.attempts.len() {
                    return Err(format!(
                        "run {id} is {:?} but its latest attempt is {:?}",
                        run.state, a.state
                    ));
                }
                if let Some((rank, _)) = a.logs.range(a.placements.len() as u32..).next() {
                    return Err(format!(
                        "run {id}: attempt {} has a sealed log of rank {rank} but {} rank(s)",
                        a.number,
                        a.placements.len()
                    ));
                }
                if !active {
                    continue;
                }
                for p in &a.placements {
                    allocated
                        .entry(p.node_id.as_str())
                        .or_default()
                        .add(&p.resources);
                    node_attempts
                        .entry(p.node_id.as_str())
                        .or_default()
                        .insert((id.clone(), a.number));
                    // Invariant 2: a GPU is assigned to at most one active attempt.
                    for g in &p.gpus {
                        if let Some(prev) = gpu_owner
                            .insert((p.node_id.as_str(), g.as_str()), (id.as_str(), a.number))
                        {
                            return Err(format!(
                                "GPU {g} on {} assigned to {prev:?} and {id}/{}",
                                p.node_id, a.number
                            ));
                        }
                    }
                }
            }
            if run.state.is_active() && run.attempts.is_empty() {
                return Err(format!("run {id} is {:?} without an attempt", run.state));
            }
            if run.attempt_number() > run.spec.max_attempts {
                return Err(format!("run {id} has more attempts than max_attempts"));
            }
            // Preemption: requested only of an active attempt, which records it, for a run
            // of strictly higher priority on the same compute target.
            if let Some(for_run) = &run.preempt_requested {
                let current = run.current_attempt();
                if !run.state.is_active()
                    || current.is_none_or(|a| a.preempted_for.as_ref() != Some(for_run))
                {
                    return Err(format!(
                        "run {id} is {:?} with preemption requested for {for_run}, but its current attempt does not record it",
                        run.state
                    ));
                }
                let Some(preemptor) = self.runs.get(for_run) else {
                    return Err(format!("run {id} is preempted for unknown run {for_run}"));
                };
                if preemptor.spec.priority <= run.spec.priority
                    || preemptor.spec.compute != run.spec.compute
                {
                    return Err(format!(
                        "run {id} (priority {}) is preempted for {for_run} (priority {}, compute {})",
                        run.spec.priority, preemptor.spec.priority, preemptor.spec.compute
                    ));
                }
            } else if run.state.is_active()
                && run
                    .current_attempt()
                    .is_some_and(|a| a.preempted_for.is_some())
            {
                return Err(format!(
                    "run {id}: its active attempt records a preemption the run does not"
                ));
            }
        }
        if self.index_by_seq() != self.by_seq.0 {
            return Err("the index of the runs by submission number differs from the runs".into());
        }
        if self.summarize_queue() != *self.queued() {
            return Err("the scheduler's summary of the queue differs from the queue".into());
        }
        // Quotas: the cached summary matches a recount, and no quota is exceeded.
        let active = self.summarize_active();
        if active != self.active.0 {
            return Err(format!(
                "cached summary of active runs {:?} != recount {active:?}",
                self.active.0
            ));
        }
        for (compute, summary) in &active {
            if let Some(target) = self.computes.get(compute)
                && let Err(why) = target
                    .spec
                    .quota
                    .admits(&crate::compute::QuotaUsage::default(), &summary.usage)
            {
                return Err(format!("compute {compute} exceeds its quota: {why}"));
            }
        }
        for key in &self.queue {
            if self
                .runs
                .get(&key.run_id)
                .is_none_or(|r| r.state != RunState::Queued)
            {
                return Err(format!(
                    "queue holds {} which is not a queued run",
                    key.run_id
                ));
            }
        }
        for (key, run_id) in &self.idempotency {
            if self
                .runs
                .get(run_id)
                .and_then(|r| r.idempotency_key.as_deref())
                != Some(key.as_str())
            {
                return Err(format!(
                    "idempotency key {key} points at {run_id} which does not carry it"
                ));
            }
        }
        let mut names = BTreeSet::new();
        for (id, node) in &self.nodes {
            if !names.insert(node.name.as_str()) {
                return Err(format!("node name {} used twice", node.name));
            }
            let expected = allocated.remove(id.as_str()).unwrap_or_default();
            if node.allocated != expected {
                return Err(format!(
                    "node {id}: allocated {:?}, active attempts need {expected:?}",
                    node.allocated
                ));
            }
            let expected_attempts = node_attempts.remove(id.as_str()).unwrap_or_default();
            if node.attempts != expected_attempts {
                return Err(format!(
                    "node {id}: attempts {:?} != {expected_attempts:?}",
                    node.attempts
                ));
            }
            let gpus: BTreeSet<String> = gpu_owner
                .range((id.as_str(), "")..)
                .take_while(|((n, _), _)| *n == id.as_str())
                .map(|((_, g), _)| g.to_string())
                .collect();
            if node.allocated_gpus != gpus {
                return Err(format!(
                    "node {id}: allocated GPUs {:?} != {gpus:?}",
                    node.allocated_gpus
                ));
            }
            if matches!(node.state, NodeState::Lost | NodeState::Evicted)
                && !node.attempts.is_empty()
            {
                return Err(format!(
                    "node {id} is {:?} but still holds attempts",
                    node.state
                ));
            }
        }
        if self.servers.contains_key(&0) {
            return Err("a server address is recorded for server id 0".to_string());
        }
        if let Some((node, _)) = allocated.into_iter().next() {
            return Err(format!(
                "an active attempt is placed on unknown node {node}"
            ));
        }
        self.check_scaling()?;
        self.check_sweeps()?;
        self.check_pipelines()?;
        Ok(())
    }

    /// Autoscaling: a busy node is not idle, and the autoscaler's records belong to
    /// existing autoscaled targets and stay bounded.
    fn check_scaling(&self) -> Result<(), String> {
        for (id, node) in &self.nodes {
            if !node.attempts.is_empty() && node.idle_since.is_some() {
                return Err(format!("node {id} holds attempts but is marked idle"));
            }
        }
        for (compute, scaling) in &self.scaling {
            if !self.computes.contains_key(compute) {
                return Err(format!("scaling records for missing compute {compute}"));
            }
            if scaling.history.len() > super::SCALE_HISTORY {
                return Err(format!("compute {compute}: scaling history too long"));
            }
        }
        Ok(())
    }
}
