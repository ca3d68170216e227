//! The agent's data directory: its lock and its stable node id.

use std::fs::File;
use std::path::Path;

use anyhow::Context;

/// Opens (creating) the data dir, takes its lock, and reads or creates the node id.
pub(crate) fn open(dir: &Path) -> anyhow::Result<(File, String)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the agent data directory {}", dir.display()))?;
    let lock_path = dir.join("LOCK");
    let lock =
        File::create(&lock_path).with_context(|| format!("cannot open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "the agent data directory {} is in use by another agent: stop it, or pass another --data-dir",
            dir.display()
        );
    }
    let id_path = dir.join("node_id");
    let id = match std::fs::read_to_string(&id_path) {
        Ok(s) => {
            let id = s.trim().to_string();
            if id.is_empty()
                || id.len() > 64
                || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                anyhow::bail!(
                    "{} is corrupt (not a node id): restore it, or remove it to join as a new node",
                    id_path.display()
                );
            }
            id
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("node-{:016x}", rand::random::<u64>());
            let tmp = dir.join("node_id.tmp");
            std::fs::write(&tmp, &id).with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, &id_path)
                .with_context(|| format!("cannot write {}", id_path.display()))?;
            id
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", id_path.display())),
    };
    Ok((lock, id))
}
