//! The manifest of a code snapshot: which files, with which content hash.
//!
//! The CLI builds it from a source directory, uploads the files the server lacks and then
//! the manifest itself (as JSON) to the content-addressed blob store; a run refers to the
//! manifest's hash. The agent materializes it into the attempt's working directory.

use serde::{Deserialize, Serialize};

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Path relative to the snapshot root, `/`-separated, never absolute, no `..`.
    pub path: String,
    /// SHA-256 of the content, lowercase hex: the blob's address.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether the file is executable (the only mode bit kept).
    #[serde(default)]
    pub executable: bool,
}

/// The git state of the source directory at submission, when it is a git work tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitInfo {
    /// The commit checked out (`HEAD`).
    pub commit: String,
    /// The branch, if not detached.
    pub branch: Option<String>,
    /// Whether the work tree had uncommitted changes.
    pub dirty: bool,
}

/// A snapshot's manifest, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The files, sorted by path.
    pub files: Vec<ManifestEntry>,
}

impl Manifest {
    /// Total size of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Checks that every path is relative and stays inside the snapshot root, and that
    /// every hash is a SHA-256 hex digest. The agent refuses a manifest that fails this.
    pub fn validate(&self) -> Result<(), String> {
        for f in &self.files {
            if !is_safe_relative_path(&f.path) {
                return Err(format!(
                    "snapshot path {:?} is not a relative path inside the snapshot",
                    f.path
                ));
            }
            if !is_sha256_hex(&f.sha256) {
                return Err(format!(
                    "snapshot entry {:?} has an invalid hash {:?}",
                    f.path, f.sha256
                ));
            }
        }
        Ok(())
    }
}

/// True for a lowercase 64-character hex string (a SHA-256 digest, the blob address format).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True for a `/`-separated relative path with no empty, `.` or `..` components.
pub fn is_safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escaping_paths() {
        let h = "a".repeat(64);
        let entry = |p: &str| Manifest {
            files: vec![ManifestEntry {
                path: p.into(),
                sha256: h.clone(),
                size: 1,
                executable: false,
            }],
        };
        assert!(entry("src/train.py").validate().is_ok());
        for bad in ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", ""] {
            assert!(entry(bad).validate().is_err(), "{bad}");
        }
        assert!(!is_sha256_hex("xyz"));
    }
}
