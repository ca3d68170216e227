//! Submit-to-running and submit-to-exit of a trivial container run through muster, against
//! raw `docker run --rm` of the same image on the same engine, in one run; then the idle
//! footprint (CPU and RSS) of a real `muster agent` process.
//!
//! `cargo run --release -p muster-benches --bin container-latency -- --runs 20`
//!
//! With `--hardening-rounds N`: instead, N rounds of raw `docker run` without and with the
//! flags muster's hardening sets (no capabilities, no-new-privileges, read-only root with a
//! /tmp tmpfs, a pids limit, user 65534) and muster's (hardened) submit→exit, each round's
//! p50s and the range of the hardened/unhardened ratio over the rounds.

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
    /// Compare hardened and unhardened container starts over this many rounds (and skip
    /// the rest).
    #[arg(long, default_value_t = 0)]
    hardening_rounds: usize,
}

/// The `docker run` flags of muster's hardening (executor/docker.rs, `container_body`).
const HARDENING: &[&str] = &[
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges:true",
    "--read-only",
    "--tmpfs",
    "/tmp:rw,nosuid,nodev,mode=1777",
    "--pids-limit",
    "4096",
    "--user",
    "65534:65534",
];

/// `runs` times `docker run --rm FLAGS IMAGE true`, one at a time.
fn raw_runs(image: &str, flags: &[&str], runs: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let ok = Command::new("docker")
            .arg("run")
            .arg("--rm")
            .args(flags)
            .args([image, "true"])
            .output()?
            .status
            .success();
        anyhow::ensure!(ok, "docker run {flags:?} failed");
        times.push(t.elapsed());
    }
    Ok(times)
}

/// `runs` submits of `wire` through muster, one at a time: each one's submit → exit.
async fn muster_runs(
    c: &mut muster_client::Clients,
    wire: &v1::RunSpec,
    runs: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for _ in 0..runs {
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
        times.push(t.elapsed());
        anyhow::ensure!(
            done.state().word() == "completed",
            "run {} ended: {:?}",
            done.id,
            done.message
        );
    }
    Ok(times)
}

/// `--hardening-rounds`: hardened against unhardened starts, round by round.
async fn hardening(image: &str, rounds: usize, runs: usize) -> anyhow::Result<()> {
    let dev = DevCluster::start().await?;
    let mut c = dev.clients().await?;
    let mut spec = muster_core::RunSpec::new("true");
    spec.experiment = "bench".into();
    spec.environment.image = Some(image.to_string());
    let wire: v1::RunSpec = spec.into();
    println!("container-latency --hardening-rounds {rounds}: {runs} runs per measurement");
    println!(
        "| round | raw p50 ms | raw hardened p50 ms | hardened/raw | muster submit→exit p50 ms | muster/raw |"
    );
    println!(
        "|-------|------------|---------------------|--------------|---------------------------|------------|"
    );
    let (mut engine, mut whole) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (plain, _) = pct(raw_runs(image, &[], runs)?);
        let (hard, _) = pct(raw_runs(image, HARDENING, runs)?);
        let (ours, _) = pct(muster_runs(&mut c, &wire, runs).await?);
        let ratio = hard.as_secs_f64() / plain.as_secs_f64();
        let ours_ratio = ours.as_secs_f64() / plain.as_secs_f64();
        engine.push(ratio);
        whole.push(ours_ratio);
        println!(
            "| {round} | {:.1} | {:.1} | {ratio:.2}x | {:.1} | {ours_ratio:.2}x |",
            ms(plain),
            ms(hard),
            ms(ours)
        );
    }
    let range = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        format!("{lo:.2}–{hi:.2}x")
    };
    println!(
        "hardened / unhardened docker run (p50): {} over {rounds} rounds (goal ≤ 1.10x)",
        range(&engine)
    );
    println!(
        "muster (hardened) submit→exit / unhardened docker run (p50): {}",
        range(&whole)
    );
    Ok(())
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
    if args.hardening_rounds > 0 {
        return hardening(&image, args.hardening_rounds, args.runs).await;
    }

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
