//! Metric ingestion (issue 6): one run logging 100,000 points, and 100 runs logging 1,000
//! points each, concurrently; points per second end to end and the server's memory growth.
//!
//! The runs' agents are fake agents speaking the real agent protocol to an in-process
//! `muster dev` server: each registers a node, holds a session with the leader, answers its
//! assignments (`preparing`, `running`), then ships each run's `MUSTER_METRICS_FILE` bytes
//! (JSON lines, in 256 KiB chunks as the real agent does) as `MetricData` — or, with
//! `--form stdout`, the same points as `##muster[metric]` lines in the log (`LogData`) —
//! and reports the end with the byte count. The server parses every line into its series
//! store, seals the run's metrics into a replicated blob, proposes the end and acknowledges
//! it. The clock runs from the first byte shipped to the last acknowledgement, so a point
//! counts once it is parsed, stored, sealed and queryable; the points are then read back
//! (GetRunMetrics) and checked, every one exactly once.
//!
//! Memory: the server is in-process, so its growth is this process's RSS (VmRSS in
//! /proc/self/status) before the clock starts and after the points were read back.
//!
//! Baseline, measured in the same run: the same lines parsed and recorded by muster-core's
//! `MetricsLog` and encoded with `Series::encode`, in-process, no I/O.
//!
//! `cargo run --release -p muster-benches --bin metrics-ingest`

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use muster_core::compute::Tier;
use muster_core::metrics::MetricsLog;
use muster_core::{Resources, RunSpec};
use muster_proto::v1::{
    self, agent_message, agent_service_client::AgentServiceClient, server_message,
};
use muster_testkit::DevCluster;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Form {
    /// JSON lines in MUSTER_METRICS_FILE (shipped as MetricData).
    File,
    /// `##muster[metric]` lines on stdout (shipped in the log).
    Stdout,
}

#[derive(Debug, Parser)]
struct Args {
    /// Points of the single run (scenario 1).
    #[arg(long, default_value_t = 100_000)]
    single: usize,
    /// Runs of scenario 2 (concurrent).
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Points of each run of scenario 2.
    #[arg(long, default_value_t = 1_000)]
    points: usize,
    /// Fake nodes the runs of scenario 2 spread over (one session each).
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Repeat scenario 2 this many times with new runs (memory: with more points than the
    /// store keeps in memory, RSS levels off).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Which form the runs log their metrics in.
    #[arg(long, value_enum, default_value_t = Form::File)]
    form: Form,
    /// Give up after this many seconds per scenario.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

const CHUNK: usize = 256 * 1024;

/// The lines run `run` logs: `points` points over 4 metrics.
fn lines(form: Form, run: usize, points: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(points * 48);
    for i in 0..points {
        let name = ["loss", "accuracy", "lr", "grad_norm"][i % 4];
        let step = i / 4;
        let value = (run as f64 + 1.0) / (i as f64 + 1.0);
        let line = match form {
            Form::File => format!("{{\"name\":\"{name}\",\"value\":{value},\"step\":{step}}}\n"),
            Form::Stdout => format!("##muster[metric] name={name} value={value} step={step}\n"),
        };
        out.extend_from_slice(line.as_bytes());
    }
    out
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One fake node: takes `expect` assignments, then ships every run's metrics (round-robin,
/// one chunk per run per turn, as the real agent's ship loop does), sends the ends, and
/// returns the instant it shipped its first byte once every end is acknowledged.
async fn fake_agent(
    compute: &'static str,
    channel: Channel,
    index: usize,
    expect: usize,
    form: Form,
    points: usize,
    go: Arc<tokio::sync::Barrier>,
) -> anyhow::Result<Instant> {
    let mut agents = AgentServiceClient::new(channel);
    let node_id = format!("metrics-node-{index:04}");
    agents
        .register(v1::RegisterRequest {
            node_id: node_id.clone(),
            name: format!("mnode{index:04}"),
            compute: compute.into(),
            capacity: Some(v1::Resources {
                cpu_millis: 1_000 * expect as u64,
                memory_bytes: (1 << 30) * expect as u64,
                gpus: 0,
            }),
            tier: Tier::Dedicated.as_str().into(),
            address: "127.0.0.1".into(),
            version: "bench".into(),
            ..Default::default()
        })
        .await?;
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(4096);
    let send = |msg: agent_message::Msg| {
        let tx = tx.clone();
        async move {
            tx.send(v1::AgentMessage { msg: Some(msg) })
                .await
                .map_err(|_| anyhow::anyhow!("session closed"))
        }
    };
    send(agent_message::Msg::Hello(v1::Hello {
        node_id: node_id.clone(),
        running: Vec::new(),
    }))
    .await?;
    let mut inbound = agents.session(ReceiverStream::new(rx)).await?.into_inner();
    let update = |run_id: &str, attempt: u32, state: v1::AttemptState| v1::AttemptUpdate {
        run_id: run_id.to_string(),
        attempt,
        state: state.into(),
        ..Default::default()
    };
    let mut assigned = Vec::new();
    while assigned.len() < expect {
        let Some(m) = inbound.message().await? else {
            anyhow::bail!("session ended before every assignment")
        };
        if let Some(server_message::Msg::Assign(a)) = m.msg {
            for state in [v1::AttemptState::Preparing, v1::AttemptState::Running] {
                send(agent_message::Msg::Update(update(
                    &a.run_id, a.attempt, state,
                )))
                .await?;
            }
            assigned.push((a.run_id, a.attempt));
        }
    }
    let data: Vec<Vec<u8>> = (0..assigned.len())
        .map(|i| lines(form, index * 1000 + i, points))
        .collect();
    go.wait().await;
    let started = Instant::now();
    let mut offsets = vec![0usize; assigned.len()];
    while offsets.iter().zip(&data).any(|(o, d)| o < &d.len()) {
        for (i, (run_id, attempt)) in assigned.iter().enumerate() {
            let from = offsets[i];
            let to = (from + CHUNK).min(data[i].len());
            if from == to {
                continue;
            }
            let chunk = data[i][from..to].to_vec();
            let msg = match form {
                Form::File => agent_message::Msg::Metrics(v1::MetricData {
                    run_id: run_id.clone(),
                    attempt: *attempt,
                    offset: from as u64,
                    data: chunk,
                }),
                Form::Stdout => agent_message::Msg::Log(v1::LogData {
                    run_id: run_id.clone(),
                    attempt: *attempt,
                    offset: from as u64,
                    data: chunk,
                }),
            };
            send(msg).await?;
            offsets[i] = to;
        }
    }
    for (i, (run_id, attempt)) in assigned.iter().enumerate() {
        let mut end = update(run_id, *attempt, v1::AttemptState::Ended);
        end.end = v1::AttemptEnd::Completed.into();
        end.exit_code = Some(0);
        match form {
            Form::File => end.metric_bytes = data[i].len() as u64,
            Form::Stdout => end.log_bytes = data[i].len() as u64,
        }
        send(agent_message::Msg::Update(end)).await?;
    }
    let mut acked = 0;
    while acked < assigned.len() {
        let Some(m) = inbound.message().await? else {
            anyhow::bail!("session ended before every end was acknowledged")
        };
        match m.msg {
            Some(server_message::Msg::Ack(_)) => acked += 1,
            Some(server_message::Msg::Resume(_) | server_message::Msg::MetricResume(_)) => {
                anyhow::bail!("the server asked for bytes again: a gap in the benchmark's stream")
            }
            _ => {}
        }
    }
    // Keep the session open (heartbeats) until the caller is done reading.
    tokio::spawn(async move {
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        loop {
            beat.tick().await;
            let hb = agent_message::Msg::Heartbeat(v1::HeartbeatRequest {
                node_id: node_id.clone(),
                running: Vec::new(),
            });
            if tx.send(v1::AgentMessage { msg: Some(hb) }).await.is_err() {
                return;
            }
            if inbound.message().await.ok().flatten().is_none() {
                return;
            }
        }
    });
    Ok(started)
}

struct Measured {
    points: usize,
    wall: Duration,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

async fn scenario(
    compute: &'static str,
    dev: &DevCluster,
    runs: usize,
    points: usize,
    nodes: usize,
    args: &Args,
) -> anyhow::Result<Measured> {
    let mut c = dev.clients().await?;
    c.compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(v1::ComputeTarget {
                name: compute.into(),
                r#type: "attached".into(),
                ..Default::default()
            }),
        })
        .await?;
    let nodes = nodes.min(runs).max(1);
    let rss_before_kib = vm_rss_kib();
    let channel = Channel::from_shared(dev.url())?.connect().await?;
    let go = Arc::new(tokio::sync::Barrier::new(nodes + 1));
    let mut agents = Vec::new();
    let first = c
        .compute
        .list_nodes(v1::ListNodesRequest {
            compute: Some(compute.into()),
            ..Default::default()
        })
        .await?
        .into_inner()
        .nodes
        .len();
    for i in 0..nodes {
        let expect = runs / nodes + usize::from(i < runs % nodes);
        agents.push(tokio::spawn(fake_agent(
            compute,
            channel.clone(),
            first + i,
            expect,
            args.form,
            points,
            go.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while c
        .compute
        .list_nodes(v1::ListNodesRequest {
            compute: Some(compute.into()),
            ..Default::default()
        })
        .await?
        .into_inner()
        .nodes
        .len()
        < first + nodes
    {
        anyhow::ensure!(Instant::now() < deadline, "the fake nodes did not register");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ids = Vec::new();
    for _ in 0..runs {
        let mut spec = RunSpec::new("python train.py");
        spec.compute = compute.into();
        spec.experiment = "metrics-bench".into();
        spec.resources = Resources {
            cpu_millis: 1_000,
            memory_bytes: 1 << 30,
            gpus: 0,
        };
        let run = c
            .runs
            .submit_run(v1::SubmitRunRequest {
                spec: Some(spec.into()),
                idempotency_key: None,
            })
            .await?
            .into_inner();
        ids.push(run.id);
    }
    go.wait().await;
    let mut started = None::<Instant>;
    for a in agents {
        let s = tokio::time::timeout_at(deadline.into(), a)
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))???;
        started = Some(started.map_or(s, |t: Instant| t.min(s)));
    }
    let wall = started.expect("at least one node").elapsed();
    // Every point is queryable, exactly once.
    let mut total = 0;
    for id in &ids {
        let m = c
            .metrics
            .get_run_metrics(v1::GetRunMetricsRequest {
                run_id: id.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let n: usize = m.series.iter().map(|s| s.steps.len()).sum();
        anyhow::ensure!(
            n == points && m.malformed == 0,
            "run {id}: {n} points and {} malformed lines, expected {points} points",
            m.malformed
        );
        total += n;
    }
    Ok(Measured {
        points: total,
        wall,
        rss_before_kib,
        rss_after_kib: vm_rss_kib(),
    })
}

/// The baseline: the same lines parsed, recorded and encoded in-process.
fn baseline(form: Form, runs: usize, points: usize) -> Duration {
    let data: Vec<Vec<u8>> = (0..runs).map(|r| lines(form, r, points)).collect();
    let started = Instant::now();
    let mut encoded = 0usize;
    for d in &data {
        let mut log = MetricsLog::new();
        for line in std::str::from_utf8(d).expect("utf-8").lines() {
            match form {
                Form::File => log.feed_json_line(line),
                Form::Stdout => log.feed_stdout_line(line),
            }
        }
        assert_eq!(log.series.values().map(|s| s.len()).sum::<usize>(), points);
        encoded += log.series.values().map(|s| s.encode().len()).sum::<usize>();
    }
    assert!(encoded > 0);
    started.elapsed()
}

fn report(label: &str, m: &Measured, base: Duration) {
    let rate = m.points as f64 / m.wall.as_secs_f64();
    let base_rate = m.points as f64 / base.as_secs_f64();
    println!(
        "{label}: {} points in {:.3} s = {:.0} points/s end to end; baseline (parse + encode in-process) {:.0} points/s ({:.1}x); server RSS {} MiB -> {} MiB (+{} MiB)",
        m.points,
        m.wall.as_secs_f64(),
        rate,
        base_rate,
        base_rate / rate,
        m.rss_before_kib / 1024,
        m.rss_after_kib / 1024,
        m.rss_after_kib.saturating_sub(m.rss_before_kib) / 1024,
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = DevCluster::start().await?;
    println!(
        "metric ingestion, form {:?}, {} cores",
        args.form,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let one = scenario("bench-one", &dev, 1, args.single, 1, &args).await?;
    report(
        &format!("1 run x {} points", args.single),
        &one,
        baseline(args.form, 1, args.single),
    );
    for round in 1..=args.rounds {
        // Compute target names end in a letter.
        let compute: &'static str = Box::leak(
            format!("bench-many-{}", (b'a' + (round % 26) as u8) as char)
                .repeat(1 + round / 26)
                .into_boxed_str(),
        );
        let many = scenario(compute, &dev, args.runs, args.points, args.nodes, &args).await?;
        report(
            &format!(
                "{} runs x {} points, concurrently over {} nodes (round {round})",
                args.runs, args.points, args.nodes
            ),
            &many,
            baseline(args.form, args.runs, args.points),
        );
    }
    Ok(())
}
