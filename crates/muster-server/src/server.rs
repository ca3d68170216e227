//! The composition root: one server's parts, each layer's handle in its own field. The
//! transport (`grpc/`, `web/`) and the leader loops hold an `Arc<Server>` and reach each
//! layer through its field — `server.coordinator` to propose and read, `server.store` for
//! bytes — so what a handler touches is spelled out where it touches it.

use std::fs::File;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use muster_core::State;

use crate::ServerConfig;
use crate::coordinator::liveness::{Heartbeats, WaitReasons};
use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::metrics::Metrics;
use crate::store::Store;

/// Everything one server holds.
#[derive(Debug)]
pub(crate) struct Server {
    /// The Raft member and the applied state.
    pub coordinator: Arc<Coordinator>,
    /// Blobs, logs, metric series and their replication.
    pub store: Store,
    /// How this server runs.
    pub config: ServerConfig,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// Nodes' last heartbeats (leader memory).
    pub heartbeats: Heartbeats,
    /// Why queued runs wait (leader memory).
    pub waiting: WaitReasons,
    /// Refused requests not yet in the audit log.
    pub denials: crate::grpc::auth::Denials,
    /// Every caller's open uploads and upload rate.
    pub uploads: Arc<crate::grpc::limits::Uploads>,
    /// Where the runs retention archived are (this server's index of the archive blobs).
    pub archived: crate::views::archive::Archived,
    /// The cluster's secret key (`store/secret_key.rs`); unset on a server that joined
    /// without one until [`Server::fetch_secret_key`] has it from a peer (meanwhile it
    /// refuses to set or deliver secrets, saying so).
    pub secret_key: std::sync::OnceLock<muster_core::secrets::SecretKey>,
    _lock: File,
}

/// What this server presents to its peers: over TLS its own certificate (it says which
/// server it is); without TLS the cluster key and its id.
pub(crate) fn peer_credentials(
    config: &ServerConfig,
) -> anyhow::Result<muster_client::Credentials> {
    let mut credentials = match &config.cluster_key {
        Some(key) => muster_client::Credentials::server(config.raft.id, key)
            .map_err(|_| anyhow::anyhow!("--cluster-key-file: the key must be printable ASCII"))?,
        None => muster_client::Credentials::none(),
    };
    if let Some(files) = &config.tls {
        let tls = muster_client::ClientTls::from_ca_file(&files.ca)
            .and_then(|t| t.with_identity_files(&files.cert, &files.key))
            .map_err(|e| anyhow::anyhow!("--tls-dir: {e}"))?;
        credentials = credentials.with_tls(tls);
    }
    Ok(credentials)
}

impl Server {
    /// Opens the data directory, starts Raft and opens the stores. Fails if the directory
    /// is held by another process or corrupt; never starts empty over existing state.
    pub async fn open(config: &ServerConfig) -> anyhow::Result<Arc<Server>> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
        let lock_path = dir.join("LOCK");
        let lock = File::create(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            anyhow::bail!(
                "the data directory {} is in use by another muster process: stop it, or pass another --data-dir",
                dir.display()
            );
        }
        let state = match &config.restore_from {
            Some(from) => restore(config, from)?,
            None => {
                refuse_orphaned_stores(dir)?;
                State::default()
            }
        };
        let state = Arc::new(RwLock::new(state));
        let mut book = config.peers.clone();
        if let Some(own) = &config.advertise {
            book.entry(config.raft.id).or_insert_with(|| own.clone());
        }
        let metrics = Metrics::default();
        let coordinator = Coordinator::start(
            CoordinatorConfig {
                raft: config.raft.clone(),
                book,
                network: config.network.clone(),
                credentials: peer_credentials(config)?,
            },
            &dir.join("raft"),
            state.clone(),
            metrics.proposals.clone(),
        )
        .await?;
        let peers = Arc::new(crate::grpc::replicas::GrpcBlobPeers::new(
            coordinator.clone(),
        ));
        let store = Store::open(dir, state, peers, config.max_blob_bytes)
            .with_context(|| format!("cannot open the stores in {}", dir.display()))?;
        let founds = config.raft.initial_voters.first() == Some(&config.raft.id);
        let secret_key = crate::store::secret_key::load(dir, founds).with_context(|| {
            format!(
                "cannot read the secret key {}",
                crate::store::secret_key::path(dir).display()
            )
        })?;
        if config.create_local_compute {
            coordinator.ensure_local_compute().await?;
        }
        Ok(Arc::new(Server {
            coordinator,
            store,
            config: config.clone(),
            metrics,
            heartbeats: Heartbeats::default(),
            waiting: WaitReasons::default(),
            denials: Default::default(),
            uploads: crate::grpc::limits::Uploads::new(crate::grpc::limits::UploadLimits {
                concurrent: config.max_uploads_per_caller,
                bytes_per_sec: config.upload_bytes_per_sec,
                burst_bytes: config.max_blob_bytes.max(config.upload_bytes_per_sec),
            }),
            archived: Default::default(),
            secret_key: secret_key
                .map(std::sync::OnceLock::from)
                .unwrap_or_default(),
            _lock: lock,
        }))
    }

    /// A server without the cluster's secret key (it joined a cluster another server
    /// founded) asks its peers for it over the authenticated server path
    /// (`ClusterService.SecretKey`, servers only), once a second until one answers, and
    /// keeps it in its data directory (0600) like the founder's. Returns at once when it
    /// has the key.
    pub(crate) async fn fetch_secret_key(&self) {
        let me = self.config.raft.id;
        let mut waited = 0u32;
        while self.secret_key.get().is_none() {
            let peers = self.coordinator.peers();
            for id in peers.all().into_keys().filter(|id| *id != me) {
                let Some(mut client) = peers.client(id) else {
                    continue;
                };
                let answer = match client
                    .secret_key(muster_proto::v1::SecretKeyRequest {})
                    .await
                {
                    Ok(a) => a.into_inner(),
                    Err(e) => {
                        tracing::debug!(peer = id, cause = %e.message(), "no secret key from this peer yet");
                        continue;
                    }
                };
                let Ok(bytes) = <[u8; muster_core::secrets::KEY_LEN]>::try_from(answer.key) else {
                    tracing::warn!(peer = id, "a peer sent a secret key of the wrong length");
                    continue;
                };
                let key = muster_core::secrets::SecretKey::from_bytes(bytes);
                if key.id() != answer.key_id {
                    tracing::warn!(
                        peer = id,
                        "a peer sent a secret key that does not match its id"
                    );
                    continue;
                }
                if let Err(e) = crate::store::secret_key::save(&self.config.data_dir, &key) {
                    tracing::error!(cause = %e, "cannot keep the cluster's secret key in the data directory");
                }
                tracing::info!(peer = id, key_id = %key.id(), "got the cluster's secret key");
                let _ = self.secret_key.set(key);
                return;
            }
            waited += 1;
            if waited == 30 {
                tracing::warn!(
                    "no peer has given this server the cluster's secret key yet: it cannot set or deliver secrets until one does"
                );
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    /// Stops Raft and releases the data directory.
    pub async fn stop(&self) {
        self.coordinator.stop().await;
    }
}

/// `--restore-from`: unpacks the backup's blobs into an empty data directory and returns
/// its state, which the new one-server cluster starts from (its first snapshot).
fn restore(config: &ServerConfig, from: &std::path::Path) -> anyhow::Result<State> {
    let dir = &config.data_dir;
    let raft = dir.join("raft");
    anyhow::ensure!(
        !std::fs::read_dir(&raft).is_ok_and(|mut e| e.next().is_some()),
        "--restore-from: the data directory {} already holds cluster state ({}): restore into an empty --data-dir, or start without --restore-from",
        dir.display(),
        raft.display()
    );
    anyhow::ensure!(
        config.raft.initial_voters == [config.raft.id],
        "--restore-from founds a one-server cluster: start it without --peers or --join, then add the other servers with `muster cluster add-server`"
    );
    let blobs = crate::store::blobs::BlobStore::open(dir.join("blobs"))
        .with_context(|| format!("cannot open the blob store in {}", dir.display()))?;
    let (state, info) = crate::store::backup::unpack(from, &blobs)?;
    tracing::info!(
        from = %from.display(),
        applied_index = info.applied_index,
        blobs = info.blobs,
        runs = state.runs.len(),
        "founding a cluster from a backup"
    );
    Ok(state)
}

/// Refuses a data directory whose stores hold data but whose Raft log is gone (`raft/`
/// deleted or never copied back): started as it is, the server would found an empty
/// cluster beside blobs and logs that an old state referred to, or, as a member, vote
/// without the entries it had acknowledged. The error says how to recover.
fn refuse_orphaned_stores(dir: &std::path::Path) -> anyhow::Result<()> {
    let has_entries = |p: std::path::PathBuf| {
        std::fs::read_dir(p).is_ok_and(|mut entries| entries.next().is_some())
    };
    if has_entries(dir.join("raft")) {
        return Ok(());
    }
    let orphaned: Vec<&str> = ["blobs", "logs", "metrics"]
        .into_iter()
        .filter(|d| has_entries(dir.join(d)))
        .collect();
    anyhow::ensure!(
        orphaned.is_empty(),
        "the data directory {} has {} but no Raft log ({} is missing or empty): its replicated state is gone, and starting here would begin an empty cluster beside it. To bring this server back into its cluster, move the directory aside, start it with an empty --data-dir and --join, and add it with `muster cluster add-server`; if the whole cluster is lost, found a new one from a backup: `muster server --data-dir EMPTY_DIR --restore-from BACKUP` (made with `muster cluster backup`)",
        dir.display(),
        orphaned.join(", "),
        dir.join("raft").display()
    );
    Ok(())
}
