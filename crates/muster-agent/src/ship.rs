//! The shipper: the agent's half of the offset/resume protocol, written once for both
//! streams an attempt produces, its log (`output.log`) and its metrics file
//! (`logs/metrics.jsonl`, see `metrics.rs`).
//!
//! A [`Shipper`] follows one file that only grows. Each tick it sends the bytes past
//! `shipped` in chunks, each tagged with the offset it starts at; the server trims
//! overlaps, and answers a gap (or, after a failover, its own shorter copy) with a resume
//! offset, which [`Shipper::resume`] rewinds to. The server's copy is complete once
//! `shipped` reaches the file's final length (the attempt's end report waits for that).
//! The shipper only moves bytes; the server parses them.

use std::path::{Path, PathBuf};

use muster_proto::v1::{self, agent_message};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

/// The most bytes one message carries.
pub(crate) const CHUNK: usize = 256 * 1024;

/// Which stream a shipper carries (the message it sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    /// The attempt's combined stdout and stderr (`LogData`; resumed by `LogResume`).
    Log,
    /// The attempt's metrics file (`MetricData`; resumed by `MetricResume`).
    Metrics,
}

/// The session stream went away while shipping (the session reconnects and resumes).
#[derive(Debug, thiserror::Error)]
#[error("the session stream closed")]
pub(crate) struct Closed;

/// Ships one growing file of one attempt.
#[derive(Debug)]
pub(crate) struct Shipper {
    stream: Stream,
    path: PathBuf,
    /// Bytes sent (the server's copy, as far as this agent knows).
    shipped: u64,
}

impl Shipper {
    /// A shipper of `path` from its start.
    pub(crate) fn new(stream: Stream, path: PathBuf) -> Shipper {
        Shipper {
            stream,
            path,
            shipped: 0,
        }
    }

    /// The file it ships.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// How far the file is shipped.
    pub(crate) fn shipped(&self) -> u64 {
        self.shipped
    }

    /// The server's copy ends at `offset`: ship from there.
    pub(crate) fn resume(&mut self, offset: u64) {
        self.shipped = offset;
    }

    /// Sends the file's bytes past `shipped` for attempt `attempt` of `run_id`, up to
    /// `budget` bytes. Returns the bytes sent.
    pub(crate) async fn ship(
        &mut self,
        run_id: &str,
        attempt: u32,
        mut budget: usize,
        out: &mpsc::Sender<v1::AgentMessage>,
    ) -> Result<usize, Closed> {
        // Most ticks find nothing new: a stat says so without opening the file (a node
        // with hundreds of attempts ships them all each tick).
        if file_len_now(&self.path) <= self.shipped {
            return Ok(0);
        }
        let mut sent = 0;
        while budget > 0 {
            let data = read_from(&self.path, self.shipped, CHUNK.min(budget)).await;
            if data.is_empty() {
                break;
            }
            let n = data.len();
            let (run_id, offset) = (run_id.to_string(), self.shipped);
            let msg = match self.stream {
                Stream::Log => agent_message::Msg::Log(v1::LogData {
                    run_id,
                    attempt,
                    offset,
                    data,
                }),
                Stream::Metrics => agent_message::Msg::Metrics(v1::MetricData {
                    run_id,
                    attempt,
                    offset,
                    data,
                }),
            };
            out.send(v1::AgentMessage { msg: Some(msg) })
                .await
                .map_err(|_| Closed)?;
            self.shipped += n as u64;
            budget -= n;
            sent += n;
        }
        Ok(sent)
    }
}

/// The file's length now (0 when there is none yet), by one `stat` on this thread: a
/// local metadata read is microseconds, far less than a hop to the blocking pool.
pub(crate) fn file_len_now(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Up to `max` bytes of `path` from `offset` (none if the file is missing or shorter).
async fn read_from(path: &Path, offset: u64, max: usize) -> Vec<u8> {
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::with_capacity(max.min(CHUNK));
    let _ = (&mut file).take(max as u64).read_to_end(&mut buf).await;
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ships_new_bytes_from_the_resume_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::metrics::host_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let line = b"{\"name\":\"a\",\"value\":1}\n";
        std::fs::write(&path, line).unwrap();
        let n = line.len();
        let (tx, mut rx) = mpsc::channel(16);
        let mut s = Shipper::new(Stream::Metrics, path.clone());
        assert_eq!(s.ship("r", 1, 1 << 20, &tx).await.unwrap(), n);
        assert_eq!(s.ship("r", 1, 1 << 20, &tx).await.unwrap(), 0);
        s.resume(10);
        assert_eq!(s.ship("r", 1, 1 << 20, &tx).await.unwrap(), n - 10);
        assert_eq!(s.shipped(), n as u64);
        let offsets: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| match m.msg {
                Some(agent_message::Msg::Metrics(d)) => d.offset,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(offsets, [0, 10]);
        assert_eq!(file_len_now(&path), n as u64);
    }

    #[tokio::test]
    async fn a_log_ships_in_chunks_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        std::fs::write(&path, vec![b'x'; CHUNK + 10]).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let mut s = Shipper::new(Stream::Log, path);
        // A budget smaller than the file: the rest goes next tick.
        assert_eq!(s.ship("r", 2, CHUNK, &tx).await.unwrap(), CHUNK);
        assert_eq!(s.ship("r", 2, CHUNK, &tx).await.unwrap(), 10);
        let chunks: Vec<(u32, u64, usize)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| match m.msg {
                Some(agent_message::Msg::Log(d)) => (d.attempt, d.offset, d.data.len()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(chunks, [(2, 0, CHUNK), (2, CHUNK as u64, 10)]);
        drop(rx);
        std::fs::write(s.path(), vec![b'y'; CHUNK + 20]).unwrap();
        assert!(
            s.ship("r", 2, CHUNK, &tx).await.is_err(),
            "a closed stream is an error"
        );
    }
}
