//! Attaching a machine over SSH (issue 16, item 1), against a real sshd in a container.
//!
//! The machine is a container of an image built FROM scratch from the host's Debian
//! `sshd`, busybox and C libraries (`muster_testkit::sshd_image`), on a private Docker
//! network this test makes; `muster server` listens on that network's gateway, which is
//! the address the agent in the container dials (`--agent-server`). The scenario:
//!
//! - a wrong `--host-key`, and a known_hosts entry with another key, are refused before
//!   anything changes (no compute target, nothing written on the machine);
//! - `muster compute attach sshc --ssh root@IP --key K --host-key SHA256:…` copies muster
//!   there, starts its agent under the supervisor, and the node is ready;
//! - a process run on `sshc` prints a file only the container has;
//! - `muster compute detach sshc --node N` stops the supervisor and agent, removes their
//!   files, and the node is gone;
//! - the same again by `--password-stdin`, the host known from known_hosts; a wrong
//!   password is refused;
//! - over TLS, the agent gets the CA's fingerprint from the CLI's `--ca-file`, joins with a
//!   certificate request, and runs work.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use muster_proto::v1;
use muster_testkit::compose::{free_port, run_bounded, run_bounded_async, unique_name};
use muster_testkit::images::docker_or_skip;
use muster_testkit::sshd_image::{MARKER_PATH, SshdImage, keygen};
use muster_testkit::{muster, muster_bin};

/// `docker ARGS...`, bounded; its standard output.
async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    Ok(run_bounded_async(cmd, Duration::from_secs(120))
        .await?
        .stdout)
}

/// The machine (a container on its own network) and the server it joins. Dropped in field
/// order: the server, then the container, the network, and last the image.
struct Lab {
    server: Child,
    server_log: PathBuf,
    container: String,
    network: String,
    /// The server's URL for the test's CLI (and for the agent: the network's gateway).
    url: String,
    /// The container's address on the network.
    ip: String,
    hostname: String,
    image: SshdImage,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let bounded = |args: &[&str]| {
            let _ = run_bounded(Command::new("docker").args(args), Duration::from_secs(60));
        };
        bounded(&["rm", "-f", &self.container]);
        bounded(&["network", "rm", &self.network]);
        // The image goes with `self.image`.
    }
}

impl Lab {
    /// Builds the image, makes the network, starts the server (over TLS with `tls`, its
    /// certificates by `muster tls init --servers-sign-agents`) and the container.
    async fn start(docker_client: &bollard::Docker, tls: bool) -> anyhow::Result<Lab> {
        let bin = muster_bin();
        let image = SshdImage::build(docker_client, &bin).await?;
        let dir = tempfile::tempdir()?;
        let network = unique_name("muster-ssh-net");
        let container = unique_name("muster-ssh-box");
        let hostname = unique_name("sshbox");
        // From here on, Drop cleans up what exists (removing a missing one is harmless).
        let mut lab = Lab {
            server: Command::new("true").spawn()?,
            server_log: dir.path().join("server.log"),
            container: container.clone(),
            network: network.clone(),
            url: String::new(),
            ip: String::new(),
            hostname: hostname.clone(),
            image,
            dir,
        };
        docker(&["network", "create", &network]).await?;
        let gateway = docker(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
            &network,
        ])
        .await?
        .trim()
        .to_string();
        anyhow::ensure!(!gateway.is_empty(), "network {network} has no gateway");

        // The server listens on the gateway only: the host's CLI and the container's agent
        // both reach it there.
        let port = free_port()?;
        let data = lab.dir.path().join("server");
        let log = std::fs::File::create(&lab.server_log)?;
        let mut server = Command::new(&bin);
        server.args(["server", "--listen", &format!("{gateway}:{port}")]);
        if tls {
            let tls_dir = lab.dir.path().join("tls");
            let init = muster_testkit::compose::run_bounded(
                Command::new(&bin)
                    .args(["tls", "init", "--servers-sign-agents", "--dir"])
                    .arg(&tls_dir)
                    .args(["--member", &format!("1={gateway}")]),
                Duration::from_secs(60),
            );
            init?;
            server.arg("--tls-dir").arg(tls_dir.join("server-1"));
            lab.url = format!("https://{gateway}:{port}");
            muster_testkit::access::register_ca(&lab.url, &tls_dir.join("ca.pem"));
        } else {
            server.arg("--insecure-no-tls");
            lab.url = format!("http://{gateway}:{port}");
        }
        lab.server = server
            .arg("--data-dir")
            .arg(&data)
            .env_remove("MUSTER_SERVER")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        muster_testkit::access::await_admin_token(&data.join("admin-token"), &lab.url).await?;

        docker(&[
            "run",
            "-d",
            "--name",
            &container,
            "--hostname",
            &hostname,
            "--network",
            &network,
            &lab.image.tag,
        ])
        .await?;
        lab.ip = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &container,
        ])
        .await?
        .trim()
        .to_string();
        // sshd is up once it sends its banner.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            use tokio::io::AsyncReadExt;
            if let Ok(Ok(mut s)) = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect((lab.ip.as_str(), 22)),
            )
            .await
            {
                let mut banner = [0u8; 7];
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut banner)).await
                    && &banner == b"SSH-2.0"
                {
                    break;
                }
            }
            if Instant::now() > deadline {
                let logs = docker(&["logs", &container]).await.unwrap_or_default();
                anyhow::bail!("sshd in {container} did not answer within 30 s: {logs}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(lab)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `sh -c SCRIPT` in the container; its standard output.
    async fn sh(&self, script: &str) -> String {
        docker(&["exec", &self.container, "/bin/sh", "-c", script])
            .await
            .unwrap_or_else(|e| panic!("{script} in the container: {e}"))
    }

    async fn cli(&self, args: &[&str]) -> muster_testkit::CliOutput {
        muster(&self.url, self.dir.path(), args).await
    }

    /// The CLI as the admin with `input` on its standard input (bounded: 240 s).
    async fn cli_with_stdin(&self, args: &[&str], input: &str) -> muster_testkit::CliOutput {
        use std::io::Write;
        let mut cmd = Command::new(muster_bin());
        cmd.env(
            "MUSTER_TOKEN",
            muster_testkit::access::admin_token(&self.url).expect("the admin's token"),
        )
        .env_remove("MUSTER_SERVER")
        .env_remove("MUSTER_CA_FILE")
        .arg("--server")
        .arg(&self.url)
        .args(args)
        .current_dir(self.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let input = input.to_string();
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().expect("muster runs");
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(input.as_bytes())
                .expect("writing stdin");
            // Bounded: a CLI still running after 240 s is killed (while it is our child,
            // so the pid is still its own).
            let stdout = child.stdout.take().expect("piped stdout");
            let stderr = child.stderr.take().expect("piped stderr");
            let read = |mut r: Box<dyn std::io::Read + Send>| {
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    let _ = r.read_to_end(&mut v);
                    v
                })
            };
            let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
            let deadline = Instant::now() + Duration::from_secs(240);
            let status = loop {
                if let Some(status) = child.try_wait().expect("waiting for muster") {
                    break status;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break child.wait().expect("waiting for muster");
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let out: muster_testkit::CliOutput = std::process::Output {
                status,
                stdout: out.join().unwrap_or_default(),
                stderr: err.join().unwrap_or_default(),
            }
            .into();
            out
        })
        .await
        .expect("the CLI task completes")
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(&self.server_log).unwrap_or_default()
    }

    async fn nodes(&self) -> Vec<v1::Node> {
        let mut c = muster_testkit::access::clients(&self.url)
            .await
            .expect("connect");
        c.compute
            .list_nodes(v1::ListNodesRequest::default())
            .await
            .expect("list nodes")
            .into_inner()
            .nodes
    }

    async fn compute_exists(&self, name: &str) -> bool {
        let mut c = muster_testkit::access::clients(&self.url)
            .await
            .expect("connect");
        c.compute
            .get_compute(v1::GetComputeRequest { name: name.into() })
            .await
            .is_ok()
    }

    /// What `/root` holds in the container (attach writes under `~/.local`).
    async fn root_home(&self) -> String {
        self.sh("ls -a /root").await
    }
}

fn as_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_machine_attached_over_ssh_runs_work_and_detaches_cleanly() {
    let Some(docker_client) = docker_or_skip().await else {
        return;
    };
    let lab = Lab::start(&docker_client, false)
        .await
        .expect("the lab starts");
    let key = lab.image.client_key.clone();
    let key = as_str(&key);
    let target = format!("root@{}", lab.ip);
    let agent_server = lab.url.clone();
    let empty_known_hosts = lab.path("known_hosts");
    std::fs::write(&empty_known_hosts, "").unwrap();
    let known_hosts = as_str(&empty_known_hosts);

    // A pin the host key does not match: refused, and nothing changed.
    let wrong_pin = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let out = lab
        .cli(&[
            "compute",
            "attach",
            "sshc",
            "--ssh",
            &target,
            "--key",
            key,
            "--known-hosts",
            known_hosts,
            "--host-key",
            wrong_pin,
            "--agent-server",
            &agent_server,
        ])
        .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains(&lab.image.host_key_fingerprint) && out.stderr.contains(wrong_pin),
        "the refusal names both fingerprints: {out:?}"
    );
    // An unknown host without a pin (and no terminal): refused with its fingerprint.
    let out = lab
        .cli(&[
            "compute",
            "attach",
            "sshc",
            "--ssh",
            &target,
            "--key",
            key,
            "--known-hosts",
            known_hosts,
            "--agent-server",
            &agent_server,
        ])
        .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("--host-key {}", lab.image.host_key_fingerprint)),
        "the refusal says how to trust it: {out:?}"
    );
    // known_hosts records another key for the host: refused even with the right pin.
    let other = lab.path("other_key");
    keygen(&other).unwrap();
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let other_pub: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    let mismatched = lab.path("known_hosts_mismatch");
    std::fs::write(&mismatched, format!("{} {}\n", lab.ip, other_pub.join(" "))).unwrap();
    let out = lab
        .cli(&[
            "compute",
            "attach",
            "sshc",
            "--ssh",
            &target,
            "--key",
            key,
            "--known-hosts",
            as_str(&mismatched),
            "--host-key",
            &lab.image.host_key_fingerprint,
            "--agent-server",
            &agent_server,
        ])
        .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("differs from the one") && out.stderr.contains("line 1"),
        "{out:?}"
    );
    assert!(
        !lab.compute_exists("sshc").await,
        "a refused attach made the target"
    );
    assert!(lab.nodes().await.is_empty());
    assert!(
        !lab.root_home().await.contains(".local"),
        "a refused attach wrote on the machine"
    );

    // A password in the YAML is refused before anything is tried.
    let with_password = lab.path("vm-password.yml");
    std::fs::write(
        &with_password,
        format!(
            "name: sshc\ntype: virtualmachine\naddress: {}\nssh_settings:\n  admin_username: root\n  admin_password: hunter2\n",
            lab.ip
        ),
    )
    .unwrap();
    let out = lab
        .cli(&["compute", "attach", "-f", as_str(&with_password)])
        .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("ssh_settings.admin_password")
            && out.stderr.contains("--password-stdin"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("hunter2"), "{out:?}");

    // The right pin: attached, the node is ready.
    let out = lab
        .cli(&[
            "compute",
            "attach",
            "sshc",
            "--ssh",
            &target,
            "--key",
            key,
            "--known-hosts",
            known_hosts,
            "--host-key",
            &lab.image.host_key_fingerprint,
            "--agent-server",
            &agent_server,
            "--ready-timeout",
            "120",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}\nserver log:\n{}", lab.server_log());
    let node_name = lab.hostname.clone();
    assert!(
        out.stdout
            .contains(&format!("node {node_name} of compute sshc is ready")),
        "{out:?}"
    );
    let nodes = lab.nodes().await;
    let node = nodes
        .iter()
        .find(|n| n.name == node_name)
        .unwrap_or_else(|| panic!("no node {node_name}: {nodes:?}"));
    assert_eq!(node.compute, "sshc");
    assert_eq!(node.state(), v1::NodeState::Ready);
    assert_eq!(
        node.labels.get("muster.ssh").map(String::as_str),
        Some(format!("root@{}:22", lab.ip).as_str())
    );
    // The binary and the supervisor are there; the spent join token is not; no secret
    // is on the agent's command line.
    let dir = "/root/.local/share/muster/attach/sshc";
    let state = lab
        .sh(&format!(
            "test -x /root/.local/bin/muster && echo binary; \
             test -e {dir}/join-token && echo token; \
             test -s {dir}/agent/credential && echo credential; \
             kill -0 \"$(cat {dir}/supervisor.pid)\" && echo supervisor; \
             cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"
        ))
        .await;
    assert!(state.contains("binary"), "{state}");
    assert!(state.contains("credential"), "{state}");
    assert!(state.contains("supervisor"), "{state}");
    assert!(
        !state.contains("token\n"),
        "the join token file is left: {state}"
    );
    assert!(
        !state.contains("msj_"),
        "a join token is on a command line: {state}"
    );

    // A run on the target runs inside the machine.
    let out = lab
        .cli(&[
            "run",
            "submit",
            "--compute",
            "sshc",
            "--stream",
            "--",
            "sh",
            "-c",
            &format!("cat {MARKER_PATH}; echo; hostname"),
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(&lab.image.marker), "{out:?}");
    assert!(out.stdout.contains(&node_name), "{out:?}");

    // A second attach of the same machine, from Azure ML's virtualmachine YAML (the key
    // path relative to the file), logs in and is refused: the node exists.
    let key_name = lab
        .image
        .client_key
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    std::fs::copy(&lab.image.client_key, lab.path(&key_name)).unwrap();
    let vm = lab.path("vm.yml");
    std::fs::write(
        &vm,
        format!(
            "$schema: https://azuremlschemas.azureedge.net/latest/vmCompute.schema.json\n\
             name: sshc\n\
             type: virtualmachine\n\
             address: {}\n\
             ssh_settings:\n  admin_username: root\n  ssh_port: 22\n  ssh_private_key_file: {key_name}\n",
            lab.ip,
        ),
    )
    .unwrap();
    let out = lab
        .cli(&[
            "compute",
            "attach",
            "-f",
            as_str(&vm),
            "--known-hosts",
            known_hosts,
            "--host-key",
            &lab.image.host_key_fingerprint,
            "--agent-server",
            &agent_server,
        ])
        .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("detach it first"), "{out:?}");

    // Detach: the agent and supervisor stop, their files go, the node goes.
    let out = lab
        .cli(&[
            "compute",
            "detach",
            "sshc",
            "--node",
            &node_name,
            "--key",
            key,
            "--known-hosts",
            known_hosts,
            "--host-key",
            &lab.image.host_key_fingerprint,
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}\nserver log:\n{}", lab.server_log());
    assert!(out.stdout.contains("is detached"), "{out:?}");
    assert!(
        !lab.nodes().await.iter().any(|n| n.name == node_name),
        "the node is still listed"
    );
    let left = lab
        .sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; \
             test -e /root/.local/share/muster/attach && echo ATTACH-LEFT; \
             test -e /root/.local/bin/muster && echo BINARY-LEFT; true")
        .await;
    assert!(
        !left.contains("supervise.sh"),
        "the supervisor still runs: {left}"
    );
    assert!(
        !left.contains("muster --server"),
        "the agent still runs: {left}"
    );
    assert!(
        !left.contains("ATTACH-LEFT\n"),
        "the attachment's files are left: {left}"
    );
    assert!(
        !left.contains("BINARY-LEFT\n"),
        "the binary is left: {left}"
    );

    // Again by password (from standard input), the host known from known_hosts (no pin).
    let good_known_hosts = lab.path("known_hosts_good");
    std::fs::write(
        &good_known_hosts,
        format!("{} {}\n", lab.ip, lab.image.host_public_key),
    )
    .unwrap();
    let password = format!("{}\n", lab.image.password);
    let out = lab
        .cli_with_stdin(
            &[
                "compute",
                "attach",
                "sshc",
                "--ssh",
                &target,
                "--password-stdin",
                "--known-hosts",
                as_str(&good_known_hosts),
                "--agent-server",
                &agent_server,
                "--node",
                "by-password",
            ],
            &password,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}\nserver log:\n{}", lab.server_log());
    assert!(
        out.stdout
            .contains("node by-password of compute sshc is ready"),
        "{out:?}"
    );
    // The password is nowhere on the machine's disk (the shadow file holds its hash).
    let on_disk = lab
        .sh(&format!(
            "grep -rlF '{}' /root /tmp /etc /run 2>/dev/null || true",
            lab.image.password
        ))
        .await;
    assert!(
        on_disk.trim().is_empty(),
        "the password was written on the machine: {on_disk}"
    );
    let out = lab
        .cli_with_stdin(
            &[
                "compute",
                "detach",
                "sshc",
                "--node",
                "by-password",
                "--password-stdin",
                "--known-hosts",
                as_str(&good_known_hosts),
            ],
            &password,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}\nserver log:\n{}", lab.server_log());
    assert!(
        !lab.nodes().await.iter().any(|n| n.name == "by-password"),
        "the node is still listed"
    );
    // A wrong password is refused and says so.
    let out = lab
        .cli_with_stdin(
            &[
                "compute",
                "attach",
                "sshc",
                "--ssh",
                &target,
                "--password-stdin",
                "--known-hosts",
                as_str(&good_known_hosts),
                "--agent-server",
                &agent_server,
            ],
            "not-the-password\n",
        )
        .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("did not accept the password"),
        "{out:?}"
    );

    // An agent that cannot reach the servers: attach gives up at --ready-timeout, shows
    // the agent's log, and leaves nothing running there and no join token that works.
    let out = lab
        .cli(&[
            "compute",
            "attach",
            "sshc",
            "--ssh",
            &target,
            "--key",
            key,
            "--known-hosts",
            known_hosts,
            "--host-key",
            &lab.image.host_key_fingerprint,
            "--agent-server",
            "http://127.0.0.1:9",
            "--ready-timeout",
            "5",
            "--node",
            "unreachable",
        ])
        .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("was not ready within 5 s"), "{out:?}");
    assert!(out.stderr.contains("attach stopped the agent"), "{out:?}");
    assert!(out.stderr.contains("join token"), "{out:?}");
    let left = lab
        .sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; \
             test -e /root/.local/share/muster/attach && echo ATTACH-LEFT; true")
        .await;
    assert!(
        !left.contains("supervise.sh"),
        "the supervisor still runs: {left}"
    );
    assert!(!left.contains("ATTACH-LEFT\n"), "files are left: {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_tls_the_attached_agent_joins_with_the_ca_fingerprint() {
    let Some(docker_client) = docker_or_skip().await else {
        return;
    };
    let lab = Lab::start(&docker_client, true)
        .await
        .expect("the lab starts");
    assert!(lab.url.starts_with("https://"));
    let key = lab.image.client_key.clone();
    let target = format!("root@{}", lab.ip);
    let known_hosts = lab.path("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    // The CLI trusts the cluster CA (MUSTER_CA_FILE, set by the testkit), and hands the
    // agent the CA's fingerprint.
    let out = lab
        .cli(&[
            "compute",
            "attach",
            "tlsc",
            "--ssh",
            &target,
            "--key",
            as_str(&key),
            "--known-hosts",
            as_str(&known_hosts),
            "--host-key",
            &lab.image.host_key_fingerprint,
            "--node",
            "tls-node",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}\nserver log:\n{}", lab.server_log());
    let printed: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(printed["node"], "tls-node", "{printed}");
    assert_eq!(printed["service"], "supervisor", "{printed}");
    let dir = "/root/.local/share/muster/attach/tlsc";
    let state = lab
        .sh(&format!(
            "test -s {dir}/agent/tls/cert.pem && echo certified; grep -c -- --ca-fingerprint {dir}/run.sh"
        ))
        .await;
    assert!(state.contains("certified"), "{state}");
    // Runs go there over TLS too.
    let out = lab
        .cli(&[
            "run",
            "submit",
            "--compute",
            "tlsc",
            "--stream",
            "--",
            "cat",
            MARKER_PATH,
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(&lab.image.marker), "{out:?}");
    let out = lab
        .cli(&[
            "compute",
            "detach",
            "tlsc",
            "--node",
            "tls-node",
            "--key",
            as_str(&key),
            "--known-hosts",
            as_str(&known_hosts),
            "--host-key",
            &lab.image.host_key_fingerprint,
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}\nserver log:\n{}", lab.server_log());
    assert!(
        !lab.nodes().await.iter().any(|n| n.name == "tls-node"),
        "the node is still listed"
    );
}
