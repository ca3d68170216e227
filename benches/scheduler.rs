//! Scheduler decision latency and placement throughput (issue 5), in-process on muster-core.
//!
//! Builds the state by applying commands, as every server does: 5,000 nodes (8 GPUs, 64
//! cores, 512 GiB each) in 4 compute targets and 100,000 queued runs of mixed sizes (1, 2,
//! 4 or 8 GPUs), priorities (low, normal, high) and ~5% gangs of 2–8 instances. Then:
//!
//! - **cold pass**: one `schedule()` over the empty cluster and the full queue;
//! - **placements/s**: those placements applied (`State::apply`), until a pass places
//!   nothing more; with and without the apply;
//! - **full pass**: one pass once the cluster is full and ~90,000 runs wait (the pass a
//!   busy leader runs after every event), with a wait reason for each;
//! - **churn pass**: 5% of the running attempts end, one pass refills the cluster;
//! - **preemption pass**: 1,000 urgent runs arrive in the full cluster; one pass picks the
//!   victims.
//!
//! Beside each, measured in the same run on the same state: the first-fit scheduler muster
//! had before (scan every node of the target for every run; no index, no reasons, no
//! backfill or preemption).
//!
//! `cargo run --release -p muster-benches --bin scheduler-bench`

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use muster_core::compute::{ComputeKind, ComputeSpec, Tier};
use muster_core::state::{AttemptReport, NodeState};
use muster_core::{
    AttemptEnd, Capacity, Command, Decision, Gpu, Placement, Resources, RunSpec, State, schedule,
};

#[derive(Debug, Parser)]
struct Args {
    /// Nodes (8 GPUs, 64 cores, 512 GiB each).
    #[arg(long, default_value_t = 5_000)]
    nodes: usize,
    /// Queued runs.
    #[arg(long, default_value_t = 100_000)]
    runs: usize,
    /// Compute targets the nodes and runs are spread over.
    #[arg(long, default_value_t = 4)]
    computes: usize,
    /// Times each pass is repeated (the median is shown).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Seed of the workload.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// splitmix64: a reproducible workload without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const GIB: u64 = 1 << 30;

/// A run id as the server makes them: `run-` and 10 random letters or digits (so the
/// queue's order says nothing about the ids' order, as in production).
fn run_id(rng: &mut Rng) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut id = String::from("run-");
    for _ in 0..10 {
        id.push(ALPHABET[rng.below(ALPHABET.len() as u64) as usize] as char);
    }
    id
}

fn compute_name(i: usize) -> String {
    format!("gpu-pool-{}", (b'a' + i as u8) as char)
}

fn build(args: &Args) -> (State, Duration) {
    let started = Instant::now();
    let mut s = State::default();
    let apply = |s: &mut State, c: Command| {
        s.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    };
    for i in 0..args.computes {
        apply(
            &mut s,
            Command::CreateCompute {
                spec: ComputeSpec::new(compute_name(i), ComputeKind::Attached),
                at: 1,
            },
        );
    }
    for n in 0..args.nodes {
        let id = format!("node-{n:05}");
        apply(
            &mut s,
            Command::RegisterNode {
                node_id: id.clone(),
                name: format!("gpu{n:05}"),
                compute: compute_name(n % args.computes),
                capacity: Capacity {
                    cpu_millis: 64_000,
                    memory_bytes: 512 * GIB,
                    gpus: (0..8)
                        .map(|g| Gpu {
                            uuid: format!("GPU-{n:05}-{g}"),
                            model: "NVIDIA A100-SXM4-80GB".into(),
                            memory_bytes: 80 * GIB,
                        })
                        .collect(),
                    max_runs: 0,
                },
                labels: BTreeMap::new(),
                tier: Tier::Dedicated,
                address: format!("10.{}.{}.{}", n / 65536, n / 256 % 256, n % 256),
                at: 2,
            },
        );
    }
    let mut rng = Rng(args.seed);
    for r in 0..args.runs {
        let gpus = match rng.below(10) {
            0..4 => 1,
            4..7 => 2,
            7..9 => 4,
            _ => 8,
        };
        let gang = rng.below(100) < 5;
        let mut spec = RunSpec::new("python train.py");
        spec.compute = compute_name(rng.below(args.computes as u64) as usize);
        spec.instance_count = if gang { 2 + rng.below(7) as u32 } else { 1 };
        spec.resources = Resources {
            cpu_millis: gpus as u64 * 6_000,
            memory_bytes: gpus as u64 * 48 * GIB,
            gpus: if gang { gpus.max(4) } else { gpus },
        };
        spec.priority = match rng.below(20) {
            0..6 => -100,
            6..17 => 0,
            _ => 100,
        };
        apply(
            &mut s,
            Command::SubmitRun {
                run_id: run_id(&mut rng),
                spec: Box::new(spec),
                idempotency_key: None,
                at: 3 + r as u64,
            },
        );
    }
    (s, started.elapsed())
}

/// The scheduler muster had before: first fit, scanning every node of the target for every
/// run (kept here as the baseline, as it was).
mod first_fit {
    use super::*;

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

    pub fn schedule(state: &State, now: u64) -> Vec<Decision> {
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
}

fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn per_sec(n: usize, d: Duration) -> String {
    if d.is_zero() {
        return "-".into();
    }
    let v = n as f64 / d.as_secs_f64();
    if v >= 1e6 {
        format!("{:.2} M/s", v / 1e6)
    } else {
        format!("{:.0} k/s", v / 1e3)
    }
}

struct Pass {
    took: Duration,
    placed: usize,
    preempted: usize,
    waiting: usize,
}

fn measure(state: &State, now: u64, repeat: usize) -> (Pass, Vec<Decision>) {
    let mut times = Vec::new();
    let mut out = None;
    for _ in 0..repeat {
        let started = Instant::now();
        let pass = black_box(schedule(black_box(state), now));
        times.push(started.elapsed());
        out = Some(pass);
    }
    let out = out.expect("repeat >= 1");
    let placed = out
        .decisions
        .iter()
        .filter(|d| matches!(d, Decision::Place { .. }))
        .count();
    let pass = Pass {
        took: median(times),
        placed,
        preempted: out.decisions.len() - placed,
        waiting: out.waiting.len(),
    };
    (pass, out.decisions)
}

fn measure_first_fit(state: &State, now: u64, repeat: usize) -> (Duration, usize) {
    let mut times = Vec::new();
    let mut placed = 0;
    for _ in 0..repeat {
        let started = Instant::now();
        let d = black_box(first_fit::schedule(black_box(state), now));
        times.push(started.elapsed());
        placed = d.len();
    }
    (median(times), placed)
}

fn apply_all(state: &mut State, decisions: Vec<Decision>, now: u64) -> Duration {
    let started = Instant::now();
    for d in decisions {
        let c = d.into_command(now);
        state
            .apply(&c)
            .unwrap_or_else(|e| panic!("decision rejected: {e}"));
    }
    started.elapsed()
}

fn row(name: &str, muster: &Pass, baseline: Option<(Duration, usize)>) {
    let base = match baseline {
        Some((t, n)) => format!(
            "{:>10} {:>8} {:>8.1}x",
            ms(t),
            n,
            t.as_secs_f64() / muster.took.as_secs_f64()
        ),
        None => format!("{:>10} {:>8} {:>9}", "-", "-", "-"),
    };
    println!(
        "{name:<16} {:>10} {:>8} {:>8} {:>8} | {base}",
        ms(muster.took),
        muster.placed,
        muster.preempted,
        muster.waiting
    );
}

fn main() {
    let args = Args::parse();
    let (mut state, built) = build(&args);
    println!(
        "state: {} nodes x 8 GPUs in {} compute targets, {} queued runs; built by applying {} commands in {}",
        args.nodes,
        args.computes,
        args.runs,
        args.computes + args.nodes + args.runs,
        ms(built)
    );
    let mut now = 1_000_000;
    println!();
    println!(
        "{:<16} {:>10} {:>8} {:>8} {:>8} | {:>10} {:>8} {:>9}",
        "pass", "muster", "placed", "preempt", "waiting", "first-fit", "placed", "speed-up"
    );

    // Cold pass: empty cluster, full queue.
    let (cold, decisions) = measure(&state, now, args.repeat);
    let cold_base = measure_first_fit(&state, now, args.repeat);
    row("cold", &cold, Some(cold_base));

    // Apply, and keep scheduling until nothing more fits.
    let mut placed = cold.placed;
    let mut scheduling = cold.took;
    let mut applying = apply_all(&mut state, decisions, now);
    loop {
        now += 1;
        let started = Instant::now();
        let pass = schedule(&state, now);
        scheduling += started.elapsed();
        if pass.decisions.is_empty() {
            break;
        }
        placed += pass.decisions.len();
        applying += apply_all(&mut state, pass.decisions, now);
    }
    let active = state.runs.values().filter(|r| r.state.is_active()).count();
    let gpus: usize = state.nodes.values().map(|n| n.allocated_gpus.len()).sum();

    // Full pass: nothing fits; every waiting run gets its reason.
    let (full, _) = measure(&state, now, args.repeat);
    let full_base = measure_first_fit(&state, now, args.repeat);
    row("full", &full, Some(full_base));
    // What the reasons would cost as a map from run id to an owned String.
    let out = schedule(&state, now);
    let mut times = Vec::new();
    for _ in 0..args.repeat {
        let started = Instant::now();
        black_box(out.waiting.by_run_id(&state));
        times.push(started.elapsed());
    }
    let as_map = median(times);

    // Churn: 5% of the running attempts end; one pass refills.
    let ending: Vec<(String, u32, Vec<String>)> = state
        .runs
        .values()
        .filter(|r| r.state.is_active())
        .enumerate()
        .filter(|(i, _)| i % 20 == 0)
        .map(|(_, r)| {
            let a = r.current_attempt().expect("active");
            (
                r.id.clone(),
                a.number,
                a.placements.iter().map(|p| p.node_id.clone()).collect(),
            )
        })
        .collect();
    for (run_id, attempt, nodes) in &ending {
        for node_id in nodes {
            state
                .apply(&Command::ReportAttempt {
                    run_id: run_id.clone(),
                    attempt: *attempt,
                    node_id: node_id.clone(),
                    report: AttemptReport::Ended {
                        end: AttemptEnd::Completed,
                        exit_code: Some(0),
                        message: None,
                        outputs: None,
                    },
                    at: now,
                })
                .expect("report applies");
        }
    }
    now += 1;
    let (churn, churn_decisions) = measure(&state, now, args.repeat);
    let churn_base = measure_first_fit(&state, now, args.repeat);
    row("churn (5% end)", &churn, Some(churn_base));
    let churn_apply = apply_all(&mut state, churn_decisions, now);

    // Preemption: urgent runs arrive in the full cluster.
    let mut rng = Rng(args.seed ^ 0xDEAD_BEEF);
    for i in 0..1_000 {
        let gpus = [1, 2, 4, 8][rng.below(4) as usize];
        let mut spec = RunSpec::new("python urgent.py");
        spec.compute = compute_name(rng.below(args.computes as u64) as usize);
        spec.resources = Resources {
            cpu_millis: gpus as u64 * 6_000,
            memory_bytes: gpus as u64 * 48 * GIB,
            gpus,
        };
        spec.priority = 200;
        state
            .apply(&Command::SubmitRun {
                run_id: format!("urgent-{i:04}"),
                spec: Box::new(spec),
                idempotency_key: None,
                at: now,
            })
            .expect("submit applies");
    }
    now += 1;
    let (preempt, preempt_decisions) = measure(&state, now, args.repeat);
    row("preemption", &preempt, None);
    let preempt_apply = apply_all(&mut state, preempt_decisions, now);
    state.sanity_check().expect("state stays consistent");

    println!();
    println!(
        "placements until nothing more fits: {placed} runs ({active} active, {gpus}/{} GPUs busy)",
        args.nodes * 8
    );
    println!(
        "  scheduling only (both passes): {} in {}  ->  {}",
        placed,
        ms(scheduling),
        per_sec(placed, scheduling)
    );
    println!(
        "  with apply:                    {} in {}  ->  {}",
        placed,
        ms(scheduling + applying),
        per_sec(placed, scheduling + applying)
    );
    println!(
        "  muster cold pass alone:        {} in {}  ->  {}",
        cold.placed,
        ms(cold.took),
        per_sec(cold.placed, cold.took)
    );
    println!(
        "  first-fit cold pass:           {} in {}  ->  {}",
        cold_base.1,
        ms(cold_base.0),
        per_sec(cold_base.1, cold_base.0)
    );
    println!(
        "churn: {} placements applied in {}; preemption: {} decisions applied in {}",
        churn.placed,
        ms(churn_apply),
        preempt.placed + preempt.preempted,
        ms(preempt_apply)
    );
    println!(
        "the full pass's {} reasons as BTreeMap<run id, String> (Waiting::by_run_id): {} more",
        full.waiting,
        ms(as_map)
    );
}
