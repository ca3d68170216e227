//! Sweeps and pipelines driven through `State::apply`, as the leader drives them: the pure
//! controller/planner computes decisions from the state, the decisions go in as commands,
//! and runs are placed and reported like any other.

use std::collections::BTreeMap;

use crate::compute::{ComputeKind, ComputeSpec, Tier};
use crate::metrics::Series;
use crate::pipeline::{PipelineDecision, parse_pipeline_yaml, plan};
use crate::resources::Capacity;
use crate::schedule::schedule;
use crate::state::{
    ApplyError, AttemptEnd, AttemptReport, Command, PipelineRule, RunState, State, SweepRule,
};
use crate::sweep::{SweepDecision, SweepEnd, parse_sweep_yaml, step};

fn cluster() -> State {
    let mut s = State::default();
    for c in [
        Command::CreateCompute {
            spec: ComputeSpec::new("local", ComputeKind::Local),
            at: 0,
        },
        Command::RegisterNode {
            node_id: "n1".into(),
            name: "host-1".into(),
            compute: "local".into(),
            capacity: Capacity {
                cpu_millis: 64_000,
                memory_bytes: 256 << 30,
                gpus: vec![],
                max_runs: 0,
            },
            labels: BTreeMap::new(),
            tier: Tier::Dedicated,
            address: "10.0.0.1".into(),
            at: 0,
        },
    ] {
        s.apply(&c).unwrap();
    }
    s
}

/// Applies `cmd`, checks the state, and checks that the command survives the log's encoding.
fn apply(s: &mut State, cmd: &Command) {
    assert_eq!(&Command::decode(&cmd.encode()).unwrap(), cmd);
    s.apply(cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    s.sanity_check().unwrap();
}

/// Places every queued run (the scheduler's decisions).
fn place_all(s: &mut State, now: u64) {
    for d in schedule(s, now).decisions {
        s.apply(&d.into_command(now)).unwrap();
    }
    s.sanity_check().unwrap();
}

fn end(s: &mut State, run_id: &str, end: AttemptEnd, outputs: Option<String>) {
    let attempt = s.runs[run_id].attempt_number();
    apply(
        s,
        &Command::ReportAttempt {
            run_id: run_id.into(),
            attempt,
            node_id: "n1".into(),
            report: AttemptReport::Ended {
                end,
                exit_code: Some(if end == AttemptEnd::Completed { 0 } else { 1 }),
                message: None,
                outputs,
            },
            at: 5,
        },
    );
}

const SWEEP: &str = "type: sweep
trial:
  command: python t.py --x ${{search_space.x}}
  compute: local
sampling_algorithm:
  type: random
  seed: 7
search_space:
  x:
    type: uniform
    min_value: 0
    max_value: 1
objective:
  primary_metric: acc
  goal: maximize
early_termination:
  type: bandit
  slack_factor: 0.2
  delay_evaluation: 2
limits:
  max_total_trials: 8
  max_concurrent_trials: 2
";

/// Runs the sweep through the state machine; in the first `crash_rounds` rounds the
/// leader dies after proposing only the first of its decisions, and the next leader
/// proposes the whole step again (so some decisions arrive twice and must be refused).
fn drive_sweep(crash_rounds: u64) -> State {
    let spec = parse_sweep_yaml(SWEEP, "e").unwrap();
    let mut s = cluster();
    apply(
        &mut s,
        &Command::SubmitSweep {
            sweep_id: "sw".into(),
            spec: Box::new(spec.clone()),
            seed: spec.seed_or(99),
            at: 0,
        },
    );
    // The metric store: run id → primary-metric series (not in the state).
    let mut store: BTreeMap<String, Series> = BTreeMap::new();
    for round in 0..200u64 {
        let now = round * 1000;
        let sweep = &s.sweeps["sw"];
        let series: Vec<Series> = sweep
            .trials
            .iter()
            .map(|t| store.get(&t.run_id).cloned().unwrap_or_default())
            .collect();
        let views = s.sweep_trial_views(sweep, &series);
        let decisions = step(&sweep.spec, sweep.seed, sweep.created_at, &views, now);
        assert_eq!(decisions, s.sweep_step("sw", &series, now));
        let mut proposed = decisions.clone();
        if round < crash_rounds {
            // The old leader got only its first decision in; the new one resends all.
            proposed.truncate(1);
            proposed.extend(decisions.iter().cloned());
        }
        let mut applied = Vec::new();
        for d in &proposed {
            let run_id = match d {
                SweepDecision::StartTrial { index, .. } => Some(format!("sw-{index}")),
                _ => None,
            };
            let cmd = Command::SweepDecision {
                sweep_id: "sw".into(),
                decision: d.clone(),
                run_id,
                at: now,
            };
            let before = s.clone();
            match s.apply(&cmd) {
                Ok(_) => applied.push(d.clone()),
                Err(_) => assert_eq!(s, before, "a refused decision changed nothing"),
            }
            s.sanity_check().unwrap();
        }
        assert_eq!(
            applied.len(),
            decisions.len(),
            "each decision applied exactly once"
        );
        if s.sweeps["sw"].finished.is_some() {
            return s;
        }
        // The trials run: each logs acc = x per interval, and completes after 4.
        place_all(&mut s, now);
        let trials = s.sweeps["sw"].trials.clone();
        for t in trials {
            let run = &s.runs[&t.run_id];
            if run.state.is_terminal() || !run.state.is_active() {
                continue;
            }
            if run.cancel_requested {
                end(&mut s, &t.run_id, AttemptEnd::Canceled, None);
                continue;
            }
            let series = store.entry(t.run_id.clone()).or_default();
            series.push(None, t.params["x"].as_f64().unwrap());
            if series.len() == 4 {
                end(&mut s, &t.run_id, AttemptEnd::Completed, None);
            }
        }
    }
    panic!("the sweep did not finish");
}

#[test]
fn a_sweep_through_the_state_machine_runs_exactly_its_trials() {
    let s = drive_sweep(0);
    let sweep = &s.sweeps["sw"];
    assert_eq!(sweep.trials.len(), 8);
    let finish = sweep.finished.as_ref().unwrap();
    assert_eq!(finish.end, SweepEnd::Completed);
    let x = |i: usize| sweep.trials[i].params["x"].as_f64().unwrap();
    let best = (0..8).max_by(|&a, &b| x(a).total_cmp(&x(b))).unwrap();
    assert_eq!(finish.best_trial, Some(best as u32));
    // Trial runs carry their sweep and index, and the substituted command.
    let run = &s.runs["sw-3"];
    assert_eq!(run.spec.tags["muster.sweep"], "sw");
    assert_eq!(run.spec.tags["muster.trial"], "3");
    assert_eq!(run.spec.command, format!("python t.py --x {}", x(3)));
    // Stopped trials say why.
    for t in &sweep.trials {
        if let Some(reason) = &t.stopped {
            assert_eq!(s.runs[&t.run_id].state, RunState::Canceled);
            assert!(reason.to_string().contains("bandit"), "{reason}");
        }
    }
    // The state survives a snapshot.
    assert_eq!(State::from_snapshot(&s.to_snapshot()).unwrap(), s);
    // Retention leaves a sweep's trials alone: its sweep still shows them.
    assert!(s.archivable(u64::MAX, 100).is_empty());
    let mut refused = s.clone();
    let run = &s.runs["sw-3"];
    let archive = crate::state::RunArchive {
        sha256: "d".repeat(64),
        runs: 1,
        bytes: 1,
        finished_before: u64::MAX,
        at: 0,
    };
    let e = refused
        .apply(&Command::ArchiveRuns {
            run_ids: vec![run.id.clone()],
            archive,
        })
        .unwrap_err();
    assert!(e.to_string().contains("belongs to a sweep"), "{e}");
    assert_eq!(refused, s);
}

#[test]
fn a_leader_change_mid_sweep_neither_loses_nor_duplicates_trials() {
    let clean = drive_sweep(0);
    let crashed = drive_sweep(6);
    let params = |s: &State| {
        s.sweeps["sw"]
            .trials
            .iter()
            .map(|t| (t.run_id.clone(), t.params.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(crashed.sweeps["sw"].trials.len(), 8);
    assert_eq!(params(&clean), params(&crashed));
    assert_eq!(
        clean.runs.len(),
        crashed.runs.len(),
        "no extra trial runs were submitted"
    );
}

#[test]
fn sweep_commands_that_do_not_fit_are_refused() {
    let spec = parse_sweep_yaml(SWEEP, "e").unwrap();
    let mut s = cluster();
    let submit = Command::SubmitSweep {
        sweep_id: "sw".into(),
        spec: Box::new(spec),
        seed: 1,
        at: 0,
    };
    apply(&mut s, &submit);
    assert_eq!(
        s.apply(&submit),
        Err(ApplyError::SweepExists("sw".into())),
        "the id is taken"
    );
    let refused = |rule: SweepRule| {
        Err(ApplyError::SweepRejected {
            sweep_id: "sw".into(),
            rule,
        })
    };
    let start = |index: u32| Command::SweepDecision {
        sweep_id: "sw".into(),
        decision: SweepDecision::StartTrial {
            index,
            params: [("x".to_string(), crate::sweep::ParamValue::Float(0.5))].into(),
        },
        run_id: Some(format!("r{index}")),
        at: 1,
    };
    let before = s.clone();
    assert_eq!(
        s.apply(&start(1)),
        refused(SweepRule::NotNextTrial { index: 1, next: 0 }),
        "not the next index"
    );
    apply(&mut s, &start(0));
    let already = s.apply(&start(0));
    assert_eq!(
        already,
        refused(SweepRule::NotNextTrial { index: 0, next: 1 }),
        "already decided"
    );
    assert_eq!(
        already.unwrap_err().to_string(),
        "sweep sw: trial 0 is not the next trial (1): already decided"
    );
    apply(&mut s, &start(1));
    assert_eq!(
        s.apply(&start(2)),
        refused(SweepRule::MaxConcurrentTrials),
        "max_concurrent_trials is 2"
    );
    let finish = Command::SweepDecision {
        sweep_id: "sw".into(),
        decision: SweepDecision::Finish {
            end: SweepEnd::Completed,
            best_trial: None,
        },
        run_id: None,
        at: 2,
    };
    assert_eq!(
        s.apply(&finish),
        refused(SweepRule::TrialActive(0)),
        "trials are active"
    );
    let unknown = Command::CancelSweep {
        sweep_id: "nope".into(),
        reason: None,
        at: 2,
    };
    assert_eq!(
        s.apply(&unknown),
        Err(ApplyError::UnknownSweep("nope".into()))
    );
    assert_ne!(s, before);
}

#[test]
fn a_canceled_sweep_stops_its_trials_and_finishes_canceled() {
    let spec = parse_sweep_yaml(SWEEP, "e").unwrap();
    let mut s = cluster();
    apply(
        &mut s,
        &Command::SubmitSweep {
            sweep_id: "sw".into(),
            spec: Box::new(spec),
            seed: 3,
            at: 0,
        },
    );
    for d in s.sweep_step("sw", &[], 0) {
        let run_id = match &d {
            SweepDecision::StartTrial { index, .. } => Some(format!("sw-{index}")),
            _ => None,
        };
        apply(
            &mut s,
            &Command::SweepDecision {
                sweep_id: "sw".into(),
                decision: d,
                run_id,
                at: 0,
            },
        );
    }
    assert_eq!(s.sweeps["sw"].trials.len(), 2);
    // Trial 0 runs; trial 1 is still queued.
    let _ = schedule(&s, 1)
        .decisions
        .into_iter()
        .take(1)
        .map(|d| s.apply(&d.into_command(1)).unwrap())
        .count();
    let cancel = Command::CancelSweep {
        sweep_id: "sw".into(),
        reason: Some("enough".into()),
        at: 2,
    };
    apply(&mut s, &cancel);
    assert_eq!(
        s.apply(&cancel),
        Err(ApplyError::SweepRejected {
            sweep_id: "sw".into(),
            rule: SweepRule::FinishedOrCanceling,
        }),
        "already being canceled"
    );
    // No trial starts any more, though a slot is free (trial 1 was queued: canceled at once).
    assert_eq!(s.runs["sw-1"].state, RunState::Canceled);
    let late = Command::SweepDecision {
        sweep_id: "sw".into(),
        decision: SweepDecision::StartTrial {
            index: 2,
            params: [("x".to_string(), crate::sweep::ParamValue::Float(0.5))].into(),
        },
        run_id: Some("late".into()),
        at: 3,
    };
    let e = s.apply(&late).unwrap_err();
    assert_eq!(
        e,
        ApplyError::SweepRejected {
            sweep_id: "sw".into(),
            rule: SweepRule::Canceling,
        }
    );
    assert_eq!(e.to_string(), "sweep sw: it is being canceled");
    assert!(
        s.sweep_step("sw", &[], 3).is_empty(),
        "trial 0 is still stopping"
    );
    assert!(s.runs["sw-0"].cancel_requested || s.runs["sw-1"].cancel_requested);
    for r in ["sw-0", "sw-1"] {
        if !s.runs[r].state.is_terminal() {
            end(&mut s, r, AttemptEnd::Canceled, None);
        }
    }
    let series = [Series::from_values([0.2]), Series::new()];
    let d = s.sweep_step("sw", &series, 4);
    assert_eq!(
        d,
        vec![SweepDecision::Finish {
            end: SweepEnd::Canceled,
            best_trial: Some(0)
        }]
    );
    apply(
        &mut s,
        &Command::SweepDecision {
            sweep_id: "sw".into(),
            decision: d[0].clone(),
            run_id: None,
            at: 4,
        },
    );
    assert!(s.sweep_step("sw", &series, 5).is_empty());
}

const PIPELINE: &str = "type: pipeline
settings:
  default_compute: local
jobs:
  A:
    command: prep ${{outputs.o}}
    outputs:
      o:
  B:
    command: train ${{inputs.i}} ${{outputs.o}}
    inputs:
      i: ${{parent.jobs.A.outputs.o}}
    outputs:
      o:
  C:
    command: stats ${{inputs.i}} ${{outputs.o}}
    inputs:
      i: ${{parent.jobs.A.outputs.o}}
    outputs:
      o:
  D:
    command: eval ${{inputs.b}} ${{inputs.c}}
    inputs:
      b: ${{parent.jobs.B.outputs.o}}
      c: ${{parent.jobs.C.outputs.o}}
";

/// Drives pipeline `id` to its end; returns the steps that ran (not reused).
fn drive_pipeline(s: &mut State, id: &str) -> Vec<String> {
    let spec = parse_pipeline_yaml(PIPELINE, "e").unwrap();
    apply(
        s,
        &Command::SubmitPipeline {
            pipeline_id: id.into(),
            spec: Box::new(spec),
            at: 0,
        },
    );
    let mut ran = Vec::new();
    for round in 0..50u64 {
        let p = &s.pipelines[id];
        let states = s.pipeline_step_states(p);
        let lookup = s.pipeline_reuse_lookup();
        let decisions = plan(&p.spec, &states, &|k: &str| lookup.get(k).cloned());
        assert_eq!(decisions, s.pipeline_plan(id));
        for d in decisions {
            let run_id = match &d {
                PipelineDecision::StartStep { step, .. } => {
                    ran.push(step.clone());
                    Some(format!("{id}-{step}"))
                }
                _ => None,
            };
            apply(
                s,
                &Command::PipelineDecision {
                    pipeline_id: id.into(),
                    decision: d,
                    run_id,
                    at: round,
                },
            );
        }
        if s.pipelines[id].finished.is_some() {
            return ran;
        }
        place_all(s, round);
        let runs: Vec<String> = s.pipelines[id]
            .steps
            .values()
            .filter_map(|r| r.run_id.clone())
            .filter(|r| s.runs[r].state.is_active())
            .collect();
        for r in runs {
            // The outputs archive's digest: the same work gives the same bytes.
            let digest = format!("{:0>64}", r.len());
            end(s, &r, AttemptEnd::Completed, Some(digest));
        }
    }
    panic!("the pipeline did not finish");
}

#[test]
fn a_pipeline_runs_through_the_state_machine_and_a_resubmission_is_reused() {
    let mut s = cluster();
    assert_eq!(drive_pipeline(&mut s, "p1"), vec!["A", "B", "C", "D"]);
    let p1 = &s.pipelines["p1"];
    assert!(p1.finished.as_ref().unwrap().succeeded);
    // D's inputs were mounted from B's and C's outputs.
    let d = &p1.steps["D"];
    assert_eq!(d.mounts.len(), 2);
    assert!(d.mounts["b"].ends_with("/o"), "{:?}", d.mounts);
    // Unchanged: every step is reused, nothing runs.
    let runs = s.runs.len();
    assert!(drive_pipeline(&mut s, "p2").is_empty());
    assert_eq!(s.runs.len(), runs);
    let p2 = &s.pipelines["p2"];
    assert!(p2.finished.as_ref().unwrap().succeeded);
    assert!(p2.steps.values().all(|r| r.reused.is_some()));
    assert_eq!(State::from_snapshot(&s.to_snapshot()).unwrap(), s);
}

#[test]
fn canceling_a_pipeline_stops_its_steps_and_fails_the_rest() {
    let mut s = cluster();
    let spec = parse_pipeline_yaml(PIPELINE, "e").unwrap();
    apply(
        &mut s,
        &Command::SubmitPipeline {
            pipeline_id: "p".into(),
            spec: Box::new(spec),
            at: 0,
        },
    );
    let p = &s.pipelines["p"];
    let decisions = plan(&p.spec, &s.pipeline_step_states(p), &|_: &str| None);
    let [PipelineDecision::StartStep { .. }] = decisions.as_slice() else {
        panic!("{decisions:?}");
    };
    apply(
        &mut s,
        &Command::PipelineDecision {
            pipeline_id: "p".into(),
            decision: decisions[0].clone(),
            run_id: Some("p-A".into()),
            at: 1,
        },
    );
    let cancel = Command::CancelPipeline {
        pipeline_id: "p".into(),
        reason: None,
        at: 2,
    };
    apply(&mut s, &cancel);
    assert_eq!(
        s.apply(&cancel),
        Err(ApplyError::PipelineRejected {
            pipeline_id: "p".into(),
            rule: PipelineRule::FinishedOrCanceling,
        }),
        "already being canceled"
    );
    // A was queued: canceled at once. The others failed without running.
    assert_eq!(s.runs["p-A"].state, RunState::Canceled);
    let p = &s.pipelines["p"];
    assert!(p.steps["D"].failed.as_deref().unwrap().contains("canceled"));
    let decisions = plan(&p.spec, &s.pipeline_step_states(p), &|_: &str| None);
    assert_eq!(
        decisions,
        vec![PipelineDecision::Finish {
            succeeded: false,
            failed: vec!["A".into(), "B".into(), "C".into(), "D".into()]
        }]
    );
}

#[test]
fn a_state_without_sweeps_or_pipelines_snapshots_as_before() {
    let s = cluster();
    let json = String::from_utf8(s.to_snapshot()).unwrap();
    assert!(
        !json.contains("sweeps") && !json.contains("pipelines"),
        "{json}"
    );
    assert_eq!(State::from_snapshot(json.as_bytes()).unwrap(), s);
}

#[test]
fn a_stale_pipeline_decision_after_a_failover_is_refused_and_changes_nothing() {
    let mut s = cluster();
    let spec = parse_pipeline_yaml(PIPELINE, "e").unwrap();
    apply(
        &mut s,
        &Command::SubmitPipeline {
            pipeline_id: "p".into(),
            spec: Box::new(spec),
            at: 0,
        },
    );
    // The old leader planned and proposed A's start; it applied.
    let decisions = s.pipeline_plan("p");
    let start_a = Command::PipelineDecision {
        pipeline_id: "p".into(),
        decision: decisions[0].clone(),
        run_id: Some("run-old".into()),
        at: 1,
    };
    apply(&mut s, &start_a);
    // A new leader that planned from a state before it proposes the same start with its
    // own run id: refused, no second run.
    let before = s.clone();
    let again = Command::PipelineDecision {
        pipeline_id: "p".into(),
        decision: decisions[0].clone(),
        run_id: Some("run-new".into()),
        at: 2,
    };
    let e = s.apply(&again).unwrap_err();
    assert_eq!(
        e,
        ApplyError::PipelineRejected {
            pipeline_id: "p".into(),
            rule: PipelineRule::StepDecided("A".into()),
        }
    );
    assert_eq!(e.to_string(), "pipeline p: step A was already decided");
    assert_eq!(s, before);
    assert!(!s.runs.contains_key("run-new"));
    // Planning from the applied state starts nothing new while A runs (nothing is lost).
    assert!(s.pipeline_plan("p").is_empty());
    // The step's agent is told its outputs (and, for A, no inputs).
    let (inputs, outputs) = s.pipeline_step_io(&s.runs["run-old"]);
    assert!(inputs.is_empty());
    assert_eq!(outputs, vec!["o".to_string()]);
}

#[test]
fn a_reused_step_names_the_run_it_was_reused_from() {
    let mut s = cluster();
    drive_pipeline(&mut s, "p1");
    drive_pipeline(&mut s, "p2");
    let p2 = &s.pipelines["p2"];
    for (step, rec) in &p2.steps {
        let key = rec.reuse_key.as_deref().unwrap();
        assert_eq!(
            s.pipeline_reused_from(key),
            Some(format!("p1-{step}").as_str())
        );
    }
    // D ran with B's and C's outputs placed at inputs/b and inputs/c.
    let (inputs, outputs) = s.pipeline_step_io(&s.runs["p1-D"]);
    assert_eq!(inputs.keys().collect::<Vec<_>>(), vec!["b", "c"]);
    assert!(outputs.is_empty());
}
