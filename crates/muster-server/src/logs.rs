//! The log store: each rank's combined stdout/stderr of each attempt, appended as agents
//! ship it, under `<data>/logs/<run>/<attempt>.<rank>.log`.
//!
//! Appends carry the offset the agent believes the log has; a retransmission after a
//! reconnect overlaps and is trimmed, a gap is refused with the offset to resume from. An
//! attempt's log is fsynced before its end is proposed, so a run's logs up to its end
//! survive a crash (DESIGN.md invariant 5).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::sync::watch;

type Key = (String, u32, u32);

/// Attempt logs on disk, with a change signal for followers.
#[derive(Debug)]
pub struct LogStore {
    root: PathBuf,
    open: Mutex<HashMap<Key, (File, u64)>>,
    changed: watch::Sender<u64>,
}

/// The result of an append.
#[derive(Debug, PartialEq, Eq)]
pub enum Append {
    /// Stored; the log is now this long.
    Stored(u64),
    /// The data starts past the end of the log: resend from this offset.
    Gap(u64),
}

impl LogStore {
    /// Opens (creating) the store under `root`.
    pub fn open(root: PathBuf) -> io::Result<LogStore> {
        std::fs::create_dir_all(&root)?;
        Ok(LogStore {
            root,
            open: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        })
    }

    fn path(&self, run: &str, attempt: u32, rank: u32) -> PathBuf {
        self.root.join(run).join(format!("{attempt}.{rank}.log"))
    }

    /// A receiver that changes whenever any log grows.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Appends `data`, which the agent says starts at `offset`.
    pub fn append(
        &self,
        run: &str,
        attempt: u32,
        rank: u32,
        offset: u64,
        data: &[u8],
    ) -> io::Result<Append> {
        let key = (run.to_string(), attempt, rank);
        let mut open = self.open.lock().expect("log lock");
        if !open.contains_key(&key) {
            let path = self.path(run, attempt, rank);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&path)?;
            let len = file.metadata()?.len();
            open.insert(key.clone(), (file, len));
        }
        let (file, len) = open.get_mut(&key).expect("inserted above");
        if offset > *len {
            return Ok(Append::Gap(*len));
        }
        let skip = (*len - offset) as usize;
        if skip < data.len() {
            file.write_all(&data[skip..])?;
            *len += (data.len() - skip) as u64;
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(Append::Stored(*len))
    }

    /// The stored length of a log.
    pub fn len(&self, run: &str, attempt: u32, rank: u32) -> u64 {
        if let Some((_, len)) =
            self.open
                .lock()
                .expect("log lock")
                .get(&(run.to_string(), attempt, rank))
        {
            return *len;
        }
        std::fs::metadata(self.path(run, attempt, rank))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Makes a log durable and closes it (called before an attempt's end is proposed).
    pub fn seal(&self, run: &str, attempt: u32, rank: u32) -> io::Result<()> {
        let entry = self
            .open
            .lock()
            .expect("log lock")
            .remove(&(run.to_string(), attempt, rank));
        if let Some((file, _)) = entry {
            file.sync_all()?;
        }
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Reads up to `max` bytes from `offset`; empty at the end (or if there is no log).
    pub fn read(
        &self,
        run: &str,
        attempt: u32,
        rank: u32,
        offset: u64,
        max: usize,
    ) -> io::Result<Vec<u8>> {
        read_at(&self.path(run, attempt, rank), offset, max)
    }
}

fn read_at(path: &Path, offset: u64, max: usize) -> io::Result<Vec<u8>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(max.min(1 << 16));
    file.take(max as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_trim_overlaps_and_refuse_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path().to_path_buf()).unwrap();
        assert_eq!(
            logs.append("r", 1, 0, 0, b"hello ").unwrap(),
            Append::Stored(6)
        );
        assert_eq!(
            logs.append("r", 1, 0, 3, b"lo world").unwrap(),
            Append::Stored(11)
        );
        assert_eq!(logs.append("r", 1, 0, 20, b"x").unwrap(), Append::Gap(11));
        logs.seal("r", 1, 0).unwrap();
        assert_eq!(logs.read("r", 1, 0, 0, 100).unwrap(), b"hello world");
        assert_eq!(logs.read("r", 1, 0, 6, 3).unwrap(), b"wor");
        assert_eq!(logs.len("r", 1, 0), 11);
        assert_eq!(logs.read("r", 2, 0, 0, 100).unwrap(), b"");
    }
}
