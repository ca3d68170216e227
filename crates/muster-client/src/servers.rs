//! Which server to talk to: the `--server a,b,c` list, tried in turn, with the leader first
//! once a follower has named it (the [`LEADER_HEADER`](crate::LEADER_HEADER) of an
//! UNAVAILABLE answer), and a call that fails over to the next server while the error is
//! retryable.

use std::future::Future;
use std::time::Duration;

use backon::BackoffBuilder;
use tonic::transport::Endpoint;

use crate::{Channel, ClientError, Credentials, RetryPolicy};

/// `host:port` as a URL (`http://host:port`); a URL is kept as it is.
pub fn normalize_url(address: &str) -> String {
    let address = address.trim();
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

/// The servers a client may talk to, in the order it tries them.
#[derive(Debug, Clone)]
pub struct Servers {
    urls: Vec<String>,
    leader: Option<String>,
    connect_timeout: Duration,
    keep_alive: Option<(Duration, Duration)>,
    request_timeout: Option<Duration>,
    credentials: Credentials,
    /// The channel the last successful [`Servers::call`] used: the next call goes over the
    /// same connection (one TCP and HTTP/2 handshake per CLI command, not one per call).
    reuse: Option<Channel>,
}

impl Servers {
    /// A comma-separated list (`--server a:7070,b:7070`, or URLs): entries are trimmed,
    /// empty ones dropped, `host:port` taken as `http://host:port`.
    pub fn parse(list: &str) -> Servers {
        Servers::new(list.split(',').filter(|s| !s.trim().is_empty()))
    }

    /// These servers (each a URL or `host:port`), in this order; 3 s to connect to each.
    pub fn new<S: AsRef<str>>(urls: impl IntoIterator<Item = S>) -> Servers {
        Servers {
            urls: urls
                .into_iter()
                .map(|u| normalize_url(u.as_ref()))
                .collect(),
            leader: None,
            connect_timeout: Duration::from_secs(3),
            keep_alive: None,
            request_timeout: None,
            credentials: Credentials::none(),
            reuse: None,
        }
    }

    /// What every call through these servers presents (a token, or a server's key).
    pub fn with_credentials(mut self, credentials: Credentials) -> Servers {
        self.credentials = credentials;
        self
    }

    /// The credentials calls present.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// How long a connection attempt to one server may take before the next is tried.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Servers {
        self.connect_timeout = timeout;
        self
    }

    /// HTTP/2 keep-alive pings every `interval`, the connection dropped after `timeout`
    /// without an answer: a long-lived stream notices a server cut off by the network
    /// (no reset) within `interval + timeout`.
    pub fn with_keep_alive(mut self, interval: Duration, timeout: Duration) -> Servers {
        self.keep_alive = Some((interval, timeout));
        self
    }

    /// Every request over these servers' channels fails after `timeout` without an answer
    /// (a membership change that waits for a new server to catch up, say, gets 90 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Servers {
        self.request_timeout = Some(timeout);
        self
    }

    /// The configured URLs.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The leader's URL, once a follower named it.
    pub fn leader(&self) -> Option<&str> {
        self.leader.as_deref()
    }

    /// Tries `address` (`host:port` or a URL) first from now on.
    pub fn set_leader(&mut self, address: &str) {
        self.reuse = None;
        self.leader = Some(normalize_url(address));
    }

    /// Remembers the leader `error` names, if it names one; true if that changed the leader.
    pub fn follow(&mut self, error: &ClientError) -> bool {
        let Some(hint) = error.leader_hint() else {
            return false;
        };
        let url = normalize_url(hint);
        if self.leader.as_deref() == Some(url.as_str()) {
            return false;
        }
        self.leader = Some(url);
        true
    }

    /// The order servers are tried in: the leader (if named), then the list, once each.
    pub fn candidates(&self) -> Vec<String> {
        let mut out: Vec<String> = self.leader.iter().cloned().collect();
        for url in &self.urls {
            if !out.contains(url) {
                out.push(url.clone());
            }
        }
        out
    }

    /// The endpoint for one URL, with this list's timeouts.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, tonic::transport::Error> {
        let mut endpoint = self
            .credentials
            .endpoint(url)?
            .connect_timeout(self.connect_timeout);
        if let Some((interval, timeout)) = self.keep_alive {
            endpoint = endpoint
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(timeout);
        }
        if let Some(timeout) = self.request_timeout {
            endpoint = endpoint.timeout(timeout);
        }
        Ok(endpoint)
    }

    /// Connects to the first candidate that answers; returns its URL and the channel.
    /// [`ClientError::Unreachable`] names every server tried and why it failed.
    pub async fn connect(&self) -> Result<(String, Channel), ClientError> {
        let candidates = self.candidates();
        if candidates.is_empty() {
            return Err(ClientError::NoServers);
        }
        let mut failures = Vec::new();
        for url in candidates {
            match self.connect_one(&url).await {
                Ok(channel) => return Ok((url, channel)),
                Err(why) => failures.push(why),
            }
        }
        Err(ClientError::Unreachable {
            tried: failures.join(", "),
        })
    }

    /// A channel to every candidate that answers (to look for a blob on all of them, say).
    pub async fn connect_each(&self) -> Vec<(String, Channel)> {
        let mut out = Vec::new();
        for url in self.candidates() {
            if let Ok(channel) = self.connect_one(&url).await {
                out.push((url, channel));
            }
        }
        out
    }

    async fn connect_one(&self, url: &str) -> Result<Channel, String> {
        let endpoint = self
            .endpoint(url)
            .map_err(|e| format!("{url}: not a valid address ({e})"))?;
        let channel = endpoint.connect().await.map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string());
            format!("{url} ({cause})")
        })?;
        Ok(self.credentials.attach(channel))
    }

    /// Runs `op` on a channel to the first server that answers, and again while it fails
    /// with a retryable error, paced by `policy`: a server that does not answer is skipped
    /// for the next one, and a leader a follower names is tried first (at once, without the
    /// backoff's wait). A fatal error is returned after one try. After a success the next
    /// call starts on the same channel; any failure drops it and connects afresh.
    pub async fn call<T, F, Fut>(
        &mut self,
        policy: &RetryPolicy,
        mut op: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut delays = policy.backoff().build();
        loop {
            let connected = match self.reuse.take() {
                Some(channel) => Ok(channel),
                None => self.connect().await.map(|(_, channel)| channel),
            };
            let result = match connected {
                Ok(channel) => op(channel.clone()).await.inspect(|_| {
                    self.reuse = Some(channel);
                }),
                Err(e) => Err(e),
            };
            let error = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let new_leader = self.follow(&error);
            if !error.is_retryable() {
                return Err(error);
            }
            let Some(delay) = delays.next() else {
                return Err(error);
            };
            if !new_leader {
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use muster_proto::v1::blob_service_server::{BlobService, BlobServiceServer};
    use muster_proto::v1::{self, BlobChunk};
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::LEADER_HEADER;

    /// A port nothing listens on: bound, then closed.
    async fn refusing_url() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{addr}")
    }

    /// A blob service whose `missing_blobs` answers as `answer` says.
    struct Answering {
        answer: fn() -> Result<Vec<String>, Status>,
        calls: std::sync::Arc<AtomicU32>,
    }

    #[tonic::async_trait]
    impl BlobService for Answering {
        async fn missing_blobs(
            &self,
            _: Request<v1::MissingBlobsRequest>,
        ) -> Result<Response<v1::MissingBlobsResponse>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            (self.answer)().map(|sha256| Response::new(v1::MissingBlobsResponse { sha256 }))
        }

        async fn put_blob(
            &self,
            _: Request<Streaming<BlobChunk>>,
        ) -> Result<Response<v1::PutBlobResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        type GetBlobStream = futures::stream::Empty<Result<BlobChunk, Status>>;

        async fn get_blob(
            &self,
            _: Request<v1::GetBlobRequest>,
        ) -> Result<Response<Self::GetBlobStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// Serves `service` on a port of 127.0.0.1 for the rest of the test; returns its URL.
    async fn serve(service: Answering) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(BlobServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn missing_one() -> Result<Vec<String>, Status> {
        Ok(vec!["ab".into()])
    }

    async fn ask(channel: Channel) -> Result<Vec<String>, ClientError> {
        v1::blob_service_client::BlobServiceClient::new(channel)
            .missing_blobs(v1::MissingBlobsRequest {
                sha256: vec!["ab".into()],
            })
            .await
            .map(|r| r.into_inner().sha256)
            .map_err(ClientError::from)
    }

    const FAST: RetryPolicy = RetryPolicy {
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
        max_retries: 3,
    };

    #[test]
    fn a_server_list_is_parsed_into_urls() {
        let s = Servers::parse(" a:7070, ,http://b:7070,https://c ");
        assert_eq!(s.urls(), ["http://a:7070", "http://b:7070", "https://c"]);
        let mut s = s;
        s.set_leader("b:7070");
        assert_eq!(
            s.candidates(),
            ["http://b:7070", "http://a:7070", "https://c"]
        );
    }

    #[tokio::test]
    async fn the_first_server_that_answers_is_used() {
        let calls = std::sync::Arc::new(AtomicU32::new(0));
        let refusing = refusing_url().await;
        let answering = serve(Answering {
            answer: missing_one,
            calls: calls.clone(),
        })
        .await;
        let servers = Servers::parse(&format!("{refusing},{answering}"));
        let (url, channel) = servers.connect().await.unwrap();
        assert_eq!(url, answering);
        assert_eq!(ask(channel).await.unwrap(), ["ab"]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn no_server_answering_names_each_and_says_what_to_do() {
        let (a, b) = (refusing_url().await, refusing_url().await);
        let err = Servers::parse(&format!("{a},{b},not a url"))
            .connect()
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(err.is_retryable());
        assert!(
            text.starts_with(&format!("cannot reach a muster server at {a} (")),
            "{text}"
        );
        assert!(text.contains(&format!(", {b} (")), "{text}");
        assert!(
            text.contains("http://not a url: not a valid address"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "start one with `muster dev`, or point --server (or MUSTER_SERVER) at a running server"
            ),
            "{text}"
        );
        assert!(matches!(
            Servers::parse(" , ").connect().await,
            Err(ClientError::NoServers)
        ));
    }

    #[tokio::test]
    async fn a_call_follows_the_leader_a_follower_names() {
        fn not_leader() -> Result<Vec<String>, Status> {
            Err(Status::unavailable("this server is not the leader"))
        }
        let leader_calls = std::sync::Arc::new(AtomicU32::new(0));
        let leader = serve(Answering {
            answer: missing_one,
            calls: leader_calls.clone(),
        })
        .await;
        let follower_calls = std::sync::Arc::new(AtomicU32::new(0));
        let follower = serve(Answering {
            answer: not_leader,
            calls: follower_calls.clone(),
        })
        .await;
        let hint = leader.trim_start_matches("http://").to_string();
        let mut servers = Servers::parse(&follower);
        let got = servers
            .call(&FAST, |channel| {
                let hint = hint.clone();
                async move {
                    ask(channel).await.map_err(|e| match e {
                        ClientError::Status { mut status } => {
                            status
                                .metadata_mut()
                                .insert(LEADER_HEADER, hint.parse().unwrap());
                            ClientError::Status { status }
                        }
                        other => other,
                    })
                }
            })
            .await
            .unwrap();
        assert_eq!(got, ["ab"]);
        assert_eq!(servers.leader(), Some(leader.as_str()));
        assert_eq!(
            (
                follower_calls.load(Ordering::SeqCst),
                leader_calls.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
    }

    #[tokio::test]
    async fn a_call_stops_at_a_refusal_and_gives_up_on_an_outage() {
        fn refuse() -> Result<Vec<String>, Status> {
            Err(Status::invalid_argument("sha256: not a digest"))
        }
        fn unavailable() -> Result<Vec<String>, Status> {
            Err(Status::unavailable("the cluster has no leader right now"))
        }
        let calls = std::sync::Arc::new(AtomicU32::new(0));
        let mut servers = Servers::parse(
            &serve(Answering {
                answer: refuse,
                calls: calls.clone(),
            })
            .await,
        );
        let err = servers.call(&FAST, ask).await.unwrap_err();
        assert_eq!(err.to_string(), "sha256: not a digest");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a refusal is sent once");

        let calls = std::sync::Arc::new(AtomicU32::new(0));
        let mut servers = Servers::parse(
            &serve(Answering {
                answer: unavailable,
                calls: calls.clone(),
            })
            .await,
        );
        let err = servers.call(&FAST, ask).await.unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::Unavailable));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1 + FAST.max_retries as u32,
            "an outage is retried a bounded number of times"
        );

        // No server at all: each try fails to connect, and the last error says so.
        let mut servers = Servers::parse(&refusing_url().await);
        let err = servers.call(&FAST, ask).await.unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    }
}
