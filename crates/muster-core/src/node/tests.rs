//! The node protocol's attempt life cycle: assignment once, stops and fences once, an end
//! taken only whole (resume offsets), and the lost-ack round trip.

use std::collections::BTreeMap;

use super::*;
use crate::compute::{ComputeKind, ComputeSpec, Tier};
use crate::resources::Capacity;
use crate::schedule::schedule;
use crate::spec::RunSpec;
use crate::state::{AttemptEnd, Checkpoint, CheckpointCause, SealedLog};

fn key(run: &str) -> AttemptKey {
    (run.to_string(), 1)
}

/// A state with node n1 on `local` and run r1 placed on it (attempt 1, rank 0).
fn placed() -> State {
    let mut s = State::default();
    let cmds = [
        Command::CreateCompute {
            spec: ComputeSpec::new("local", ComputeKind::Local),
            at: 0,
        },
        Command::RegisterNode {
            node_id: "n1".into(),
            name: "host-1".into(),
            compute: "local".into(),
            capacity: Capacity {
                cpu_millis: 8_000,
                memory_bytes: 16 << 30,
                gpus: vec![],
                max_runs: 0,
            },
            labels: BTreeMap::new(),
            tier: Tier::Dedicated,
            address: "10.0.0.1".into(),
            at: 0,
        },
        Command::SubmitRun {
            run_id: "r1".into(),
            spec: Box::new(RunSpec::new("python train.py")),
            idempotency_key: None,
            at: 1,
        },
    ];
    for c in cmds {
        s.apply(&c).unwrap();
    }
    for d in schedule(&s, 2).decisions {
        s.apply(&d.into_command(2)).unwrap();
    }
    assert!(s.nodes["n1"].attempts.contains(&key("r1")));
    s
}

fn ended(log_bytes: u64, metric_bytes: u64, outputs: Option<&str>) -> Report {
    Report {
        attempt: key("r1"),
        report: AttemptReport::Ended {
            end: AttemptEnd::Completed,
            exit_code: Some(0),
            message: None,
            outputs: outputs.map(str::to_string),
        },
        log_bytes,
        metric_bytes,
        checkpoint: None,
    }
}

#[test]
fn an_assignment_is_given_once_and_not_to_an_agent_that_runs_it() {
    let s = placed();
    let mut session = Session::default();
    assert_eq!(
        orders(&s, "n1", &mut session),
        vec![Order::Assign {
            attempt: key("r1"),
            rank: 0
        }]
    );
    assert_eq!(orders(&s, "n1", &mut session), vec![]);
    // A new session (a reconnect) whose agent already runs it: nothing to assign.
    let mut reconnected = Session {
        running: [key("r1")].into(),
        ..Session::default()
    };
    assert_eq!(orders(&s, "n1", &mut reconnected), vec![]);
    assert_eq!(orders(&s, "n2", &mut Session::default()), vec![]);
}

#[test]
fn cancel_and_fence_are_stop_orders_given_once() {
    let mut s = placed();
    let mut session = Session {
        running: [key("r1"), key("gone")].into(),
        ..Session::default()
    };
    // The agent runs an attempt the state does not place here: fenced.
    assert_eq!(
        orders(&s, "n1", &mut session),
        vec![Order::Stop {
            attempt: key("gone"),
            reason: StopReason::Stale
        }]
    );
    s.apply(&Command::CancelRun {
        run_id: "r1".into(),
        reason: None,
        at: 3,
    })
    .unwrap();
    assert_eq!(
        orders(&s, "n1", &mut session),
        vec![Order::Stop {
            attempt: key("r1"),
            reason: StopReason::Canceled
        }]
    );
    assert_eq!(orders(&s, "n1", &mut session), vec![]);
    assert_eq!(StopReason::Canceled.as_str(), "canceled");
}

#[test]
fn an_end_with_missing_log_or_metric_bytes_asks_to_resume_from_what_is_held() {
    let s = placed();
    let held = Held {
        log_bytes: 100,
        metric_bytes: 10,
    };
    assert_eq!(
        on_report(&s, "n1", &ended(250, 10, None), held, 9),
        vec![Effect::ResumeLog {
            attempt: key("r1"),
            offset: 100
        }]
    );
    assert_eq!(
        on_report(&s, "n1", &ended(100, 40, None), held, 9),
        vec![Effect::ResumeMetrics {
            attempt: key("r1"),
            offset: 10
        }]
    );
}

#[test]
fn a_whole_end_is_sealed_and_replicated_before_it_is_proposed() {
    let s = placed();
    let report = ended(100, 0, Some("abc"));
    let effects = on_report(
        &s,
        "n1",
        &report,
        Held {
            log_bytes: 100,
            metric_bytes: 0,
        },
        9,
    );
    assert_eq!(
        effects,
        vec![
            Effect::SealLog {
                attempt: key("r1"),
                rank: 0
            },
            Effect::SealMetrics {
                attempt: key("r1"),
                rank: 0
            },
            Effect::ReplicateOutputs {
                sha256: "abc".into()
            },
            Effect::Propose(Box::new(Command::ReportAttempt {
                run_id: "r1".into(),
                attempt: 1,
                node_id: "n1".into(),
                report: report.report.clone(),
                at: 9,
            })),
        ]
    );
}

#[test]
fn an_end_resent_after_a_lost_ack_is_acknowledged_without_sealing_again() {
    let mut s = placed();
    let report = ended(5, 0, None);
    let mut session = Session {
        running: [key("r1")].into(),
        ..Session::default()
    };
    // The first delivery: sealed, proposed, applied — and the ack is lost on the way.
    let log = SealedLog {
        sha256: "e".repeat(64),
        bytes: 5,
    };
    s.apply(&Command::SealLog {
        run_id: "r1".into(),
        attempt: 1,
        rank: 0,
        log,
    })
    .unwrap();
    let Effect::Propose(cmd) = on_report(&s, "n1", &report, Held::default(), 9)
        .pop()
        .unwrap()
    else {
        panic!("the report is proposed");
    };
    let applied = s.apply(&cmd).unwrap();
    // The agent re-sends its end on a new session: the log is sealed already (no resume,
    // no second seal) and the proposal is stale; the end is acknowledged all the same.
    let effects = on_report(&s, "n1", &report, Held::default(), 10);
    assert_eq!(effects.len(), 1, "only the proposal: {effects:?}");
    let Effect::Propose(again) = &effects[0] else {
        panic!("proposes");
    };
    let stale = s.apply(again).unwrap();
    assert!(matches!(stale, Applied::Stale { .. }), "{stale:?}");
    for result in [applied, stale] {
        let after = on_applied(&s, "n1", &mut session, &report, &result);
        assert_eq!(
            after,
            vec![
                After::RemoveLiveLog {
                    attempt: key("r1"),
                    rank: 0
                },
                After::Ack { attempt: key("r1") }
            ]
        );
        assert!(!session.running.contains(&key("r1")));
    }
}

#[test]
fn a_stale_start_is_fenced_once() {
    let s = placed();
    let mut session = Session::default();
    let report = Report {
        attempt: key("old"),
        report: AttemptReport::Running,
        log_bytes: 0,
        metric_bytes: 0,
        checkpoint: None,
    };
    let stale = Applied::Stale {
        run_id: "old".into(),
        attempt: 1,
    };
    assert_eq!(
        on_applied(&s, "n1", &mut session, &report, &stale),
        vec![After::Stop {
            attempt: key("old"),
            reason: StopReason::Stale
        }]
    );
    assert_eq!(on_applied(&s, "n1", &mut session, &report, &stale), vec![]);
    assert!(session.running.contains(&key("old")));
    // A report of attempt 0 (a confused agent) is no rank of anything, and no panic.
    assert_eq!(rank_of(&s, "n1", ("r1", 0)), None);
    assert!(!is_sealed(&s, ("r1", 0), 0));
}

fn taken(seq: u64, fill: char) -> TakenCheckpoint {
    TakenCheckpoint {
        sha256: fill.to_string().repeat(64),
        seq,
        files: 2,
        bytes: 10,
        cause: CheckpointCause::Preempted,
    }
}

#[test]
fn a_checkpoint_goes_on_a_majority_and_is_recorded_before_the_end() {
    let mut s = placed();
    let mut report = ended(0, 0, None);
    report.checkpoint = Some(taken(3, 'c'));
    let effects = on_report(&s, "n1", &report, Held::default(), 7);
    let record = Command::RecordCheckpoint {
        run_id: "r1".into(),
        node_id: "n1".into(),
        checkpoint: Checkpoint {
            sha256: "c".repeat(64),
            attempt: 1,
            seq: 3,
            files: 2,
            bytes: 10,
            cause: CheckpointCause::Preempted,
            at: 7,
        },
    };
    assert_eq!(
        effects[2..],
        [
            Effect::ReplicateCheckpoint {
                sha256: "c".repeat(64)
            },
            Effect::RecordCheckpoint(Box::new(record.clone())),
            Effect::Propose(Box::new(Command::ReportAttempt {
                run_id: "r1".into(),
                attempt: 1,
                node_id: "n1".into(),
                report: report.report.clone(),
                at: 7,
            })),
        ]
    );
    assert_eq!(s.apply(&record).unwrap(), Applied::Done);
    // Recorded: the same one again (a re-sent end) or an older periodic one is not
    // replicated nor proposed; neither is one from a node that is not rank 0's, or of
    // an attempt that is not the run's latest.
    assert_eq!(
        on_checkpoint(&s, "n1", ("r1", 1), &taken(3, 'c'), 8),
        vec![]
    );
    assert_eq!(
        on_checkpoint(&s, "n1", ("r1", 1), &taken(2, 'd'), 8),
        vec![]
    );
    assert_eq!(
        on_checkpoint(&s, "n2", ("r1", 1), &taken(4, 'd'), 8),
        vec![]
    );
    assert_eq!(
        on_checkpoint(&s, "n1", ("r1", 2), &taken(4, 'd'), 8),
        vec![]
    );
    assert_eq!(
        on_checkpoint(&s, "n1", ("gone", 1), &taken(4, 'd'), 8),
        vec![]
    );
    assert_eq!(
        on_checkpoint(&s, "n1", ("r1", 1), &taken(4, 'd'), 8).len(),
        2,
        "a newer one of the same attempt is recorded"
    );
    s.sanity_check().unwrap();
}
