//! A cluster of `muster server`s in this process, on 127.0.0.1 ports, talking real gRPC,
//! with the verbs of raft-rs's test network: `cut(a, b)`, `isolate(n)`, `heal()`, plus
//! `kill(n)` and `restart(n)` on the same data directory.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_proto::v1::{self, cluster_service_client::ClusterServiceClient};
use muster_server::ServerConfig;
use muster_server::cluster::NetworkFilter;
use tokio::task::JoinHandle;

/// Which links between servers are cut (both directions).
#[derive(Debug, Default)]
pub struct Partition {
    cut: Mutex<BTreeSet<(u64, u64)>>,
}

impl NetworkFilter for Partition {
    fn allows(&self, from: u64, to: u64) -> bool {
        !self
            .cut
            .lock()
            .expect("partition lock")
            .contains(&(from.min(to), from.max(to)))
    }
}

#[derive(Debug)]
struct Slot {
    addr: SocketAddr,
    data_dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// N servers of one Raft group.
#[derive(Debug)]
pub struct TestCluster {
    slots: BTreeMap<u64, Slot>,
    founders: Vec<u64>,
    net: Arc<Partition>,
    tweak: fn(&mut ServerConfig),
    key: String,
    /// The `muster tls init` directory when the servers speak mutual TLS.
    tls: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// The server id the test harness presents with the cluster key when it asks a server for
/// its status (it is no member; status is all it asks that way).
const HARNESS_ID: u64 = 1_000_000;

impl TestCluster {
    /// Starts `n` servers (ids 1..=n) and waits until they have a leader.
    pub async fn start(n: u64) -> anyhow::Result<TestCluster> {
        Self::start_with(n, |_| {}).await
    }

    /// Starts `n` servers with settings changed by `tweak`.
    pub async fn start_with(n: u64, tweak: fn(&mut ServerConfig)) -> anyhow::Result<TestCluster> {
        Self::start_inner(n, tweak, false).await
    }

    /// Starts `n` servers speaking mutual TLS with certificates of a fresh cluster CA
    /// (`muster tls init`, in [`TestCluster::tls_dir`]); no cluster key: the servers know
    /// each other by their certificates.
    pub async fn start_tls(n: u64) -> anyhow::Result<TestCluster> {
        Self::start_inner(n, |_| {}, true).await
    }

    async fn start_inner(
        n: u64,
        tweak: fn(&mut ServerConfig),
        tls: bool,
    ) -> anyhow::Result<TestCluster> {
        crate::init_tracing();
        let dir = tempfile::tempdir()?;
        let tls = if tls {
            let tls_dir = dir.path().join("tls");
            let servers: Vec<(u64, Vec<String>)> = (1..=n).map(|id| (id, Vec::new())).collect();
            muster_cli::tls::init(&tls_dir, &servers, true)?;
            // The harness asks servers for their status as a server would.
            let ca = muster_cli::tls::load_ca(&tls_dir)?;
            muster_cli::tls::issue_server(
                &tls_dir,
                &ca,
                HARNESS_ID,
                &[],
                muster_cli::tls::LEAF_VALIDITY,
            )?;
            Some(tls_dir)
        } else {
            None
        };
        let mut listeners = BTreeMap::new();
        for id in 1..=n {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            listeners.insert(id, l);
        }
        let mut slots = BTreeMap::new();
        for (id, l) in &listeners {
            slots.insert(
                *id,
                Slot {
                    addr: l.local_addr()?,
                    data_dir: dir.path().join(format!("s{id}")),
                    stop: None,
                    task: None,
                },
            );
        }
        let founders = slots.keys().copied().collect();
        let mut cluster = TestCluster {
            slots,
            founders,
            net: Arc::new(Partition::default()),
            tweak,
            key: format!("test-cluster-key-{:032x}", rand::random::<u128>()),
            tls,
            _dir: dir,
        };
        if let Some(tls) = &cluster.tls {
            crate::access::register_ca(&cluster.urls(), &tls.join("ca.pem"));
        }
        for (id, l) in listeners {
            cluster.launch(id, l);
        }
        let founder = *cluster.founders.first().expect("at least one server");
        crate::access::await_admin_token(
            &cluster.data_dir(founder).join("admin-token"),
            &cluster.urls(),
        )
        .await?;
        // Every server knows the leader before a test starts: a follower that does not yet
        // would answer a first request "not the leader" instead of forwarding it.
        let leader = cluster.leader().await?;
        for _ in 0..50 {
            let mut all = true;
            for id in cluster.ids() {
                all &= cluster
                    .status(id)
                    .await
                    .is_some_and(|s| s.leader == Some(leader));
            }
            if all {
                return Ok(cluster);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("not every server learned of leader {leader} within 5 s")
    }

    fn peers(&self) -> BTreeMap<u64, String> {
        self.slots
            .iter()
            .map(|(id, s)| (*id, s.addr.to_string()))
            .collect()
    }

    fn launch(&mut self, id: u64, listener: tokio::net::TcpListener) {
        let peers = self.peers();
        self.launch_with(id, listener, peers);
    }

    fn launch_with(
        &mut self,
        id: u64,
        listener: tokio::net::TcpListener,
        peers: BTreeMap<u64, String>,
    ) {
        let founders: Vec<u64> = self.founders.clone();
        let slot = self.slots.get_mut(&id).expect("a slot per id");
        let mut config = ServerConfig::new(&slot.data_dir);
        config.raft.id = id;
        // A server added later starts with no voters: it waits to be added by the leader.
        config.raft.initial_voters = if founders.contains(&id) {
            founders
        } else {
            Vec::new()
        };
        config.peers = peers;
        config.network = Some(self.net.clone() as Arc<dyn NetworkFilter>);
        match &self.tls {
            Some(tls) => {
                config.tls = Some(muster_server::TlsFiles::in_dir(
                    &tls.join(format!("server-{id}")),
                ))
            }
            None => config.cluster_key = Some(self.key.clone()),
        }
        config.stop_grace = Duration::from_secs(2);
        (self.tweak)(&mut config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        slot.stop = Some(stop);
        slot.task = Some(tokio::spawn(muster_server::run(
            listener,
            config,
            async move {
                let _ = stopped.await;
            },
        )));
    }

    /// The ids of the servers.
    pub fn ids(&self) -> Vec<u64> {
        self.slots.keys().copied().collect()
    }

    /// The URL of server `id`.
    pub fn url(&self, id: u64) -> String {
        format!("http://{}", self.slots[&id].addr)
    }

    /// The cluster key its servers share (none is used with TLS).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The `muster tls init` directory, when the servers speak mutual TLS.
    pub fn tls_dir(&self) -> Option<&Path> {
        self.tls.as_deref()
    }

    /// What the harness presents to ask a server for its status: the cluster key, or with
    /// TLS a server certificate of its own.
    fn harness(&self) -> anyhow::Result<muster_client::Credentials> {
        Ok(match &self.tls {
            Some(tls) => {
                let dir = tls.join(format!("server-{HARNESS_ID}"));
                muster_client::Credentials::none().with_tls(
                    muster_client::ClientTls::from_ca_file(&dir.join("ca.pem"))?
                        .with_identity_files(&dir.join("cert.pem"), &dir.join("key.pem"))?,
                )
            }
            None => muster_client::Credentials::server(HARNESS_ID, &self.key)?,
        })
    }

    /// Every server's URL, comma-separated (what `--server` takes).
    pub fn urls(&self) -> String {
        self.ids()
            .into_iter()
            .map(|id| self.url(id))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Server `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.slots[&id].data_dir.clone()
    }

    /// Server `id`'s own view of the cluster, if it answers within a second.
    pub async fn status(&self, id: u64) -> Option<v1::ClusterStatus> {
        let fut = async {
            let harness = self.harness().ok()?;
            let channel = muster_client::Servers::new([self.url(id)])
                .with_credentials(harness)
                .connect()
                .await
                .ok()?
                .1;
            let mut c = ClusterServiceClient::new(channel);
            c.status(v1::ClusterStatusRequest::default())
                .await
                .ok()
                .map(|r| r.into_inner())
        };
        tokio::time::timeout(Duration::from_secs(1), fut)
            .await
            .ok()
            .flatten()
    }

    /// Waits (bounded: 15 s) until a majority of the running servers agree on one leader
    /// that says it leads; returns its id.
    pub async fn leader(&self) -> anyhow::Result<u64> {
        self.leader_among(&self.ids()).await
    }

    /// Like [`TestCluster::leader`], asking only `ids`.
    pub async fn leader_among(&self, ids: &[u64]) -> anyhow::Result<u64> {
        for _ in 0..150 {
            let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
            let mut leaders = BTreeSet::new();
            for id in ids {
                if let Some(s) = self.status(*id).await {
                    if let Some(l) = s.leader {
                        *votes.entry(l).or_default() += 1;
                    }
                    if s.role == "leader" {
                        leaders.insert(s.id);
                    }
                }
            }
            if let Some((l, n)) = votes.into_iter().max_by_key(|(_, n)| *n)
                && n * 2 > self.slots.len()
                && leaders.contains(&l)
                && ids.contains(&l)
            {
                return Ok(l);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("no leader among {ids:?} within 15 s")
    }

    /// Cuts the link between `a` and `b` (both ways).
    pub fn cut(&self, a: u64, b: u64) {
        self.net
            .cut
            .lock()
            .expect("partition lock")
            .insert((a.min(b), a.max(b)));
    }

    /// Cuts `n` off from every other server.
    pub fn isolate(&self, n: u64) {
        for other in self.ids() {
            if other != n {
                self.cut(n, other);
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.net.cut.lock().expect("partition lock").clear();
    }

    /// Starts a new, empty server `id` that waits to join (`muster server --join`), and
    /// asks the leader to add it (learner first, then voter). Returns once it votes.
    pub async fn join(&mut self, id: u64) -> anyhow::Result<()> {
        anyhow::ensure!(!self.slots.contains_key(&id), "server {id} exists");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let data_dir = self._dir.path().join(format!("s{id}"));
        if let Some(tls) = &self.tls {
            let ca = muster_cli::tls::load_ca(tls)?;
            muster_cli::tls::issue_server(tls, &ca, id, &[], muster_cli::tls::LEAF_VALIDITY)?;
        }
        self.slots.insert(
            id,
            Slot {
                addr,
                data_dir,
                stop: None,
                task: None,
            },
        );
        self.launch(id, listener);
        if let Some(token) = crate::access::admin_token(&self.url(self.founders[0])) {
            crate::access::register(&self.url(id), &token);
        }
        if let Some(tls) = &self.tls {
            crate::access::register_ca(&self.url(id), &tls.join("ca.pem"));
        }
        let leader = self.leader().await?;
        let mut c = ClusterServiceClient::new(crate::access::channel(&self.url(leader)).await?);
        c.add_server(v1::AddServerRequest {
            id,
            address: addr.to_string(),
        })
        .await?;
        Ok(())
    }

    /// Asks the leader to remove server `id`, then stops it.
    pub async fn remove(&mut self, id: u64) -> anyhow::Result<()> {
        let leader = self.leader().await?;
        let mut c = ClusterServiceClient::new(crate::access::channel(&self.url(leader)).await?);
        c.remove_server(v1::RemoveServerRequest { id }).await?;
        self.kill(id).await?;
        self.slots.remove(&id);
        Ok(())
    }

    /// Stops server `id` at once (its listener closes, its log stays on disk).
    pub async fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let slot = self.slots.get_mut(&id).expect("known server");
        if let Some(stop) = slot.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = slot.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task).await???;
        }
        Ok(())
    }

    /// Starts server `id` again on its data directory and address.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let listener = self.rebind(id).await?;
        self.launch(id, listener);
        Ok(())
    }

    /// Starts server `id` again on its data directory and address, knowing nothing of its
    /// peers but what its data directory holds (no `--peers`).
    pub async fn restart_from_data_dir(&mut self, id: u64) -> anyhow::Result<()> {
        let listener = self.rebind(id).await?;
        self.launch_with(id, listener, BTreeMap::new());
        Ok(())
    }

    async fn rebind(&self, id: u64) -> anyhow::Result<tokio::net::TcpListener> {
        let addr = self.slots[&id].addr;
        let mut listener = None;
        for _ in 0..50 {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        listener.ok_or_else(|| anyhow::anyhow!("cannot bind {addr} again"))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for slot in self.slots.values_mut() {
            if let Some(stop) = slot.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}
