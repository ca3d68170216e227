//! Attaching a machine over SSH (`muster compute attach NAME --ssh USER@HOST[:PORT]`): the
//! pure half. This module owns what the CLI decides before and while it talks to the remote
//! machine, and does no I/O itself:
//!
//! - [`SshTarget`]: `USER@HOST[:PORT]` parsed and checked, so that neither part can carry
//!   shell syntax or an ssh option into a remote command line;
//! - [`parse_vm_yaml`]: Azure ML's `type: virtualmachine` compute YAML as [`AttachFile`]
//!   (with muster's `address:` instead of Azure's `resource_id`, and no password in files);
//! - [`RemoteLayout`]: where the agent's files go on the machine, and every remote command
//!   line and script text the CLI sends ([`RemoteLayout::launcher_script`],
//!   [`RemoteLayout::supervisor_script`], [`RemoteLayout::systemd_unit`], ...), each value
//!   quoted with [`shell_quote`];
//! - [`MusterVersion`] and [`needs_upload`]: whether the machine's `muster` must be
//!   replaced by the running one.
//!
//! The SSH session and the RPCs are in `muster-cli` (`commands/attach.rs`, `ssh.rs`).

use std::fmt;

use serde::Deserialize;

use crate::names::{validate_compute_name, validate_node_name};
use crate::spec::{SpecError, parse_yaml};

/// The label an attached node carries with the SSH address it was attached through
/// (`user@host:port`, never a secret), so `muster compute detach` finds the machine again.
pub const SSH_LABEL: &str = "muster.ssh";

/// The default SSH port.
pub const DEFAULT_SSH_PORT: u16 = 22;

/// Where an SSH connection goes: `USER@HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The remote login name.
    pub user: String,
    /// A host name, an IPv4 address or an IPv6 address (without brackets).
    pub host: String,
    /// The TCP port (22 unless given).
    pub port: u16,
}

/// Why an SSH address or the attach YAML was refused; the message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AttachError(pub String);

fn err(msg: impl Into<String>) -> AttachError {
    AttachError(msg.into())
}

impl SshTarget {
    /// Parses `USER@HOST`, `USER@HOST:PORT`, `USER@[IPV6]` or `USER@[IPV6]:PORT`.
    pub fn parse(text: &str) -> Result<SshTarget, AttachError> {
        let text = text.trim();
        let (user, rest) = text.split_once('@').ok_or_else(|| {
            err(format!(
                "--ssh {text:?}: give USER@HOST or USER@HOST:PORT (e.g. azureuser@10.0.0.5:22)"
            ))
        })?;
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (host, after) = inner.split_once(']').ok_or_else(|| {
                err(format!(
                    "--ssh {text:?}: an IPv6 address in brackets needs its closing ']'"
                ))
            })?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| {
                    err(format!("--ssh {text:?}: write the port after ']' as :PORT"))
                })?),
            };
            (host, port)
        } else if rest.matches(':').count() > 1 {
            return Err(err(format!(
                "--ssh {text:?}: write an IPv6 address in brackets: USER@[ADDR]:PORT"
            )));
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        let port = match port {
            None => DEFAULT_SSH_PORT,
            Some(p) => parse_port(p).map_err(|e| err(format!("--ssh {text:?}: {e}")))?,
        };
        let target = SshTarget {
            user: user.to_string(),
            host: host.to_string(),
            port,
        };
        target.validate()?;
        Ok(target)
    }

    /// Checks the user and host: a POSIX login name, and a host name or IP address. Neither
    /// can start with `-` or hold a space, a quote or any other shell character.
    pub fn validate(&self) -> Result<(), AttachError> {
        validate_user(&self.user)?;
        validate_host(&self.host)?;
        if self.port == 0 {
            return Err(err("SSH port 0 is not a port: give 1 to 65535"));
        }
        Ok(())
    }
}

impl fmt::Display for SshTarget {
    /// `user@host:port` (`user@[v6]:port` for IPv6), the form [`SshTarget::parse`] reads
    /// and the [`SSH_LABEL`] holds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("port {p:?} is not a port: give 1 to 65535")),
        Ok(n) => Ok(n),
    }
}

/// A remote login name: 1–32 letters, digits, `_`, `-` and `.`, starting with a letter or
/// `_` (what `useradd` accepts).
pub fn validate_user(user: &str) -> Result<(), AttachError> {
    let ok = (1..=32).contains(&user.len())
        && user
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(err(format!(
            "SSH user {user:?} is not a login name: use 1 to 32 letters, digits, '_', '-' and '.', starting with a letter or '_'"
        )))
    }
}

/// A host: a DNS name (letters, digits, `-`, `.`, `_`), an IPv4 address or an IPv6
/// address (hex digits, `:` and `.`); never starting with `-`.
pub fn validate_host(host: &str) -> Result<(), AttachError> {
    let ipv6 = host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_ok() && host.len() <= 45;
    let name = (1..=253).contains(&host.len())
        && host
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ipv6 || name {
        Ok(())
    } else {
        Err(err(format!(
            "SSH host {host:?} is not a host name or IP address: use letters, digits, '-' and '.', or an IP address"
        )))
    }
}

/// `s` as one word of a POSIX shell command line: in single quotes, each `'` written as
/// `'\''`. Every value the CLI puts into a remote command goes through this.
pub fn shell_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Azure ML's `type: virtualmachine` compute YAML as read for `muster compute attach -f`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachFile {
    /// The compute target (`name`).
    pub name: String,
    /// `admin_username@address:ssh_port`.
    pub target: SshTarget,
    /// `ssh_settings.ssh_private_key_file` as written (the CLI resolves a relative path
    /// against the file's folder).
    pub key_file: Option<String>,
    /// `description`.
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    #[serde(rename = "$schema")]
    _schema: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    /// muster: the machine's host name or IP address.
    address: Option<String>,
    resource_id: Option<String>,
    description: Option<String>,
    tags: Option<yaml_serde::Value>,
    ssh_settings: Option<VmSsh>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmSsh {
    admin_username: Option<String>,
    ssh_port: Option<u32>,
    ssh_private_key_file: Option<String>,
    admin_password: Option<yaml_serde::Value>,
}

/// Parses a `type: virtualmachine` compute YAML. `name_override` (the CLI's positional
/// NAME) wins over the file's `name`.
///
/// Refused: a `resource_id` (an Azure VM id cannot be resolved on-prem: give `address:`),
/// and `ssh_settings.admin_password` (passwords are never kept in files: pipe it to
/// `--password-stdin`).
pub fn parse_vm_yaml(text: &str, name_override: Option<&str>) -> Result<AttachFile, SpecError> {
    let file: VmFile = parse_yaml(text)?;
    let _ = &file.tags;
    match file.kind.as_deref() {
        Some(k) if k.eq_ignore_ascii_case("virtualmachine") => {}
        Some(k) => {
            return Err(SpecError::field(
                "type",
                format!(
                    "{k:?}: `muster compute attach -f` reads `type: virtualmachine` files (create other targets with `muster compute create -f`)"
                ),
            ));
        }
        None => {
            return Err(SpecError::field(
                "type",
                "missing: write `type: virtualmachine`",
            ));
        }
    }
    let name = name_override
        .map(str::to_string)
        .or(file.name)
        .ok_or_else(|| SpecError::field("name", "missing: give the compute target a name"))?;
    validate_compute_name(&name).map_err(|e| SpecError::field("name", e.to_string()))?;
    if file.resource_id.is_some() {
        return Err(SpecError::field(
            "resource_id",
            "an Azure resource id cannot be resolved on-prem: remove it and give the machine's host name or IP address as `address: HOST`",
        ));
    }
    let address = file.address.ok_or_else(|| {
        SpecError::field(
            "address",
            "missing: give the machine's host name or IP address as `address: HOST` (muster's key; Azure's resource_id cannot be resolved on-prem)",
        )
    })?;
    let ssh = file.ssh_settings.ok_or_else(|| {
        SpecError::field(
            "ssh_settings",
            "missing: give ssh_settings.admin_username (and ssh_port, ssh_private_key_file)",
        )
    })?;
    if ssh.admin_password.is_some() {
        return Err(SpecError::field(
            "ssh_settings.admin_password",
            "passwords are never kept in files: remove it and pipe the password to `muster compute attach -f FILE --password-stdin`",
        ));
    }
    let user = ssh.admin_username.ok_or_else(|| {
        SpecError::field(
            "ssh_settings.admin_username",
            "missing: give the login name",
        )
    })?;
    let port = match ssh.ssh_port {
        None => DEFAULT_SSH_PORT,
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| SpecError::field("ssh_settings.ssh_port", "give 1 to 65535"))?,
    };
    validate_user(&user)
        .map_err(|e| SpecError::field("ssh_settings.admin_username", e.to_string()))?;
    validate_host(&address).map_err(|e| SpecError::field("address", e.to_string()))?;
    Ok(AttachFile {
        name,
        target: SshTarget {
            user,
            host: address,
            port,
        },
        key_file: ssh.ssh_private_key_file,
        description: file.description,
    })
}

/// A `muster --version` line's version (`muster 0.1.0`, `muster 1.2.3-rc.1`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MusterVersion {
    /// Major, minor, patch.
    pub numbers: (u64, u64, u64),
    /// Whether it is a release (no `-pre` suffix): a release sorts after its pre-releases.
    pub release: bool,
    /// The pre-release suffix (empty for a release).
    pub pre: String,
}

impl MusterVersion {
    /// Reads the output of `muster --version`; `None` if it is not `muster X.Y.Z[-PRE]`.
    pub fn parse(output: &str) -> Option<MusterVersion> {
        let line = output.lines().next()?.trim();
        let v = line.strip_prefix("muster ")?.trim();
        let (core, pre) = match v.split_once('-') {
            Some((c, p)) => (c, p.split('+').next().unwrap_or("")),
            None => (v.split('+').next().unwrap_or(v), ""),
        };
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let numbers = (parts.next()??, parts.next()??, parts.next()??);
        if parts.next().is_some() {
            return None;
        }
        Some(MusterVersion {
            numbers,
            release: pre.is_empty(),
            pre: pre.to_string(),
        })
    }
}

/// Whether the remote `muster` must be replaced by the local one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upload {
    /// The remote one is missing, does not run, or is older: copy the local one.
    Copy,
    /// The remote one is as new: keep it.
    Keep,
    /// The remote one is newer than the running CLI: keep it (the agent of a newer
    /// release speaks to this server as well), and say so.
    KeepNewer,
}

/// Decides [`Upload`] from the local `muster --version` line and the remote one's (`None`:
/// missing or it did not run).
pub fn needs_upload(local: &str, remote: Option<&str>) -> Upload {
    let (Some(local), Some(remote)) = (
        MusterVersion::parse(local),
        remote.and_then(MusterVersion::parse),
    ) else {
        return Upload::Copy;
    };
    match remote.cmp(&local) {
        std::cmp::Ordering::Less => Upload::Copy,
        std::cmp::Ordering::Equal => Upload::Keep,
        std::cmp::Ordering::Greater => Upload::KeepNewer,
    }
}

/// How the agent is kept running on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    /// A systemd system unit (the remote user is root and systemd runs the machine).
    Systemd,
    /// A shell supervisor loop started with `setsid` (or `nohup`), with a pid file.
    Supervisor,
}

impl ServiceKind {
    /// `systemd` or `supervisor`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Systemd => "systemd",
            ServiceKind::Supervisor => "supervisor",
        }
    }
}

/// What the agent is started with (every value is quoted where it is used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLaunch {
    /// The server(s) the agent dials, comma-separated URLs.
    pub server: String,
    /// The compute target it joins.
    pub compute: String,
    /// The node's name.
    pub node: String,
    /// The [`SSH_LABEL`] value.
    pub ssh: String,
    /// The address peers of a distributed run reach the node at.
    pub advertise_addr: String,
    /// The cluster CA's `SHA256:…` fingerprint, when the server speaks TLS.
    pub ca_fingerprint: Option<String>,
}

/// Where an attachment's files live on the machine, under the remote user's home:
///
/// - `~/.local/bin/muster`: the binary (shared by the machine's attachments);
/// - `~/.local/share/muster/attach/COMPUTE/`: `run.sh` (starts the agent), `supervise.sh`
///   and `supervisor.pid` (without systemd), `agent.log`, `join-token` (0600, until the
///   agent has joined) and `agent/` (the agent's data dir: its credential, cache, runs);
/// - `/etc/systemd/system/muster-agent-COMPUTE.service` (with systemd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayout {
    /// The remote user's home directory (absolute).
    pub home: String,
    /// The compute target.
    pub compute: String,
}

impl RemoteLayout {
    /// The layout for `compute` under `home`, which must be an absolute path of plain
    /// characters (it is written into a unit file and scripts).
    pub fn new(home: &str, compute: &str) -> Result<RemoteLayout, AttachError> {
        let home = home.trim_end_matches('/');
        let plain = home.starts_with('/')
            && home
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.'))
            && !home.split('/').any(|p| p == "..");
        if !plain {
            return Err(err(format!(
                "the remote home directory {home:?} is not a plain absolute path (letters, digits, '/', '_', '-', '.'): attach as a user whose home is"
            )));
        }
        validate_compute_name(compute).map_err(|e| err(e.to_string()))?;
        Ok(RemoteLayout {
            home: if home.is_empty() {
                "/".into()
            } else {
                home.into()
            },
            compute: compute.to_string(),
        })
    }

    /// `~/.local/bin`.
    pub fn bin_dir(&self) -> String {
        format!("{}/.local/bin", self.home)
    }

    /// `~/.local/bin/muster`.
    pub fn binary(&self) -> String {
        format!("{}/muster", self.bin_dir())
    }

    /// `~/.local/share/muster/attach`: one folder per attached compute target.
    pub fn attach_root(&self) -> String {
        format!("{}/.local/share/muster/attach", self.home)
    }

    /// `~/.local/share/muster/attach/COMPUTE`.
    pub fn dir(&self) -> String {
        format!("{}/{}", self.attach_root(), self.compute)
    }

    /// The agent's data dir.
    pub fn data_dir(&self) -> String {
        format!("{}/agent", self.dir())
    }

    /// The join token's file (0600), read once by `run.sh` and removed once joined.
    pub fn token_file(&self) -> String {
        format!("{}/join-token", self.dir())
    }

    /// `run.sh`.
    pub fn launcher(&self) -> String {
        format!("{}/run.sh", self.dir())
    }

    /// `supervise.sh`.
    pub fn supervisor(&self) -> String {
        format!("{}/supervise.sh", self.dir())
    }

    /// `supervisor.pid`.
    pub fn pid_file(&self) -> String {
        format!("{}/supervisor.pid", self.dir())
    }

    /// `agent.log`: the agent's (and supervisor's) output.
    pub fn log_file(&self) -> String {
        format!("{}/agent.log", self.dir())
    }

    /// The systemd unit's name.
    pub fn unit_name(&self) -> String {
        format!("muster-agent-{}.service", self.compute)
    }

    /// The systemd unit's path.
    pub fn unit_path(&self) -> String {
        format!("/etc/systemd/system/{}", self.unit_name())
    }

    /// A command that prints `$HOME` (run before the layout is known).
    pub const HOME_COMMAND: &'static str = "printf '%s\\n' \"$HOME\"";

    /// A command that prints `uname -sm`, the host name, and whether systemd can run the
    /// agent (`systemd` or `supervisor`), one per line.
    pub const PROBE_COMMAND: &'static str = "uname -sm; (hostname 2>/dev/null || uname -n); \
        if [ \"$(id -u)\" = 0 ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; \
        then echo systemd; else echo supervisor; fi";

    /// Prints the remote binary's `--version` (nothing if it is missing or does not run).
    pub fn version_command(&self) -> String {
        format!(
            "{} --version 2>/dev/null || true",
            shell_quote(&self.binary())
        )
    }

    /// Writes standard input to the binary's place atomically (a temporary file, made
    /// executable, then renamed over it).
    pub fn upload_command(&self) -> String {
        let tmp = format!("{}.tmp.$$", self.binary());
        format!(
            "set -e; umask 022; mkdir -p {bin}; t={tmp}; cat > \"$t\"; chmod 755 \"$t\"; mv -f \"$t\" {dst}",
            bin = shell_quote(&self.bin_dir()),
            tmp = shell_quote_keep_pid(&tmp),
            dst = shell_quote(&self.binary()),
        )
    }

    /// Makes the attachment's folder (0700) and writes standard input (the join token) to
    /// [`RemoteLayout::token_file`], 0600.
    pub fn token_command(&self) -> String {
        format!(
            "set -e; umask 077; mkdir -p {dir}; chmod 700 {dir}; cat > {tok}",
            dir = shell_quote(&self.dir()),
            tok = shell_quote(&self.token_file()),
        )
    }

    /// Writes standard input to `path` in the attachment's folder with `mode`.
    pub fn write_file_command(&self, path: &str, mode: u32) -> String {
        format!(
            "set -e; umask 077; mkdir -p {dir}; cat > {p}; chmod {mode:o} {p}",
            dir = shell_quote(&self.dir()),
            p = shell_quote(path),
        )
    }

    /// `run.sh`: reads the join token into the agent's environment while the agent has
    /// no credential yet (never into a command line), removes it once it has one, and
    /// runs the agent in the foreground.
    pub fn launcher_script(&self, launch: &AgentLaunch) -> String {
        let mut agent = vec![
            shell_quote(&self.binary()),
            "--server".into(),
            shell_quote(&launch.server),
            "agent".into(),
            "--compute".into(),
            shell_quote(&launch.compute),
            "--name".into(),
            shell_quote(&launch.node),
            "--data-dir".into(),
            shell_quote(&self.data_dir()),
            "--labels".into(),
            shell_quote(&format!("{SSH_LABEL}={}", launch.ssh)),
            "--advertise-addr".into(),
            shell_quote(&launch.advertise_addr),
        ];
        if let Some(fp) = &launch.ca_fingerprint {
            agent.push("--ca-fingerprint".into());
            agent.push(shell_quote(fp));
        }
        format!(
            "#!/bin/sh\n\
             # The muster agent of compute target {compute}, written by `muster compute attach`.\n\
             # `muster compute detach {compute} --node {node}` stops it and removes this folder.\n\
             d={dir}\n\
             tok={tok}\n\
             if [ -s \"$d/agent/credential\" ] || [ -d \"$d/agent/tls\" ]; then\n\
             \x20 rm -f \"$tok\"\n\
             elif [ -f \"$tok\" ]; then\n\
             \x20 MUSTER_JOIN_TOKEN=$(cat \"$tok\")\n\
             \x20 export MUSTER_JOIN_TOKEN\n\
             fi\n\
             exec {agent}\n",
            compute = launch.compute,
            node = launch.node,
            dir = shell_quote(&self.dir()),
            tok = shell_quote(&self.token_file()),
            agent = agent.join(" "),
        )
    }

    /// `supervise.sh`: runs `run.sh` again 2 s after it ends, until it gets SIGTERM, which
    /// it passes on to the agent; keeps its pid in [`RemoteLayout::pid_file`].
    pub fn supervisor_script(&self) -> String {
        format!(
            "#!/bin/sh\n\
             # Keeps the muster agent of compute target {compute} running (no systemd here).\n\
             pidfile={pid}\n\
             echo $$ > \"$pidfile\"\n\
             child=\n\
             trap '' HUP\n\
             trap 'if [ -n \"$child\" ]; then kill -TERM \"$child\" 2>/dev/null; wait \"$child\"; fi; rm -f \"$pidfile\"; exit 0' TERM INT\n\
             while :; do\n\
             \x20 /bin/sh {run} &\n\
             \x20 child=$!\n\
             \x20 wait \"$child\"\n\
             \x20 echo \"muster supervisor: the agent exited with status $?; restarting in 2 s\"\n\
             \x20 sleep 2\n\
             done\n",
            compute = self.compute,
            pid = shell_quote(&self.pid_file()),
            run = shell_quote(&self.launcher()),
        )
    }

    /// The systemd unit (no secret in it: the token is in the 0600 file `run.sh` removes).
    pub fn systemd_unit(&self) -> String {
        format!(
            "[Unit]\n\
             Description=muster agent of compute target {compute} (muster compute attach)\n\
             Wants=network-online.target\n\
             After=network-online.target\n\
             \n\
             [Service]\n\
             ExecStart=/bin/sh {run}\n\
             Restart=always\n\
             RestartSec=2\n\
             KillMode=mixed\n\
             TimeoutStopSec=30\n\
             StandardOutput=append:{log}\n\
             StandardError=append:{log}\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            compute = self.compute,
            run = self.launcher(),
            log = self.log_file(),
        )
    }

    /// Installs the written unit, enables and (re)starts it.
    pub fn systemd_start_command(&self) -> String {
        format!(
            "set -e; cp {src} {unit}; chmod 644 {unit}; systemctl daemon-reload; systemctl enable --quiet {name}; systemctl restart {name}",
            src = shell_quote(&format!("{}/unit", self.dir())),
            unit = shell_quote(&self.unit_path()),
            name = shell_quote(&self.unit_name()),
        )
    }

    /// Starts the supervisor detached from the SSH session (its own session with `setsid`, or
    /// `nohup` where there is no setsid; no terminal; output to the log), after stopping
    /// one that runs already.
    pub fn supervisor_start_command(&self) -> String {
        format!(
            "{stop}; cd {dir} || exit 1; \
             (if command -v setsid >/dev/null 2>&1; then exec setsid /bin/sh {sup}; else exec nohup /bin/sh {sup}; fi) </dev/null >>{log} 2>&1 &",
            stop = self.supervisor_stop_command(),
            dir = shell_quote(&self.dir()),
            sup = shell_quote(&self.supervisor()),
            log = shell_quote(&self.log_file()),
        )
    }

    /// Stops the supervisor (and so the agent) if its pid file names a live process,
    /// waiting up to 30 s for it to end; always exits 0.
    pub fn supervisor_stop_command(&self) -> String {
        format!(
            "p=$(cat {pid} 2>/dev/null || true); \
             case \"$p\" in ''|*[!0-9]*) ;; *) if kill -TERM \"$p\" 2>/dev/null; then \
             i=0; while kill -0 \"$p\" 2>/dev/null && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done; \
             kill -KILL \"$p\" 2>/dev/null || true; fi;; esac; true",
            pid = shell_quote(&self.pid_file()),
        )
    }

    /// Whether the supervisor runs: prints `running` or `stopped`.
    pub fn supervisor_status_command(&self) -> String {
        format!(
            "p=$(cat {pid} 2>/dev/null || true); case \"$p\" in ''|*[!0-9]*) echo stopped;; *) if kill -0 \"$p\" 2>/dev/null; then echo running; else echo stopped; fi;; esac",
            pid = shell_quote(&self.pid_file()),
        )
    }

    /// Removes the join token file (once the node has joined).
    pub fn remove_token_command(&self) -> String {
        format!("rm -f {}", shell_quote(&self.token_file()))
    }

    /// Stops the agent and removes everything attach installed for this compute target:
    /// the unit (with systemd), the supervisor, the attachment's folder, and the binary
    /// when no other attachment is left on the machine.
    pub fn uninstall_command(&self, kind: ServiceKind) -> String {
        let stop = match kind {
            ServiceKind::Systemd => format!(
                "systemctl disable --now {name} >/dev/null 2>&1 || true; rm -f {unit}; systemctl daemon-reload || true",
                name = shell_quote(&self.unit_name()),
                unit = shell_quote(&self.unit_path()),
            ),
            ServiceKind::Supervisor => self.supervisor_stop_command(),
        };
        format!(
            "{stop}; rm -rf {dir}; rmdir {root} 2>/dev/null && rm -f {bin}; true",
            dir = shell_quote(&self.dir()),
            root = shell_quote(&self.attach_root()),
            bin = shell_quote(&self.binary()),
        )
    }

    /// Prints how the agent was installed (`systemd`, `supervisor` or `none`).
    pub fn installed_kind_command(&self) -> String {
        format!(
            "if [ -f {unit} ]; then echo systemd; elif [ -d {dir} ]; then echo supervisor; else echo none; fi",
            unit = shell_quote(&self.unit_path()),
            dir = shell_quote(&self.dir()),
        )
    }

    /// The last lines of the agent's log (for an error message).
    pub fn log_tail_command(&self) -> String {
        format!(
            "tail -n 20 {} 2>/dev/null || true",
            shell_quote(&self.log_file())
        )
    }
}

/// [`shell_quote`] of a path ending in `$$`, with the `$$` left outside the quotes so the
/// remote shell puts its pid there.
fn shell_quote_keep_pid(path: &str) -> String {
    match path.strip_suffix("$$") {
        Some(stem) => format!("{}$$", shell_quote(stem)),
        None => shell_quote(path),
    }
}

/// The node name for a machine: `--node` if given, else its host name; either must be a
/// valid node name.
pub fn node_name(given: Option<&str>, hostname: &str) -> Result<String, AttachError> {
    let name = given.unwrap_or(hostname.trim());
    validate_node_name(name).map_err(|e| {
        err(if given.is_some() {
            format!("--node: {e}")
        } else {
            format!(
                "the machine's host name makes a bad node name ({e}): give one with --node NAME"
            )
        })
    })?;
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_targets_parse_with_and_without_port() {
        let t = SshTarget::parse("azureuser@10.0.0.5").unwrap();
        assert_eq!(
            t,
            SshTarget {
                user: "azureuser".into(),
                host: "10.0.0.5".into(),
                port: 22
            }
        );
        assert_eq!(t.to_string(), "azureuser@10.0.0.5:22");
        let t = SshTarget::parse("root@gpu-01.lab:2222").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("gpu-01.lab", 2222));
        let t = SshTarget::parse("me@[fd00::5]:2200").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("fd00::5", 2200));
        assert_eq!(t.to_string(), "me@[fd00::5]:2200");
        assert_eq!(SshTarget::parse(&t.to_string()).unwrap(), t);
        assert_eq!(SshTarget::parse("me@[::1]").unwrap().port, 22);
    }

    #[test]
    fn ssh_targets_refuse_shell_and_option_syntax() {
        for bad in [
            "host-only",
            "@host",
            "user@",
            "user@host:0",
            "user@host:99999",
            "user@host:x",
            "-oProxyCommand=x@host",
            "user@-oProxyCommand=x",
            "us er@host",
            "user@ho st",
            "u'ser@host",
            "user@host;reboot",
            "user@$(id)",
            "user@fd00::1",
            "user@[fd00::1",
            "user@[zz::1]:22",
            "user@[::1]22",
        ] {
            assert!(SshTarget::parse(bad).is_err(), "{bad} was accepted");
        }
        let e = SshTarget::parse("nohost").unwrap_err().to_string();
        assert!(e.contains("USER@HOST"), "{e}");
    }

    #[test]
    fn shell_quote_makes_one_inert_word() {
        assert_eq!(shell_quote("plain"), "'plain'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(
            shell_quote("$(rm -rf /) `x` \"y\""),
            "'$(rm -rf /) `x` \"y\"'"
        );
    }

    const VM: &str = "$schema: https://azuremlschemas.azureedge.net/latest/vmCompute.schema.json
name: gpu-vm
type: virtualmachine
address: 10.0.0.7
description: the lab box
ssh_settings:
  admin_username: azureuser
  ssh_port: 2222
  ssh_private_key_file: keys/id_ed25519
";

    #[test]
    fn virtualmachine_yaml_gives_attach_settings() {
        let f = parse_vm_yaml(VM, None).unwrap();
        assert_eq!(f.name, "gpu-vm");
        assert_eq!(f.target.to_string(), "azureuser@10.0.0.7:2222");
        assert_eq!(f.key_file.as_deref(), Some("keys/id_ed25519"));
        assert_eq!(f.description.as_deref(), Some("the lab box"));
        assert_eq!(parse_vm_yaml(VM, Some("other")).unwrap().name, "other");
        let default_port = VM.replace("  ssh_port: 2222\n", "");
        assert_eq!(parse_vm_yaml(&default_port, None).unwrap().target.port, 22);
    }

    #[test]
    fn virtualmachine_yaml_refusals_say_what_to_do() {
        let with_id = VM.replace(
            "address: 10.0.0.7\n",
            "resource_id: /subscriptions/x/resourceGroups/y/providers/Microsoft.Compute/virtualMachines/z\n",
        );
        let e = parse_vm_yaml(&with_id, None).unwrap_err();
        assert_eq!(e.path, "resource_id");
        assert!(e.message.contains("address:"), "{e}");
        let no_address = VM.replace("address: 10.0.0.7\n", "");
        let e = parse_vm_yaml(&no_address, None).unwrap_err();
        assert_eq!(e.path, "address");
        let with_password = format!("{VM}  admin_password: hunter2\n");
        let e = parse_vm_yaml(&with_password, None).unwrap_err();
        assert_eq!(e.path, "ssh_settings.admin_password");
        assert!(e.message.contains("--password-stdin"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let cluster = VM.replace("virtualmachine", "amlcompute");
        assert_eq!(parse_vm_yaml(&cluster, None).unwrap_err().path, "type");
        let bad_host = VM.replace("10.0.0.7", "'$(reboot)'");
        assert_eq!(parse_vm_yaml(&bad_host, None).unwrap_err().path, "address");
        let bad_port = VM.replace("2222", "70000");
        assert_eq!(
            parse_vm_yaml(&bad_port, None).unwrap_err().path,
            "ssh_settings.ssh_port"
        );
        let unknown = format!("{VM}  ssh_key: x\n");
        assert!(parse_vm_yaml(&unknown, None).is_err());
    }

    #[test]
    fn versions_compare_numerically_with_prereleases_first() {
        let v = |s| MusterVersion::parse(s).unwrap();
        assert!(v("muster 0.10.0") > v("muster 0.9.9"));
        assert!(v("muster 1.0.0") > v("muster 1.0.0-rc.1"));
        assert_eq!(v("muster 0.1.0\n").numbers, (0, 1, 0));
        assert_eq!(MusterVersion::parse("bash: muster: not found"), None);
        assert_eq!(MusterVersion::parse(""), None);
        assert_eq!(MusterVersion::parse("muster 1.2"), None);
        assert_eq!(needs_upload("muster 0.1.0", None), Upload::Copy);
        assert_eq!(
            needs_upload("muster 0.2.0", Some("muster 0.1.9")),
            Upload::Copy
        );
        assert_eq!(needs_upload("muster 0.2.0", Some("garbage")), Upload::Copy);
        assert_eq!(
            needs_upload("muster 0.2.0", Some("muster 0.2.0\n")),
            Upload::Keep
        );
        assert_eq!(
            needs_upload("muster 0.2.0", Some("muster 0.3.0")),
            Upload::KeepNewer
        );
    }

    fn layout() -> RemoteLayout {
        RemoteLayout::new("/home/azureuser/", "gpu-vm").unwrap()
    }

    fn launch() -> AgentLaunch {
        AgentLaunch {
            server: "https://10.0.0.1:7070".into(),
            compute: "gpu-vm".into(),
            node: "box-1".into(),
            ssh: "azureuser@10.0.0.7:22".into(),
            advertise_addr: "10.0.0.7".into(),
            ca_fingerprint: Some("SHA256:ab12".into()),
        }
    }

    #[test]
    fn layout_puts_everything_under_the_users_home() {
        let l = layout();
        assert_eq!(l.binary(), "/home/azureuser/.local/bin/muster");
        assert_eq!(l.dir(), "/home/azureuser/.local/share/muster/attach/gpu-vm");
        assert_eq!(
            l.unit_path(),
            "/etc/systemd/system/muster-agent-gpu-vm.service"
        );
        for bad in [
            "relative",
            "/home/a b",
            "/home/$(id)",
            "/home/x/../..",
            "/h'q",
        ] {
            assert!(RemoteLayout::new(bad, "gpu-vm").is_err(), "{bad}");
        }
        assert!(RemoteLayout::new("/root", "bad name").is_err());
    }

    #[test]
    fn launcher_passes_the_token_by_environment_only() {
        let s = layout().launcher_script(&launch());
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains(
            "exec '/home/azureuser/.local/bin/muster' --server 'https://10.0.0.1:7070' agent --compute 'gpu-vm' --name 'box-1' --data-dir '/home/azureuser/.local/share/muster/attach/gpu-vm/agent' --labels 'muster.ssh=azureuser@10.0.0.7:22' --advertise-addr '10.0.0.7' --ca-fingerprint 'SHA256:ab12'\n"
        ), "{s}");
        assert!(s.contains("MUSTER_JOIN_TOKEN=$(cat \"$tok\")"), "{s}");
        assert!(s.contains("rm -f \"$tok\""), "{s}");
        assert!(!s.contains("--join"), "{s}");
        let mut plain = launch();
        plain.ca_fingerprint = None;
        assert!(
            !layout()
                .launcher_script(&plain)
                .contains("--ca-fingerprint")
        );
    }

    #[test]
    fn supervisor_restarts_the_agent_and_passes_sigterm_on() {
        let s = layout().supervisor_script();
        assert!(s.contains(
            "pidfile='/home/azureuser/.local/share/muster/attach/gpu-vm/supervisor.pid'"
        ));
        assert!(s.contains("echo $$ > \"$pidfile\""));
        assert!(s.contains("trap 'if [ -n \"$child\" ]; then kill -TERM \"$child\""));
        assert!(s.contains("while :; do"));
        assert!(s.contains("/bin/sh '/home/azureuser/.local/share/muster/attach/gpu-vm/run.sh' &"));
        let start = layout().supervisor_start_command();
        assert!(start.contains("exec setsid /bin/sh '/home/azureuser/.local/share/muster/attach/gpu-vm/supervise.sh'; else exec nohup /bin/sh '/home/azureuser/.local/share/muster/attach/gpu-vm/supervise.sh'; fi) </dev/null >>'/home/azureuser/.local/share/muster/attach/gpu-vm/agent.log' 2>&1 &"), "{start}");
        assert!(s.contains("trap '' HUP\n"), "{s}");
    }

    #[test]
    fn systemd_unit_runs_the_launcher_and_holds_no_secret() {
        let u = layout().systemd_unit();
        assert!(u.contains(
            "ExecStart=/bin/sh /home/azureuser/.local/share/muster/attach/gpu-vm/run.sh\n"
        ));
        assert!(u.contains("Restart=always\n"));
        assert!(u.contains("WantedBy=multi-user.target\n"));
        assert!(!u.contains("TOKEN") && !u.contains("msj_"));
        let start = layout().systemd_start_command();
        assert!(start.contains("systemctl restart 'muster-agent-gpu-vm.service'"));
    }

    #[test]
    fn remote_commands_quote_every_path() {
        let l = layout();
        let upload = l.upload_command();
        assert!(
            upload.contains("t='/home/azureuser/.local/bin/muster.tmp.'$$; cat > \"$t\"; chmod 755 \"$t\"; mv -f \"$t\" '/home/azureuser/.local/bin/muster'"),
            "{upload}"
        );
        assert!(l.token_command().contains("umask 077"));
        assert!(
            l.token_command()
                .ends_with("cat > '/home/azureuser/.local/share/muster/attach/gpu-vm/join-token'")
        );
        let un = l.uninstall_command(ServiceKind::Supervisor);
        assert!(un.contains("rm -rf '/home/azureuser/.local/share/muster/attach/gpu-vm'"));
        assert!(un.contains("rmdir '/home/azureuser/.local/share/muster/attach' 2>/dev/null && rm -f '/home/azureuser/.local/bin/muster'"));
        let un = l.uninstall_command(ServiceKind::Systemd);
        assert!(un.contains("systemctl disable --now 'muster-agent-gpu-vm.service'"));
        assert!(un.contains("rm -f '/etc/systemd/system/muster-agent-gpu-vm.service'"));
    }

    #[test]
    fn node_names_come_from_the_flag_or_the_host_name() {
        assert_eq!(node_name(None, "box-1\n").unwrap(), "box-1");
        assert_eq!(node_name(Some("gpu-7"), "box-1").unwrap(), "gpu-7");
        assert!(
            node_name(None, "bad name")
                .unwrap_err()
                .0
                .contains("--node")
        );
        assert!(node_name(Some("-x"), "box").is_err());
    }
}
