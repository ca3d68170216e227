//! # muster-agent: the node
//!
//! `muster agent` runs on every machine of a compute target. It finds what the machine
//! offers (`resources.rs`: sysinfo for CPU and memory, NVML for GPUs), registers with a
//! server, keeps one session stream open (`session.rs`), and runs each assignment
//! (`attempt.rs`): fetch the code snapshot (`snapshot.rs`), execute (`executor/`), ship
//! logs live, upload `outputs/` (`outputs.rs`), report the end — and resend what the server
//! has not acknowledged after a reconnect. It decides no placement.
//!
//! Distributed runs (DESIGN.md section 9): each rank gets the environment muster-core
//! computes from the whole placement (`muster_core::distributed`), its container shares
//! the node's network, and `rsh_server.rs` is the exec listener through which `muster-rsh`
//! (mounted into the containers) lets `mpirun` on rank 0 start processes in the other
//! ranks' containers; rank 0 starts its launcher only once every worker is up.
//!
//! Crate choices: `sysinfo` and `nvml-wrapper` (loads libnvidia-ml at run time, so the
//! agent builds and runs without a driver), `nix` for process-group signals, `tar` for the
//! outputs archive. The reconnect backoff (100 ms doubling to 5 s, reset by a session that
//! came up, raced against shutdown) is a few lines in `session.rs`.

mod attempt;
pub mod executor;
mod identity;
mod inputs;
mod metrics;
mod outputs;
pub mod resources;
mod rsh_server;
mod session;
mod snapshot;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use muster_core::compute::Tier;

pub use resources::{GpuProbe, GpuReport, NoGpus, NvmlProbe};

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Server URLs (`http://host:port`); the agent uses the first that answers.
    pub servers: Vec<String>,
    /// The agent's own directory: node id, snapshot cache, attempt working directories.
    pub data_dir: PathBuf,
    /// The node's unique name (default: the hostname).
    pub name: String,
    /// The compute target it joins.
    pub compute: String,
    /// Dedicated or low-priority capacity.
    pub tier: Tier,
    /// Labels for placement.
    pub labels: BTreeMap<String, String>,
    /// The address peers of a distributed run use to reach this node.
    pub advertise_addr: String,
    /// Offer at most this many millicores (default: all CPUs).
    pub cpu_millis: Option<u64>,
    /// Offer at most this much memory (default: all memory).
    pub memory_bytes: Option<u64>,
    /// Offer no resource limits at all (the `local` target: runs are not packed).
    pub unlimited: bool,
    /// Where GPUs come from (NVML, or a fake in tests).
    pub gpu_probe: Arc<dyn GpuProbe>,
    /// How often GPUs are probed again (a recovered GPU becomes schedulable, a failed one
    /// is withdrawn), without restarting the agent.
    pub gpu_refresh: std::time::Duration,
    /// Ask the Docker engine for assigned GPUs with an NVIDIA device request (off for fake GPUs).
    pub gpu_device_requests: bool,
    /// Run a job that names an image as a process when no Docker engine is reachable
    /// (`muster dev`), instead of failing it.
    pub process_fallback: bool,
    /// Where the exec listener binds (`addr:port`; port 0 picks a free one). Peers of a
    /// distributed MPI run reach it at the advertised address and the bound port, which
    /// the agent advertises in the node label `muster.exec-port`.
    pub exec_listen: String,
    /// The rsh helper (`muster-rsh`, statically linked) mounted into the containers of
    /// distributed runs; `None`: `muster-rsh` next to the running executable, if present.
    pub rsh_helper: Option<PathBuf>,
    /// How long the launcher of a multi-node MPI run waits for its workers' containers to
    /// be up and reachable before the attempt fails.
    pub peer_wait: std::time::Duration,
}

impl AgentConfig {
    /// Defaults for an agent of compute `compute` talking to `server`.
    pub fn new(
        server: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        compute: impl Into<String>,
    ) -> AgentConfig {
        AgentConfig {
            servers: vec![server.into()],
            data_dir: data_dir.into(),
            name: hostname(),
            compute: compute.into(),
            tier: Tier::Dedicated,
            labels: BTreeMap::new(),
            advertise_addr: "127.0.0.1".into(),
            cpu_millis: None,
            memory_bytes: None,
            unlimited: false,
            gpu_probe: Arc::new(NvmlProbe::new()),
            gpu_refresh: std::time::Duration::from_secs(30),
            gpu_device_requests: true,
            process_fallback: false,
            exec_listen: "0.0.0.0:0".into(),
            rsh_helper: None,
            peer_wait: std::time::Duration::from_secs(300),
        }
    }
}

/// The rsh helper an agent mounts: `configured`, else `muster-rsh` next to the running
/// executable if it is there.
pub fn find_rsh_helper(configured: Option<&std::path::Path>) -> Option<PathBuf> {
    match configured {
        Some(p) => Some(p.to_path_buf()),
        None => std::env::current_exe()
            .ok()?
            .parent()
            .map(|d| d.join("muster-rsh"))
            .filter(|p| p.is_file()),
    }
}

/// The machine's hostname, as a node name (falls back to `node`).
pub fn hostname() -> String {
    sysinfo::System::host_name()
        .ok()
        .map(|h| h.split('.').next().unwrap_or(&h).to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

/// Runs an agent until `shutdown` resolves. Running attempts are stopped at shutdown.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    session::Agent::open(config)?.run(shutdown).await
}
