//! The content-addressed blob store: code snapshots and outputs, addressed by SHA-256.
//!
//! A blob is written to a temporary file while its digest is computed, checked against the
//! address the client named, fsynced, then renamed into place, so a blob that exists is
//! whole. Writes of the same blob are idempotent.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use muster_core::snapshot::is_sha256_hex;
use sha2::{Digest, Sha256};

/// Blobs under `<data>/blobs/<first two hex digits>/<digest>`.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The address is not a SHA-256 hex digest.
    #[error("{0:?} is not a blob address (64 lowercase hex digits of SHA-256)")]
    BadAddress(String),
    /// The content does not hash to the address named.
    #[error(
        "the uploaded content hashes to {actual}, not {expected}: the upload was corrupted; retry it"
    )]
    DigestMismatch {
        /// The address named by the client.
        expected: String,
        /// What the content hashes to.
        actual: String,
    },
    /// The blob is larger than the store accepts.
    #[error("the blob is larger than the {limit}-byte limit")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// No such blob.
    #[error("blob {0} does not exist")]
    NotFound(String),
    /// The disk is full.
    #[error("the server's disk is full ({0}): free space in its data directory")]
    DiskFull(String),
    /// Another I/O failure.
    #[error("blob store I/O error at {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        source: io::Error,
    },
}

fn io_err(path: &Path, source: io::Error) -> BlobError {
    if source.raw_os_error() == Some(28) {
        return BlobError::DiskFull(path.display().to_string());
    }
    BlobError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl BlobStore {
    /// Opens (creating) the store under `root`.
    pub fn open(root: PathBuf) -> io::Result<BlobStore> {
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(BlobStore { root })
    }

    /// Every blob stored (their SHA-256s), read from the folders.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for dir in std::fs::read_dir(&self.root)? {
            let dir = dir?;
            let name = dir.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 || !dir.file_type()?.is_dir() {
                continue;
            }
            for blob in std::fs::read_dir(dir.path())? {
                let blob = blob?.file_name().to_string_lossy().into_owned();
                if is_sha256_hex(&blob) && blob.starts_with(name.as_ref()) {
                    out.push(blob);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Where a blob lives.
    pub fn path(&self, sha256: &str) -> Result<PathBuf, BlobError> {
        if !is_sha256_hex(sha256) {
            return Err(BlobError::BadAddress(sha256.to_string()));
        }
        Ok(self.root.join(&sha256[..2]).join(sha256))
    }

    /// Whether the blob is stored.
    pub fn has(&self, sha256: &str) -> bool {
        self.path(sha256).is_ok_and(|p| p.exists())
    }

    /// Starts writing a blob that must hash to `sha256`.
    pub fn writer(&self, sha256: &str, limit: u64) -> Result<BlobWriter, BlobError> {
        let dest = self.path(sha256)?;
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{sha256}.{}", rand::random::<u64>()));
        let file = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        Ok(BlobWriter {
            file: Some(io::BufWriter::new(file)),
            tmp,
            dest,
            expected: sha256.to_string(),
            hasher: Sha256::new(),
            size: 0,
            limit,
        })
    }

    /// Stores `data` (small blobs, tests).
    pub fn put(&self, data: &[u8]) -> Result<String, BlobError> {
        let sha = hex::encode(Sha256::digest(data));
        if self.has(&sha) {
            return Ok(sha);
        }
        let mut w = self.writer(&sha, u64::MAX)?;
        w.write(data)?;
        w.finish()?;
        Ok(sha)
    }

    /// Stores the content of the file at `src` (a sealed log), hashing it as it is copied.
    /// A missing file stores the empty blob. Returns the blob's address and size.
    pub fn put_file(&self, src: &Path) -> Result<(String, u64), BlobError> {
        let mut input = match std::fs::File::open(src) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return self.put(b"").map(|sha| (sha, 0));
            }
            Err(e) => return Err(io_err(src, e)),
        };
        let tmp = self
            .root
            .join("tmp")
            .join(format!("file.{}", rand::random::<u64>()));
        let result = (|| {
            let mut out = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = io::Read::read(&mut input, &mut buf).map_err(|e| io_err(src, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| io_err(&tmp, e))?;
                size += n as u64;
            }
            let sha = hex::encode(hasher.finalize());
            let dest = self.path(&sha)?;
            // The same content is stored already (durably): the copy is dropped unsynced.
            if !dest.exists() {
                out.sync_all().map_err(|e| io_err(&tmp, e))?;
                if let Some(dir) = dest.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
                }
                std::fs::rename(&tmp, &dest).map_err(|e| io_err(&dest, e))?;
            }
            Ok((sha, size))
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }

    /// Reads up to `max` bytes of a blob from `offset` (empty past its end).
    pub fn read_range(&self, sha256: &str, offset: u64, max: usize) -> Result<Vec<u8>, BlobError> {
        let p = self.path(sha256)?;
        let mut file = std::fs::File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                BlobError::NotFound(sha256.to_string())
            } else {
                io_err(&p, e)
            }
        })?;
        io::Seek::seek(&mut file, io::SeekFrom::Start(offset)).map_err(|e| io_err(&p, e))?;
        let mut buf = Vec::with_capacity(max.min(1 << 16));
        io::Read::read_to_end(&mut io::Read::take(file, max as u64), &mut buf)
            .map_err(|e| io_err(&p, e))?;
        Ok(buf)
    }

    /// Reads a whole blob (manifests; small blobs).
    pub fn get(&self, sha256: &str) -> Result<Vec<u8>, BlobError> {
        let p = self.path(sha256)?;
        std::fs::read(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                BlobError::NotFound(sha256.to_string())
            } else {
                io_err(&p, e)
            }
        })
    }
}

/// An upload in progress; dropped without [`BlobWriter::finish`] it leaves nothing behind.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<io::BufWriter<std::fs::File>>,
    tmp: PathBuf,
    dest: PathBuf,
    expected: String,
    hasher: Sha256,
    size: u64,
    limit: u64,
}

impl BlobWriter {
    /// Appends content.
    pub fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        self.size += data.len() as u64;
        if self.size > self.limit {
            return Err(BlobError::TooLarge { limit: self.limit });
        }
        self.hasher.update(data);
        let file = self.file.as_mut().expect("open until finish");
        file.write_all(data).map_err(|e| io_err(&self.tmp, e))
    }

    /// Verifies the digest, makes the blob durable and visible. Returns its size.
    pub fn finish(mut self) -> Result<u64, BlobError> {
        let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if actual != self.expected {
            return Err(BlobError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        let file = self.file.take().expect("open until finish");
        let file = file
            .into_inner()
            .map_err(|e| io_err(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| io_err(&self.tmp, e))?;
        drop(file);
        if let Some(dir) = self.dest.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| io_err(&self.dest, e))?;
        Ok(self.size)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.tmp.exists() {
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_verified_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let sha = store.put(b"hello").unwrap();
        assert!(store.has(&sha));
        assert_eq!(store.get(&sha).unwrap(), b"hello");
        assert_eq!(store.put(b"hello").unwrap(), sha);
        let mut w = store.writer(&"0".repeat(64), 100).unwrap();
        w.write(b"not zero").unwrap();
        assert!(matches!(w.finish(), Err(BlobError::DigestMismatch { .. })));
        assert!(!store.has(&"0".repeat(64)));
        let mut w = store.writer(&"1".repeat(64), 4).unwrap();
        assert!(matches!(
            w.write(b"too long"),
            Err(BlobError::TooLarge { .. })
        ));
        assert!(matches!(
            store.get(&"2".repeat(64)),
            Err(BlobError::NotFound(_))
        ));
        assert!(matches!(store.get("../etc"), Err(BlobError::BadAddress(_))));
        drop(w);
        // A file is stored under its digest; a missing one is the empty blob.
        let src = dir.path().join("a.log");
        std::fs::write(&src, b"line 1\nline 2\n").unwrap();
        let (sha, size) = store.put_file(&src).unwrap();
        assert_eq!(size, 14);
        assert_eq!(sha, hex::encode(Sha256::digest(b"line 1\nline 2\n")));
        assert_eq!(store.read_range(&sha, 7, 100).unwrap(), b"line 2\n");
        assert_eq!(store.read_range(&sha, 0, 4).unwrap(), b"line");
        assert_eq!(store.read_range(&sha, 14, 4).unwrap(), b"");
        assert_eq!(store.put_file(&src).unwrap(), (sha, 14));
        let (empty, size) = store.put_file(&dir.path().join("none.log")).unwrap();
        assert_eq!((store.get(&empty).unwrap(), size), (Vec::new(), 0));
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs/tmp"))
                .unwrap()
                .count(),
            0
        );
    }
}
