//! The agent's main loop: register, hold the session stream, start and stop attempts,
//! ship their logs, and report their ends until the server acknowledges them. Attempts
//! outlive a broken session; on reconnect everything unacknowledged is sent again.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use muster_core::AttemptEnd;
use muster_proto::Word;
use muster_proto::v1::{
    self, agent_message, agent_service_client::AgentServiceClient,
    blob_service_client::BlobServiceClient, server_message,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::AgentConfig;
use crate::attempt::{AttemptTask, Event, Executors, Key};
use crate::executor::docker::DockerExecutor;
use crate::executor::{Outcome, Stop, StopReason};
use crate::resources::host_capacity;

pub(crate) const SHIP_CHUNK: usize = 256 * 1024;
const SHIP_PER_TICK: usize = 8 << 20;

/// An attempt this agent knows of, until the server acknowledges its end.
struct Entry {
    log_path: PathBuf,
    workdir: PathBuf,
    shipped: u64,
    /// The attempt's `MUSTER_METRICS_FILE` on the host, and how far it is shipped.
    metrics: crate::metrics::Shipping,
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
    /// The leader's address, as a follower named it.
    leader_hint: Option<String>,
    /// The exec listener (bound at open, served once the Docker engine is known).
    exec_listener: Option<std::net::TcpListener>,
    /// Its port, advertised in the node label `muster.exec-port`.
    exec_port: u16,
    /// The task serving it.
    exec_task: Option<JoinHandle<()>>,
}

/// A failure that retrying will not fix (bad name, unknown compute target, ...).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Fatal(String);

impl Agent {
    pub(crate) fn open(config: AgentConfig) -> anyhow::Result<Agent> {
        anyhow::ensure!(
            !config.servers.is_empty(),
            "give at least one server address (--server)"
        );
        let (lock, node_id) = crate::identity::open(&config.data_dir)?;
        for d in ["work", "cache/blobs"] {
            std::fs::create_dir_all(config.data_dir.join(d))
                .with_context(|| format!("cannot create {}", config.data_dir.join(d).display()))?;
        }
        let (events_tx, events_rx) = mpsc::channel(1024);
        let exec_listener = std::net::TcpListener::bind(&config.exec_listen).with_context(|| {
            format!(
                "cannot listen for exec requests of distributed runs on {}: pick another --exec-listen address",
                config.exec_listen
            )
        })?;
        exec_listener.set_nonblocking(true)?;
        let exec_port = exec_listener.local_addr()?.port();
        let executors = Executors {
            docker: None,
            docker_error: None,
            process_fallback: config.process_fallback,
            gpu_device_requests: config.gpu_device_requests,
            unlimited: config.unlimited,
            node_id: node_id.clone(),
            rsh_helper: crate::find_rsh_helper(config.rsh_helper.as_deref()),
            registry: Default::default(),
            peer_wait: config.peer_wait,
        };
        Ok(Agent {
            leader_hint: None,
            exec_listener: Some(exec_listener),
            exec_port,
            exec_task: None,
            executors,
            config,
            node_id,
            _lock: lock,
            attempts: HashMap::new(),
            events_tx,
            events_rx,
        })
    }

    pub(crate) async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let mut report = self.probe_gpus().await;
        if let Some(note) = &report.note {
            tracing::info!("{note}");
        }
        tracing::info!(node = %self.config.name, id = %self.node_id, compute = %self.config.compute, gpus = report.gpus.len(), "agent starting");
        match DockerExecutor::connect().await {
            Ok(docker) => {
                tracing::info!(
                    "Docker engine reachable: runs that name an image run in containers, others as processes"
                );
                self.executors.docker = Some(std::sync::Arc::new(docker));
                self.adopt_containers().await;
            }
            Err(e) => {
                let then = if self.config.process_fallback {
                    "run as processes"
                } else {
                    "fail"
                };
                tracing::info!("{e}; runs run as processes (runs that name an image {then})");
                self.executors.docker_error = Some(e);
            }
        }
        if let Some(listener) = self.exec_listener.take() {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            self.exec_task = Some(tokio::spawn(crate::rsh_server::serve(
                listener,
                self.executors.registry.clone(),
                self.executors.docker.clone(),
            )));
        }
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        let result = loop {
            let attempt = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                r = self.serve(&mut report) => r,
            };
            match attempt {
                Err(e) if e.downcast_ref::<Fatal>().is_some() => break Err(e),
                Err(e) => {
                    tracing::warn!(cause = %format!("{e:#}"), retry_in = ?backoff, "no session with a server")
                }
                Ok(()) => {
                    tracing::info!("session ended; reconnecting");
                    backoff = Duration::from_millis(100);
                }
            }
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        };
        self.stop_all().await;
        if let Some(t) = self.exec_task.take() {
            t.abort();
        }
        result
    }

    /// Re-adopts the containers this node started before the agent restarted: their logs
    /// keep flowing and their ends are reported as if the agent had never gone.
    async fn adopt_containers(&mut self) {
        let Some(docker) = self.executors.docker.clone() else {
            return;
        };
        let managed = match docker.managed(&self.node_id).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(cause = %e, "cannot list this node's containers; none re-adopted");
                return;
            }
        };
        for m in managed {
            let key = (m.run_id.clone(), m.attempt);
            if self.attempts.contains_key(&key) {
                continue;
            }
            tracing::info!(run_id = %m.run_id, attempt = m.attempt, running = m.running, "re-adopting container");
            let workdir = self.workdir(&key);
            let log_path = workdir.join("output.log");
            let shipped = 0;
            let (stop, stop_rx) = watch::channel(None);
            let task = AttemptTask {
                key: key.clone(),
                workdir: workdir.clone(),
                log_path: log_path.clone(),
                cache_dir: self.config.data_dir.join("cache/blobs"),
                blobs: self.lazy_blobs(),
                servers: self.config.servers.clone(),
                events: self.events_tx.clone(),
                stop: stop_rx,
                executors: self.executors.clone(),
            };
            let handle = tokio::spawn(task.adopt(docker.clone(), m));
            self.attempts.insert(
                key,
                Entry {
                    log_path,
                    metrics: Default::default(),
                    workdir,
                    shipped,
                    state: v1::AttemptState::Running,
                    end: None,
                    end_sent: false,
                    stop,
                    task: Some(handle),
                    in_container: true,
                },
            );
        }
    }

    /// A blob client that connects on first use (adopted attempts start before the session).
    fn lazy_blobs(&self) -> BlobServiceClient<Channel> {
        let channel = Endpoint::from_shared(self.config.servers[0].clone())
            .expect("server URLs are checked at connect")
            .connect_lazy();
        BlobServiceClient::new(channel).max_decoding_message_size(8 << 20)
    }

    fn workdir(&self, key: &Key) -> PathBuf {
        self.config
            .data_dir
            .join("work")
            .join(format!("{}.{}", key.0, key.1))
    }

    /// Agent shutdown: containers keep running (the agent re-adopts them when it returns);
    /// processes, which cannot be re-adopted, are stopped (the server restarts them).
    async fn stop_all(&mut self) {
        for entry in self.attempts.values_mut().filter(|e| e.in_container) {
            if let Some(t) = entry.task.take() {
                t.abort();
            }
        }
        for entry in self.attempts.values() {
            entry.stop.send_replace(Some(Stop {
                reason: StopReason::Stale,
                grace: Duration::from_secs(2),
            }));
        }
        for entry in self.attempts.values_mut() {
            if let Some(t) = entry.task.take() {
                let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
            }
        }
    }

    /// Connects to the leader if a follower named it, else to the first server that answers.
    async fn connect(&self) -> anyhow::Result<Channel> {
        let mut last = None;
        let hinted = self.leader_hint.iter().map(|a| {
            if a.contains("://") {
                a.clone()
            } else {
                format!("http://{a}")
            }
        });
        let candidates: Vec<String> = hinted.chain(self.config.servers.iter().cloned()).collect();
        for url in &candidates {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| Fatal(format!("server address {url:?} is not a URL: {e}")))?
                .connect_timeout(Duration::from_secs(3))
                // A leader cut off by the network (no reset) is noticed within ~3 s, so the
                // agent moves to the new leader about when the cluster elects it.
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2));
            match endpoint.connect().await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(anyhow::anyhow!("{url}: {e}")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no servers")))
    }

    async fn probe_gpus(&self) -> crate::GpuReport {
        let probe = self.config.gpu_probe.clone();
        tokio::task::spawn_blocking(move || probe.probe())
            .await
            .unwrap_or_default()
    }

    async fn register(
        &self,
        client: &mut AgentServiceClient<Channel>,
        gpus: &crate::GpuReport,
    ) -> anyhow::Result<v1::RegisterResponse> {
        let (cpu, mem) = host_capacity();
        let (cpu, mem) = if self.config.unlimited {
            (0, 0)
        } else {
            (
                self.config.cpu_millis.unwrap_or(cpu).min(cpu),
                self.config.memory_bytes.unwrap_or(mem).min(mem),
            )
        };
        Ok(client
            .register(v1::RegisterRequest {
                node_id: self.node_id.clone(),
                name: self.config.name.clone(),
                compute: self.config.compute.clone(),
                capacity: Some(v1::Resources {
                    cpu_millis: cpu,
                    memory_bytes: mem,
                    gpus: gpus.gpus.len() as u32,
                }),
                gpus: gpus.gpus.iter().cloned().map(Into::into).collect(),
                labels: {
                    // GPU software versions travel as labels, as GPU feature discovery does.
                    let mut labels = self.config.labels.clone();
                    labels.insert(
                        muster_proto::EXEC_PORT_LABEL.into(),
                        self.exec_port.to_string(),
                    );
                    if let Some(v) = &gpus.driver_version {
                        labels.insert("nvidia.com/driver-version".into(), v.clone());
                    }
                    if let Some(v) = &gpus.cuda_version {
                        labels.insert("nvidia.com/cuda-version".into(), v.clone());
                    }
                    labels.into_iter().collect()
                },
                tier: self.config.tier.as_str().into(),
                address: self.config.advertise_addr.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .await
            .map_err(|s| match s.code() {
                Code::InvalidArgument | Code::NotFound | Code::AlreadyExists => anyhow::Error::new(
                    Fatal(format!("the server refused this agent: {}", s.message())),
                ),
                _ => anyhow::anyhow!("register: {}", s.message()),
            })?
            .into_inner())
    }

    async fn serve(&mut self, gpus: &mut crate::GpuReport) -> anyhow::Result<()> {
        let channel = self.connect().await?;
        let mut client =
            AgentServiceClient::new(channel.clone()).max_decoding_message_size(8 << 20);
        let blobs = BlobServiceClient::new(channel).max_decoding_message_size(8 << 20);
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
                if let Some(leader) = s
                    .metadata()
                    .get("muster-leader")
                    .and_then(|v| v.to_str().ok())
                {
                    self.leader_hint = Some(leader.to_string());
                }
                anyhow::anyhow!("session: {}", s.message())
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
                    Err(s) => anyhow::bail!("session: {}", s.message()),
                },
                Some(ev) = self.events_rx.recv() => self.on_event(ev, &out).await?,
                _ = ship.tick() => self.ship(&out).await?,
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
    ) -> anyhow::Result<()> {
        match m.msg {
            Some(server_message::Msg::Assign(a)) => self.on_assign(a, blobs),
            Some(server_message::Msg::Stop(s)) => {
                let key = (s.run_id.clone(), s.attempt);
                let reason = match v1::StopReason::from_wire(s.reason) {
                    Ok(v1::StopReason::Canceled) => StopReason::Canceled,
                    Ok(v1::StopReason::Preempted) => StopReason::Preempted,
                    Ok(v1::StopReason::Stale) => StopReason::Stale,
                    Ok(v1::StopReason::Unspecified) | Err(_) => {
                        // The server wants it stopped, for a reason this version does not
                        // know: stop it as fencing does (its report is ignored anyway).
                        tracing::error!(run_id = %s.run_id, attempt = s.attempt, reason = s.reason, "a stop order with an unknown reason (the server may run another muster version); stopping the attempt as stale");
                        StopReason::Stale
                    }
                };
                let grace = Duration::from_millis(s.grace_ms);
                match self.attempts.get(&key) {
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
                    entry.shipped = r.offset;
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
        let log_path = workdir.join("output.log");
        let (stop, stop_rx) = watch::channel(None);
        if workdir.exists() {
            // This agent started the attempt before a restart and its process is gone (a
            // container would have been re-adopted): report it lost, so the run restarts
            // as a new attempt.
            tracing::warn!(run_id = %a.run_id, attempt = a.attempt, "the attempt's process was lost in an agent restart");
            let log_bytes = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
            let mut end = ended(
                &key,
                &Outcome {
                    end: AttemptEnd::NodeLost,
                    exit_code: None,
                    message: Some("the agent restarted and lost the process (processes cannot be re-adopted; containers can)".into()),
                },
                None,
            );
            end.log_bytes = log_bytes;
            end.metric_bytes = std::fs::metadata(crate::metrics::host_path(&workdir))
                .map(|m| m.len())
                .unwrap_or(0);
            self.attempts.insert(
                key,
                Entry {
                    log_path,
                    metrics: Default::default(),
                    workdir,
                    shipped: 0,
                    state: v1::AttemptState::Running,
                    end: Some(end),
                    end_sent: false,
                    stop,
                    task: None,
                    in_container: false,
                },
            );
            return;
        }
        let in_container =
            a.spec.as_ref().is_some_and(|s| s.image.is_some()) && self.executors.docker.is_some();
        tracing::info!(run_id = %a.run_id, attempt = a.attempt, rank = a.rank, in_container, "starting attempt");
        if let Err(e) = std::fs::create_dir_all(&workdir) {
            tracing::error!(cause = %e, "cannot create the attempt's working directory");
        }
        let task = AttemptTask {
            key: key.clone(),
            workdir: workdir.clone(),
            log_path: log_path.clone(),
            cache_dir: self.config.data_dir.join("cache/blobs"),
            blobs: blobs.clone(),
            servers: self.config.servers.clone(),
            events: self.events_tx.clone(),
            stop: stop_rx,
            executors: self.executors.clone(),
        };
        let handle = tokio::spawn(task.run(a));
        self.attempts.insert(
            key,
            Entry {
                log_path,
                metrics: Default::default(),
                workdir,
                shipped: 0,
                state: v1::AttemptState::Scheduled,
                end: None,
                end_sent: false,
                stop,
                task: Some(handle),
                in_container,
            },
        );
    }

    async fn on_event(
        &mut self,
        ev: Event,
        out: &mpsc::Sender<v1::AgentMessage>,
    ) -> anyhow::Result<()> {
        match ev {
            Event::State(key, state) => {
                if let Some(entry) = self.attempts.get_mut(&key) {
                    entry.state = state;
                    out.send(update(&key.0, key.1, state)).await?;
                }
            }
            Event::Ended(key, outcome, outputs) => {
                if let Some(entry) = self.attempts.get_mut(&key) {
                    tracing::info!(run_id = %key.0, attempt = key.1, end = outcome.end.as_str(), exit_code = ?outcome.exit_code, "attempt ended");
                    let mut end = ended(&key, &outcome, outputs);
                    end.log_bytes = tokio::fs::metadata(&entry.log_path)
                        .await
                        .map(|m| m.len())
                        .unwrap_or(0);
                    end.metric_bytes =
                        crate::metrics::file_len(&crate::metrics::host_path(&entry.workdir)).await;
                    entry.end = Some(end);
                    entry.task = None;
                }
                self.ship(out).await?;
            }
        }
        Ok(())
    }

    /// Sends new log bytes of every attempt, then the ends whose logs are all shipped.
    async fn ship(&mut self, out: &mpsc::Sender<v1::AgentMessage>) -> anyhow::Result<()> {
        for ((run_id, attempt), entry) in self.attempts.iter_mut() {
            let mut budget = SHIP_PER_TICK;
            while budget > 0 {
                let data = read_from(&entry.log_path, entry.shipped, SHIP_CHUNK.min(budget)).await;
                if data.is_empty() {
                    break;
                }
                let n = data.len();
                out.send(msg(agent_message::Msg::Log(v1::LogData {
                    run_id: run_id.clone(),
                    attempt: *attempt,
                    offset: entry.shipped,
                    data,
                })))
                .await?;
                entry.shipped += n as u64;
                budget -= n;
            }
            let metrics_path = crate::metrics::host_path(&entry.workdir);
            entry
                .metrics
                .ship(run_id, *attempt, &metrics_path, SHIP_PER_TICK, out)
                .await?;
            if let Some(end) = &entry.end
                && !entry.end_sent
                && entry.shipped >= end.log_bytes
                && entry.metrics.shipped >= end.metric_bytes
            {
                out.send(msg(agent_message::Msg::Update(end.clone())))
                    .await?;
                entry.end_sent = true;
            }
        }
        Ok(())
    }
}

pub(crate) async fn read_from(path: &std::path::Path, offset: u64, max: usize) -> Vec<u8> {
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::with_capacity(max.min(SHIP_CHUNK));
    let _ = (&mut file).take(max as u64).read_to_end(&mut buf).await;
    buf
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
    }
}
