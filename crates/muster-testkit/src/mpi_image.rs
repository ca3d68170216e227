//! An Open MPI image for the distributed tests, built locally (no registry): `FROM
//! scratch` with the files of the host's Open MPI packages (Debian's `openmpi-bin` and what
//! it pulls in: `libopenmpi3`, `libpmix2`, `libhwloc15`, ...), the shared libraries every
//! one of their programs and plugins needs (their `ldd` closure), and a static busybox for
//! `sh`. No sshd: muster's rsh helper starts the remote daemons.
//!
//! The host needs `openmpi-bin` (`apt-get install -y openmpi-bin`) and busybox-static.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use bollard::Docker;
use tokio::sync::OnceCell;

/// The image [`mpi_image`] builds.
pub const MPI_IMAGE: &str = "muster-test-openmpi:latest";

const DOCKERFILE: &str = "FROM scratch\n\
COPY rootfs/ /\n\
RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n";

/// Package name prefixes that make up Open MPI on Debian (development and documentation
/// packages excluded).
const PACKAGE_PREFIXES: [&str; 5] = ["openmpi-", "libopenmpi", "libpmix", "libhwloc", "libevent"];

/// Makes sure [`MPI_IMAGE`] exists on the engine (built once per process, only if absent)
/// and returns its name.
pub async fn mpi_image(docker: &Docker) -> anyhow::Result<String> {
    static BUILT: OnceCell<()> = OnceCell::const_new();
    BUILT
        .get_or_try_init(|| async {
            if docker.inspect_image(MPI_IMAGE).await.is_ok() {
                return Ok(());
            }
            let context = tokio::task::spawn_blocking(build_context)
                .await
                .context("assembling the Open MPI rootfs")??;
            crate::images::build_and_tag(docker, context, MPI_IMAGE).await
        })
        .await?;
    Ok(MPI_IMAGE.to_string())
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"\x7fELF"
}

/// The libraries `path` loads (absolute paths as `ldd` names them), or `None` if one of
/// them is missing on the host (such a plugin is left out: Open MPI skips it).
pub(crate) fn ldd(path: &Path) -> Option<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not found") {
        return None;
    }
    Some(
        text.lines()
            .filter_map(|l| {
                let l = l.trim();
                let p = match l.split_once("=>") {
                    Some((_, rest)) => rest.trim(),
                    None => l,
                };
                let p = p.split(" (").next().unwrap_or("").trim();
                p.starts_with('/').then(|| PathBuf::from(p))
            })
            .collect(),
    )
}

/// The build context: the Dockerfile and `rootfs/`.
fn build_context() -> anyhow::Result<Vec<u8>> {
    if !Path::new("/usr/bin/mpirun").exists() {
        bail!(
            "no /usr/bin/mpirun on this machine: install Open MPI (`apt-get install -y openmpi-bin`) to build {MPI_IMAGE}"
        );
    }
    let busybox = std::fs::read("/bin/busybox").context(
        "cannot read /bin/busybox: install Debian's busybox-static (a statically linked busybox)",
    )?;
    let installed = run(Command::new("dpkg-query").args(["-W", "-f", "${Package}\\n"]))?;
    let packages: Vec<&str> = installed
        .lines()
        .filter(|p| PACKAGE_PREFIXES.iter().any(|prefix| p.starts_with(prefix)))
        .filter(|p| !p.ends_with("-dev") && !p.ends_with("-doc"))
        .collect();
    // Every file of those packages, then the libraries their programs and plugins load.
    let mut files: BTreeSet<PathBuf> = BTreeSet::new();
    for p in &packages {
        for line in run(Command::new("dpkg").args(["-L", p]))?.lines() {
            let path = PathBuf::from(line);
            if line.starts_with("/usr/share/doc") || line.starts_with("/usr/share/man") {
                continue;
            }
            if path.is_file() {
                files.insert(path);
            }
        }
    }
    // Commands installed through update-alternatives (`mpirun`, `mpiexec`, ...) are links
    // in /usr/bin that no package lists.
    let canonical: BTreeSet<PathBuf> = files
        .iter()
        .filter_map(|f| std::fs::canonicalize(f).ok())
        .collect();
    for entry in std::fs::read_dir("/usr/bin").context("listing /usr/bin")? {
        let path = entry?.path();
        if path.is_symlink() && std::fs::canonicalize(&path).is_ok_and(|t| canonical.contains(&t)) {
            files.insert(path);
        }
    }
    let mut all: BTreeMap<PathBuf, ()> = BTreeMap::new();
    for f in &files {
        if is_elf(f) {
            match ldd(f) {
                Some(libs) => {
                    for l in libs {
                        all.insert(l, ());
                    }
                }
                // A plugin whose libraries the host lacks: Open MPI skips it there too.
                None => continue,
            }
        }
        all.insert(f.clone(), ());
    }

    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut add_dirs = |tar: &mut tar::Builder<Vec<u8>>, path: &Path| -> std::io::Result<()> {
        let mut missing = Vec::new();
        let mut d = path.parent();
        while let Some(dir) = d {
            if dir == Path::new("/") || dirs.contains(dir) {
                break;
            }
            missing.push(dir.to_path_buf());
            d = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            header.set_cksum();
            let name = format!("rootfs{}/", dir.display());
            tar.append_data(&mut header, name, std::io::empty())?;
            dirs.insert(dir);
        }
        Ok(())
    };
    let mut add_file = |tar: &mut tar::Builder<Vec<u8>>,
                        path: &Path,
                        mode: u32,
                        data: &[u8]|
     -> std::io::Result<()> {
        add_dirs(tar, path)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        tar.append_data(&mut header, format!("rootfs{}", path.display()), data)
    };
    for path in all.keys() {
        // Symbolic links are followed: the image gets the content at every listed path.
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mode = if is_elf(path) || path.starts_with("/usr/bin") {
            0o755
        } else {
            0o644
        };
        add_file(&mut tar, path, mode, &data)?;
    }
    add_file(&mut tar, Path::new("/bin/busybox"), 0o755, &busybox)?;
    // Open MPI looks the user up and keeps its session directory in /tmp.
    add_file(
        &mut tar,
        Path::new("/etc/passwd"),
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )?;
    add_file(
        &mut tar,
        Path::new("/etc/group"),
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n",
    )?;
    for dir in ["/tmp", "/root"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(if dir == "/tmp" { 0o1777 } else { 0o700 });
        header.set_size(0);
        header.set_cksum();
        tar.append_data(&mut header, format!("rootfs{dir}/"), std::io::empty())?;
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(DOCKERFILE.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "Dockerfile", DOCKERFILE.as_bytes())?;
    Ok(tar.into_inner()?)
}
