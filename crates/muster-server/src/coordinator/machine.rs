//! The replicated state machine as muster-raft sees it: decode a [`Command`], apply it to
//! the shared [`State`], and announce the new applied index to everyone waiting on state.

use std::sync::{Arc, RwLock};

use muster_core::{Applied, ApplyError, Command, State};
use tokio::sync::watch;

/// The result of applying one entry, as it travels back to the proposer.
pub type ApplyResult = Result<Applied, ApplyError>;

/// Wraps the shared state for muster-raft.
#[derive(Debug)]
pub struct Machine {
    state: Arc<RwLock<State>>,
    applied: watch::Sender<u64>,
}

impl Machine {
    /// A machine over `state`; `applied` is bumped after every apply and restore.
    pub fn new(state: Arc<RwLock<State>>, applied: watch::Sender<u64>) -> Machine {
        Machine { state, applied }
    }
}

impl muster_raft::StateMachine for Machine {
    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8> {
        let result: ApplyResult = match Command::decode(data) {
            Ok(cmd) => {
                let result = self.state.write().expect("state lock").apply(&cmd);
                tracing::debug!(
                    index,
                    command = cmd.kind(),
                    run_id = cmd.run_id(),
                    applied = result.is_ok(),
                    "apply"
                );
                result
            }
            Err(e) => {
                tracing::error!(index, cause = %e, "skipping an undecodable log entry");
                Err(ApplyError::UndecodableCommand(e))
            }
        };
        self.applied.send_replace(index);
        serde_json::to_vec(&result).expect("apply results serialize")
    }

    fn snapshot(&self) -> Vec<u8> {
        self.state.read().expect("state lock").to_snapshot()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        let restored = State::from_snapshot(data)?;
        *self.state.write().expect("state lock") = restored;
        self.applied.send_modify(|i| *i += 0);
        Ok(())
    }
}
