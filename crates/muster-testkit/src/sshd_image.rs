//! An SSH server image for `muster compute attach` tests, built locally (no registry):
//! `FROM scratch` with the host's Debian `sshd` (`openssh-server`) and the shared libraries
//! it loads (its `ldd` closure), the C libraries the muster binary needs (so the copy that
//! attach uploads runs there), a static busybox as `/bin/sh` and every tool the install
//! uses, a root user (with a password), host keys made with the host's `ssh-keygen` when the image is
//! built, and a fresh client key authorized for root. Each build is its own image (its
//! keys are its own), removed when the [`SshdImage`] is dropped.
//!
//! The host needs `openssh-server` (`apt-get install -y openssh-server`: `/usr/sbin/sshd`,
//! `ssh-keygen`) and busybox-static.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use bollard::Docker;

use crate::compose::{run_bounded, unique_name};
use crate::mpi_image::{is_elf, ldd};

const DOCKERFILE: &str = "FROM scratch\n\
COPY rootfs/ /\n\
RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
CMD [\"/usr/sbin/sshd\", \"-D\", \"-e\"]\n";

const SSHD_CONFIG: &str = "Port 22\n\
ListenAddress 0.0.0.0\n\
HostKey /etc/ssh/ssh_host_ed25519_key\n\
PermitRootLogin yes\n\
PubkeyAuthentication yes\n\
PasswordAuthentication yes\n\
KbdInteractiveAuthentication no\n\
UsePAM no\n\
StrictModes no\n\
PidFile /run/sshd.pid\n\
AuthorizedKeysFile .ssh/authorized_keys\n\
LogLevel INFO\n";

/// The file only the image has, and what it holds (a run that prints it ran inside).
pub const MARKER_PATH: &str = "/etc/muster-ssh-marker";

/// An sshd image with its keys; the image is removed on drop.
#[derive(Debug)]
pub struct SshdImage {
    /// The image's tag.
    pub tag: String,
    /// The SHA-256 fingerprint of its host key, as `ssh-keygen -lf` prints it.
    pub host_key_fingerprint: String,
    /// The host's public key line (`ssh-ed25519 AAAA…`), for a known_hosts file.
    pub host_public_key: String,
    /// A private key root may log in with.
    pub client_key: PathBuf,
    /// What [`MARKER_PATH`] holds in this image.
    pub marker: String,
    /// root's password (sshd takes passwords too).
    pub password: String,
    _keys: tempfile::TempDir,
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    Ok(run_bounded(cmd, Duration::from_secs(60))?.stdout)
}

/// Makes an ed25519 key pair without a passphrase at `path` (and `path.pub`).
pub fn keygen(path: &Path) -> anyhow::Result<()> {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "muster-test", "-f"])
        .arg(path))
    .context("ssh-keygen (install openssh-client)")?;
    Ok(())
}

/// `SHA256:…` of the public key file `pub_path`.
pub fn fingerprint(pub_path: &Path) -> anyhow::Result<String> {
    let out = run(Command::new("ssh-keygen").arg("-lf").arg(pub_path))?;
    out.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("ssh-keygen -lf printed no fingerprint: {out}"))
}

impl SshdImage {
    /// Builds a new image (a minute at most on a warm machine).
    pub async fn build(docker: &Docker, muster_bin: &Path) -> anyhow::Result<SshdImage> {
        if !Path::new("/usr/sbin/sshd").exists() {
            bail!(
                "no /usr/sbin/sshd on this machine: install Debian's openssh-server (`apt-get install -y openssh-server`)"
            );
        }
        let keys = tempfile::tempdir()?;
        let host_key = keys.path().join("ssh_host_ed25519_key");
        let client_key = keys.path().join("id_ed25519");
        keygen(&host_key)?;
        keygen(&client_key)?;
        let host_key_fingerprint = fingerprint(&host_key.with_extension("pub"))?;
        let host_pub = std::fs::read_to_string(keys.path().join("ssh_host_ed25519_key.pub"))?;
        let host_public_key = host_pub
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let client_pub = std::fs::read_to_string(keys.path().join("id_ed25519.pub"))?;
        let marker = unique_name("inside-the-ssh-box");
        let password = unique_name("pw");
        // busybox's mkpasswd: a SHA-512 crypt hash for /etc/shadow.
        let hash = run(Command::new("/bin/busybox").args(["mkpasswd", "-m", "sha512", &password]))
            .context("busybox mkpasswd")?
            .trim()
            .to_string();
        let tag = format!("{}:latest", unique_name("muster-test-sshd"));
        let context = {
            let host_key = std::fs::read(&host_key)?;
            let muster_bin = muster_bin.to_path_buf();
            let marker = marker.clone();
            let shadow = format!("root:{hash}:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n");
            tokio::task::spawn_blocking(move || {
                build_context(
                    &host_key,
                    &host_pub,
                    &client_pub,
                    &muster_bin,
                    &marker,
                    &shadow,
                )
            })
            .await
            .context("assembling the sshd rootfs")??
        };
        crate::images::build_and_tag(docker, context, &tag).await?;
        Ok(SshdImage {
            tag,
            host_key_fingerprint,
            host_public_key,
            client_key,
            marker,
            password,
            _keys: keys,
        })
    }
}

impl Drop for SshdImage {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new("docker").args(["rmi", "-f", &self.tag]),
            Duration::from_secs(60),
        );
    }
}

/// The build context: the Dockerfile and `rootfs/`.
fn build_context(
    host_key: &[u8],
    host_pub: &str,
    client_pub: &str,
    muster_bin: &Path,
    marker: &str,
    shadow: &str,
) -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").context(
        "cannot read /bin/busybox: install Debian's busybox-static (a statically linked busybox)",
    )?;
    // sshd, the helpers newer OpenSSH releases exec (sshd-session, sshd-auth), their
    // libraries, and the muster binary's.
    let mut programs = vec![PathBuf::from("/usr/sbin/sshd")];
    for helper in ["sshd-session", "sshd-auth"] {
        let p = Path::new("/usr/lib/openssh").join(helper);
        if p.exists() {
            programs.push(p);
        }
    }
    let mut files: BTreeSet<PathBuf> = programs.iter().cloned().collect();
    for p in programs.iter().map(PathBuf::as_path).chain([muster_bin]) {
        if is_elf(p) {
            let libs = ldd(p)
                .with_context(|| format!("{} needs a library this host lacks", p.display()))?;
            files.extend(libs);
        }
    }
    // The muster binary itself is not in the image: attach copies it.
    files.remove(muster_bin);

    let mut root = Rootfs::new();
    for dir in ["/tmp", "/root", "/root/.ssh", "/run/sshd", "/var/empty"] {
        let mode = match dir {
            "/tmp" => 0o1777,
            "/root" | "/root/.ssh" => 0o700,
            _ => 0o755,
        };
        root.dir(Path::new(dir), mode)?;
    }
    for path in &files {
        // Symbolic links are followed: the image gets the content at every listed path.
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mode = if is_elf(path) { 0o755 } else { 0o644 };
        root.file(path, mode, &data)?;
    }
    let passwd: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n\
        sshd:x:100:65534::/run/sshd:/bin/false\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    let files: [(&str, u32, &[u8]); 9] = [
        ("/etc/shadow", 0o600, shadow.as_bytes()),
        ("/bin/busybox", 0o755, &busybox),
        ("/etc/passwd", 0o644, passwd),
        ("/etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n"),
        ("/etc/ssh/sshd_config", 0o644, SSHD_CONFIG.as_bytes()),
        ("/etc/ssh/ssh_host_ed25519_key", 0o600, host_key),
        (
            "/etc/ssh/ssh_host_ed25519_key.pub",
            0o644,
            host_pub.as_bytes(),
        ),
        ("/root/.ssh/authorized_keys", 0o600, client_pub.as_bytes()),
        (MARKER_PATH, 0o644, marker.as_bytes()),
    ];
    for (path, mode, data) in files {
        root.file(Path::new(path), mode, data)?;
    }
    root.finish()
}

/// A build context being written: `rootfs/` (each folder once) and the Dockerfile.
struct Rootfs {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<PathBuf>,
}

impl Rootfs {
    fn new() -> Rootfs {
        Rootfs {
            tar: tar::Builder::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }

    /// `dir` (mode `mode`) and the folders above it that are not there yet (0755).
    fn dir(&mut self, dir: &Path, mode: u32) -> std::io::Result<()> {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d {
            if p == Path::new("/") || self.dirs.contains(p) {
                break;
            }
            missing.push(p.to_path_buf());
            d = p.parent();
        }
        for p in missing.into_iter().rev() {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(if p == dir { mode } else { 0o755 });
            header.set_size(0);
            header.set_cksum();
            self.tar.append_data(
                &mut header,
                format!("rootfs{}/", p.display()),
                std::io::empty(),
            )?;
            self.dirs.insert(p);
        }
        Ok(())
    }

    /// The file `path` with `data`, owned by root.
    fn file(&mut self, path: &Path, mode: u32, data: &[u8]) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            self.dir(parent, 0o755)?;
        }
        self.entry(&format!("rootfs{}", path.display()), mode, data)
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        self.tar.append_data(&mut header, name, data)
    }

    /// The Dockerfile, and the tar's bytes.
    fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        self.entry("Dockerfile", 0o644, DOCKERFILE.as_bytes())?;
        Ok(self.tar.into_inner()?)
    }
}
