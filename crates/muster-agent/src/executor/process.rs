//! The process executor: `sh -c COMMAND` in its own process group, output captured to the
//! attempt's log file, stopped with SIGTERM to the group, then SIGKILL after the grace.
//!
//! Under `muster agent --run-as USER` the command runs as USER with a group of the
//! attempt's own, in a working directory private to that group (see [`super::confine`]),
//! and with rlimits: `RLIMIT_NPROC` (processes of USER) and `RLIMIT_DATA` (the run's
//! memory request, when it has one).

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use muster_core::AttemptEnd;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::confine::{self, RunUser};
use super::{
    Executor, ExecutorError, Launch, Managed, Outcome, ProcessLimits, Stop, StopOrders, StopReason,
    stopped,
};

/// The process executor as an [`Executor`]. Processes die with their agent, so there is
/// nothing to re-adopt.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessExecutor {
    /// `--run-as`: the user processes run as (`None`: the agent's own).
    pub run_as: Option<RunUser>,
}

impl Executor for ProcessExecutor {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn run(
        &self,
        launch: Launch,
        stop: StopOrders,
        started: oneshot::Sender<()>,
    ) -> futures::future::BoxFuture<'_, Outcome> {
        Box::pin(run_as(launch, stop, started, self.run_as))
    }

    fn managed<'a>(
        &'a self,
        _node_id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Vec<Managed>, ExecutorError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn adopt<'a>(
        &'a self,
        managed: &'a Managed,
        _log_path: &'a std::path::Path,
        _stop: StopOrders,
    ) -> futures::future::BoxFuture<'a, Outcome> {
        let message = format!(
            "the process of attempt {} of run {} cannot be re-adopted (processes end with their agent)",
            managed.attempt, managed.run_id
        );
        Box::pin(async move { failed(None, message) })
    }
}

/// Runs `launch` as the agent's user until it exits, is stopped, or times out. `started`
/// fires once the process runs.
pub async fn run(
    launch: Launch,
    stop: watch::Receiver<Option<Stop>>,
    started: oneshot::Sender<()>,
) -> Outcome {
    run_as(launch, stop, started, None).await
}

/// [`run`], as `user` when given: the working directory is made private to the attempt's
/// group first, and the command gets the launch's rlimits.
pub async fn run_as(
    launch: Launch,
    mut stop: watch::Receiver<Option<Stop>>,
    started: oneshot::Sender<()>,
    user: Option<RunUser>,
) -> Outcome {
    let log = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log_path)
        .await
    {
        Ok(f) => f,
        Err(e) => {
            return failed(
                None,
                format!(
                    "cannot open the log file {}: {e}",
                    launch.log_path.display()
                ),
            );
        }
    };
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(&launch.command)
        .current_dir(&launch.workdir)
        .envs(launch.env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(user) = user {
        let gid = confine::attempt_gid(&launch.workdir);
        let (workdir, log_path) = (launch.workdir.clone(), launch.log_path.clone());
        let private =
            tokio::task::spawn_blocking(move || private_workdir(&workdir, &log_path, gid))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
        if let Err(e) = private {
            return failed(
                None,
                format!(
                    "cannot make the working directory {} private to the run: {e}",
                    launch.workdir.display()
                ),
            );
        }
        // The agent's HOME is not the run user's: its home is its working directory.
        if !launch.env.iter().any(|(k, _)| k == "HOME") {
            command.env("HOME", &launch.workdir);
        }
        command.uid(user.uid).gid(gid);
        limit(&mut command, launch.process_limits);
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return failed(None, format!("could not start `sh -c`: {e}")),
    };
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let _ = started.send(());

    // One writer appends both streams to the log in arrival order.
    // Secret values never reach the file: a value split across two reads is held back
    // until the next says whether it is one.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    let mut redact = launch.redact.clone();
    let writer = tokio::spawn(async move {
        let mut log = log;
        while let Some(chunk) = rx.recv().await {
            let chunk = redact.push(&chunk);
            if log.write_all(&chunk).await.is_err() {
                break;
            }
            let _ = log.flush().await;
        }
        let _ = log.write_all(&redact.finish()).await;
        let _ = log.sync_all().await;
    });
    let readers = [
        child
            .stdout
            .take()
            .map(|s| tokio::spawn(pump(s, tx.clone()))),
        child
            .stderr
            .take()
            .map(|s| tokio::spawn(pump(s, tx.clone()))),
    ];
    drop(tx);

    let timeout = async {
        match launch.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let (status, stopped_by, timed_out) = tokio::select! {
        status = child.wait() => (status, None, false),
        order = wait_stop(&mut stop) => {
            let status = terminate(&mut child, pgid, order.grace).await;
            (status, Some(order.reason), false)
        }
        _ = timeout => {
            let status = terminate(&mut child, pgid, Duration::from_secs(10)).await;
            (status, None, true)
        }
    };
    // The command is over: whatever it left running in its group goes too (as Slurm does).
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    for r in readers.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;

    let status = match status {
        Ok(s) => s,
        Err(e) => return failed(None, format!("lost track of the process: {e}")),
    };
    let code = exit_code(status);
    if timed_out {
        let secs = launch.timeout.map(|t| t.as_secs()).unwrap_or_default();
        return Outcome {
            end: AttemptEnd::TimedOut,
            exit_code: Some(code),
            message: Some(format!("stopped after limits.timeout ({secs} s)")),
        };
    }
    match stopped_by {
        Some(reason) => stopped(reason, Some(code)),
        None if code == 0 => Outcome {
            end: AttemptEnd::Completed,
            exit_code: Some(0),
            message: None,
        },
        None => failed(Some(code), describe(status)),
    }
}

/// The working directory `workdir` of a process under `--run-as`: its attempt's group's
/// alone (mode 0770, see [`confine::make_private`]); the attempt's folder around it (the
/// log) searchable but not listable, the log the agent's alone.
fn private_workdir(
    workdir: &std::path::Path,
    log: &std::path::Path,
    gid: u32,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    confine::make_private(workdir, gid)?;
    if let Some(attempt_dir) = workdir.parent() {
        std::fs::set_permissions(attempt_dir, std::fs::Permissions::from_mode(0o711))?;
    }
    std::fs::set_permissions(log, std::fs::Permissions::from_mode(0o600))
}

/// Sets the launch's rlimits in the child before it executes `sh`.
#[allow(unsafe_code)]
fn limit(command: &mut tokio::process::Command, limits: ProcessLimits) {
    use nix::sys::resource::{Resource, setrlimit};
    let nproc = u64::from(limits.max_processes);
    let data = limits.memory_bytes;
    if nproc == 0 && data == 0 {
        return;
    }
    // SAFETY: the closure runs in the child between fork and exec. It only calls
    // setrlimit(2), which is async-signal-safe, and neither allocates nor takes a lock.
    unsafe {
        command.pre_exec(move || {
            if nproc > 0 {
                setrlimit(Resource::RLIMIT_NPROC, nproc, nproc)?;
            }
            if data > 0 {
                setrlimit(Resource::RLIMIT_DATA, data, data)?;
            }
            Ok(())
        });
    }
}

fn failed(code: Option<i32>, message: String) -> Outcome {
    Outcome {
        end: AttemptEnd::Failed,
        exit_code: code,
        message: Some(message),
    }
}

/// Waits for a stop order; a dropped sender (the agent let the attempt go) is a stale stop.
pub async fn wait_stop(stop: &mut StopOrders) -> Stop {
    loop {
        if let Some(order) = *stop.borrow_and_update() {
            return order;
        }
        if stop.changed().await.is_err() {
            // The agent dropped the attempt: treat as a stop with a short grace.
            return Stop {
                reason: StopReason::Stale,
                grace: Duration::from_secs(1),
            };
        }
    }
}

/// SIGTERM to the group, wait up to `grace`, then SIGKILL.
async fn terminate(
    child: &mut tokio::process::Child,
    pgid: Option<Pid>,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            child.wait().await
        }
    }
}

async fn pump(mut stream: impl AsyncRead + Unpin, tx: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The shell convention: the exit code, or 128 + the signal number.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!(
            "killed by signal {}",
            Signal::try_from(s)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| s.to_string())
        ),
        _ => "ended without an exit code".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(dir: &std::path::Path, command: &str, timeout: Option<Duration>) -> Launch {
        Launch {
            command: command.into(),
            workdir: dir.to_path_buf(),
            env: vec![("GREETING".into(), "hi".into())],
            log_path: dir.join("out.log"),
            timeout,
            container: None,
            redact: Default::default(),
            process_limits: Default::default(),
        }
    }

    #[tokio::test]
    async fn captures_output_and_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let (_stop_tx, stop) = watch::channel(None);
        let (started, _) = oneshot::channel();
        let out = run(
            launch(dir.path(), "echo $GREETING; echo err >&2; exit 3", None),
            stop,
            started,
        )
        .await;
        assert_eq!(out.end, AttemptEnd::Failed);
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.message.as_deref(), Some("exited with code 3"));
        let log = std::fs::read_to_string(dir.path().join("out.log")).unwrap();
        assert!(log.contains("hi\n") && log.contains("err\n"), "{log}");
    }

    #[tokio::test]
    async fn cancel_sends_sigterm_to_the_group_then_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let (stop_tx, stop) = watch::channel(None);
        let (started, started_rx) = oneshot::channel();
        // The shell ignores SIGTERM, so only SIGKILL after the grace ends it.
        let task = tokio::spawn(run(
            launch(dir.path(), "trap '' TERM; sleep 30 & wait; sleep 30", None),
            stop,
            started,
        ));
        started_rx.await.unwrap();
        let t0 = std::time::Instant::now();
        stop_tx.send_replace(Some(Stop {
            reason: StopReason::Canceled,
            grace: Duration::from_millis(300),
        }));
        let out = task.await.unwrap();
        assert_eq!(out.end, AttemptEnd::Canceled);
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn timeout_ends_the_run_as_timed_out() {
        let dir = tempfile::tempdir().unwrap();
        let (_stop_tx, stop) = watch::channel(None);
        let (started, _) = oneshot::channel();
        let out = run(
            launch(dir.path(), "sleep 30", Some(Duration::from_millis(200))),
            stop,
            started,
        )
        .await;
        assert_eq!(out.end, AttemptEnd::TimedOut);
    }
}
