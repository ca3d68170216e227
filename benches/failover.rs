//! Failover time: stop the leader of a 3-server cluster (on loopback, in this process) and
//! measure until the first submission is acknowledged through a surviving server; repeat.
//! For comparison, measured in the same run: the same submission loop's latency with no
//! failure.
//!
//! `cargo run --release -p muster-benches --bin failover -- --trials 20`

use std::time::{Duration, Instant};

use clap::Parser;
use muster_core::RunSpec;
use muster_proto::v1;
use muster_testkit::cluster::TestCluster;

#[derive(Debug, Parser)]
struct Args {
    /// Leader kills.
    #[arg(long, default_value_t = 20)]
    trials: usize,
}

async fn submit_until_acknowledged(
    urls: &[String],
    spec: &v1::RunSpec,
    key: &str,
    deadline: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut i = 0usize;
    while start.elapsed() < deadline {
        let url = &urls[i % urls.len()];
        i += 1;
        if let Ok(mut c) = muster_testkit::access::clients(url).await {
            let req = v1::SubmitRunRequest {
                spec: Some(spec.clone()),
                idempotency_key: Some(key.into()),
            };
            if tokio::time::timeout(Duration::from_secs(2), c.runs.submit_run(req))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return Ok(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("no submission was acknowledged within {deadline:?}")
}

fn pct(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], *v.last().expect("trials"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cluster = TestCluster::start(3).await?;
    let mut c = muster_testkit::access::clients(&cluster.urls()).await?;
    c.compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(v1::ComputeTarget {
                name: "bench-pool".into(),
                r#type: "attached".into(),
                ..Default::default()
            }),
        })
        .await?;
    let mut spec = RunSpec::new("python train.py");
    spec.compute = "bench-pool".into();
    let spec: v1::RunSpec = spec.into();
    let all: Vec<String> = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.url(id))
        .collect();
    let mut healthy = Vec::new();
    let mut failover = Vec::new();
    for trial in 0..args.trials {
        healthy.push(
            submit_until_acknowledged(&all, &spec, &format!("ok-{trial}"), Duration::from_secs(10))
                .await?,
        );
        let leader = cluster.leader().await?;
        let survivors: Vec<String> = cluster
            .ids()
            .into_iter()
            .filter(|id| *id != leader)
            .map(|id| cluster.url(id))
            .collect();
        let killed = Instant::now();
        cluster.kill(leader).await?;
        let stop_took = killed.elapsed();
        let took = submit_until_acknowledged(
            &survivors,
            &spec,
            &format!("fo-{trial}"),
            Duration::from_secs(30),
        )
        .await?;
        failover.push(stop_took + took);
        cluster.restart(leader).await?;
        cluster.leader().await?;
        // Let the restarted server catch up before the next trial.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (h50, hmax) = pct(healthy);
    let (f50, fmax) = pct(failover);
    println!(
        "failover: {} trials, 3 servers on loopback, election timeout ~1 s, heartbeat 100 ms",
        args.trials
    );
    println!("| measurement                                   | p50 ms  | max ms  |");
    println!("|-----------------------------------------------|---------|---------|");
    println!(
        "| submit, no failure                            | {:>7.1} | {:>7.1} |",
        h50.as_secs_f64() * 1e3,
        hmax.as_secs_f64() * 1e3
    );
    println!(
        "| leader stopped → first acknowledged submission | {:>7.1} | {:>7.1} |",
        f50.as_secs_f64() * 1e3,
        fmax.as_secs_f64() * 1e3
    );
    println!("goal: p50 under 1 s, max under 2 s");
    Ok(())
}
