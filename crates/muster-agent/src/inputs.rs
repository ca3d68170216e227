//! Places a pipeline step's inputs: each upstream output, identified as
//! `<outputs archive sha256>/<folder>`, is fetched from the blob store (through the node's
//! content-addressed cache), unpacked, and its folder copied to `inputs/<name>` in the
//! attempt's working directory before the command starts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use muster_client::Blobs;
use muster_client::Channel;
use muster_proto::v1::blob_service_client::BlobServiceClient;

/// Why a pipeline step's inputs could not be placed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InputError {
    /// An input's name is not a plain folder name.
    #[error("input {0:?} is not a plain folder name")]
    NotPlain(String),
    /// Not `ARCHIVE_SHA256/FOLDER`.
    #[error("input {input}: {identity:?} is not an output identity (ARCHIVE_SHA256/FOLDER)")]
    NotIdentity {
        /// The input.
        input: String,
        /// What it was given.
        identity: String,
    },
    /// The archive part is not a SHA-256.
    #[error("input {input}: {sha:?} is not the SHA-256 of an outputs archive")]
    NotDigest {
        /// The input.
        input: String,
        /// What it was given.
        sha: String,
    },
    /// The folder part is not a folder name.
    #[error("input {input}: {folder:?} is not a folder name")]
    NotFolder {
        /// The input.
        input: String,
        /// What it was given.
        folder: String,
    },
    /// The archive could not be downloaded.
    #[error("could not fetch the outputs archive {sha}: {cause}")]
    Fetch {
        /// The archive.
        sha: String,
        /// Why.
        cause: muster_client::ClientError,
    },
    /// The archive could not be read.
    #[error("cannot {doing} the outputs archive {sha}: {source}")]
    Archive {
        /// "open" or "unpack".
        doing: &'static str,
        /// The archive.
        sha: String,
        /// Why.
        source: std::io::Error,
    },
    /// The upstream step did not write the folder.
    #[error(
        "input {input}: the upstream outputs archive {sha} has no folder {folder}/ (the step did not write outputs/{folder})"
    )]
    MissingFolder {
        /// The input.
        input: String,
        /// The archive.
        sha: String,
        /// The folder.
        folder: String,
    },
    /// A directory or copy failed.
    #[error("input {input}: cannot place it: {source}")]
    Place {
        /// The input (or the folder created for all of them).
        input: String,
        /// Why.
        source: std::io::Error,
    },
    /// The blocking task that unpacks died.
    #[error("placing the inputs: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A plain file name: no separators, not `.` or `..`, not empty.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

/// Splits an output identity into (archive digest, folder).
fn parse_identity(input: &str, identity: &str) -> Result<(String, String), InputError> {
    let (sha, folder) = identity
        .split_once('/')
        .ok_or_else(|| InputError::NotIdentity {
            input: input.to_string(),
            identity: identity.to_string(),
        })?;
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InputError::NotDigest {
            input: input.to_string(),
            sha: sha.to_string(),
        });
    }
    if !plain(folder) {
        return Err(InputError::NotFolder {
            input: input.to_string(),
            folder: folder.to_string(),
        });
    }
    Ok((sha.to_ascii_lowercase(), folder.to_string()))
}

/// Places every input of `inputs` (name → identity) at `code_dir/inputs/<name>`; `scratch`
/// is a directory of the attempt's own for unpacking (removed afterwards).
pub(crate) async fn place(
    client: &mut BlobServiceClient<Channel>,
    inputs: &BTreeMap<String, String>,
    cache: &Path,
    scratch: &Path,
    code_dir: &Path,
) -> Result<usize, InputError> {
    if inputs.is_empty() {
        return Ok(0);
    }
    let mut wanted = Vec::new();
    for (name, identity) in inputs {
        if !plain(name) {
            return Err(InputError::NotPlain(name.clone()));
        }
        let (sha, folder) = parse_identity(name, identity)?;
        wanted.push((name.clone(), sha, folder));
    }
    let archives: BTreeSet<String> = wanted.iter().map(|(_, sha, _)| sha.clone()).collect();
    let mut client = Blobs::new(client.clone());
    for sha in &archives {
        let cached = cache.join(&sha[..2]).join(sha);
        if !cached.exists() {
            client
                .download(sha, &cached)
                .await
                .map_err(|cause| InputError::Fetch {
                    sha: sha.clone(),
                    cause,
                })?;
        }
    }
    let cache = cache.to_path_buf();
    let scratch = scratch.to_path_buf();
    let target = code_dir.join("inputs");
    let placed = tokio::task::spawn_blocking(move || -> Result<usize, InputError> {
        let result = unpack_and_copy(&wanted, &archives, &cache, &scratch, &target);
        let _ = std::fs::remove_dir_all(&scratch);
        result
    })
    .await??;
    Ok(placed)
}

fn unpack_and_copy(
    wanted: &[(String, String, String)],
    archives: &BTreeSet<String>,
    cache: &Path,
    scratch: &Path,
    target: &Path,
) -> Result<usize, InputError> {
    let _ = std::fs::remove_dir_all(scratch);
    let archive_error = |doing, sha: &str| {
        let sha = sha.to_string();
        move |source| InputError::Archive { doing, sha, source }
    };
    for sha in archives {
        let dir = scratch.join(sha);
        std::fs::create_dir_all(&dir).map_err(archive_error("unpack", sha))?;
        let file = std::fs::File::open(cache.join(&sha[..2]).join(sha))
            .map_err(archive_error("open", sha))?;
        tar::Archive::new(file)
            .unpack(&dir)
            .map_err(archive_error("unpack", sha))?;
    }
    for (name, sha, folder) in wanted {
        let from = scratch.join(sha).join(folder);
        if !from.is_dir() {
            return Err(InputError::MissingFolder {
                input: name.clone(),
                sha: sha.clone(),
                folder: folder.clone(),
            });
        }
        let to = target.join(name);
        let _ = std::fs::remove_dir_all(&to);
        copy_dir(&from, &to).map_err(|source| InputError::Place {
            input: name.clone(),
            source,
        })?;
    }
    Ok(wanted.len())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest: PathBuf = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else if kind.is_symlink() {
            let link = std::fs::read_link(entry.path())?;
            std::os::unix::fs::symlink(link, &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_checked() {
        let sha = "a".repeat(64);
        assert_eq!(
            parse_identity("x", &format!("{sha}/model")).unwrap(),
            (sha.clone(), "model".to_string())
        );
        assert!(
            parse_identity("x", "nope")
                .unwrap_err()
                .to_string()
                .contains("input x")
        );
        assert!(parse_identity("x", "abc/model").is_err());
        assert!(parse_identity("x", &format!("{sha}/..")).is_err());
        assert!(parse_identity("x", &format!("{sha}/a/b")).is_err());
    }

    #[test]
    fn a_folder_of_an_archive_lands_at_inputs_name() {
        let tmp = tempfile::tempdir().unwrap();
        let outputs = tmp.path().join("outputs");
        std::fs::create_dir_all(outputs.join("model/sub")).unwrap();
        std::fs::create_dir_all(outputs.join("empty")).unwrap();
        std::fs::write(outputs.join("model/sub/w.txt"), "weights").unwrap();
        let tar_path = tmp.path().join("a.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        b.append_dir_all(".", &outputs).unwrap();
        b.into_inner().unwrap();
        let sha = muster_client::hash_file(&tar_path).unwrap();
        let cache = tmp.path().join("cache");
        std::fs::create_dir_all(cache.join(&sha[..2])).unwrap();
        std::fs::rename(&tar_path, cache.join(&sha[..2]).join(&sha)).unwrap();
        let wanted = vec![
            ("m".to_string(), sha.clone(), "model".to_string()),
            ("e".to_string(), sha.clone(), "empty".to_string()),
        ];
        let target = tmp.path().join("code/inputs");
        let scratch = tmp.path().join("scratch");
        let n = unpack_and_copy(
            &wanted,
            &BTreeSet::from([sha.clone()]),
            &cache,
            &scratch,
            &target,
        )
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            std::fs::read_to_string(target.join("m/sub/w.txt")).unwrap(),
            "weights"
        );
        assert!(target.join("e").is_dir());
        let missing = vec![("z".to_string(), sha.clone(), "nothing".to_string())];
        let e = unpack_and_copy(&missing, &BTreeSet::from([sha]), &cache, &scratch, &target)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no folder nothing/"), "{e}");
    }
}
