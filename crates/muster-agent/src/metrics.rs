//! Metrics shipping: every attempt gets `MUSTER_METRICS_FILE`, a file in its workspace's
//! `logs/` folder to which it appends JSON lines (`{"name":..,"value":..,"step":..}`). The
//! agent ships the file's bytes to the leader as they are written, exactly like the log:
//! each chunk carries the offset it starts at, the server trims overlaps and answers a gap
//! (or, after a failover, its own shorter copy) with a `MetricResume` offset to ship from.
//! The server parses the lines; the agent only moves bytes. Stdout metric lines
//! (`##muster[metric] ...`) need nothing here: the server reads them from the log.

use std::path::{Path, PathBuf};

use muster_proto::v1::{self, agent_message};
use tokio::sync::mpsc;

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

/// How far an attempt's metrics file has been shipped.
#[derive(Debug, Default)]
pub(crate) struct Shipping {
    /// Bytes sent (the server's copy, as far as this agent knows).
    pub(crate) shipped: u64,
}

impl Shipping {
    /// Sends the file's bytes past `shipped`, up to `budget` bytes. Returns the bytes sent.
    pub(crate) async fn ship(
        &mut self,
        run_id: &str,
        attempt: u32,
        path: &Path,
        mut budget: usize,
        out: &mpsc::Sender<v1::AgentMessage>,
    ) -> anyhow::Result<usize> {
        let mut sent = 0;
        while budget > 0 {
            let data = crate::session::read_from(
                path,
                self.shipped,
                crate::session::SHIP_CHUNK.min(budget),
            )
            .await;
            if data.is_empty() {
                break;
            }
            let n = data.len();
            out.send(v1::AgentMessage {
                msg: Some(agent_message::Msg::Metrics(v1::MetricData {
                    run_id: run_id.to_string(),
                    attempt,
                    offset: self.shipped,
                    data,
                })),
            })
            .await?;
            self.shipped += n as u64;
            budget -= n;
            sent += n;
        }
        Ok(sent)
    }

    /// The server's copy ends at `offset`: ship from there.
    pub(crate) fn resume(&mut self, offset: u64) {
        self.shipped = offset;
    }
}

/// The file's length now (0 when the run wrote none).
pub(crate) async fn file_len(path: &Path) -> u64 {
    tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ships_new_bytes_from_the_resume_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = host_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{\"name\":\"a\",\"value\":1}\n").unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let mut s = Shipping::default();
        assert_eq!(s.ship("r", 1, &path, 1 << 20, &tx).await.unwrap(), 24);
        assert_eq!(s.ship("r", 1, &path, 1 << 20, &tx).await.unwrap(), 0);
        s.resume(10);
        assert_eq!(s.ship("r", 1, &path, 1 << 20, &tx).await.unwrap(), 14);
        let offsets: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| match m.msg {
                Some(agent_message::Msg::Metrics(d)) => d.offset,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(offsets, [0, 10]);
        assert_eq!(file_len(&path).await, 24);
        assert_eq!(env_value("/workspace"), "/workspace/logs/metrics.jsonl");
    }
}
