//! A seeded whole-system fault driver (issue 20, item 6): three real `muster server`
//! processes and real `muster agent` processes on 127.0.0.1, a workload of submits,
//! cancels and sweeps through the shared client (which fails over by itself, reusing each
//! idempotency key), and faults drawn from a printed seed: `kill -9` of a server or an
//! agent, and SIGSTOP/SIGCONT of either (a frozen VM, a stalled disk). One fault at a time,
//! each healed before the next, so a majority of servers is up between faults.
//!
//! Every acknowledged operation is recorded, and once the faults stop and the cluster
//! settles, [`check`] asserts what muster promises: no acknowledged run lost and none
//! duplicated (one run per idempotency key), every run in exactly one terminal state, an
//! acknowledged cancel ends the run canceled, at most one attempt of a run active at a time
//! (each started after the previous one ended), every completed run's log whole (what its
//! command printed, once), every acknowledged sweep ended, and all replicas equal (the same
//! state digest at the same applied index).
//!
//! `cargo test` runs a few seeds for seconds each (`tests/faults.rs`); `benches/soak.rs`
//! runs for as long as asked and reports operations and faults per minute. A violation
//! names the seed that reproduces the schedule of faults (the interleaving with the
//! workload is the machine's).
//!
//! Partitions: servers reach each other through a proxy in front of each (the addresses
//! in `--peers`), while clients and agents use the servers' own ports; cutting a proxy
//! drops every connection to that server from its peers. A full disk: when the driver
//! runs as root, each server's data directory is a tmpfs of its own, filled to the last
//! byte and then freed. Not injected: slow fsync (no portable way to slow one process's
//! disk without a device mapper).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use muster_client::{Clients, RetryPolicy, Servers};
use muster_core::RunSpec;
use muster_proto::v1;
use muster_proto::v1::cluster_service_client::ClusterServiceClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

use crate::agents::AgentProcess;
use crate::muster_bin;

/// What to run.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Seeds the schedule of faults.
    pub seed: u64,
    /// How long the workload and the faults run.
    pub duration: Duration,
    /// Agent processes (nodes of compute `pool`).
    pub agents: usize,
    /// Concurrent submit loops.
    pub submitters: usize,
    /// Pause between two faults, drawn from this range.
    pub between_faults: (Duration, Duration),
    /// How long a killed process stays down or a stopped one frozen, drawn from this range.
    pub fault_length: (Duration, Duration),
}

impl FaultPlan {
    /// A brief plan for `cargo test`: a few seconds of faults.
    pub fn brief(seed: u64) -> FaultPlan {
        FaultPlan {
            seed,
            duration: Duration::from_secs(15),
            agents: 2,
            submitters: 3,
            between_faults: (Duration::from_millis(300), Duration::from_millis(1200)),
            fault_length: (Duration::from_millis(300), Duration::from_millis(1500)),
        }
    }
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of server N (1-based), restarted after the fault's length.
    KillServer(usize),
    /// SIGSTOP of server N, SIGCONT after the fault's length.
    FreezeServer(usize),
    /// `kill -9` of agent N (0-based), restarted on its data directory.
    KillAgent(usize),
    /// SIGSTOP of agent N, SIGCONT after.
    FreezeAgent(usize),
    /// Server N's peers cannot reach it (its inbound server-to-server traffic is dropped
    /// at a proxy: an asymmetric partition, since it still reaches them), healed after.
    PartitionServer(usize),
    /// Server N's disk is full (its data directory's tmpfs filled), freed after.
    DiskFull(usize),
}

/// What a drive did and found.
#[derive(Debug, Default)]
pub struct FaultReport {
    /// The seed.
    pub seed: u64,
    /// How long the workload ran.
    pub ran_for: Duration,
    /// Acknowledged submits.
    pub submits: u64,
    /// Acknowledged cancels.
    pub cancels: u64,
    /// Acknowledged sweeps.
    pub sweeps: u64,
    /// Calls that failed after the client's retries, with why (allowed during faults; never
    /// a loss: the check finds at most one run for the key either way).
    pub failed_calls: Vec<String>,
    /// The faults, with when each began (from the workload's start).
    pub faults: Vec<(Duration, Fault)>,
    /// What broke a promise; empty when none did.
    pub violations: Vec<String>,
}

impl FaultReport {
    /// A summary: the seed, operations, faults, and each violation.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "seed {}: {:.0} s, {} submits, {} cancels, {} sweeps acknowledged, {} calls failed, {} faults",
            self.seed,
            self.ran_for.as_secs_f64(),
            self.submits,
            self.cancels,
            self.sweeps,
            self.failed_calls.len(),
            self.faults.len()
        );
        let count = |f: fn(&Fault) -> bool| self.faults.iter().filter(|(_, x)| f(x)).count();
        let _ = write!(
            out,
            " ({} server kills, {} server freezes, {} agent kills, {} agent freezes, {} partitions, {} full disks)",
            count(|f| matches!(f, Fault::KillServer(_))),
            count(|f| matches!(f, Fault::FreezeServer(_))),
            count(|f| matches!(f, Fault::KillAgent(_))),
            count(|f| matches!(f, Fault::FreezeAgent(_))),
            count(|f| matches!(f, Fault::PartitionServer(_))),
            count(|f| matches!(f, Fault::DiskFull(_))),
        );
        for f in self.failed_calls.iter().take(5) {
            let _ = write!(out, "\n  failed: {f}");
        }
        for v in &self.violations {
            let _ = write!(out, "\n  VIOLATION: {v}");
        }
        out
    }
}

/// A `muster server` child process that can be killed, frozen and started again.
#[derive(Debug)]
struct ServerProcess {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.child = Some(
            Command::new(muster_bin())
                .arg("server")
                .args(&self.args)
                .env("MUSTER_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        );
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, signal: Signal) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), signal);
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        self.kill();
    }
}

/// A TCP proxy on 127.0.0.1 in front of one server's port, for its peers. Cut, it drops
/// its connections and every new one.
#[derive(Debug)]
struct Proxy {
    port: u16,
    blocked: Arc<AtomicBool>,
    live: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: u16) -> std::io::Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let blocked = Arc::new(AtomicBool::new(false));
        let live = Arc::new(std::sync::Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let (b, l) = (blocked.clone(), live.clone());
        // Runs until the proxy is dropped (it aborts the task).
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if b.load(Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = out.set_nodelay(true);
                        let _ = inbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                let mut live = l.lock().expect("proxy lock");
                live.retain(|h| !h.is_finished());
                live.push(relay.abort_handle());
            }
        });
        Ok(Proxy {
            port,
            blocked,
            live,
            task,
        })
    }

    fn cut(&self) {
        self.blocked.store(true, Ordering::Relaxed);
        for h in self.live.lock().expect("proxy lock").drain(..) {
            h.abort();
        }
    }

    fn heal(&self) {
        self.blocked.store(false, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// A tmpfs mounted on a data directory (the driver runs as root); unmounted when dropped.
#[derive(Debug)]
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        // Only root may mount: elsewhere the mount fails and the disk is left as it is.
        std::fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    /// Fills it (bounded: 2 GiB) with a file; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        if let Ok(mut f) = std::fs::File::create(&path) {
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..2048 {
                if !matches!(f.write(&chunk), Ok(n) if n > 0) {
                    break;
                }
            }
            let _ = f.sync_all();
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn signal_agent(agent: &AgentProcess, signal: Signal) {
    if let Some(pid) = agent.pid() {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// What the workload saw acknowledged.
#[derive(Debug, Default)]
struct Acked {
    /// Idempotency key → the run id the submit answered.
    runs: BTreeMap<String, String>,
    /// Runs whose cancel was acknowledged.
    canceled: BTreeSet<String>,
    /// Sweep ids.
    sweeps: BTreeSet<String>,
}

/// The farm: servers, agents, and a client that fails over among the servers.
/// Three `muster server` processes on 127.0.0.1 (ids 1 to 3), each on its own data
/// directory, with the admin token registered: a cluster a test or benchmark can kill
/// (`kill -9`), freeze (SIGSTOP) and start again.
#[derive(Debug)]
pub struct ServerProcesses {
    servers: Vec<ServerProcess>,
    /// Proxies in front of each server for its peers (with [`ServerProcesses::start_faulty`]).
    proxies: Vec<Proxy>,
    /// Each server's data directory on a tmpfs of its own (likewise, as root).
    disks: Vec<Tmpfs>,
    /// Every server's URL, 1 first, comma-separated (a `--server` list).
    pub urls: String,
}

impl ServerProcesses {
    /// Starts the three servers in `dir` and waits (bounded) until they answer as a cluster.
    pub async fn start(dir: &Path) -> anyhow::Result<ServerProcesses> {
        Self::start_with(dir, false).await
    }

    /// [`ServerProcesses::start`], with the servers reaching each other through proxies
    /// (so a partition can be made) and, as root, each on a tmpfs (so a disk can fill).
    async fn start_faulty(dir: &Path) -> anyhow::Result<ServerProcesses> {
        Self::start_with(dir, true).await
    }

    async fn start_with(dir: &Path, faulty: bool) -> anyhow::Result<ServerProcesses> {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut proxies = Vec::new();
        let mut disks = Vec::new();
        if faulty {
            for p in &ports {
                proxies.push(Proxy::start(*p).await?);
            }
            for id in 1..=ports.len() {
                disks.extend(Tmpfs::mount(&dir.join(format!("s{id}")), "1g"));
            }
        }
        let peers = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let port = proxies.get(i).map_or(*p, |x| x.port);
                format!("{}=127.0.0.1:{port}", i + 1)
            })
            .collect::<Vec<_>>()
            .join(",");
        let key = dir.join("cluster.key");
        std::fs::write(&key, format!("{:064x}\n", rand::random::<u128>()))?;
        let mut servers = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let id = i + 1;
            let args = [
                "--id".to_string(),
                id.to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--peers".into(),
                peers.clone(),
                "--cluster-key-file".into(),
                key.display().to_string(),
                "--data-dir".into(),
                dir.join(format!("s{id}")).display().to_string(),
            ];
            let mut s = ServerProcess {
                args: args.to_vec(),
                log: dir.join(format!("s{id}.log")),
                child: None,
            };
            s.spawn()?;
            servers.push(s);
        }
        let urls = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        crate::access::await_admin_token(&dir.join("s1/admin-token"), &urls).await?;
        Ok(ServerProcesses {
            servers,
            proxies,
            disks,
            urls,
        })
    }

    /// Server `id`'s URL.
    pub fn url(&self, id: usize) -> &str {
        self.urls.split(',').nth(id - 1).unwrap_or_default()
    }

    /// `kill -9` of server `id`.
    pub fn kill(&mut self, id: usize) {
        self.servers[id - 1].kill();
    }

    /// Starts server `id` again on its data directory.
    pub fn restart(&mut self, id: usize) -> anyhow::Result<()> {
        self.servers[id - 1].kill();
        self.servers[id - 1].spawn()
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to server `id`.
    pub fn signal(&self, id: usize, signal: Signal) {
        self.servers[id - 1].signal(signal);
    }

    /// Cuts server `id` off from its peers (see [`Fault::PartitionServer`]).
    fn partition(&self, id: usize, cut: bool) {
        if let Some(p) = self.proxies.get(id - 1) {
            if cut { p.cut() } else { p.heal() }
        }
    }

    /// Fills server `id`'s disk; the filler file to remove, if its disk is a tmpfs.
    fn fill_disk(&self, id: usize) -> Option<PathBuf> {
        let dir = self.servers[id - 1]
            .args
            .windows(2)
            .find(|w| w[0] == "--data-dir")
            .map(|w| PathBuf::from(&w[1]))?;
        self.disks.iter().find(|d| d.0 == dir).map(Tmpfs::fill)
    }

    /// The leader that a majority of the running servers names (bounded: 10 s).
    pub async fn leader(&self) -> Option<usize> {
        for _ in 0..100 {
            let mut named = BTreeMap::<u64, usize>::new();
            for id in 1..=self.servers.len() {
                let ask = async {
                    let channel = crate::access::channel(self.url(id)).await.ok()?;
                    ClusterServiceClient::new(channel)
                        .status(v1::ClusterStatusRequest::default())
                        .await
                        .ok()
                        .and_then(|s| s.into_inner().leader)
                };
                if let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(1), ask).await {
                    *named.entry(l).or_default() += 1;
                }
            }
            if let Some((l, _)) = named.into_iter().find(|(_, n)| *n >= 2) {
                return Some(l as usize);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// A client that fails over among the servers, as the admin.
    pub fn client(&self) -> Servers {
        Servers::parse(&self.urls)
            .with_credentials(crate::access::admin(&self.urls))
            .with_request_timeout(Duration::from_secs(10))
    }
}

/// The farm: servers, and agents in compute `pool`.
struct Farm {
    cluster: ServerProcesses,
    agents: Vec<AgentProcess>,
    urls: String,
}

impl Farm {
    async fn start(dir: &Path, agents: usize) -> anyhow::Result<Farm> {
        let cluster = ServerProcesses::start_faulty(dir).await?;
        let urls = cluster.urls.clone();
        crate::access::create_attached(&urls, "pool").await?;
        let mut farm = Farm {
            cluster,
            agents: Vec::new(),
            urls,
        };
        for i in 0..agents {
            let name = format!("node-{i}");
            let data = dir.join(&name);
            farm.agents
                .push(AgentProcess::start(&farm.urls, "pool", &name, &data).await?);
        }
        Ok(farm)
    }

    fn client(&self) -> Servers {
        self.cluster.client()
    }
}

/// `rpc!(servers, SERVICE, METHOD, REQUEST)`: one unary call through the failing-over
/// client ([`try_call`]), the request sent again on each try; the answer or the error.
macro_rules! rpc {
    ($servers:expr, $service:ident, $method:ident, $req:expr) => {{
        let req = $req;
        try_call($servers, |channel| {
            let req = req.clone();
            async move {
                Clients::new(String::new(), channel)
                    .$service
                    .$method(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(muster_client::status)
            }
        })
        .await
    }};
}

/// Submits `spec` with idempotency key `key` through the failing-over client (retrying
/// within 60 s); the run, or why not.
pub async fn submit(
    servers: &mut Servers,
    spec: &v1::RunSpec,
    key: &str,
) -> Result<v1::Run, String> {
    let req = v1::SubmitRunRequest {
        spec: Some(spec.clone()),
        idempotency_key: Some(key.to_string()),
    };
    rpc!(servers, runs, submit_run, req)
}

/// One call through the failing-over client, bounded as a whole; the last error.
async fn try_call<T, F, Fut>(servers: &mut Servers, op: F) -> Result<T, String>
where
    F: FnMut(muster_client::Channel) -> Fut,
    Fut: Future<Output = Result<T, muster_client::ClientError>>,
{
    let policy = RetryPolicy {
        first_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(2),
        max_retries: 12,
    };
    match tokio::time::timeout(Duration::from_secs(60), servers.call(&policy, op)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 60 s".into()),
    }
}

/// [`try_call`] when only success matters.
async fn call<T, F, Fut>(servers: &mut Servers, op: F) -> Option<T>
where
    F: FnMut(muster_client::Channel) -> Fut,
    Fut: Future<Output = Result<T, muster_client::ClientError>>,
{
    try_call(servers, op).await.ok()
}

/// Short runs a submitter keeps in flight before it waits for the oldest.
const IN_FLIGHT: usize = 4;

fn run_spec(command: String) -> v1::RunSpec {
    let mut s = RunSpec::new(command);
    s.compute = "pool".into();
    s.experiment = "faults".into();
    s.into()
}

/// A submit loop: short runs that print their key, and every fifth a long one it cancels;
/// every tenth iteration a two-trial sweep.
async fn submitter(
    farm_urls: Servers,
    seed: u64,
    worker: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    failed: Arc<Mutex<Vec<String>>>,
) {
    let mut servers = farm_urls;
    let mut i = 0u64;
    // As a user's loop does, a submitter keeps a few short runs in flight and waits for the
    // oldest before it goes on: the backlog stays what the agents can run, so every run
    // can end before the check (a loop that only submits outruns any farm).
    let mut in_flight = std::collections::VecDeque::new();
    // Bounded: the driver sets `stop` when its time is up.
    while !stop.load(Ordering::Relaxed) && i < 100_000 {
        i += 1;
        let key = format!("fd-{seed}-{worker}-{i}");
        let long = i.is_multiple_of(5);
        let command = if long {
            format!("echo {key}; sleep 60")
        } else {
            format!("echo {key}")
        };
        let spec = run_spec(command);
        let run = match submit(&mut servers, &spec, &key).await {
            Ok(run) => run,
            Err(e) => {
                failed.lock().await.push(format!("submit {key}: {e}"));
                continue;
            }
        };
        acked.lock().await.runs.insert(key.clone(), run.id.clone());
        if !long {
            in_flight.push_back(run.id.clone());
        }
        if in_flight.len() > IN_FLIGHT
            && let Some(oldest) = in_flight.pop_front()
        {
            let req = v1::WaitRunRequest {
                id: oldest,
                timeout_ms: 30_000,
            };
            // A wait that fails (a fault) just moves on: the check waits for every run.
            let _ = rpc!(&mut servers, runs, wait_run, req);
        }
        if long {
            let req = v1::CancelRunRequest {
                id: run.id.clone(),
                reason: Some("fault driver".into()),
            };
            let canceled = rpc!(&mut servers, runs, cancel_run, req);
            match canceled {
                Ok(_) => {
                    acked.lock().await.canceled.insert(run.id);
                }
                Err(e) => failed.lock().await.push(format!("cancel {}: {e}", run.id)),
            }
        }
        if i.is_multiple_of(10) {
            let text = "type: sweep\ntrial:\n  command: echo \"##muster[metric] name=m value=${{search_space.x}}\"\ncompute: pool\nexperiment_name: faults\nsampling_algorithm: grid\nsearch_space:\n  x:\n    type: choice\n    values: [1, 2]\nobjective:\n  primary_metric: m\n  goal: maximize\nlimits:\n  max_total_trials: 2\n";
            let spec = muster_core::sweep::parse_sweep_yaml(text, "faults")
                .map(|s| muster_proto::sweep_spec_to_wire(&s))
                .expect("the driver's sweep parses");
            let k = format!("{key}-sweep");
            let req = v1::SubmitSweepRequest {
                spec: Some(spec),
                idempotency_key: Some(k.clone()),
            };
            let sweep = rpc!(&mut servers, sweeps, submit_sweep, req);
            match sweep {
                Ok(s) => {
                    acked.lock().await.sweeps.insert(s.id);
                }
                Err(e) => failed.lock().await.push(format!("sweep {k}: {e}")),
            }
        }
    }
}

fn between(rng: &mut StdRng, (lo, hi): (Duration, Duration)) -> Duration {
    if hi <= lo {
        return lo;
    }
    Duration::from_millis(rng.random_range(lo.as_millis() as u64..hi.as_millis() as u64))
}

/// Runs `plan` in `dir` (one data directory per server and agent, and their logs) and
/// checks the result. An error is the harness failing (a process that would not start),
/// not a violation.
pub async fn drive(dir: &Path, plan: &FaultPlan) -> anyhow::Result<FaultReport> {
    let mut farm = Farm::start(dir, plan.agents).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..plan.submitters)
        .map(|w| {
            tokio::spawn(submitter(
                farm.client(),
                plan.seed,
                w,
                stop.clone(),
                acked.clone(),
                failed.clone(),
            ))
        })
        .collect();

    let mut rng = StdRng::seed_from_u64(plan.seed);
    let start = Instant::now();
    let mut faults = Vec::new();
    while start.elapsed() < plan.duration {
        tokio::time::sleep(between(&mut rng, plan.between_faults)).await;
        let length = between(&mut rng, plan.fault_length);
        let server = rng.random_range(1..=3);
        let agent = rng.random_range(0..farm.agents.len().max(1));
        let fault = match rng.random_range(0..6) {
            0 => Fault::KillServer(server),
            1 => Fault::FreezeServer(server),
            2 if !farm.agents.is_empty() => Fault::KillAgent(agent),
            3 if !farm.agents.is_empty() => Fault::FreezeAgent(agent),
            4 => Fault::PartitionServer(server),
            5 if !farm.cluster.disks.is_empty() => Fault::DiskFull(server),
            _ => Fault::FreezeServer(server),
        };
        faults.push((start.elapsed(), fault));
        match fault {
            Fault::KillServer(n) => {
                farm.cluster.kill(n);
                tokio::time::sleep(length).await;
                farm.cluster.restart(n)?;
            }
            Fault::FreezeServer(n) => {
                farm.cluster.signal(n, Signal::SIGSTOP);
                tokio::time::sleep(length).await;
                farm.cluster.signal(n, Signal::SIGCONT);
            }
            Fault::KillAgent(n) => {
                farm.agents[n].kill();
                tokio::time::sleep(length).await;
                // A restart waits (bounded) for the node to be ready again.
                farm.agents[n].restart().await?;
            }
            Fault::FreezeAgent(n) => {
                signal_agent(&farm.agents[n], Signal::SIGSTOP);
                tokio::time::sleep(length).await;
                signal_agent(&farm.agents[n], Signal::SIGCONT);
            }
            Fault::PartitionServer(n) => {
                farm.cluster.partition(n, true);
                tokio::time::sleep(length).await;
                farm.cluster.partition(n, false);
            }
            Fault::DiskFull(n) => {
                let filler = farm.cluster.fill_disk(n);
                tokio::time::sleep(length).await;
                if let Some(f) = filler {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(120), w).await;
    }
    let ran_for = start.elapsed();
    let acked = std::mem::take(&mut *acked.lock().await);
    let mut report = FaultReport {
        seed: plan.seed,
        ran_for,
        submits: acked.runs.len() as u64,
        cancels: acked.canceled.len() as u64,
        sweeps: acked.sweeps.len() as u64,
        failed_calls: std::mem::take(&mut *failed.lock().await),
        faults,
        violations: Vec::new(),
    };
    report.violations = check(&farm, &acked).await;
    Ok(report)
}

fn is_terminal(state: v1::RunState) -> bool {
    matches!(
        state,
        v1::RunState::Completed
            | v1::RunState::Failed
            | v1::RunState::Canceled
            | v1::RunState::TimedOut
    )
}

/// Every run the cluster holds, through the failing-over client (bounded).
async fn all_runs(servers: &mut Servers) -> Option<Vec<v1::Run>> {
    let mut runs = Vec::new();
    let mut token = String::new();
    for _ in 0..10_000 {
        let req = v1::ListRunsRequest {
            page_size: 1000,
            page_token: token.clone(),
            ..Default::default()
        };
        let page = rpc!(servers, runs, list_runs, req).ok()?;
        runs.extend(page.runs);
        if page.next_page_token.is_empty() {
            return Some(runs);
        }
        token = page.next_page_token;
    }
    None
}

/// The whole log of a run's last attempt (bounded).
async fn log_of(servers: &mut Servers, id: &str) -> Option<String> {
    call(servers, |channel| {
        let req = v1::StreamLogsRequest {
            id: id.to_string(),
            ..Default::default()
        };
        async move {
            use futures::StreamExt;
            let mut c = Clients::new(String::new(), channel);
            let mut stream = c
                .runs
                .stream_logs(req)
                .await
                .map_err(muster_client::status)?
                .into_inner();
            let mut by_attempt: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(muster_client::status)?;
                by_attempt
                    .entry(chunk.attempt)
                    .or_default()
                    .extend(chunk.data);
            }
            let last = by_attempt.into_values().next_back().unwrap_or_default();
            Ok(String::from_utf8_lossy(&last).into_owned())
        }
    })
    .await
}

/// The runs of the driver's keys (`echo KEY…` commands), by key.
fn by_key(runs: &[v1::Run]) -> BTreeMap<String, Vec<&v1::Run>> {
    let mut by_key: BTreeMap<String, Vec<&v1::Run>> = BTreeMap::new();
    for run in runs {
        let key = run
            .spec
            .as_ref()
            .and_then(|s| s.command.strip_prefix("echo "))
            .map(|rest| rest.split(';').next().unwrap_or(rest).to_string());
        if let Some(key) = key.filter(|k| k.starts_with("fd-")) {
            by_key.entry(key).or_default().push(run);
        }
    }
    by_key
}

/// What the runs the cluster holds say about the acknowledged operations: lost,
/// duplicated, unfinished, overlapping attempts, cancels not honoured.
fn judge(runs: &[v1::Run], acked: &Acked) -> Vec<String> {
    let mut violations = Vec::new();
    let by_key = by_key(runs);
    for (key, id) in &acked.runs {
        match by_key.get(key).map(Vec::as_slice) {
            None | Some([]) => violations.push(format!("acknowledged run {id} ({key}) is lost")),
            Some([one]) if one.id != *id => violations.push(format!(
                "{key} was acknowledged as {id} but the cluster holds {}",
                one.id
            )),
            Some([_]) => {}
            Some(many) => violations.push(format!(
                "{key} is duplicated: {}",
                many.iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    for (key, found) in &by_key {
        if !acked.runs.contains_key(key) && found.len() > 1 {
            violations.push(format!("unacknowledged {key} made {} runs", found.len()));
        }
    }
    for run in runs {
        if !is_terminal(run.state()) {
            violations.push(format!(
                "run {} is still {:?} after the cluster settled",
                run.id,
                run.state()
            ));
        }
        let mut previous_end: Option<u64> = None;
        let mut active = 0;
        for a in &run.attempts {
            if a.state() != v1::AttemptState::Ended {
                active += 1;
            }
            if let (Some(end), Some(started)) = (previous_end, a.started_at_ms)
                && started < end
            {
                violations.push(format!(
                    "run {} attempt {} started before attempt {} ended",
                    run.id,
                    a.number,
                    a.number - 1
                ));
            }
            previous_end = a.finished_at_ms.or(previous_end);
        }
        if active > 1 {
            violations.push(format!("run {} has {active} active attempts", run.id));
        }
        if acked.canceled.contains(&run.id) && run.state() != v1::RunState::Canceled {
            violations.push(format!(
                "run {} was canceled (acknowledged) but ended {:?}",
                run.id,
                run.state()
            ));
        }
    }
    violations
}

/// Heals the farm, waits for it to settle, and checks every promise; the violations.
async fn check(farm: &Farm, acked: &Acked) -> Vec<String> {
    let mut violations = Vec::new();
    let mut servers = farm.client();
    // Every acknowledged run ends (the long ones were canceled; the rest are short).
    let settle = Instant::now() + Duration::from_secs(180);
    let mut runs = Vec::new();
    while Instant::now() < settle {
        if let Some(r) = all_runs(&mut servers).await {
            let done = r.iter().all(|run| is_terminal(run.state()));
            runs = r;
            if done {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    violations.extend(judge(&runs, acked));
    let by_key = by_key(&runs);
    // Logs whole: a completed short run printed its key once.
    for (key, id) in acked.runs.iter().filter(|(k, _)| by_key.contains_key(*k)) {
        let Some(run) = runs.iter().find(|r| r.id == *id) else {
            continue;
        };
        if run.state() != v1::RunState::Completed {
            continue;
        }
        match log_of(&mut servers, id).await {
            Some(log) if log == format!("{key}\n") => {}
            Some(log) => violations.push(format!("run {id}'s log is {log:?}, not {key:?}")),
            None => violations.push(format!("run {id}'s log cannot be read")),
        }
    }
    // Every acknowledged sweep ended.
    for id in &acked.sweeps {
        let req = v1::GetSweepRequest {
            id: id.clone(),
            stale: false,
        };
        let sweep = rpc!(&mut servers, sweeps, get_sweep, req).ok();
        match sweep {
            None => violations.push(format!("acknowledged sweep {id} cannot be read")),
            Some(s)
                if matches!(
                    s.state(),
                    v1::SweepState::Running | v1::SweepState::Canceling
                ) =>
            {
                violations.push(format!("sweep {id} is still {:?}", s.state()));
            }
            Some(_) => {}
        }
    }
    if let Some(v) = replicas_differ(farm).await {
        violations.push(v);
    }
    violations
}

/// Asks each server for its state digest until all three agree at one applied index
/// (bounded: 60 s); why not, if they never did.
async fn replicas_differ(farm: &Farm) -> Option<String> {
    let mut last = Vec::new();
    for _ in 0..120 {
        let mut views = Vec::new();
        for url in farm.urls.split(',') {
            let view = async {
                let channel = crate::access::channel(url).await.ok()?;
                let status = ClusterServiceClient::new(channel)
                    .status(v1::ClusterStatusRequest {
                        state_digest: true,
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner();
                Some((status.digest_index, status.state_digest.unwrap_or_default()))
            };
            views.push(
                tokio::time::timeout(Duration::from_secs(5), view)
                    .await
                    .ok()
                    .flatten(),
            );
        }
        let agreed = views.iter().all(|v| v.is_some() && *v == views[0]);
        if agreed {
            return None;
        }
        last = views;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Some(format!(
        "the replicas never agreed within 60 s: (applied index, state digest) per server {last:?}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, key: &str, state: v1::RunState, attempts: &[(u64, Option<u64>)]) -> v1::Run {
        let mut r = v1::Run {
            id: id.into(),
            spec: Some(run_spec(format!("echo {key}"))),
            ..Default::default()
        };
        r.set_state(state);
        for (i, (started, finished)) in attempts.iter().enumerate() {
            let mut a = v1::Attempt {
                number: i as u32 + 1,
                started_at_ms: Some(*started),
                finished_at_ms: *finished,
                ..Default::default()
            };
            a.set_state(if finished.is_some() {
                v1::AttemptState::Ended
            } else {
                v1::AttemptState::Running
            });
            r.attempts.push(a);
        }
        r
    }

    #[test]
    fn the_judge_names_every_broken_promise_and_passes_a_clean_history() {
        use v1::RunState::*;
        let mut acked = Acked::default();
        for (k, id) in [
            ("fd-1", "r1"),
            ("fd-2", "r2"),
            ("fd-3", "r3"),
            ("fd-4", "r4"),
        ] {
            acked.runs.insert(k.into(), id.into());
        }
        acked.canceled.insert("r4".into());
        let clean = [
            run("r1", "fd-1", Completed, &[(10, Some(20)), (30, Some(40))]),
            run("r2", "fd-2", Failed, &[(10, Some(20))]),
            run("r3", "fd-3", Completed, &[(10, Some(20))]),
            run("r4", "fd-4", Canceled, &[]),
        ];
        assert_eq!(judge(&clean, &acked), Vec::<String>::new());

        let broken = [
            // r1: its second attempt began before the first ended.
            run("r1", "fd-1", Completed, &[(10, Some(50)), (30, Some(60))]),
            // r2 is gone; fd-3 has two runs; r4 ignored its cancel and still runs.
            run("r3", "fd-3", Completed, &[(10, Some(20))]),
            run("r3b", "fd-3", Completed, &[(10, Some(20))]),
            run("r4", "fd-4", Running, &[(10, None), (20, None)]),
        ];
        let v = judge(&broken, &acked).join("\n");
        for expected in [
            "r1 attempt 2 started before attempt 1 ended",
            "acknowledged run r2 (fd-2) is lost",
            "fd-3 is duplicated: r3, r3b",
            "run r4 is still Running",
            "run r4 has 2 active attempts",
            "run r4 was canceled (acknowledged) but ended Running",
        ] {
            assert!(v.contains(expected), "{expected:?} not in:\n{v}");
        }
    }
}
