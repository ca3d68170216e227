//! Backups of a cluster (`muster cluster backup`) and founding a cluster from one
//! (`muster server --restore-from`), as etcd's `snapshot save` and `--force-new-cluster`.
//!
//! A backup is a tar file:
//! - `muster-backup.json`: the format (`muster-backup/1`), the applied index the state was
//!   read at, when, by which server, and the blobs it holds or lacks;
//! - `state.json`: the replicated state as a snapshot encodes it (one consistent read);
//! - `blobs/<sha256>`: every blob the server held once it had fetched from its peers the
//!   ones the state refers to (code and input snapshots with their files, outputs, sealed
//!   logs and metrics, data assets, components, retention archives).
//!
//! A restore unpacks it into an empty data directory (each blob checked against its name)
//! and founds a one-server cluster whose first snapshot is that state: its users, tokens,
//! compute targets, runs and their history are as they were. Other servers join it with
//! `muster cluster add-server`. Live logs of attempts running when the backup was taken
//! are not in it (their sealed logs are, once they end).

use std::io::{Read, Write};
use std::path::Path;

use anyhow::Context;
use muster_core::State;
use serde::{Deserialize, Serialize};

use super::blobs::BlobStore;

/// The format a backup says it is.
pub const FORMAT: &str = "muster-backup/1";

/// `muster-backup.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupInfo {
    /// [`FORMAT`].
    pub format: String,
    /// The applied index the state was read at (the state may be a little newer).
    pub applied_index: u64,
    /// When it was taken (ms since the epoch).
    pub taken_at_ms: u64,
    /// The server that took it.
    pub server_id: u64,
    /// Blobs in the backup.
    pub blobs: u64,
    /// Blobs the state refers to that no reachable server held (not in the backup).
    pub missing_blobs: Vec<String>,
}

fn append(tar: &mut tar::Builder<impl Write>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o600);
    header.set_cksum();
    tar.append_data(&mut header, name, bytes)
}

/// Writes a backup of `state` (and of every blob in `blobs`, unless `with_blobs` is
/// false) to `out`. Blocking.
pub fn write(
    mut info: BackupInfo,
    state: &[u8],
    blobs: &BlobStore,
    with_blobs: bool,
    out: impl Write,
) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(out);
    let listed = if with_blobs {
        blobs.list()?
    } else {
        Vec::new()
    };
    info.blobs = listed.len() as u64;
    let json = serde_json::to_vec_pretty(&info).map_err(std::io::Error::other)?;
    append(&mut tar, "muster-backup.json", &json)?;
    append(&mut tar, "state.json", state)?;
    for sha in listed {
        let path = blobs.path(&sha).map_err(std::io::Error::other)?;
        let mut file = std::fs::File::open(&path)?;
        tar.append_file(format!("blobs/{sha}"), &mut file)?;
    }
    tar.into_inner()?.flush()
}

/// Unpacks the backup `from` into `data_dir`'s blob store and returns its state and
/// description. Every blob is checked against its name; anything else in the file is an
/// error naming it.
pub fn unpack(from: &Path, blobs: &BlobStore) -> anyhow::Result<(State, BackupInfo)> {
    let file = std::fs::File::open(from)
        .with_context(|| format!("--restore-from {}: cannot open it", from.display()))?;
    let bad = |what: String| anyhow::anyhow!("--restore-from {}: {what}", from.display());
    let mut archive = tar::Archive::new(file);
    let mut info: Option<BackupInfo> = None;
    let mut state = None;
    for entry in archive
        .entries()
        .map_err(|e| bad(format!("not a backup: {e}")))?
    {
        let mut entry = entry.map_err(|e| bad(format!("unreadable: {e}")))?;
        let name = entry.path()?.to_string_lossy().into_owned();
        match name.as_str() {
            "muster-backup.json" => {
                let mut text = Vec::new();
                entry.read_to_end(&mut text)?;
                let read: BackupInfo = serde_json::from_slice(&text)
                    .map_err(|e| bad(format!("muster-backup.json: {e}")))?;
                if read.format != FORMAT {
                    return Err(bad(format!(
                        "format {:?}: this muster restores {FORMAT}",
                        read.format
                    )));
                }
                info = Some(read);
            }
            "state.json" => {
                anyhow::ensure!(
                    info.is_some(),
                    bad("muster-backup.json must come first".into())
                );
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes)?;
                state = Some(State::from_snapshot(&bytes).map_err(|e| bad(e.to_string()))?);
            }
            other => {
                let Some(sha) = other.strip_prefix("blobs/") else {
                    return Err(bad(format!("{other:?} does not belong in a backup")));
                };
                let mut writer = blobs
                    .writer(sha, u64::MAX)
                    .map_err(|e| bad(format!("{other}: {e}")))?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = entry.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    writer
                        .write(&buf[..n])
                        .map_err(|e| bad(format!("{other}: {e}")))?;
                }
                writer.finish().map_err(|e| bad(format!("{other}: {e}")))?;
            }
        }
    }
    let info = info.ok_or_else(|| bad("no muster-backup.json: not a muster backup".into()))?;
    let state = state.ok_or_else(|| bad("no state.json".into()))?;
    Ok((state, info))
}
