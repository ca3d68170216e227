//! # muster-agent: the node
//!
//! `muster agent` runs on every machine of a compute target. It finds what the machine
//! offers (`resources.rs`: sysinfo for CPU and memory, NVML for GPUs), registers with a
//! server, keeps one session stream open (`session.rs`), and runs each assignment: a pure
//! planner turns it into an `AttemptPlan` (`plan.rs`: environment, GPU visibility, limits,
//! the container, the MPI gate), and `attempt.rs` carries the plan out: fetch the code
//! snapshot (`snapshot.rs`, through `blobs.rs`, which fails over to the other servers),
//! execute (`executor/`: one [`executor::Executor`] trait, Docker or process), ship the log
//! and metrics live (`ship.rs`, one shipper for both), upload `outputs/` (`outputs.rs`),
//! report the end — and resend what the server has not acknowledged after a reconnect. It
//! decides no placement.
//!
//! Distributed runs (DESIGN.md section 9): each rank gets the environment muster-core
//! computes from the whole placement (`muster_core::distributed`), its container shares
//! the node's network, and `rsh_server.rs` is the exec listener through which `muster-rsh`
//! (mounted into the containers) lets `mpirun` on rank 0 start processes in the other
//! ranks' containers; rank 0 starts its launcher only once every worker is up.
//!
//! Crate choices: `sysinfo` and `nvml-wrapper` (loads libnvidia-ml at run time, so the
//! agent builds and runs without a driver), `nix` for process-group signals, `tar` for the
//! outputs archive, `backon` for the reconnect backoff (100 ms doubling to 5 s, reset by a
//! session that came up, raced against shutdown). Errors are one thiserror enum per module;
//! [`AgentError`] is what [`run`] returns.

mod attempt;
mod blobs;
mod checkpoint;
mod credential;
pub mod executor;
mod fetch;
mod identity;
mod inputs;
mod metrics;
mod outputs;
mod plan;
pub mod resources;
mod rsh_server;
mod secrets;
mod session;
mod ship;
mod snapshot;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use muster_core::compute::Tier;

pub use identity::IdentityError;
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
    /// Run at most this many attempts at once (`None`: no cap beyond CPU, memory and GPUs).
    pub max_runs: Option<u32>,
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
    /// Run every attempt with this executor instead of the Docker engine or processes
    /// (tests: muster-testkit's fake executor). `None`: Docker if reachable, else processes.
    pub executor: Option<Arc<dyn executor::Executor>>,
    /// A single-use join token (`--join`, from `muster token create --join`), traded on
    /// first start for the node's credential, which is kept in `<data_dir>/credential`
    /// (0600) and used from then on; not needed once that file exists.
    pub join_token: Option<String>,
    /// Talk TLS: trust this CA, and, when it carries the agent's own certificate
    /// (`muster tls agent`), present it: the certificate then says which node this is and
    /// no join token or credential is needed.
    pub tls: Option<muster_client::ClientTls>,
    /// With a join token and no `tls`: the cluster CA's fingerprint (`SHA256:<hex>`). The
    /// agent fetches the CA the servers present, keeps it if the fingerprint matches, and
    /// joins with a certificate request (`<data_dir>/tls/`).
    pub ca_fingerprint: Option<String>,
    /// How often the agent pings an otherwise quiet server connection (HTTP/2 keep-alive;
    /// a ping unanswered for 2 s drops the connection and the agent tries the next server).
    /// 1 s by default, so a leader cut off without a reset is left within ~3 s. `muster dev`
    /// sets 20 s: its agent and server share one process, which no partition splits, and
    /// an idle `muster dev` then hardly wakes.
    pub keep_alive: std::time::Duration,
    /// `--run-as`: run processes (not containers) as this unprivileged user, each in a
    /// working directory private to its attempt, with rlimits. Needs the agent to be root.
    pub run_as: Option<executor::confine::RunUser>,
}

/// A setting of [`AgentConfig`] that cannot work; each names the flag to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No server to talk to.
    #[error("give at least one server address (--server)")]
    NoServers,
    /// A server address that is not a URL.
    #[error("--server: {url:?} is not a server address ({cause}): write it as http://HOST:PORT")]
    ServerUrl {
        /// What was given.
        url: String,
        /// What is wrong with it.
        cause: String,
    },
    /// The node name is empty.
    #[error("--name: the node name is empty: pass a name or leave the flag out for the hostname")]
    NoName,
    /// No compute target.
    #[error("--compute: name the compute target this node joins")]
    NoCompute,
    /// No address for peers.
    #[error("--advertise-addr: give the address other nodes reach this one at")]
    NoAdvertiseAddr,
    /// The exec listener's address has no port.
    #[error("--exec-listen: {0:?} is not ADDRESS:PORT (port 0 picks a free one)")]
    ExecListen(String),
    /// GPUs would be probed in a busy loop.
    #[error("the GPU refresh interval must be longer than zero")]
    GpuRefresh,
    /// `--run-as` needs the agent to switch users.
    #[error(
        "--run-as: the agent runs as uid {uid}, not root, so it cannot start runs as another user: start the agent as root (the shipped systemd unit does) or drop --run-as"
    )]
    RunAsNotRoot {
        /// The agent's uid.
        uid: u32,
    },
    /// The run user cannot reach the attempts' folders.
    #[error(
        "--run-as: the run user (uid {uid}) cannot reach {}: it is mode {mode:o}; let others search it (chmod o+x) or pick a --data-dir it can reach",
        dir.display()
    )]
    RunAsUnreachable {
        /// The run user.
        uid: u32,
        /// The folder it cannot search.
        dir: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

impl AgentConfig {
    /// Checks the settings before anything starts: a bad `--server` is an error here, never
    /// a panic later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(ConfigError::NoServers);
        }
        for url in &self.servers {
            check_server_url(url)?;
        }
        if self.name.trim().is_empty() {
            return Err(ConfigError::NoName);
        }
        if self.compute.trim().is_empty() {
            return Err(ConfigError::NoCompute);
        }
        if self.advertise_addr.trim().is_empty() {
            return Err(ConfigError::NoAdvertiseAddr);
        }
        let port = self.exec_listen.rsplit_once(':').map(|(_, p)| p);
        if port.is_none_or(|p| p.parse::<u16>().is_err()) {
            return Err(ConfigError::ExecListen(self.exec_listen.clone()));
        }
        if self.gpu_refresh.is_zero() {
            return Err(ConfigError::GpuRefresh);
        }
        if self.run_as.is_some() && !executor::confine::agent_is_root() {
            return Err(ConfigError::RunAsNotRoot {
                uid: nix::unistd::geteuid().as_raw(),
            });
        }
        Ok(())
    }
}

/// A server URL the agent can connect to: `http://` or `https://`, with a host.
fn check_server_url(url: &str) -> Result<(), ConfigError> {
    let bad = |cause: &str| ConfigError::ServerUrl {
        url: url.to_string(),
        cause: cause.to_string(),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(&e.to_string()))?;
    let uri = endpoint.uri();
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("it must start with http:// or https://"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("it names no host"));
    }
    Ok(())
}

/// Why the agent stopped (it retries everything else: a server that is down, a session
/// that broke).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A setting cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory cannot be used.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A directory of the data directory.
    #[error("cannot create {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The exec listener cannot bind.
    #[error(
        "cannot listen for exec requests of distributed runs on {addr}: {source}: pick another --exec-listen address"
    )]
    ExecListen {
        /// `--exec-listen`.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server refused this agent (a bad name, an unknown compute target, ...).
    #[error("the server refused this agent: {0}")]
    Refused(String),
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
            max_runs: None,
            gpu_probe: Arc::new(NvmlProbe::new()),
            gpu_refresh: std::time::Duration::from_secs(30),
            gpu_device_requests: true,
            process_fallback: false,
            exec_listen: "0.0.0.0:0".into(),
            rsh_helper: None,
            peer_wait: std::time::Duration::from_secs(300),
            executor: None,
            join_token: None,
            tls: None,
            ca_fingerprint: None,
            keep_alive: std::time::Duration::from_secs(1),
            run_as: None,
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

/// Runs an agent until `shutdown` resolves. Running processes are stopped at shutdown
/// (containers keep running and are re-adopted). The config is validated first.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    config.validate()?;
    session::Agent::open(config)?.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_server_url_is_an_error_naming_the_flag() {
        let ok = AgentConfig::new("http://10.0.0.1:7070", "/tmp/x", "gpu");
        assert_eq!(ok.validate(), Ok(()));
        for bad in [
            "http://bad host:1",
            "10.0.0.1:7070",
            "ftp://h:1",
            "http://",
            "",
        ] {
            let mut c = ok.clone();
            c.servers = vec!["http://ok:1".into(), bad.into()];
            let e = c.validate().unwrap_err();
            assert!(matches!(e, ConfigError::ServerUrl { .. }), "{bad}: {e}");
            assert!(e.to_string().starts_with("--server: "), "{e}");
        }
        let mut c = ok.clone();
        c.servers.clear();
        assert_eq!(c.validate(), Err(ConfigError::NoServers));
    }

    #[test]
    fn other_settings_are_checked_too() {
        let ok = AgentConfig::new("https://s:443", "/tmp/x", "gpu");
        let mut c = ok.clone();
        c.exec_listen = "0.0.0.0".into();
        assert_eq!(c.validate(), Err(ConfigError::ExecListen("0.0.0.0".into())));
        let mut c = ok.clone();
        c.compute = " ".into();
        assert_eq!(c.validate(), Err(ConfigError::NoCompute));
        let mut c = ok.clone();
        c.name.clear();
        assert_eq!(c.validate(), Err(ConfigError::NoName));
        let mut c = ok;
        c.gpu_refresh = std::time::Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::GpuRefresh));
    }
}
