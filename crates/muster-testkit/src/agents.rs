//! Extra agents for a test: in this process (any GPU probe), or as real `muster agent`
//! child processes that a test can `kill -9` and start again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use muster_agent::AgentConfig;
use muster_proto::v1;
use tokio::task::JoinHandle;

use crate::muster_bin;

/// An agent's settings for a test: joins `compute` at `server` as `name`, with the GPUs of
/// `probe` and no NVIDIA device requests (test GPUs are fake).
pub fn agent_config(
    server: &str,
    data_dir: &Path,
    compute: &str,
    name: &str,
    probe: std::sync::Arc<dyn muster_agent::GpuProbe>,
) -> AgentConfig {
    let mut config = AgentConfig::new(server, data_dir, compute);
    config.name = name.into();
    config.gpu_probe = probe;
    config.gpu_device_requests = false;
    // Peers of a distributed test run are on this machine: loopback is enough.
    config.exec_listen = "127.0.0.1:0".into();
    config
}

/// Builds the rsh helper (`muster-rsh`) statically linked, as DESIGN.md section 9 asks
/// (`-C target-feature=+crt-static`, for the host target so build scripts are unaffected),
/// and returns its path; once per process. Give it to an agent as `rsh_helper`.
pub fn rsh_helper_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let version = Command::new(&rustc)
            .arg("-vV")
            .output()
            .expect("rustc runs");
        let host = String::from_utf8_lossy(&version.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
            .expect("rustc -vV names the host target");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-p",
            "muster-rsh",
            "--bin",
            "muster-rsh",
            "--target",
            &host,
            "--message-format=json",
            "--manifest-path",
        ])
        .arg(&manifest)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .stderr(Stdio::inherit());
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("cargo runs");
        assert!(out.status.success(), "building muster-rsh failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "muster-rsh")
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo reports the muster-rsh executable")
    })
    .clone()
}

/// An agent running in this process.
#[derive(Debug)]
pub struct AgentHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), muster_agent::AgentError>>>,
}

impl AgentHandle {
    /// Starts an agent with `config` and waits (bounded) until the server lists it.
    /// An agent without a certificate, credential or join token joins with one the admin
    /// makes.
    pub async fn start(server: &str, mut config: AgentConfig) -> anyhow::Result<AgentHandle> {
        let name = config.name.clone();
        let certified = config.tls.as_ref().is_some_and(|t| t.has_identity());
        if !certified && config.join_token.is_none() && !config.data_dir.join("credential").exists()
        {
            config.join_token = Some(crate::access::join_token(server, &config.compute).await?);
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(muster_agent::run(config, async move {
            let _ = stopped.await;
        }));
        let mut handle = AgentHandle {
            stop: Some(stop),
            task: Some(task),
        };
        if let Err(e) = wait_for_node(server, &name).await {
            // An agent that stopped says why.
            if let Some(task) = handle.task.take_if(|t| t.is_finished()) {
                anyhow::bail!("{e}: the agent stopped: {:?}", task.await?);
            }
            return Err(e);
        }
        Ok(handle)
    }

    /// Stops it cleanly (its attempts are stopped, not reported).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t).await???;
        }
        Ok(())
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Waits (bounded: 30 s of wall-clock time) until a node named `name` is registered and
/// ready. An agent process on a loaded 2-core CI machine (a dozen container tests at
/// once) has been seen to take over 10 s to start, probe and register.
pub async fn wait_for_node(server: &str, name: &str) -> anyhow::Result<v1::Node> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if let Ok(mut c) = crate::access::clients(server).await
            && let Ok(nodes) = c.compute.list_nodes(v1::ListNodesRequest::default()).await
            && let Some(n) = nodes
                .into_inner()
                .nodes
                .into_iter()
                .find(|n| n.name == name && n.state() == v1::NodeState::Ready)
        {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("node {name} did not register within 30 s")
}

/// `muster agent` as a child process.
#[derive(Debug)]
pub struct AgentProcess {
    /// The node name.
    pub name: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    server: String,
    compute: String,
    child: Option<Child>,
}

impl AgentProcess {
    /// Starts `muster agent --compute COMPUTE --name NAME` against `server` and waits until it is ready.
    pub async fn start(
        server: &str,
        compute: &str,
        name: &str,
        data_dir: &Path,
    ) -> anyhow::Result<AgentProcess> {
        let mut p = AgentProcess {
            name: name.into(),
            data_dir: data_dir.into(),
            server: server.into(),
            compute: compute.into(),
            child: None,
        };
        p.spawn().await?;
        Ok(p)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))?;
        std::fs::create_dir_all(&self.data_dir)?;
        let mut cmd = Command::new(muster_bin());
        if !self.data_dir.join("credential").exists() {
            cmd.env(
                "MUSTER_JOIN_TOKEN",
                crate::access::join_token(&self.server, &self.compute).await?,
            );
        }
        self.child = Some(
            cmd.args([
                "--server",
                &self.server,
                "agent",
                "--compute",
                &self.compute,
                "--name",
                &self.name,
                "--data-dir",
            ])
            .arg(&self.data_dir)
            .env("MUSTER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
        );
        wait_for_node(&self.server, &self.name).await?;
        Ok(())
    }

    /// SIGKILL: the agent dies at once; containers it started keep running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data directory (same node id).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
