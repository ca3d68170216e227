//! # Soak: the seeded fault driver for as long as asked (issue 20, item 6)
//!
//! Three `muster server` processes and `--agents` `muster agent` processes on 127.0.0.1
//! take submits, cancels and sweeps from `--submitters` loops while servers and agents are
//! killed (`kill -9`) and frozen (SIGSTOP/SIGCONT), one at a time, in an order drawn from
//! `--seed` (printed; random when not given). When the time is up the farm settles and
//! every promise is checked (muster-testkit's `faults` module): no acknowledged run lost or
//! duplicated, every run ended once, cancels honoured, one active attempt at a time, logs
//! whole, sweeps ended, replicas equal. Prints operations and faults per minute and every
//! violation with the seed; exits 1 if there was one.
//!
//! `cargo run --release -p muster-benches --bin soak -- --minutes 30`

use std::time::Duration;

use clap::Parser;
use muster_testkit::faults::{FaultPlan, drive};

#[derive(Debug, Parser)]
struct Args {
    /// How long faults are injected.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// The seed of the fault schedule (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Agent processes.
    #[arg(long, default_value_t = 2)]
    agents: usize,
    /// Concurrent submit loops.
    #[arg(long, default_value_t = 3)]
    submitters: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    println!("soak: seed {seed}, {} minutes", args.minutes);
    let plan = FaultPlan {
        seed,
        duration: Duration::from_secs_f64(args.minutes * 60.0),
        agents: args.agents,
        submitters: args.submitters,
        ..FaultPlan::brief(seed)
    };
    let dir = tempfile::tempdir()?;
    let report = drive(dir.path(), &plan).await?;
    let minutes = report.ran_for.as_secs_f64() / 60.0;
    println!("{}", report.summary());
    println!(
        "per minute: {:.0} submits, {:.1} cancels, {:.1} sweeps acknowledged, {:.1} faults",
        report.submits as f64 / minutes,
        report.cancels as f64 / minutes,
        report.sweeps as f64 / minutes,
        report.faults.len() as f64 / minutes
    );
    if report.violations.is_empty() {
        println!(
            "no violation in {minutes:.1} minutes and {} faults",
            report.faults.len()
        );
        Ok(())
    } else {
        println!(
            "{} violations: reproduce with --seed {seed}",
            report.violations.len()
        );
        std::process::exit(1);
    }
}
