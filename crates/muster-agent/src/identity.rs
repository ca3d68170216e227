//! The agent's data directory: its lock and its stable node id.

use std::fs::File;
use std::path::{Path, PathBuf};

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file or directory could not be created, opened, read or written.
    #[error("cannot {doing} {}: {source}", path.display())]
    Io {
        /// "create", "open", "read", "write".
        doing: &'static str,
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another agent holds the lock.
    #[error(
        "the agent data directory {} is in use by another agent: stop it, or pass another --data-dir",
        .0.display()
    )]
    InUse(PathBuf),
    /// The node id file holds something else.
    #[error("{} is corrupt (not a node id): restore it, or remove it to join as a new node", .0.display())]
    Corrupt(PathBuf),
}

fn io(doing: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io {
        doing,
        path,
        source,
    }
}

/// Opens (creating) the data dir, takes its lock, and reads or creates the node id.
pub(crate) fn open(dir: &Path) -> Result<(File, String), IdentityError> {
    std::fs::create_dir_all(dir).map_err(io("create the agent data directory", dir))?;
    let lock_path = dir.join("LOCK");
    let lock = File::create(&lock_path).map_err(io("open", &lock_path))?;
    if lock.try_lock().is_err() {
        return Err(IdentityError::InUse(dir.to_path_buf()));
    }
    let id_path = dir.join("node_id");
    let id = match std::fs::read_to_string(&id_path) {
        Ok(s) => {
            let id = s.trim().to_string();
            if id.is_empty()
                || id.len() > 64
                || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(IdentityError::Corrupt(id_path));
            }
            id
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("node-{:016x}", rand::random::<u64>());
            let tmp = dir.join("node_id.tmp");
            std::fs::write(&tmp, &id).map_err(io("write", &tmp))?;
            std::fs::rename(&tmp, &id_path).map_err(io("write", &id_path))?;
            id
        }
        Err(e) => return Err(io("read", &id_path)(e)),
    };
    Ok((lock, id))
}
