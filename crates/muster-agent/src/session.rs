//! One session with a server: register, hold the session stream, start and stop
//! attempts, ship their logs and metrics, and report their ends until the server
//! acknowledges them. Attempts outlive a broken session; on reconnect everything
//! unacknowledged is sent again. What happens around the sessions (start-up, executors,
//! re-adoption, reconnecting with `backon`'s backoff to the leader a follower named first,
//! then every configured server; shutdown) is in `session/lifecycle.rs`.
//!
//! Assignments are planned here, at the edge (`plan.rs`), and the plan is handed to an
//! attempt task (`attempt.rs`) that carries it out.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use muster_client::{Channel, Credentials, Servers};
use muster_core::AttemptEnd;
use muster_proto::Word;
use muster_proto::v1::{
    self, agent_message, agent_service_client::AgentServiceClient,
    blob_service_client::BlobServiceClient, server_message,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::AgentConfig;
use crate::attempt::{Event, Executors, Key};
use crate::blobs::Blobs;
use crate::executor::{Outcome, Stop, StopReason};
use crate::plan::{self, AttemptPlan};
use crate::resources::host_capacity;
use crate::ship::{Shipper, Stream};

mod lifecycle;

const SHIP_PER_TICK: usize = 8 << 20;

/// Why a session ended; all but [`SessionError::Refused`] are retried.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// No server answered (each one tried, and why).
    #[error(transparent)]
    Connect(#[from] muster_client::ClientError),
    /// The server refused this agent: retrying will not help.
    #[error("the server refused this agent: {0}")]
    Refused(String),
    /// Registration failed.
    #[error("register: {}", .0.message())]
    Register(tonic::Status),
    /// The session stream failed.
    #[error("session: {}", .0.message())]
    Session(tonic::Status),
    /// The outgoing stream closed.
    #[error(transparent)]
    Closed(#[from] crate::ship::Closed),
}

impl From<mpsc::error::SendError<v1::AgentMessage>> for SessionError {
    fn from(_: mpsc::error::SendError<v1::AgentMessage>) -> SessionError {
        SessionError::Closed(crate::ship::Closed)
    }
}

/// An attempt this agent knows of, until the server acknowledges its end.
struct Entry {
    workdir: PathBuf,
    /// The attempt's log, and how far it is shipped.
    log: Shipper,
    /// The attempt's `MUSTER_METRICS_FILE` on the host, and how far it is shipped.
    metrics: Shipper,
    state: v1::AttemptState,
    end: Option<v1::AttemptUpdate>,
    end_sent: bool,
    stop: watch::Sender<Option<Stop>>,
    task: Option<JoinHandle<()>>,
    /// Runs in a container: left running when the agent stops, re-adopted when it returns.
    in_container: bool,
}

pub(crate) struct Agent {
    config: AgentConfig,
    node_id: String,
    _lock: std::fs::File,
    attempts: HashMap<Key, Entry>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    executors: Executors,
    /// The configured servers, the leader first once a follower named it.
    servers: Servers,
    /// The exec listener (bound at open, served once the Docker engine is known).
    exec_listener: Option<std::net::TcpListener>,
    /// Its port, advertised in the node label `muster.exec-port`.
    exec_port: u16,
    /// The task serving it.
    exec_task: Option<JoinHandle<()>>,
    /// What every call presents: the node's credential (`credential.rs`).
    credentials: Credentials,
}

/// An attempt's entry, shipping its log and metrics from the start.
fn entry(
    workdir: PathBuf,
    state: v1::AttemptState,
    stop: watch::Sender<Option<Stop>>,
    task: Option<JoinHandle<()>>,
    in_container: bool,
) -> Entry {
    Entry {
        log: Shipper::new(Stream::Log, plan::log_path(&workdir)),
        metrics: Shipper::new(Stream::Metrics, crate::metrics::host_path(&workdir)),
        workdir,
        state,
        end: None,
        end_sent: false,
        stop,
        task,
        in_container,
    }
}

impl Agent {
    /// Connects to the leader if a follower named it, else to the first server that answers.
    async fn connect(&self) -> Result<Channel, SessionError> {
        Ok(self.servers.connect().await?.1)
    }

    async fn register(
        &self,
        client: &mut AgentServiceClient<Channel>,
        gpus: &crate::GpuReport,
    ) -> Result<v1::RegisterResponse, SessionError> {
        let request = registration(
            &self.config,
            &self.node_id,
            self.exec_port,
            gpus,
            host_capacity(),
        );
        Ok(client
            .register(request)
            .await
            .map_err(|s| match s.code() {
                Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied => SessionError::Refused(s.message().to_string()),
                Code::Unauthenticated => SessionError::Refused(format!(
                    "{}: this node's credential ({}) no longer works; remove it and start the agent with a new --join token",
                    s.message(),
                    self.config.data_dir.join("credential").display()
                )),
                _ => SessionError::Register(s),
            })?
            .into_inner())
    }

    async fn serve(&mut self, gpus: &mut crate::GpuReport) -> Result<(), SessionError> {
        let channel = self.connect().await?;
        let mut client =
            AgentServiceClient::new(channel.clone()).max_decoding_message_size(8 << 20);
        let blobs = crate::blobs::client(channel);
        let registered = self.register(&mut client, gpus).await?;
        let heartbeat_every = Duration::from_millis(registered.heartbeat_interval_ms.max(100));

        let (out, out_rx) = mpsc::channel::<v1::AgentMessage>(1024);
        out.send(msg(agent_message::Msg::Hello(v1::Hello {
            node_id: self.node_id.clone(),
            running: self.running(),
        })))
        .await?;
        let mut inbound = client
            .session(ReceiverStream::new(out_rx))
            .await
            .map_err(|s| {
                // A follower names the leader: go there next.
                if let Some(leader) = muster_client::leader_hint(&s) {
                    self.servers.set_leader(leader);
                }
                SessionError::Session(s)
            })?
            .into_inner();
        tracing::info!(node = %self.config.name, "connected");
        for entry in self.attempts.values_mut() {
            entry.end_sent = false;
        }
        for ((run_id, attempt), entry) in &self.attempts {
            if entry.end.is_none() {
                out.send(update(run_id, *attempt, entry.state)).await?;
            }
        }
        let mut ship = tokio::time::interval(Duration::from_millis(100));
        // Ticks only while attempts are on the node (an idle agent does not wake for it);
        // the first tick after a pause comes a full period later, not in a burst.
        ship.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        let mut gpu_refresh = tokio::time::interval(self.config.gpu_refresh);
        gpu_refresh.tick().await;
        loop {
            tokio::select! {
                _ = gpu_refresh.tick() => {
                    let now = self.probe_gpus().await;
                    if now.gpus != gpus.gpus {
                        tracing::info!(before = gpus.gpus.len(), after = now.gpus.len(), note = ?now.note, "GPUs changed; registering the new set");
                        *gpus = now;
                        self.register(&mut client, gpus).await?;
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(m)) => self.on_server_message(m, &blobs, &out).await?,
                    Ok(None) => return Ok(()),
                    Err(s) => return Err(SessionError::Session(s)),
                },
                Some(ev) = self.events_rx.recv() => self.on_event(ev, &out).await?,
                _ = ship.tick(), if !self.attempts.is_empty() => self.ship(&out).await?,
                _ = heartbeat.tick() => {
                    out.send(msg(agent_message::Msg::Heartbeat(v1::HeartbeatRequest {
                        node_id: self.node_id.clone(),
                        running: self.running(),
                    }))).await?;
                }
            }
        }
    }

    fn running(&self) -> Vec<v1::RunningAttempt> {
        self.attempts
            .keys()
            .map(|(run_id, attempt)| v1::RunningAttempt {
                run_id: run_id.clone(),
                attempt: *attempt,
            })
            .collect()
    }

    async fn on_server_message(
        &mut self,
        m: v1::ServerMessage,
        blobs: &BlobServiceClient<Channel>,
        out: &mpsc::Sender<v1::AgentMessage>,
    ) -> Result<(), SessionError> {
        match m.msg {
            Some(server_message::Msg::Assign(a)) => self.on_assign(a, blobs),
            Some(server_message::Msg::Stop(s)) => {
                let key = (s.run_id.clone(), s.attempt);
                let reason = stop_reason(s.reason);
                let grace = Duration::from_millis(s.grace_ms);
                match self.attempts.get(&key) {
                    // Over already: its end is on its way (a fence of an attempt that
                    // ended while the server looked).
                    Some(entry) if entry.end.is_some() => {
                        tracing::debug!(run_id = %s.run_id, attempt = s.attempt, "stop order for an attempt that already ended");
                    }
                    Some(entry) => {
                        tracing::info!(run_id = %s.run_id, attempt = s.attempt, reason = %v1::StopReason::word_of(s.reason), "stopping attempt");
                        entry.stop.send_replace(Some(Stop { reason, grace }));
                    }
                    // Never started here: it is over as far as this node is concerned.
                    None => {
                        let mut u = update(&s.run_id, s.attempt, v1::AttemptState::Ended);
                        if let Some(agent_message::Msg::Update(u)) = &mut u.msg {
                            u.end = v1::AttemptEnd::Canceled.into();
                            u.message = Some("stopped before it started".into());
                        }
                        out.send(u).await?;
                    }
                }
            }
            Some(server_message::Msg::Ack(ack)) => {
                let key = (ack.run_id, ack.attempt);
                if self.attempts.get(&key).is_some_and(|e| e.end.is_some()) {
                    let entry = self.attempts.remove(&key).expect("checked");
                    tokio::spawn(async move {
                        let _ = tokio::fs::remove_dir_all(&entry.workdir).await;
                    });
                }
            }
            Some(server_message::Msg::Resume(r)) => {
                if let Some(entry) = self.attempts.get_mut(&(r.run_id, r.attempt)) {
                    entry.log.resume(r.offset);
                    entry.end_sent = false;
                }
            }
            Some(server_message::Msg::MetricResume(r)) => {
                if let Some(entry) = self.attempts.get_mut(&(r.run_id, r.attempt)) {
                    entry.metrics.resume(r.offset);
                    entry.end_sent = false;
                }
            }
            None => {}
        }
        Ok(())
    }

    fn on_assign(&mut self, a: v1::Assignment, blobs: &BlobServiceClient<Channel>) {
        let key = (a.run_id.clone(), a.attempt);
        if self.attempts.contains_key(&key) {
            return;
        }
        let workdir = self.workdir(&key);
        let (stop, stop_rx) = watch::channel(None);
        if workdir.exists() {
            // This agent started the attempt before a restart and its process is gone (a
            // container would have been re-adopted): report it lost, so the run restarts
            // as a new attempt.
            tracing::warn!(run_id = %a.run_id, attempt = a.attempt, "the attempt's process was lost in an agent restart");
            let mut entry = entry(workdir, v1::AttemptState::Running, stop, None, false);
            let mut end = ended(
                &key,
                &Outcome {
                    end: AttemptEnd::NodeLost,
                    exit_code: None,
                    message: Some("the agent restarted and lost the process (processes cannot be re-adopted; containers can)".into()),
                },
                None,
            );
            let len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            end.log_bytes = len(entry.log.path());
            end.metric_bytes = len(entry.metrics.path());
            entry.end = Some(end);
            self.attempts.insert(key, entry);
            return;
        }
        // The one conversion from the wire: everything else works on the plan.
        let plan = AttemptPlan::from(&a, &self.executors.node);
        let in_container = plan.as_ref().is_ok_and(|p| p.launch.container.is_some());
        tracing::info!(run_id = %a.run_id, attempt = a.attempt, rank = a.rank, in_container, "starting attempt");
        if let Err(e) = std::fs::create_dir_all(&workdir) {
            tracing::error!(cause = %e, "cannot create the attempt's working directory");
        }
        let blobs = Blobs::new(
            blobs.clone(),
            self.config.servers.clone(),
            self.credentials.clone(),
        );
        let task = self.task(key.clone(), blobs, stop_rx);
        let handle = tokio::spawn(task.run(plan));
        self.attempts.insert(
            key,
            entry(
                workdir,
                v1::AttemptState::Scheduled,
                stop,
                Some(handle),
                in_container,
            ),
        );
    }

    async fn on_event(
        &mut self,
        ev: Event,
        out: &mpsc::Sender<v1::AgentMessage>,
    ) -> Result<(), SessionError> {
        match ev {
            Event::State(key, state) => {
                if let Some(entry) = self.attempts.get_mut(&key) {
                    entry.state = state;
                    out.send(update(&key.0, key.1, state)).await?;
                }
            }
            Event::Checkpoint(key, checkpoint) => {
                // Best effort: the next checkpoint (or the end's) supersedes a lost one.
                if self.attempts.contains_key(&key) {
                    tracing::info!(run_id = %key.0, attempt = key.1, seq = checkpoint.seq, "periodic checkpoint uploaded");
                    out.send(v1::AgentMessage {
                        msg: Some(agent_message::Msg::Checkpoint(v1::CheckpointTaken {
                            run_id: key.0,
                            attempt: key.1,
                            checkpoint: Some(checkpoint),
                        })),
                    })
                    .await?;
                }
            }
            Event::Ended(key, outcome, outputs, checkpoint) => {
                if let Some(entry) = self.attempts.get_mut(&key) {
                    tracing::info!(run_id = %key.0, attempt = key.1, end = outcome.end.as_str(), exit_code = ?outcome.exit_code, "attempt ended");
                    let mut end = ended(&key, &outcome, outputs);
                    end.checkpoint = checkpoint;
                    end.log_bytes = crate::ship::file_len_now(entry.log.path());
                    end.metric_bytes = crate::ship::file_len_now(entry.metrics.path());
                    entry.end = Some(end);
                    entry.task = None;
                    // Only this attempt: its end goes out now, not at the next tick (and
                    // not after a pass over every other attempt of the node).
                    ship_entry(&key, entry, out).await?;
                }
            }
        }
        Ok(())
    }

    /// Sends new log and metric bytes of every attempt, then the ends whose log and
    /// metrics are all shipped.
    async fn ship(&mut self, out: &mpsc::Sender<v1::AgentMessage>) -> Result<(), SessionError> {
        for (key, entry) in self.attempts.iter_mut() {
            ship_entry(key, entry, out).await?;
        }
        Ok(())
    }
}

/// Sends an attempt's new log and metric bytes, then its end once they are all shipped.
async fn ship_entry(
    (run_id, attempt): &Key,
    entry: &mut Entry,
    out: &mpsc::Sender<v1::AgentMessage>,
) -> Result<(), SessionError> {
    entry.log.ship(run_id, *attempt, SHIP_PER_TICK, out).await?;
    entry
        .metrics
        .ship(run_id, *attempt, SHIP_PER_TICK, out)
        .await?;
    if let Some(end) = &entry.end
        && !entry.end_sent
        && entry.log.shipped() >= end.log_bytes
        && entry.metrics.shipped() >= end.metric_bytes
    {
        out.send(msg(agent_message::Msg::Update(end.clone())))
            .await?;
        entry.end_sent = true;
    }
    Ok(())
}

/// What the agent registers: the node, what it offers (`host` = the machine's millicores
/// and bytes, capped by `--cpus`/`--memory`, none at all for an unlimited node), its GPUs,
/// and its labels plus the exec port and the GPU software versions (as labels, as GPU
/// feature discovery does).
fn registration(
    config: &AgentConfig,
    node_id: &str,
    exec_port: u16,
    gpus: &crate::GpuReport,
    host: (u64, u64),
) -> v1::RegisterRequest {
    let (cpu, mem) = host;
    let (cpu, mem) = if config.unlimited {
        (0, 0)
    } else {
        (
            config.cpu_millis.unwrap_or(cpu).min(cpu),
            config.memory_bytes.unwrap_or(mem).min(mem),
        )
    };
    let mut labels = config.labels.clone();
    labels.insert(muster_proto::EXEC_PORT_LABEL.into(), exec_port.to_string());
    if let Some(v) = &gpus.driver_version {
        labels.insert("nvidia.com/driver-version".into(), v.clone());
    }
    if let Some(v) = &gpus.cuda_version {
        labels.insert("nvidia.com/cuda-version".into(), v.clone());
    }
    v1::RegisterRequest {
        node_id: node_id.to_string(),
        name: config.name.clone(),
        compute: config.compute.clone(),
        capacity: Some(v1::Resources {
            cpu_millis: cpu,
            memory_bytes: mem,
            gpus: gpus.gpus.len() as u32,
        }),
        gpus: gpus.gpus.iter().cloned().map(Into::into).collect(),
        labels: labels.into_iter().collect(),
        tier: config.tier.as_str().into(),
        address: config.advertise_addr.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        max_runs: config.max_runs.unwrap_or(0),
    }
}

/// A stop order's reason off the wire. A reason this version does not know still stops
/// the attempt — the server wants it stopped — as fencing does (its report is ignored
/// anyway), and says so.
fn stop_reason(raw: i32) -> StopReason {
    match v1::StopReason::from_wire(raw) {
        Ok(v1::StopReason::Canceled) => StopReason::Canceled,
        Ok(v1::StopReason::Preempted) => StopReason::Preempted,
        Ok(v1::StopReason::Stale) => StopReason::Stale,
        Ok(v1::StopReason::Unspecified) | Err(_) => {
            tracing::error!(
                reason = raw,
                "a stop order with an unknown reason (the server may run another muster version); stopping the attempt as stale"
            );
            StopReason::Stale
        }
    }
}

fn msg(m: agent_message::Msg) -> v1::AgentMessage {
    v1::AgentMessage { msg: Some(m) }
}

fn update(run_id: &str, attempt: u32, state: v1::AttemptState) -> v1::AgentMessage {
    msg(agent_message::Msg::Update(v1::AttemptUpdate {
        run_id: run_id.to_string(),
        attempt,
        state: state.into(),
        ..Default::default()
    }))
}

fn ended(key: &Key, o: &Outcome, outputs: Option<String>) -> v1::AttemptUpdate {
    v1::AttemptUpdate {
        run_id: key.0.clone(),
        attempt: key.1,
        state: v1::AttemptState::Ended.into(),
        end: v1::AttemptEnd::from(o.end).into(),
        exit_code: o.exit_code,
        message: o.message.clone(),
        outputs,
        log_bytes: 0,
        metric_bytes: 0,
        checkpoint: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_caps_the_offer_and_labels_the_node() {
        let mut config = AgentConfig::new("http://s:1", "/tmp/x", "gpu");
        config.name = "n".into();
        config.cpu_millis = Some(2_000);
        config.labels = [("zone".to_string(), "a".to_string())].into();
        let gpus = crate::GpuReport {
            gpus: vec![muster_core::Gpu {
                uuid: "GPU-1".into(),
                model: "m".into(),
                memory_bytes: 1,
            }],
            driver_version: Some("555".into()),
            cuda_version: None,
            note: None,
        };
        let r = registration(&config, "node-1", 7001, &gpus, (8_000, 1 << 30));
        let capacity = r.capacity.unwrap();
        assert_eq!(
            (capacity.cpu_millis, capacity.memory_bytes, capacity.gpus),
            (2_000, 1 << 30, 1)
        );
        assert_eq!(r.labels["zone"], "a");
        assert_eq!(r.labels[muster_proto::EXEC_PORT_LABEL], "7001");
        assert_eq!(r.labels["nvidia.com/driver-version"], "555");
        assert!(!r.labels.contains_key("nvidia.com/cuda-version"));
        // More than the machine has is capped at the machine; unlimited offers nothing.
        config.memory_bytes = Some(1 << 40);
        let capacity = registration(&config, "node-1", 7001, &gpus, (8_000, 1 << 30))
            .capacity
            .unwrap();
        assert_eq!(capacity.memory_bytes, 1 << 30);
        config.unlimited = true;
        let capacity = registration(&config, "node-1", 7001, &gpus, (8_000, 1 << 30))
            .capacity
            .unwrap();
        assert_eq!((capacity.cpu_millis, capacity.memory_bytes), (0, 0));
        // A cap on runs at once goes with any offer, unlimited or not.
        assert_eq!(registration(&config, "n", 1, &gpus, (1, 1)).max_runs, 0);
        config.max_runs = Some(8);
        assert_eq!(registration(&config, "n", 1, &gpus, (1, 1)).max_runs, 8);
    }

    #[test]
    fn stop_reasons_come_off_the_wire() {
        assert_eq!(
            stop_reason(v1::StopReason::Canceled.into()),
            StopReason::Canceled
        );
        assert_eq!(
            stop_reason(v1::StopReason::Preempted.into()),
            StopReason::Preempted
        );
        assert_eq!(stop_reason(v1::StopReason::Stale.into()), StopReason::Stale);
    }
}
