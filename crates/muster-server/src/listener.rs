//! # listener: connections in, requests out
//!
//! The accept loop under both `grpc/` and `web/`: it takes TCP connections off the
//! listener, serves each with hyper (HTTP/1.1 or HTTP/2, whichever the client speaks;
//! `hyper_util`'s auto builder) under the limits below, and hands every request to one
//! service (the HTTP front, `web::front`), with a [`ConnectionInfo`] in its extensions.
//!
//! Shutdown is graceful, as `axum::serve`'s was: once the `shutdown` future resolves no
//! connection is accepted, every open one is told to finish (HTTP/2 GOAWAY, HTTP/1.1 close
//! after the request in flight) and the loop returns when the last one has closed.
//!
//! The steps stay apart so a TLS handshake slots in between them: [`serve`] accepts,
//! `serve_connection` serves one connection's byte stream with the service.
//!
//! With TLS (`tls.rs`), each connection's handshake runs in its own task before it is
//! served, and the peer's certificate identity goes into its [`ConnectionInfo`].
//!
//! May import: `tls` (a leaf); `grpc/` and `web/` read [`ConnectionInfo`] from it.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Most HTTP/2 streams (requests) one connection may have open at once. A client over
/// the limit waits for a stream to end; the CLI, agents and peers use a handful each
/// (an agent's session, a log follow, the calls in flight).
pub(crate) const H2_MAX_CONCURRENT_STREAMS: u32 = 256;

/// The largest header block an HTTP/2 request may send (decoded). gRPC metadata is a few
/// hundred bytes; hyper's default (16 MiB) would let one request hold that much memory.
pub(crate) const H2_MAX_HEADER_LIST_SIZE: u32 = 16 << 10;

/// How often an idle HTTP/2 connection is pinged, so a peer that vanished (a machine
/// switched off, a cut network) is noticed and its streams (an agent session) end.
pub(crate) const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a keep-alive ping may go unanswered before the connection is closed.
pub(crate) const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long an HTTP/1.1 client may take to send a request's headers: a client that
/// trickles them (slowloris) is cut off instead of holding a connection open forever.
pub(crate) const H1_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most an HTTP/1.1 connection buffers while reading a request head (hyper's
/// default is ~400 KiB). The web UI's requests are a request line and a few headers.
pub(crate) const H1_MAX_BUF_SIZE: usize = 64 << 10;

/// How long to wait before accepting again after an error that is not one connection's
/// (out of file descriptors): the server keeps running and retries rather than spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// What the server knows about the connection a request arrived on, inserted into every
/// request's extensions (`req.extensions().get::<ConnectionInfo>()`; tonic hands the
/// extensions on, `request.extensions()`). Per-connection facts an authorization layer
/// needs (a TLS peer certificate) belong here.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionInfo {
    /// The peer's address.
    pub(crate) remote_addr: SocketAddr,
    /// Who the client's certificate says it is (TLS with a verified client certificate
    /// naming a server or an agent), if anyone.
    pub(crate) peer: Option<crate::tls::PeerIdentity>,
}

/// Serves `app` on `listener` until `shutdown` resolves, then closes gracefully (see the
/// module doc) and returns once every connection has ended.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let builder = builder();
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, remote_addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers go out as several writes (headers, data, trailers): with Nagle's
        // algorithm the later ones wait for the client's delayed ACK of the first, 40 ms
        // on Linux, on every answer above a few KB (a page of runs).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%remote_addr, "cannot set TCP_NODELAY: {e}");
        }
        let Some(acceptor) = tls.clone() else {
            let info = ConnectionInfo {
                remote_addr,
                peer: None,
            };
            let conn = graceful.watch(serve_connection(&builder, stream, info, app.clone()));
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%remote_addr, "connection ended with an error: {e}");
                }
            });
            continue;
        };
        // The handshake runs in the connection's task, so a slow client holds up nobody.
        let (builder, app, watcher) = (builder.clone(), app.clone(), graceful.watcher());
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote_addr, "TLS handshake refused: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote_addr, "TLS handshake timed out");
                        return;
                    }
                };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| crate::tls::PeerIdentity::of_certificate(cert));
            let info = ConnectionInfo { remote_addr, peer };
            let conn = watcher.watch(serve_connection(&builder, stream, info, app));
            if let Err(e) = conn.await {
                tracing::debug!(%remote_addr, "connection ended with an error: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The connection settings: both protocols, with this module's limits.
fn builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(H1_HEADER_READ_TIMEOUT)
        .max_buf_size(H1_MAX_BUF_SIZE);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_SIZE)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    builder
}

/// Serves one connection's byte stream: every request goes to `app` with `info` in its
/// extensions. A TLS listener passes the decrypted stream here.
fn serve_connection<I>(
    builder: &Builder<TokioExecutor>,
    io: I,
    info: ConnectionInfo,
    app: Router,
) -> impl GracefulConnection<Error = Box<dyn std::error::Error + Send + Sync>> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned()
}

/// An accept error: one connection's (it reset before we took it) is skipped; any other
/// (out of file descriptors) is logged and waited out.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(
        "cannot accept a connection: {e}; retrying in {:?}",
        ACCEPT_ERROR_PAUSE
    );
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}
