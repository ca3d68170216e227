//! The cluster's certificates: a CA, the certificates it issues, and an agent's key and
//! certificate signing request. Shared by `muster tls` (the CLI makes the CA and the
//! servers' certificates), the servers (which may sign agents' requests at join) and the
//! agent (which makes its key and request). Every certificate names its holder in a URI
//! SAN: `muster://server/N` or `muster://agent/COMPUTE/NODE`.
//!
//! Crate choice: rcgen (the rustls project's certificate generator), keys ECDSA P-256.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

/// How long a server's or an agent's certificate is valid by default.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A certificate operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PkiError(String);

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> PkiError {
        PkiError(e.to_string())
    }
}

fn validity(params: &mut CertificateParams, valid_for: Duration, start_offset: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A minute's slack for clocks a little apart.
    params.not_before = now - time::Duration::minutes(1) - start_offset;
    params.not_after = now + valid_for - start_offset;
}

/// The leaf parameters every muster certificate shares: its holder's URI, client and
/// server authentication.
fn leaf(uri: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, uri);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names.push(SanType::URI(
        uri.try_into()
            .map_err(|_| PkiError(format!("{uri:?} is not a URI")))?,
    ));
    Ok(params)
}

/// The URI of an agent's certificate.
pub fn agent_uri(compute: &str, node: &str) -> String {
    format!("muster://agent/{compute}/{node}")
}

/// `SHA256:<hex>` of the first certificate in `pem`: what `--ca-fingerprint` pins.
pub fn fingerprint(pem: &str) -> Result<String, PkiError> {
    let der = pem_der(pem)?;
    Ok(fingerprint_der(&der))
}

/// `SHA256:<hex>` of a DER certificate.
pub fn fingerprint_der(der: &[u8]) -> String {
    format!("SHA256:{}", hex::encode(Sha256::digest(der)))
}

fn pem_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| PkiError(format!("not a PEM certificate: {e}")))
}

/// A DER certificate as PEM.
pub fn der_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// A CA's certificate and key (PEM).
#[derive(Debug, Clone)]
pub struct Ca {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        validity(&mut params, CA_VALIDITY, Duration::ZERO);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, key)?)
    }

    /// A certificate for `uri` valid for `names` (DNS names or IP addresses), from
    /// `valid_from_ago` in the past for `valid_for`: (certificate, key), PEM.
    pub fn issue(
        &self,
        uri: &str,
        names: &[String],
        valid_for: Duration,
        valid_from_ago: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = leaf(uri)?;
        for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.try_into()
                        .map_err(|_| PkiError(format!("{name:?} is not a host name")))?,
                ),
            });
        }
        validity(&mut params, valid_for, valid_from_ago);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs an agent's certificate request (`csr_pem`) for node `node` of `compute`: the
    /// certificate names the node this CA's holder decided, whatever the request asked
    /// for; only the request's public key is taken.
    pub fn sign_agent(&self, csr_pem: &str, compute: &str, node: &str) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError(format!("csr_pem: not a certificate request: {e}")))?;
        let mut params = leaf(&agent_uri(compute, node))?;
        validity(&mut params, LEAF_VALIDITY, Duration::ZERO);
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(cert.pem())
    }
}

/// A new key and a certificate request for it (what an agent sends when it joins):
/// (request, key), PEM.
pub fn agent_request(compute: &str, node: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let params = leaf(&agent_uri(compute, node))?;
    let csr = params.serialize_request(&key)?;
    Ok((
        csr.pem().map_err(|e| PkiError(e.to_string()))?,
        key.serialize_pem(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_request_is_signed_for_the_node_the_ca_names() {
        let ca = Ca::new("test CA").unwrap();
        let (csr, key) = agent_request("pool", "asked-for").unwrap();
        let cert = ca.sign_agent(&csr, "pool", "node-1").unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.contains("PRIVATE KEY"));
        assert!(ca.sign_agent("garbage", "pool", "n").is_err());
        let fp = fingerprint(&ca.cert_pem).unwrap();
        assert!(fp.starts_with("SHA256:") && fp.len() == 7 + 64, "{fp}");
        let der = pem_der(&ca.cert_pem).unwrap();
        assert_eq!(pem_der(&der_to_pem(&der)).unwrap(), der, "PEM round trip");
    }
}
