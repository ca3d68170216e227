//! Submit-to-running and submit-to-exit of a trivial container run through muster, against
//! raw `docker run --rm` of the same image on the same engine, in one run; then the idle
//! footprint (CPU and RSS) of a real `muster agent` process.
//!
//! `cargo run --release -p muster-benches --bin container-latency -- --runs 20`

use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use muster_proto::Word;
use muster_proto::v1;
use muster_testkit::DevCluster;
use muster_testkit::agents::AgentProcess;
use muster_testkit::images::{busybox_image, docker_or_skip};

#[derive(Debug, Parser)]
struct Args {
    /// Runs per measurement (one at a time: an idle node).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Seconds the idle agent is watched.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
}

fn pct(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let docker = docker_or_skip()
        .await
        .ok_or_else(|| anyhow::anyhow!("this benchmark needs a Docker engine"))?;
    let image = busybox_image(&docker).await?;

    // Raw docker run, as a user types it.
    let mut raw = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        let ok = Command::new("docker")
            .args(["run", "--rm", &image, "true"])
            .output()?
            .status
            .success();
        anyhow::ensure!(ok, "docker run failed");
        raw.push(t.elapsed());
    }

    // The same through muster: submit → container → exit, one at a time.
    let dev = DevCluster::start().await?;
    let mut c = dev.clients().await?;
    let mut spec = muster_core::RunSpec::new("true");
    spec.experiment = "bench".into();
    spec.environment.image = Some(image.clone());
    let wire: v1::RunSpec = spec.into();
    let (mut to_running, mut to_exit) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let t = Instant::now();
        let run = c
            .runs
            .submit_run(v1::SubmitRunRequest {
                spec: Some(wire.clone()),
                idempotency_key: None,
            })
            .await?
            .into_inner();
        let done = c
            .runs
            .wait_run(v1::WaitRunRequest {
                id: run.id.clone(),
                timeout_ms: 60_000,
            })
            .await?
            .into_inner();
        to_exit.push(t.elapsed());
        anyhow::ensure!(
            done.state().word() == "completed",
            "run {} ended {}: {:?}",
            done.id,
            muster_proto::v1::RunState::word_of(done.state),
            done.message
        );
        let started = done.attempts[0].started_at_ms.unwrap_or(done.created_at_ms);
        to_running.push(Duration::from_millis(
            started.saturating_sub(done.created_at_ms),
        ));
    }
    let (raw50, raw99) = pct(raw);
    let (run50, run99) = pct(to_running);
    let (exit50, exit99) = pct(to_exit);
    println!(
        "container-latency: {} runs each, busybox `true`, idle node, {} CPUs",
        args.runs,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("| measurement                          | p50 ms  | p99 ms  |");
    println!("|--------------------------------------|---------|---------|");
    println!(
        "| raw `docker run --rm IMAGE true`     | {:>7.1} | {:>7.1} |",
        ms(raw50),
        ms(raw99)
    );
    println!(
        "| muster: submit → running             | {:>7.1} | {:>7.1} |",
        ms(run50),
        ms(run99)
    );
    println!(
        "| muster: submit → exit acknowledged   | {:>7.1} | {:>7.1} |",
        ms(exit50),
        ms(exit99)
    );
    println!(
        "muster submit→exit / raw docker run (p50): {:.2}x",
        exit50.as_secs_f64() / raw50.as_secs_f64()
    );

    // Idle footprint of a real agent process.
    c.compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(v1::ComputeTarget {
                name: "idle-pool".into(),
                r#type: "attached".into(),
                ..Default::default()
            }),
        })
        .await?;
    let data = tempfile::tempdir()?;
    let agent = AgentProcess::start(
        &dev.url(),
        "idle-pool",
        "idle-agent",
        &data.path().join("agent"),
    )
    .await?;
    let pid = agent
        .pid()
        .ok_or_else(|| anyhow::anyhow!("agent not running"))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    use muster_testkit::procfs::{TICKS_PER_SEC, cpu_ticks, rss_bytes};
    let t0 = cpu_ticks(pid)?;
    let start = Instant::now();
    let mut peak_rss = 0;
    while start.elapsed() < Duration::from_secs(args.idle_secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss = peak_rss.max(rss_bytes(pid)? / 1024);
    }
    let (t1, rss) = (cpu_ticks(pid)?, rss_bytes(pid)? / 1024);
    let cpu = (t1 - t0) as f64 / TICKS_PER_SEC / start.elapsed().as_secs_f64() * 100.0;
    println!(
        "| idle `muster agent` over {} s        | CPU {:.2}% | RSS {:.1} MB (peak {:.1} MB) |",
        args.idle_secs,
        cpu,
        rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!(
        "goals: muster p50 ≤ 1.15x raw docker run, p99 < 1 s; idle agent CPU < 0.5%, RSS < 30 MB"
    );
    Ok(())
}
