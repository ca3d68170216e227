//! # muster-server: the coordinator
//!
//! One `muster server` replica: the gRPC API and the web UI on one port, a member of the
//! Raft group (muster-raft), and — while it leads — the loops that schedule runs and watch
//! node heartbeats. It carries out what muster-core decides; it decides nothing itself.
//!
//! ## Layers (each a folder with its own module doc; imports go downward only)
//!
//! ```text
//! grpc/  web/          transport: decode, authorize, call, encode; errors → Status here
//!                      (web/front.rs: every request's first stop, gRPC or web by path;
//!                      grpc/auth.rs: who is calling and the one authorization table;
//!                      web/session.rs: the studio's login cookie and CSRF token)
//! leader/              loops that ask muster-core for decisions and propose them
//! effects              what must be stored before it is recorded (seal logs, take nodes down)
//! views/               read models for the API and the studio
//! coordinator/  store/ the Raft handle + applied State; blobs, logs, series, replication
//! metrics              counters (a leaf)
//! listener             the accept loop, connection limits, per-connection info
//! tls                  TLS 1.3 acceptor, client certificates → identities, reloading (a leaf)
//! ```
//!
//! `server.rs` is the composition root that holds one handle per layer. `store/` has its
//! own error type and no `tonic`; `tests/layers.rs` checks every `use crate::…` against
//! this table. docs/ARCHITECTURE.md follows one run through these files.
//!
//! Crate choices: `axum` routes gRPC (tonic routes) and HTTP on one listener, which
//! `hyper-util`'s auto builder serves (HTTP/1.1 and HTTP/2, with limits; `listener.rs`);
//! `prometheus-client` renders `/metrics`; `sha2` addresses blobs; `bollard` drives the
//! Docker engine for the `docker` provisioner (as the agent does for containers); `askama`
//! renders the studio's pages from HTML templates (`templates/studio/`), checked at compile
//! time and HTML-escaped, rather than maud, whose markup is Rust macros instead of HTML files;
//! `rustls` (ring) through `tokio-rustls` for TLS, as tonic's client side uses it, and
//! `x509-parser` to read a verified client certificate's identity.

mod coordinator;
mod effects;
mod grpc;
mod leader;
mod listener;
mod metrics;
mod server;
pub mod store;
mod tls;
mod views;
mod web;

/// Server-to-server addressing (`--peers` parsing, the test network filter).
pub mod cluster {
    pub use crate::coordinator::peers::{NetworkFilter, parse_peers};
}

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use muster_raft::RaftConfig;
pub use store::{BlobError, BlobStore};
pub use tls::TlsFiles;

/// How a server runs. Build it over [`ServerConfig::new`] and check it with [`ServerConfig::validate`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Everything the server stores lives here (Raft log and snapshots, blobs, logs).
    pub data_dir: PathBuf,
    /// The Raft node's settings (id, initial voters, timing).
    pub raft: RaftConfig,
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// A node silent this long is marked lost and its runs restarted elsewhere.
    pub node_grace: Duration,
    /// The scheduler runs at most this often (it runs on events, not on a timer).
    pub scheduler_min_interval: Duration,
    /// Time a canceled run gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// The largest blob accepted (a code snapshot or an outputs archive).
    pub max_blob_bytes: u64,
    /// Uploads one token (a user's or an agent's) may have open at once; one more is
    /// refused (RESOURCE_EXHAUSTED). Servers copying blobs to peers are not limited.
    pub max_uploads_per_caller: u32,
    /// Bytes per second one token's uploads may add up to, past a burst of
    /// `max_blob_bytes`; faster uploads are paced, not failed (0: no limit).
    pub upload_bytes_per_sec: u64,
    /// Create the `local` compute target on first start (`muster dev`).
    pub create_local_compute: bool,
    /// Where the servers of a multi-server cluster are, id → `host:port`, this server
    /// included (`--peers`); empty for a single server. The initial voters themselves are
    /// `raft.initial_voters` (the CLI sets them to these ids).
    pub peers: std::collections::BTreeMap<u64, String>,
    /// The `host:port` other servers and agents reach this server at (`--advertise`; the
    /// CLI takes `--listen` when it names a specific address). It fills in this server's
    /// entry when `peers` lacks it (a server started alone, to be grown with
    /// `add-server`), and the first leader records it in the replicated state.
    pub advertise: Option<String>,
    /// The autoscaler runs at most this often (on events, and at least once a second so
    /// idle times are noticed).
    pub autoscale_min_interval: Duration,
    /// The server addresses (`host:port`) agents started by a provisioner connect to,
    /// unless the compute target's provisioner names its own. Empty: the addresses of
    /// `peers`, or for a single server `advertise`, else the address it listens on
    /// (`0.0.0.0` read as `127.0.0.1`, which agent containers on the host network reach).
    pub agent_servers: Vec<String>,
    /// Further host names (`Host` headers) the web UI answers to (`--web-host`), as `NAME`
    /// (any port) or `NAME:PORT`. It always answers to `localhost`, `127.0.0.1` and `[::1]`
    /// and to the host of `advertise` (or of this server's `peers` entry); any other name
    /// gets 421, which keeps a DNS-rebinding page (its name resolved to this machine) out.
    /// Empty by default.
    pub web_hosts: Vec<String>,
    /// Test hook: drops messages between servers (testkit `cut`/`isolate`).
    pub network: Option<std::sync::Arc<dyn cluster::NetworkFilter>>,
    /// Serve TLS 1.3 with these files (`--tls-dir`, made by `muster tls init`): clients
    /// must trust the CA, and servers and agents present certificates the CA signed, which
    /// say who they are. Peers are called over TLS with this certificate.
    pub tls: Option<TlsFiles>,
    /// The secret servers of one cluster present to each other without TLS
    /// (`--cluster-key-file`): required with peers, since Raft and replication accept
    /// only servers. Never logged.
    pub cluster_key: Option<String>,
    /// Where the founding server of a new cluster writes the first admin's token (0600);
    /// `None`: `<data_dir>/admin-token`. A server that did not found the cluster (a
    /// `--join`ed one, or not the first of `--peers`) writes none.
    pub admin_token_file: Option<PathBuf>,
    /// Finished runs older than this leave the replicated state for archives in the blob
    /// store (`--retention`; `run show`, logs and outputs keep working). `None`: kept in
    /// the state for good, as Azure ML keeps runs.
    pub retention: Option<Duration>,
    /// How often the leader looks for runs to archive (with `retention`).
    pub retention_check: Duration,
    /// Found a one-server cluster from this backup (`--restore-from`) in an empty data
    /// directory ([`store::backup`]).
    pub restore_from: Option<PathBuf>,
}

impl ServerConfig {
    /// Defaults for a server storing under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            data_dir: data_dir.into(),
            raft: RaftConfig::default(),
            heartbeat_interval: Duration::from_secs(5),
            node_grace: Duration::from_secs(30),
            scheduler_min_interval: Duration::from_millis(5),
            stop_grace: Duration::from_secs(10),
            max_blob_bytes: 4 << 30,
            max_uploads_per_caller: 16,
            upload_bytes_per_sec: 512 << 20,
            create_local_compute: false,
            peers: Default::default(),
            advertise: None,
            autoscale_min_interval: Duration::from_secs(1),
            agent_servers: Vec::new(),
            web_hosts: Vec::new(),
            network: None,
            cluster_key: None,
            tls: None,
            admin_token_file: None,
            retention: None,
            retention_check: Duration::from_secs(60),
            restore_from: None,
        }
    }

    /// Where the first admin's token is written (see [`ServerConfig::admin_token_file`]).
    pub fn admin_token_path(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin-token"))
    }

    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.raft.validate()?;
        anyhow::ensure!(
            self.peers.is_empty() || self.peers.contains_key(&self.raft.id),
            "--peers must include this server's own id ({}) and address",
            self.raft.id
        );
        if let Some(advertise) = &self.advertise {
            muster_core::state::validate_server_address(self.raft.id, advertise)
                .map_err(|e| anyhow::anyhow!("--advertise: {e}"))?;
            if let Some(listed) = self.peers.get(&self.raft.id) {
                anyhow::ensure!(
                    listed == advertise,
                    "--advertise {advertise} differs from this server's --peers entry {listed}: give one address"
                );
            }
        }
        for name in &self.web_hosts {
            web::front::validate_web_host(name).map_err(anyhow::Error::msg)?;
        }
        anyhow::ensure!(
            self.raft.initial_voters.len() == 1 || self.cluster_key.is_some() || self.tls.is_some(),
            "a cluster of several servers needs its servers to know each other: give each one its --tls-dir (`muster tls init`), or, without TLS, the same --cluster-key-file (`muster cluster key > cluster.key`)"
        );
        if let Some(key) = &self.cluster_key {
            anyhow::ensure!(
                key.trim().len() >= 32 && key.trim().chars().all(|c| c.is_ascii_graphic()),
                "--cluster-key-file: the key must be at least 32 printable characters without spaces (make one with `muster cluster key`)"
            );
        }
        anyhow::ensure!(
            self.max_uploads_per_caller >= 1,
            "--max-uploads-per-caller must be at least 1"
        );
        anyhow::ensure!(
            self.node_grace > self.heartbeat_interval * 2,
            "node grace ({:?}) must exceed two heartbeat intervals ({:?})",
            self.node_grace,
            self.heartbeat_interval
        );
        Ok(())
    }
}

/// Runs a server on `listener` until `shutdown` resolves: opens the data directory (or
/// fails with a clear error), starts Raft, serves gRPC + HTTP, and runs the leader loops.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    open(listener, config).await?.serve(shutdown).await
}

/// A server whose data directory is open and whose Raft node runs, not yet serving:
/// what [`open`] returns, so a caller can say it is listening only once that is true.
pub struct Opened {
    listener: tokio::net::TcpListener,
    server: std::sync::Arc<server::Server>,
    hosts: web::front::AllowedHosts,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("listener", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Opened {
    /// Serves until `shutdown` resolves, then stops the server.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let server = self.server.clone();
        let result = serve(self.listener, self.server, self.hosts, self.tls, shutdown).await;
        server.stop().await;
        result
    }
}

/// Checks the settings, opens the data directory (refusing one in use, corrupt, or holding
/// stores without their Raft log) and starts Raft; the TLS files are read here too, so
/// every start-up error comes before the server says it listens.
pub async fn open(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
) -> anyhow::Result<Opened> {
    config.validate()?;
    let mut config = config;
    if config.agent_servers.is_empty() {
        config.agent_servers = if !config.peers.is_empty() {
            config.peers.values().cloned().collect()
        } else if let Some(own) = &config.advertise {
            vec![own.clone()]
        } else {
            let mut addr = listener.local_addr()?;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            vec![addr.to_string()]
        };
    }
    let hosts = web::front::AllowedHosts::of(&config);
    let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
    let server = server::Server::open(&config).await?;
    Ok(Opened {
        listener,
        server,
        hosts,
        tls,
    })
}

/// Presents a rotated certificate to the other servers too: when the certificate or key
/// file changes (checked every 2 s), the peers' connections are remade with it.
async fn reload_peer_identity(server: std::sync::Arc<server::Server>, files: TlsFiles) {
    let stamp =
        || [&files.cert, &files.key].map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let mut seen = stamp();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = stamp();
        if now == seen {
            continue;
        }
        match server::peer_credentials(&server.config) {
            Ok(credentials) => {
                server.coordinator.peers().set_credentials(credentials);
                tracing::info!("presenting the rotated TLS certificate to the other servers");
                seen = now;
            }
            Err(e) => {
                tracing::warn!("keeping the current certificate for the other servers: {e:#}")
            }
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    server: std::sync::Arc<server::Server>,
    hosts: web::front::AllowedHosts,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut leader_tasks = leader::spawn(server.clone());
    leader_tasks.push(tokio::spawn(grpc::auth::record_denials(server.clone())));
    if server.secret_key.get().is_none() {
        let joined = server.clone();
        leader_tasks.push(tokio::spawn(async move { joined.fetch_secret_key().await }));
    }
    if server.founds_cluster() {
        let founder = server.clone();
        leader_tasks.push(tokio::spawn(async move {
            if let Err(e) = founder.bootstrap_admin().await {
                tracing::error!("cannot create the first admin token: {e:#}");
            }
        }));
    }
    let grpc = grpc::router(server.clone());
    let app = web::front::app(
        grpc.router,
        &grpc.services,
        web::router(server.clone()),
        hosts,
    );
    let stop = server.coordinator.clone();
    if let Some(files) = &server.config.tls {
        leader_tasks.push(tokio::spawn(reload_peer_identity(
            server.clone(),
            files.clone(),
        )));
    }
    listener::serve(listener, app, tls, async move {
        shutdown.await;
        // End long-lived streams (agent sessions, log follows) so shutdown completes.
        stop.begin_shutdown();
    })
    .await;
    for t in leader_tasks {
        t.abort();
    }
    Ok(())
}
