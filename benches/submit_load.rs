//! Submit throughput and latency against `muster dev` over gRPC on 127.0.0.1.
//!
//! Starts `muster dev` in this process on a temporary data directory, creates a compute
//! target with no nodes (so runs stay queued and nothing executes), and submits N runs from
//! 1 client and from C concurrent clients (one HTTP/2 connection each). Every submission
//! is acknowledged only after its Raft entry is fsynced. For comparison, measured in the
//! same run on the same disk: the same number of entries written one fsync each with redb
//! (what a store that does not batch proposals gets).
//!
//! Then, in the same run, the cost of mutual TLS: a one-server cluster on plaintext and one
//! on TLS 1.3 (`muster tls init` certificates; a token on every call in both) take the same
//! load in turn for `--tls-rounds` rounds, and `--handshakes` fresh connections time what a
//! new CLI invocation pays for the handshake.
//!
//! `cargo run --release -p muster-benches --bin submit-load -- --runs 10000 --clients 64`

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use muster_core::RunSpec;
use muster_proto::v1;
use muster_testkit::DevCluster;

#[derive(Debug, Parser)]
struct Args {
    /// Submissions per measurement.
    #[arg(long, default_value_t = 10_000)]
    runs: usize,
    /// Concurrent clients in the concurrent measurement.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Also measure a cluster of this many servers on loopback (clients spread over all of
    /// them; followers forward to the leader), compared with the single server.
    #[arg(long, default_value_t = 3)]
    servers: u64,
    /// Rounds of the plaintext-vs-mutual-TLS comparison (one server each, taken in turn;
    /// 0 skips it).
    #[arg(long, default_value_t = 3)]
    tls_rounds: usize,
    /// Fresh connections (one call each) to time the TLS handshake a new CLI invocation pays.
    #[arg(long, default_value_t = 200)]
    handshakes: usize,
}

struct Figures {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn figures(mut lat: Vec<Duration>, wall: Duration) -> Figures {
    lat.sort();
    let at = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Figures {
        per_sec: lat.len() as f64 / wall.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        max: *lat.last().expect("measured"),
    }
}

async fn submit_load(url: &str, runs: usize, clients: usize) -> anyhow::Result<Figures> {
    submit_spread(&[url.to_string()], runs, clients).await
}

/// Client `i` talks to `urls[i % urls.len()]`.
async fn submit_spread(urls: &[String], runs: usize, clients: usize) -> anyhow::Result<Figures> {
    let mut spec = RunSpec::new("python train.py --lr 0.01");
    spec.compute = "bench-pool".into();
    spec.experiment = "bench".into();
    let wire: v1::RunSpec = spec.into();
    let per_client = runs / clients;
    let mut conns = Vec::new();
    for i in 0..clients {
        conns.push(muster_testkit::access::clients(&urls[i % urls.len()]).await?);
    }
    let wire = Arc::new(wire);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut c in conns {
        let wire = wire.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let t = Instant::now();
                c.runs
                    .submit_run(v1::SubmitRunRequest {
                        spec: Some((*wire).clone()),
                        idempotency_key: None,
                    })
                    .await?;
                lat.push(t.elapsed());
            }
            Ok::<_, tonic::Status>(lat)
        }));
    }
    let mut all = Vec::with_capacity(runs);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(figures(all, start.elapsed()))
}

fn fsync_baseline(dir: &std::path::Path, n: usize) -> anyhow::Result<Figures> {
    const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("entries");
    let db = redb::Database::create(dir.join("baseline.redb"))?;
    let payload = vec![7u8; 600];
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n as u64 {
        let t = Instant::now();
        let tx = db.begin_write()?;
        tx.open_table(TABLE)?.insert(i, payload.as_slice())?;
        tx.commit()?;
        lat.push(t.elapsed());
    }
    Ok(figures(lat, start.elapsed()))
}

fn row(name: &str, f: &Figures) {
    println!(
        "| {name:<44} | {:>9.0} | {:>8.2} | {:>8.2} | {:>8.2} |",
        f.per_sec,
        f.p50.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3,
        f.max.as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = DevCluster::start().await?;
    let mut c = dev.clients().await?;
    c.compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(v1::ComputeTarget {
                name: "bench-pool".into(),
                r#type: "attached".into(),
                ..Default::default()
            }),
        })
        .await?;
    // Warm up connections and the log.
    submit_load(&dev.url(), 500, 10).await?;
    let single_n = (args.runs / 5).max(1);
    let single = submit_load(&dev.url(), single_n, 1).await?;
    let many = submit_load(&dev.url(), args.runs, args.clients).await?;
    let tmp = tempfile::tempdir()?;
    let base = fsync_baseline(tmp.path(), single_n.min(2_000))?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "submit-load: {} runs, {cpus} CPUs, every submission fsynced before it is acknowledged",
        args.runs
    );
    println!(
        "| {:<44} | {:>9} | {:>8} | {:>8} | {:>8} |",
        "measurement", "per s", "p50 ms", "p99 ms", "max ms"
    );
    println!(
        "|{:-<46}|{:-<11}|{:-<10}|{:-<10}|{:-<10}|",
        "", "", "", "", ""
    );
    row(
        &format!("muster dev, {} clients ({} runs)", args.clients, args.runs),
        &many,
    );
    row(&format!("muster dev, 1 client ({single_n} runs)"), &single);
    row("baseline: redb, one fsync per entry (no gRPC)", &base);
    println!(
        "batching gain over one fsync per entry: {:.1}x",
        many.per_sec / base.per_sec
    );
    let total = all_runs(&dev).await?;
    if args.servers > 1 {
        let cluster = muster_testkit::cluster::TestCluster::start(args.servers).await?;
        let urls: Vec<String> = cluster
            .ids()
            .into_iter()
            .map(|id| cluster.url(id))
            .collect();
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
        submit_spread(&urls, 500, 10).await?;
        let spread = submit_spread(&urls, args.runs, args.clients).await?;
        let leader = cluster.leader().await?;
        let to_leader = submit_spread(&[cluster.url(leader)], args.runs, args.clients).await?;
        row(
            &format!(
                "{} servers, {} clients spread over all",
                args.servers, args.clients
            ),
            &spread,
        );
        row(
            &format!(
                "{} servers, {} clients on the leader",
                args.servers, args.clients
            ),
            &to_leader,
        );
        println!(
            "cluster vs single server ({} clients): {:.2}x slower (spread), {:.2}x (leader only)",
            args.clients,
            many.per_sec / spread.per_sec,
            many.per_sec / to_leader.per_sec
        );
    }
    if args.tls_rounds > 0 {
        tls_comparison(&args).await?;
    }
    let acknowledged = 500 + single_n + (args.runs / args.clients) * args.clients;
    anyhow::ensure!(
        total == acknowledged,
        "expected all {acknowledged} acknowledged runs to exist, found {total}"
    );
    println!("all {acknowledged} acknowledged runs exist, each once");
    Ok(())
}

/// A one-server cluster with the bench's compute target, on plaintext or mutual TLS.
async fn bench_server(tls: bool) -> anyhow::Result<muster_testkit::cluster::TestCluster> {
    use muster_testkit::cluster::TestCluster;
    let cluster = if tls {
        TestCluster::start_tls(1).await?
    } else {
        TestCluster::start(1).await?
    };
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
    submit_load(&cluster.url(1), 500, 10).await?;
    Ok(cluster)
}

/// `n` fresh connections to `url`, each making one call (what a CLI invocation does);
/// the median time per connection and call.
async fn fresh_calls(url: &str, n: usize) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut c = muster_testkit::access::clients(url).await?;
        c.access.who_am_i(v1::WhoAmIRequest {}).await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// The same load against a plaintext server and a mutual-TLS one (a token on every call
/// in both), rounds taken in turn so drift hits both; then the handshake cost.
async fn tls_comparison(args: &Args) -> anyhow::Result<()> {
    let plain = bench_server(false).await?;
    let tls = bench_server(true).await?;
    let mut rates = (Vec::new(), Vec::new());
    for round in 0..args.tls_rounds {
        let p = submit_load(&plain.url(1), args.runs, args.clients).await?;
        let t = submit_load(&tls.url(1), args.runs, args.clients).await?;
        row(
            &format!(
                "plaintext + token, {} clients, round {}",
                args.clients,
                round + 1
            ),
            &p,
        );
        row(
            &format!(
                "mutual TLS + token, {} clients, round {}",
                args.clients,
                round + 1
            ),
            &t,
        );
        rates.0.push(p.per_sec);
        rates.1.push(t.per_sec);
    }
    let range = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::MAX, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        (lo, hi)
    };
    let (plo, phi) = range(&rates.0);
    let (tlo, thi) = range(&rates.1);
    let slower: Vec<f64> = rates
        .0
        .iter()
        .zip(&rates.1)
        .map(|(p, t)| (1.0 - t / p) * 100.0)
        .collect();
    let (slo, shi) = (
        slower.iter().cloned().fold(f64::MAX, f64::min),
        slower.iter().cloned().fold(f64::MIN, f64::max),
    );
    println!(
        "mutual TLS vs plaintext, {} clients: {tlo:.0}-{thi:.0}/s vs {plo:.0}-{phi:.0}/s, {slo:.1}% to {shi:.1}% slower per round (goal: at most 10%)",
        args.clients
    );
    let p = fresh_calls(&plain.url(1), args.handshakes).await?;
    let t = fresh_calls(&tls.url(1), args.handshakes).await?;
    println!(
        "a new connection and one call (a CLI invocation without process start), median of {}: plaintext {:.2} ms, TLS {:.2} ms: the handshake costs {:.2} ms",
        args.handshakes,
        p.as_secs_f64() * 1e3,
        t.as_secs_f64() * 1e3,
        (t.as_secs_f64() - p.as_secs_f64()) * 1e3
    );
    Ok(())
}

async fn all_runs(dev: &DevCluster) -> anyhow::Result<usize> {
    let mut c = dev.clients().await?;
    Ok(c.runs
        .list_runs(v1::ListRunsRequest::default())
        .await?
        .into_inner()
        .runs
        .len())
}
