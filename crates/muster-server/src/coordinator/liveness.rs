//! What the leader knows in memory and never puts in the log: when each node last sent a
//! heartbeat (thousands of nodes beat every second; DESIGN.md section 6) and why each
//! queued run waits, as the last scheduling pass saw it. A new leader starts both afresh.

use std::collections::HashMap;
use std::sync::Mutex;

use muster_core::Run;
use muster_core::schedule::Waiting;

use super::now_ms;

/// Heartbeats by node id, in Unix ms as this server saw them.
#[derive(Debug, Default)]
pub struct Heartbeats(Mutex<HashMap<String, u64>>);

impl Heartbeats {
    /// Records a heartbeat from a node, now.
    pub fn beat(&self, node_id: &str) {
        self.0
            .lock()
            .expect("heartbeat lock")
            .insert(node_id.to_string(), now_ms());
    }

    /// The last heartbeat of a node, in Unix ms, as seen by this server.
    pub fn last(&self, node_id: &str) -> Option<u64> {
        self.0.lock().expect("heartbeat lock").get(node_id).copied()
    }

    /// Every node's last heartbeat.
    pub fn snapshot(&self) -> HashMap<String, u64> {
        self.0.lock().expect("heartbeat lock").clone()
    }
}

/// Why each queued run waits, from the leader's last scheduling pass.
#[derive(Debug, Default)]
pub struct WaitReasons(Mutex<Option<Waiting>>);

impl WaitReasons {
    /// Keeps the reasons of a pass (replacing the last pass's).
    pub fn set(&self, waiting: Waiting) {
        *self.0.lock().expect("waiting lock") = Some(waiting);
    }

    /// Why `run` waits, if the last pass said.
    pub fn reason(&self, run: &Run) -> Option<String> {
        let waiting = self.0.lock().expect("waiting lock");
        waiting
            .as_ref()
            .and_then(|w| w.reason(run))
            .map(str::to_string)
    }
}
