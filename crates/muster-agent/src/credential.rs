//! The node's credential: what every call of this agent presents.
//!
//! An agent joins once: it trades its single-use join token (`--join`, made by
//! `muster token create --join --compute C`) for a credential bound to its node name and
//! compute target (`AgentService.Join`), writes it to `<data_dir>/credential` (0600) before
//! using it, and from then on presents it as `authorization: Bearer mst_…`. A restarted
//! agent reads the file and needs no join token. A refused join (used, expired, unknown
//! token) stops the agent with the server's message, which says what to do.
//!
//! Over TLS (`--ca-file`) the same credential goes inside the TLS connection; with a
//! certificate of the cluster CA (`--tls-dir`, `muster tls agent`) the certificate names
//! the node and no token is needed.

use std::time::Duration;

use muster_client::{ClientTls, Credentials};
use muster_proto::v1::{self, agent_service_client::AgentServiceClient};
use tonic::Code;

use crate::{AgentConfig, AgentError};

/// The file, in the agent's data directory.
pub(crate) const CREDENTIAL_FILE: &str = "credential";

/// How long joining may keep trying servers that do not answer.
const JOIN_PATIENCE: Duration = Duration::from_secs(300);

/// Where an agent that joined with `--ca-fingerprint` keeps the CA it pinned and the
/// certificate the servers signed for it.
pub(crate) const TLS_DIR: &str = "tls";

fn refused(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::Refused(format!("cannot {what} {}: {e}", path.display()))
}

/// The TLS this agent speaks: `--tls-dir`/`--ca-file`, else what an earlier join with a
/// fingerprint kept, else (with `--ca-fingerprint`) the CA the servers present, once its
/// fingerprint matches, kept for next time.
async fn tls_of(config: &AgentConfig) -> Result<Option<ClientTls>, AgentError> {
    if config.tls.is_some() {
        return Ok(config.tls.clone());
    }
    let dir = config.data_dir.join(TLS_DIR);
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    if ca.exists() {
        let tls = ClientTls::from_ca_file(&ca).map_err(|e| AgentError::Refused(e.to_string()))?;
        if cert.exists() && key.exists() {
            return Ok(Some(
                tls.with_identity_files(&cert, &key)
                    .map_err(|e| AgentError::Refused(e.to_string()))?,
            ));
        }
        return Ok(Some(tls));
    }
    let Some(pin) = config.ca_fingerprint.as_deref() else {
        return Ok(None);
    };
    let ca_pem = discover_ca(&config.servers, pin).await?;
    std::fs::create_dir_all(&dir).map_err(|e| refused("create", &dir, e))?;
    muster_client::write_secret_file(&ca, &ca_pem, 0o644).map_err(|e| refused("write", &ca, e))?;
    tracing::info!(
        "the servers' CA matches --ca-fingerprint; kept in {}",
        ca.display()
    );
    Ok(Some(ClientTls::new(ca_pem)))
}

/// The node's credential: its certificate, or the token read from the data directory, or
/// one obtained with the join token (with a certificate request when it pinned the CA).
pub(crate) async fn obtain(config: &AgentConfig) -> Result<Credentials, AgentError> {
    let tls = tls_of(config).await?;
    // A certificate of the cluster CA names the node itself: nothing else to present.
    if let Some(tls) = tls.as_ref().filter(|t| t.has_identity()) {
        return Ok(Credentials::none().with_tls(tls.clone()));
    }
    let path = config.data_dir.join(CREDENTIAL_FILE);
    let with_tls = |c: Credentials| match &tls {
        Some(tls) => c.with_tls(tls.clone()),
        None => c,
    };
    let bearer = |token: &str| {
        Credentials::bearer(token)
            .map(with_tls)
            .map_err(|e| AgentError::Refused(format!("{}: {e}", path.display())))
    };
    match std::fs::read_to_string(&path) {
        Ok(token) => return bearer(token.trim()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(refused("read", &path, e)),
    }
    let Some(join) = config
        .join_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return Err(AgentError::Refused(format!(
            "this agent has no credential yet ({} does not exist): start it once with --join TOKEN (an admin or operator makes one with `muster token create --join --compute {}`)",
            path.display(),
            config.compute
        )));
    };
    // With a pinned CA, ask for a certificate too.
    let request = match (&tls, config.ca_fingerprint.is_some()) {
        (Some(_), true) => Some(
            muster_client::pki::agent_request(&config.compute, &config.name)
                .map_err(|e| AgentError::Refused(e.to_string()))?,
        ),
        _ => None,
    };
    let joined = join_cluster(
        config,
        &tls,
        join,
        request.as_ref().map(|(csr, _)| csr.as_str()),
    )
    .await?;
    muster_client::write_secret_file(&path, &format!("{}\n", joined.credential), 0o600)
        .map_err(|e| refused("write", &path, e))?;
    tracing::info!(node = %config.name, "joined the cluster; credential kept in {}", path.display());
    if let (Some((_, key_pem)), false) = (&request, joined.certificate_pem.is_empty()) {
        let dir = config.data_dir.join(TLS_DIR);
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        muster_client::write_secret_file(&key, key_pem, 0o600)
            .map_err(|e| refused("write", &key, e))?;
        muster_client::write_secret_file(&cert, &joined.certificate_pem, 0o644)
            .map_err(|e| refused("write", &cert, e))?;
        tracing::info!(node = %config.name, "the servers signed this node's certificate; kept in {}", dir.display());
        let tls = tls
            .expect("a request is made only with TLS")
            .with_identity_files(&cert, &key)
            .map_err(|e| AgentError::Refused(e.to_string()))?;
        return Ok(Credentials::none().with_tls(tls));
    }
    bearer(&joined.credential)
}

/// The CA certificate in the chain a server presents whose SHA-256 is `pin`
/// (`SHA256:<hex>`), fetched over a TLS connection that checks nothing else: nothing is
/// sent on it, and the CA is trusted only because its fingerprint matches.
async fn discover_ca(servers: &[String], pin: &str) -> Result<String, AgentError> {
    let want = pin.trim().to_ascii_lowercase();
    let want = want.strip_prefix("sha256:").unwrap_or(&want).to_string();
    if want.len() != 64 || !want.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(AgentError::Refused(format!(
            "--ca-fingerprint {pin:?}: give SHA256: and 64 hex digits, as `muster tls fingerprint` prints"
        )));
    }
    let mut last = String::from("no server to ask");
    for url in servers {
        let Some(authority) = url.split("://").nth(1).map(|r| r.trim_end_matches('/')) else {
            continue;
        };
        match presented_chain(authority).await {
            Ok(chain) => {
                if let Some(ca) = chain.iter().find(|der| {
                    muster_client::pki::fingerprint_der(der) == format!("SHA256:{want}")
                }) {
                    return Ok(muster_client::pki::der_to_pem(ca));
                }
                return Err(AgentError::Refused(format!(
                    "the CA that {url} presents does not match --ca-fingerprint {pin}: check the fingerprint (`muster tls fingerprint --dir` where the CA was made); this agent trusts nothing else"
                )));
            }
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(AgentError::Refused(format!(
        "could not fetch the servers' CA to check --ca-fingerprint ({last})"
    )))
}

/// The certificates a TLS server at `authority` (`host:port`) presents.
async fn presented_chain(authority: &str) -> Result<Vec<Vec<u8>>, String> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let host = authority
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']'))
        .unwrap_or(authority);
    let name =
        rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .map_err(|_| "no answer within 3 s".to_string())?
    .map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| "no TLS handshake within 5 s".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.to_vec())
        .collect())
}

/// Accepts any server certificate (signatures still checked): only for reading the chain
/// a server presents, before its CA is known; see [`discover_ca`].
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a join brought.
struct Joined {
    credential: String,
    certificate_pem: String,
}

async fn join_cluster(
    config: &AgentConfig,
    tls: &Option<ClientTls>,
    join: &str,
    csr_pem: Option<&str>,
) -> Result<Joined, AgentError> {
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    let mut delay = Duration::from_millis(100);
    loop {
        let mut last = String::new();
        let anonymous = match tls {
            Some(tls) => Credentials::none().with_tls(tls.clone()),
            None => Credentials::none(),
        };
        for url in &config.servers {
            let Ok(endpoint) = anonymous.endpoint(url) else {
                continue;
            };
            let channel = match endpoint
                .connect_timeout(Duration::from_secs(3))
                .connect()
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{url}: {e}");
                    continue;
                }
            };
            let answer = AgentServiceClient::new(channel)
                .join(v1::JoinRequest {
                    join_token: join.to_string(),
                    node_name: config.name.clone(),
                    csr_pem: csr_pem.unwrap_or_default().to_string(),
                })
                .await;
            match answer {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.compute != config.compute {
                        return Err(AgentError::Refused(format!(
                            "the join token is for compute target {}, but this agent was started with --compute {}: start it with --compute {}",
                            r.compute, config.compute, r.compute
                        )));
                    }
                    return Ok(Joined {
                        credential: r.credential,
                        certificate_pem: r.certificate_pem,
                    });
                }
                Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                    last = format!("{url}: {}", s.message());
                }
                Err(s) => return Err(AgentError::Refused(s.message().to_string())),
            }
        }
        if tokio::time::Instant::now() + delay > deadline {
            return Err(AgentError::Refused(format!(
                "could not join: no server accepted the join within {JOIN_PATIENCE:?} ({last})"
            )));
        }
        tracing::warn!(cause = %last, "cannot join yet; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
