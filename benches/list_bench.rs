//! # Lists at 100,000 runs, and what a run costs the state (issue 18, items 3 and 4)
//!
//! Starts `muster dev` in this process, parks runs on a compute target without nodes (they
//! stay queued; nothing executes), and at `--small` runs and then at `--runs` runs, in the
//! same process, times `--samples` of each, for `--rounds` rounds:
//!
//! - `ListRuns`, first page of 50, over one gRPC connection (the server's answer alone);
//! - the same page filtered on an experiment that 1 run in 10 has;
//! - `muster run list` (the CLI process, its default page of 50, table output), against
//!   `muster --version` (the process start alone);
//! - `muster run list --all -o json` once per round (every run, unpaged), for scale.
//!
//! The figures at `--small` and at `--runs` are the comparison: a page should cost the
//! same whatever the state holds. The bench process's resident memory before and after the
//! runs were submitted gives what one queued run costs the server (state, indexes, Raft log
//! cache, all of it).
//!
//! Then item 4's figure, on muster-core's `State` alone (the replicated state every server
//! holds and snapshots): `--finished` runs taken through submit, placement, running, log
//! seal and completion the way the server records a `muster run submit -- true` (a code
//! snapshot reference and an idempotency key, as the CLI sends them), and the bytes each
//! adds to the state's snapshot encoding, then after retention archived them.
//!
//! `cargo run --release -p muster-benches --bin list-bench -- --runs 100000 --rounds 3`

use std::time::Instant;

use clap::Parser;
use muster_core::compute::{ComputeKind, ComputeSpec, Tier};
use muster_core::spec::CodeRef;
use muster_core::state::{AttemptReport, MAX_ARCHIVE_RUNS, RunArchive, SealedLog, encode_archive};
use muster_core::{AttemptEnd, Capacity, Command, Decision, Resources, RunSpec, State, schedule};
use muster_proto::v1;
use muster_testkit::stats::p50_p99_ms;
use muster_testkit::{DevCluster, muster, muster_bin};

#[derive(Debug, Parser)]
struct Args {
    /// Runs in the large measurement.
    #[arg(long, default_value_t = 100_000)]
    runs: usize,
    /// Runs in the small measurement (taken first, from the same server).
    #[arg(long, default_value_t = 1_000)]
    small: usize,
    /// Rounds of each measurement.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Samples per figure and round.
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// Concurrent clients that submit the runs.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Finished runs in the state-size measurement.
    #[arg(long, default_value_t = 10_000)]
    finished: usize,
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    muster_testkit::procfs::rss_bytes(std::process::id()).unwrap_or(0)
}

/// Submits `n` parked runs from `clients` connections; every tenth in experiment `rare`.
async fn park(url: &str, n: usize, clients: usize) -> anyhow::Result<()> {
    let per = n.div_ceil(clients);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut conn = muster_testkit::access::clients(url).await?;
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let n = c * per + i;
                let mut spec = RunSpec::new("python train.py --lr 0.01");
                spec.compute = "parked".into();
                spec.experiment = if n.is_multiple_of(10) {
                    "rare"
                } else {
                    "common"
                }
                .into();
                conn.runs
                    .submit_run(v1::SubmitRunRequest {
                        spec: Some(spec.into()),
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

/// One round's figures at the current size.
#[derive(Debug, Default, Clone)]
struct Round {
    page: (f64, f64),
    filtered: (f64, f64),
    cli: (f64, f64),
    cli_alone: (f64, f64),
    all_json_ms: f64,
    all_json_bytes: usize,
}

async fn measure(url: &str, samples: usize) -> anyhow::Result<Round> {
    let mut c = muster_testkit::access::clients(url).await?;
    let mut r = Round::default();
    let mut page = Vec::new();
    let mut filtered = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        let got = c
            .runs
            .list_runs(v1::ListRunsRequest {
                page_size: 50,
                ..Default::default()
            })
            .await?
            .into_inner();
        page.push(t.elapsed());
        anyhow::ensure!(got.runs.len() == 50, "a page of 50, got {}", got.runs.len());
        let t = Instant::now();
        let got = c
            .runs
            .list_runs(v1::ListRunsRequest {
                page_size: 50,
                experiment: Some("rare".into()),
                ..Default::default()
            })
            .await?
            .into_inner();
        filtered.push(t.elapsed());
        anyhow::ensure!(
            got.runs
                .iter()
                .all(|r| r.spec.as_ref().is_some_and(|s| s.experiment == "rare")),
            "the filter holds"
        );
    }
    r.page = p50_p99_ms(page);
    r.filtered = p50_p99_ms(filtered);
    let cwd = tempfile::tempdir()?;
    let mut cli = Vec::new();
    let mut alone = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        let out = muster(url, cwd.path(), &["run", "list"]).await;
        cli.push(t.elapsed());
        anyhow::ensure!(out.code == 0, "run list failed: {out:?}");
        let t = Instant::now();
        let version = tokio::process::Command::new(muster_bin())
            .arg("--version")
            .output()
            .await?;
        alone.push(t.elapsed());
        anyhow::ensure!(version.status.success(), "muster --version failed");
    }
    r.cli = p50_p99_ms(cli);
    r.cli_alone = p50_p99_ms(alone);
    let t = Instant::now();
    let out = muster(url, cwd.path(), &["run", "list", "--all", "-o", "json"]).await;
    r.all_json_ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(out.code == 0, "run list --all failed: {out:?}");
    r.all_json_bytes = out.stdout.len();
    Ok(r)
}

/// `lo–hi` over the rounds of `f`.
fn range(rounds: &[Round], f: impl Fn(&Round) -> f64) -> String {
    let v: Vec<f64> = rounds.iter().map(f).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.1}–{hi:.1}")
}

/// A state holding `n` runs finished the way the server records `muster run submit -- true`.
fn finished_state(n: usize) -> State {
    let mut s = State::default();
    let setup = [
        Command::CreateCompute {
            spec: ComputeSpec::new("local", ComputeKind::Local),
            at: 0,
        },
        Command::RegisterNode {
            node_id: "node-0123456789abcdef".into(),
            name: "workstation".into(),
            compute: "local".into(),
            capacity: Capacity {
                cpu_millis: 64_000,
                memory_bytes: 256 << 30,
                gpus: vec![],
                max_runs: 0,
            },
            labels: Default::default(),
            tier: Tier::Dedicated,
            address: "127.0.0.1".into(),
            at: 0,
        },
    ];
    for c in &setup {
        s.apply(c).expect("setup applies");
    }
    let sha = |i: usize, salt: u8| format!("{:0>62}{salt:02x}", format!("{i:x}"));
    for i in 0..n {
        let id = format!("{:032x}", (i as u128) << 64 | 0x5eed);
        let mut spec = RunSpec::new("true");
        spec.compute = "local".into();
        spec.experiment = "scratch".into();
        spec.resources = Resources {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
            gpus: 0,
        };
        spec.code = Some(CodeRef {
            manifest: sha(i, 1),
            files: 0,
            bytes: 0,
            git: None,
        });
        let at = 1_700_000_000_000 + i as u64 * 10;
        s.apply(&Command::SubmitRun {
            run_id: id.clone(),
            spec: Box::new(spec),
            idempotency_key: Some(format!("cli-{:032x}", i as u128 * 7919)),
            at,
        })
        .expect("submit applies");
        for d in schedule(&s, at).decisions {
            if let Decision::Place { .. } = d {
                s.apply(&d.into_command(at + 1)).expect("placement applies");
            }
        }
        let report = |report: AttemptReport, at: u64| Command::ReportAttempt {
            run_id: id.clone(),
            attempt: 1,
            node_id: "node-0123456789abcdef".into(),
            report,
            at,
        };
        for c in [
            report(AttemptReport::Running, at + 3),
            Command::SealLog {
                run_id: id.clone(),
                attempt: 1,
                rank: 0,
                log: SealedLog {
                    sha256: sha(i, 2),
                    bytes: 0,
                },
            },
            report(
                AttemptReport::Ended {
                    end: AttemptEnd::Completed,
                    exit_code: Some(0),
                    message: None,
                    outputs: None,
                },
                at + 8,
            ),
        ] {
            s.apply(&c).expect("the run's reports apply");
        }
    }
    s
}

fn state_size(n: usize) {
    let empty = finished_state(0).to_snapshot().len();
    let s = finished_state(n);
    let full = s.to_snapshot().len();
    let per_run = (full - empty) as f64 / n as f64;
    let mut archived = s.clone();
    let mut blob_bytes = 0usize;
    loop {
        let ids = archived.archivable(u64::MAX, MAX_ARCHIVE_RUNS);
        if ids.is_empty() {
            break;
        }
        let blob = {
            let runs: Vec<_> = ids.iter().map(|id| &archived.runs[id]).collect();
            encode_archive(&runs)
        };
        blob_bytes += blob.len();
        let sha = format!("{:064x}", archived.archives.len() + 1);
        archived
            .apply(&Command::ArchiveRuns {
                archive: RunArchive {
                    sha256: sha,
                    runs: ids.len() as u64,
                    bytes: blob.len() as u64,
                    finished_before: u64::MAX,
                    at: 0,
                },
                run_ids: ids,
            })
            .expect("the archive applies");
    }
    let after = archived.to_snapshot().len();
    println!();
    println!(
        "state: {n} finished `muster run submit -- true` runs (muster-core State, snapshot encoding)"
    );
    println!("| figure | bytes |");
    println!("|---|---|");
    println!("| state with none | {empty} |");
    println!("| state with {n} | {full} |");
    println!("| per finished run in the state | {per_run:.0} |");
    println!(
        "| per run in the archive blobs | {:.0} |",
        blob_bytes as f64 / n as f64
    );
    println!(
        "| state after retention archived them ({} archives) | {after} ({:.1} per run) |",
        archived.archives.len(),
        (after - empty) as f64 / n as f64
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.small >= 50 && args.runs > args.small,
        "--runs must exceed --small (at least 50)"
    );
    let rss_start = rss();
    let dev = DevCluster::start().await?;
    let url = dev.url();
    muster_testkit::access::create_attached(&url, "parked").await?;
    // Build the CLI before timing it.
    muster_bin();

    let mut table: Vec<(usize, Vec<Round>, f64)> = Vec::new();
    let mut have = 0;
    for size in [args.small, args.runs] {
        let before = rss();
        let t = Instant::now();
        park(&url, size - have, args.clients).await?;
        let submit_s = t.elapsed().as_secs_f64();
        eprintln!(
            "  {size} runs parked ({:.0} submits/s)",
            (size - have) as f64 / submit_s
        );
        let per_run = (rss().saturating_sub(before)) as f64 / (size - have) as f64;
        have = size;
        let mut rounds = Vec::new();
        for round in 0..args.rounds {
            eprintln!("  {size} runs: round {}", round + 1);
            rounds.push(measure(&url, args.samples).await?);
        }
        table.push((size, rounds, per_run));
    }
    println!(
        "list-bench: {} and {} queued runs, {} rounds of {} samples (ranges over the rounds: p50 / p99 ms)",
        args.small, args.runs, args.rounds, args.samples
    );
    println!("| figure | {} runs | {} runs |", table[0].0, table[1].0);
    println!("|---|---|---|");
    let row = |name: &str, f: &dyn Fn(&Round) -> (f64, f64)| {
        let cell = |rounds: &[Round]| {
            format!(
                "{} / {}",
                range(rounds, |r| f(r).0),
                range(rounds, |r| f(r).1)
            )
        };
        println!("| {name} | {} | {} |", cell(&table[0].1), cell(&table[1].1));
    };
    row("ListRuns first page (50), gRPC", &|r| r.page);
    row("ListRuns first page, experiment filter (1 in 10)", &|r| {
        r.filtered
    });
    row("`muster run list` (CLI process, page of 50)", &|r| r.cli);
    row("`muster --version` (process start alone)", &|r| r.cli_alone);
    println!(
        "| `muster run list --all -o json`, ms | {} | {} |",
        range(&table[0].1, |r| r.all_json_ms),
        range(&table[1].1, |r| r.all_json_ms)
    );
    println!(
        "| its output, MB | {:.1} | {:.1} |",
        table[0].1[0].all_json_bytes as f64 / 1e6,
        table[1].1[0].all_json_bytes as f64 / 1e6
    );
    println!(
        "| server memory per queued run (RSS growth while submitting), bytes | {:.0} | {:.0} |",
        table[0].2, table[1].2
    );
    println!(
        "| bench process RSS at the end, MB | {:.0} (at start {:.0}) | |",
        rss() as f64 / 1e6,
        rss_start as f64 / 1e6
    );
    drop(dev);
    state_size(args.finished);
    Ok(())
}
