//! Code snapshots: walk the source directory honouring `.amlignore` (which wins when
//! present) or `.gitignore` (nested files too, gitignore syntax, via the `ignore` crate),
//! enforce the size and file-count limits, hash every file, record the git state, and
//! upload only the blobs the server lacks.

use std::path::{Path, PathBuf};

use anyhow::Context;
use muster_client::Blobs;
use muster_core::snapshot::{GitInfo, Manifest, ManifestEntry};
use muster_core::spec::CodeRef;

/// Azure ML's default limits.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotLimits {
    /// Total bytes (default 300 MB).
    pub max_bytes: u64,
    /// Files (default 2,000).
    pub max_files: usize,
}

impl Default for SnapshotLimits {
    fn default() -> Self {
        SnapshotLimits {
            max_bytes: 300 * 1000 * 1000,
            max_files: 2_000,
        }
    }
}

/// A snapshot ready to upload.
#[derive(Debug)]
pub struct Snapshot {
    /// The manifest.
    pub manifest: Manifest,
    /// Where each manifest entry's content is on disk (same order).
    pub sources: Vec<PathBuf>,
    /// The git state, if the directory is in a work tree.
    pub git: Option<GitInfo>,
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadStats {
    /// Files uploaded (the server lacked them).
    pub uploaded_files: usize,
    /// Bytes uploaded.
    pub uploaded_bytes: u64,
}

/// Builds the snapshot of `dir`.
pub fn build(dir: &Path, limits: SnapshotLimits) -> anyhow::Result<Snapshot> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("code: cannot read the code directory {}", dir.display()))?;
    anyhow::ensure!(meta.is_dir(), "code: {} is not a directory", dir.display());
    let use_amlignore = dir.join(".amlignore").exists();
    let mut walk = ignore::WalkBuilder::new(dir);
    walk.hidden(false)
        .parents(false)
        .ignore(false)
        .git_global(false)
        .git_exclude(false)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b));
    if use_amlignore {
        walk.git_ignore(false)
            .add_custom_ignore_filename(".amlignore");
    } else {
        walk.git_ignore(true).require_git(false);
    }
    let root = std::fs::canonicalize(dir)
        .with_context(|| format!("code: cannot read the code directory {}", dir.display()))?;
    let mut entries: Vec<(String, PathBuf, u64, bool)> = Vec::new();
    let mut total = 0u64;
    for item in walk.build() {
        let item = item.with_context(|| format!("code: walking {}", dir.display()))?;
        let path = item.path();
        let rel = path.strip_prefix(dir).unwrap_or(path);
        if rel.as_os_str().is_empty()
            || rel
                .components()
                .next()
                .is_some_and(|c| c.as_os_str() == ".git")
        {
            continue;
        }
        // A link to a file inside the directory is that file's content; any other link is
        // left out, with a warning: never the bytes of a file outside (`leak ->
        // /etc/passwd`), nor a folder it would walk into.
        if item.path_is_symlink()
            && let Some(why) = link_left_out(&root, path)
        {
            eprintln!("warning: code: {} is {why}: not uploaded", rel.display());
            continue;
        }
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let rel = rel
            .to_str()
            .with_context(|| {
                format!(
                    "code: {} is not a UTF-8 path; rename it or exclude it",
                    rel.display()
                )
            })?
            .replace('\\', "/");
        #[cfg(unix)]
        let executable = {
            use std::os::unix::fs::PermissionsExt;
            meta.permissions().mode() & 0o111 != 0
        };
        #[cfg(not(unix))]
        let executable = false;
        total += meta.len();
        entries.push((rel, path.to_path_buf(), meta.len(), executable));
    }
    let ignore_file = if use_amlignore {
        ".amlignore"
    } else {
        ".amlignore (or .gitignore)"
    };
    if entries.len() > limits.max_files {
        anyhow::bail!(
            "code: the snapshot of {} has {} files, over the limit of {}: exclude files with a {ignore_file} in that directory (gitignore syntax, e.g. `data/` or `*.ckpt`), or raise the limit with --max-snapshot-files",
            dir.display(),
            entries.len(),
            limits.max_files
        );
    }
    if total > limits.max_bytes {
        let mut biggest: Vec<_> = entries.iter().map(|e| (e.2, e.0.as_str())).collect();
        biggest.sort_by(|a, b| b.cmp(a));
        let names: Vec<String> = biggest
            .iter()
            .take(3)
            .map(|(size, name)| format!("{name} ({})", human_bytes(*size)))
            .collect();
        anyhow::bail!(
            "code: the snapshot of {} is {}, over the limit of {}: exclude files with a {ignore_file} in that directory (largest: {}), or raise the limit with --max-snapshot-bytes",
            dir.display(),
            human_bytes(total),
            human_bytes(limits.max_bytes),
            names.join(", ")
        );
    }
    let (files, sources) = hash_listed(entries)?;
    Ok(Snapshot {
        manifest: Manifest { files },
        sources,
        git: git_info(dir),
    })
}

/// Why the symbolic link `path` in the snapshotted directory `root` (canonical) is left
/// out, or `None` when it names a file inside `root` (whose content is taken).
fn link_left_out(root: &Path, path: &Path) -> Option<String> {
    let target = std::fs::read_link(path)
        .map(|t| t.display().to_string())
        .unwrap_or_default();
    match std::fs::canonicalize(path) {
        Err(_) => Some(format!("a link to {target}, which does not exist")),
        Ok(t) if !t.starts_with(root) => Some(format!(
            "a link to {target}, outside {} (copy the file in to upload it)",
            root.display()
        )),
        Ok(t) if t.is_dir() => Some(format!(
            "a link to the folder {target} (links to folders are not followed: put the folder in, or give it as a data input)"
        )),
        Ok(_) => None,
    }
}

/// The limits of a data input uploaded with a submit (a local `path:`): larger than a code
/// snapshot's, since data is what it is for.
pub const DATA_LIMITS: SnapshotLimits = SnapshotLimits {
    max_bytes: 16 << 30,
    max_files: 100_000,
};

/// A snapshot of one file, under its file name (a local `uri_file` input).
pub fn file_snapshot(path: &Path) -> anyhow::Result<Snapshot> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(meta.is_file(), "{} is not a file", path.display());
    anyhow::ensure!(
        meta.len() <= DATA_LIMITS.max_bytes,
        "{} is {}, over the {} a data input may be: put it on a file system the nodes share",
        path.display(),
        human_bytes(meta.len()),
        human_bytes(DATA_LIMITS.max_bytes)
    );
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| muster_core::snapshot::is_safe_relative_path(n))
        .with_context(|| format!("{} has no usable file name", path.display()))?
        .to_string();
    #[cfg(unix)]
    let executable = {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o111 != 0
    };
    #[cfg(not(unix))]
    let executable = false;
    let (files, sources) = hash_listed(vec![(name, path.to_path_buf(), meta.len(), executable)])?;
    Ok(Snapshot {
        manifest: Manifest { files },
        sources,
        git: None,
    })
}

/// The digest `snapshot`'s manifest is stored under (what [`upload`] returns).
pub fn manifest_sha(snapshot: &Snapshot) -> anyhow::Result<String> {
    Ok(muster_client::hash_bytes(&serde_json::to_vec(
        &snapshot.manifest,
    )?))
}

/// Hashes the listed files (relative path, path, size, executable) into manifest entries and
/// their sources. A file another process (a build, a cache) removed after the walk listed it is
/// left out with a note on stderr, as `tar` does, rather than failing the submission.
fn hash_listed(
    entries: Vec<(String, PathBuf, u64, bool)>,
) -> anyhow::Result<(Vec<ManifestEntry>, Vec<PathBuf>)> {
    let mut files = Vec::with_capacity(entries.len());
    let mut sources = Vec::with_capacity(entries.len());
    for (rel, path, size, executable) in entries {
        let sha256 = match muster_client::hash_file(&path) {
            Ok(sha256) => sha256,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("code: {rel} was removed while the snapshot was taken; it is left out");
                continue;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("code: cannot read {}", path.display()));
            }
        };
        files.push(ManifestEntry {
            path: rel,
            sha256,
            size,
            executable,
        });
        sources.push(path);
    }
    Ok((files, sources))
}

/// Uploads what the server lacks (files, then the manifest); returns the run's code reference.
pub async fn upload(
    client: &mut Blobs,
    snapshot: &Snapshot,
) -> anyhow::Result<(CodeRef, UploadStats)> {
    // One question for the files and the manifest together: an unchanged directory then
    // costs one round trip before the submit.
    let manifest = serde_json::to_vec(&snapshot.manifest)?;
    let manifest_sha = manifest_sha(snapshot)?;
    let hashes: Vec<String> = snapshot
        .manifest
        .files
        .iter()
        .map(|f| f.sha256.clone())
        .chain([manifest_sha.clone()])
        .collect();
    let missing: std::collections::HashSet<String> =
        client.missing(hashes).await?.into_iter().collect();
    let mut stats = UploadStats {
        uploaded_files: 0,
        uploaded_bytes: 0,
    };
    let mut seen = std::collections::HashSet::new();
    let to_send: Vec<_> = snapshot
        .manifest
        .files
        .iter()
        .zip(&snapshot.sources)
        .filter(|(entry, _)| missing.contains(&entry.sha256) && seen.insert(&entry.sha256))
        .collect();
    let bar = crate::progress::bytes(to_send.iter().map(|(e, _)| e.size).sum(), "uploading");
    for (entry, source) in to_send {
        let file = tokio::fs::File::open(source)
            .await
            .with_context(|| format!("reading {}", source.display()))?;
        client
            .upload_stream(
                &entry.sha256,
                crate::progress::Counting::new(file, bar.clone()),
            )
            .await
            .with_context(|| format!("uploading {}", entry.path))?;
        stats.uploaded_files += 1;
        stats.uploaded_bytes += entry.size;
    }
    bar.finish_and_clear();
    let sha = if missing.contains(&manifest_sha) {
        client.put_bytes(manifest).await?
    } else {
        manifest_sha
    };
    Ok((
        CodeRef {
            manifest: sha,
            files: snapshot.manifest.files.len() as u64,
            bytes: snapshot.manifest.total_bytes(),
            git: snapshot.git.clone(),
        },
        stats,
    ))
}

/// The commit, branch and dirty flag of the work tree `dir` is in, if any: one
/// `git status --porcelain=v2 --branch`, and no process at all when no `.git` is found
/// above `dir` (and `GIT_DIR` is unset), as for most submissions from a scratch directory.
pub fn git_info(dir: &Path) -> Option<GitInfo> {
    if std::env::var_os("GIT_DIR").is_none() && !in_work_tree(dir) {
        return None;
    }
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain=v2", "--branch"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| parse_status(&String::from_utf8_lossy(&out.stdout)))
        .flatten()
}

/// Whether `dir` or a directory above it holds `.git` (a directory, or a file for a worktree
/// or submodule).
fn in_work_tree(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    dir.ancestors().any(|d| d.join(".git").exists())
}

/// [`GitInfo`] from `git status --porcelain=v2 --branch`: `# branch.oid` is the commit
/// (`(initial)` before the first: none), `# branch.head` the branch (`(detached)`: none), and
/// any other line a change, tracked or not.
fn parse_status(out: &str) -> Option<GitInfo> {
    let mut commit = None;
    let mut branch = None;
    let mut dirty = false;
    for line in out.lines() {
        if let Some(oid) = line.strip_prefix("# branch.oid ") {
            commit = (oid != "(initial)").then(|| oid.to_string());
        } else if let Some(head) = line.strip_prefix("# branch.head ") {
            branch = (head != "(detached)").then(|| head.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            dirty = true;
        }
    }
    Some(GitInfo {
        commit: commit?,
        branch,
        dirty,
    })
}

/// `1 file`, `2 files`: a count with its noun, singular for one.
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The line a submit prints on stderr about its snapshot: `Snapshot of DIR: 3 files,
/// 1.2 KB (1 uploaded, 200 B)`; `what` names a pipeline's step.
pub fn describe(dir: &Path, what: &str, code: &CodeRef, stats: &UploadStats) -> String {
    format!(
        "Snapshot of {}{what}: {}, {} ({} uploaded, {})",
        dir.display(),
        count(code.files, "file"),
        human_bytes(code.bytes),
        stats.uploaded_files,
        human_bytes(stats.uploaded_bytes)
    )
}

/// `1.5 MB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, content: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn paths(s: &Snapshot) -> Vec<&str> {
        s.manifest.files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn gitignore_applies_including_nested_files() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), ".gitignore", "*.ckpt\ndata/\n");
        write(d.path(), "train.py", "print(1)");
        write(d.path(), "model.ckpt", "x");
        write(d.path(), "data/big.bin", "x");
        write(d.path(), "sub/.gitignore", "secret.txt\n");
        write(d.path(), "sub/secret.txt", "x");
        write(d.path(), "sub/keep.txt", "x");
        write(d.path(), ".git/HEAD", "ref");
        let s = build(d.path(), SnapshotLimits::default()).unwrap();
        assert_eq!(
            paths(&s),
            vec![".gitignore", "sub/.gitignore", "sub/keep.txt", "train.py"]
        );
    }

    #[test]
    fn links_out_of_the_directory_or_to_folders_are_left_out() {
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "passwd", "root:x:0:0");
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "train.py", "print(1)");
        write(d.path(), "conf/base.yml", "lr: 1");
        let link = |target: &Path, name: &str| {
            std::os::unix::fs::symlink(target, d.path().join(name)).unwrap();
        };
        link(&outside.path().join("passwd"), "leak");
        link(outside.path(), "outside-folder");
        link(Path::new("conf"), "conf-link");
        link(Path::new("conf/base.yml"), "base.yml");
        link(Path::new("nowhere"), "dangling");
        let s = build(d.path(), SnapshotLimits::default()).unwrap();
        // Only the link to a file inside is taken (as that file's content).
        assert_eq!(paths(&s), vec!["base.yml", "conf/base.yml", "train.py"]);
        assert!(s.sources.iter().all(|p| !p.starts_with(outside.path())));
        let link_reasons = [
            (outside.path().join("passwd"), "outside"),
            (PathBuf::from("conf"), "folders are not followed"),
            (PathBuf::from("nowhere"), "does not exist"),
        ];
        let root = std::fs::canonicalize(d.path()).unwrap();
        for (name, (_, why)) in ["leak", "conf-link", "dangling"].iter().zip(link_reasons) {
            let said = link_left_out(&root, &d.path().join(name)).unwrap();
            assert!(said.contains(why), "{name}: {said}");
        }
    }

    #[test]
    fn amlignore_wins_over_gitignore() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), ".gitignore", "*.py\n");
        write(d.path(), ".amlignore", "*.log\n");
        write(d.path(), "train.py", "print(1)");
        write(d.path(), "run.log", "x");
        let s = build(d.path(), SnapshotLimits::default()).unwrap();
        assert_eq!(paths(&s), vec![".amlignore", ".gitignore", "train.py"]);
    }

    #[test]
    fn limits_name_the_limit_the_size_and_the_fix() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..5 {
            write(d.path(), &format!("f{i}.txt"), "0123456789");
        }
        let e = build(
            d.path(),
            SnapshotLimits {
                max_bytes: 1 << 20,
                max_files: 3,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("5 files, over the limit of 3") && e.contains(".amlignore"),
            "{e}"
        );
        let e = build(
            d.path(),
            SnapshotLimits {
                max_bytes: 20,
                max_files: 100,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("50 B, over the limit of 20 B") && e.contains("largest"),
            "{e}"
        );
    }
    #[test]
    fn a_file_removed_after_the_walk_is_left_out_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "train.py", "print(1)");
        let listed = vec![
            (
                "gone.part".to_string(),
                d.path().join("gone.part"),
                3,
                false,
            ),
            ("train.py".to_string(), d.path().join("train.py"), 8, false),
        ];
        let (files, sources) = hash_listed(listed).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, "train.py");
        assert_eq!(sources, vec![d.path().join("train.py")]);
    }
    #[test]
    fn counts_and_the_snapshot_line_read_as_english() {
        assert_eq!(count(1, "file"), "1 file");
        assert_eq!(count(0, "file"), "0 files");
        let code = CodeRef {
            manifest: "m".into(),
            files: 1,
            bytes: 12,
            git: None,
        };
        let stats = UploadStats {
            uploaded_files: 1,
            uploaded_bytes: 12,
        };
        assert_eq!(
            describe(Path::new("proj"), " (step train)", &code, &stats),
            "Snapshot of proj (step train): 1 file, 12 B (1 uploaded, 12 B)"
        );
    }

    #[test]
    fn git_status_gives_commit_branch_and_dirty() {
        let clean = "# branch.oid 1234abcd\n# branch.head main\n# branch.upstream origin/main\n";
        let info = parse_status(clean).unwrap();
        assert_eq!(info.commit, "1234abcd");
        assert_eq!(info.branch.as_deref(), Some("main"));
        assert!(!info.dirty);
        let detached = "# branch.oid 1234abcd\n# branch.head (detached)\n? new.py\n";
        let info = parse_status(detached).unwrap();
        assert_eq!(info.branch, None);
        assert!(info.dirty, "an untracked file makes the tree dirty");
        assert!(parse_status("# branch.oid (initial)\n# branch.head main\n").is_none());
    }

    #[test]
    fn a_real_repository_is_read_and_a_plain_directory_is_not() {
        let d = tempfile::tempdir().unwrap();
        assert!(
            !in_work_tree(d.path()),
            "no .git above a fresh temporary directory"
        );
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(d.path())
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(ok, "git {args:?}");
        };
        run(&["init", "-q", "-b", "trunk"]);
        write(d.path(), "train.py", "print(1)");
        run(&["add", "train.py"]);
        run(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-q",
            "-m",
            "first",
        ]);
        let info = git_info(d.path()).expect("a work tree");
        assert_eq!(info.commit.len(), 40);
        assert_eq!(info.branch.as_deref(), Some("trunk"));
        assert!(!info.dirty);
        write(d.path(), "sub/more.py", "print(2)");
        assert!(git_info(&d.path().join("sub")).unwrap().dirty);
    }
}
