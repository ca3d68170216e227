//! The exec listener: how the ranks of a distributed run reach into each other's
//! containers without sshd (DESIGN.md section 9).
//!
//! Every agent listens on a TCP port (`AgentConfig::exec_listen`) and advertises it in the
//! node label [`muster_proto::EXEC_PORT_LABEL`]; the server copies it into each rank's
//! `Placement.exec_port`. Three requests (protocol in the `muster-rsh` crate), each
//! authenticated by the attempt's secret (random, chosen by the leader when it placed the
//! attempt, sent in every rank's `Assignment`):
//!
//! - `exec`: from `muster-rsh`, which mpirun on rank 0 runs as its rsh agent: `docker exec
//!   sh -c COMMAND` in this node's container of the attempt, stdin/stdout/stderr streamed
//!   both ways, the exit code returned;
//! - `ready`: from rank 0's agent, before it starts the launcher: is the attempt's container
//!   running here? ([`wait_ready`] polls every worker, bounded);
//! - `release`: from rank 0's agent once the launcher completed: this node's idle worker
//!   container is no longer needed and ends as completed ([`release`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures::StreamExt;
use muster_rsh::{ERROR, EXIT, MAGIC, MAX_LEN, Op, Request, STDERR, STDIN, STDOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::attempt::Key;
use crate::executor::docker::DockerExecutor;
use crate::executor::{Stop, StopReason};

/// How long a client may take to send its request.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);
/// How long one `ready` or `release` request may take.
const CALL_LIMIT: Duration = Duration::from_secs(5);
/// What an agent answers for an attempt it has no container of.
const NO_CONTAINER: &str = "has no container on this node";
/// What an agent answers for an attempt whose container is not running yet.
const NOT_RUNNING: &str = "is not running yet";
/// How often an idle MPI worker checks that its launcher is still there.
const LAUNCHER_POLL: Duration = Duration::from_secs(3);

/// What went wrong with an exec request, on either side. The serving side sends its
/// message to the client as the `ERROR` frame; the client side gets the peer's message
/// back as [`RshError::Refused`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum RshError {
    /// The request could not be read.
    #[error("reading the request: {0}")]
    Read(std::io::Error),
    /// Someone else's protocol.
    #[error("not a muster-rsh request")]
    NotRsh,
    /// Over [`MAX_LEN`].
    #[error("request of {0} bytes is too large")]
    TooLarge(u32),
    /// The request did not decode (muster-rsh's reason).
    #[error("{0}")]
    Decode(String),
    /// The client sent nothing in time.
    #[error("no request within {} s", REQUEST_LIMIT.as_secs())]
    NoRequest,
    /// The attempt has no container here.
    #[error(
        "attempt {attempt} of run {run_id} {} (not started yet, or over)",
        NO_CONTAINER
    )]
    NoContainer {
        /// The run.
        run_id: String,
        /// The attempt.
        attempt: u32,
    },
    /// The secret is not the attempt's.
    #[error("wrong secret for attempt {attempt} of run {run_id}")]
    WrongSecret {
        /// The run.
        run_id: String,
        /// The attempt.
        attempt: u32,
    },
    /// The container is not running yet.
    #[error("container {0} {not_running}", not_running = NOT_RUNNING)]
    NotRunning(String),
    /// Exec needs the Docker engine.
    #[error("this node has no Docker engine")]
    NoEngine,
    /// The engine refused the exec.
    #[error("docker exec in {container} failed{doing}: {cause}")]
    Exec {
        /// The container.
        container: String,
        /// "" or " to start".
        doing: &'static str,
        /// What the engine said.
        cause: bollard::errors::Error,
    },
    /// The exec started detached.
    #[error("docker exec did not attach")]
    NotAttached,
    /// The exec's exit code could not be read.
    #[error("could not read the exit code: {0}")]
    ExitCode(bollard::errors::Error),
    /// The client hung up while the command ran.
    #[error("the client went away")]
    ClientGone,
    /// Writing to the connection failed.
    #[error("{0}")]
    Write(std::io::Error),
    /// The peer's agent cannot be reached.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// The request could not be sent.
    #[error("sending: {0}")]
    Send(std::io::Error),
    /// The peer's agent did not answer.
    #[error("no answer: {0}")]
    NoAnswer(std::io::Error),
    /// The answer is not the protocol's.
    #[error("malformed answer")]
    Malformed,
    /// Neither success nor an error.
    #[error("unexpected answer")]
    Unexpected,
    /// The peer's agent refused, saying this.
    #[error("{0}")]
    Refused(String),
    /// The peer's agent took longer than [`CALL_LIMIT`].
    #[error("no answer within {} s", CALL_LIMIT.as_secs())]
    Timeout,
    /// Workers were not up in time (each named, with why).
    #[error(
        "the MPI launcher did not start: workers not up and reachable after {secs} s: {pending}"
    )]
    NotReady {
        /// The limit.
        secs: u64,
        /// `rank N (node X at ADDR): why`, joined by `; `.
        pending: String,
    },
}

/// A container of this node that peers may exec into.
#[derive(Debug)]
struct Target {
    secret: String,
    container: String,
    running: bool,
    stop: Arc<watch::Sender<Option<Stop>>>,
}

/// What a checked request may use: the container, whether it runs, its stop channel.
type Checked = (String, bool, Arc<watch::Sender<Option<Stop>>>);

/// The attempts of this node that accept exec requests, by (run id, attempt).
#[derive(Debug, Clone, Default)]
pub(crate) struct Registry(Arc<Mutex<HashMap<Key, Target>>>);

impl Registry {
    /// Accepts requests for `key` with `secret`, into `container`; `stop` ends it (release).
    pub(crate) fn add(
        &self,
        key: Key,
        secret: String,
        container: String,
        stop: Arc<watch::Sender<Option<Stop>>>,
    ) {
        self.0.lock().expect("registry lock").insert(
            key,
            Target {
                secret,
                container,
                running: false,
                stop,
            },
        );
    }

    /// The container of `key` runs.
    pub(crate) fn set_running(&self, key: &Key) {
        if let Some(t) = self.0.lock().expect("registry lock").get_mut(key) {
            t.running = true;
        }
    }

    /// The attempt is over here.
    pub(crate) fn remove(&self, key: &Key) {
        self.0.lock().expect("registry lock").remove(key);
    }

    /// Checks a request against the registry: the container name if it may proceed.
    fn check(&self, r: &Request) -> Result<Checked, RshError> {
        let map = self.0.lock().expect("registry lock");
        let t = map
            .get(&(r.run_id.clone(), r.attempt))
            .ok_or_else(|| RshError::NoContainer {
                run_id: r.run_id.clone(),
                attempt: r.attempt,
            })?;
        if !constant_time_eq(t.secret.as_bytes(), r.secret.as_bytes()) {
            return Err(RshError::WrongSecret {
                run_id: r.run_id.clone(),
                attempt: r.attempt,
            });
        }
        Ok((t.container.clone(), t.running, t.stop.clone()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The most connections served at once (an MPI launcher opens one per node, plus polls).
const MAX_CONNECTIONS: usize = 512;

/// Serves exec requests until the task is dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Registry,
    docker: Option<Arc<DockerExecutor>>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(cause = %e, "exec listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let docker = docker.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(conn, &registry, docker.as_deref()).await {
                tracing::debug!(%peer, cause = %e, "exec request ended with an error");
            }
            drop(slot);
        });
    }
}

async fn read_request(conn: &mut TcpStream) -> Result<Request, RshError> {
    let mut magic = [0u8; MAGIC.len()];
    conn.read_exact(&mut magic).await.map_err(RshError::Read)?;
    if &magic != MAGIC {
        return Err(RshError::NotRsh);
    }
    let len = conn.read_u32().await.map_err(RshError::Read)?;
    if len > MAX_LEN {
        return Err(RshError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    conn.read_exact(&mut body).await.map_err(RshError::Read)?;
    Request::decode(&body).map_err(RshError::Decode)
}

async fn frame(
    w: &mut (impl AsyncWriteExt + Unpin),
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.push(kind);
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf).await?;
    w.flush().await
}

async fn handle(
    mut conn: TcpStream,
    registry: &Registry,
    docker: Option<&DockerExecutor>,
) -> Result<(), RshError> {
    let _ = conn.set_nodelay(true);
    let request = match tokio::time::timeout(REQUEST_LIMIT, read_request(&mut conn)).await {
        Ok(r) => r,
        Err(_) => Err(RshError::NoRequest),
    };
    let checked = request.and_then(|r| registry.check(&r).map(|c| (r, c)));
    let (request, (container, running, stop)) = match checked {
        Ok(x) => x,
        Err(e) => return Err(refuse(&mut conn, e).await),
    };
    match request.op {
        Op::Ready if running => frame(&mut conn, EXIT, &0i32.to_be_bytes()).await,
        Op::Ready => {
            let not_running = RshError::NotRunning(container).to_string();
            frame(&mut conn, ERROR, not_running.as_bytes()).await
        }
        Op::Release => {
            tracing::info!(run_id = %request.run_id, attempt = request.attempt, "the launcher finished: releasing this worker");
            stop.send_replace(Some(Stop {
                reason: StopReason::Released,
                grace: Duration::from_secs(10),
            }));
            frame(&mut conn, EXIT, &0i32.to_be_bytes()).await
        }
        Op::Exec => {
            let refused = match (docker, running) {
                (Some(docker), true) => {
                    return exec(docker, &container, &request.command, conn).await;
                }
                (None, _) => RshError::NoEngine,
                (_, false) => RshError::NotRunning(container),
            };
            return Err(refuse(&mut conn, refused).await);
        }
    }
    .map_err(RshError::Write)
}

/// Sends `e` to the client as the `ERROR` frame (best effort) and returns it.
async fn refuse(w: &mut (impl AsyncWriteExt + Unpin), e: RshError) -> RshError {
    let _ = frame(w, ERROR, e.to_string().as_bytes()).await;
    e
}

/// `docker exec -i CONTAINER sh -c COMMAND`, streamed over `conn`.
async fn exec(
    docker: &DockerExecutor,
    container: &str,
    command: &str,
    mut conn: TcpStream,
) -> Result<(), RshError> {
    let engine = docker.engine();
    let created = engine
        .create_exec(
            container,
            CreateExecOptions::<String> {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(vec!["sh".into(), "-c".into(), command.to_string()]),
                ..Default::default()
            },
        )
        .await;
    let id = match created {
        Ok(c) => c.id,
        Err(cause) => {
            let e = RshError::Exec {
                container: container.to_string(),
                doing: "",
                cause,
            };
            return Err(refuse(&mut conn, e).await);
        }
    };
    let started = engine
        .start_exec(
            &id,
            Some(StartExecOptions {
                detach: false,
                tty: false,
                output_capacity: None,
            }),
        )
        .await;
    let (mut output, mut input) = match started {
        Ok(StartExecResults::Attached { output, input }) => (output, input),
        Ok(StartExecResults::Detached) => {
            return Err(refuse(&mut conn, RshError::NotAttached).await);
        }
        Err(cause) => {
            let e = RshError::Exec {
                container: container.to_string(),
                doing: " to start",
                cause,
            };
            return Err(refuse(&mut conn, e).await);
        }
    };
    let (mut reader, mut writer) = conn.into_split();
    // Client → the command's stdin.
    let stdin = tokio::spawn(async move {
        while let Ok(kind) = reader.read_u8().await {
            let Ok(len) = reader.read_u32().await else {
                break;
            };
            if len > MAX_LEN {
                break;
            }
            let mut data = vec![0u8; len as usize];
            if reader.read_exact(&mut data).await.is_err() || kind != STDIN {
                // `STDIN_EOF`, a broken connection or anything unexpected ends the input.
                break;
            }
            if input.write_all(&data).await.is_err() {
                break;
            }
            let _ = input.flush().await;
        }
        let _ = input.shutdown().await;
    });
    // The command's output → client.
    while let Some(item) = output.next().await {
        let (kind, bytes) = match item {
            Ok(bollard::container::LogOutput::StdErr { message }) => (STDERR, message),
            Ok(bollard::container::LogOutput::StdOut { message })
            | Ok(bollard::container::LogOutput::Console { message }) => (STDOUT, message),
            Ok(bollard::container::LogOutput::StdIn { .. }) => continue,
            Err(e) => {
                tracing::debug!(cause = %e, "exec output stream broke");
                break;
            }
        };
        if frame(&mut writer, kind, &bytes).await.is_err() {
            stdin.abort();
            return Err(RshError::ClientGone);
        }
    }
    stdin.abort();
    let code = match engine.inspect_exec(&id).await {
        Ok(info) => info.exit_code.unwrap_or(-1),
        Err(e) => return Err(refuse(&mut writer, RshError::ExitCode(e)).await),
    };
    let code = i32::try_from(code).unwrap_or(-1);
    frame(&mut writer, EXIT, &code.to_be_bytes())
        .await
        .map_err(RshError::Write)
}

/// One `ready` or `release` call to the agent at `target`.
async fn call(target: &str, request: &Request) -> Result<(), RshError> {
    let attempt = async {
        let mut conn = TcpStream::connect(target)
            .await
            .map_err(RshError::Connect)?;
        conn.write_all(&request.encode())
            .await
            .map_err(RshError::Send)?;
        let kind = conn.read_u8().await.map_err(RshError::NoAnswer)?;
        let len = conn.read_u32().await.map_err(RshError::NoAnswer)?;
        if len > MAX_LEN {
            return Err(RshError::Malformed);
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)
            .await
            .map_err(RshError::NoAnswer)?;
        match kind {
            EXIT if data == 0i32.to_be_bytes() => Ok(()),
            ERROR => Err(RshError::Refused(
                String::from_utf8_lossy(&data).into_owned(),
            )),
            _ => Err(RshError::Unexpected),
        }
    };
    tokio::time::timeout(CALL_LIMIT, attempt)
        .await
        .map_err(|_| RshError::Timeout)?
}

/// A rank as another rank's agent reaches it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Worker {
    pub rank: u32,
    pub name: String,
    /// `addr:port` of its agent's exec listener.
    pub target: String,
}

/// Waits until every worker's container runs and its agent answers, polling (bounded by
/// `limit`). The error names the workers that are not ready and why.
pub(crate) async fn wait_ready(
    workers: &[Worker],
    run_id: &str,
    attempt: u32,
    secret: &str,
    limit: Duration,
) -> Result<(), RshError> {
    let deadline = Instant::now() + limit;
    let request = Request {
        op: Op::Ready,
        run_id: run_id.into(),
        attempt,
        secret: secret.into(),
        command: String::new(),
    };
    let mut pending: Vec<(Worker, Option<RshError>)> =
        workers.iter().map(|w| (w.clone(), None)).collect();
    loop {
        let mut still = Vec::new();
        for (w, _) in pending {
            if let Err(why) = call(&w.target, &request).await {
                still.push((w, Some(why)));
            }
        }
        pending = still;
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let list: Vec<String> = pending
                .iter()
                .map(|(w, why)| {
                    let why = why.as_ref().map(ToString::to_string).unwrap_or_default();
                    format!("rank {} (node {} at {}): {why}", w.rank, w.name, w.target)
                })
                .collect();
            return Err(RshError::NotReady {
                secs: limit.as_secs(),
                pending: list.join("; "),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Tells every worker's agent that the launcher finished (a few tries each; best effort:
/// a worker that cannot be told is stopped when the attempt ends).
pub(crate) async fn release(workers: &[Worker], run_id: &str, attempt: u32, secret: &str) {
    let request = Request {
        op: Op::Release,
        run_id: run_id.into(),
        attempt,
        secret: secret.into(),
        command: String::new(),
    };
    for w in workers {
        let mut last = None;
        let mut done = false;
        for _ in 0..5 {
            match call(&w.target, &request).await {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let (false, Some(last)) = (done, last) {
            tracing::warn!(run_id, attempt, rank = w.rank, cause = %last, "could not release an MPI worker");
        }
    }
}

/// An idle MPI worker's safety net: should rank 0's release never arrive (its agent
/// restarted, the network dropped it), the worker ends as completed once rank 0's agent
/// says the attempt's launcher is gone, having seen it before (or after `patience`, by
/// which time the launcher has given up waiting). A failed launcher fails the attempt
/// anyway, and the server then stops this worker.
pub(crate) async fn watch_launcher(
    launcher: Worker,
    run_id: String,
    attempt: u32,
    secret: String,
    patience: Duration,
    stop: Arc<watch::Sender<Option<Stop>>>,
) {
    let request = Request {
        op: Op::Ready,
        run_id,
        attempt,
        secret,
        command: String::new(),
    };
    let started = Instant::now();
    let mut seen = false;
    let mut gone = 0;
    loop {
        tokio::time::sleep(LAUNCHER_POLL).await;
        match call(&launcher.target, &request).await {
            Ok(()) => (seen, gone) = (true, 0),
            Err(RshError::Refused(e)) if e.contains(NOT_RUNNING) => (seen, gone) = (true, 0),
            Err(RshError::Refused(e))
                if e.contains(NO_CONTAINER) && (seen || started.elapsed() > patience) =>
            {
                gone += 1;
                if gone >= 2 {
                    tracing::info!(run_id = %request.run_id, attempt, "the MPI launcher on rank 0 is gone: releasing this worker");
                    stop.send_replace(Some(Stop {
                        reason: StopReason::Released,
                        grace: Duration::from_secs(10),
                    }));
                    return;
                }
            }
            // Not reachable, or not registered yet: keep waiting (a lost node ends the
            // attempt, and the server stops this worker).
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_are_checked_against_the_attempt_and_its_secret() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let registry = Registry::default();
        let (stop, mut stopped) = watch::channel(None);
        let key: Key = ("run-1".into(), 2);
        registry.add(
            key.clone(),
            "s3cret".into(),
            "muster-run-1-2-1".into(),
            Arc::new(stop),
        );
        let server = tokio::spawn(serve(listener, registry.clone(), None));
        let request = |op, attempt, secret: &str| Request {
            op,
            run_id: "run-1".into(),
            attempt,
            secret: secret.into(),
            command: "true".into(),
        };

        let e = call(&target, &request(Op::Ready, 2, "guess"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("wrong secret"), "{e}");
        let e = call(&target, &request(Op::Ready, 3, "s3cret"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no container on this node"), "{e}");
        let e = call(&target, &request(Op::Ready, 2, "s3cret"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("not running yet"), "{e}");
        registry.set_running(&key);
        call(&target, &request(Op::Ready, 2, "s3cret"))
            .await
            .unwrap();
        let e = call(&target, &request(Op::Exec, 2, "s3cret"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no Docker engine"), "{e}");

        let worker = Worker {
            rank: 1,
            name: "node-b".into(),
            target: target.clone(),
        };
        wait_ready(
            std::slice::from_ref(&worker),
            "run-1",
            2,
            "s3cret",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        release(&[worker], "run-1", 2, "s3cret").await;
        stopped.changed().await.unwrap();
        assert_eq!(
            stopped.borrow().map(|s| s.reason),
            Some(StopReason::Released)
        );

        // A worker that never comes up fails the wait with its name, bounded.
        registry.remove(&key);
        let missing = Worker {
            rank: 1,
            name: "node-b".into(),
            target,
        };
        let e = wait_ready(&[missing], "run-1", 2, "s3cret", Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1 (node node-b"), "{e}");
        server.abort();
    }

    #[tokio::test]
    async fn an_idle_worker_ends_once_its_launcher_is_gone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let registry = Registry::default();
        let key: Key = ("run-1".into(), 1);
        let (launcher_stop, _) = watch::channel(None);
        registry.add(
            key.clone(),
            "k".into(),
            "muster-run-1-1-0".into(),
            Arc::new(launcher_stop),
        );
        registry.set_running(&key);
        let server = tokio::spawn(serve(listener, registry.clone(), None));
        let (stop, mut stopped) = watch::channel(None);
        let launcher = Worker {
            rank: 0,
            name: "node-a".into(),
            target,
        };
        let watcher = tokio::spawn(watch_launcher(
            launcher,
            "run-1".into(),
            1,
            "k".into(),
            Duration::from_secs(600),
            Arc::new(stop),
        ));
        // While the launcher runs, the worker stays.
        tokio::time::sleep(LAUNCHER_POLL * 2).await;
        assert_eq!(*stopped.borrow(), None);
        // The launcher's attempt is over on its node: the worker is released.
        registry.remove(&key);
        tokio::time::timeout(LAUNCHER_POLL * 5, stopped.changed())
            .await
            .expect("released in time")
            .unwrap();
        assert_eq!(
            stopped.borrow().map(|s| s.reason),
            Some(StopReason::Released)
        );
        watcher.await.unwrap();
        server.abort();
    }
}
