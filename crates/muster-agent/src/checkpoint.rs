//! An attempt's checkpoint folder (`code/checkpoint/`, `MUSTER_CHECKPOINT_DIR`): restored
//! from the run's checkpoint archive before the command starts, packed into a tar archive
//! and uploaded as a blob (as `outputs.rs` does for `outputs/`) when the attempt ends and,
//! when the job asks, every `checkpoint.interval` while it runs. What the server does with
//! it is in muster-core's `state/checkpoint.rs`.

use std::path::{Path, PathBuf};

use muster_client::{Blobs, Channel};
use muster_core::state::CheckpointCause;
use muster_proto::v1::{self, blob_service_client::BlobServiceClient};

/// A packed checkpoint folder: its archive's address and what is in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Packed {
    /// SHA-256 of the archive.
    pub sha256: String,
    /// Regular files in it.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Packed {
    /// The checkpoint as the agent reports it (`seq`: its number in the attempt).
    pub(crate) fn to_wire(&self, seq: u64, cause: CheckpointCause) -> v1::Checkpoint {
        v1::Checkpoint {
            sha256: self.sha256.clone(),
            seq,
            files: self.files,
            bytes: self.bytes,
            cause: v1::CheckpointCause::from(cause).into(),
            ..Default::default()
        }
    }
}

/// Why a checkpoint could not be restored (the attempt fails with this: it would otherwise
/// start over while saying it resumed).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RestoreError {
    /// The archive, from every server tried.
    #[error("could not fetch checkpoint {sha}: {cause:#}")]
    Fetch {
        /// The archive.
        sha: String,
        /// Why.
        cause: anyhow::Error,
    },
    /// Unpacking it.
    #[error("could not unpack checkpoint {sha} into {}: {source}", dir.display())]
    Unpack {
        /// The archive.
        sha: String,
        /// The checkpoint folder.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Downloads checkpoint archive `sha` (through the node's blob cache) and unpacks it into
/// `dir`, which it empties first.
pub(crate) async fn restore(
    client: &mut BlobServiceClient<Channel>,
    sha: &str,
    cache: &Path,
    dir: &Path,
) -> Result<(), RestoreError> {
    let cached = cache.join(sha.get(..2).unwrap_or("00")).join(sha);
    if !cached.exists() {
        Blobs::new(client.clone())
            .download(sha, &cached)
            .await
            .map_err(|e| RestoreError::Fetch {
                sha: sha.to_string(),
                cause: e.into(),
            })?;
    }
    let (dir, sha) = (dir.to_path_buf(), sha.to_string());
    tokio::task::spawn_blocking(move || {
        let unpack = || -> std::io::Result<()> {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            tar::Archive::new(std::fs::File::open(&cached)?).unpack(&dir)
        };
        unpack().map_err(|source| RestoreError::Unpack {
            sha: sha.clone(),
            dir: dir.clone(),
            source,
        })
    })
    .await
    .map_err(|e| RestoreError::Unpack {
        sha: String::new(),
        dir: PathBuf::new(),
        source: std::io::Error::other(e),
    })?
}

/// Packs `dir` into `archive` and uploads it, unless it holds nothing (an empty folder is
/// no checkpoint: `None`). The archive is removed after.
pub(crate) async fn upload(
    client: &mut BlobServiceClient<Channel>,
    dir: &Path,
    archive: &Path,
) -> anyhow::Result<Option<Packed>> {
    let (from, to) = (dir.to_path_buf(), archive.to_path_buf());
    let packed = tokio::task::spawn_blocking(move || pack(&from, &to)).await??;
    let Some(packed) = packed else {
        return Ok(None);
    };
    let mut blobs = Blobs::new(client.clone());
    if !blobs.missing(vec![packed.sha256.clone()]).await?.is_empty() {
        blobs.upload_file(&packed.sha256, archive).await?;
    }
    let _ = tokio::fs::remove_file(archive).await;
    Ok(Some(packed))
}

/// Packs `dir` into the tar file `archive` (links as links), counting its regular files
/// and their bytes; `None` when `dir` is missing or empty.
fn pack(dir: &Path, archive: &Path) -> anyhow::Result<Option<Packed>> {
    let (files, bytes) = count(dir)?;
    let empty = std::fs::read_dir(dir).map_or(true, |mut e| e.next().is_none());
    if empty {
        return Ok(None);
    }
    if let Some(parent) = archive.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let file = std::fs::File::create(archive)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    builder.append_dir_all(".", dir)?;
    builder
        .into_inner()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    let sha256 = muster_client::hash_file(archive)?;
    Ok(Some(Packed {
        sha256,
        files,
        bytes,
    }))
}

/// Regular files below `dir` and their bytes (not through links); a missing `dir` has none.
fn count(dir: &Path) -> std::io::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        } else if meta.is_file() {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_folder_is_no_checkpoint_and_a_full_one_is_counted_and_unpacks_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoint");
        let archive = tmp.path().join("checkpoint.tar");
        assert_eq!(pack(&dir, &archive).unwrap(), None, "missing");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(pack(&dir, &archive).unwrap(), None, "empty");
        std::fs::write(dir.join("count"), "40").unwrap();
        std::fs::create_dir_all(dir.join("opt")).unwrap();
        std::fs::write(dir.join("opt/state.bin"), [7u8; 100]).unwrap();
        let packed = pack(&dir, &archive).unwrap().unwrap();
        assert_eq!((packed.files, packed.bytes), (2, 102));
        assert_eq!(packed.sha256, muster_client::hash_file(&archive).unwrap());
        let back = tmp.path().join("restored");
        tar::Archive::new(std::fs::File::open(&archive).unwrap())
            .unpack(&back)
            .unwrap();
        assert_eq!(std::fs::read_to_string(back.join("count")).unwrap(), "40");
        assert_eq!(
            std::fs::read(back.join("opt/state.bin")).unwrap().len(),
            100
        );
        let wire = packed.to_wire(3, CheckpointCause::Preempted);
        assert_eq!((wire.seq, wire.files), (3, 2));
        assert_eq!(wire.cause, v1::CheckpointCause::Preempted as i32);
    }
}
