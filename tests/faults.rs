//! The seeded whole-system fault driver (issue 20, item 6), briefly: three `muster server`
//! processes and two `muster agent` processes under submits, cancels and sweeps while
//! servers and agents are killed (`kill -9`) and frozen (SIGSTOP) in an order drawn from a
//! seed. No acknowledged run is lost or duplicated, every run ends once, logs are whole, and
//! the replicas end equal. `benches/soak.rs` runs the same driver for as long as asked.

use muster_testkit::faults::{FaultPlan, drive};

async fn seed(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let report = drive(dir.path(), &FaultPlan::brief(seed)).await.unwrap();
    println!("{}", report.summary());
    assert!(report.submits > 10, "{}", report.summary());
    assert!(report.faults.len() >= 5, "{}", report.summary());
    assert!(report.violations.is_empty(), "{}", report.summary());
    // With a majority up between faults, the client's own failover answers every call.
    assert!(report.failed_calls.is_empty(), "{}", report.summary());
}

/// Seeds one after the other (two farms at once would share two cores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_lose_and_duplicate_nothing() {
    for s in [1, 2] {
        seed(s).await;
    }
}
