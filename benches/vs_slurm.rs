//! # muster vs Slurm, real agents (issue 18)
//!
//! The same workload, on the same machine, through a real `muster dev` process (the release
//! `muster` binary: server and local agent running real processes) and through a one-node
//! Slurm (slurmctld + slurmd + munged, brought up by `benches/slurm/start.sh` in a scratch
//! directory), taken in turn for `--rounds` rounds. Every job is submitted by a real CLI
//! process, as a user would: `muster run submit -- true` against `sbatch -o /dev/null --wrap
//! true`. Per system and round it measures:
//!
//! - **throughput**: `--jobs` N `true` jobs from `--submitters` S concurrent submitters (each
//!   one CLI process at a time): wall time from the first submission until every job has
//!   finished (muster: no run queued or active on the `local` target, then every run of the
//!   batch checked completed, exactly N, none duplicated; Slurm: `squeue -h` empty, N job ids
//!   accepted, each found COMPLETED by `scontrol show job`), jobs/s, and CLI submits/s (N /
//!   time until every submit process returned);
//! - **submit acknowledgement**: each submit process's wall time, under that load and on an
//!   idle system (`--idle-submits` sequential submits, after one not counted: the first
//!   process after the idle watch pays the machine's wake-up), p50/p99;
//! - **a waiting client**: `--waits` sequential `muster run submit --stream -- true` against
//!   `srun true` (submit, run, and return with the exit code), p50/p99;
//! - **submit → first command**: a job that runs `date +%s.%N` into a file, against the
//!   clock just before its submit process started, p50/p99 over `--waits` jobs, each after
//!   a pause of 0–1 s (so the samples do not lock onto slurmctld's once-a-second scheduling
//!   pass);
//! - **the CLI alone**: `muster --version` against `sbatch --version` (process start only),
//!   to tell process start from the request in the submit figures;
//! - **idle CPU** of the daemons over `--idle-secs` (the `muster dev` process against
//!   slurmctld + slurmd + munged; utime + stime from /proc/PID/stat);
//! - **`--agents` agents** (muster only): the throughput workload again through a fresh
//!   `muster dev` with `--agents - 1` further `muster agent` processes joined to `local`,
//!   beside the CLI submits/s of that batch (the submitters' bound).
//!
//! Slurm is used only when its commands (and munged) are on PATH; the benchmark installs
//! nothing. Without them it prints muster's figures alone.
//!
//! `cargo run --release -p muster-benches --bin vs-slurm -- --jobs 1000 --submitters 16 --rounds 3`
//!
//! (quick: `-- --jobs 50 --submitters 4 --rounds 1 --idle-secs 5 --idle-submits 10 --waits 5`)

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use muster_proto::Word;
use muster_proto::v1;
use muster_testkit::{DevProcess, access, muster};

#[derive(Debug, Parser)]
struct Args {
    /// `true` jobs in the throughput measurement.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Concurrent submitters (each runs one CLI process at a time).
    #[arg(long, default_value_t = 16)]
    submitters: usize,
    /// Rounds (each: muster, then Slurm, each on a fresh instance).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds the idle daemons are watched.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Sequential submits on an idle system (after one that is not counted).
    #[arg(long, default_value_t = 100)]
    idle_submits: usize,
    /// Samples of the waiting client and of submit → first command.
    #[arg(long, default_value_t = 20)]
    waits: usize,
    /// Seconds all the jobs of the throughput measurement may take to finish.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Runs a muster node holds at once (`muster dev --max-runs`); the default, 64, matches
    /// the Slurm node's `OverSubscribe=FORCE:32` on this machine's 2 CPUs.
    #[arg(long, default_value_t = 64)]
    max_runs: u32,
    /// Measure muster alone even where Slurm is installed.
    #[arg(long)]
    no_slurm: bool,
    /// Also take the throughput workload through muster with this many agents (the dev's
    /// own plus `muster agent` processes joining `local` on 127.0.0.1, each with
    /// `--max-runs`); 1 skips it.
    #[arg(long, default_value_t = 4)]
    agents: usize,
}

/// Longest any single CLI process may take before the benchmark gives up.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a system may take to finish the jobs of a latency measurement.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a job may take to write its first-command stamp.
const STAMP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often completion is polled (both systems).
const POLL: Duration = Duration::from_millis(100);
/// The commands a Slurm comparison needs.
const SLURM_COMMANDS: &[&str] = &[
    "munged",
    "slurmctld",
    "slurmd",
    "sinfo",
    "sbatch",
    "srun",
    "squeue",
    "scontrol",
];

/// What one system measured in one round.
#[derive(Debug, Clone, Default)]
struct Figures {
    /// First submission → every job finished, seconds.
    wall_s: f64,
    /// Jobs / wall.
    jobs_per_s: f64,
    /// Jobs / time until every submit process returned.
    submits_per_s: f64,
    /// Submit process wall time under load, p50 and p99 ms.
    ack_load: (f64, f64),
    /// Submit process wall time on an idle system, p50 and p99 ms.
    ack_idle: (f64, f64),
    /// `submit --stream` / `srun`, p50 and p99 ms.
    waiting: (f64, f64),
    /// Submit process start → the job's first command, p50 and p99 ms.
    first_cmd: (f64, f64),
    /// CPU of the idle daemons, % of one core.
    idle_cpu_pct: f64,
    /// The submit CLI alone (`--version`: process start, no request), p50 ms.
    cli_alone: f64,
    /// The throughput workload again with `--agents` agents (muster only): jobs/s, and
    /// CLI submits/s (the submitters' bound).
    agents_jobs_per_s: f64,
    agents_submits_per_s: f64,
}

/// One row of the tables: its label, how to read it from [`Figures`], decimals.
struct Row {
    label: String,
    get: fn(&Figures) -> f64,
    decimals: usize,
}

/// The rows of every table, in order.
fn rows(args: &Args) -> Vec<Row> {
    let row = |label: &str, get: fn(&Figures) -> f64, decimals| Row {
        label: label.to_string(),
        get,
        decimals,
    };
    vec![
        row(
            &format!("{} jobs, {} submitters: wall s", args.jobs, args.submitters),
            |f| f.wall_s,
            2,
        ),
        row("  jobs/s (finished)", |f| f.jobs_per_s, 1),
        row("  CLI submits/s (all returned)", |f| f.submits_per_s, 1),
        row("  submit ack under load p50 ms", |f| f.ack_load.0, 1),
        row("  submit ack under load p99 ms", |f| f.ack_load.1, 1),
        row(
            &format!("submit ack idle p50 ms ({} sequential)", args.idle_submits),
            |f| f.ack_idle.0,
            1,
        ),
        row("submit ack idle p99 ms", |f| f.ack_idle.1, 1),
        row("  CLI start alone p50 ms (`--version`)", |f| f.cli_alone, 1),
        row(
            &format!("waiting client p50 ms ({} `--stream`/srun)", args.waits),
            |f| f.waiting.0,
            1,
        ),
        row("waiting client p99 ms", |f| f.waiting.1, 1),
        row("submit → first command p50 ms", |f| f.first_cmd.0, 1),
        row("submit → first command p99 ms", |f| f.first_cmd.1, 1),
        row(
            &format!("idle daemons CPU % over {} s", args.idle_secs),
            |f| f.idle_cpu_pct,
            2,
        ),
    ]
    .into_iter()
    .chain(
        (args.agents > 1)
            .then(|| {
                [
                    row(
                        &format!("{} agents: jobs/s (finished)", args.agents),
                        |f| f.agents_jobs_per_s,
                        1,
                    ),
                    row(
                        &format!("{} agents: CLI submits/s (the bound)", args.agents),
                        |f| f.agents_submits_per_s,
                        1,
                    ),
                ]
            })
            .into_iter()
            .flatten(),
    )
    .collect()
}

/// A pause between 0 and 1 s, different each time (from the clock's nanoseconds).
fn jitter() -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Scramble the low digits (the clock's resolution may be coarse).
    Duration::from_millis(u64::from(nanos.wrapping_mul(2_654_435_761) >> 8) % 1000)
}

/// The wall clock, in seconds since the Unix epoch (what `date +%s.%N` prints).
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// CPU the processes `pids` used together while idle for `secs`, in % of one core.
async fn idle_cpu(pids: &[u32], secs: u64) -> anyhow::Result<f64> {
    // Let start-up work settle first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sum = || -> anyhow::Result<u64> {
        pids.iter()
            .map(|p| muster_testkit::procfs::cpu_ticks(*p))
            .sum()
    };
    let before = sum()?;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let after = sum()?;
    let hz = muster_testkit::procfs::TICKS_PER_SEC;
    Ok((after - before) as f64 / hz / start.elapsed().as_secs_f64() * 100.0)
}

/// Whether `cmd` is an executable file in a directory of PATH.
fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(cmd)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

/// Runs `cmd` to its end and collects what it printed; kills it after `timeout`.
async fn run_bounded(
    mut cmd: tokio::process::Command,
    timeout: Duration,
) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = format!("{:?}", cmd.as_std());
    tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("{what} did not finish within {} s", timeout.as_secs()))?
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// A one-node Slurm in a scratch directory, stopped (by `stop.sh`) when dropped.
struct Slurm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    /// Where jobs run (their working directory).
    work: PathBuf,
}

impl Slurm {
    /// Where `start.sh` and `stop.sh` are (this crate's `slurm/`).
    fn scripts() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm")
    }

    /// Runs `start.sh` on a fresh directory, on free ports.
    async fn start() -> anyhow::Result<Slurm> {
        let dir = tempfile::Builder::new().prefix("vs-slurm-").tempdir()?;
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work)?;
        let free_port = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("0.0.0.0:0")?
                .local_addr()?
                .port())
        };
        let mut cmd = tokio::process::Command::new(Self::scripts().join("start.sh"));
        cmd.arg(dir.path())
            .env("SLURM_BENCH_CTLD_PORT", free_port()?.to_string())
            .env("SLURM_BENCH_SLURMD_PORT", free_port()?.to_string());
        let slurm = Slurm {
            conf: dir.path().join("slurm.conf"),
            dir,
            work,
        };
        let out = run_bounded(cmd, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            out.status.success(),
            "benches/slurm/start.sh failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        anyhow::ensure!(
            String::from_utf8_lossy(&out.stdout).contains("export SLURM_CONF="),
            "start.sh did not print SLURM_CONF"
        );
        Ok(slurm)
    }

    /// A Slurm command with this instance's config.
    fn cmd(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(program);
        c.env("SLURM_CONF", &self.conf).current_dir(&self.work);
        c
    }

    /// The daemons' pids (slurmctld, slurmd, munged).
    fn pids(&self) -> anyhow::Result<Vec<u32>> {
        ["slurmctld.pid", "slurmd.pid", "munge/munged.pid"]
            .iter()
            .map(|f| {
                let path = self.dir.path().join(f);
                Ok(std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                    .trim()
                    .parse()?)
            })
            .collect()
    }

    /// `sbatch -o /dev/null --wrap SCRIPT`; the job id.
    async fn sbatch(&self, script: &str) -> anyhow::Result<String> {
        let mut c = self.cmd("sbatch");
        c.args(["-o", "/dev/null", "--wrap", script]);
        let out = run_bounded(c, CLI_TIMEOUT).await?;
        anyhow::ensure!(
            out.status.success(),
            "sbatch failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .strip_prefix("Submitted batch job ")
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("sbatch printed {text:?}, no job id"))
    }

    /// Whether no job is pending, running or completing.
    async fn drained(&self) -> anyhow::Result<bool> {
        let mut c = self.cmd("squeue");
        c.arg("-h");
        let out = run_bounded(c, CLI_TIMEOUT).await?;
        Ok(out.status.success() && out.stdout.iter().all(u8::is_ascii_whitespace))
    }

    /// State of every job slurmctld still remembers, by id.
    async fn job_states(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut c = self.cmd("scontrol");
        c.args(["-o", "show", "job"]);
        let out = run_bounded(c, CLI_TIMEOUT).await?;
        anyhow::ensure!(out.status.success(), "scontrol show job failed");
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter_map(|l| {
                let field = |name: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .map(str::to_string)
                };
                Some((field("JobId=")?, field("JobState=")?))
            })
            .collect())
    }

    /// Slurm's version (`slurmctld -V`: `sinfo -V` wants a configuration).
    fn version() -> String {
        Command::new("slurmctld")
            .arg("-V")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }
}

impl Drop for Slurm {
    /// Stops the daemons (bounded, in `stop.sh`) before the directory is removed.
    fn drop(&mut self) {
        let stopped = Command::new(Self::scripts().join("stop.sh"))
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .status();
        if !stopped.is_ok_and(|s| s.success()) {
            eprintln!(
                "vs-slurm: stopping Slurm in {} failed",
                self.dir.path().display()
            );
        }
    }
}

/// A real `muster dev` process on a fresh data directory, and an empty directory the CLI
/// submits from (so every snapshot is empty, as `sbatch --wrap` ships no code).
struct Muster {
    dev: DevProcess,
    work: PathBuf,
    /// Further `muster agent` processes on `local` (killed on drop).
    agents: Vec<AgentChild>,
    dir: tempfile::TempDir,
}

/// A `muster agent` process, killed when dropped.
struct AgentChild(std::process::Child);

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Muster {
    /// Starts `muster dev` on a fresh temporary directory and a free port (the testkit's
    /// [`DevProcess`]: ready once its admin token works and its local node is ready).
    async fn start(max_runs: u32) -> anyhow::Result<Muster> {
        let dir = tempfile::Builder::new().prefix("vs-muster-").tempdir()?;
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work)?;
        let max_runs = max_runs.to_string();
        let dev =
            DevProcess::start_with(&dir.path().join("data"), &["--max-runs", &max_runs]).await?;
        Ok(Muster {
            dev,
            work,
            agents: Vec::new(),
            dir,
        })
    }

    /// Adds `n` `muster agent` processes to `local` (joined with single-use tokens, each
    /// running up to `max_runs` runs) and waits until every node is ready.
    async fn add_agents(&mut self, n: usize, max_runs: u32) -> anyhow::Result<()> {
        let url = self.dev.url();
        for i in 0..n {
            let join = access::join_token(&url, "local").await?;
            let dir = self.dir.path().join(format!("agent-{i}"));
            let log = std::fs::File::create(self.dir.path().join(format!("agent-{i}.log")))?;
            let child = Command::new(muster_testkit::muster_bin())
                .args([
                    "--server",
                    &url,
                    "agent",
                    "--compute",
                    "local",
                    "--join",
                    &join,
                ])
                .args([
                    "--name",
                    &format!("vs-agent-{i}"),
                    "--max-runs",
                    &max_runs.to_string(),
                ])
                .arg("--data-dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?;
            self.agents.push(AgentChild(child));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut c = access::clients(&url).await?;
            let nodes = c
                .compute
                .list_nodes(v1::ListNodesRequest::default())
                .await?
                .into_inner()
                .nodes;
            let ready = nodes
                .iter()
                .filter(|n| n.state() == v1::NodeState::Ready)
                .count();
            if ready > n {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{ready} of {} nodes ready within 60 s",
                n + 1
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// `muster run submit --experiment TAG [--stream] -- COMMAND...` as the admin, through
    /// the real CLI; the run id (or, with `--stream`, the run's output).
    async fn submit(&self, tag: &str, stream: bool, command: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["run", "submit", "--experiment", tag];
        if stream {
            args.push("--stream");
        }
        args.push("--");
        args.extend_from_slice(command);
        let out = tokio::time::timeout(CLI_TIMEOUT, muster(&self.dev.url(), &self.work, &args))
            .await
            .map_err(|_| anyhow::anyhow!("muster {args:?} took over {CLI_TIMEOUT:?}"))?;
        anyhow::ensure!(
            out.code == 0,
            "muster {args:?} exited {}: {}",
            out.code,
            out.stderr.trim()
        );
        let id = out.stdout.trim().to_string();
        anyhow::ensure!(stream || !id.is_empty(), "muster run submit printed no id");
        Ok(id)
    }

    /// Whether the `local` target has no run queued or active.
    async fn drained(&self) -> anyhow::Result<bool> {
        let mut c = access::clients(&self.dev.url()).await?;
        let local = c
            .compute
            .get_compute(v1::GetComputeRequest {
                name: "local".into(),
            })
            .await?
            .into_inner();
        Ok(local.queued_runs == 0 && local.active_runs == 0)
    }

    /// Every run of experiment `tag`.
    async fn runs(&self, tag: &str) -> anyhow::Result<Vec<v1::Run>> {
        let mut c = access::clients(&self.dev.url()).await?;
        Ok(c.runs
            .list_runs(v1::ListRunsRequest {
                experiment: Some(tag.into()),
                ..Default::default()
            })
            .await?
            .into_inner()
            .runs)
    }
}

/// The system under measurement.
enum System {
    Muster(Muster),
    Slurm(Slurm),
}

impl System {
    /// The name the tables use.
    fn name(&self) -> &'static str {
        match self {
            System::Muster(_) => "muster",
            System::Slurm(_) => "Slurm",
        }
    }

    /// One `true` job through the CLI; its id.
    async fn submit_true(&self, tag: &str) -> anyhow::Result<String> {
        match self {
            System::Muster(m) => m.submit(tag, false, &["true"]).await,
            System::Slurm(s) => s.sbatch("true").await,
        }
    }

    /// The submit CLI with `--version`: what starting the process costs, no request.
    async fn cli_alone(&self) -> anyhow::Result<()> {
        match self {
            System::Muster(m) => {
                let out = muster(&m.dev.url(), &m.work, &["--version"]).await;
                anyhow::ensure!(out.code == 0, "muster --version exited {}", out.code);
            }
            System::Slurm(s) => {
                let mut c = s.cmd("sbatch");
                c.arg("--version");
                let out = run_bounded(c, CLI_TIMEOUT).await?;
                anyhow::ensure!(out.status.success(), "sbatch --version failed");
            }
        }
        Ok(())
    }

    /// One job running `script` in a shell.
    async fn submit_script(&self, tag: &str, script: &str) -> anyhow::Result<String> {
        match self {
            System::Muster(m) => m.submit(tag, false, &["sh", "-c", script]).await,
            System::Slurm(s) => s.sbatch(script).await,
        }
    }

    /// Submit `true`, wait for it to end, exit with its code.
    async fn waiting_client(&self) -> anyhow::Result<()> {
        match self {
            System::Muster(m) => m.submit("stream", true, &["true"]).await.map(drop),
            System::Slurm(s) => {
                let mut c = s.cmd("srun");
                c.arg("true");
                let out = run_bounded(c, CLI_TIMEOUT).await?;
                anyhow::ensure!(
                    out.status.success(),
                    "srun true failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                Ok(())
            }
        }
    }

    /// Whether nothing is queued or running.
    async fn drained(&self) -> anyhow::Result<bool> {
        match self {
            System::Muster(m) => m.drained().await,
            System::Slurm(s) => s.drained().await,
        }
    }

    /// Polls until nothing is queued or running, within `timeout`; when it drained.
    async fn await_drained(&self, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.drained().await? {
                return Ok(Instant::now());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: jobs still queued or running after {} s",
                self.name(),
                timeout.as_secs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The processes whose idle CPU is measured.
    fn daemon_pids(&self) -> anyhow::Result<Vec<u32>> {
        match self {
            System::Muster(m) => {
                Ok(vec![m.dev.pid().ok_or_else(|| {
                    anyhow::anyhow!("muster dev not running")
                })?])
            }
            System::Slurm(s) => s.pids(),
        }
    }

    /// Where first-command stamps go.
    fn stamps(&self) -> PathBuf {
        match self {
            System::Muster(m) => m.work.with_file_name("stamps"),
            System::Slurm(s) => s.work.with_file_name("stamps"),
        }
    }
}

/// `n` submits of `true` from `submitters` concurrent submitters: each submit's latency and
/// id, and when the last one returned.
async fn load(
    sys: &Arc<System>,
    tag: &str,
    n: usize,
    submitters: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<String>)> {
    let mut tasks = Vec::new();
    for i in 0..submitters {
        let share = n / submitters + usize::from(i < n % submitters);
        let sys = sys.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(share);
            for _ in 0..share {
                let t = Instant::now();
                let id = sys.submit_true(&tag).await?;
                got.push((t.elapsed(), id));
            }
            anyhow::Ok(got)
        }));
    }
    let mut lat = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    for t in tasks {
        for (d, id) in t.await?? {
            lat.push(d);
            ids.push(id);
        }
    }
    Ok((lat, ids))
}

/// Checks the throughput batch: exactly `ids`, each once, each finished successfully.
/// Returns a line on where the time went, when the system tells.
async fn check_batch(sys: &System, tag: &str, ids: &[String]) -> anyhow::Result<String> {
    let unique: HashSet<&String> = ids.iter().collect();
    anyhow::ensure!(
        unique.len() == ids.len(),
        "{}: {} job ids returned twice",
        sys.name(),
        ids.len() - unique.len()
    );
    match sys {
        System::Muster(m) => {
            let runs = m.runs(tag).await?;
            let listed: HashSet<&String> = runs.iter().map(|r| &r.id).collect();
            anyhow::ensure!(
                runs.len() == ids.len() && listed == unique,
                "muster: {} runs submitted, {} listed ({} distinct)",
                ids.len(),
                runs.len(),
                listed.len()
            );
            let bad: Vec<_> = runs
                .iter()
                .filter(|r| r.state().word() != "completed" || r.exit_code != Some(0))
                .collect();
            anyhow::ensure!(
                bad.is_empty(),
                "muster: {} of {} runs did not complete with exit 0 (first: {} {} {:?})",
                bad.len(),
                runs.len(),
                bad[0].id,
                v1::RunState::word_of(bad[0].state),
                bad[0].message
            );
            Ok(muster_breakdown(&runs))
        }
        System::Slurm(s) => {
            let states = s.job_states().await?;
            let mut completed = 0;
            let mut forgotten = 0;
            for id in ids {
                match states.get(id).map(String::as_str) {
                    Some("COMPLETED") => completed += 1,
                    Some(other) => anyhow::bail!("Slurm: job {id} ended {other}"),
                    None => forgotten += 1,
                }
            }
            Ok(format!(
                "Slurm: {} job ids accepted, {completed} COMPLETED{}",
                ids.len(),
                if forgotten > 0 {
                    format!(", {forgotten} already purged (MinJobAge)")
                } else {
                    String::new()
                }
            ))
        }
    }
}

/// Where a batch's time went, from the server's own timestamps (ms).
fn muster_breakdown(runs: &[v1::Run]) -> String {
    let Some(first) = runs.iter().map(|r| r.created_at_ms).min() else {
        return String::new();
    };
    let last_created = runs.iter().map(|r| r.created_at_ms).max().unwrap_or(first);
    let last_finished = runs
        .iter()
        .filter_map(|r| r.finished_at_ms)
        .max()
        .unwrap_or(first);
    let waited: Vec<Duration> = runs
        .iter()
        .filter_map(|r| {
            Some(Duration::from_millis(
                r.started_at_ms?.saturating_sub(r.created_at_ms),
            ))
        })
        .collect();
    let ran: Vec<Duration> = runs
        .iter()
        .filter_map(|r| {
            Some(Duration::from_millis(
                r.finished_at_ms?.saturating_sub(r.started_at_ms?),
            ))
        })
        .collect();
    let (w50, w99) = muster_testkit::stats::p50_p99_ms(waited);
    let (r50, r99) = muster_testkit::stats::p50_p99_ms(ran);
    let s = |ms: f64| ms / 1e3;
    format!(
        "muster (server clock): accepted over {:.2} s, last finished {:.2} s after the first \
         accepted; accepted → started p50 {:.3} s p99 {:.3} s; started → finished (end \
         reported) p50 {:.3} s p99 {:.3} s",
        (last_created - first) as f64 / 1e3,
        (last_finished - first) as f64 / 1e3,
        s(w50),
        s(w99),
        s(r50),
        s(r99),
    )
}

/// Waits (bounded) for the stamp a first-command job writes; its time.
async fn await_stamp(path: &Path) -> anyhow::Result<f64> {
    let deadline = Instant::now() + STAMP_TIMEOUT;
    loop {
        if let Some(t) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
        {
            return Ok(t);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no stamp in {} within {} s",
            path.display(),
            STAMP_TIMEOUT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every measurement on one fresh system. Returns the figures and the batch's notes.
async fn measure(sys: System, args: &Args) -> anyhow::Result<(Figures, String)> {
    let sys = Arc::new(sys);
    let name = sys.name();
    let mut f = Figures::default();

    eprintln!("  {name}: idle CPU over {} s", args.idle_secs);
    f.idle_cpu_pct = idle_cpu(&sys.daemon_pids()?, args.idle_secs).await?;

    eprintln!("  {name}: {} idle submits", args.idle_submits);
    // One submit first, not counted: the first process after the idle watch pays the
    // machine's wake-up (on this VM `muster --version` alone then takes ~10 ms against
    // ~2 ms), on either system.
    sys.submit_true("idle").await?;
    let mut lat = Vec::new();
    for _ in 0..args.idle_submits {
        let t = Instant::now();
        sys.submit_true("idle").await?;
        lat.push(t.elapsed());
    }
    f.ack_idle = muster_testkit::stats::p50_p99_ms(lat);
    sys.await_drained(DRAIN_TIMEOUT).await?;
    let mut lat = Vec::new();
    for _ in 0..args.idle_submits {
        let t = Instant::now();
        sys.cli_alone().await?;
        lat.push(t.elapsed());
    }
    f.cli_alone = muster_testkit::stats::p50_p99_ms(lat).0;

    eprintln!("  {name}: {} waiting clients", args.waits);
    let mut lat = Vec::new();
    for _ in 0..args.waits {
        let t = Instant::now();
        sys.waiting_client().await?;
        lat.push(t.elapsed());
    }
    f.waiting = muster_testkit::stats::p50_p99_ms(lat);
    sys.await_drained(DRAIN_TIMEOUT).await?;

    eprintln!("  {name}: {} submit → first command", args.waits);
    let stamps = sys.stamps();
    std::fs::create_dir_all(&stamps)?;
    let mut lat = Vec::new();
    for i in 0..args.waits {
        let stamp = stamps.join(format!("stamp-{i}"));
        let script = format!("date +%s.%N > {}", stamp.display());
        // A pause of 0–1 s first, so samples do not lock onto the phase of a periodic loop
        // (slurmctld starts batch jobs from a scheduler pass about once a second).
        tokio::time::sleep(jitter()).await;
        let before = unix_now();
        sys.submit_script("first", &script).await?;
        let at = await_stamp(&stamp).await?;
        lat.push(Duration::from_secs_f64((at - before).max(0.0)));
    }
    f.first_cmd = muster_testkit::stats::p50_p99_ms(lat);
    sys.await_drained(DRAIN_TIMEOUT).await?;

    let t = throughput(&sys, args).await?;
    f.wall_s = t.wall_s;
    f.jobs_per_s = t.jobs_per_s;
    f.submits_per_s = t.submits_per_s;
    f.ack_load = t.ack_load;
    f.agents_jobs_per_s = f64::NAN;
    f.agents_submits_per_s = f64::NAN;
    Ok((f, t.notes))
}

/// What the throughput workload gave.
struct Throughput {
    wall_s: f64,
    jobs_per_s: f64,
    submits_per_s: f64,
    ack_load: (f64, f64),
    notes: String,
}

/// `--jobs` `true` jobs from `--submitters`, on a drained system, until all finished.
async fn throughput(sys: &Arc<System>, args: &Args) -> anyhow::Result<Throughput> {
    eprintln!(
        "  {}: {} jobs from {} submitters",
        sys.name(),
        args.jobs,
        args.submitters
    );
    let start = Instant::now();
    let (lat, ids) = load(sys, "load", args.jobs, args.submitters).await?;
    let submitted = start.elapsed();
    let done = sys
        .await_drained(Duration::from_secs(args.timeout).saturating_sub(submitted))
        .await?;
    let wall = done - start;
    let notes = check_batch(sys, "load", &ids).await?;
    Ok(Throughput {
        wall_s: wall.as_secs_f64(),
        jobs_per_s: args.jobs as f64 / wall.as_secs_f64(),
        submits_per_s: args.jobs as f64 / submitted.as_secs_f64(),
        ack_load: muster_testkit::stats::p50_p99_ms(lat),
        notes,
    })
}

/// `v` with `decimals` decimals; a dash when it was not measured.
fn fmt(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "—".into()
    } else {
        format!("{v:.decimals$}")
    }
}

/// muster's figure over Slurm's (NaN when Slurm's is zero).
fn ratio(m: f64, s: f64) -> f64 {
    if s > 0.0 { m / s } else { f64::NAN }
}

/// The 1, 5 and 15 minute load averages (the machine may be shared).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Prints one round's table.
fn print_round(args: &Args, round: usize, muster: &Figures, slurm: Option<&Figures>) {
    println!();
    println!(
        "round {round} of {} (load average now {})",
        args.rounds,
        loadavg()
    );
    println!(
        "| {:<46} | {:>10} | {:>10} | {:>12} |",
        "figure", "muster", "Slurm", "muster/Slurm"
    );
    println!("|{:-<48}|{:-<12}|{:-<12}|{:-<14}|", "", "", "", "");
    for row in rows(args) {
        let m = (row.get)(muster);
        let (s, r) = match slurm {
            Some(s) => {
                let s = (row.get)(s);
                let r = ratio(m, s);
                let r = if r.is_nan() {
                    "—".into()
                } else {
                    format!("{}x", fmt(r, 2))
                };
                (fmt(s, row.decimals), r)
            }
            None => ("—".into(), "—".into()),
        };
        println!(
            "| {:<46} | {:>10} | {:>10} | {:>12} |",
            row.label,
            fmt(m, row.decimals),
            s,
            r
        );
    }
}

/// `min–max` of `values` (one value when they agree at this precision).
fn range(values: impl Iterator<Item = f64>, decimals: usize) -> String {
    let v: Vec<f64> = values.filter(|v| !v.is_nan()).collect();
    if v.is_empty() {
        return "—".into();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.len() == 1 || fmt(lo, decimals) == fmt(hi, decimals) {
        fmt(lo, decimals)
    } else {
        format!("{}–{}", fmt(lo, decimals), fmt(hi, decimals))
    }
}

/// Prints the ranges over every round.
fn print_summary(args: &Args, results: &[(Figures, Option<Figures>)]) {
    println!();
    println!(
        "summary over {} round(s), min–max: {} `true` jobs, {} submitters",
        results.len(),
        args.jobs,
        args.submitters
    );
    println!(
        "| {:<46} | {:>15} | {:>15} | {:>13} |",
        "figure", "muster", "Slurm", "muster/Slurm"
    );
    println!("|{:-<48}|{:-<17}|{:-<17}|{:-<15}|", "", "", "", "");
    for row in rows(args) {
        let m = range(results.iter().map(|(m, _)| (row.get)(m)), row.decimals);
        let s = range(
            results
                .iter()
                .filter_map(|(_, s)| s.as_ref().map(|s| (row.get)(s))),
            row.decimals,
        );
        let r = range(
            results
                .iter()
                .filter_map(|(m, s)| s.as_ref().map(|s| ratio((row.get)(m), (row.get)(s)))),
            2,
        );
        let r = if r == "—" { r } else { format!("{r}x") };
        println!("| {:<46} | {:>15} | {:>15} | {:>13} |", row.label, m, s, r);
    }
}

/// Every round, then the summary.
async fn bench(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.jobs > 0 && args.submitters > 0 && args.rounds > 0 && args.waits > 0,
        "--jobs, --submitters, --rounds and --waits must be at least 1"
    );
    let missing: Vec<&str> = SLURM_COMMANDS
        .iter()
        .copied()
        .filter(|c| !on_path(c))
        .collect();
    let slurm = !args.no_slurm && missing.is_empty();
    // Build (or find) the muster binary before anything is timed.
    let bin = muster_testkit::muster_bin();
    println!(
        "vs-slurm: {} `true` jobs from {} submitters, {} round(s), {} CPUs, load average {}",
        args.jobs,
        args.submitters,
        args.rounds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        loadavg()
    );
    println!("muster: {} (`muster dev`, one process)", bin.display());
    if slurm {
        println!(
            "Slurm: {} (one node, benches/slurm/start.sh)",
            Slurm::version()
        );
    } else if args.no_slurm {
        println!("Slurm: skipped (--no-slurm)");
    } else {
        println!(
            "Slurm absent: install slurm-wlm and munge (Debian) to compare (missing: {})",
            missing.join(", ")
        );
    }
    let mut results = Vec::new();
    for round in 1..=args.rounds {
        eprintln!("round {round}: muster");
        let (mut m, mut m_notes) =
            measure(System::Muster(Muster::start(args.max_runs).await?), &args).await?;
        if args.agents > 1 {
            eprintln!("round {round}: muster with {} agents", args.agents);
            let mut many = Muster::start(args.max_runs).await?;
            many.add_agents(args.agents - 1, args.max_runs).await?;
            let t = throughput(&Arc::new(System::Muster(many)), &args).await?;
            m.agents_jobs_per_s = t.jobs_per_s;
            m.agents_submits_per_s = t.submits_per_s;
            m_notes.push_str(&format!("\n{} agents: {}", args.agents, t.notes));
        }
        let s = if slurm {
            eprintln!("round {round}: Slurm");
            Some(measure(System::Slurm(Slurm::start().await?), &args).await?)
        } else {
            None
        };
        print_round(&args, round, &m, s.as_ref().map(|(f, _)| f));
        println!("{m_notes}");
        if let Some((_, notes)) = &s {
            println!("{notes}");
        }
        results.push((m, s.map(|(f, _)| f)));
    }
    print_summary(&args, &results);
    println!(
        "ratios are muster/Slurm: below 1x muster is faster (times) or cheaper (CPU), above 1x \
         it is faster (rates); p99 of fewer than 100 samples is their maximum"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // On Ctrl-C the measurement is dropped: its `muster dev` is killed and its Slurm stopped.
    tokio::select! {
        r = bench(args) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; processes stopped"),
    }
}
