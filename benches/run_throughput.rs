//! End-to-end run throughput (issue 5): N runs through queue → placed → running → completed
//! on an in-process `muster dev` server with fake executors.
//!
//! The executors are fake agents: each registers a node over gRPC and holds a real agent
//! session with the leader, and answers every assignment at once as a real agent would
//! (`preparing`, `running`, then `ended: completed` with no log bytes), waiting for the
//! server's acknowledgement of the end. So every run costs what it costs in production on
//! the coordinator: a submission, a scheduling decision and three attempt reports, each a
//! Raft entry fsynced before it is acknowledged; only the containers are missing.
//!
//! For comparison, measured in the same run: the same workload through muster-core alone
//! (`State::apply` and `schedule()` in a loop, no Raft, no gRPC, no disk), the ceiling the
//! coordinator's plumbing can approach.
//!
//! `cargo run --release -p muster-benches --bin run-throughput -- --runs 10000 --nodes 50`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use muster_core::compute::{ComputeKind, ComputeSpec, Tier};
use muster_core::state::{AttemptReport, RunState};
use muster_core::{AttemptEnd, Capacity, Command, Decision, Resources, RunSpec, State, schedule};
use muster_proto::Word;
use muster_proto::v1::{
    self, agent_message, agent_service_client::AgentServiceClient, server_message,
};
use muster_testkit::DevCluster;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// Runs to push through.
    #[arg(long, default_value_t = 10_000)]
    runs: usize,
    /// Fake nodes (each takes up to `--slots` runs at once).
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Runs one node holds at once (its CPU capacity in whole CPUs; each run asks for one).
    #[arg(long, default_value_t = 16)]
    slots: u64,
    /// Concurrent submitting clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

const COMPUTE: &str = "bench-pool";
const GIB: u64 = 1 << 30;

fn capacity(slots: u64) -> Capacity {
    Capacity {
        cpu_millis: slots * 1_000,
        memory_bytes: slots * GIB,
        gpus: Vec::new(),
        max_runs: 0,
    }
}

fn run_spec() -> RunSpec {
    let mut spec = RunSpec::new("python train.py");
    spec.compute = COMPUTE.into();
    spec.experiment = "bench".into();
    spec.resources = Resources {
        cpu_millis: 1_000,
        memory_bytes: GIB,
        gpus: 0,
    };
    spec
}

/// One fake node: registers, opens a session, and completes every assignment at once.
/// Returns when its session ends.
async fn fake_agent(
    channel: Channel,
    index: usize,
    slots: u64,
    completed: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let mut agents = AgentServiceClient::new(channel);
    let node_id = format!("fake-node-{index:04}");
    let cap = capacity(slots);
    agents
        .register(v1::RegisterRequest {
            node_id: node_id.clone(),
            name: format!("fake{index:04}"),
            compute: COMPUTE.into(),
            capacity: Some(v1::Resources {
                cpu_millis: cap.cpu_millis,
                memory_bytes: cap.memory_bytes,
                gpus: 0,
            }),
            tier: Tier::Dedicated.as_str().into(),
            address: "127.0.0.1".into(),
            version: "bench".into(),
            ..Default::default()
        })
        .await?;
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(1024);
    let send = |tx: &mpsc::Sender<v1::AgentMessage>, msg: agent_message::Msg| {
        let tx = tx.clone();
        async move { tx.send(v1::AgentMessage { msg: Some(msg) }).await.is_ok() }
    };
    send(
        &tx,
        agent_message::Msg::Hello(v1::Hello {
            node_id: node_id.clone(),
            running: Vec::new(),
        }),
    )
    .await;
    let mut inbound = agents.session(ReceiverStream::new(rx)).await?.into_inner();
    let update =
        |run_id: &str, attempt: u32, state: v1::AttemptState, end: Option<v1::AttemptEnd>| {
            agent_message::Msg::Update(v1::AttemptUpdate {
                run_id: run_id.to_string(),
                attempt,
                state: state.into(),
                end: end.unwrap_or(v1::AttemptEnd::Unspecified).into(),
                exit_code: end.map(|_| 0),
                ..Default::default()
            })
        };
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(()) };
                match msg.msg {
                    Some(server_message::Msg::Assign(a)) => {
                        for (state, end) in [
                            (v1::AttemptState::Preparing, None),
                            (v1::AttemptState::Running, None),
                            (v1::AttemptState::Ended, Some(v1::AttemptEnd::Completed)),
                        ] {
                            send(&tx, update(&a.run_id, a.attempt, state, end)).await;
                        }
                    }
                    Some(server_message::Msg::Stop(s)) => {
                        send(&tx, update(&s.run_id, s.attempt, v1::AttemptState::Ended, Some(v1::AttemptEnd::Canceled))).await;
                    }
                    Some(server_message::Msg::Ack(_)) => {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(server_message::Msg::Resume(_) | server_message::Msg::MetricResume(_)) | None => {}
                }
            }
            _ = heartbeat.tick() => {
                send(&tx, agent_message::Msg::Heartbeat(v1::HeartbeatRequest {
                    node_id: node_id.clone(),
                    running: Vec::new(),
                })).await;
            }
        }
    }
}

/// Submits `runs` runs from `clients` concurrent clients; returns when all are acknowledged.
async fn submit_all(url: &str, runs: usize, clients: usize) -> anyhow::Result<()> {
    let wire: v1::RunSpec = run_spec().into();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let n = runs / clients + usize::from(i < runs % clients);
        let mut c = muster_testkit::access::clients(url).await?;
        let wire = wire.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                c.runs
                    .submit_run(v1::SubmitRunRequest {
                        spec: Some(wire.clone()),
                        idempotency_key: None,
                    })
                    .await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

struct Measured {
    wall: Duration,
    submitted_in: Duration,
}

async fn end_to_end(args: &Args) -> anyhow::Result<Measured> {
    let dev = DevCluster::start().await?;
    let mut c = dev.clients().await?;
    c.compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(v1::ComputeTarget {
                name: COMPUTE.into(),
                r#type: "attached".into(),
                ..Default::default()
            }),
        })
        .await?;
    let completed = Arc::new(AtomicUsize::new(0));
    let channel = Channel::from_shared(dev.url())?.connect().await?;
    let mut agents = Vec::new();
    for i in 0..args.nodes {
        agents.push(tokio::spawn(fake_agent(
            channel.clone(),
            i,
            args.slots,
            completed.clone(),
        )));
    }
    // Every node registered before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = c
            .compute
            .list_nodes(v1::ListNodesRequest {
                compute: Some(COMPUTE.into()),
                ..Default::default()
            })
            .await?
            .into_inner()
            .nodes
            .len();
        if nodes == args.nodes {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {nodes} fake nodes registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    submit_all(&dev.url(), args.runs, args.clients).await?;
    let submitted_in = start.elapsed();
    let deadline = start + Duration::from_secs(args.timeout);
    while completed.load(Ordering::Relaxed) < args.runs {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {} runs completed in {} s",
            completed.load(Ordering::Relaxed),
            args.runs,
            args.timeout
        );
        for a in &agents {
            anyhow::ensure!(!a.is_finished(), "a fake agent's session ended early");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = start.elapsed();
    // Check the state agrees: every run completed, exactly once.
    let runs = c
        .runs
        .list_runs(v1::ListRunsRequest {
            compute: Some(COMPUTE.into()),
            ..Default::default()
        })
        .await?
        .into_inner()
        .runs;
    let done = runs
        .iter()
        .filter(|r| r.state().word() == "completed")
        .count();
    anyhow::ensure!(
        runs.len() == args.runs && done == args.runs,
        "expected {} completed runs, found {} runs of which {done} completed",
        args.runs,
        runs.len()
    );
    for a in agents {
        a.abort();
    }
    Ok(Measured { wall, submitted_in })
}

/// The same workload through muster-core alone.
fn core_only(args: &Args) -> Duration {
    let started = Instant::now();
    let mut s = State::default();
    let apply = |s: &mut State, c: Command| {
        s.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    };
    let mut now = 1;
    apply(
        &mut s,
        Command::CreateCompute {
            spec: ComputeSpec::new(COMPUTE, ComputeKind::Attached),
            at: now,
        },
    );
    for i in 0..args.nodes {
        apply(
            &mut s,
            Command::RegisterNode {
                node_id: format!("fake-node-{i:04}"),
                name: format!("fake{i:04}"),
                compute: COMPUTE.into(),
                capacity: capacity(args.slots),
                labels: BTreeMap::new(),
                tier: Tier::Dedicated,
                address: "127.0.0.1".into(),
                at: now,
            },
        );
    }
    for r in 0..args.runs {
        now += 1;
        apply(
            &mut s,
            Command::SubmitRun {
                run_id: format!("run-{r:010}"),
                spec: Box::new(run_spec()),
                idempotency_key: None,
                at: now,
            },
        );
    }
    let mut done = 0;
    while done < args.runs {
        now += 1;
        let pass = schedule(&s, now);
        assert!(!pass.decisions.is_empty(), "a pass placed nothing");
        let mut placed = Vec::new();
        for d in pass.decisions {
            if let Decision::Place {
                run_id, placements, ..
            } = &d
            {
                placed.push((run_id.clone(), placements[0].node_id.clone()));
            }
            apply(&mut s, d.into_command(now));
        }
        for (run_id, node_id) in placed {
            let attempt = s.runs[&run_id].attempt_number();
            for report in [
                AttemptReport::Preparing,
                AttemptReport::Running,
                AttemptReport::Ended {
                    end: AttemptEnd::Completed,
                    exit_code: Some(0),
                    message: None,
                    outputs: None,
                },
            ] {
                apply(
                    &mut s,
                    Command::ReportAttempt {
                        run_id: run_id.clone(),
                        attempt,
                        node_id: node_id.clone(),
                        report,
                        at: now,
                    },
                );
            }
            done += 1;
        }
    }
    assert!(s.runs.values().all(|r| r.state == RunState::Completed));
    started.elapsed()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let e2e = end_to_end(&args).await?;
    let core = core_only(&args);
    let per_sec = |d: Duration| args.runs as f64 / d.as_secs_f64();
    println!(
        "run-throughput: {} runs on {} fake nodes × {} slots, {} clients, {cpus} CPUs",
        args.runs, args.nodes, args.slots, args.clients
    );
    println!(
        "| {:<62} | {:>9} | {:>9} |",
        "measurement", "runs/s", "wall s"
    );
    println!("|{:-<64}|{:-<11}|{:-<11}|", "", "", "");
    println!(
        "| {:<62} | {:>9.0} | {:>9.2} |",
        "muster dev: submitted → placed → running → completed",
        per_sec(e2e.wall),
        e2e.wall.as_secs_f64()
    );
    println!(
        "| {:<62} | {:>9.0} | {:>9.2} |",
        "  of which: all submissions acknowledged",
        per_sec(e2e.submitted_in),
        e2e.submitted_in.as_secs_f64()
    );
    println!(
        "| {:<62} | {:>9.0} | {:>9.2} |",
        "baseline: muster-core alone (apply + schedule, no Raft/gRPC)",
        per_sec(core),
        core.as_secs_f64()
    );
    println!(
        "every run completed exactly once; the coordinator reaches {:.1}% of core's rate",
        100.0 * core.as_secs_f64() / e2e.wall.as_secs_f64()
    );
    Ok(())
}
