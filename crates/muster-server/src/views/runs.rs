//! A run as the API and the studio show it: the replicated run, plus why it waits when it
//! is queued (the leader's last scheduling pass, kept in its memory).

use muster_core::RunState;
use muster_proto::run_to_wire;
use muster_proto::v1;

use crate::server::Server;

/// Run `id`, or `None` if there is none.
pub(crate) fn run(server: &Server, id: &str) -> Option<v1::Run> {
    server.coordinator.read(|s| {
        s.runs.get(id).map(|r| {
            let mut wire = run_to_wire(s, r);
            // A queued run says why it waits ("needs 2 nodes with 4 free GPUs; 1 available").
            if r.state == RunState::Queued
                && let Some(reason) = server.waiting.reason(r)
            {
                wire.message = Some(match &wire.message {
                    Some(m) => format!("{m}; waiting: {reason}"),
                    None => format!("waiting: {reason}"),
                });
            }
            wire
        })
    })
}

/// A run retention archived (read from archive blob `archive`), as the API shows it.
pub(crate) fn archived(server: &Server, run: &muster_core::state::Run, archive: String) -> v1::Run {
    let mut wire = server.coordinator.read(|s| run_to_wire(s, run));
    wire.archive = archive;
    wire
}
