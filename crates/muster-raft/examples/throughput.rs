//! Measures proposals per second on a single-voter node with concurrent proposers.
//!
//! ```text
//! cargo run --release -p muster-raft --example throughput -- [proposers] [seconds] [dir]
//! ```
//! Defaults: 64 proposers, 5 seconds, a temporary directory (on the disk holding the system's
//! temporary directory: pass `dir` to measure another disk).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use muster_raft::{RaftConfig, RaftNode, StateMachine, Transport};

#[derive(Default)]
struct Counter(u64);

impl StateMachine for Counter {
    fn apply(&mut self, _index: u64, data: &[u8]) -> Vec<u8> {
        self.0 += data.len() as u64;
        self.0.to_le_bytes().to_vec()
    }

    fn snapshot(&self) -> Vec<u8> {
        self.0.to_le_bytes().to_vec()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        self.0 = u64::from_le_bytes(data.try_into().map_err(|_| "bad snapshot".to_owned())?);
        Ok(())
    }
}

struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, _to: u64, _message: Vec<u8>) {}
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let proposers: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let temp = tempfile::tempdir()?;
    let dir = args
        .next()
        .map(Into::into)
        .unwrap_or_else(|| temp.path().join("raft"));

    let raft = RaftNode::start(
        RaftConfig::default(),
        &dir,
        Counter::default(),
        Arc::new(NoPeers),
    )?;
    raft.propose(vec![0; 100]).await?; // wait for the election

    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..proposers {
        let (raft, done, stop) = (raft.clone(), Arc::clone(&done), Arc::clone(&stop));
        tasks.spawn(async move {
            // A typical command is a few hundred bytes of JSON.
            while !stop.load(Ordering::Relaxed) {
                raft.propose(vec![b'x'; 200])
                    .await
                    .expect("proposal failed");
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let total = done.load(Ordering::Relaxed);
    let status = raft.status();
    raft.shutdown().await;
    println!(
        "{total} proposals in {elapsed:.2?} with {proposers} proposers: {:.0} proposals/s \
         (applied index {}, snapshot index {})",
        total as f64 / elapsed.as_secs_f64(),
        status.applied_index,
        status.snapshot_index,
    );
    Ok(())
}
