//! The scheduler: `schedule(&State, now) -> Vec<Decision>`.
//!
//! Decisions are values; the leader proposes each through Raft as a command, so every
//! replica sees the same placements. This first scheduler places queued runs in queue order
//! (priority, then submission) first-fit on CPU, memory and GPUs by UUID, and places a
//! gang (`instance_count > 1`) only when all its instances fit at once.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::Millis;
use crate::resources::Resources;
use crate::state::{Command, NodeState, State};

/// One instance of an attempt on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The node.
    pub node_id: String,
    /// GPUs assigned, by UUID.
    pub gpus: Vec<String>,
    /// What the instance holds on the node.
    pub resources: Resources,
}

/// A scheduler decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start `attempt` of `run_id` with these placements (rank order).
    Place {
        /// The run.
        run_id: String,
        /// Its next attempt number.
        attempt: u32,
        /// One per instance.
        placements: Vec<Placement>,
    },
}

impl Decision {
    /// The command that carries this decision through Raft.
    pub fn into_command(self, at: Millis) -> Command {
        match self {
            Decision::Place {
                run_id,
                attempt,
                placements,
            } => Command::PlaceRun {
                run_id,
                attempt,
                placements,
                at,
            },
        }
    }
}

struct Free {
    node_id: String,
    cpu_limited: bool,
    mem_limited: bool,
    free: Resources,
    gpus: Vec<String>,
}

impl Free {
    fn fits(&self, want: &Resources) -> bool {
        (!self.cpu_limited || want.cpu_millis <= self.free.cpu_millis)
            && (!self.mem_limited || want.memory_bytes <= self.free.memory_bytes)
            && want.gpus as usize <= self.gpus.len()
    }

    fn take(&mut self, want: &Resources) -> Placement {
        self.free.sub(want);
        let gpus: Vec<String> = self.gpus.drain(..want.gpus as usize).collect();
        Placement {
            node_id: self.node_id.clone(),
            gpus,
            resources: *want,
        }
    }
}

/// Computes placements for queued runs. Pure: same state and `now`, same decisions.
/// A node offering 0 CPU or 0 memory does not limit that resource.
pub fn schedule(state: &State, now: Millis) -> Vec<Decision> {
    // Free resources of the ready nodes, grouped by compute target, in id order.
    let mut free: BTreeMap<&str, Vec<Free>> = BTreeMap::new();
    for node in state.nodes.values().filter(|n| n.state == NodeState::Ready) {
        let mut f = node.capacity_resources();
        f.sub(&node.allocated);
        let gpus = node
            .capacity
            .gpus
            .iter()
            .map(|g| g.uuid.clone())
            .filter(|g| !node.allocated_gpus.contains(g))
            .collect();
        free.entry(node.compute.as_str()).or_default().push(Free {
            node_id: node.id.clone(),
            cpu_limited: node.capacity.cpu_millis > 0,
            mem_limited: node.capacity.memory_bytes > 0,
            free: f,
            gpus,
        });
    }
    let mut decisions = Vec::new();
    let mut full: BTreeSet<&str> = BTreeSet::new();
    for key in &state.queue {
        let compute = key.compute.as_str();
        if full.contains(compute) {
            continue;
        }
        let Some(nodes) = free.get_mut(compute) else {
            continue;
        };
        let Some(run) = state.runs.get(&key.run_id) else {
            continue;
        };
        if run.not_before.is_some_and(|t| t > now) {
            continue;
        }
        let want = run.spec.resources;
        let count = run.spec.instance_count as usize;
        let fitting: Vec<usize> = nodes
            .iter()
            .enumerate()
            .filter(|(_, f)| f.fits(&want))
            .map(|(i, _)| i)
            .take(count)
            .collect();
        if fitting.len() < count {
            if !nodes.iter().any(|f| f.fits(&Resources::default())) {
                full.insert(compute);
            }
            continue;
        }
        let placements = fitting.into_iter().map(|i| nodes[i].take(&want)).collect();
        decisions.push(Decision::Place {
            run_id: run.id.clone(),
            attempt: run.attempt_number() + 1,
            placements,
        });
    }
    decisions
}
