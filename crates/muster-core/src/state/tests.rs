//! Unit and property tests of `State::apply` and the scheduler.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::compute::{ComputeKind, ComputeSpec, Tier};
use crate::resources::{Capacity, Gpu, Resources};
use crate::schedule::{Decision, schedule};
use crate::spec::RunSpec;
use crate::state::{
    Applied, ApplyError, AttemptEnd, AttemptReport, Checkpoint, CheckpointCause, Command,
    NodeState, RunState, SealedBlob, SealedLog, SealedMetrics, State,
};

fn compute(name: &str) -> Command {
    Command::CreateCompute {
        spec: ComputeSpec::new(name, ComputeKind::Attached),
        at: 1,
    }
}

fn node(id: &str, compute: &str, cpus: u64, gpus: usize) -> Command {
    Command::RegisterNode {
        node_id: id.into(),
        name: format!("host-{id}"),
        compute: compute.into(),
        capacity: Capacity {
            cpu_millis: cpus * 1000,
            memory_bytes: 64 << 30,
            gpus: (0..gpus)
                .map(|i| Gpu {
                    uuid: format!("GPU-{id}-{i}"),
                    model: "Fake".into(),
                    memory_bytes: 16 << 30,
                })
                .collect(),
            max_runs: 0,
        },
        labels: BTreeMap::new(),
        tier: Tier::Dedicated,
        address: format!("10.0.0.{}", id.len()),
        at: 2,
    }
}

fn submit(id: &str, compute: &str, cpus: u64, gpus: u32, instances: u32) -> Command {
    let mut spec = RunSpec::new("python train.py");
    spec.compute = compute.into();
    spec.resources = Resources {
        cpu_millis: cpus * 1000,
        memory_bytes: 1 << 30,
        gpus,
    };
    spec.instance_count = instances;
    Command::SubmitRun {
        run_id: id.into(),
        spec: Box::new(spec),
        idempotency_key: None,
        at: 3,
    }
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

/// Run `r1` (1 CPU) queued in `cpu-pool`, which has the 4-CPU node `n1`.
fn one_queued_run() -> State {
    state_with(&[
        compute("cpu-pool"),
        node("n1", "cpu-pool", 4, 0),
        submit("r1", "cpu-pool", 1, 0, 1),
    ])
}

/// Each command is refused with the expected error, whose message names its reason, and
/// changes nothing.
fn assert_invalid<const N: usize>(
    s: &mut State,
    what: &str,
    cases: [(Command, ApplyError, &str); N],
) {
    let before = s.clone();
    for (cmd, expected, why) in cases {
        let err = s.apply(&cmd).expect_err(&format!("{cmd:?} is refused"));
        assert_eq!(err, expected, "{cmd:?}");
        assert!(err.to_string().contains(why), "{err}");
        assert_eq!(*s, before, "a rejected {what} changes nothing");
    }
}

/// `cmd` encodes under the tag `tag` and decodes back to itself.
fn assert_encodes_as(cmd: &Command, tag: &str) {
    let encoded = cmd.encode();
    assert!(
        String::from_utf8(encoded.clone())
            .unwrap()
            .contains(&format!("\"cmd\":\"{tag}\""))
    );
    assert_eq!(&Command::decode(&encoded).unwrap(), cmd);
}

fn place_all(state: &mut State, now: u64) -> usize {
    let decisions = schedule(state, now).decisions;
    let n = decisions.len();
    for d in decisions {
        state.apply(&d.into_command(now)).unwrap();
        state.sanity_check().unwrap();
    }
    n
}

fn end(run: &str, attempt: u32, node: &str, end: AttemptEnd, code: Option<i32>) -> Command {
    Command::ReportAttempt {
        run_id: run.into(),
        attempt,
        node_id: node.into(),
        report: AttemptReport::Ended {
            end,
            exit_code: code,
            message: None,
            outputs: None,
        },
        at: 10,
    }
}

#[test]
fn a_run_goes_from_queued_to_failed_with_its_exit_code() {
    let mut s = one_queued_run();
    assert_eq!(s.runs["r1"].state, RunState::Queued);
    assert_eq!(place_all(&mut s, 5), 1);
    assert_eq!(s.runs["r1"].state, RunState::Scheduled);
    let running = Command::ReportAttempt {
        run_id: "r1".into(),
        attempt: 1,
        node_id: "n1".into(),
        report: AttemptReport::Running,
        at: 6,
    };
    apply_all(
        &mut s,
        &[running, end("r1", 1, "n1", AttemptEnd::Failed, Some(3))],
    );
    let r = &s.runs["r1"];
    assert_eq!(
        (r.state, r.exit_code, r.started_at, r.finished_at),
        (RunState::Failed, Some(3), Some(6), Some(10))
    );
    assert_eq!(s.nodes["n1"].allocated, Resources::default());
}

#[test]
fn stale_reports_are_fenced_and_change_nothing() {
    let mut s = one_queued_run();
    place_all(&mut s, 5);
    let before = s.clone();
    assert_eq!(
        s.apply(&end("r1", 7, "n1", AttemptEnd::Completed, Some(0)))
            .unwrap(),
        Applied::Stale {
            run_id: "r1".into(),
            attempt: 7
        }
    );
    assert_eq!(
        s.apply(&end("r1", 1, "other", AttemptEnd::Completed, Some(0)))
            .unwrap(),
        Applied::Stale {
            run_id: "r1".into(),
            attempt: 1
        }
    );
    assert_eq!(s, before);
}

#[test]
fn rejected_commands_change_nothing() {
    let mut s = state_with(&[compute("cpu-pool"), node("n1", "cpu-pool", 4, 0)]);
    let before = s.clone();
    assert_eq!(
        s.apply(&compute("cpu-pool")),
        Err(ApplyError::ComputeExists("cpu-pool".into()))
    );
    assert!(matches!(
        s.apply(&submit("r1", "nowhere", 1, 0, 1)),
        Err(ApplyError::UnknownCompute(_))
    ));
    let mut bad = submit("r2", "cpu-pool", 1, 0, 1);
    if let Command::SubmitRun { spec, .. } = &mut bad {
        spec.command = " ".into();
    }
    assert!(matches!(s.apply(&bad), Err(ApplyError::InvalidSpec(e)) if e.path == "command"));
    let mut clash = node("n2", "cpu-pool", 4, 0);
    if let Command::RegisterNode { name, .. } = &mut clash {
        *name = "host-n1".into();
    }
    assert_eq!(
        s.apply(&clash),
        Err(ApplyError::NodeNameTaken("host-n1".into()))
    );
    assert_eq!(s, before);
}

#[test]
fn idempotency_keys_never_duplicate_a_run() {
    let mut s = state_with(&[compute("cpu-pool")]);
    let with_key = |id: &str| {
        let mut c = submit(id, "cpu-pool", 1, 0, 1);
        if let Command::SubmitRun {
            idempotency_key, ..
        } = &mut c
        {
            *idempotency_key = Some("k-1".into());
        }
        c
    };
    assert_eq!(
        s.apply(&with_key("r1")).unwrap(),
        Applied::Submitted {
            run_id: "r1".into(),
            existing: false
        }
    );
    assert_eq!(
        s.apply(&with_key("r2")).unwrap(),
        Applied::Submitted {
            run_id: "r1".into(),
            existing: true
        }
    );
    assert_eq!(s.runs.len(), 1);
    s.sanity_check().unwrap();
}

#[test]
fn cancel_of_a_queued_run_is_immediate_and_of_a_running_one_waits_for_the_agent() {
    let mut s = state_with(&[
        compute("cpu-pool"),
        node("n1", "cpu-pool", 1, 0),
        submit("r1", "cpu-pool", 1, 0, 1),
        submit("r2", "cpu-pool", 1, 0, 1),
    ]);
    place_all(&mut s, 5);
    let cancel = |id: &str| Command::CancelRun {
        run_id: id.into(),
        reason: None,
        at: 8,
    };
    apply_all(&mut s, &[cancel("r2")]);
    assert_eq!(s.runs["r2"].state, RunState::Canceled);
    apply_all(&mut s, &[cancel("r1")]);
    assert!(s.runs["r1"].cancel_requested);
    assert_eq!(s.runs["r1"].state, RunState::Scheduled);
    apply_all(
        &mut s,
        &[end("r1", 1, "n1", AttemptEnd::Canceled, Some(143))],
    );
    assert_eq!(s.runs["r1"].state, RunState::Canceled);
    assert!(matches!(
        s.apply(&cancel("r1")),
        Err(ApplyError::RunFinished { .. })
    ));
}

#[test]
fn a_lost_node_requeues_its_runs_as_new_attempts_until_max_attempts() {
    let mut s = state_with(&[
        compute("cpu-pool"),
        node("n1", "cpu-pool", 2, 0),
        node("n2", "cpu-pool", 2, 0),
        submit("r1", "cpu-pool", 1, 0, 1),
    ]);
    for attempt in 1..=3u32 {
        let now = 100_000 * attempt as u64;
        assert_eq!(place_all(&mut s, now), 1, "attempt {attempt}");
        let a = s.runs["r1"].current_attempt().unwrap();
        assert_eq!(a.number, attempt);
        let on = a.placements[0].node_id.clone();
        apply_all(
            &mut s,
            &[Command::SetNodeState {
                node_id: on.clone(),
                state: NodeState::Lost,
                reason: None,
                at: now + 1,
            }],
        );
        // The node comes back.
        apply_all(&mut s, &[node(&on, "cpu-pool", 2, 0)]);
    }
    let r = &s.runs["r1"];
    assert_eq!(r.state, RunState::Failed);
    assert!(
        r.message
            .as_deref()
            .unwrap()
            .contains("max_attempts (3) reached"),
        "{:?}",
        r.message
    );
}

#[test]
fn gangs_start_on_all_nodes_or_none_and_gpus_are_disjoint() {
    let mut s = state_with(&[
        compute("gpu-pool"),
        node("n1", "gpu-pool", 8, 4),
        submit("big", "gpu-pool", 1, 2, 2),
        submit("a", "gpu-pool", 1, 2, 1),
        submit("b", "gpu-pool", 1, 2, 1),
    ]);
    place_all(&mut s, 5);
    assert_eq!(
        s.runs["big"].state,
        RunState::Queued,
        "one node cannot hold a 2-node gang"
    );
    let gpus: Vec<_> = ["a", "b"]
        .iter()
        .flat_map(|r| s.runs[*r].attempts[0].placements[0].gpus.clone())
        .collect();
    assert_eq!(gpus, vec!["GPU-n1-0", "GPU-n1-1", "GPU-n1-2", "GPU-n1-3"]);
}

#[test]
fn snapshots_round_trip_and_commands_decode() {
    let cmds = [
        compute("cpu-pool"),
        node("n1", "cpu-pool", 2, 1),
        submit("r1", "cpu-pool", 1, 1, 1),
    ];
    let mut s = state_with(&cmds);
    place_all(&mut s, 4);
    assert_eq!(State::from_snapshot(&s.to_snapshot()).unwrap(), s);
    for c in &cmds {
        assert_eq!(&Command::decode(&c.encode()).unwrap(), c);
    }
    assert_encodes_as(&cmds[2], "submit_run.v1");
    assert!(State::from_snapshot(b"{not json").is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Node {
        n: u8,
        cpus: u8,
        gpus: u8,
    },
    Submit {
        cpus: u8,
        gpus: u8,
        instances: u8,
        priority: i8,
    },
    Schedule,
    Report {
        pick: u16,
        outcome: u8,
    },
    Cancel {
        pick: u16,
    },
    Lose {
        n: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 0u8..8, 0u8..5).prop_map(|(n, cpus, gpus)| Op::Node { n, cpus, gpus }),
        (0u8..4, 0u8..4, 1u8..3, -2i8..3).prop_map(|(cpus, gpus, instances, priority)| {
            Op::Submit {
                cpus,
                gpus,
                instances,
                priority,
            }
        }),
        Just(Op::Schedule),
        Just(Op::Schedule),
        (any::<u16>(), 0u8..6).prop_map(|(pick, outcome)| Op::Report { pick, outcome }),
        any::<u16>().prop_map(|pick| Op::Cancel { pick }),
        (0u8..6).prop_map(|n| Op::Lose { n }),
    ]
}

/// Turns random operations into the commands a leader would propose (some of them
/// invalid on purpose); returns the commands that were applied.
fn run_ops(ops: &[Op]) -> (State, Vec<Command>) {
    let mut s = State::default();
    let mut log = vec![compute("pool-a")];
    s.apply(&log[0]).unwrap();
    let mut now = 10u64;
    let mut next = 0u32;
    for op in ops {
        now += 500;
        let mut cmds = Vec::new();
        match op {
            Op::Node { n, cpus, gpus } => cmds.push(node(
                &format!("n{n}"),
                "pool-a",
                *cpus as u64,
                *gpus as usize,
            )),
            Op::Submit {
                cpus,
                gpus,
                instances,
                priority,
            } => {
                next += 1;
                let mut c = submit(
                    &format!("r{next}"),
                    "pool-a",
                    *cpus as u64,
                    *gpus as u32,
                    *instances as u32,
                );
                if let Command::SubmitRun { spec, at, .. } = &mut c {
                    spec.priority = *priority as i32 * 100;
                    *at = now;
                }
                cmds.push(c);
            }
            Op::Schedule => cmds.extend(
                schedule(&s, now)
                    .decisions
                    .into_iter()
                    .map(|d| d.into_command(now)),
            ),
            Op::Report { pick, outcome } => {
                let active: Vec<_> = s.runs.values().filter(|r| r.state.is_active()).collect();
                if let Some(run) = active.get(*pick as usize % active.len().max(1)) {
                    let a = run.current_attempt().unwrap();
                    for p in &a.placements {
                        let report = match outcome {
                            0 => AttemptReport::Running,
                            1 => AttemptReport::Preparing,
                            o => AttemptReport::Ended {
                                end: [
                                    AttemptEnd::Completed,
                                    AttemptEnd::Failed,
                                    AttemptEnd::Preempted,
                                    AttemptEnd::TimedOut,
                                ][*o as usize - 2],
                                exit_code: Some(*o as i32),
                                message: None,
                                outputs: None,
                            },
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
        }
        for c in cmds {
            let before = s.clone();
            if let Err(e) = s.sanity_check() {
                panic!("before {c:?}: {e}");
            }
            match s.apply(&c) {
                Ok(_) => log.push(c),
                Err(_) => assert_eq!(s, before, "a rejected command changed the state: {c:?}"),
            }
        }
    }
    s.sanity_check().unwrap();
    (s, log)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn apply_keeps_the_invariants_and_is_deterministic(ops in proptest::collection::vec(op(), 1..80)) {
        let (state, log) = run_ops(&ops);
        // Same commands, same state.
        let mut replay = State::default();
        for c in &log {
            replay.apply(&Command::decode(&c.encode()).unwrap()).unwrap();
        }
        prop_assert_eq!(&replay, &state);
        prop_assert_eq!(State::from_snapshot(&state.to_snapshot()).unwrap(), state.clone());
        // The scheduler never proposes an invalid decision.
        let mut s = state.clone();
        for d in schedule(&state, u64::MAX / 2).decisions {
            prop_assert!(matches!(d, Decision::Place { .. } | Decision::Preempt { .. }), "{:?}", d);
            prop_assert!(s.apply(&d.into_command(u64::MAX / 2)).is_ok());
            prop_assert!(s.sanity_check().is_ok());
        }
    }
}

#[test]
fn drained_nodes_take_no_runs_and_evicted_ones_stay_evicted_until_resumed() {
    let mut s = state_with(&[
        compute("cpu-pool"),
        node("n1", "cpu-pool", 2, 0),
        submit("r1", "cpu-pool", 1, 0, 1),
    ]);
    place_all(&mut s, 5);
    let set = |state: NodeState| Command::SetNodeState {
        node_id: "n1".into(),
        state,
        reason: None,
        at: 6,
    };
    apply_all(
        &mut s,
        &[set(NodeState::Draining), submit("r2", "cpu-pool", 1, 0, 1)],
    );
    assert_eq!(place_all(&mut s, 7), 0, "a draining node takes no new runs");
    assert_eq!(
        s.runs["r1"].state,
        RunState::Scheduled,
        "running ones carry on"
    );
    apply_all(&mut s, &[set(NodeState::Evicted)]);
    assert_eq!(
        s.runs["r1"].state,
        RunState::Queued,
        "evicted: restarted as a new attempt"
    );
    apply_all(&mut s, &[node("n1", "cpu-pool", 2, 0)]);
    assert_eq!(
        s.nodes["n1"].state,
        NodeState::Evicted,
        "re-registering does not undo an eviction"
    );
    apply_all(&mut s, &[set(NodeState::Ready)]);
    assert_eq!(place_all(&mut s, 100_000), 2);
    assert_eq!(s.runs["r1"].attempt_number(), 2);
}

/// A seal of run `r1`'s missing attempt `attempt`, as refused.
fn no_attempt(blob: SealedBlob, attempt: u32) -> ApplyError {
    ApplyError::UnknownAttempt {
        blob,
        run_id: "r1".into(),
        attempt,
    }
}

fn seal(run: &str, attempt: u32, rank: u32, fill: char, bytes: u64) -> Command {
    Command::SealLog {
        run_id: run.into(),
        attempt,
        rank,
        log: SealedLog {
            sha256: fill.to_string().repeat(64),
            bytes,
        },
    }
}

#[test]
fn sealed_logs_are_recorded_once_per_rank_and_survive_snapshots() {
    let mut s = one_queued_run();
    // A state without sealed logs encodes as before (no "logs" key), so old snapshots and
    // new ones without logs look the same and decode alike.
    place_all(&mut s, 5);
    let old = s.to_snapshot();
    assert!(!String::from_utf8_lossy(&old).contains("\"logs\""));
    assert_eq!(State::from_snapshot(&old).unwrap(), s);

    let bad_sha = Command::SealLog {
        run_id: "r1".into(),
        attempt: 1,
        rank: 0,
        log: SealedLog {
            sha256: "not-a-hash".into(),
            bytes: 3,
        },
    };
    assert_invalid(
        &mut s,
        "seal",
        [
            (
                bad_sha,
                ApplyError::InvalidBlobHash {
                    blob: SealedBlob::Log,
                    run_id: "r1".into(),
                    sha256: "not-a-hash".into(),
                },
                "64 lowercase hex digits",
            ),
            (
                seal("r1", 2, 0, 'a', 3),
                no_attempt(SealedBlob::Log, 2),
                "no attempt 2",
            ),
            (
                seal("r1", 0, 0, 'a', 3),
                no_attempt(SealedBlob::Log, 0),
                "no attempt 0",
            ),
            (
                seal("r1", 1, 1, 'a', 3),
                ApplyError::UnknownRank {
                    run_id: "r1".into(),
                    attempt: 1,
                    ranks: 1,
                    rank: 1,
                },
                "has 1 rank(s), not rank 1",
            ),
        ],
    );
    assert_eq!(
        s.apply(&seal("nope", 1, 0, 'a', 3)),
        Err(ApplyError::UnknownRun("nope".into()))
    );

    // The leader seals the log, then proposes the end: both are on the attempt.
    apply_all(
        &mut s,
        &[
            seal("r1", 1, 0, 'a', 12),
            end("r1", 1, "n1", AttemptEnd::Completed, Some(0)),
        ],
    );
    let attempt = &s.runs["r1"].attempts[0];
    assert_eq!(s.runs["r1"].state, RunState::Completed);
    assert_eq!(
        attempt.logs.get(&0),
        Some(&SealedLog {
            sha256: "a".repeat(64),
            bytes: 12
        })
    );
    // A retransmitted seal (a new leader, the same rank) keeps the first record.
    assert_eq!(s.apply(&seal("r1", 1, 0, 'b', 99)), Ok(Applied::Done));
    assert_eq!(s.runs["r1"].attempts[0].logs[&0].sha256, "a".repeat(64));
    s.sanity_check().unwrap();

    let snap = s.to_snapshot();
    assert!(String::from_utf8_lossy(&snap).contains("\"logs\""));
    assert_eq!(State::from_snapshot(&snap).unwrap(), s);
    assert_encodes_as(&seal("r1", 1, 0, 'c', 1), "seal_log.v1");
}

fn seal_metrics(run: &str, attempt: u32, fill: char, lines: u64) -> Command {
    Command::SealMetrics {
        run_id: run.into(),
        attempt,
        metrics: SealedMetrics {
            sha256: fill.to_string().repeat(64),
            bytes: lines * 10,
            lines,
        },
    }
}

#[test]
fn sealed_metrics_keep_the_fullest_record_and_survive_snapshots() {
    let mut s = one_queued_run();
    place_all(&mut s, 5);
    let old = s.to_snapshot();
    assert!(!String::from_utf8_lossy(&old).contains("\"metrics\""));
    let bad_sha = Command::SealMetrics {
        run_id: "r1".into(),
        attempt: 1,
        metrics: SealedMetrics {
            sha256: "nope".into(),
            bytes: 1,
            lines: 1,
        },
    };
    assert_invalid(
        &mut s,
        "seal",
        [
            (
                bad_sha,
                ApplyError::InvalidBlobHash {
                    blob: SealedBlob::Metrics,
                    run_id: "r1".into(),
                    sha256: "nope".into(),
                },
                "sha256",
            ),
            (
                seal_metrics("r1", 2, 'a', 3),
                no_attempt(SealedBlob::Metrics, 2),
                "metrics of run r1: it has no attempt 2",
            ),
            (
                seal_metrics("r1", 0, 'a', 3),
                no_attempt(SealedBlob::Metrics, 0),
                "no attempt 0",
            ),
        ],
    );
    assert_eq!(
        s.apply(&seal_metrics("nope", 1, 'a', 3)),
        Err(ApplyError::UnknownRun("nope".into()))
    );
    apply_all(&mut s, &[seal_metrics("r1", 1, 'a', 10)]);
    // A seal with fewer lines (a rank's older view) does not replace a fuller one.
    apply_all(&mut s, &[seal_metrics("r1", 1, 'b', 4)]);
    assert_eq!(
        s.runs["r1"].attempts[0].metrics.as_ref().unwrap().sha256,
        "a".repeat(64)
    );
    apply_all(&mut s, &[seal_metrics("r1", 1, 'c', 11)]);
    assert_eq!(s.runs["r1"].attempts[0].metrics.as_ref().unwrap().lines, 11);
    s.sanity_check().unwrap();
    let snap = s.to_snapshot();
    assert_eq!(State::from_snapshot(&snap).unwrap(), s);
    assert_encodes_as(&seal_metrics("r1", 1, 'd', 1), "seal_metrics.v1");
}

#[test]
fn server_addresses_are_replicated_changed_and_removed() {
    let set = |id: u64, address: &str| Command::SetServerAddress {
        id,
        address: address.into(),
    };
    let mut s = state_with(&[
        set(1, "10.0.0.1:7070"),
        set(2, "10.0.0.2:7070"),
        set(3, "h3:7070"),
        set(2, "10.0.0.20:7070"),
    ]);
    assert_eq!(
        s.servers,
        BTreeMap::from([
            (1, "10.0.0.1:7070".to_string()),
            (2, "10.0.0.20:7070".to_string()),
            (3, "h3:7070".to_string()),
        ])
    );
    assert_invalid(
        &mut s,
        "address",
        [
            (
                set(0, "h:1"),
                ApplyError::InvalidServerId(0),
                "server ids start at 1",
            ),
            (
                set(4, ""),
                ApplyError::InvalidServerAddress(String::new()),
                "host:port",
            ),
            (
                set(4, "h 4:7070"),
                ApplyError::InvalidServerAddress("h 4:7070".into()),
                "no spaces",
            ),
            (
                set(4, &"h".repeat(300)),
                ApplyError::InvalidServerAddress("h".repeat(300)),
                "host:port (1 to 256 characters",
            ),
        ],
    );
    apply_all(
        &mut s,
        &[
            Command::RemoveServerAddress { id: 3 },
            Command::RemoveServerAddress { id: 9 },
        ],
    );
    assert_eq!(s.servers.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(State::from_snapshot(&s.to_snapshot()).unwrap(), s);
    // A snapshot written before addresses were replicated decodes with none.
    let old = br#"{"computes":{},"nodes":{},"runs":{},"queue":[],"idempotency":{},"next_seq":0}"#;
    assert!(State::from_snapshot(old).unwrap().servers.is_empty());
    assert_encodes_as(&set(5, "h5:7070"), "set_server_address.v1");
    assert_encodes_as(
        &Command::RemoveServerAddress { id: 5 },
        "remove_server_address.v1",
    );
}

/// Runs `r1` and `r2` (idempotency key `k2`) finished at 10, `r3` queued.
fn two_finished_one_queued() -> State {
    let mut s = one_queued_run();
    let Command::SubmitRun { spec, .. } = submit("r0", "cpu-pool", 1, 0, 1) else {
        unreachable!()
    };
    apply_all(
        &mut s,
        &[
            Command::SubmitRun {
                run_id: "r2".into(),
                spec: spec.clone(),
                idempotency_key: Some("k2".into()),
                at: 3,
            },
            submit("r3", "cpu-pool", 64, 0, 1),
        ],
    );
    assert_eq!(place_all(&mut s, 5), 2);
    apply_all(
        &mut s,
        &[
            end("r1", 1, "n1", AttemptEnd::Completed, Some(0)),
            end("r2", 1, "n1", AttemptEnd::Failed, Some(1)),
        ],
    );
    s
}

fn archive_of(s: &State, ids: &[&str], finished_before: u64) -> Command {
    let runs: Vec<&crate::state::Run> = ids.iter().map(|id| &s.runs[*id]).collect();
    let blob = crate::state::encode_archive(&runs);
    Command::ArchiveRuns {
        run_ids: ids.iter().map(|id| id.to_string()).collect(),
        archive: crate::state::RunArchive {
            sha256: "c".repeat(64),
            runs: ids.len() as u64,
            bytes: blob.len() as u64,
            finished_before,
            at: 100,
        },
    }
}

#[test]
fn retention_archives_finished_runs_out_of_the_state_and_keeps_them_whole() {
    let mut s = two_finished_one_queued();
    assert_eq!(
        s.archivable(10, 100),
        Vec::<String>::new(),
        "cut-off is exclusive"
    );
    assert_eq!(
        s.archivable(11, 100),
        vec!["r1", "r2"],
        "oldest first, queued r3 stays"
    );
    assert_eq!(s.archivable(11, 1), vec!["r1"], "at most max");

    let runs: Vec<&crate::state::Run> = vec![&s.runs["r1"], &s.runs["r2"]];
    let blob = crate::state::encode_archive(&runs);
    let back = crate::state::decode_archive(&blob).unwrap();
    assert_eq!(back, vec![s.runs["r1"].clone(), s.runs["r2"].clone()]);
    let other = String::from_utf8(blob)
        .unwrap()
        .replace(crate::state::ARCHIVE_FORMAT, "muster-run-archive/9");
    let e = crate::state::decode_archive(other.as_bytes()).unwrap_err();
    assert!(e.contains("upgrade"), "{e}");

    let cmd = archive_of(&s, &["r1", "r2"], 11);
    assert_encodes_as(&cmd, "archive_runs.v1");
    let before_bytes = s.to_snapshot().len();
    apply_all(&mut s, std::slice::from_ref(&cmd));
    assert!(!s.runs.contains_key("r1") && !s.runs.contains_key("r2"));
    assert!(s.runs.contains_key("r3"));
    assert!(s.idempotency.is_empty(), "r2's key went with it");
    assert_eq!(s.archives.len(), 1);
    assert_eq!(s.archives[0].runs, 2);
    let ids: Vec<&str> = s.runs_newest_first(None).map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec!["r3"]);
    let after = s.to_snapshot();
    assert!(after.len() < before_bytes, "the snapshot shrank");
    assert_eq!(State::from_snapshot(&after).unwrap(), s);
    // The key is free again: a new submission with it makes a new run.
    let Command::SubmitRun { spec, .. } = submit("x", "cpu-pool", 1, 0, 1) else {
        unreachable!()
    };
    let again = s
        .apply(&Command::SubmitRun {
            run_id: "r4".into(),
            spec,
            idempotency_key: Some("k2".into()),
            at: 200,
        })
        .unwrap();
    assert_eq!(
        again,
        Applied::Submitted {
            run_id: "r4".into(),
            existing: false
        }
    );
}

#[test]
fn an_archive_that_names_a_live_late_unknown_or_repeated_run_changes_nothing() {
    let mut s = two_finished_one_queued();
    let bad = |cmd: Command, f: &dyn Fn(&mut crate::state::RunArchive)| {
        let Command::ArchiveRuns {
            run_ids,
            mut archive,
        } = cmd
        else {
            unreachable!()
        };
        f(&mut archive);
        Command::ArchiveRuns { run_ids, archive }
    };
    let invalid = |why: &str| ApplyError::InvalidArchive(why.to_string());
    let live = archive_of(&s, &["r1"], 11);
    let Command::ArchiveRuns { archive, .. } = &live else {
        unreachable!()
    };
    let names = |ids: &[&str], runs: u64| Command::ArchiveRuns {
        run_ids: ids.iter().map(|i| i.to_string()).collect(),
        archive: crate::state::RunArchive {
            runs,
            ..archive.clone()
        },
    };
    let late = archive_of(&s, &["r1"], 10);
    assert_invalid(
        &mut s,
        "archive",
        [
            (
                names(&["r1", "r3"], 2),
                invalid("run r3 is queued and did not finish before the cut-off"),
                "did not finish",
            ),
            (
                late,
                invalid("run r1 is completed and did not finish before the cut-off"),
                "cut-off",
            ),
            (
                names(&["r1", "nope"], 2),
                ApplyError::UnknownRun("nope".into()),
                "does not exist",
            ),
            (
                names(&["r1", "r1"], 2),
                invalid("run r1 is named twice"),
                "twice",
            ),
            (
                names(&[], 0),
                invalid("an archive holds 1 to 2000 runs, not 0"),
                "1 to 2000",
            ),
            (
                bad(live.clone(), &|a| a.sha256 = "XYZ".into()),
                invalid("\"XYZ\" is not a SHA-256 in lowercase hex"),
                "SHA-256",
            ),
            (
                bad(live.clone(), &|a| a.runs = 5),
                invalid("the archive says it holds 5 runs but 1 are named"),
                "holds 5",
            ),
        ],
    );
    apply_all(&mut s, std::slice::from_ref(&live));
    assert_eq!(
        s.apply(&archive_of(&State::default(), &[], 11)),
        Err(invalid("an archive holds 1 to 2000 runs, not 0"))
    );
    let mut again = names(&["r2"], 1);
    if let Command::ArchiveRuns { archive, .. } = &mut again {
        archive.sha256 = "c".repeat(64);
    }
    assert_eq!(
        s.apply(&again),
        Err(invalid(&format!(
            "archive {} is already recorded",
            "c".repeat(64)
        )))
    );
}

#[test]
fn data_asset_versions_are_immutable_and_the_latest_is_the_last_made() {
    use crate::data::{DataAsset, DataSource};
    use crate::spec::OutputKind;
    let asset = |version: &str, url: &str| Command::CreateDataAsset {
        asset: Box::new(DataAsset {
            name: "iris".into(),
            version: version.into(),
            workspace: "default".into(),
            kind: OutputKind::UriFile,
            source: DataSource::Url { url: url.into() },
            description: None,
            created_at: 5,
            created_by: "user:ada".into(),
        }),
    };
    let mut s = State::default();
    s.apply(&asset("1", "https://example.org/v1.csv")).unwrap();
    s.apply(&asset("2", "https://example.org/v2.csv")).unwrap();
    let before = s.clone();
    assert!(matches!(
        s.apply(&asset("1", "https://example.org/other.csv")),
        Err(ApplyError::DataAssetExists { .. })
    ));
    assert_eq!(s, before, "a refused version changes nothing");
    let url = |v: Option<&str>| {
        s.data_asset("default", "iris", v)
            .map(|a| a.input_path())
            .unwrap()
    };
    assert_eq!(url(Some("1")), "https://example.org/v1.csv");
    assert_eq!(url(None), "https://example.org/v2.csv");
    assert!(s.data_asset("other", "iris", None).is_none());
    assert_encodes_as(
        &asset("3", "https://example.org/v3.csv"),
        "create_data_asset.v1",
    );
    let snap = State::from_snapshot(&s.to_snapshot()).unwrap();
    assert_eq!(snap.data_assets, s.data_assets);
}

#[test]
fn a_node_is_removed_only_once_its_agent_is_gone_and_its_credential_goes_with_it() {
    let mut s = state_with(&[compute("farm"), node("n1", "farm", 2, 0)]);
    s.access.tokens.insert(
        "agt1".into(),
        crate::access::Token {
            id: "agt1".into(),
            principal: crate::access::Principal::Agent {
                node: "host-n1".into(),
                compute: "farm".into(),
            },
            name: "agent credential".into(),
            hash: "00".repeat(32),
            created_at: 1,
            expires_at: None,
            revoked_at: None,
            created_by: "server:1".into(),
        },
    );
    let remove = Command::RemoveNode {
        node_id: "n1".into(),
        at: 50,
    };
    // A ready node's agent may still be running: refused, and nothing changes.
    let before = s.clone();
    match s.apply(&remove) {
        Err(ApplyError::NodeInUse { node, why }) => {
            assert_eq!(node, "host-n1");
            assert!(why.contains("stop its agent first"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s, before);
    // Lost with a run on it: still refused until the run is gone.
    apply_all(&mut s, &[submit("r1", "farm", 1, 0, 1)]);
    assert_eq!(place_all(&mut s, 10), 1);
    s.nodes.get_mut("n1").unwrap().state = NodeState::Draining;
    assert!(
        matches!(s.apply(&remove), Err(ApplyError::NodeInUse { why, .. }) if why.contains("active attempt"))
    );
    apply_all(
        &mut s,
        &[Command::SetNodeState {
            node_id: "n1".into(),
            state: NodeState::Lost,
            reason: None,
            at: 40,
        }],
    );
    s.apply(&remove).unwrap();
    assert!(!s.nodes.contains_key("n1"));
    assert_eq!(s.access.tokens["agt1"].revoked_at, Some(50));
    assert!(matches!(s.apply(&remove), Err(ApplyError::UnknownNode(_))));
    // The target has no node left, so it may be deleted.
    assert_encodes_as(&remove, "remove_node.v1");
}

#[test]
fn a_compute_target_is_updated_but_keeps_its_type_workspace_and_provisioner() {
    let mut s = state_with(&[compute("farm")]);
    let mut spec = s.computes["farm"].spec.clone();
    spec.quota.max_gpus = Some(8);
    spec.description = Some("the lab".into());
    s.apply(&Command::UpdateCompute {
        spec: spec.clone(),
        at: 5,
    })
    .unwrap();
    assert_eq!(s.computes["farm"].spec, spec);
    assert_eq!(s.computes["farm"].created_at, 1);
    let before = s.clone();
    let mut retyped = spec.clone();
    retyped.kind = ComputeKind::Cluster;
    match s.apply(&Command::UpdateCompute {
        spec: retyped,
        at: 6,
    }) {
        Err(ApplyError::InvalidSpec(e)) => assert_eq!(e.path, "type"),
        other => panic!("{other:?}"),
    }
    let mut unknown = spec;
    unknown.name = "nope".into();
    assert!(matches!(
        s.apply(&Command::UpdateCompute {
            spec: unknown,
            at: 7
        }),
        Err(ApplyError::UnknownCompute(_))
    ));
    assert_eq!(s, before);
}

#[test]
fn a_docker_target_s_node_labels_change_but_not_its_image_and_an_instance_stops_and_starts() {
    use crate::compute::{DockerProvisioner, Provisioner};
    let mut docker = ComputeSpec::new("boxes", ComputeKind::Instance);
    docker.provisioner = Provisioner::Docker(DockerProvisioner::default());
    let mut s = state_with(&[compute("farm")]);
    s.apply(&Command::CreateCompute {
        spec: docker.clone(),
        at: 2,
    })
    .unwrap();
    let mut relabelled = docker.clone();
    if let Provisioner::Docker(d) = &mut relabelled.provisioner {
        d.labels.insert("zone".into(), "b".into());
    }
    s.apply(&Command::UpdateCompute {
        spec: relabelled.clone(),
        at: 3,
    })
    .unwrap();
    assert_eq!(s.computes["boxes"].spec.provisioner, relabelled.provisioner);
    let mut reimaged = relabelled.clone();
    if let Provisioner::Docker(d) = &mut reimaged.provisioner {
        d.image = "other:tag".into();
    }
    match s.apply(&Command::UpdateCompute {
        spec: reimaged,
        at: 4,
    }) {
        Err(ApplyError::InvalidSpec(e)) => assert_eq!(e.path, "provisioner"),
        other => panic!("{other:?}"),
    }

    // Stop and start: only an instance with a provisioner; an update keeps the flag.
    let stop = Command::SetComputeStopped {
        name: "boxes".into(),
        stopped: true,
        at: 5,
    };
    s.apply(&stop).unwrap();
    assert_encodes_as(&stop, "set_compute_stopped.v1");
    assert!(s.computes["boxes"].spec.stopped);
    assert_eq!(s.computes["boxes"].spec.scale_bounds(), Some((0, 0)));
    s.apply(&Command::UpdateCompute {
        spec: relabelled,
        at: 6,
    })
    .unwrap();
    assert!(
        s.computes["boxes"].spec.stopped,
        "an update does not start it"
    );
    s.apply(&Command::SetComputeStopped {
        name: "boxes".into(),
        stopped: false,
        at: 7,
    })
    .unwrap();
    assert_eq!(s.computes["boxes"].spec.scale_bounds(), Some((1, 1)));
    match s.apply(&Command::SetComputeStopped {
        name: "farm".into(),
        stopped: true,
        at: 8,
    }) {
        Err(ApplyError::InvalidSpec(e)) => assert_eq!(e.path, "type"),
        other => panic!("{other:?}"),
    }
}

fn record(run: &str, node: &str, attempt: u32, seq: u64, fill: char) -> Command {
    Command::RecordCheckpoint {
        run_id: run.into(),
        node_id: node.into(),
        checkpoint: Checkpoint {
            sha256: fill.to_string().repeat(64),
            attempt,
            seq,
            files: 1,
            bytes: 3,
            cause: CheckpointCause::Periodic,
            at: 50,
        },
    }
}

#[test]
fn a_checkpoint_is_fenced_so_a_stale_attempt_cannot_overwrite_a_newer_ones() {
    let mut s = state_with(&[
        compute("cpu-pool"),
        node("n1", "cpu-pool", 2, 0),
        node("n2", "cpu-pool", 2, 0),
        submit("r1", "cpu-pool", 1, 0, 1),
    ]);
    assert_eq!(place_all(&mut s, 100), 1);
    let first = s.runs["r1"].attempts[0].placements[0].node_id.clone();
    let other = if first == "n1" { "n2" } else { "n1" };
    assert_encodes_as(&record("r1", &first, 1, 1, 'a'), "record_checkpoint.v1");
    // A first attempt starts from nothing; its rank 0's node records.
    assert_eq!(s.runs["r1"].attempts[0].resumed_from, None);
    apply_all(&mut s, &[record("r1", &first, 1, 2, 'a')]);
    let stale = Applied::Stale {
        run_id: "r1".into(),
        attempt: 1,
    };
    // Not newer (a re-sent or late periodic record), or from a node that is not rank 0's.
    let before = s.clone();
    for cmd in [
        record("r1", &first, 1, 2, 'b'),
        record("r1", &first, 1, 1, 'b'),
        record("r1", other, 1, 3, 'b'),
    ] {
        assert_eq!(s.apply(&cmd).unwrap(), stale, "{cmd:?}");
        assert_eq!(s, before, "{cmd:?} changes nothing");
    }
    // A bad hash, an unknown run: refused.
    let mut bad = record("r1", &first, 1, 3, 'b');
    if let Command::RecordCheckpoint { checkpoint, .. } = &mut bad {
        checkpoint.sha256 = "nope".into();
    }
    assert!(matches!(
        s.apply(&bad),
        Err(ApplyError::InvalidBlobHash {
            blob: SealedBlob::Checkpoint,
            ..
        })
    ));
    assert_eq!(
        s.apply(&record("r9", &first, 1, 3, 'b')),
        Err(ApplyError::UnknownRun("r9".into()))
    );
    // The node is lost: attempt 2 starts elsewhere from attempt 1's checkpoint.
    apply_all(
        &mut s,
        &[Command::SetNodeState {
            node_id: first.clone(),
            state: NodeState::Lost,
            reason: None,
            at: 200,
        }],
    );
    assert!(
        s.runs["r1"]
            .message
            .as_deref()
            .unwrap()
            .contains("resuming from its checkpoint as attempt 2"),
        "{:?}",
        s.runs["r1"].message
    );
    assert_eq!(place_all(&mut s, 1_000_000), 1);
    let a2 = &s.runs["r1"].attempts[1];
    assert_eq!(a2.placements[0].node_id, other);
    let resumed = a2.resumed_from.clone().expect("attempt 2 resumes");
    assert_eq!((resumed.attempt, resumed.seq), (1, 2));
    // The lost node's attempt 1 still runs and uploads: fenced, whatever its number.
    let before = s.clone();
    assert_eq!(s.apply(&record("r1", &first, 1, 99, 'c')).unwrap(), stale);
    assert_eq!(s, before);
    // Attempt 2's own checkpoint replaces it, even with a lower number.
    apply_all(&mut s, &[record("r1", other, 2, 1, 'd')]);
    let c = s.runs["r1"].checkpoint.clone().unwrap();
    assert_eq!((c.attempt, c.sha256.chars().next()), (2, Some('d')));
    // Both the latest checkpoint and the one attempt 2 started from stay referenced.
    let (_, blobs) = s.referenced_blobs();
    assert!(blobs.contains(&"a".repeat(64)) && blobs.contains(&"d".repeat(64)));
    assert!(s.runs["r1"].references_blob(&"a".repeat(64)));
    let restored = State::from_snapshot(&s.to_snapshot()).unwrap();
    assert_eq!(restored, s);
}
