//! The log store: each rank's combined stdout/stderr of each attempt, appended as agents
//! ship it, under `<data>/logs/<run>/<attempt>.<rank>.log`.
//!
//! Appends carry the offset the agent believes the log has; a retransmission after a
//! reconnect overlaps and is trimmed, a gap is refused with the offset to resume from.
//!
//! A live log exists only on the leader that takes it from the agent. When the agent reports
//! a rank's end, the leader seals that rank's log (`crate::effects::seal_log`): this store
//! fsyncs the file and closes it ([`LogStore::seal`]), the blob store takes a copy, the blob
//! goes onto a majority of servers ([`super::Store::seal_log`]), `SealLog` records its SHA-256
//! and length in the replicated state, and only then is the end proposed. So a run's logs up
//! to its end survive a crash and the loss of any one server (DESIGN.md invariant 5), and any
//! server serves an ended rank's log from the blob. Once the end is applied the file is
//! removed; the blob is the log.
//!
//! A sealed log is closed for good: bytes that a late-returning agent ships for it are
//! dropped (the store refuses them from the moment the seal starts; the session drops them
//! once the seal is in the state).

use std::collections::{HashMap, HashSet};
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
    /// Logs being sealed (or sealed, until their file is removed): appends are refused.
    sealed: Mutex<HashSet<Key>>,
    changed: watch::Sender<u64>,
}

/// The result of an append.
#[derive(Debug, PartialEq, Eq)]
pub enum Append {
    /// Stored; the log is now this long.
    Stored(u64),
    /// The data starts past the end of the log: resend from this offset.
    Gap(u64),
    /// The log is sealed (or being sealed): nothing more is taken.
    Sealed,
}

impl LogStore {
    /// Opens (creating) the store under `root`.
    pub fn open(root: PathBuf) -> io::Result<LogStore> {
        std::fs::create_dir_all(&root)?;
        Ok(LogStore {
            root,
            open: Mutex::new(HashMap::new()),
            sealed: Mutex::new(HashSet::new()),
            changed: watch::channel(0).0,
        })
    }

    /// Where a rank's log file is.
    pub fn path(&self, run: &str, attempt: u32, rank: u32) -> PathBuf {
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
        if self.sealed.lock().expect("log lock").contains(&key) {
            return Ok(Append::Sealed);
        }
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

    /// Closes a log for good (called before an attempt's end is proposed): later appends
    /// are refused, until [`LogStore::unseal`] (the seal failed) or [`LogStore::remove`]
    /// (the sealed blob replaced it). The live file is not fsynced: what makes the log
    /// durable is its blob copy (fsynced, and on a majority of servers) that the caller
    /// makes next; until the attempt's end is recorded the agent keeps the bytes and sends
    /// them again after a crash, so syncing the live file too bought nothing but an fsync
    /// per rank.
    pub fn seal(&self, run: &str, attempt: u32, rank: u32) -> io::Result<()> {
        let key = (run.to_string(), attempt, rank);
        {
            let mut open = self.open.lock().expect("log lock");
            self.sealed.lock().expect("log lock").insert(key.clone());
            open.remove(&key);
        }
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Takes appends to a log again (its seal did not complete).
    pub fn unseal(&self, run: &str, attempt: u32, rank: u32) {
        self.sealed
            .lock()
            .expect("log lock")
            .remove(&(run.to_string(), attempt, rank));
    }

    /// The logs with a file on this server (not yet replaced by a sealed blob), as
    /// `(run, attempt, rank)`.
    pub fn live(&self) -> io::Result<Vec<(String, u32, u32)>> {
        let mut found = Vec::new();
        for run in std::fs::read_dir(&self.root)? {
            let run = run?;
            if !run.file_type()?.is_dir() {
                continue;
            }
            let Some(run_id) = run.file_name().to_str().map(str::to_string) else {
                continue;
            };
            for file in std::fs::read_dir(run.path())? {
                let name = file?.file_name();
                let parsed = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|n| n.split_once('.'))
                    .and_then(|(a, r)| Some((a.parse().ok()?, r.parse().ok()?)));
                if let Some((attempt, rank)) = parsed {
                    found.push((run_id.clone(), attempt, rank));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// Removes a rank's log file (its sealed blob replaces it).
    pub fn remove(&self, run: &str, attempt: u32, rank: u32) -> io::Result<()> {
        let key = (run.to_string(), attempt, rank);
        // Under the lock, so no append recreates the file in between.
        let mut open = self.open.lock().expect("log lock");
        open.remove(&key);
        self.sealed.lock().expect("log lock").remove(&key);
        let path = self.path(run, attempt, rank);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // The run's directory goes with its last live log (it fails while others remain).
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
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

    #[test]
    fn a_sealed_log_takes_no_more_bytes_until_unsealed() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path().to_path_buf()).unwrap();
        logs.append("r", 1, 1, 0, b"a\n").unwrap();
        logs.append("q", 2, 0, 0, b"b\n").unwrap();
        assert_eq!(
            logs.live().unwrap(),
            vec![("q".to_string(), 2, 0), ("r".to_string(), 1, 1)]
        );
        logs.seal("r", 1, 1).unwrap();
        assert_eq!(
            logs.append("r", 1, 1, 2, b"late\n").unwrap(),
            Append::Sealed
        );
        assert_eq!(
            logs.append("r", 1, 1, 0, b"a\nlate\n").unwrap(),
            Append::Sealed
        );
        assert_eq!(logs.read("r", 1, 1, 0, 100).unwrap(), b"a\n");
        // A seal that did not complete: the log grows again.
        logs.unseal("r", 1, 1);
        assert_eq!(
            logs.append("r", 1, 1, 2, b"c\n").unwrap(),
            Append::Stored(4)
        );
        // Sealed and replaced by its blob: the file goes, and with it the fence (the
        // session fences by the replicated state from then on).
        logs.seal("r", 1, 1).unwrap();
        logs.remove("r", 1, 1).unwrap();
        assert_eq!(logs.live().unwrap(), vec![("q".to_string(), 2, 0)]);
        assert_eq!(logs.len("r", 1, 1), 0);
        assert!(
            !dir.path().join("r").exists(),
            "no empty run directory is left"
        );
    }
}
