//! An SSH client for `muster compute attach` and `detach`: connect, check the host key,
//! log in, run commands (with standard input), nothing else.
//!
//! Crate choice: `russh` (pure Rust, maintained, async on tokio) with its `ring` crypto
//! backend, the one rustls uses in this workspace (not its default aws-lc-rs, which would
//! need a C toolchain and cmake), and `rsa` so RSA user and host keys work.
//!
//! Host keys are checked before any credential is sent, in this order
//! ([`decide_host_key`]): a `--host-key SHA256:…` pin the key does not match is refused; a
//! key that differs from the one `known_hosts` records for the host is refused (as
//! OpenSSH does: someone may be in the middle); a recorded key is accepted; an unknown
//! one is accepted only if the pin matches it, or the user says yes on a terminal (it is
//! then added to `known_hosts`). Passwords and keys are read for the connection and kept
//! nowhere.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use muster_core::attach::SshTarget;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect, client};

/// How to log in.
#[derive(Clone)]
pub enum SshAuth {
    /// A private key file (OpenSSH or PEM; without a passphrase).
    Key(PathBuf),
    /// A password (read from standard input, never stored).
    Password(String),
}

impl std::fmt::Debug for SshAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SshAuth::Key(p) => write!(f, "Key({})", p.display()),
            SshAuth::Password(_) => f.write_str("Password(<hidden>)"),
        }
    }
}

/// Which host keys to trust.
#[derive(Debug, Clone)]
pub struct HostKeyPolicy {
    /// The `known_hosts` file (`--known-hosts`, default `~/.ssh/known_hosts`).
    pub known_hosts: PathBuf,
    /// `--host-key SHA256:…`: the fingerprint the host's key must have.
    pub pinned: Option<String>,
    /// Whether an unknown key may be confirmed on the terminal.
    pub may_ask: bool,
}

impl HostKeyPolicy {
    /// The policy of `--known-hosts` / `--host-key`; asking only when standard input and
    /// standard error are terminals and standard input is not the password.
    pub fn new(
        known_hosts: Option<PathBuf>,
        pinned: Option<String>,
        password_on_stdin: bool,
    ) -> anyhow::Result<HostKeyPolicy> {
        let known_hosts = match known_hosts {
            Some(p) => p,
            None => std::env::home_dir()
                .map(|h| h.join(".ssh").join("known_hosts"))
                .context(
                    "no home directory to find ~/.ssh/known_hosts in: give --known-hosts FILE",
                )?,
        };
        if let Some(p) = &pinned {
            anyhow::ensure!(
                p.starts_with("SHA256:") && p.len() > "SHA256:".len(),
                "--host-key {p:?}: give the key's SHA-256 fingerprint as SHA256:… (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the machine prints it)"
            );
        }
        Ok(HostKeyPolicy {
            known_hosts,
            pinned,
            may_ask: !password_on_stdin
                && std::io::stdin().is_terminal()
                && std::io::stderr().is_terminal(),
        })
    }
}

/// What `known_hosts` says of a host's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownHosts {
    /// It records this key.
    Matches,
    /// It records another key of the same type, at this line.
    Differs {
        /// 1-based line of the recorded key.
        line: usize,
    },
    /// It records no key of this type for the host.
    Unknown,
}

/// The decision on a host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyDecision {
    /// Trusted: recorded in known_hosts or pinned.
    Trust,
    /// Unknown and not pinned: ask the user (if a terminal is there), else refuse.
    Ask,
    /// Refused, with the message saying why and what to do.
    Refuse(String),
}

/// Decides on the host key with `fingerprint` (`SHA256:…`) of `host`.
pub fn decide_host_key(
    host: &str,
    fingerprint: &str,
    known: &KnownHosts,
    known_hosts: &Path,
    pinned: Option<&str>,
) -> HostKeyDecision {
    if let Some(pin) = pinned
        && pin != fingerprint
    {
        return HostKeyDecision::Refuse(format!(
            "the host key of {host} is {fingerprint}, not the {pin} that --host-key names: nothing was changed on {host}. Check the fingerprint on the machine (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`); if it is not {fingerprint}, someone may be in the middle"
        ));
    }
    match known {
        KnownHosts::Differs { line } => HostKeyDecision::Refuse(format!(
            "the host key of {host} ({fingerprint}) differs from the one {} records at line {line}: someone may be in the middle, or the machine was reinstalled. If you know it was, remove the old key (`ssh-keygen -R {host} -f {}`) and attach again",
            known_hosts.display(),
            known_hosts.display()
        )),
        KnownHosts::Matches => HostKeyDecision::Trust,
        KnownHosts::Unknown if pinned.is_some() => HostKeyDecision::Trust,
        KnownHosts::Unknown => HostKeyDecision::Ask,
    }
}

/// The outcome of the host key check, kept for the error after a refused connection.
#[derive(Debug, Default)]
struct Checked {
    refusal: Option<String>,
}

#[derive(Debug)]
struct Checker {
    target: SshTarget,
    policy: HostKeyPolicy,
    checked: Arc<Mutex<Checked>>,
}

impl Checker {
    fn refuse(&self, why: String) -> bool {
        self.checked.lock().expect("host key lock").refusal = Some(why);
        false
    }

    async fn check(&self, key: &PublicKey) -> bool {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let host = &self.target.host;
        let known = match russh::keys::check_known_hosts_path(
            host,
            self.target.port,
            key,
            &self.policy.known_hosts,
        ) {
            Ok(true) => KnownHosts::Matches,
            Ok(false) => KnownHosts::Unknown,
            Err(russh::keys::Error::KeyChanged { line }) => KnownHosts::Differs { line },
            Err(e) => {
                return self.refuse(format!(
                    "cannot read {}: {e}: fix or move the file, or give another with --known-hosts FILE",
                    self.policy.known_hosts.display()
                ));
            }
        };
        match decide_host_key(
            host,
            &fingerprint,
            &known,
            &self.policy.known_hosts,
            self.policy.pinned.as_deref(),
        ) {
            HostKeyDecision::Trust => true,
            HostKeyDecision::Refuse(why) => self.refuse(why),
            HostKeyDecision::Ask if !self.policy.may_ask => self.refuse(format!(
                "the host key of {host} is not in {}: its fingerprint is {fingerprint}. Check it on the machine (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), then attach again with --host-key {fingerprint}",
                self.policy.known_hosts.display()
            )),
            HostKeyDecision::Ask => {
                let question = format!(
                    "The host key of {host} is not known ({}).\n{} key fingerprint is {fingerprint}.\nTrust it and add it to {}? [y/N] ",
                    self.policy.known_hosts.display(),
                    key.algorithm(),
                    self.policy.known_hosts.display()
                );
                let yes = tokio::task::spawn_blocking(move || {
                    eprint!("{question}");
                    let mut answer = String::new();
                    std::io::stdin().read_line(&mut answer).is_ok()
                        && matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes")
                })
                .await
                .unwrap_or(false);
                if !yes {
                    return self.refuse(format!(
                        "the host key of {host} ({fingerprint}) was not trusted: nothing was changed"
                    ));
                }
                if let Some(dir) = self.policy.known_hosts.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                if let Err(e) = russh::keys::known_hosts::learn_known_hosts_path(
                    host,
                    self.target.port,
                    key,
                    &self.policy.known_hosts,
                ) {
                    eprintln!(
                        "warning: could not add the key to {}: {e}",
                        self.policy.known_hosts.display()
                    );
                }
                true
            }
        }
    }
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.check(key).await,
            PublicKeyOrCertificate::Certificate(cert) => {
                // Host certificates are not checked against a CA here: the key they
                // certify is checked as a plain host key.
                let key = PublicKey::from(cert.public_key().clone());
                self.check(&key).await
            }
        })
    }
}

/// What a remote command did.
#[derive(Debug, Clone)]
pub struct Ran {
    /// Its exit status (`None`: it was killed by a signal or gave none).
    pub code: Option<u32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Ran {
    /// Whether it exited 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Standard error, or else standard output, trimmed (for an error message).
    pub fn why(&self) -> String {
        let e = self.stderr.trim();
        if e.is_empty() {
            self.stdout.trim().to_string()
        } else {
            e.to_string()
        }
    }
}

/// A logged-in SSH session.
pub struct Session {
    handle: client::Handle<Checker>,
    target: SshTarget,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({})", self.target)
    }
}

/// What one login presents: the key read from its file, or the password.
enum Login<'a> {
    Key(Arc<russh::keys::PrivateKey>),
    Password(&'a str),
}

/// How long connecting and logging in may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl Session {
    /// Connects to `target`, checks its host key under `policy`, and logs in with `auth`.
    pub async fn connect(
        target: &SshTarget,
        auth: &SshAuth,
        policy: HostKeyPolicy,
    ) -> anyhow::Result<Session> {
        // Read the key first: a bad key file is the user's to fix before any connection.
        let login = match auth {
            SshAuth::Key(path) => Login::Key(Arc::new(load_key(path)?)),
            SshAuth::Password(pw) => Login::Password(pw),
        };
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..Default::default()
        });
        let checked = Arc::new(Mutex::new(Checked::default()));
        let checker = Checker {
            target: target.clone(),
            policy,
            checked: checked.clone(),
        };
        let addr = (target.host.clone(), target.port);
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, client::connect(config, addr, checker))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "connecting to {target} over SSH: no answer within {} s: check the address and that sshd listens on port {}",
                    CONNECT_TIMEOUT.as_secs(),
                    target.port
                )
            })?;
        let mut handle = match connected {
            Ok(h) => h,
            Err(e) => {
                if let Some(why) = checked.lock().expect("host key lock").refusal.take() {
                    bail!("refused to log in to {target}: {why}");
                }
                bail!(
                    "connecting to {target} over SSH failed: {e}: check the address, the port and that sshd runs there"
                );
            }
        };
        let user = target.user.clone();
        let result = tokio::time::timeout(CONNECT_TIMEOUT, async {
            match login {
                Login::Key(key) => {
                    let hash = handle.best_supported_rsa_hash().await?.flatten();
                    handle
                        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
                        .await
                }
                Login::Password(pw) => handle.authenticate_password(user, pw).await,
            }
        })
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "logging in to {target}: no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )
        })?
        .with_context(|| format!("logging in to {target}"))?;
        if !result.success() {
            let how = match auth {
                SshAuth::Key(p) => format!(
                    "the key {} (is its public key in ~{}/.ssh/authorized_keys there?)",
                    p.display(),
                    target.user
                ),
                SshAuth::Password(_) => "the password".to_string(),
            };
            bail!("{target} did not accept {how}: check the user name and the credential");
        }
        Ok(Session {
            handle,
            target: target.clone(),
        })
    }

    /// The machine this session is logged in to.
    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Runs `command` with `stdin` as its standard input (then end of file) and collects
    /// its output, within `limit`.
    pub async fn exec(&self, command: &str, stdin: &[u8], limit: Duration) -> anyhow::Result<Ran> {
        self.exec_reader(command, stdin, limit).await
    }

    /// Runs `command` with the contents of `file` as its standard input.
    pub async fn exec_with_file(
        &self,
        command: &str,
        file: &Path,
        limit: Duration,
    ) -> anyhow::Result<Ran> {
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("opening {}", file.display()))?;
        self.exec_reader(command, tokio::io::BufReader::new(f), limit)
            .await
    }

    async fn exec_reader<R: tokio::io::AsyncRead + Unpin>(
        &self,
        command: &str,
        stdin: R,
        limit: Duration,
    ) -> anyhow::Result<Ran> {
        let target = &self.target;
        let run = async {
            let mut channel = self
                .handle
                .channel_open_session()
                .await
                .with_context(|| format!("opening an SSH channel to {target}"))?;
            channel
                .exec(true, posix_command(command))
                .await
                .with_context(|| format!("starting a command on {target}"))?;
            channel
                .data(stdin)
                .await
                .with_context(|| format!("sending input to {target}"))?;
            channel.eof().await.ok();
            let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } => out.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, .. } => err.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            anyhow::Ok(Ran {
                code,
                stdout: String::from_utf8_lossy(&out).into_owned(),
                stderr: String::from_utf8_lossy(&err).into_owned(),
            })
        };
        tokio::time::timeout(limit, run).await.map_err(|_| {
            anyhow::anyhow!(
                "a command on {target} did not finish within {} s",
                limit.as_secs()
            )
        })?
    }

    /// Runs `command` and fails, saying `what` failed, unless it exits 0.
    pub async fn run_ok(
        &self,
        what: &str,
        command: &str,
        stdin: &[u8],
        limit: Duration,
    ) -> anyhow::Result<Ran> {
        let ran = self.exec(command, stdin, limit).await?;
        if !ran.ok() {
            bail!(
                "{what} on {} failed (exit {}): {}",
                self.target,
                ran.code.map_or("none".to_string(), |c| c.to_string()),
                ran.why()
            );
        }
        Ok(ran)
    }

    /// Says goodbye.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// `command` for whatever login shell the remote user has (bash, zsh, fish, csh…): sshd
/// hands it to that shell, so it is run as one quoted word by `/bin/sh`, whose syntax
/// every command here is written in.
fn posix_command(command: &str) -> String {
    format!(
        "exec /bin/sh -c {}",
        muster_core::attach::shell_quote(command)
    )
}

fn load_key(path: &Path) -> anyhow::Result<russh::keys::PrivateKey> {
    match russh::keys::load_secret_key(path, None) {
        Ok(k) => Ok(k),
        Err(russh::keys::Error::KeyIsEncrypted) => bail!(
            "--key {}: the key has a passphrase, which muster cannot ask for: use a key without one, or --password-stdin",
            path.display()
        ),
        Err(e) => bail!(
            "--key {}: cannot read the private key: {e}: give an OpenSSH or PEM private key file",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "SHA256:abc";

    fn decide(known: KnownHosts, pin: Option<&str>) -> HostKeyDecision {
        decide_host_key("box", FP, &known, Path::new("/k"), pin)
    }

    #[test]
    fn a_recorded_key_is_trusted_and_a_changed_one_refused() {
        assert_eq!(decide(KnownHosts::Matches, None), HostKeyDecision::Trust);
        let HostKeyDecision::Refuse(why) = decide(KnownHosts::Differs { line: 3 }, None) else {
            panic!("a changed key was not refused");
        };
        assert!(
            why.contains("line 3") && why.contains("ssh-keygen -R box"),
            "{why}"
        );
        // A pin does not override a changed known_hosts entry.
        assert!(matches!(
            decide(KnownHosts::Differs { line: 3 }, Some(FP)),
            HostKeyDecision::Refuse(_)
        ));
    }

    #[test]
    fn an_unknown_key_needs_the_pin_or_a_yes() {
        assert_eq!(decide(KnownHosts::Unknown, None), HostKeyDecision::Ask);
        assert_eq!(
            decide(KnownHosts::Unknown, Some(FP)),
            HostKeyDecision::Trust
        );
        let HostKeyDecision::Refuse(why) = decide(KnownHosts::Unknown, Some("SHA256:other")) else {
            panic!("a wrong pin was accepted");
        };
        assert!(why.contains(FP) && why.contains("SHA256:other"), "{why}");
        // A wrong pin is refused even for a recorded key.
        assert!(matches!(
            decide(KnownHosts::Matches, Some("SHA256:other")),
            HostKeyDecision::Refuse(_)
        ));
    }

    #[test]
    fn a_host_key_pin_must_look_like_a_fingerprint() {
        let p = HostKeyPolicy::new(Some("/k".into()), Some("abc".into()), true);
        assert!(p.unwrap_err().to_string().contains("SHA256:"));
        let p = HostKeyPolicy::new(Some("/k".into()), Some(FP.into()), true).unwrap();
        assert!(!p.may_ask);
    }

    #[test]
    fn remote_commands_run_under_sh_whatever_the_login_shell() {
        assert_eq!(
            posix_command("echo 'a' \"$HOME\""),
            "exec /bin/sh -c 'echo '\\''a'\\'' \"$HOME\"'"
        );
    }

    #[test]
    fn passwords_do_not_show_in_debug_output() {
        let s = format!("{:?}", SshAuth::Password("hunter2".into()));
        assert!(!s.contains("hunter2"));
    }
}
