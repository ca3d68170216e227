//! # tls: the server's side of mutual TLS
//!
//! With `--tls-dir DIR` (made by `muster tls init`) the port speaks TLS 1.3 only: the
//! server presents `DIR/cert.pem` (its key `DIR/key.pem`) and asks every client for a
//! certificate signed by the cluster CA (`DIR/ca.pem`). A client without one (a user's CLI,
//! which presents a token instead) is let through to the authorization table as anyone
//! else; a certificate that does not chain to the CA, has expired, or is not yet valid
//! ends the handshake. A valid one names its holder in a URI SAN: `muster://server/ID` for
//! a server, `muster://agent/COMPUTE/NODE` for an agent ([`PeerIdentity`]), which
//! `grpc/auth.rs` takes as the caller.
//!
//! Rotation without downtime: the certificate and key are read again when either file
//! changes (checked at most once a second, at a handshake), so `muster tls rotate`
//! replacing them takes effect for every new connection while open ones go on. A file
//! that cannot be read or parsed keeps the previous certificate and is logged.
//!
//! Crate choices: rustls (ring provider) through tokio-rustls, as tonic uses it;
//! x509-parser reads the SAN of a verified peer certificate.
//!
//! May import: nothing of this crate (a leaf, like `listener`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::RootCertStore;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// How long a TLS handshake may take before the connection is dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often, at most, the certificate files are checked for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// Who a verified client certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerIdentity {
    /// A server of the cluster.
    Server(u64),
    /// An agent: its compute target and node name.
    Agent {
        /// The compute target.
        compute: String,
        /// The node.
        node: String,
    },
}

impl PeerIdentity {
    /// The identity a `muster://` URI names.
    pub fn from_uri(uri: &str) -> Option<PeerIdentity> {
        let rest = uri.strip_prefix("muster://")?;
        let mut parts = rest.split('/');
        match (parts.next()?, parts.next(), parts.next(), parts.next()) {
            ("server", Some(id), None, None) => id
                .parse()
                .ok()
                .filter(|id| *id > 0)
                .map(PeerIdentity::Server),
            ("agent", Some(compute), Some(node), None)
                if !compute.is_empty() && !node.is_empty() =>
            {
                Some(PeerIdentity::Agent {
                    compute: compute.to_string(),
                    node: node.to_string(),
                })
            }
            _ => None,
        }
    }

    /// The identity in a (verified) certificate's URI SANs.
    pub fn of_certificate(der: &[u8]) -> Option<PeerIdentity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => PeerIdentity::from_uri(uri),
            _ => None,
        })
    }
}

/// Where the server's TLS files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA's certificate (PEM).
    pub ca: PathBuf,
    /// This server's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA's key, when this server signs the certificate requests of joining agents
    /// (`muster tls init --servers-sign-agents`).
    pub ca_key: Option<PathBuf>,
}

impl TlsFiles {
    /// The files `muster tls init` writes for one server: `DIR/{ca,cert,key}.pem`, and
    /// `DIR/ca.key` when it is there.
    pub fn in_dir(dir: &Path) -> TlsFiles {
        let ca_key = dir.join("ca.key");
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca_key: ca_key.exists().then_some(ca_key),
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_key(files: &TlsFiles) -> anyhow::Result<Arc<CertifiedKey>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| anyhow::anyhow!("{}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", files.cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no certificate: make one with `muster tls init`",
        files.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| anyhow::anyhow!("{}: {e}", files.key.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| anyhow::anyhow!("{}: {e}", files.key.display()))?;
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}

/// The server's certificate, read again when its files change.
#[derive(Debug)]
struct Reloading {
    files: TlsFiles,
    current: RwLock<(Option<SystemTime>, Option<SystemTime>, Arc<CertifiedKey>)>,
    checked: Mutex<Instant>,
}

impl Reloading {
    fn maybe_reload(&self) {
        {
            let mut checked = self.checked.lock().expect("tls lock");
            if checked.elapsed() < RELOAD_CHECK {
                return;
            }
            *checked = Instant::now();
        }
        let stamps = (modified(&self.files.cert), modified(&self.files.key));
        {
            let current = self.current.read().expect("tls lock");
            if (current.0, current.1) == stamps {
                return;
            }
        }
        match load_key(&self.files) {
            Ok(key) => {
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                *self.current.write().expect("tls lock") = (stamps.0, stamps.1, key);
            }
            Err(e) => tracing::warn!("keeping the current TLS certificate: {e:#}"),
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.maybe_reload();
        Some(self.current.read().expect("tls lock").2.clone())
    }
}

/// The acceptor of a TLS port: TLS 1.3, the cluster CA for client certificates (optional),
/// ALPN h2 and http/1.1 (the studio in a browser).
pub(crate) fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&files.ca)
        .map_err(|e| anyhow::anyhow!("--tls-dir: {}: {e}", files.ca.display()))?
    {
        let ca = ca.map_err(|e| anyhow::anyhow!("--tls-dir: {}: {e}", files.ca.display()))?;
        roots
            .add(ca)
            .map_err(|e| anyhow::anyhow!("--tls-dir: {}: {e}", files.ca.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "--tls-dir: {} holds no CA certificate: make the TLS files with `muster tls init`",
        files.ca.display()
    );
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let key = load_key(files).map_err(|e| anyhow::anyhow!("--tls-dir: {e:#}"))?;
    let resolver = Reloading {
        current: RwLock::new((modified(&files.cert), modified(&files.key), key)),
        files: files.clone(),
        checked: Mutex::new(Instant::now()),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_read_from_muster_uris_only() {
        assert_eq!(
            PeerIdentity::from_uri("muster://server/3"),
            Some(PeerIdentity::Server(3))
        );
        assert_eq!(
            PeerIdentity::from_uri("muster://agent/gpu-pool/node-1"),
            Some(PeerIdentity::Agent {
                compute: "gpu-pool".into(),
                node: "node-1".into()
            })
        );
        for bad in [
            "muster://server/0",
            "muster://server/x",
            "muster://server/1/2",
            "muster://agent/pool",
            "muster://agent//n",
            "https://server/1",
            "muster://admin/1",
        ] {
            assert_eq!(PeerIdentity::from_uri(bad), None, "{bad}");
        }
    }
}
