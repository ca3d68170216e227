//! Failover time, two ways, each with the same submission's latency with no failure
//! measured in the same run for comparison:
//!
//! 1. **In process**: stop the leader of a 3-server cluster (on loopback, in this process)
//!    and measure until the first submission is acknowledged through a surviving server.
//! 2. **As a client sees it** (issue 20, item 7): three `muster server` processes; the
//!    leader is `kill -9`ed, and at that moment two clients start that know all three
//!    servers: the shared client library (what the CLI and agents use: it fails over by
//!    itself) submitting until one submission is acknowledged, and `muster run submit`
//!    processes, one after another, until one exits 0. Each figure is kill → that answer.
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

/// One `muster run submit` to `servers` from `cwd` (an empty folder: nothing to upload);
/// whether it was acknowledged.
async fn cli_submit(servers: &str, cwd: &std::path::Path, key: &str) -> bool {
    let args = [
        "run",
        "submit",
        "--compute",
        "parked",
        "--idempotency-key",
        key,
        "--",
        "true",
    ];
    muster_testkit::muster(servers, cwd, &args).await.code == 0
}

/// Submits through the shared client (failing over by itself) until one is acknowledged.
async fn api_submit(servers: &mut muster_client::Servers, spec: &v1::RunSpec, key: &str) -> bool {
    let policy = muster_client::RetryPolicy::SUBMISSION;
    let answer = servers
        .call(&policy, |channel| {
            let req = v1::SubmitRunRequest {
                spec: Some(spec.clone()),
                idempotency_key: Some(key.to_string()),
            };
            async move {
                let mut c = muster_client::Clients::new(String::new(), channel);
                c.runs
                    .submit_run(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(muster_client::status)
            }
        })
        .await;
    answer.is_ok()
}

/// Kill → first acknowledged submit through the client library and through the CLI, and
/// each with no failure, over `trials` kills of the leader of three server processes.
async fn client_side(trials: usize) -> anyhow::Result<[Vec<Duration>; 4]> {
    let dir = tempfile::tempdir()?;
    let mut cluster = muster_testkit::faults::ServerProcesses::start(dir.path()).await?;
    muster_testkit::access::create_attached(&cluster.urls, "parked").await?;
    let empty = tempfile::tempdir()?;
    let mut spec = RunSpec::new("true");
    spec.compute = "parked".into();
    let spec: v1::RunSpec = spec.into();
    let [mut api_ok, mut cli_ok, mut api_fo, mut cli_fo] = [(); 4].map(|_| Vec::new());
    for trial in 0..trials {
        let mut client = cluster.client();
        let t = Instant::now();
        anyhow::ensure!(api_submit(&mut client, &spec, &format!("api-ok-{trial}")).await);
        api_ok.push(t.elapsed());
        let t = Instant::now();
        anyhow::ensure!(cli_submit(&cluster.urls, empty.path(), &format!("cli-ok-{trial}")).await);
        cli_ok.push(t.elapsed());
        let leader = cluster
            .leader()
            .await
            .ok_or_else(|| anyhow::anyhow!("no leader before trial {trial}"))?;
        let killed = Instant::now();
        cluster.kill(leader);
        let api = async {
            for i in 0..100 {
                if api_submit(&mut client, &spec, &format!("api-fo-{trial}-{i}")).await {
                    return Some(killed.elapsed());
                }
            }
            None
        };
        let cli = async {
            for i in 0..100 {
                let key = format!("cli-fo-{trial}-{i}");
                if cli_submit(&cluster.urls, empty.path(), &key).await {
                    return Some(killed.elapsed());
                }
            }
            None
        };
        let (api, cli) = tokio::join!(api, cli);
        api_fo.push(api.ok_or_else(|| anyhow::anyhow!("the client never got an answer"))?);
        cli_fo.push(cli.ok_or_else(|| anyhow::anyhow!("the CLI never got an answer"))?);
        cluster.restart(leader)?;
        cluster
            .leader()
            .await
            .ok_or_else(|| anyhow::anyhow!("no leader after trial {trial}"))?;
        // Let the restarted server catch up before the next kill.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok([api_ok, cli_ok, api_fo, cli_fo])
}

fn row(what: &str, v: Vec<Duration>) {
    let (p50, max) = pct(v);
    println!(
        "| {what:<52} | {:>7.1} | {:>7.1} |",
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let [api_ok, cli_ok, api_fo, cli_fo] = client_side(args.trials).await?;
    println!(
        "failover as a client sees it: {} kill -9s of the leader of 3 `muster server` processes",
        args.trials
    );
    println!("| measurement                                          | p50 ms  | max ms  |");
    println!("|------------------------------------------------------|---------|---------|");
    row("client library: submit, no failure", api_ok);
    row("client library: leader killed → first acknowledged", api_fo);
    row(
        "CLI `run submit`: no failure (process start included)",
        cli_ok,
    );
    row("CLI `run submit`: leader killed → first exit 0", cli_fo);

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
    println!(
        "\nfailover in process: {} trials, 3 servers on loopback, election timeout ~1 s, heartbeat 100 ms",
        args.trials
    );
    println!("| measurement                                          | p50 ms  | max ms  |");
    println!("|------------------------------------------------------|---------|---------|");
    row("submit, no failure", healthy);
    row("leader stopped → first acknowledged submission", failover);
    println!("goal: p50 under 1 s, max under 2 s");
    Ok(())
}
