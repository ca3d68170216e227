//! # muster-testkit: clusters in a test
//!
//! - [`DevCluster`]: `muster dev` in this process on a 127.0.0.1 port chosen by the OS,
//!   over a temporary (or given) data directory, stoppable and restartable.
//! - [`DevProcess`]: the real `muster` binary as a child process, for tests that must
//!   `kill -9` it (a crash, not a clean shutdown).
//! - [`FakeGpuProbe`]: gives a node any GPUs a test wants.
//! - [`fake_executor::FakeExecutor`]: an agent executor that records launches and lets a
//!   test end them with an exit code.
//! - [`mpi_image::mpi_image`]: an Open MPI image built from the host's `openmpi-bin`.
//! - [`sshd_image::SshdImage`]: an sshd image (from the host's `openssh-server`) to attach over SSH.
//! - [`muster`]: runs a CLI command against a server and captures what it printed.
//! - [`access`]: the admin token of each cluster started here, and clients that present it.
//!
//! Test-only: nothing outside tests and benches depends on this crate.

pub mod access;
pub mod agents;
pub mod cluster;
pub mod compose;
pub mod fake_executor;
pub mod faults;
pub mod images;
pub mod mpi_image;
pub mod procfs;
pub mod sshd_image;
pub mod stats;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use muster::DevConfig;
use muster_agent::{GpuProbe, GpuReport, NoGpus};
use muster_client::Clients;
use muster_core::Gpu;
use tokio::task::JoinHandle;

/// Sets up tracing once for a test binary (`MUSTER_LOG` filters; default warnings only).
pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("MUSTER_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A GPU probe whose GPUs a test sets (and changes: a GPU can fail and recover).
#[derive(Debug, Clone, Default)]
pub struct FakeGpuProbe {
    gpus: Arc<std::sync::Mutex<Vec<Gpu>>>,
}

impl FakeGpuProbe {
    /// `n` fake GPUs named `GPU-fake-<prefix>-<i>`, 16 GiB each.
    pub fn with(prefix: &str, n: usize) -> FakeGpuProbe {
        let probe = FakeGpuProbe::default();
        probe.set(
            (0..n)
                .map(|i| Gpu {
                    uuid: format!("GPU-fake-{prefix}-{i}"),
                    model: "Fake Tensor Core GPU".into(),
                    memory_bytes: 16 << 30,
                })
                .collect(),
        );
        probe
    }

    /// Replaces the GPUs the probe reports from now on.
    pub fn set(&self, gpus: Vec<Gpu>) {
        *self.gpus.lock().expect("fake GPU lock") = gpus;
    }

    /// The GPUs reported now.
    pub fn gpus(&self) -> Vec<Gpu> {
        self.gpus.lock().expect("fake GPU lock").clone()
    }
}

impl GpuProbe for FakeGpuProbe {
    fn probe(&self) -> GpuReport {
        GpuReport {
            gpus: self.gpus(),
            driver_version: Some("555.42.06".into()),
            cuda_version: Some("12.5".into()),
            note: None,
        }
    }
}

/// `muster dev` in this process.
#[derive(Debug)]
pub struct DevCluster {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    _temp: Option<Arc<tempfile::TempDir>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    tweak: fn(&mut DevConfig),
}

fn test_defaults(c: &mut DevConfig) {
    c.gpu_probe = Arc::new(NoGpus);
    c.store_credentials = false;
    c.server.stop_grace = Duration::from_secs(2);
}

impl DevCluster {
    /// Starts on a fresh temporary data directory.
    pub async fn start() -> anyhow::Result<DevCluster> {
        Self::start_with(|_| {}).await
    }

    /// Starts on a fresh temporary directory with settings changed by `tweak`.
    pub async fn start_with(tweak: fn(&mut DevConfig)) -> anyhow::Result<DevCluster> {
        let temp = Arc::new(tempfile::tempdir()?);
        let mut c = Self::launch(temp.path().to_path_buf(), "127.0.0.1:0".parse()?, tweak).await?;
        c._temp = Some(temp);
        Ok(c)
    }

    async fn launch(
        data_dir: PathBuf,
        addr: SocketAddr,
        tweak: fn(&mut DevConfig),
    ) -> anyhow::Result<DevCluster> {
        init_tracing();
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mut config = DevConfig::new(&data_dir);
        test_defaults(&mut config);
        tweak(&mut config);
        let admin_path = config.admin_token_path();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(muster::serve_dev(listener, config, async move {
            let _ = stopped.await;
        }));
        let cluster = DevCluster {
            addr,
            data_dir,
            _temp: None,
            stop: Some(stop),
            task: Some(task),
            tweak,
        };
        access::await_admin_token(&admin_path, &cluster.url()).await?;
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// gRPC clients connected to it, as its admin.
    pub async fn clients(&self) -> anyhow::Result<Clients> {
        access::clients(&self.url()).await
    }

    /// Its admin's API token.
    pub fn token(&self) -> String {
        access::admin_token(&self.url()).expect("registered at start")
    }

    /// Waits (bounded) until the local compute target exists and its agent is registered.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        for _ in 0..200 {
            if let Ok(mut c) = self.clients().await
                && let Ok(nodes) = c
                    .compute
                    .list_nodes(muster_proto::v1::ListNodesRequest::default())
                    .await
                && nodes
                    .get_ref()
                    .nodes
                    .iter()
                    .any(|n| n.state() == muster_proto::v1::NodeState::Ready)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("muster dev did not become ready within 5 s")
    }

    /// Stops it cleanly (agent, then server) and waits until the data directory is free.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task).await???;
        }
        Ok(())
    }

    /// Stops it and starts it again on the same data directory and address.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        let temp = self._temp.take();
        let mut next = Self::launch(self.data_dir.clone(), self.addr, self.tweak).await?;
        next._temp = temp;
        *self = next;
        Ok(())
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The `muster` binary of this workspace, built on first use (so a test needs no prior
/// `cargo build`). Runs `cargo build -p muster --bin muster` with the same profile.
pub fn muster_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-p",
            "muster",
            "--bin",
            "muster",
            "--message-format=json",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stderr(Stdio::inherit());
        // What cargo set for this test or bench's own crate (`cargo test`, `cargo run`) must
        // not reach the nested build: some build scripts (ring's) rerun when these change,
        // so the nested build and the next plain `cargo build` would each rebuild half the
        // workspace for the other.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_CFG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_MANIFEST_LINKS",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "OUT_DIR",
                ]
                .contains(&key.as_ref())
            {
                cmd.env_remove(key.as_ref());
            }
        }
        // Benchmarks (release builds) measure a release binary.
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("cargo runs");
        assert!(out.status.success(), "building the muster binary failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "muster")
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo reports the muster executable")
    })
    .clone()
}

/// What a CLI command printed, and its exit code.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for CliOutput {
    fn from(o: Output) -> Self {
        CliOutput {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `muster --server URL ARGS...` in `cwd` as the cluster's admin (`MUSTER_TOKEN`)
/// and waits for it (off the async threads).
pub async fn muster(server: &str, cwd: &Path, args: &[&str]) -> CliOutput {
    let bin = muster_bin();
    let server = server.to_string();
    let cwd = cwd.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(bin);
        if let Some(token) = access::admin_token(&server) {
            cmd.env("MUSTER_TOKEN", token);
        }
        if let Some(ca) = access::ca_file(&server) {
            cmd.env("MUSTER_CA_FILE", ca);
        }
        cmd.arg("--server")
            .arg(server)
            .args(&args)
            .current_dir(cwd)
            .env_remove("MUSTER_SERVER")
            .output()
            .expect("muster runs")
            .into()
    })
    .await
    .expect("the CLI task completes")
}

/// The real `muster dev` binary as a child process (killable with SIGKILL).
#[derive(Debug)]
pub struct DevProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    child: Option<Child>,
}

impl DevProcess {
    /// Starts `muster dev` on a free port over `data_dir` and waits until it serves.
    pub async fn start(data_dir: &Path) -> anyhow::Result<DevProcess> {
        Self::start_with(data_dir, &[]).await
    }

    /// Starts `muster dev` on a free port with `extra` flags after `dev` (e.g.
    /// `--max-runs 64`).
    pub async fn start_with(data_dir: &Path, extra: &[&str]) -> anyhow::Result<DevProcess> {
        let addr = SocketAddr::from(([127, 0, 0, 1], compose::free_port()?));
        Self::spawn(data_dir, addr, extra).await
    }

    /// Starts `muster dev` on `addr` over `data_dir`.
    pub async fn start_on(data_dir: &Path, addr: SocketAddr) -> anyhow::Result<DevProcess> {
        Self::spawn(data_dir, addr, &[]).await
    }

    async fn spawn(
        data_dir: &Path,
        addr: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<DevProcess> {
        let child = Command::new(muster_bin())
            .args(["dev", "--listen", &addr.to_string(), "--data-dir"])
            .arg(data_dir)
            .args(extra)
            // Its admin token goes to a config dir of its own, not the user's.
            .env("MUSTER_CONFIG_DIR", data_dir.join("cli-config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut p = DevProcess {
            addr,
            data_dir: data_dir.to_path_buf(),
            child: Some(child),
        };
        let admin_path = data_dir.join("server").join("admin-token");
        if let Err(e) = access::await_admin_token(&admin_path, &p.url()).await {
            p.kill();
            return Err(e);
        }
        for _ in 0..200 {
            if let Ok(mut c) = access::clients(&p.url()).await
                && let Ok(nodes) = c
                    .compute
                    .list_nodes(muster_proto::v1::ListNodesRequest::default())
                    .await
                && nodes
                    .get_ref()
                    .nodes
                    .iter()
                    .any(|n| n.state() == muster_proto::v1::NodeState::Ready)
            {
                return Ok(p);
            }
            if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                anyhow::bail!("muster dev exited early with {status}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        p.kill();
        anyhow::bail!("muster dev did not become ready within 5 s")
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id while it runs (benchmarks read its CPU time from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no clean shutdown at all.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
