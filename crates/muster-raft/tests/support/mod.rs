//! Test support: a counting state machine, an in-memory network between handles, and a cluster
//! of nodes in one process.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_raft::{
    ProposeError, RaftConfig, RaftHandle, RaftNode, RaftStatus, Role, StateMachine, Transport,
};
use serde::{Deserialize, Serialize};

/// Upper bound on any wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// What the counter state machine holds. `digest` folds in every entry's index and value, so two
/// equal states have applied the same entries in the same order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterState {
    pub count: u64,
    pub sum: u64,
    pub digest: u64,
    pub last_index: u64,
}

/// A state machine that counts entries (each an 8-byte little-endian value). The test keeps a
/// clone of `state` to look inside.
#[derive(Debug, Clone, Default)]
pub struct Counter {
    pub state: Arc<Mutex<CounterState>>,
}

impl StateMachine for Counter {
    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8> {
        let mut state = self.state.lock().unwrap();
        assert!(
            index > state.last_index,
            "entry {index} applied after {}",
            state.last_index
        );
        let value = data.try_into().map(u64::from_le_bytes).unwrap_or(0);
        state.count += 1;
        state.sum += value;
        state.digest = state.digest.rotate_left(7) ^ value ^ index.wrapping_mul(0x9E37_79B9);
        state.last_index = index;
        state.count.to_le_bytes().to_vec()
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.state.lock().unwrap()).unwrap()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        let restored: CounterState = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        *self.state.lock().unwrap() = restored;
        Ok(())
    }
}

/// Delivers messages between handles of one process; a node not registered is unreachable.
#[derive(Debug, Default)]
pub struct Network {
    nodes: Mutex<HashMap<u64, RaftHandle>>,
}

impl Network {
    pub fn register(&self, handle: RaftHandle) {
        self.nodes.lock().unwrap().insert(handle.id(), handle);
    }

    pub fn unregister(&self, id: u64) {
        self.nodes.lock().unwrap().remove(&id);
    }

    pub fn transport(self: &Arc<Self>) -> Arc<dyn Transport> {
        Arc::new(MemTransport {
            network: Arc::clone(self),
        })
    }
}

struct MemTransport {
    network: Arc<Network>,
}

impl Transport for MemTransport {
    fn send(&self, to: u64, message: Vec<u8>) {
        let target = self.network.nodes.lock().unwrap().get(&to).cloned();
        if let Some(target) = target {
            // A stopped target is like an unreachable one.
            let _ = target.step(message);
        }
    }
}

/// Nothing to send to: for single-voter nodes.
pub fn no_transport() -> Arc<dyn Transport> {
    Arc::new(Network::default()).transport()
}

pub fn value(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

pub fn output(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap())
}

/// Waits (bounded by [`WAIT`]) until `handle`'s status satisfies `check`.
pub async fn wait_status(
    handle: &RaftHandle,
    what: &str,
    check: impl Fn(&RaftStatus) -> bool,
) -> RaftStatus {
    let mut rx = handle.watch_status();
    let result = tokio::time::timeout(WAIT, rx.wait_for(|s| check(s))).await;
    match result {
        Ok(Ok(status)) => status.clone(),
        _ => panic!(
            "node {}: timed out waiting for {what}; status {:?}",
            handle.id(),
            handle.status()
        ),
    }
}

/// Polls `check` every 10 ms, for at most [`WAIT`].
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One node of a [`Cluster`].
#[derive(Debug)]
pub struct TestNode {
    pub handle: RaftHandle,
    pub state: Arc<Mutex<CounterState>>,
}

impl TestNode {
    pub fn state(&self) -> CounterState {
        self.state.lock().unwrap().clone()
    }
}

/// Raft nodes in one process, connected by a [`Network`], each with its own data directory.
#[derive(Debug)]
pub struct Cluster {
    pub network: Arc<Network>,
    pub nodes: BTreeMap<u64, TestNode>,
    /// Each node's switch that makes its log writes fail (off unless a test turns it on).
    pub faults: BTreeMap<u64, muster_raft::WriteFaults>,
    root: tempfile::TempDir,
    template: RaftConfig,
}

impl Cluster {
    /// Starts a new cluster of `ids` (all founding voters), configured from `template`.
    pub fn start(ids: &[u64], template: RaftConfig) -> Cluster {
        let mut cluster = Cluster {
            network: Arc::new(Network::default()),
            nodes: BTreeMap::new(),
            faults: BTreeMap::new(),
            root: tempfile::tempdir().unwrap(),
            template,
        };
        for &id in ids {
            cluster.start_node(id, ids.to_vec());
        }
        cluster
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    /// Starts (or restarts, on its existing directory) node `id`.
    pub fn start_node(&mut self, id: u64, initial_voters: Vec<u64>) {
        let config = RaftConfig {
            id,
            initial_voters,
            write_faults: Some(self.faults.entry(id).or_default().clone()),
            ..self.template.clone()
        };
        let sm = Counter::default();
        let state = Arc::clone(&sm.state);
        let handle = RaftNode::start(config, &self.dir(id), sm, self.network.transport()).unwrap();
        self.network.register(handle.clone());
        self.nodes.insert(id, TestNode { handle, state });
    }

    /// Stops node `id` and cuts it off the network; its directory stays.
    pub async fn stop_node(&mut self, id: u64) {
        let node = self.nodes.remove(&id).unwrap();
        self.network.unregister(id);
        node.handle.shutdown().await;
    }

    pub fn handle(&self, id: u64) -> &RaftHandle {
        &self.nodes[&id].handle
    }

    /// The leader that every running member agrees on (waits for one). A server not yet added
    /// to the cluster knows no membership and is left out.
    pub async fn leader(&self) -> u64 {
        let mut found = None;
        wait_until("a leader all running members agree on", || {
            let statuses: Vec<RaftStatus> = self
                .nodes
                .values()
                .map(|n| n.handle.status())
                .filter(|s| s.voters.contains(&s.id) || s.learners.contains(&s.id))
                .collect();
            let leaders: Vec<u64> = statuses
                .iter()
                .filter(|s| s.role == Role::Leader)
                .map(|s| s.id)
                .collect();
            found = match leaders.as_slice() {
                [leader] if statuses.iter().all(|s| s.leader == Some(*leader)) => Some(*leader),
                _ => None,
            };
            found.is_some()
        })
        .await;
        found.unwrap()
    }

    /// Proposes through the current leader, retrying while leadership moves (only on errors
    /// that guarantee nothing was applied). Returns the leader's output.
    pub async fn propose(&self, v: u64) -> Result<u64, ProposeError> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leader = self.leader().await;
            match self.handle(leader).propose(value(v)).await {
                Ok(out) => return Ok(output(&out)),
                Err(ProposeError::NotLeader { .. } | ProposeError::Rejected(_))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Waits until every running node has applied exactly `state`.
    pub async fn wait_converged(&self, expected: &CounterState) {
        for (id, node) in &self.nodes {
            wait_until(&format!("node {id} to reach {expected:?}"), || {
                node.state() == *expected
            })
            .await;
        }
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await;
        }
    }
}

/// A fast clock for clusters in tests: 50 ms ticks, 0.5-1 s election timeout.
pub fn fast_config() -> RaftConfig {
    RaftConfig {
        tick_interval: Duration::from_millis(50),
        ..RaftConfig::default()
    }
}

pub fn data_dir(root: &Path) -> PathBuf {
    root.join("data")
}
