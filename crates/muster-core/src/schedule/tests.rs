//! Unit and property tests of the scheduler.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use crate::compute::{ComputeKind, ComputeSpec, Quota, QuotaUsage, Tier};
use crate::resources::{Capacity, Gpu, Resources};
use crate::schedule::{Decision, Schedule, schedule};
use crate::spec::RunSpec;
use crate::state::{AttemptEnd, AttemptReport, AttemptState, Command, NodeState, RunState, State};

const GIB: u64 = 1 << 30;

fn compute(name: &str, quota: Quota) -> Command {
    let mut spec = ComputeSpec::new(name, ComputeKind::Attached);
    spec.quota = quota;
    Command::CreateCompute { spec, at: 1 }
}

fn node(id: &str, compute: &str, gpus: usize, labels: &[(&str, &str)]) -> Command {
    Command::RegisterNode {
        node_id: id.into(),
        name: format!("host-{id}"),
        compute: compute.into(),
        capacity: Capacity {
            cpu_millis: 32_000,
            memory_bytes: 256 * GIB,
            gpus: (0..gpus)
                .map(|i| Gpu {
                    uuid: format!("GPU-{id}-{i}"),
                    model: "Fake".into(),
                    memory_bytes: 16 * GIB,
                })
                .collect(),
            max_runs: 0,
        },
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        tier: Tier::Dedicated,
        address: format!("10.0.0.{}", id.len()),
        at: 2,
    }
}

fn spec(compute: &str, gpus: u32, instances: u32, priority: i32) -> RunSpec {
    let mut spec = RunSpec::new("python train.py");
    spec.compute = compute.into();
    spec.resources = Resources {
        cpu_millis: 1000,
        memory_bytes: GIB,
        gpus,
    };
    spec.instance_count = instances;
    spec.priority = priority;
    spec
}

fn submit_spec(id: &str, spec: RunSpec) -> Command {
    Command::SubmitRun {
        run_id: id.into(),
        spec: Box::new(spec),
        idempotency_key: None,
        at: 3,
    }
}

fn submit(id: &str, compute: &str, gpus: u32, instances: u32, priority: i32) -> Command {
    submit_spec(id, spec(compute, gpus, instances, priority))
}

fn apply_all(state: &mut State, cmds: &[Command]) {
    for c in cmds {
        state.apply(c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        state.sanity_check().unwrap();
    }
}

/// A fresh state with `cmds` applied, each checked.
fn state_with(cmds: &[Command]) -> State {
    let mut state = State::default();
    apply_all(&mut state, cmds);
    state
}

/// A pass, with its reasons by run id.
struct Out {
    decisions: Vec<Decision>,
    waiting: BTreeMap<String, String>,
}

/// One pass whose decisions are all applied; returns it.
fn pass(state: &mut State, now: u64) -> Out {
    let out = schedule(state, now);
    assert_eq!(out, schedule(state, now), "schedule is deterministic");
    let waiting = out.waiting.by_run_id(state);
    assert_eq!(waiting.len(), out.waiting.len());
    for (id, why) in &waiting {
        assert_eq!(out.waiting.reason(&state.runs[id]), Some(why.as_str()));
    }
    for d in out.decisions.clone() {
        let c = d.into_command(now);
        state.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        state.sanity_check().unwrap();
    }
    Out {
        decisions: out.decisions,
        waiting,
    }
}

fn placed(s: &Out) -> Vec<&str> {
    s.decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Place { run_id, .. } => Some(run_id.as_str()),
            _ => None,
        })
        .collect()
}

fn preempted(s: &Out) -> Vec<(&str, &str)> {
    s.decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Preempt {
                run_id, for_run, ..
            } => Some((run_id.as_str(), for_run.as_str())),
            _ => None,
        })
        .collect()
}

fn end(state: &mut State, run: &str, end: AttemptEnd, code: Option<i32>, at: u64) {
    let a = state.runs[run].current_attempt().unwrap().clone();
    for p in &a.placements {
        let c = Command::ReportAttempt {
            run_id: run.into(),
            attempt: a.number,
            node_id: p.node_id.clone(),
            report: AttemptReport::Ended {
                end,
                exit_code: code,
                message: None,
                outputs: None,
            },
            at,
        };
        state.apply(&c).unwrap();
        state.sanity_check().unwrap();
    }
}

/// `low` (priority -100) runs on the 4-GPU node `a`; `high` (100) has just asked to
/// preempt it.
fn low_preempted_by_high() -> State {
    let mut s = state_with(&[
        compute("gpu-pool", Quota::default()),
        node("a", "gpu-pool", 4, &[]),
        submit("low", "gpu-pool", 4, 1, -100),
    ]);
    pass(&mut s, 10);
    apply_all(&mut s, &[submit("high", "gpu-pool", 4, 1, 100)]);
    let out = pass(&mut s, 20);
    assert_eq!(preempted(&out), [("low", "high")]);
    s
}

fn nodes_of(state: &State, run: &str) -> Vec<String> {
    state.runs[run]
        .current_attempt()
        .unwrap()
        .placements
        .iter()
        .map(|p| p.node_id.clone())
        .collect()
}

#[test]
fn higher_priority_first_then_submission_order() {
    let mut s = state_with(&[
        compute("gpu-pool", Quota::default()),
        node("n1", "gpu-pool", 4, &[]),
        submit("low", "gpu-pool", 2, 1, -100),
        submit("first", "gpu-pool", 2, 1, 0),
        submit("high", "gpu-pool", 2, 1, 100),
        submit("second", "gpu-pool", 2, 1, 0),
    ]);
    let out = pass(&mut s, 10);
    assert_eq!(placed(&out), ["high", "first"]);
    assert_eq!(
        out.waiting.keys().collect::<Vec<_>>(),
        ["low", "second"],
        "every queued run not placed has a reason"
    );
    assert_eq!(
        out.waiting["second"],
        "needs 1 node with 2 free GPUs, 1 free CPUs and 1 GiB free memory; none available"
    );
}

#[test]
fn a_gang_starts_on_all_its_nodes_or_none() {
    let mut s = state_with(&[
        compute("gpu-pool", Quota::default()),
        node("n1", "gpu-pool", 4, &[]),
        node("n2", "gpu-pool", 4, &[]),
        node("n3", "gpu-pool", 4, &[]),
        submit("busy", "gpu-pool", 2, 2, 0),
    ]);
    pass(&mut s, 10);
    apply_all(&mut s, &[submit("gang", "gpu-pool", 4, 3, 0)]);
    let out = pass(&mut s, 20);
    assert!(out.decisions.is_empty(), "{:?}", out.decisions);
    assert_eq!(
        out.waiting["gang"],
        "needs 3 nodes with 4 free GPUs, 1 free CPUs and 1 GiB free memory; 1 available"
    );
    assert_eq!(s.runs["gang"].state, RunState::Queued);
    end(&mut s, "busy", AttemptEnd::Completed, Some(0), 30);
    let out = pass(&mut s, 40);
    assert_eq!(placed(&out), ["gang"]);
    let mut nodes = nodes_of(&s, "gang");
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2", "n3"]);
}

#[test]
fn backfill_never_takes_what_the_head_is_reserved() {
    let mut s = state_with(&[
        compute("gpu-pool", Quota::default()),
        node("a", "gpu-pool", 8, &[]),
        node("b", "gpu-pool", 8, &[]),
        node("c", "gpu-pool", 8, &[]),
        submit("ra", "gpu-pool", 4, 1, 20),
        submit("rb", "gpu-pool", 4, 1, 20),
    ]);
    pass(&mut s, 10);
    assert_eq!(nodes_of(&s, "ra"), ["a"]);
    assert_eq!(nodes_of(&s, "rb"), ["a"], "smallest fit first");
    apply_all(
        &mut s,
        &[
            submit("gang", "gpu-pool", 8, 2, 20),
            submit("small1", "gpu-pool", 4, 1, 0),
            submit("small2", "gpu-pool", 4, 1, 0),
        ],
    );
    // a is full; b and c are empty: the gang starts on them.
    let out = pass(&mut s, 20);
    assert_eq!(placed(&out), ["gang"]);
    assert_eq!(
        out.waiting["small1"],
        "needs 1 node with 4 free GPUs, 1 free CPUs and 1 GiB free memory; none available"
    );
    // ra ends: 4 GPUs free on a. gang2 (priority 10) cannot start and can preempt nothing
    // (everything running has priority 20): it is the head, and reserves a (closest to
    // fitting) and b for when running attempts end. small1 would fit on a now, but that
    // would delay gang2: it waits.
    end(&mut s, "ra", AttemptEnd::Completed, Some(0), 30);
    apply_all(&mut s, &[submit("gang2", "gpu-pool", 8, 2, 10)]);
    let out = pass(&mut s, 40);
    assert!(out.decisions.is_empty(), "{:?}", out.decisions);
    assert_eq!(
        out.waiting["small1"],
        "waiting behind higher-priority run gang2 (gang of 2)"
    );
    assert_eq!(
        out.waiting["gang2"],
        "needs 2 nodes with 8 free GPUs, 1 free CPUs and 1 GiB free memory; none available"
    );
}

#[test]
fn backfill_starts_a_small_run_beside_a_waiting_gang() {
    let mut s = state_with(&[
        compute("gpu-pool", Quota::default()),
        node("a", "gpu-pool", 8, &[]),
        node("b", "gpu-pool", 8, &[]),
        node("c", "gpu-pool", 8, &[]),
        submit_spec("ra", {
            let mut sp = spec("gpu-pool", 4, 1, 0);
            sp.node_selector = BTreeMap::from([("x".into(), "y".into())]);
            sp
        }),
    ]);
    // ra cannot run anywhere (no node is labelled x=y): it never blocks the queue.
    apply_all(
        &mut s,
        &[
            submit("busy-a", "gpu-pool", 4, 1, 0),
            submit("busy-b", "gpu-pool", 4, 1, 0),
        ],
    );
    let out = pass(&mut s, 5);
    assert_eq!(
        out.waiting["ra"],
        "needs 1 node with 4 free GPUs, 1 free CPUs and 1 GiB free memory, labelled x=y; no ready node in compute gpu-pool is that large"
    );
    // busy-a and busy-b share node a (smallest fit); move busy-b to b for the example.
    assert_eq!(nodes_of(&s, "busy-a"), ["a"]);
    end(&mut s, "busy-b", AttemptEnd::Completed, Some(0), 6);
    apply_all(&mut s, &[submit("fill-a", "gpu-pool", 4, 1, 0)]);
    pass(&mut s, 7);
    assert_eq!(nodes_of(&s, "fill-a"), ["a"]);
    apply_all(&mut s, &[submit("busy-b2", "gpu-pool", 4, 1, 0)]);
    pass(&mut s, 8);
    assert_eq!(nodes_of(&s, "busy-b2"), ["b"]);
    end(&mut s, "fill-a", AttemptEnd::Completed, Some(0), 9);
    // a: 4 used (busy-a), b: 4 used (busy-b2), c: empty.
    apply_all(
        &mut s,
        &[
            submit("gang", "gpu-pool", 8, 2, 0),
            submit("s1", "gpu-pool", 4, 1, 0),
            submit("s2", "gpu-pool", 4, 1, 0),
        ],
    );
    let out = pass(&mut s, 10);
    // The gang reserves c (fits now) and a (4 free, lowest id): s1 fits now on a, b and c;
    // a and c are reserved, b is not: s1 starts on b, and the gang still starts once
    // busy-a ends, whatever s1 does.
    assert_eq!(placed(&out), ["s1"]);
    assert_eq!(nodes_of(&s, "s1"), ["b"]);
    assert_eq!(
        out.waiting["s2"],
        "waiting behind earlier run gang (gang of 2)"
    );
    end(&mut s, "busy-a", AttemptEnd::Completed, Some(0), 11);
    let out = pass(&mut s, 12);
    assert_eq!(placed(&out), ["gang"]);
}

#[test]
fn preemption_picks_the_fewest_lower_priority_victims() {
    let mut s = state_with(&[
        compute("gpu-pool", Quota::default()),
        node("a", "gpu-pool", 8, &[]),
        node("b", "gpu-pool", 8, &[]),
        node("c", "gpu-pool", 8, &[]),
        // a: four 2-GPU low runs; b: one 8-GPU low run; c: one 8-GPU high run.
        submit("b-big", "gpu-pool", 8, 1, -100),
        submit("c-high", "gpu-pool", 8, 1, 100),
        submit("a1", "gpu-pool", 2, 1, -100),
        submit("a2", "gpu-pool", 2, 1, -100),
        submit("a3", "gpu-pool", 2, 1, -100),
        submit("a4", "gpu-pool", 2, 1, -100),
    ]);
    pass(&mut s, 10);
    assert_eq!(nodes_of(&s, "c-high"), ["a"]);
    assert_eq!(nodes_of(&s, "b-big"), ["b"]);
    assert_eq!(nodes_of(&s, "a1"), ["c"]);
    apply_all(&mut s, &[submit("urgent", "gpu-pool", 8, 1, 50)]);
    let out = pass(&mut s, 20);
    assert_eq!(preempted(&out), [("b-big", "urgent")]);
    assert!(placed(&out).is_empty(), "not placed in the same pass");
    assert_eq!(
        out.waiting["urgent"],
        "preempting 1 lower-priority run: b-big"
    );
    assert_eq!(s.runs["b-big"].preempt_requested.as_deref(), Some("urgent"));

    // Equal priority is never preempted: a second urgent run takes the four small ones.
    apply_all(&mut s, &[submit("urgent2", "gpu-pool", 8, 1, 50)]);
    let out = pass(&mut s, 30);
    assert_eq!(
        preempted(&out),
        [
            ("a1", "urgent2"),
            ("a2", "urgent2"),
            ("a3", "urgent2"),
            ("a4", "urgent2")
        ]
    );
    assert_eq!(
        out.waiting["urgent"],
        "waiting for 1 preempted run to stop: b-big"
    );
    // A third one finds nothing of lower priority left to preempt (c-high is higher).
    apply_all(&mut s, &[submit("urgent3", "gpu-pool", 8, 1, 50)]);
    let out = pass(&mut s, 40);
    assert!(out.decisions.is_empty(), "{:?}", out.decisions);
    assert_eq!(
        out.waiting["urgent3"],
        "needs 1 node with 8 free GPUs, 1 free CPUs and 1 GiB free memory; none available"
    );
}

#[test]
fn a_gang_victim_counts_once() {
    let mut s = state_with(&[
        compute("gpu-pool", Quota::default()),
        node("a", "gpu-pool", 4, &[]),
        node("b", "gpu-pool", 4, &[]),
        submit("low-gang", "gpu-pool", 4, 2, 0),
    ]);
    pass(&mut s, 10);
    apply_all(&mut s, &[submit("high-gang", "gpu-pool", 4, 2, 100)]);
    let out = pass(&mut s, 20);
    assert_eq!(preempted(&out), [("low-gang", "high-gang")]);
}

#[test]
fn a_preempted_run_comes_back_as_a_new_attempt_without_a_preemption_loop() {
    let mut s = low_preempted_by_high();
    // While the victim stops, the preemptor picks no new victims, pass after pass.
    for now in [30, 40, 50] {
        let out = pass(&mut s, now);
        assert!(out.decisions.is_empty(), "{:?}", out.decisions);
        assert_eq!(
            out.waiting["high"],
            "waiting for 1 preempted run to stop: low"
        );
    }
    // The agent stops it: SIGTERM, and the process exits 0. Still recorded as Preempted.
    end(&mut s, "low", AttemptEnd::Completed, Some(0), 60);
    let low = &s.runs["low"];
    assert_eq!(low.state, RunState::Queued);
    assert_eq!(low.preempt_requested, None);
    assert_eq!(
        low.attempts[0].state,
        AttemptState::Ended(AttemptEnd::Preempted)
    );
    assert_eq!(low.attempts[0].preempted_for.as_deref(), Some("high"));
    assert!(
        low.message
            .as_deref()
            .unwrap()
            .contains("preempted for higher-priority run high"),
        "{:?}",
        low.message
    );
    let out = pass(&mut s, 70);
    assert_eq!(placed(&out), ["high"]);
    assert!(
        out.waiting["low"].starts_with("restarting after backoff until 1970-01-01 00:00:01 UTC"),
        "{}",
        out.waiting["low"]
    );
    // Over many passes: the low run waits, never preempts the high one back.
    for now in (2_000..20_000).step_by(1_000) {
        let out = pass(&mut s, now);
        assert!(out.decisions.is_empty(), "{:?}", out.decisions);
    }
    assert_eq!(s.runs["low"].state, RunState::Queued);
    assert_eq!(
        schedule(&s, 20_000).waiting.reason(&s.runs["low"]).unwrap(),
        "needs 1 node with 4 free GPUs, 1 free CPUs and 1 GiB free memory; none available"
    );
    end(&mut s, "high", AttemptEnd::Completed, Some(0), 20_001);
    let out = pass(&mut s, 20_002);
    assert_eq!(placed(&out), ["low"]);
    assert_eq!(s.runs["low"].attempt_number(), 2);
}

#[test]
fn a_cancel_during_preemption_wins() {
    let mut s = low_preempted_by_high();
    apply_all(
        &mut s,
        &[Command::CancelRun {
            run_id: "low".into(),
            reason: None,
            at: 25,
        }],
    );
    end(&mut s, "low", AttemptEnd::Canceled, Some(143), 30);
    assert_eq!(s.runs["low"].state, RunState::Canceled);
    assert_eq!(placed(&pass(&mut s, 40)), ["high"]);
}

#[test]
fn stale_or_wrong_preemptions_are_rejected() {
    let mut s = state_with(&[
        compute("gpu-pool", Quota::default()),
        node("a", "gpu-pool", 4, &[]),
        submit("low", "gpu-pool", 4, 1, 0),
        submit("same", "gpu-pool", 4, 1, 0),
        submit("high", "gpu-pool", 4, 1, 100),
    ]);
    pass(&mut s, 10);
    let before = s.clone();
    let preempt = |run: &str, attempt: u32, for_run: &str| Command::PreemptAttempt {
        run_id: run.into(),
        attempt,
        for_run: for_run.into(),
        at: 11,
    };
    // "high" was placed; "low" and "same" wait.
    assert!(
        s.apply(&preempt("high", 1, "low")).is_err(),
        "lower priority"
    );
    assert!(
        s.apply(&preempt("high", 2, "same")).is_err(),
        "stale attempt"
    );
    assert!(s.apply(&preempt("low", 1, "high")).is_err(), "not active");
    assert_eq!(s, before);
    apply_all(&mut s, &[submit("top", "gpu-pool", 4, 1, 200)]);
    apply_all(&mut s, &[preempt("high", 1, "top")]);
    let again = s.clone();
    assert!(
        s.apply(&preempt("high", 1, "top")).is_err(),
        "already preempting"
    );
    assert_eq!(s, again);
    assert_eq!(
        State::from_snapshot(&s.to_snapshot()).unwrap(),
        s,
        "snapshots keep preemptions"
    );
}

#[test]
fn quotas_are_never_exceeded_and_say_so() {
    let quota = Quota {
        max_gpus: Some(8),
        max_cpu_millis: None,
        max_concurrent_runs: Some(3),
    };
    let mut s = state_with(&[
        compute("gpu-pool", quota),
        node("a", "gpu-pool", 8, &[]),
        node("b", "gpu-pool", 8, &[]),
        submit("r1", "gpu-pool", 4, 1, 0),
        submit("r2", "gpu-pool", 4, 1, 0),
        submit("r3", "gpu-pool", 2, 1, 0),
        submit("huge", "gpu-pool", 8, 2, 0),
        submit("cpu1", "gpu-pool", 0, 1, 0),
        submit("cpu2", "gpu-pool", 0, 1, 0),
    ]);
    let out = pass(&mut s, 10);
    assert_eq!(placed(&out), ["r1", "r2", "cpu1"]);
    assert_eq!(out.waiting["r3"], "quota: 8/8 GPUs in use, needs 2");
    assert_eq!(
        out.waiting["huge"],
        "quota: needs 16 GPUs but the quota allows 8"
    );
    assert_eq!(out.waiting["cpu2"], "quota: 3/3 runs active");
    assert_eq!(
        s.quota_usage("gpu-pool"),
        QuotaUsage {
            gpus: 8,
            cpu_millis: 3000,
            runs: 3
        }
    );
    // A placement past the quota is rejected even if proposed.
    let r3 = s.runs["r3"].clone();
    let bad = Command::PlaceRun {
        run_id: "r3".into(),
        attempt: 1,
        placements: vec![crate::schedule::Placement {
            node_id: "b".into(),
            gpus: vec!["GPU-b-0".into(), "GPU-b-1".into()],
            resources: r3.spec.resources,
        }],
        at: 11,
        secret: None,
    };
    let e = s.apply(&bad).unwrap_err();
    assert!(e.to_string().contains("quota: 8/8 GPUs in use"), "{e}");
}

#[test]
fn a_higher_priority_run_preempts_to_get_under_the_quota() {
    let quota = Quota {
        max_gpus: Some(4),
        ..Quota::default()
    };
    let mut s = state_with(&[
        compute("gpu-pool", quota),
        node("a", "gpu-pool", 8, &[]),
        submit("low", "gpu-pool", 4, 1, 0),
    ]);
    pass(&mut s, 10);
    apply_all(
        &mut s,
        &[
            submit("high", "gpu-pool", 4, 1, 100),
            submit("mid", "gpu-pool", 2, 1, 0),
        ],
    );
    let out = pass(&mut s, 20);
    assert_eq!(preempted(&out), [("low", "high")]);
    assert_eq!(out.waiting["mid"], "quota: 4/4 GPUs in use, needs 2");
    end(&mut s, "low", AttemptEnd::Failed, Some(143), 30);
    let out = pass(&mut s, 40);
    assert_eq!(placed(&out), ["high"]);
}

#[test]
fn reasons_name_what_is_missing() {
    let mut s = state_with(&[
        compute("gpu-pool", Quota::default()),
        compute("empty-pool", Quota::default()),
        compute("drained", Quota::default()),
        node("a", "gpu-pool", 8, &[("zone", "a")]),
        node("d", "drained", 8, &[]),
        Command::SetNodeState {
            node_id: "d".into(),
            state: NodeState::Draining,
            reason: None,
            at: 3,
        },
        submit("nowhere", "empty-pool", 1, 1, 0),
        submit("draining", "drained", 1, 1, 0),
        submit("too-big", "gpu-pool", 16, 1, 0),
        submit("too-wide", "gpu-pool", 1, 2, 0),
        submit_spec("zone-b", {
            let mut sp = spec("gpu-pool", 1, 1, 0);
            sp.node_selector = BTreeMap::from([("zone".into(), "b".into())]);
            sp
        }),
        submit_spec("zone-a", {
            let mut sp = spec("gpu-pool", 1, 1, 0);
            sp.node_selector = BTreeMap::from([("zone".into(), "a".into())]);
            sp
        }),
    ]);
    let out = pass(&mut s, 10);
    assert_eq!(placed(&out), ["zone-a"]);
    assert_eq!(
        out.waiting["nowhere"],
        "no ready node in compute empty-pool: no node has joined it"
    );
    assert_eq!(
        out.waiting["draining"],
        "no ready node in compute drained (1 draining)"
    );
    assert_eq!(
        out.waiting["too-big"],
        "needs 1 node with 16 free GPUs, 1 free CPUs and 1 GiB free memory; no ready node in compute gpu-pool is that large"
    );
    assert_eq!(
        out.waiting["too-wide"],
        "needs 2 nodes with 1 free GPU, 1 free CPUs and 1 GiB free memory; compute gpu-pool has only 1 ready node that large"
    );
    assert_eq!(
        out.waiting["zone-b"],
        "needs 1 node with 1 free GPU, 1 free CPUs and 1 GiB free memory, labelled zone=b; no ready node in compute gpu-pool is that large"
    );
}

#[test]
fn a_node_holds_at_most_its_max_runs_and_says_so() {
    let mut capped = node("a", "pool", 0, &[]);
    if let Command::RegisterNode { capacity, .. } = &mut capped {
        // No resource limits at all (a `muster dev` node), but at most 2 runs at once.
        capacity.cpu_millis = 0;
        capacity.memory_bytes = 0;
        capacity.max_runs = 2;
    }
    let free = |id: &str| {
        let mut sp = RunSpec::new("true");
        sp.compute = "pool".into();
        submit_spec(id, sp)
    };
    let mut s = state_with(&[
        compute("pool", Quota::default()),
        capped,
        free("r1"),
        free("r2"),
        free("r3"),
        submit("r4", "pool", 0, 1, 0),
    ]);
    let out = pass(&mut s, 10);
    assert_eq!(placed(&out), ["r1", "r2"]);
    assert_eq!(
        out.waiting["r3"],
        "needs 1 node; none available; 1 node has room but is at its --max-runs limit"
    );
    assert_eq!(
        out.waiting["r4"],
        "needs 1 node with 1 free CPUs and 1 GiB free memory; none available; 1 node has room but is at its --max-runs limit"
    );
    assert!(pass(&mut s, 11).decisions.is_empty(), "still full");
    end(&mut s, "r1", AttemptEnd::Completed, Some(0), 12);
    assert_eq!(
        placed(&pass(&mut s, 13)),
        ["r3"],
        "one ended, one more starts"
    );
}

#[test]
fn old_logs_and_snapshots_still_decode() {
    // A run and an attempt as written before preemption, quotas and selectors existed.
    let mut s = state_with(&[
        compute("gpu-pool", Quota::default()),
        node("a", "gpu-pool", 4, &[]),
        submit("r1", "gpu-pool", 1, 1, 0),
    ]);
    pass(&mut s, 10);
    let text = String::from_utf8(s.to_snapshot()).unwrap();
    for new_key in [
        "preempt_requested",
        "preempted_for",
        "quota",
        "node_selector",
    ] {
        assert!(
            !text.contains(new_key),
            "{new_key} is written only when set"
        );
    }
    let back = State::from_snapshot(text.as_bytes()).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.quota_usage("gpu-pool").gpus, 1);
    back.sanity_check().unwrap();
}

// ---------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Node {
        n: u8,
        pool: u8,
        gpus: u8,
        cpus: u8,
        zone: u8,
    },
    Submit {
        pool: u8,
        gpus: u8,
        cpus: u8,
        instances: u8,
        priority: i8,
        zone: u8,
    },
    Schedule,
    Report {
        pick: u16,
        outcome: u8,
    },
    StopPreempted {
        pick: u16,
        outcome: u8,
    },
    Cancel {
        pick: u16,
    },
    Lose {
        n: u8,
    },
    Wait,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u8..8, 0u8..2, prop_oneof![1 => Just(0u8), 4 => 1u8..6], 0u8..9, 0u8..3).prop_map(
            |(n, pool, gpus, cpus, zone)| Op::Node { n, pool, gpus, cpus, zone }
        ),
        4 => (0u8..2, 0u8..5, 0u8..5, prop_oneof![3 => Just(1u8), 1 => 2u8..4], -2i8..3, 0u8..6).prop_map(
            |(pool, gpus, cpus, instances, priority, zone)| Op::Submit {
                pool,
                gpus,
                cpus,
                instances,
                priority,
                zone,
            }
        ),
        4 => Just(Op::Schedule),
        2 => (any::<u16>(), 0u8..7).prop_map(|(pick, outcome)| Op::Report { pick, outcome }),
        2 => (any::<u16>(), 0u8..4).prop_map(|(pick, outcome)| Op::StopPreempted { pick, outcome }),
        1 => any::<u16>().prop_map(|pick| Op::Cancel { pick }),
        1 => (0u8..8).prop_map(|n| Op::Lose { n }),
        1 => Just(Op::Wait),
    ]
}

const POOLS: [&str; 2] = ["pool-a", "pool-b"];

fn pool_quota(i: usize, seed: u8) -> Quota {
    if i == 0 {
        Quota::default()
    } else {
        Quota {
            max_gpus: Some(4 + seed as u32 % 5),
            max_cpu_millis: seed.is_multiple_of(2).then_some(12_000),
            max_concurrent_runs: seed.is_multiple_of(3).then_some(3),
        }
    }
}

fn ended(end: AttemptEnd, code: i32) -> AttemptReport {
    AttemptReport::Ended {
        end,
        exit_code: Some(code),
        message: None,
        outputs: None,
    }
}

/// Resources free on each ready node of `compute` where `selector` matches, keyed by node.
type Free = BTreeMap<String, (u64, u64, u64)>;

fn fits(free: &Free, spec: &RunSpec) -> bool {
    let r = &spec.resources;
    free.values()
        .filter(|(g, c, m)| *g >= r.gpus as u64 && *c >= r.cpu_millis && *m >= r.memory_bytes)
        .count()
        >= spec.instance_count as usize
}

fn take(free: &mut Free, placements: &[crate::schedule::Placement]) {
    for p in placements {
        if let Some((g, c, m)) = free.get_mut(&p.node_id) {
            *g = g.saturating_sub(p.gpus.len() as u64);
            *c = c.saturating_sub(p.resources.cpu_millis);
            *m = m.saturating_sub(p.resources.memory_bytes);
        }
    }
}

fn limit(v: u64) -> u64 {
    if v == 0 { u64::MAX } else { v }
}

/// The ready nodes of the run's compute that match its selector, with `f(node)` free.
fn view(s: &State, spec: &RunSpec, f: impl Fn(&crate::state::Node) -> (u64, u64, u64)) -> Free {
    s.nodes
        .values()
        .filter(|n| {
            n.state == NodeState::Ready
                && n.compute == spec.compute
                && spec
                    .node_selector
                    .iter()
                    .all(|(k, v)| n.labels.get(k) == Some(v))
        })
        .map(|n| (n.id.clone(), f(n)))
        .collect()
}

fn capacity(n: &crate::state::Node) -> (u64, u64, u64) {
    (
        n.capacity.gpus.len() as u64,
        limit(n.capacity.cpu_millis),
        limit(n.capacity.memory_bytes),
    )
}

/// Checks one pass against the properties the scheduler promises, on the state it ran on.
fn check_pass(s: &State, out: &Schedule, now: u64) -> Result<(), TestCaseError> {
    let placements: BTreeMap<&str, &Vec<crate::schedule::Placement>> = out
        .decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Place {
                run_id, placements, ..
            } => Some((run_id.as_str(), placements)),
            _ => None,
        })
        .collect();
    let mut preemptors: BTreeSet<&str> = BTreeSet::new();
    let mut victims = BTreeSet::new();
    for d in &out.decisions {
        if let Decision::Preempt {
            run_id,
            attempt,
            for_run,
        } = d
        {
            let victim = &s.runs[run_id];
            let preemptor = &s.runs[for_run];
            // Never equal or higher priority; never twice; never one already stopping.
            prop_assert!(victim.spec.priority < preemptor.spec.priority);
            prop_assert!(victims.insert((run_id.clone(), *attempt)), "victim twice");
            prop_assert!(victim.preempt_requested.is_none() && !victim.cancel_requested);
            // The preemptor is not placed in the same pass and had no victims pending.
            prop_assert!(!placements.contains_key(for_run.as_str()));
            prop_assert!(
                !s.runs
                    .values()
                    .any(|r| r.preempt_requested.as_deref() == Some(for_run.as_str()))
            );
            preemptors.insert(for_run.as_str());
        }
    }
    // Gangs all or nothing.
    for (id, p) in &placements {
        prop_assert_eq!(p.len(), s.runs[*id].spec.instance_count as usize);
    }
    // Every queued run not placed has a reason; no other run has one.
    let queued: BTreeSet<&str> = s.queue.iter().map(|k| k.run_id.as_str()).collect();
    let reasons = out.waiting.by_run_id(s);
    prop_assert_eq!(reasons.len(), out.waiting.len());
    let waiting: BTreeSet<&str> = reasons.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = queued
        .iter()
        .copied()
        .filter(|r| !placements.contains_key(r))
        .collect();
    prop_assert_eq!(waiting, expected);

    for (ci, compute) in POOLS.iter().enumerate() {
        let _ = ci;
        let Some(target) = s.computes.get(*compute) else {
            continue;
        };
        let quota = target.spec.quota;
        let eligible: Vec<&crate::state::Run> = s
            .queue
            .iter()
            .map(|k| &s.runs[&k.run_id])
            .filter(|r| r.spec.compute == *compute && r.not_before.is_none_or(|t| t <= now))
            .collect();
        // Backfill never delays the head: the first run not placed that could start once
        // the attempts running now end (beside what this pass placed ahead of it) still
        // can, beside everything this pass placed behind it.
        let mut ahead: Vec<&crate::state::Run> = Vec::new();
        let mut head = None;
        for (i, r) in eligible.iter().enumerate() {
            if placements.contains_key(r.id.as_str()) {
                ahead.push(r);
                continue;
            }
            let mut h0 = view(s, &r.spec, capacity);
            let mut used = QuotaUsage::default();
            for a in &ahead {
                take(&mut h0, placements[a.id.as_str()]);
                used.add(&QuotaUsage::of_run(
                    &a.spec.resources,
                    a.spec.instance_count,
                ));
            }
            let need = QuotaUsage::of_run(&r.spec.resources, r.spec.instance_count);
            if fits(&h0, &r.spec) && quota.admits(&used, &need).is_ok() {
                head = Some((i, h0, used));
                break;
            }
        }
        if let Some((i, mut h1, mut used)) = head {
            let r = eligible[i];
            for b in &eligible[i + 1..] {
                if let Some(p) = placements.get(b.id.as_str()) {
                    take(&mut h1, p);
                    used.add(&QuotaUsage::of_run(
                        &b.spec.resources,
                        b.spec.instance_count,
                    ));
                }
            }
            let need = QuotaUsage::of_run(&r.spec.resources, r.spec.instance_count);
            prop_assert!(
                fits(&h1, &r.spec) && quota.admits(&used, &need).is_ok(),
                "backfill delayed head {}",
                r.id
            );
        }
        // Invariant 6: the first run not placed, if it neither preempts nor waits for
        // victims, could not start even if every lower-priority attempt were preempted.
        let Some(x) = eligible
            .iter()
            .find(|r| !placements.contains_key(r.id.as_str()))
        else {
            continue;
        };
        let pending = s
            .runs
            .values()
            .any(|r| r.preempt_requested.as_deref() == Some(x.id.as_str()));
        if pending || preemptors.contains(x.id.as_str()) {
            continue;
        }
        let candidate = |r: &crate::state::Run| {
            r.state.is_active()
                && r.spec.compute == *compute
                && r.spec.priority < x.spec.priority
                && !r.cancel_requested
                && r.preempt_requested.is_none()
        };
        // Free once every candidate ended: capacity minus what the others hold.
        let mut v = view(s, &x.spec, |n| {
            let (mut g, mut c, mut m) = capacity(n);
            for (run_id, _) in &n.attempts {
                let r = &s.runs[run_id];
                if !candidate(r) {
                    for p in &r.current_attempt().unwrap().placements {
                        if p.node_id == n.id {
                            g = g.saturating_sub(p.gpus.len() as u64);
                            c = c.saturating_sub(p.resources.cpu_millis);
                            m = m.saturating_sub(p.resources.memory_bytes);
                        }
                    }
                }
            }
            (g, c, m)
        });
        let mut used = s.quota_usage(compute);
        for r in s.runs.values().filter(|r| candidate(r)) {
            used.sub(&crate::state::attempt_usage(r.current_attempt().unwrap()));
        }
        for p in placements.values() {
            take(&mut v, p);
        }
        for id in placements.keys() {
            let r = &s.runs[*id];
            if r.spec.compute == *compute {
                used.add(&QuotaUsage::of_run(
                    &r.spec.resources,
                    r.spec.instance_count,
                ));
            }
        }
        let need = QuotaUsage::of_run(&x.spec.resources, x.spec.instance_count);
        prop_assert!(
            !(fits(&v, &x.spec) && quota.admits(&used, &need).is_ok()),
            "{} ({}) waits although preempting lower-priority runs would start it: {}",
            x.id,
            x.spec.priority,
            reasons[&x.id]
        );
    }
    Ok(())
}

fn run_ops(ops: &[Op], seed: u8) -> Result<State, TestCaseError> {
    let mut s = State::default();
    for (i, name) in POOLS.iter().enumerate() {
        s.apply(&compute(name, pool_quota(i, seed))).unwrap();
    }
    for n in 0..4 {
        s.apply(&node(&format!("n{n}"), POOLS[n % 2], 4, &[("zone", "a")]))
            .unwrap();
    }
    let mut now = 10u64;
    let mut next = 0u32;
    for op in ops {
        now += 700;
        let mut cmds = Vec::new();
        match op {
            Op::Node {
                n,
                pool,
                gpus,
                cpus,
                zone,
            } => {
                // A node stays in one pool (n's parity), unless `pool` says to move it.
                let pool = if *pool == 1 { *n as usize % 2 } else { 0 };
                let pool = if *n < 6 { *n as usize % 2 } else { pool };
                let mut c = node(
                    &format!("n{n}"),
                    POOLS[pool],
                    *gpus as usize,
                    &[("zone", ["a", "b", "c"][*zone as usize])],
                );
                if let Command::RegisterNode { capacity, .. } = &mut c {
                    capacity.cpu_millis = *cpus as u64 * 1000;
                }
                cmds.push(c);
            }
            Op::Submit {
                pool,
                gpus,
                cpus,
                instances,
                priority,
                zone,
            } => {
                next += 1;
                let mut sp = spec(
                    POOLS[*pool as usize],
                    *gpus as u32,
                    *instances as u32,
                    *priority as i32 * 100,
                );
                sp.resources.cpu_millis = *cpus as u64 * 1000;
                sp.max_attempts = 4;
                if *zone < 3 && *zone == (next % 4) as u8 {
                    sp.node_selector =
                        BTreeMap::from([("zone".into(), ["a", "b", "c"][*zone as usize].into())]);
                }
                cmds.push(submit_spec(&format!("r{next}"), sp));
            }
            Op::Schedule => {
                let out = schedule(&s, now);
                prop_assert_eq!(&out, &schedule(&s, now), "deterministic");
                let restored = State::from_snapshot(&s.to_snapshot()).unwrap();
                prop_assert_eq!(&out, &schedule(&restored, now), "same from a snapshot");
                check_pass(&s, &out, now)?;
                for d in out.decisions {
                    let c = d.into_command(now);
                    if let Err(e) = s.apply(&c) {
                        return Err(TestCaseError::fail(format!("{c:?} rejected: {e}")));
                    }
                    if let Err(e) = s.sanity_check() {
                        return Err(TestCaseError::fail(format!("after {c:?}: {e}")));
                    }
                }
                continue;
            }
            Op::Report { pick, outcome } | Op::StopPreempted { pick, outcome } => {
                let only_preempted = matches!(op, Op::StopPreempted { .. });
                let active: Vec<_> = s
                    .runs
                    .values()
                    .filter(|r| {
                        r.state.is_active() && (!only_preempted || r.preempt_requested.is_some())
                    })
                    .collect();
                if let Some(run) = active.get(*pick as usize % active.len().max(1)) {
                    let a = run.current_attempt().unwrap();
                    for p in &a.placements {
                        let report = match outcome {
                            0 => ended(AttemptEnd::Canceled, 143),
                            1 => ended(AttemptEnd::Completed, 0),
                            2 => AttemptReport::Running,
                            3 => ended(AttemptEnd::Failed, 1),
                            4 => AttemptReport::Preparing,
                            5 => ended(AttemptEnd::Preempted, 137),
                            _ => ended(AttemptEnd::TimedOut, 124),
                        };
                        cmds.push(Command::ReportAttempt {
                            run_id: run.id.clone(),
                            attempt: a.number,
                            node_id: p.node_id.clone(),
                            report,
                            at: now,
                        });
                    }
                }
            }
            Op::Cancel { pick } => {
                let ids: Vec<_> = s.runs.keys().cloned().collect();
                if let Some(id) = ids.get(*pick as usize % ids.len().max(1)) {
                    cmds.push(Command::CancelRun {
                        run_id: id.clone(),
                        reason: None,
                        at: now,
                    });
                }
            }
            Op::Lose { n } => cmds.push(Command::SetNodeState {
                node_id: format!("n{n}"),
                state: NodeState::Lost,
                reason: None,
                at: now,
            }),
            Op::Wait => now += 30_000,
        }
        for c in cmds {
            let before = s.clone();
            match s.apply(&c) {
                Ok(_) => {
                    if let Err(e) = s.sanity_check() {
                        return Err(TestCaseError::fail(format!("after {c:?}: {e}")));
                    }
                }
                Err(_) => prop_assert_eq!(&s, &before, "a rejected command changed the state"),
            }
        }
    }
    Ok(s)
}

proptest! {
    // PROPTEST_CASES=5000 for a longer hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(300),
        ..ProptestConfig::default()
    })]

    #[test]
    fn schedules_keep_every_promise(ops in proptest::collection::vec(op(), 1..120), seed in any::<u8>()) {
        let s = run_ops(&ops, seed)?;
        s.sanity_check().map_err(TestCaseError::fail)?;
    }
}

#[test]
fn a_full_queue_drains_without_preemption_loops() {
    // Many priorities and gangs on a small cluster; runs end as they are placed. The queue
    // drains, and every preemption is of strictly lower priority (checked by apply).
    let mut s = state_with(&[compute("gpu-pool", Quota::default())]);
    for n in 0..6 {
        apply_all(&mut s, &[node(&format!("n{n}"), "gpu-pool", 4, &[])]);
    }
    for i in 0..60u32 {
        let gpus = [1, 2, 4, 3][i as usize % 4];
        let instances = if i % 7 == 0 { 3 } else { 1 };
        let priority = [0, 100, -100][i as usize % 3];
        let mut sp = spec("gpu-pool", gpus, instances, priority);
        sp.max_attempts = 50;
        apply_all(&mut s, &[submit_spec(&format!("r{i:02}"), sp)]);
    }
    let mut now = 100;
    let mut preemptions = 0;
    for _ in 0..2_000 {
        now += 5_000;
        let out = pass(&mut s, now);
        preemptions += preempted(&out).len();
        // Every active run ends; preempted ones as their agent reports it.
        let active: Vec<String> = s
            .runs
            .values()
            .filter(|r| r.state.is_active())
            .map(|r| r.id.clone())
            .collect();
        for id in active.iter().take(2) {
            end(&mut s, id, AttemptEnd::Completed, Some(0), now + 1);
        }
        if s.queue.is_empty() && active.is_empty() {
            break;
        }
    }
    assert!(s.queue.is_empty(), "queue drained");
    assert!(
        s.runs.values().all(|r| r.state == RunState::Completed),
        "every run completed"
    );
    assert!(preemptions < 60, "{preemptions} preemptions");
}
