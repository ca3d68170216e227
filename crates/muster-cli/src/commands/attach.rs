//! `muster compute attach NAME --ssh USER@HOST[:PORT]` and `muster compute detach NAME
//! --node N`: a machine joins a compute target over SSH, and leaves it.
//!
//! Attach, in order: read the settings (flags or a `type: virtualmachine` YAML); check that
//! NAME is an `attached` target if it exists; connect and check the host key (nothing has
//! changed anywhere before this succeeds); look at the machine (home, OS, host name,
//! systemd); copy the running `muster` there if it lacks one as new; make NAME if missing;
//! mint a join token (the RPC of `muster token create --join`), write it to a 0600 file the
//! agent's launcher reads and removes; install `run.sh` and a systemd unit or a supervisor
//! loop; start it; wait (bounded) until the node is ready. Detach: connect again, drain the
//! node, stop and remove everything attach installed, then remove the node.
//!
//! What goes where, and every remote command line, is `muster_core::attach` (pure and
//! tested); the SSH session is [`crate::ssh`]. Secrets never reach a remote command line:
//! the token and the binary go over standard input.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use muster_client::{Clients, status};
use muster_core::attach::{
    AgentLaunch, RemoteLayout, SSH_LABEL, ServiceKind, SshTarget, Upload, needs_upload, node_name,
    parse_vm_yaml,
};
use muster_core::compute::{ComputeKind, ComputeSpec};
use muster_core::names::validate_compute_name;
use muster_proto::{Word, v1};
use serde_json::json;

use crate::cli::{ComputeAttachArgs, ComputeDetachArgs, OutputFormat, SshLoginArgs};
use crate::connect;
use crate::output::print_json;
use crate::ssh::{HostKeyPolicy, Session, SshAuth};

/// A short remote command's time limit.
const SHORT: Duration = Duration::from_secs(60);
/// The binary's upload's time limit.
const UPLOAD: Duration = Duration::from_secs(600);

/// What attach was asked to do, validated.
#[derive(Debug)]
struct AttachSettings {
    compute: String,
    target: SshTarget,
    key: Option<PathBuf>,
    description: Option<String>,
}

fn attach_settings(a: &ComputeAttachArgs) -> anyhow::Result<AttachSettings> {
    let mut settings = match &a.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let f = parse_vm_yaml(&text, a.name.as_deref())
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            // A relative key path is relative to the file's folder.
            let key = f.key_file.map(|k| {
                let k = PathBuf::from(k);
                if k.is_relative() {
                    path.parent().unwrap_or(Path::new(".")).join(k)
                } else {
                    k
                }
            });
            AttachSettings {
                compute: f.name,
                target: f.target,
                key,
                description: f.description,
            }
        }
        None => {
            let compute = a.name.clone().ok_or_else(|| {
                anyhow::anyhow!("give the compute target's NAME, or a virtualmachine YAML with -f")
            })?;
            let ssh = a.ssh.as_deref().ok_or_else(|| {
                anyhow::anyhow!("--ssh USER@HOST[:PORT]: missing: say which machine to attach")
            })?;
            AttachSettings {
                compute,
                target: SshTarget::parse(ssh)?,
                key: None,
                description: None,
            }
        }
    };
    if a.file.is_some()
        && let Some(ssh) = &a.ssh
    {
        settings.target = SshTarget::parse(ssh)?;
    }
    if let Some(k) = &a.login.key {
        settings.key = Some(k.clone());
    }
    if a.login.password_stdin {
        settings.key = None;
    }
    validate_compute_name(&settings.compute).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(settings)
}

/// The login: the key file, or the password's first line from standard input.
fn ssh_auth(login: &SshLoginArgs, key: Option<PathBuf>) -> anyhow::Result<SshAuth> {
    if login.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("--password-stdin: reading the password from standard input")?;
        let pw = line.trim_end_matches(['\n', '\r']).to_string();
        anyhow::ensure!(
            !pw.is_empty(),
            "--password-stdin: standard input held no password: pipe it in (e.g. `muster compute attach … --password-stdin < pwfile`)"
        );
        return Ok(SshAuth::Password(pw));
    }
    match key {
        Some(k) => {
            anyhow::ensure!(
                k.is_file(),
                "--key {}: no such file: give the private key you log in to the machine with",
                k.display()
            );
            Ok(SshAuth::Key(k))
        }
        None => bail!(
            "say how to log in: --key FILE (a private key), or --password-stdin (the password on standard input)"
        ),
    }
}

/// The agent's server list: `--agent-server` (with `http(s)://` added to a bare
/// HOST:PORT) or the CLI's own.
fn agent_servers(cli_server: &str, given: Option<&str>, tls: bool) -> String {
    let Some(given) = given else {
        return cli_server.to_string();
    };
    given
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.contains("://") {
                s.to_string()
            } else if tls {
                format!("https://{s}")
            } else {
                format!("http://{s}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether every server in `servers` is a loopback address, which on the machine would be
/// the machine itself.
fn only_loopback(servers: &str) -> bool {
    servers.split(',').all(|s| {
        let host = s.split("://").nth(1).unwrap_or(s);
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1")
    })
}

/// What the machine said about itself.
#[derive(Debug)]
struct Probe {
    layout_home: String,
    system: String,
    hostname: String,
    service: ServiceKind,
}

async fn probe(ssh: &Session) -> anyhow::Result<Probe> {
    let home = ssh
        .run_ok(
            "finding the home directory",
            RemoteLayout::HOME_COMMAND,
            b"",
            SHORT,
        )
        .await?;
    let ran = ssh
        .run_ok(
            "looking at the machine (uname, hostname)",
            RemoteLayout::PROBE_COMMAND,
            b"",
            SHORT,
        )
        .await?;
    let mut lines = ran.stdout.lines();
    let system = lines.next().unwrap_or("").trim().to_string();
    let hostname = lines.next().unwrap_or("").trim().to_string();
    let service = match lines.next().map(str::trim) {
        Some("systemd") => ServiceKind::Systemd,
        _ => ServiceKind::Supervisor,
    };
    Ok(Probe {
        layout_home: home.stdout.trim().to_string(),
        system,
        hostname,
        service,
    })
}

/// `uname -sm` of this machine, as the remote prints it.
fn local_system() -> String {
    let os = match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        other => other,
    };
    format!("{os} {}", std::env::consts::ARCH)
}

/// Makes sure the machine's `muster` is at least as new as this one, copying this one.
async fn ensure_binary(ssh: &Session, layout: &RemoteLayout, system: &str) -> anyhow::Result<()> {
    let local = format!("muster {}", env!("CARGO_PKG_VERSION"));
    let remote = ssh.exec(&layout.version_command(), b"", SHORT).await?;
    let remote_version = remote.stdout.trim().to_string();
    let remote_opt = (!remote_version.is_empty()).then_some(remote_version.as_str());
    let target = ssh.target();
    match needs_upload(&local, remote_opt) {
        Upload::Keep => return Ok(()),
        Upload::KeepNewer => {
            eprintln!(
                "note: {target} has {remote_version} at {}, newer than this {local}: it stays",
                layout.binary()
            );
            return Ok(());
        }
        Upload::Copy => {}
    }
    let mine = local_system();
    if system != mine {
        bail!(
            "{target} is a {system} machine and this muster is built for {mine}: copy a muster built for {system} to {} there and attach again",
            layout.binary()
        );
    }
    let exe = std::env::current_exe().context("finding the running muster binary to copy")?;
    eprintln!(
        "copying {} to {target}:{} ({})",
        exe.display(),
        layout.binary(),
        match remote_opt {
            Some(v) => format!("it has {v}"),
            None => "it has none".into(),
        }
    );
    let ran = ssh
        .exec_with_file(&layout.upload_command(), &exe, UPLOAD)
        .await?;
    if !ran.ok() {
        bail!(
            "copying muster to {target}:{} failed: {}: check the disk space and permissions of {} there",
            layout.binary(),
            ran.why(),
            layout.bin_dir()
        );
    }
    let after = ssh.exec(&layout.version_command(), b"", SHORT).await?;
    if after.stdout.trim() != local {
        let why = ssh
            .exec(
                &format!(
                    "{} --version",
                    muster_core::attach::shell_quote(&layout.binary())
                ),
                b"",
                SHORT,
            )
            .await
            .map(|r| r.why())
            .unwrap_or_default();
        bail!(
            "the muster copied to {target}:{} does not run there ({why}): its C library may be older than this machine's; build muster on (or for) that machine and put it there",
            layout.binary()
        );
    }
    Ok(())
}

/// The compute target `name` if it exists (it must be `attached`).
async fn existing_target(c: &mut Clients, name: &str) -> anyhow::Result<bool> {
    match c
        .compute
        .get_compute(v1::GetComputeRequest { name: name.into() })
        .await
    {
        Ok(t) => {
            let t = t.into_inner();
            if ComputeKind::parse(&t.r#type).ok() != Some(ComputeKind::Attached) {
                bail!(
                    "compute target {name} is of type {}, and machines attach only to `attached` targets: choose another NAME (attach makes it)",
                    t.r#type
                );
            }
            Ok(true)
        }
        Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
        Err(s) => Err(status(s).into()),
    }
}

async fn find_node(c: &mut Clients, name: &str) -> anyhow::Result<Option<v1::Node>> {
    Ok(c.compute
        .list_nodes(v1::ListNodesRequest::default())
        .await
        .map_err(status)?
        .into_inner()
        .nodes
        .into_iter()
        .find(|n| n.name == name))
}

/// `muster compute attach`.
pub async fn attach(
    server: &str,
    output: OutputFormat,
    args: ComputeAttachArgs,
) -> anyhow::Result<()> {
    let settings = attach_settings(&args)?;
    let auth = ssh_auth(&args.login, settings.key.clone())?;
    let policy = HostKeyPolicy::new(
        args.login.known_hosts.clone(),
        args.login.host_key.clone(),
        args.login.password_stdin,
    )?;
    let tls_ca = crate::ca_file();
    let ca_fingerprint = match tls_ca {
        Some(ca) => {
            let pem = std::fs::read_to_string(ca)
                .with_context(|| format!("--ca-file: cannot read {}", ca.display()))?;
            Some(
                muster_client::pki::fingerprint(&pem)
                    .map_err(|e| anyhow::anyhow!("--ca-file: {e}"))?,
            )
        }
        None => None,
    };
    let agent_server = agent_servers(server, args.agent_server.as_deref(), tls_ca.is_some());
    let compute = settings.compute.clone();
    let target = settings.target.clone();

    let mut c = connect(server).await?;
    let exists = existing_target(&mut c, &compute).await?;

    // Nothing changes anywhere before the host key is trusted and the login works.
    let ssh = Session::connect(&target, &auth, policy).await?;
    drop(auth);
    let result = attach_over(
        &ssh,
        &mut c,
        &settings,
        exists,
        &args,
        &agent_server,
        ca_fingerprint,
    )
    .await;
    ssh.close().await;
    let (node, service) = result?;
    if output == OutputFormat::Json {
        print_json(&json!({
            "compute": compute,
            "node": node,
            "ssh": target.to_string(),
            "service": service.as_str(),
        }));
    } else {
        println!("node {node} of compute {compute} is ready");
    }
    Ok(())
}

async fn attach_over(
    ssh: &Session,
    c: &mut Clients,
    settings: &AttachSettings,
    exists: bool,
    args: &ComputeAttachArgs,
    agent_server: &str,
    ca_fingerprint: Option<String>,
) -> anyhow::Result<(String, ServiceKind)> {
    let compute = &settings.compute;
    let target = &settings.target;
    let probe = probe(ssh).await?;
    let layout = RemoteLayout::new(&probe.layout_home, compute)?;
    let node = node_name(args.node.as_deref(), &probe.hostname)?;
    if let Some(n) = find_node(c, &node).await? {
        bail!(
            "a node named {node} is registered already (compute {}, {}): detach it first (`muster compute detach {} --node {node}`), or give this one another name with --node",
            n.compute,
            v1::NodeState::word_of(n.state),
            n.compute
        );
    }
    if only_loopback(agent_server)
        && !matches!(target.host.as_str(), "127.0.0.1" | "localhost" | "::1")
    {
        eprintln!(
            "warning: the agent on {target} will dial {agent_server}, which there is the machine itself: give --agent-server with an address it reaches the servers at"
        );
    }
    ensure_binary(ssh, &layout, &probe.system).await?;

    if !exists {
        let mut spec = ComputeSpec::new(compute.clone(), ComputeKind::Attached);
        spec.description = settings.description.clone();
        if let Some(w) = crate::workspace() {
            spec.workspace = w.to_string();
        }
        spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        c.compute
            .create_compute(v1::CreateComputeRequest {
                compute: Some(muster_proto::compute_spec_to_wire(&spec)),
            })
            .await
            .map_err(status)?;
        eprintln!("made the attached compute target {compute}");
    }

    let made = c
        .access
        .create_token(v1::CreateTokenRequest {
            user: String::new(),
            name: format!("attach {node} over SSH"),
            expires_in_s: 0,
            never_expires: false,
            join: true,
            compute: compute.clone(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let token_id = made.info.map(|i| i.id).unwrap_or_default();
    let launch = AgentLaunch {
        server: agent_server.to_string(),
        compute: compute.clone(),
        node: node.clone(),
        ssh: target.to_string(),
        advertise_addr: target.host.clone(),
        ca_fingerprint,
    };
    let installed = install_and_wait(
        ssh,
        c,
        &layout,
        &launch,
        &made.token,
        probe.service,
        Duration::from_secs(args.ready_timeout),
    )
    .await;
    drop(made.token);
    if let Err(e) = installed {
        // Leave nothing running there, and no join token that works.
        let stopped = ssh
            .exec(
                &layout.uninstall_command(probe.service),
                b"",
                Duration::from_secs(90),
            )
            .await
            .is_ok_and(|r| r.ok());
        let revoked = !token_id.is_empty()
            && c.access
                .revoke_token(v1::RevokeTokenRequest { id: token_id })
                .await
                .is_ok();
        bail!(
            "{e:#}\n{}{}",
            if stopped {
                format!("attach stopped the agent on {target} and removed its files; ")
            } else {
                format!(
                    "the agent on {target} may still run: `muster compute detach {compute} --node {node}` or remove {} there; ",
                    layout.dir()
                )
            },
            if revoked {
                "its join token is revoked: fix the cause and attach again"
            } else if stopped {
                "its join token went with them, unused (it expires within the hour): fix the cause and attach again"
            } else {
                "fix the cause and attach again"
            }
        );
    }
    Ok((node, probe.service))
}

/// Writes the token, `run.sh` and the unit or supervisor, starts it, and waits (bounded)
/// until the node is ready; then removes the spent token's file.
async fn install_and_wait(
    ssh: &Session,
    c: &mut Clients,
    layout: &RemoteLayout,
    launch: &AgentLaunch,
    token: &str,
    service: ServiceKind,
    limit: Duration,
) -> anyhow::Result<()> {
    let target = ssh.target();
    let (compute, node, agent_server) = (&launch.compute, &launch.node, &launch.server);
    ssh.run_ok(
        "writing the join token",
        &layout.token_command(),
        token.as_bytes(),
        SHORT,
    )
    .await?;
    ssh.run_ok(
        "writing run.sh",
        &layout.write_file_command(&layout.launcher(), 0o700),
        layout.launcher_script(launch).as_bytes(),
        SHORT,
    )
    .await?;
    match service {
        ServiceKind::Systemd => {
            let unit = format!("{}/unit", layout.dir());
            ssh.run_ok(
                "writing the systemd unit",
                &layout.write_file_command(&unit, 0o644),
                layout.systemd_unit().as_bytes(),
                SHORT,
            )
            .await?;
            ssh.run_ok(
                "starting the systemd unit",
                &layout.systemd_start_command(),
                b"",
                SHORT,
            )
            .await?;
        }
        ServiceKind::Supervisor => {
            ssh.run_ok(
                "writing supervise.sh",
                &layout.write_file_command(&layout.supervisor(), 0o700),
                layout.supervisor_script().as_bytes(),
                SHORT,
            )
            .await?;
            ssh.run_ok(
                "starting the agent's supervisor",
                &layout.supervisor_start_command(),
                b"",
                SHORT,
            )
            .await?;
        }
    }
    eprintln!(
        "started the agent on {target} ({}); waiting for node {node} to be ready",
        match service {
            ServiceKind::Systemd => format!("systemd unit {}", layout.unit_name()),
            ServiceKind::Supervisor => format!("supervisor, pid file {}", layout.pid_file()),
        }
    );

    let started = Instant::now();
    loop {
        if let Some(n) = find_node(c, node).await?
            && n.compute == *compute
            && n.state() == v1::NodeState::Ready
        {
            break;
        }
        if started.elapsed() > limit {
            let log = ssh
                .exec(&layout.log_tail_command(), b"", SHORT)
                .await
                .map(|r| r.stdout)
                .unwrap_or_default();
            bail!(
                "node {node} of compute {compute} was not ready within {} s: check that {target} reaches the servers at {agent_server} (--agent-server); the agent's log there ({}) ends with:\n{}",
                limit.as_secs(),
                layout.log_file(),
                log.trim_end()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Joined: the token is spent; its file goes too.
    ssh.exec(&layout.remove_token_command(), b"", SHORT).await?;
    Ok(())
}

/// `muster compute detach`.
pub async fn detach(
    server: &str,
    output: OutputFormat,
    args: ComputeDetachArgs,
) -> anyhow::Result<()> {
    let compute = args.name.clone();
    validate_compute_name(&compute).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut c = connect(server).await?;
    let node = find_node(&mut c, &args.node)
        .await?
        .filter(|n| n.compute == compute)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "compute {compute} has no node {:?}: list its nodes with `muster node list --compute {compute}`",
                args.node
            )
        })?;
    if !node.runs.is_empty() {
        bail!(
            "node {} runs {} attempt(s): wait for them to end, or `muster node evict {}` to restart them elsewhere, then detach",
            node.name,
            node.runs.len(),
            node.name
        );
    }
    let target = match (&args.ssh, node.labels.get(SSH_LABEL)) {
        (Some(s), _) => SshTarget::parse(s)?,
        (None, Some(s)) => SshTarget::parse(s)
            .with_context(|| format!("node {}'s label {SSH_LABEL}", node.name))?,
        (None, None) => bail!(
            "node {} was not attached over SSH (it has no {SSH_LABEL} label): give --ssh USER@HOST[:PORT], or stop its agent yourself and `muster node remove {}`",
            node.name,
            node.name
        ),
    };
    let auth = ssh_auth(&args.login, args.login.key.clone())?;
    let policy = HostKeyPolicy::new(
        args.login.known_hosts.clone(),
        args.login.host_key.clone(),
        args.login.password_stdin,
    )?;
    let ssh = Session::connect(&target, &auth, policy).await.map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\n(if the machine is gone for good, remove the node instead: `muster node remove {}` once it is lost)",
            node.name
        )
    })?;
    drop(auth);
    let result = detach_over(&ssh, &mut c, &compute, &node, args.timeout).await;
    ssh.close().await;
    let service = result?;
    if output == OutputFormat::Json {
        print_json(&json!({
            "compute": compute,
            "node": node.name,
            "ssh": target.to_string(),
            "service": service,
            "removed": true,
        }));
    } else {
        println!(
            "node {} of compute {compute} is detached: its agent on {target} is stopped and its files removed, and the node is removed",
            node.name
        );
    }
    Ok(())
}

async fn detach_over(
    ssh: &Session,
    c: &mut Clients,
    compute: &str,
    node: &v1::Node,
    timeout: u64,
) -> anyhow::Result<&'static str> {
    let target = ssh.target();
    let home = ssh
        .run_ok(
            "finding the home directory",
            RemoteLayout::HOME_COMMAND,
            b"",
            SHORT,
        )
        .await?;
    let layout = RemoteLayout::new(home.stdout.trim(), compute)?;
    let installed = ssh
        .run_ok(
            "looking for the agent's service",
            &layout.installed_kind_command(),
            b"",
            SHORT,
        )
        .await?;
    let kind = match installed.stdout.trim() {
        "systemd" => Some(ServiceKind::Systemd),
        "supervisor" => Some(ServiceKind::Supervisor),
        _ => None,
    };
    // It takes no new runs while its agent stops.
    if node.state() == v1::NodeState::Ready {
        c.compute
            .set_node_state(v1::SetNodeStateRequest {
                node: node.name.clone(),
                action: "drain".into(),
                reason: Some("detaching: muster compute detach".into()),
            })
            .await
            .map_err(status)?;
    }
    if let Some(kind) = kind {
        ssh.run_ok(
            "stopping and removing the agent",
            &layout.uninstall_command(kind),
            b"",
            Duration::from_secs(90),
        )
        .await?;
        if kind == ServiceKind::Supervisor {
            let still = ssh
                .exec(&layout.supervisor_status_command(), b"", SHORT)
                .await?;
            if still.stdout.trim() == "running" {
                bail!(
                    "the agent's supervisor on {target} still runs after SIGTERM and SIGKILL: stop it by hand (pid file {})",
                    layout.pid_file()
                );
            }
        }
    } else {
        eprintln!(
            "note: {target} has no agent of compute {compute} installed by attach ({} is missing); removing the node only",
            layout.dir()
        );
    }
    // The node goes once no attempt is left on it and it is not ready.
    let limit = Duration::from_secs(timeout);
    let started = Instant::now();
    loop {
        let current = find_node(c, &node.name).await?;
        let Some(current) = current else {
            break;
        };
        if current.state() != v1::NodeState::Ready && current.runs.is_empty() {
            match c
                .compute
                .set_node_state(v1::SetNodeStateRequest {
                    node: node.name.clone(),
                    action: "remove".into(),
                    reason: None,
                })
                .await
            {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::NotFound => break,
                Err(s) if started.elapsed() > limit => return Err(status(s).into()),
                Err(_) => {}
            }
        }
        if started.elapsed() > limit {
            bail!(
                "node {} is still {} with {} attempt(s) {} s after its agent on {target} was stopped: remove it with `muster node remove {}` once it is lost",
                node.name,
                v1::NodeState::word_of(current.state),
                current.runs.len(),
                limit.as_secs(),
                node.name
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(kind.map_or("none", ServiceKind::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_dials_the_clis_servers_unless_told_otherwise() {
        assert_eq!(
            agent_servers("http://10.0.0.1:7070", None, false),
            "http://10.0.0.1:7070"
        );
        assert_eq!(
            agent_servers("http://127.0.0.1:7070", Some("172.18.0.1:7070"), false),
            "http://172.18.0.1:7070"
        );
        assert_eq!(
            agent_servers("x", Some("a:1, https://b:2"), true),
            "https://a:1,https://b:2"
        );
        assert!(only_loopback("http://127.0.0.1:7070,http://localhost:7071"));
        assert!(!only_loopback("http://127.0.0.1:7070,http://10.0.0.1:7070"));
    }

    #[test]
    fn local_system_reads_like_uname() {
        let s = local_system();
        assert!(s.contains(std::env::consts::ARCH), "{s}");
    }
}
