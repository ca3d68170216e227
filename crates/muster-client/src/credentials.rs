//! What a client presents on every call, and the channel that presents it.
//!
//! - A user's API token or an agent's credential (`mst_<id>_<secret>`) goes in
//!   `authorization: Bearer …`.
//! - A server calling a peer without TLS presents the cluster key in [`CLUSTER_KEY_HEADER`]
//!   and its id in [`SERVER_ID_HEADER`] (with TLS, its certificate says who it is).
//!
//! - Over TLS ([`ClientTls`]): the cluster's CA certificate the server's certificate must
//!   chain to, and, for a server or an agent, its own certificate and key (mutual TLS:
//!   the certificate says who it is).
//!
//! [`Channel`] is tonic's channel with these attached by an interceptor, so every generated
//! client built on it carries them and no call site can forget; [`Credentials::endpoint`]
//! makes every endpoint, so TLS is never forgotten either. `Debug` never prints a secret.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;

/// The metadata key of the cluster key servers present to each other.
pub const CLUSTER_KEY_HEADER: &str = "muster-cluster-key";

/// The metadata key of a calling server's id.
pub const SERVER_ID_HEADER: &str = "muster-server-id";

/// A channel to one server that attaches [`Credentials`] to every request.
pub type Channel = InterceptedService<tonic::transport::Channel, Credentials>;

/// What a client says about itself on every call.
#[derive(Clone, Default)]
pub struct Credentials {
    bearer: Option<Arc<MetadataValue<Ascii>>>,
    server: Option<(Arc<MetadataValue<Ascii>>, MetadataValue<Ascii>)>,
    tls: Option<Arc<ClientTls>>,
}

/// TLS for a client: the CA a server's certificate must chain to, and optionally this
/// client's own certificate (a server's or an agent's, for mutual TLS).
#[derive(Clone)]
pub struct ClientTls {
    ca: Certificate,
    identity: Option<Identity>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// A TLS file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {source}", path.display())]
pub struct TlsFileError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError {
        path: path.to_path_buf(),
        source,
    })
}

impl ClientTls {
    /// Trusts the CA certificate in `ca_pem` (PEM).
    pub fn new(ca_pem: impl AsRef<[u8]>) -> ClientTls {
        ClientTls {
            ca: Certificate::from_pem(ca_pem),
            identity: None,
        }
    }

    /// Trusts the CA certificate in the PEM file `ca`.
    pub fn from_ca_file(ca: &Path) -> Result<ClientTls, TlsFileError> {
        Ok(ClientTls::new(read(ca)?))
    }

    /// Presents the certificate and key in these PEM files (mutual TLS).
    pub fn with_identity_files(
        mut self,
        cert: &Path,
        key: &Path,
    ) -> Result<ClientTls, TlsFileError> {
        self.identity = Some(Identity::from_pem(read(cert)?, read(key)?));
        Ok(self)
    }

    /// Whether this presents a certificate of its own.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    fn config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(self.ca.clone());
        match &self.identity {
            Some(identity) => config.identity(identity.clone()),
            None => config,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .field("server", &self.server.as_ref().map(|(_, id)| id.clone()))
            .field("tls", &self.tls)
            .finish()
    }
}

/// A token that cannot be sent in a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the token has characters a header cannot carry: API tokens look like mst_<id>_<secret>; copy it again"
)]
pub struct BadToken;

impl Credentials {
    /// No credentials: only health checks and `Join` answer such a caller.
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// A bearer token (a user's API token, or an agent's credential).
    pub fn bearer(token: &str) -> Result<Credentials, BadToken> {
        let value =
            MetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| BadToken)?;
        Ok(Credentials {
            bearer: Some(Arc::new(value)),
            server: None,
            tls: None,
        })
    }

    /// A server's identity for its peers: its id and the cluster key.
    pub fn server(id: u64, cluster_key: &str) -> Result<Credentials, BadToken> {
        let key = MetadataValue::try_from(cluster_key.trim()).map_err(|_| BadToken)?;
        let id = MetadataValue::try_from(id.to_string()).map_err(|_| BadToken)?;
        Ok(Credentials {
            bearer: None,
            server: Some((Arc::new(key), id)),
            tls: None,
        })
    }

    /// Whether any credential is set.
    pub fn is_empty(&self) -> bool {
        self.bearer.is_none() && self.server.is_none()
    }

    /// Speaks TLS with `tls` (every endpoint these credentials make is `https://`).
    pub fn with_tls(mut self, tls: ClientTls) -> Credentials {
        self.tls = Some(Arc::new(tls));
        self
    }

    /// Whether calls go over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The endpoint of `url` (`host:port` or a URL): `https://` with this TLS when set,
    /// else `http://`. Small requests go out at once (`TCP_NODELAY`: no Nagle delay
    /// meeting the peer's delayed ACK).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, tonic::transport::Error> {
        let url = crate::normalize_url(url);
        let endpoint = match &self.tls {
            Some(tls) => {
                let url = match url.strip_prefix("http://") {
                    Some(rest) => format!("https://{rest}"),
                    None => url,
                };
                Endpoint::from_shared(url)?.tls_config(tls.config())?
            }
            None => Endpoint::from_shared(url)?,
        };
        Ok(endpoint.tcp_nodelay(true))
    }

    /// `channel` with these credentials on every request.
    pub fn attach(&self, channel: tonic::transport::Channel) -> Channel {
        InterceptedService::new(channel, self.clone())
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        if let Some(bearer) = &self.bearer {
            md.insert("authorization", (**bearer).clone());
        }
        if let Some((key, id)) = &self.server {
            md.insert(CLUSTER_KEY_HEADER, (**key).clone());
            md.insert(SERVER_ID_HEADER, id.clone());
        }
        Ok(req)
    }
}

/// Writes `text` to `path` atomically (a temporary file, synced, then renamed) with
/// permissions `mode` from its creation: a token, a key or a credentials file is never
/// readable by others, not even for a moment, nor left half-written.
pub fn write_secret_file(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_secret() {
        let c = Credentials::bearer("mst_abc_supersecret").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("supersecret"), "{shown}");
        let s = Credentials::server(2, "clusterkeysecret").unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("clusterkeysecret") && shown.contains('2'),
            "{shown}"
        );
    }

    #[test]
    fn the_interceptor_sets_the_headers() {
        let mut c = Credentials::bearer("mst_abc_def").unwrap();
        let req = c.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer mst_abc_def"
        );
        let mut s = Credentials::server(3, "k").unwrap();
        let req = s.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get(CLUSTER_KEY_HEADER).unwrap(), "k");
        assert_eq!(req.metadata().get(SERVER_ID_HEADER).unwrap(), "3");
        assert!(Credentials::bearer("bad\ntoken").is_err());
    }
}
