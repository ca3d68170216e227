//! The autoscaler (DESIGN.md section 7): from the state alone, and a clock passed in,
//! decide which nodes each autoscaled compute target should gain or lose.
//!
//! - **Scale up** to cover waiting demand the current nodes cannot: the queued runs of the
//!   target (in queue order, each instance on its own node) are laid onto the free
//!   resources of its ready nodes, then onto the nodes already being provisioned, then
//!   onto new nodes, never above `max_instances`. A new node is assumed to look like the
//!   target's registered nodes; with none to go by, one new node per waiting instance.
//!   Runs that can never start (their quota forbids it, or they do not fit a whole node)
//!   ask for nothing. Below `min_instances`, nodes are added up to it.
//! - **Scale down** a node the autoscaler provisioned once it has been idle (nothing
//!   active or placed on it) for the full `idle_time_before_scale_down` — counted from its
//!   registration or its last attempt's end, so a node started for demand is never released
//!   before it has idled the full time — never below `min_instances`, and never while a
//!   waiting run could take it. A provisioned node that is lost or evicted, or that did
//!   not join within [`PROVISION_TIMEOUT_MS`], is released too (and replaced if needed).
//!
//! Decisions become [`Command::ScaleCompute`]; applying one re-checks the bounds, so a
//! stale decision (a second leader, a race) is rejected instead of provisioning twice.

use std::collections::BTreeMap;

use crate::Millis;
use crate::compute::QuotaUsage;
use crate::resources::Resources;
use crate::state::{Command, NodeState, ProvisionPhase, Scaling, State};

/// A requested node whose agent has not registered within this long is given up.
pub const PROVISION_TIMEOUT_MS: Millis = 300_000;

/// One compute target's scale decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleDecision {
    /// The compute target.
    pub compute: String,
    /// New nodes to provision (their names).
    pub add: Vec<String>,
    /// Nodes to release (their names).
    pub remove: Vec<String>,
    /// Why, in words.
    pub reason: String,
}

impl ScaleDecision {
    /// The command that records this decision.
    pub fn into_command(self, at: Millis) -> Command {
        Command::ScaleCompute {
            compute: self.compute,
            add: self.add,
            remove: self.remove,
            reason: self.reason,
            at,
        }
    }
}

/// The name of the `index`th node the autoscaler provisions for `compute`.
pub fn provisioned_node_name(compute: &str, index: u64) -> String {
    format!("muster-{compute}-{index}")
}

/// Decides, for every autoscaled compute target, what to add and remove now.
pub fn autoscale(state: &State, now: Millis) -> Vec<ScaleDecision> {
    state
        .computes
        .keys()
        .filter_map(|name| autoscale_compute(state, name, now))
        .collect()
}

/// A place one waiting instance could go.
#[derive(Debug, Clone)]
struct Slot {
    /// What is free; `None` for a node of unknown shape (takes any one instance).
    free: Option<Resources>,
    labels: BTreeMap<String, String>,
    /// Taken by an instance of an unknown shape.
    full: bool,
}

impl Slot {
    fn takes(&self, want: &Resources, selector: &BTreeMap<String, String>) -> bool {
        !self.full
            && selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
            && self.free.is_none_or(|f| fits(&f, want))
    }

    fn take(&mut self, want: &Resources) {
        match &mut self.free {
            Some(f) => f.sub(want),
            None => self.full = true,
        }
    }
}

fn fits(free: &Resources, want: &Resources) -> bool {
    free.cpu_millis >= want.cpu_millis
        && free.memory_bytes >= want.memory_bytes
        && free.gpus >= want.gpus
}

/// Decides for one compute target, or `None` when nothing is to change.
pub fn autoscale_compute(state: &State, compute: &str, now: Millis) -> Option<ScaleDecision> {
    let target = state.computes.get(compute)?;
    let (min, max) = target.spec.scale_bounds()?;
    let empty = Scaling::default();
    let scaling = state.scaling.get(compute).unwrap_or(&empty);
    if scaling.deleting {
        return None;
    }
    // A stopped instance lets its node go as soon as no run holds it.
    let idle_ms = if target.spec.stopped {
        0
    } else {
        target
            .spec
            .idle_time_before_scale_down_s
            .saturating_mul(1000)
    };
    let nodes: Vec<&crate::Node> = state
        .nodes
        .values()
        .filter(|n| n.compute == compute)
        .collect();
    let registered = |name: &str| nodes.iter().find(|n| n.name == name).copied();

    // What a new node will look like: the first registered node's capacity and labels.
    let shape = nodes
        .iter()
        .filter(|n| scaling.nodes.contains_key(&n.name))
        .chain(nodes.iter())
        .next()
        .map(|n| (n.capacity_resources(), n.labels.clone()));

    // Live nodes (what max/min count) and the slots waiting instances can use.
    let mut live: u64 = 0;
    let mut slots: Vec<Slot> = Vec::new();
    for n in &nodes {
        let owned = scaling.nodes.get(&n.name);
        if owned.is_some_and(|p| p.phase == ProvisionPhase::Releasing) {
            continue;
        }
        if owned.is_none() && !matches!(n.state, NodeState::Ready | NodeState::Draining) {
            continue;
        }
        live += 1;
        if n.state == NodeState::Ready {
            let mut free = n.capacity_resources();
            free.cpu_millis = free.cpu_millis.saturating_sub(n.allocated.cpu_millis);
            free.memory_bytes = free.memory_bytes.saturating_sub(n.allocated.memory_bytes);
            free.gpus = free.gpus.saturating_sub(n.allocated_gpus.len() as u32);
            slots.push(Slot {
                free: Some(free),
                labels: n.labels.clone(),
                full: false,
            });
        }
    }
    let new_slot = || Slot {
        free: shape.as_ref().map(|s| s.0),
        labels: shape.as_ref().map(|s| s.1.clone()).unwrap_or_default(),
        full: false,
    };
    let mut release: Vec<(String, String)> = Vec::new();
    for (name, p) in &scaling.nodes {
        if p.phase == ProvisionPhase::Releasing {
            continue;
        }
        match registered(name) {
            Some(n) if matches!(n.state, NodeState::Lost | NodeState::Evicted) => {
                // Counted as live above; it goes now, and a replacement is decided below.
                live -= 1;
                release.push((
                    name.clone(),
                    format!("node {name} was {}", n.state.as_str()),
                ));
            }
            Some(_) => {}
            None if now.saturating_sub(p.requested_at) >= PROVISION_TIMEOUT_MS => {
                release.push((
                    name.clone(),
                    format!(
                        "node {name} did not join within {} s",
                        PROVISION_TIMEOUT_MS / 1000
                    ),
                ));
            }
            None => {
                live += 1;
                slots.push(new_slot());
            }
        }
    }

    // Lay the waiting demand onto the slots, adding nodes as needed (never above max).
    let mut added: u64 = 0;
    let mut covered_runs = 0u32;
    let mut waiting = 0u32;
    let mut demand: Vec<(Resources, &BTreeMap<String, String>)> = Vec::new();
    // A stopped instance's waiting runs ask for nothing: they wait for a start.
    let queued = state.queued_on(compute).filter(|_| !target.spec.stopped);
    for run in queued {
        let want = run.spec.resources;
        let selector = &run.spec.node_selector;
        if target
            .spec
            .quota
            .never_admits(&QuotaUsage::of_run(&want, run.spec.instance_count))
            .is_some()
        {
            continue;
        }
        if let Some((cap, labels)) = &shape
            && (!fits(cap, &want) || !selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
        {
            continue;
        }
        waiting += 1;
        demand.push((want, selector));
        let mut trial = slots.clone();
        let mut extra = 0u64;
        let mut used = vec![false; trial.len()];
        for _ in 0..run.spec.instance_count.max(1) {
            match (0..trial.len()).find(|&i| !used[i] && trial[i].takes(&want, selector)) {
                Some(i) => {
                    trial[i].take(&want);
                    used[i] = true;
                }
                None => {
                    let mut s = new_slot();
                    s.take(&want);
                    trial.push(s);
                    used.push(true);
                    extra += 1;
                }
            }
        }
        if live + added + extra > max as u64 {
            continue;
        }
        slots = trial;
        added += extra;
        covered_runs += 1;
    }
    let mut reasons = Vec::new();
    if added > 0 {
        reasons.push(format!(
            "{waiting} waiting run(s) need {added} more node(s) ({covered_runs} covered)"
        ));
    }
    if live + added < min as u64 {
        let more = min as u64 - live - added;
        added += more;
        reasons.push(format!("min_instances is {min}"));
    }

    // Idle nodes past the idle time, oldest idle first, never below min, never one a
    // waiting run could take.
    let mut idle: Vec<(Millis, String)> = Vec::new();
    for (name, p) in &scaling.nodes {
        if p.phase == ProvisionPhase::Releasing {
            continue;
        }
        let Some(n) = registered(name) else { continue };
        if n.state != NodeState::Ready {
            continue;
        }
        let Some(since) = n.idle_since() else {
            continue;
        };
        if now.saturating_sub(since) < idle_ms {
            continue;
        }
        let cap = n.capacity_resources();
        let wanted = demand.iter().any(|(want, sel)| {
            fits(&cap, want) && sel.iter().all(|(k, v)| n.labels.get(k) == Some(v))
        });
        if !wanted {
            idle.push((since, name.clone()));
        }
    }
    idle.sort();
    let mut idle_released = Vec::new();
    if added == 0 {
        for (_, name) in idle {
            if live <= min as u64 {
                break;
            }
            live -= 1;
            idle_released.push(name);
        }
    }
    if !idle_released.is_empty() {
        reasons.push(if target.spec.stopped {
            "the instance is stopped".to_string()
        } else {
            format!(
                "idle for {} s or more",
                target.spec.idle_time_before_scale_down_s
            )
        });
    }
    for (name, why) in release {
        reasons.push(why);
        idle_released.push(name);
    }
    // Names never used before in this target, skipping any a node took by hand.
    let mut add: Vec<String> = Vec::new();
    let mut index = scaling.next_index;
    while (add.len() as u64) < added {
        let name = provisioned_node_name(compute, index);
        index += 1;
        if !scaling.nodes.contains_key(&name) && state.node_by_name(&name).is_none() {
            add.push(name);
        }
    }
    if add.is_empty() && idle_released.is_empty() {
        return None;
    }
    Some(ScaleDecision {
        compute: compute.to_string(),
        add,
        remove: idle_released,
        reason: reasons.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::compute::{ComputeKind, ComputeSpec, DockerProvisioner, Provisioner, Tier};
    use crate::resources::Capacity;
    use crate::schedule::schedule;
    use crate::spec::RunSpec;
    use crate::state::{AttemptEnd, AttemptReport, ProvisionOutcome, RunState};

    const C: &str = "gpus";

    /// A cluster with a docker provisioner, and a simulated provisioner and agents.
    struct Sim {
        state: State,
        now: Millis,
        cpus_per_node: u64,
        runs: u64,
    }

    impl Sim {
        fn new(kind: ComputeKind, min: u32, max: u32, idle_s: u64) -> Sim {
            let mut spec = ComputeSpec::new(C, kind);
            spec.min_instances = min;
            spec.max_instances = max;
            spec.idle_time_before_scale_down_s = idle_s;
            spec.provisioner = Provisioner::Docker(DockerProvisioner::default());
            let mut sim = Sim {
                state: State::default(),
                now: 1_000,
                cpus_per_node: 2,
                runs: 0,
            };
            sim.apply(Command::CreateCompute { spec, at: 1_000 });
            sim
        }

        fn apply(&mut self, c: Command) {
            self.state
                .apply(&c)
                .unwrap_or_else(|e| panic!("{c:?}: {e}"));
            self.state.sanity_check().unwrap();
        }

        fn submit(&mut self, cpus: u64, instances: u32) -> String {
            self.runs += 1;
            let id = format!("r{}", self.runs);
            let mut spec = RunSpec::new("train");
            spec.compute = C.into();
            spec.resources = Resources {
                cpu_millis: cpus * 1000,
                memory_bytes: 1 << 20,
                gpus: 0,
            };
            spec.instance_count = instances;
            self.apply(Command::SubmitRun {
                run_id: id.clone(),
                spec: Box::new(spec),
                idempotency_key: None,
                at: self.now,
            });
            id
        }

        /// The autoscaler's decision now, applied.
        fn scale(&mut self) -> Option<ScaleDecision> {
            let d = autoscale_compute(&self.state, C, self.now)?;
            self.apply(d.clone().into_command(self.now));
            Some(d)
        }

        /// What the provisioner and agents do: start requested nodes (their agents
        /// register), stop releasing ones.
        fn provision(&mut self) {
            let scaling = self.state.scaling.get(C).cloned().unwrap_or_default();
            let requested: Vec<String> = scaling
                .nodes
                .iter()
                .filter(|(_, p)| p.phase == ProvisionPhase::Requested)
                .map(|(n, _)| n.clone())
                .collect();
            let releasing: Vec<String> = scaling
                .nodes
                .iter()
                .filter(|(_, p)| p.phase == ProvisionPhase::Releasing)
                .map(|(n, _)| n.clone())
                .collect();
            if !requested.is_empty() {
                self.apply(Command::Provisioned {
                    compute: C.into(),
                    nodes: requested.clone(),
                    outcome: ProvisionOutcome::Launched,
                    message: None,
                    at: self.now,
                });
                for name in requested {
                    self.apply(Command::RegisterNode {
                        node_id: name.clone(),
                        name,
                        compute: C.into(),
                        capacity: Capacity {
                            cpu_millis: self.cpus_per_node * 1000,
                            memory_bytes: 1 << 30,
                            gpus: vec![],
                            max_runs: 0,
                        },
                        labels: BTreeMap::new(),
                        tier: Tier::Dedicated,
                        address: "127.0.0.1".into(),
                        at: self.now,
                    });
                }
            }
            if !releasing.is_empty() {
                self.apply(Command::Provisioned {
                    compute: C.into(),
                    nodes: releasing,
                    outcome: ProvisionOutcome::Released,
                    message: None,
                    at: self.now,
                });
            }
        }

        fn place(&mut self) {
            for d in schedule(&self.state, self.now).decisions {
                self.apply(d.into_command(self.now));
            }
        }

        fn finish(&mut self, run_id: &str) {
            let run = &self.state.runs[run_id];
            let attempt = run.attempt_number();
            let nodes: Vec<String> = run
                .current_attempt()
                .unwrap()
                .placements
                .iter()
                .map(|p| p.node_id.clone())
                .collect();
            for node_id in nodes {
                self.apply(Command::ReportAttempt {
                    run_id: run_id.into(),
                    attempt,
                    node_id,
                    report: AttemptReport::Ended {
                        end: AttemptEnd::Completed,
                        exit_code: Some(0),
                        message: None,
                        outputs: None,
                    },
                    at: self.now,
                });
            }
        }

        fn live(&self) -> u64 {
            let scaling = self.state.scaling.get(C).cloned().unwrap_or_default();
            crate::state::live_node_count(&self.state, C, &scaling)
        }

        fn node_names(&self) -> Vec<String> {
            self.state.nodes.values().map(|n| n.name.clone()).collect()
        }
    }

    #[test]
    fn grows_for_waiting_runs_up_to_max_counting_nodes_being_provisioned() {
        let mut sim = Sim::new(ComputeKind::Cluster, 0, 2, 5);
        assert_eq!(autoscale_compute(&sim.state, C, sim.now), None);
        sim.submit(2, 1);
        sim.submit(2, 1);
        sim.submit(2, 1);
        let d = sim.scale().unwrap();
        assert_eq!(d.add, vec!["muster-gpus-0", "muster-gpus-1"]);
        assert!(d.remove.is_empty());
        assert!(
            d.reason.contains("3 waiting run(s) need 2 more node(s)"),
            "{}",
            d.reason
        );
        // Requested but not yet joined: counted, so nothing more.
        assert_eq!(autoscale_compute(&sim.state, C, sim.now), None);
        // A decision applied twice (a second leader) is rejected: never above max.
        let again = Command::ScaleCompute {
            compute: C.into(),
            add: vec!["muster-gpus-9".into()],
            remove: vec![],
            reason: "stale".into(),
            at: sim.now,
        };
        assert!(sim.state.apply(&again).is_err());
        sim.provision();
        sim.place();
        assert_eq!(
            sim.state
                .runs
                .values()
                .filter(|r| r.state == RunState::Scheduled)
                .count(),
            2
        );
        assert_eq!(autoscale_compute(&sim.state, C, sim.now), None);
    }

    #[test]
    fn packs_onto_the_shape_of_known_nodes_and_skips_runs_that_never_fit() {
        let mut sim = Sim::new(ComputeKind::Cluster, 1, 4, 5);
        sim.cpus_per_node = 4;
        let d = sim.scale().unwrap();
        assert_eq!(d.add.len(), 1, "min_instances: {d:?}");
        assert!(d.reason.contains("min_instances"));
        sim.provision();
        // Four 2-CPU runs on 4-CPU nodes: the first node takes two, one more node the rest.
        for _ in 0..4 {
            sim.submit(2, 1);
        }
        // A run no node can ever take asks for nothing.
        sim.submit(8, 1);
        let d = sim.scale().unwrap();
        assert_eq!(d.add, vec!["muster-gpus-1"]);
        // A gang of 2 needs two distinct nodes.
        sim.provision();
        sim.place();
        sim.submit(1, 2);
        assert_eq!(sim.scale().unwrap().add.len(), 2);
    }

    #[test]
    fn shrinks_after_the_full_idle_time_never_below_min() {
        let mut sim = Sim::new(ComputeKind::Cluster, 1, 3, 5);
        let a = sim.submit(2, 1);
        let b = sim.submit(2, 1);
        let c = sim.submit(2, 1);
        sim.scale().unwrap();
        sim.provision();
        sim.place();
        sim.now += 60_000;
        for r in [&a, &b, &c] {
            sim.finish(r);
        }
        // Idle from now: nothing goes before the full idle time.
        sim.now += 4_999;
        assert_eq!(autoscale_compute(&sim.state, C, sim.now), None);
        sim.now += 1;
        let d = sim.scale().unwrap();
        assert_eq!(d.remove.len(), 2, "{d:?}");
        assert!(d.add.is_empty());
        assert!(d.reason.contains("idle for 5 s"), "{}", d.reason);
        // Drained right away, removed from the state once the provisioner stopped them.
        for name in &d.remove {
            assert_eq!(
                sim.state.node_by_name(name).unwrap().state,
                NodeState::Draining
            );
        }
        sim.provision();
        assert_eq!(sim.node_names().len(), 1);
        sim.now += 1_000_000;
        assert_eq!(autoscale_compute(&sim.state, C, sim.now), None);
        assert_eq!(sim.live(), 1);
        let history: Vec<&str> = sim.state.scaling[C]
            .history
            .iter()
            .map(|e| e.action.as_str())
            .collect();
        assert_eq!(history, ["scale_up", "launched", "scale_down", "released"]);
    }

    #[test]
    fn a_node_that_a_waiting_run_could_take_is_kept() {
        let mut sim = Sim::new(ComputeKind::Cluster, 0, 2, 5);
        sim.submit(1, 1);
        sim.scale().unwrap();
        sim.provision();
        // A gang of 3 can never be covered with max 2, but the idle node could take one
        // of its ranks: it is not released, however long it idles.
        let r = sim.submit(1, 3);
        sim.place();
        sim.finish("r1");
        sim.now += 3_600_000;
        let d = autoscale_compute(&sim.state, C, sim.now);
        assert!(d.as_ref().is_none_or(|d| d.remove.is_empty()), "{d:?}");
        sim.apply(Command::CancelRun {
            run_id: r,
            reason: None,
            at: sim.now,
        });
        assert_eq!(sim.scale().unwrap().remove, vec!["muster-gpus-0"]);
    }

    #[test]
    fn lost_and_never_joined_nodes_are_released_and_replaced() {
        let mut sim = Sim::new(ComputeKind::Cluster, 1, 1, 5);
        sim.scale().unwrap();
        sim.provision();
        sim.apply(Command::SetNodeState {
            node_id: "muster-gpus-0".into(),
            state: NodeState::Lost,
            reason: None,
            at: sim.now,
        });
        let d = sim.scale().unwrap();
        assert_eq!(d.remove, vec!["muster-gpus-0"]);
        assert_eq!(d.add, vec!["muster-gpus-1"]);
        // The replacement never joins: given up after the timeout, and replaced.
        sim.now += PROVISION_TIMEOUT_MS;
        let d = sim.scale().unwrap();
        assert_eq!(d.remove, vec!["muster-gpus-1"]);
        assert_eq!(d.add, vec!["muster-gpus-2"]);
        assert!(d.reason.contains("did not join"), "{}", d.reason);
    }

    #[test]
    fn instances_are_one_node_forever_and_static_or_attached_never_scale() {
        let mut sim = Sim::new(ComputeKind::Instance, 0, 0, 1);
        assert_eq!(sim.scale().unwrap().add, vec!["muster-gpus-0"]);
        sim.provision();
        sim.submit(2, 1);
        sim.submit(2, 1);
        sim.now += 3_600_000;
        assert_eq!(autoscale_compute(&sim.state, C, sim.now), None);
        for kind in [ComputeKind::Attached, ComputeKind::Cluster] {
            let mut s = State::default();
            let mut spec = ComputeSpec::new(C, kind);
            spec.max_instances = 3;
            s.apply(&Command::CreateCompute { spec, at: 1 }).unwrap();
            let mut run = RunSpec::new("x");
            run.compute = C.into();
            s.apply(&Command::SubmitRun {
                run_id: "r".into(),
                spec: Box::new(run),
                idempotency_key: None,
                at: 2,
            })
            .unwrap();
            assert_eq!(autoscale(&s, 10), vec![]);
        }
    }

    #[test]
    fn deleting_a_target_releases_its_nodes_first_then_removes_it() {
        let mut sim = Sim::new(ComputeKind::Cluster, 2, 2, 5);
        sim.scale().unwrap();
        sim.provision();
        let r = sim.submit(1, 1);
        sim.place();
        let delete = Command::DeleteCompute {
            name: C.into(),
            at: sim.now,
        };
        // A run still targets it: refused, nothing changed.
        let before = sim.state.clone();
        assert!(
            sim.state
                .apply(&delete)
                .unwrap_err()
                .to_string()
                .contains("unfinished run")
        );
        assert_eq!(sim.state, before);
        sim.finish(&r);
        sim.apply(delete.clone());
        assert!(sim.state.computes.contains_key(C));
        assert!(
            sim.state
                .nodes
                .values()
                .all(|n| n.state == NodeState::Draining)
        );
        assert_eq!(autoscale_compute(&sim.state, C, sim.now + 1_000_000), None);
        assert!(sim.state.apply(&delete).is_err());
        let mut run = RunSpec::new("x");
        run.compute = C.into();
        let e = sim
            .state
            .apply(&Command::SubmitRun {
                run_id: "late".into(),
                spec: Box::new(run),
                idempotency_key: None,
                at: sim.now,
            })
            .unwrap_err();
        assert!(e.to_string().contains("being deleted"), "{e}");
        sim.provision();
        assert!(sim.state.computes.is_empty() && sim.state.nodes.is_empty());
        assert!(sim.state.scaling.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Submit { cpus: u64, instances: u32 },
        Finish(usize),
        Tick(u64),
        Lose(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u64..=3, 1u32..=2).prop_map(|(cpus, instances)| Op::Submit { cpus, instances }),
            3 => (0usize..8).prop_map(Op::Finish),
            4 => (0u64..8_000).prop_map(Op::Tick),
            1 => (0usize..4).prop_map(Op::Lose),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Over a simulated timeline: never above max, never below min (once reached) by a
        /// release, and no flapping: an idle release only after the full idle time, of a
        /// node with nothing placed on it.
        #[test]
        fn bounds_hold_and_nothing_flaps(
            min in 0u32..=2,
            extra in 0u32..=3,
            idle_s in 1u64..=6,
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let max = min + extra;
            let mut sim = Sim::new(ComputeKind::Cluster, min, max, idle_s);
            for op in ops {
                match op {
                    Op::Submit { cpus, instances } => { sim.submit(cpus, instances); }
                    Op::Finish(i) => {
                        let active: Vec<String> = sim.state.runs.values()
                            .filter(|r| r.state.is_active()).map(|r| r.id.clone()).collect();
                        if !active.is_empty() {
                            let id = active[i % active.len()].clone();
                            sim.finish(&id);
                        }
                    }
                    Op::Tick(ms) => sim.now += ms,
                    Op::Lose(i) => {
                        let ready: Vec<String> = sim.state.nodes.values()
                            .filter(|n| n.state == NodeState::Ready).map(|n| n.id.clone()).collect();
                        if !ready.is_empty() {
                            sim.apply(Command::SetNodeState {
                                node_id: ready[i % ready.len()].clone(),
                                state: NodeState::Lost,
                                reason: None,
                                at: sim.now,
                            });
                        }
                    }
                }
                let before = sim.live();
                let snapshot = sim.state.clone();
                if let Some(d) = sim.scale() {
                    let after = sim.live();
                    prop_assert!(after <= max as u64, "{after} > max {max}: {d:?}");
                    if !d.remove.is_empty() {
                        prop_assert!(after >= (min as u64).min(before), "{before} -> {after} < min {min}: {d:?}");
                    }
                    for name in &d.remove {
                        let Some(n) = snapshot.node_by_name(name) else { continue };
                        if matches!(n.state, NodeState::Lost | NodeState::Evicted) {
                            continue;
                        }
                        prop_assert!(n.attempts.is_empty(), "{name} released while busy");
                        let since = n.idle_since().unwrap();
                        prop_assert!(sim.now - since >= idle_s * 1000, "{name} released after {} ms idle", sim.now - since);
                    }
                    // A decision once applied is not decided again.
                    let again = autoscale_compute(&sim.state, C, sim.now);
                    prop_assert!(again.as_ref().is_none_or(|a| a.add.is_empty() || d.add.is_empty()), "{d:?} then {again:?}");
                }
                sim.provision();
                sim.place();
                prop_assert!(sim.live() <= max as u64);
            }
        }
    }
}
