//! Where an attempt's metrics file is: every attempt gets `MUSTER_METRICS_FILE`, a file in
//! its workspace's `logs/` folder to which it appends JSON lines
//! (`{"name":..,"value":..,"step":..}`). The agent ships the file's bytes to the leader as
//! they are written with the same shipper as the log (`ship.rs`, resumed by
//! `MetricResume`). The server parses the lines; the agent only moves bytes. Stdout metric lines
//! (`##muster[metric] ...`) need nothing here: the server reads them from the log.

use std::path::{Path, PathBuf};

/// The metrics file, relative to the attempt's workspace.
pub(crate) const FILE: &str = "logs/metrics.jsonl";

/// The value of `MUSTER_METRICS_FILE` for a workspace as the run sees it (`/workspace` in
/// a container, the host folder for a process).
pub(crate) fn env_value(workspace: &str) -> String {
    format!("{workspace}/{FILE}")
}

/// Where an attempt's metrics file is on the host, given its working directory.
pub(crate) fn host_path(workdir: &Path) -> PathBuf {
    workdir.join("code").join(FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_and_the_agent_agree_on_the_file() {
        assert_eq!(env_value("/workspace"), "/workspace/logs/metrics.jsonl");
        assert_eq!(
            host_path(Path::new("/w")),
            Path::new("/w/code/logs/metrics.jsonl")
        );
    }
}
