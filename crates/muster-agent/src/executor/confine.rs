//! What confines a run to what it may touch (DESIGN.md section 14): the user it runs as,
//! the ownership of the folders it writes, the host paths that are never mounted, and the
//! resource limits of a process.
//!
//! A container runs as a non-root user unless its compute target allows root: `nobody`
//! (65534:65534) when the agent is root, else the agent's own user. The folders the run
//! writes (`outputs/`, `logs/`, the checkpoint folder, `download` inputs) are given to that
//! user when the agent is root; when it is not, the run's user owns them already.
//!
//! A process under `muster agent --run-as USER` runs as USER with a group of its own
//! (derived from the attempt, see [`attempt_gid`]): its working directory belongs to root
//! and that group, mode 0770, so the run reads and writes it while another run (the same
//! USER, another group) cannot even list it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `nobody`'s uid and gid: the user of a container when the agent is root.
pub const NOBODY: RunUser = RunUser {
    uid: 65534,
    gid: 65534,
};

/// The first gid of the groups of processes run under `--run-as` (well above any group a
/// system or directory service hands out).
const ATTEMPT_GID_BASE: u32 = 2_000_000_000;
/// How many such groups there are.
const ATTEMPT_GIDS: u32 = 1_000_000_000;

/// A numeric user and group a run executes as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunUser {
    /// The uid.
    pub uid: u32,
    /// The gid.
    pub gid: u32,
}

/// Whether the agent runs as root (and can give files away and switch users).
pub fn agent_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The user a container runs as: `None` (the image's own) when the compute target allows
/// root; else [`NOBODY`] when the agent is root, the agent's own user when not.
pub fn container_user(allow_root: bool) -> Option<RunUser> {
    if allow_root {
        return None;
    }
    if agent_is_root() {
        Some(NOBODY)
    } else {
        Some(RunUser {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        })
    }
}

/// The user named by `muster agent --run-as`: a name from the user database or a numeric
/// uid (its group: the user's primary group, or the same number). The error is a sentence
/// naming the flag.
pub fn resolve_run_as(name: &str) -> Result<RunUser, String> {
    let name = name.trim();
    if name.is_empty() {
        return Err(
            "--run-as: the user name is empty: name an unprivileged user, e.g. nobody".into(),
        );
    }
    let found = match name.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(uid.into())
            .map_err(|e| format!("--run-as: cannot read the user database: {e}"))?
            .map(|u| RunUser {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            })
            .or(Some(RunUser { uid, gid: uid })),
        Err(_) => nix::unistd::User::from_name(name)
            .map_err(|e| format!("--run-as: cannot read the user database: {e}"))?
            .map(|u| RunUser {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            }),
    };
    let user = found.ok_or_else(|| {
        format!(
            "--run-as: no user {name:?} on this machine: create it or name another (e.g. nobody)"
        )
    })?;
    if user.uid == 0 {
        return Err(format!(
            "--run-as: {name:?} is root: name an unprivileged user, e.g. nobody"
        ));
    }
    Ok(user)
}

/// The group of one attempt's processes under `--run-as`, from its working directory
/// (one per attempt): stable for the attempt, apart from every other attempt's on the
/// machine but for a one-in-a-billion chance (FNV-1a of the path).
pub fn attempt_gid(workdir: &Path) -> u32 {
    use std::os::unix::ffi::OsStrExt;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in workdir.as_os_str().as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    ATTEMPT_GID_BASE + (hash % u64::from(ATTEMPT_GIDS)) as u32
}

/// Gives `root` and everything below it to `user` (symbolic links themselves, never what
/// they point to).
pub fn give_to(root: &Path, user: RunUser) -> std::io::Result<()> {
    walk(root, &mut |path, _| {
        std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
    })
}

/// Makes `root` (a process's working directory) private to one attempt's group: everything
/// below it belongs to root and `gid`, the group may do what the owner may (a read-only
/// input stays read-only), others nothing on `root` itself (mode 0770).
pub fn make_private(root: &Path, gid: u32) -> std::io::Result<()> {
    walk(root, &mut |path, meta| {
        std::os::unix::fs::lchown(path, Some(0), Some(gid))?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let mode = meta.mode() & 0o7777;
        let owner = mode & 0o700;
        let wanted = if path == root {
            0o770
        } else {
            (mode & !0o070) | (owner >> 3)
        };
        if wanted != mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted))?;
        }
        Ok(())
    })
}

/// Calls `visit` on `root` and everything below it, not following symbolic links.
fn walk(
    root: &Path,
    visit: &mut dyn FnMut(&Path, &std::fs::Metadata) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut pending: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        visit(&path, &meta)?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Host paths never mounted into a container, whoever asks: the root, the kernel's and the
/// system's folders, and the engine's socket (any socket).
const NEVER_MOUNTED: &[&str] = &[
    "/",
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/boot",
    "/run",
    "/var/run",
    "/var/lib/docker",
];

/// Why `source` may not be mounted into a container, if so: it is (or holds) one of
/// [`NEVER_MOUNTED`], or a socket such as the Docker engine's.
pub fn forbidden_mount(source: &Path) -> Option<String> {
    let real = std::fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
    // An attempt's own secret folder, which the agent made on /dev/shm for it alone.
    let secrets = Path::new(crate::secrets::SECRETS_ROOT);
    if real.starts_with(secrets) && real != secrets {
        return None;
    }
    for never in NEVER_MOUNTED {
        let never = Path::new(never);
        if real == never || (never != Path::new("/") && real.starts_with(never)) {
            return Some(format!(
                "{} is {} or below it, which no run may see",
                source.display(),
                never.display()
            ));
        }
        if never != Path::new("/") && never.starts_with(&real) {
            return Some(format!(
                "{} holds {}, which no run may see",
                source.display(),
                never.display()
            ));
        }
    }
    if let Ok(meta) = std::fs::metadata(&real) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            return Some(format!(
                "{} is a socket (such as the Docker engine's), which no run may reach",
                source.display()
            ));
        }
    }
    None
}

/// The variables of a run's own environment that would change which GPUs it sees: the
/// NVIDIA container runtime's (`NVIDIA_*`) and CUDA's device list. The agent sets them for
/// the GPUs it gave; a run's own are dropped.
pub fn is_gpu_variable(name: &str) -> bool {
    name.starts_with("NVIDIA_") || name == "CUDA_VISIBLE_DEVICES"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_s_group_is_stable_and_apart_from_another_s() {
        let a = attempt_gid(Path::new("/w/run-a.1/code"));
        assert_eq!(a, attempt_gid(Path::new("/w/run-a.1/code")));
        assert_ne!(a, attempt_gid(Path::new("/w/run-a.2/code")));
        assert_ne!(a, attempt_gid(Path::new("/w/run-b.1/code")));
        assert!(a >= ATTEMPT_GID_BASE);
    }

    #[test]
    fn system_paths_and_sockets_are_never_mounted() {
        assert!(forbidden_mount(Path::new("/")).is_some());
        assert!(forbidden_mount(Path::new("/var/run/docker.sock")).is_some());
        assert!(forbidden_mount(Path::new("/etc/passwd")).is_some());
        assert!(forbidden_mount(Path::new("/proc/1")).is_some());
        assert!(
            forbidden_mount(Path::new("/var/lib"))
                .unwrap()
                .contains("holds")
        );
        assert_eq!(forbidden_mount(Path::new("/usr/bin/true")), None);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(forbidden_mount(dir.path()), None);
        let sock = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(forbidden_mount(&sock).unwrap().contains("socket"));
    }

    #[test]
    fn gpu_variables_are_the_runtime_s_and_cuda_s() {
        assert!(is_gpu_variable("NVIDIA_VISIBLE_DEVICES"));
        assert!(is_gpu_variable("NVIDIA_DRIVER_CAPABILITIES"));
        assert!(is_gpu_variable("CUDA_VISIBLE_DEVICES"));
        assert!(!is_gpu_variable("CUDA_HOME"));
    }

    #[test]
    fn a_private_workdir_is_its_group_s_and_keeps_read_only_files() {
        if !agent_is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("code");
        std::fs::create_dir_all(root.join("outputs")).unwrap();
        std::fs::write(root.join("ro"), "x").unwrap();
        std::fs::set_permissions(root.join("ro"), std::fs::Permissions::from_mode(0o444)).unwrap();
        std::fs::write(root.join("rw"), "x").unwrap();
        make_private(&root, 2_000_000_123).unwrap();
        let mode = |p: &str| std::fs::metadata(root.join(p)).unwrap().mode() & 0o777;
        assert_eq!(std::fs::metadata(&root).unwrap().mode() & 0o777, 0o770);
        assert_eq!(std::fs::metadata(&root).unwrap().gid(), 2_000_000_123);
        assert_eq!(mode("ro"), 0o444);
        assert_eq!(mode("rw"), 0o664);
        assert_eq!(mode("outputs"), 0o775);
    }
}
