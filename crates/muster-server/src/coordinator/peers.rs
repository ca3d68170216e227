//! The server-to-server side of a coordinator cluster: where the other servers are, how
//! Raft messages reach them (over gRPC, batched per peer), and a hook tests use to cut links.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use muster_client::{Channel, Credentials};
use muster_core::State;
use muster_proto::v1::{self, cluster_service_client::ClusterServiceClient};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

/// Decides whether a message from one server to another gets through. Production clusters
/// have none; the testkit uses it to `cut`, `isolate` and `heal` links over real gRPC.
pub trait NetworkFilter: Send + Sync + std::fmt::Debug {
    /// True if `from` may reach `to` now.
    fn allows(&self, from: u64, to: u64) -> bool;
}

/// Where the other servers are: server id → `host:port`, shared by the transport and the
/// services.
///
/// The addresses are replicated state ([`State::servers`], set by `set_server_address.v1`):
/// every server reads the same table, and a server restarted on its data directory alone
/// finds its peers there. Beside it, a fallback book holds what `--peers` gave and what
/// peers gossip in their Raft batches; it is consulted only for a server the state has no
/// address for, which is needed in two places: before the first leader has recorded the
/// initial members' addresses (it proposes them from its `--peers`), and on a new server
/// (a learner) that has not yet applied the entries that name its peers.
#[derive(Debug, Clone)]
pub struct Peers {
    state: Arc<RwLock<State>>,
    fallback: Arc<RwLock<BTreeMap<u64, String>>>,
    clients: Arc<Mutex<HashMap<String, ClusterServiceClient<Channel>>>>,
    credentials: Arc<RwLock<Credentials>>,
}

impl Peers {
    /// Peers read from `state`, with `bootstrap` (`--peers`) for servers it lacks, called
    /// with `credentials` (this server's identity).
    pub fn new(
        state: Arc<RwLock<State>>,
        bootstrap: BTreeMap<u64, String>,
        credentials: Credentials,
    ) -> Peers {
        Peers {
            state,
            fallback: Arc::new(RwLock::new(bootstrap)),
            clients: Arc::default(),
            credentials: Arc::new(RwLock::new(credentials)),
        }
    }

    /// Presents `credentials` from now on (a rotated certificate): connections made before
    /// are dropped from the cache, so every new call uses the new identity.
    pub fn set_credentials(&self, credentials: Credentials) {
        *self.credentials.write().expect("credentials lock") = credentials;
        self.clients.lock().expect("clients lock").clear();
    }

    /// A lazily connected channel to `address` (`host:port` or a URL) that presents this
    /// server's identity, with `configure` applied to its endpoint.
    pub fn channel(
        &self,
        address: &str,
        configure: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Option<Channel> {
        let credentials = self.credentials.read().expect("credentials lock").clone();
        let endpoint = credentials.endpoint(address).ok()?;
        Some(credentials.attach(configure(endpoint).connect_lazy()))
    }

    /// The address of server `id`: the replicated one, else the fallback book's.
    pub fn address(&self, id: u64) -> Option<String> {
        self.replicated(id).or_else(|| self.unreplicated(id))
    }

    /// The address of server `id` as the replicated state records it.
    pub fn replicated(&self, id: u64) -> Option<String> {
        self.state
            .read()
            .expect("state lock")
            .servers
            .get(&id)
            .cloned()
    }

    /// The address of server `id` from `--peers` or gossip (not from the state).
    pub fn unreplicated(&self, id: u64) -> Option<String> {
        self.fallback.read().expect("peers lock").get(&id).cloned()
    }

    /// Every known server: the replicated addresses over the fallback book.
    pub fn all(&self) -> BTreeMap<u64, String> {
        let mut all = self.fallback.read().expect("peers lock").clone();
        all.extend(self.state.read().expect("state lock").servers.clone());
        all
    }

    /// Learns (gossip) the addresses of servers the fallback book does not know yet.
    pub fn learn(&self, book: impl IntoIterator<Item = (u64, String)>) {
        let mut fallback = self.fallback.write().expect("peers lock");
        for (id, address) in book {
            fallback.entry(id).or_insert(address);
        }
    }

    /// Forgets a removed server's fallback address (its replicated one is removed by a command).
    pub fn forget(&self, id: u64) {
        self.fallback.write().expect("peers lock").remove(&id);
    }

    /// A cluster client of server `id` (connections are made lazily and reused).
    pub fn client(&self, id: u64) -> Option<ClusterServiceClient<Channel>> {
        let address = self.address(id)?;
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some(c) = clients.get(&address) {
            return Some(c.clone());
        }
        let channel = self.channel(&address, |e| {
            e.connect_timeout(Duration::from_secs(1))
                // A forwarded write normally takes milliseconds; a leader cut off by a
                // partition must not hold a client for long (it retries elsewhere).
                .timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2))
        })?;
        let client = ClusterServiceClient::new(channel)
            .max_decoding_message_size(512 << 20)
            .max_encoding_message_size(512 << 20);
        clients.insert(address, client.clone());
        Some(client)
    }
}

/// Sends Raft messages to peers: one queue and one sending task per peer, messages batched
/// into one `ClusterService.Raft` call. Never blocks the Raft thread; when a peer's queue is
/// full or the peer is unreachable, messages are dropped (Raft retransmits).
#[derive(Debug)]
pub struct GrpcTransport {
    me: u64,
    peers: Peers,
    filter: Option<Arc<dyn NetworkFilter>>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Vec<u8>>>>,
    runtime: tokio::runtime::Handle,
}

impl GrpcTransport {
    /// A transport for server `me` (call on the runtime that should carry the traffic).
    pub fn new(me: u64, peers: Peers, filter: Option<Arc<dyn NetworkFilter>>) -> GrpcTransport {
        GrpcTransport {
            me,
            peers,
            filter,
            queues: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl muster_raft::Transport for GrpcTransport {
    fn send(&self, to: u64, message: Vec<u8>) {
        if self.filter.as_ref().is_some_and(|f| !f.allows(self.me, to)) {
            return;
        }
        let mut queues = self.queues.lock().expect("queues lock");
        let queue = queues.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(4096);
            self.runtime
                .spawn(deliver(self.me, to, self.peers.clone(), rx));
            tx
        });
        if queue.try_send(message).is_err() {
            tracing::debug!(to, "raft queue full; dropping a message");
        }
    }
}

async fn deliver(me: u64, to: u64, peers: Peers, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(first) = rx.recv().await {
        let mut messages = vec![first];
        while messages.len() < 512 {
            match rx.try_recv() {
                Ok(m) => messages.push(m),
                Err(_) => break,
            }
        }
        let Some(mut client) = peers.client(to) else {
            tracing::debug!(to, "no address for raft peer; dropping messages");
            continue;
        };
        let book = peers.all().into_iter().collect();
        if let Err(e) = client
            .raft(v1::RaftBatch {
                from: me,
                messages,
                peers: book,
            })
            .await
        {
            tracing::debug!(to, cause = %e.message(), "raft peer unreachable; messages dropped");
        }
    }
}

/// Requests between servers carry this header (muster-client's, which its `Blobs::replica`
/// sets too), so a copy is not copied on again and a relayed read is not relayed twice.
pub use muster_client::REPLICA_HEADER;

/// A request to another server, marked as coming from a server.
pub fn replica_request<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert(REPLICA_HEADER, "1".parse().expect("ascii"));
    req
}

/// A request relayed to another server for the caller of `original`: marked as from a
/// server, and carrying the caller's own `authorization`, so the peer checks the caller's
/// rights, not the relaying server's.
pub fn relayed_request<T>(
    message: T,
    original: &tonic::metadata::MetadataMap,
) -> tonic::Request<T> {
    let mut req = replica_request(message);
    if let Some(auth) = original.get("authorization") {
        req.metadata_mut().insert("authorization", auth.clone());
    }
    req
}

/// Whether a request came from another server (a replica copy or a relayed read).
pub fn is_replica<T>(req: &tonic::Request<T>) -> bool {
    req.metadata().contains_key(REPLICA_HEADER)
}

/// Parses `1=host:port,2=host:port` (the `--peers` flag).
pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("--peers: {item:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("--peers: {id:?} is not a server id (a positive integer)"))?;
        if id == 0 {
            return Err("--peers: server ids start at 1".into());
        }
        if peers.insert(id, addr.trim().to_string()).is_some() {
            return Err(format!("--peers: server {id} is listed twice"));
        }
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_identity_empties_the_connection_cache() {
        let state = Arc::new(RwLock::new(State::default()));
        let peers = Peers::new(
            state,
            BTreeMap::from([(1, "127.0.0.1:1".to_string())]),
            Credentials::none(),
        );
        assert!(peers.client(1).is_some());
        assert_eq!(peers.clients.lock().unwrap().len(), 1);
        peers.set_credentials(Credentials::server(1, "another-key").unwrap());
        assert!(peers.clients.lock().unwrap().is_empty());
        assert!(
            peers.client(1).is_some(),
            "made again with the new identity"
        );
    }

    #[test]
    fn replicated_addresses_win_over_peers_flags_and_gossip() {
        let state = Arc::new(RwLock::new(State::default()));
        let peers = Peers::new(
            state.clone(),
            BTreeMap::from([
                (1, "flag-1:7070".to_string()),
                (2, "flag-2:7070".to_string()),
            ]),
            Credentials::none(),
        );
        assert_eq!(peers.address(1).as_deref(), Some("flag-1:7070"));
        assert_eq!(peers.replicated(1), None);
        state
            .write()
            .unwrap()
            .apply(&muster_core::Command::SetServerAddress {
                id: 1,
                address: "state-1:7070".into(),
            })
            .unwrap();
        assert_eq!(peers.address(1).as_deref(), Some("state-1:7070"));
        assert_eq!(peers.replicated(1).as_deref(), Some("state-1:7070"));
        // Gossip fills in only what nobody knows yet.
        peers.learn([
            (2, "gossip-2:7070".to_string()),
            (3, "gossip-3:7070".to_string()),
        ]);
        assert_eq!(peers.address(2).as_deref(), Some("flag-2:7070"));
        assert_eq!(peers.address(3).as_deref(), Some("gossip-3:7070"));
        assert_eq!(peers.all().len(), 3);
        assert_eq!(peers.all()[&1], "state-1:7070");
        peers.forget(3);
        assert_eq!(peers.address(3), None);
    }

    #[test]
    fn peers_parse_with_clear_errors() {
        let p = parse_peers("1=10.0.0.1:7070, 2=10.0.0.2:7070,3=h3:7070").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[&3], "h3:7070");
        assert!(
            parse_peers("1=a:1,1=b:2")
                .unwrap_err()
                .contains("listed twice")
        );
        assert!(
            parse_peers("x=a:1")
                .unwrap_err()
                .contains("not a server id")
        );
        assert!(parse_peers("1:a").unwrap_err().contains("ID=HOST:PORT"));
    }
}
