//! Durable raft storage: an in-memory view of the log for raft-rs to read, written through to
//! redb (`raft.redb`) with one write transaction per `Ready`.
//!
//! Tables:
//! - `raft_meta` (`&str -> bytes`): `format`, `node_id`, `hard_state` (protobuf), `log_base`
//!   (index and term of the entry just before the first one held), `snapshot` (protobuf
//!   `Snapshot`: metadata, including the conf state, and the state machine's data).
//! - `raft_entries` (`u64 -> bytes`): log index to protobuf `Entry`.
//!
//! The conf state is stored only inside the snapshot: on restart the state machine is restored
//! from the snapshot and every committed entry after it (conf changes included) is applied
//! again, so the membership always matches the applied index.
//!
//! A new cluster is bootstrapped with a snapshot at index 1 (term 1) holding the initial voters
//! and the empty state, so the log of every member starts at index 2. A server added later starts
//! with nothing and is sent that (or a later) snapshot by the leader, which gives it the
//! membership it could not learn from the log.

use std::cell::Cell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::RaftError;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");

const FORMAT_KEY: &str = "format";
const FORMAT: &[u8] = b"muster-raft/1";
const NODE_ID_KEY: &str = "node_id";
const HARD_STATE_KEY: &str = "hard_state";
const LOG_BASE_KEY: &str = "log_base";
const SNAPSHOT_KEY: &str = "snapshot";

/// redb's page cache. The log is read from memory; the cache only serves redb's own updates.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// What one `Ready` makes durable, in one write transaction.
#[derive(Debug, Default, Clone)]
pub(crate) struct WriteBatch {
    /// A snapshot received from the leader: replaces the whole log.
    pub snapshot: Option<Snapshot>,
    /// New entries; they overwrite any entries from their first index on.
    pub entries: Vec<Entry>,
    /// A changed hard state.
    pub hard_state: Option<HardState>,
}

/// The raft-rs [`raft::Storage`] of one node: reads come from memory, writes go to redb first.
pub(crate) struct RaftStorage {
    /// The database; `None` only between closing and reopening it after a failed write.
    db: Option<Database>,
    path: PathBuf,
    /// Test hook ([`crate::RaftConfig::fail_writes`]): while set, every write fails as on a
    /// full disk.
    fail_writes: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    hard_state: HardState,
    /// The commit index moved in memory but was not written yet (written with the next batch).
    hard_state_dirty: bool,
    /// The membership as of the applied index.
    conf_state: ConfState,
    /// The latest snapshot, with its data (`index == 0`: none).
    snapshot: Snapshot,
    /// Index and term of the entry just before `entries[0]`.
    base_index: u64,
    base_term: u64,
    entries: VecDeque<Entry>,
    /// raft asked for a snapshot the stored one cannot serve (too old, or taken before the
    /// recipient joined): the driver takes a fresh one.
    snapshot_wanted: Cell<bool>,
}

impl std::fmt::Debug for RaftStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftStorage")
            .field("path", &self.path)
            .field("hard_state", &self.hard_state)
            .field("snapshot_index", &self.snapshot_index())
            .field("first_index", &self.first())
            .field("last_index", &self.last())
            .finish()
    }
}

impl RaftStorage {
    /// Opens (or creates) the database at `path` and loads it. A new database is initialized for
    /// node `id`: with `initial_voters`, as a new cluster whose state is `initial_state()`;
    /// without, as a server waiting to be added to a cluster.
    pub(crate) fn open(
        path: &Path,
        id: u64,
        initial_voters: &[u64],
        initial_state: impl FnOnce() -> Vec<u8>,
    ) -> Result<Self, RaftError> {
        let db = open_database(path)?;
        let loaded = match load(&db, path, id)? {
            Some(loaded) => loaded,
            None => {
                initialize(&db, path, id, initial_voters, initial_state())?;
                load(&db, path, id)?.ok_or_else(|| RaftError::Storage {
                    path: path.to_owned(),
                    detail: "the database was initialized but reads back empty".to_owned(),
                })?
            }
        };
        let conf_state = loaded.snapshot.get_metadata().get_conf_state().clone();
        Ok(Self {
            db: Some(db),
            path: path.to_owned(),
            fail_writes: None,
            hard_state: loaded.hard_state,
            hard_state_dirty: false,
            conf_state,
            snapshot: loaded.snapshot,
            base_index: loaded.base_index,
            base_term: loaded.base_term,
            entries: loaded.entries,
            snapshot_wanted: Cell::new(false),
        })
    }

    /// Makes a `Ready`'s snapshot, entries and hard state durable (one transaction, fsynced),
    /// then updates the in-memory view.
    #[cfg(test)]
    pub(crate) fn persist(&mut self, batch: WriteBatch) -> Result<(), RaftError> {
        self.persist_or_keep(batch).map_err(|(e, _)| e)
    }

    /// [`RaftStorage::persist`], giving the batch back when the write failed
    /// ([`RaftError::WriteFailed`]: nothing was kept) so the caller can retry it.
    pub(crate) fn persist_or_keep(
        &mut self,
        batch: WriteBatch,
    ) -> Result<(), (RaftError, Box<WriteBatch>)> {
        let mut hard_state = batch
            .hard_state
            .clone()
            .unwrap_or_else(|| self.hard_state.clone());
        hard_state.commit = hard_state.commit.max(self.hard_state.commit);
        let (mut base_index, mut base_term, mut last) =
            (self.base_index, self.base_term, self.last());
        if let Some(snapshot) = &batch.snapshot {
            let meta = snapshot.get_metadata();
            (base_index, base_term, last) = (meta.index, meta.term, meta.index);
            hard_state.commit = hard_state.commit.max(meta.index);
            hard_state.term = hard_state.term.max(meta.term);
        }
        if let Some(first) = batch.entries.first()
            && (first.index <= base_index || first.index > last + 1)
        {
            let e = self.storage_error(format!(
                "raft asked to append entries from index {} to a log holding ({base_index}, \
                 {last}]",
                first.index
            ));
            return Err((e, Box::new(batch)));
        }
        let write_hard_state =
            batch.hard_state.is_some() || batch.snapshot.is_some() || self.hard_state_dirty;

        let snapshot_bytes = batch.snapshot.as_ref().map(encode).transpose();
        let entry_bytes: Result<Vec<(u64, Vec<u8>)>, _> = batch
            .entries
            .iter()
            .map(|e| encode(e).map(|b| (e.index, b)))
            .collect();
        let hard_state_bytes = encode(&hard_state);
        let (snapshot_bytes, entry_bytes, hard_state_bytes) =
            match (snapshot_bytes, entry_bytes, hard_state_bytes) {
                (Ok(s), Ok(e), Ok(h)) => (s, e, h),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    return Err((self.storage_error(e), Box::new(batch)));
                }
            };

        let result = self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(ENTRIES)?;
            {
                if let Some(bytes) = &snapshot_bytes {
                    meta.insert(SNAPSHOT_KEY, bytes.as_slice())?;
                    meta.insert(LOG_BASE_KEY, encode_pair(base_index, base_term).as_slice())?;
                    table.retain(|_, _| false)?;
                }
                if let Some(&(new_last, _)) = entry_bytes.last() {
                    if new_last < last {
                        table.retain_in(new_last + 1..=last, |_, _| false)?;
                    }
                    for (index, bytes) in &entry_bytes {
                        table.insert(*index, bytes.as_slice())?;
                    }
                }
                if write_hard_state {
                    meta.insert(HARD_STATE_KEY, hard_state_bytes.as_slice())?;
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            return Err((e, Box::new(batch)));
        }

        if let Some(snapshot) = batch.snapshot {
            self.entries.clear();
            (self.base_index, self.base_term) = (base_index, base_term);
            self.conf_state = snapshot.get_metadata().get_conf_state().clone();
            self.snapshot = snapshot;
        }
        if let Some(first) = batch.entries.first() {
            let keep = (first.index - self.base_index - 1) as usize;
            self.entries.truncate(keep);
            self.entries.extend(batch.entries);
        }
        self.hard_state = hard_state;
        self.hard_state_dirty = false;
        Ok(())
    }

    /// Records a commit index learned after persisting (LightReady). It is written with the
    /// next batch; losing it in a crash is harmless (the leader repeats it).
    pub(crate) fn set_commit(&mut self, commit: u64) {
        if commit > self.hard_state.commit {
            self.hard_state.commit = commit;
            self.hard_state_dirty = true;
        }
    }

    /// Records the membership after a conf change was applied.
    pub(crate) fn set_conf_state(&mut self, conf_state: ConfState) {
        self.conf_state = conf_state;
    }

    /// Stores a snapshot of the state machine at applied index `index` (with the current conf
    /// state) and drops the log entries up to `compact_to` (at most `index`), in one transaction.
    pub(crate) fn save_snapshot(
        &mut self,
        data: Vec<u8>,
        index: u64,
        compact_to: u64,
    ) -> Result<(), RaftError> {
        let term = self
            .entry_term(index)
            .map_err(|e| self.storage_error(format!("cannot snapshot at index {index}: {e}")))?;
        let snapshot = new_snapshot(data, index, term, self.conf_state.clone());

        let compact_to = compact_to.min(index);
        let (base_index, base_term) = if compact_to > self.base_index {
            let term = self.entry_term(compact_to).map_err(|e| {
                self.storage_error(format!("cannot compact to index {compact_to}: {e}"))
            })?;
            (compact_to, term)
        } else {
            (self.base_index, self.base_term)
        };
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = hard_state.commit.max(index);

        let (snapshot_bytes, hard_state_bytes) = match (encode(&snapshot), encode(&hard_state)) {
            (Ok(s), Ok(h)) => (s, h),
            (Err(e), _) | (_, Err(e)) => return Err(self.storage_error(e)),
        };
        let old_base = self.base_index;
        let result = self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(ENTRIES)?;
            {
                meta.insert(SNAPSHOT_KEY, snapshot_bytes.as_slice())?;
                meta.insert(HARD_STATE_KEY, hard_state_bytes.as_slice())?;
                if base_index > old_base {
                    table.retain_in(..=base_index, |_, _| false)?;
                    meta.insert(LOG_BASE_KEY, encode_pair(base_index, base_term).as_slice())?;
                }
            }
            Ok(())
        });
        result?;

        self.entries.drain(..(base_index - old_base) as usize);
        (self.base_index, self.base_term) = (base_index, base_term);
        self.snapshot = snapshot;
        self.hard_state = hard_state;
        self.hard_state_dirty = false;
        Ok(())
    }

    /// Whether raft asked for a newer snapshot than the stored one (and clears the request).
    pub(crate) fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The membership as of the applied index.
    pub(crate) fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The latest snapshot's index (0: none).
    pub(crate) fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// The latest snapshot's state machine data.
    pub(crate) fn snapshot_data(&self) -> &[u8] {
        &self.snapshot.data
    }

    /// First log index held.
    pub(crate) fn first(&self) -> u64 {
        self.base_index + 1
    }

    /// Last log index held.
    pub(crate) fn last(&self) -> u64 {
        self.base_index + self.entries.len() as u64
    }

    fn entry_term(&self, index: u64) -> Result<u64, StorageError> {
        if index == self.base_index {
            return Ok(self.base_term);
        }
        if index < self.base_index {
            return Err(StorageError::Compacted);
        }
        self.entries
            .get((index - self.base_index - 1) as usize)
            .map(|e| e.term)
            .ok_or(StorageError::Unavailable)
    }

    /// Runs `f` in one write transaction and commits it. Any failure is
    /// [`RaftError::WriteFailed`]; nothing of the transaction is kept (redb commits are
    /// atomic) and the in-memory view is updated by the caller only after success.
    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), RaftError> {
        let failed = |detail: String| RaftError::WriteFailed {
            path: self.path.clone(),
            detail,
        };
        if self
            .fail_writes
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        {
            return Err(failed(
                "No space left on device (os error 28; injected)".into(),
            ));
        }
        let db = self
            .db
            .as_ref()
            .ok_or_else(|| failed("the database is closed after an earlier failure".into()))?;
        write(db, f).map_err(|e| failed(e.to_string()))
    }

    /// Closes and reopens the database: after a failed commit redb refuses every further
    /// transaction ("Previous I/O error occurred") until it is reopened. What is on disk is
    /// the last committed write, which the in-memory view matches.
    pub(crate) fn reopen(&mut self) -> Result<(), RaftError> {
        self.db = None;
        self.db = Some(open_database(&self.path)?);
        Ok(())
    }

    /// Sets the test hook that fails every write while `flag` is set.
    pub(crate) fn set_fail_writes(
        &mut self,
        flag: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) {
        self.fail_writes = flag;
    }

    fn storage_error(&self, detail: impl ToString) -> RaftError {
        RaftError::Storage {
            path: self.path.clone(),
            detail: detail.to_string(),
        }
    }
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.base_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let start = (low - self.base_index - 1) as usize;
        let end = (high - self.base_index - 1) as usize;
        let mut out = Vec::with_capacity(end - start);
        let mut size = 0u64;
        for entry in self.entries.range(start..end) {
            let entry_size = u64::from(entry.compute_size());
            if !out.is_empty() && size + entry_size > max_size {
                break;
            }
            size += entry_size;
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.entry_term(idx).map_err(raft::Error::Store)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// The stored snapshot, if it can serve `to`. A follower refuses a snapshot whose
    /// membership does not include it, so a server added after the snapshot was taken needs a
    /// newer one: ask the driver for it and let raft retry (on the peer's next heartbeat reply).
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let meta = self.snapshot.get_metadata();
        let cs = meta.get_conf_state();
        let includes_to = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.voters_outgoing)
            .any(|&id| id == to);
        if meta.index == 0 || meta.index < request_index || !includes_to {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

/// What a database holds, checked for consistency.
struct Loaded {
    hard_state: HardState,
    snapshot: Snapshot,
    base_index: u64,
    base_term: u64,
    entries: VecDeque<Entry>,
}

fn open_database(path: &Path) -> Result<Database, RaftError> {
    let mut builder = redb::Builder::new();
    builder
        .set_cache_size(CACHE_BYTES)
        // Verify every page on open: a damaged file is reported, not trusted (or panicked on).
        .set_check_integrity_on_open(true);
    // redb documents that opening a damaged file may panic; report that as corruption too.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.create(path)));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(RaftError::DatabaseLocked {
            path: path.to_owned(),
        }),
        Ok(Err(redb::DatabaseError::LockProtocolMismatch)) => Err(RaftError::DatabaseLocked {
            path: path.to_owned(),
        }),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)))) => {
            Err(RaftError::Corrupt {
                path: path.to_owned(),
                detail,
            })
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(err))))
            if err.kind() == std::io::ErrorKind::InvalidData =>
        {
            Err(RaftError::Corrupt {
                path: path.to_owned(),
                detail: err.to_string(),
            })
        }
        Ok(Err(redb::DatabaseError::UpgradeRequired(version))) => Err(RaftError::Open {
            path: path.to_owned(),
            detail: format!(
                "the file uses redb file format {version}, which this build cannot open; \
                 start the muster version that wrote it"
            ),
        }),
        Ok(Err(err)) => Err(RaftError::Open {
            path: path.to_owned(),
            detail: err.to_string(),
        }),
        Err(panic) => Err(RaftError::Corrupt {
            path: path.to_owned(),
            detail: format!("redb failed to open it: {}", panic_message(&panic)),
        }),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Writes the state of a new node: format marker, node id and, for a new cluster, the
/// bootstrap snapshot at index 1.
fn initialize(
    db: &Database,
    path: &Path,
    id: u64,
    initial_voters: &[u64],
    initial_state: Vec<u8>,
) -> Result<(), RaftError> {
    let mut hard_state = HardState::default();
    let mut snapshot = None;
    let (mut base_index, mut base_term) = (0, 0);
    if !initial_voters.is_empty() {
        let conf_state = ConfState {
            voters: initial_voters.to_vec(),
            ..ConfState::default()
        };
        let snap = new_snapshot(initial_state, 1, 1, conf_state);
        hard_state.term = 1;
        hard_state.commit = 1;
        (base_index, base_term) = (1, 1);
        snapshot = Some(snap);
    }
    let storage_error = |detail: String| RaftError::Storage {
        path: path.to_owned(),
        detail,
    };
    let hard_state_bytes = encode(&hard_state).map_err(storage_error)?;
    let snapshot_bytes = snapshot
        .as_ref()
        .map(encode)
        .transpose()
        .map_err(storage_error)?;
    let result = write(db, |txn| {
        let mut meta = txn.open_table(META)?;
        txn.open_table(ENTRIES)?;
        {
            meta.insert(FORMAT_KEY, FORMAT)?;
            meta.insert(NODE_ID_KEY, id.to_be_bytes().as_slice())?;
            meta.insert(HARD_STATE_KEY, hard_state_bytes.as_slice())?;
            meta.insert(LOG_BASE_KEY, encode_pair(base_index, base_term).as_slice())?;
            if let Some(bytes) = &snapshot_bytes {
                meta.insert(SNAPSHOT_KEY, bytes.as_slice())?;
            }
        }
        Ok(())
    });
    result.map_err(|e| storage_error(e.to_string()))
}

/// Reads and checks the whole state; `None` if the database holds nothing at all.
fn load(db: &Database, path: &Path, id: u64) -> Result<Option<Loaded>, RaftError> {
    let corrupt = |detail: String| RaftError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let storage_error = |e: redb::Error| RaftError::Storage {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let txn = db.begin_read().map_err(|e| storage_error(e.into()))?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            let tables: Vec<String> = txn
                .list_tables()
                .map_err(|e| storage_error(e.into()))?
                .map(|t| redb::TableHandle::name(&t).to_owned())
                .collect();
            if tables.is_empty() {
                return Ok(None);
            }
            return Err(corrupt(format!(
                "it is not a muster raft database (it holds tables {tables:?})"
            )));
        }
        Err(e) => return Err(corrupt(e.to_string())),
    };
    let get = |key: &str| -> Result<Option<Vec<u8>>, RaftError> {
        meta.get(key)
            .map(|v| v.map(|v| v.value().to_vec()))
            .map_err(|e| corrupt(format!("cannot read {key}: {e}")))
    };
    let require = |key: &str| -> Result<Vec<u8>, RaftError> {
        get(key)?.ok_or_else(|| corrupt(format!("the {key} record is missing")))
    };

    let format = require(FORMAT_KEY)?;
    if format != FORMAT {
        return Err(corrupt(format!(
            "unknown format {:?} (this build reads {:?})",
            String::from_utf8_lossy(&format),
            String::from_utf8_lossy(FORMAT)
        )));
    }
    let stored_id = require(NODE_ID_KEY)?;
    let stored_id = u64::from_be_bytes(
        stored_id
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("the node_id record is malformed".to_owned()))?,
    );
    if stored_id != id {
        return Err(RaftError::WrongNode {
            path: path.to_owned(),
            stored: stored_id,
            configured: id,
        });
    }
    let mut hard_state: HardState = decode(&require(HARD_STATE_KEY)?)
        .map_err(|e| corrupt(format!("the hard state cannot be decoded: {e}")))?;
    let (base_index, base_term) = decode_pair(&require(LOG_BASE_KEY)?)
        .ok_or_else(|| corrupt("the log_base record is malformed".to_owned()))?;
    let snapshot: Snapshot = match get(SNAPSHOT_KEY)? {
        Some(bytes) => {
            decode(&bytes).map_err(|e| corrupt(format!("the snapshot cannot be decoded: {e}")))?
        }
        None => Snapshot::default(),
    };

    let table = txn
        .open_table(ENTRIES)
        .map_err(|e| corrupt(format!("the log table cannot be opened: {e}")))?;
    let mut entries = VecDeque::new();
    let iter = table
        .iter()
        .map_err(|e| corrupt(format!("the log cannot be read: {e}")))?;
    for (expected, item) in (base_index + 1..).zip(iter) {
        let (key, value) = item.map_err(|e| corrupt(format!("the log cannot be read: {e}")))?;
        let index = key.value();
        if index != expected {
            return Err(corrupt(format!(
                "the log has a gap: expected entry {expected}, found {index}"
            )));
        }
        let entry: Entry = decode(value.value())
            .map_err(|e| corrupt(format!("log entry {index} cannot be decoded: {e}")))?;
        if entry.index != index {
            return Err(corrupt(format!(
                "log entry stored at {index} claims index {}",
                entry.index
            )));
        }
        entries.push_back(entry);
    }
    let last = base_index + entries.len() as u64;

    let snapshot_meta = snapshot.get_metadata();
    if snapshot_meta.index == 0 && base_index > 0 {
        return Err(corrupt(format!(
            "the log was compacted up to {base_index} but there is no snapshot"
        )));
    }
    if snapshot_meta.index > 0 && (snapshot_meta.index < base_index || snapshot_meta.index > last) {
        return Err(corrupt(format!(
            "the snapshot at index {} lies outside the log ({base_index}, {last}]",
            snapshot_meta.index
        )));
    }
    // The snapshot covers only committed entries.
    hard_state.commit = hard_state.commit.max(snapshot_meta.index);
    hard_state.term = hard_state.term.max(snapshot_meta.term);
    if hard_state.commit > last {
        return Err(corrupt(format!(
            "the commit index {} is beyond the last log entry {last}",
            hard_state.commit
        )));
    }
    Ok(Some(Loaded {
        hard_state,
        snapshot,
        base_index,
        base_term,
        entries,
    }))
}

fn new_snapshot(data: Vec<u8>, index: u64, term: u64, conf_state: ConfState) -> Snapshot {
    let mut meta = SnapshotMetadata {
        index,
        term,
        ..SnapshotMetadata::default()
    };
    meta.set_conf_state(conf_state);
    let mut snapshot = Snapshot {
        data: data.into(),
        ..Snapshot::default()
    };
    snapshot.set_metadata(meta);
    snapshot
}

/// Runs `f` in one write transaction and commits it (durably: redb's default is immediate).
fn write(
    db: &Database,
    f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    f(&txn)?;
    txn.commit()?;
    Ok(())
}

fn encode(message: &impl protobuf::Message) -> Result<Vec<u8>, String> {
    message.write_to_bytes().map_err(|e| e.to_string())
}

fn decode<M: protobuf::Message>(bytes: &[u8]) -> Result<M, String> {
    M::parse_from_bytes(bytes).map_err(|e| e.to_string())
}

fn encode_pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    out
}

fn decode_pair(bytes: &[u8]) -> Option<(u64, u64)> {
    let bytes: &[u8; 16] = bytes.try_into().ok()?;
    let a = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    let b = u64::from_be_bytes(bytes[8..].try_into().ok()?);
    Some((a, b))
}

#[cfg(test)]
mod tests {
    use raft::Storage as _;

    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Entry::default()
        }
    }

    fn open(dir: &Path) -> Result<RaftStorage, RaftError> {
        RaftStorage::open(&dir.join("raft.redb"), 1, &[1, 2, 3], || b"empty".to_vec())
    }

    fn stored_entry_keys(storage: &RaftStorage) -> Vec<u64> {
        let txn = storage.db.as_ref().unwrap().begin_read().unwrap();
        let table = txn.open_table(ENTRIES).unwrap();
        table
            .iter()
            .unwrap()
            .map(|item| item.unwrap().0.value())
            .collect()
    }

    #[test]
    fn new_cluster_starts_from_a_bootstrap_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let storage = open(dir.path()).unwrap();
        assert_eq!(storage.snapshot_index(), 1);
        assert_eq!(storage.snapshot_data(), b"empty");
        assert_eq!(storage.conf_state().voters, vec![1, 2, 3]);
        assert_eq!((storage.first(), storage.last()), (2, 1));
        let state = storage.initial_state().unwrap();
        assert_eq!((state.hard_state.term, state.hard_state.commit), (1, 1));
        assert_eq!(storage.term(1).unwrap(), 1);
    }

    #[test]
    fn joining_server_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let storage = RaftStorage::open(&dir.path().join("raft.redb"), 4, &[], Vec::new).unwrap();
        assert_eq!(storage.snapshot_index(), 0);
        assert!(!storage.initial_state().unwrap().initialized());
        assert_eq!((storage.first(), storage.last()), (1, 0));
    }

    #[test]
    fn entries_and_hard_state_survive_reopen_and_conflicts_truncate() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut storage = open(dir.path()).unwrap();
            let hs = HardState {
                term: 2,
                vote: 1,
                commit: 3,
                ..HardState::default()
            };
            storage
                .persist(WriteBatch {
                    entries: (2..=5).map(|i| entry(i, 2, b"a")).collect(),
                    hard_state: Some(hs),
                    ..WriteBatch::default()
                })
                .unwrap();
            // A new leader overwrites 4..=5 with a single entry 4 of term 3.
            storage
                .persist(WriteBatch {
                    entries: vec![entry(4, 3, b"b")],
                    ..WriteBatch::default()
                })
                .unwrap();
            assert_eq!(storage.last(), 4);
            storage.set_commit(4);
            assert_eq!(stored_entry_keys(&storage), vec![2, 3, 4]);
            // The commit index is written with the next batch.
            storage.persist(WriteBatch::default()).unwrap();
        }
        let storage = open(dir.path()).unwrap();
        assert_eq!(storage.last(), 4);
        assert_eq!(storage.term(4).unwrap(), 3);
        let ents = storage
            .entries(2, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            ents.iter().map(|e| e.data.to_vec()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"a".to_vec(), b"b".to_vec()]
        );
        let hs = storage.initial_state().unwrap().hard_state;
        assert_eq!((hs.term, hs.vote, hs.commit), (2, 1, 4));
    }

    #[test]
    fn snapshot_compacts_the_log_in_the_database() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut storage = open(dir.path()).unwrap();
            storage
                .persist(WriteBatch {
                    entries: (2..=20).map(|i| entry(i, 2, b"x")).collect(),
                    ..WriteBatch::default()
                })
                .unwrap();
            storage.set_commit(20);
            storage.save_snapshot(b"state@15".to_vec(), 15, 12).unwrap();
            assert_eq!(storage.first(), 13);
            assert_eq!(stored_entry_keys(&storage), (13..=20).collect::<Vec<_>>());
            assert_eq!(
                storage.entries(12, 14, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(StorageError::Compacted))
            );
            assert_eq!(storage.term(12).unwrap(), 2);
        }
        let storage = open(dir.path()).unwrap();
        assert_eq!((storage.first(), storage.last()), (13, 20));
        assert_eq!(storage.snapshot_index(), 15);
        assert_eq!(storage.snapshot_data(), b"state@15");
        let snap = storage.snapshot(0, 2).unwrap();
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
        assert!(storage.initial_state().unwrap().hard_state.commit >= 15);
    }

    #[test]
    fn a_snapshot_that_predates_the_recipient_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = open(dir.path()).unwrap();
        assert!(storage.snapshot(0, 2).is_ok());
        assert!(!storage.take_snapshot_wanted());
        // Node 4 joined after the bootstrap snapshot: it would refuse it.
        assert_eq!(
            storage.snapshot(0, 4),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        );
        assert!(storage.take_snapshot_wanted());
        storage
            .persist(WriteBatch {
                entries: vec![entry(2, 2, b"x")],
                ..WriteBatch::default()
            })
            .unwrap();
        storage.set_conf_state(ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
            ..ConfState::default()
        });
        storage.save_snapshot(b"state@2".to_vec(), 2, 0).unwrap();
        let snap = storage.snapshot(0, 4).unwrap();
        assert_eq!(snap.get_metadata().index, 2);
        assert_eq!(storage.first(), 2, "compact_to 0 keeps the log");
    }

    #[test]
    fn snapshot_from_leader_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut storage = open(dir.path()).unwrap();
            storage
                .persist(WriteBatch {
                    entries: (2..=5).map(|i| entry(i, 2, b"x")).collect(),
                    ..WriteBatch::default()
                })
                .unwrap();
            let conf_state = ConfState {
                voters: vec![1, 2, 3, 4],
                ..ConfState::default()
            };
            let snap = new_snapshot(b"leader state".to_vec(), 100, 4, conf_state);
            storage
                .persist(WriteBatch {
                    snapshot: Some(snap),
                    entries: vec![entry(101, 4, b"y")],
                    ..WriteBatch::default()
                })
                .unwrap();
            assert_eq!(stored_entry_keys(&storage), vec![101]);
        }
        let storage = open(dir.path()).unwrap();
        assert_eq!((storage.first(), storage.last()), (101, 101));
        assert_eq!(storage.term(100).unwrap(), 4);
        assert_eq!(storage.conf_state().voters, vec![1, 2, 3, 4]);
        assert_eq!(storage.initial_state().unwrap().hard_state.commit, 100);
    }

    #[test]
    fn garbage_file_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        std::fs::write(&path, vec![0xA5; 64 * 1024]).unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(
            matches!(err, RaftError::Corrupt { .. } | RaftError::Open { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("raft.redb"), "{err}");
    }

    #[test]
    fn damaged_database_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            let mut storage = open(dir.path()).unwrap();
            storage
                .persist(WriteBatch {
                    entries: (2..=200).map(|i| entry(i, 2, &[7; 512])).collect(),
                    ..WriteBatch::default()
                })
                .unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        for b in &mut bytes[len / 3..len / 3 + 8192] {
            *b ^= 0x5A;
        }
        std::fs::write(&path, &bytes).unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(matches!(err, RaftError::Corrupt { .. }), "{err:?}");
    }

    #[test]
    fn foreign_redb_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(TableDefinition::<u64, u64>::new("other"))
                .unwrap()
                .insert(1, 2)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = open(dir.path()).unwrap_err();
        assert!(matches!(err, RaftError::Corrupt { .. }), "{err:?}");
        assert!(
            err.to_string().contains("not a muster raft database"),
            "{err}"
        );
    }

    #[test]
    fn another_node_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()).unwrap());
        let err =
            RaftStorage::open(&dir.path().join("raft.redb"), 2, &[1, 2, 3], Vec::new).unwrap_err();
        assert!(
            matches!(
                err,
                RaftError::WrongNode {
                    stored: 1,
                    configured: 2,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn second_open_is_refused_while_the_first_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path()).unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(matches!(err, RaftError::DatabaseLocked { .. }), "{err:?}");
        drop(first);
        open(dir.path()).unwrap();
    }
}
