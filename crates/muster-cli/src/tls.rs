//! `muster tls init|rotate|agent`: the cluster's certificates, made with rcgen.
//!
//! `init` makes a cluster CA (ECDSA P-256, 10 years) and one certificate per server (1
//! year): `DIR/ca.pem` and `DIR/ca.key` (the CA key: keep it off the servers once the
//! certificates are made), and for server N `DIR/server-N/{ca,cert,key}.pem`, which
//! `muster server --tls-dir DIR/server-N` reads. A server certificate is valid for the
//! names and addresses given (and `localhost`, `127.0.0.1`), and says which server it is
//! in a URI SAN, `muster://server/N`: the other servers accept Raft and replication calls
//! only from such a certificate. `agent` makes an agent's certificate
//! (`muster://agent/COMPUTE/NODE`) for `muster agent --tls-dir`; `rotate` re-issues a
//! server's certificate in place (atomically), which the running server picks up for new
//! connections within a second.
//!
//! `init --servers-sign-agents` also gives each server the CA key, so agents can join
//! with a join token and the CA's fingerprint (`muster tls fingerprint`) alone and get their
//! certificate by a signing request. Keys are written 0600. The certificates themselves
//! are made by `muster_client::pki` (rcgen), rather than by shelling out to openssl.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

pub use muster_client::pki::{Ca, LEAF_VALIDITY};

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    muster_client::write_secret_file(path, text, mode)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The CA of `dir` (`ca.pem`, `ca.key`).
pub fn load_ca(dir: &Path) -> anyhow::Result<Ca> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).with_context(|| {
            format!(
                "cannot read {}: make the cluster's certificates with `muster tls init --dir {}`",
                dir.join(f).display(),
                dir.display()
            )
        })
    };
    Ok(Ca {
        cert_pem: read("ca.pem")?,
        key_pem: read("ca.key")?,
    })
}

/// A server's names: what `--member N=NAMES` listed, plus loopback.
fn server_names(names: &[String]) -> Vec<String> {
    let mut all: Vec<String> = names.to_vec();
    for local in ["localhost", "127.0.0.1"] {
        if !all.iter().any(|n| n == local) {
            all.push(local.to_string());
        }
    }
    all
}

/// Writes one holder's files: `dir/ca.pem`, `dir/cert.pem` (the certificate, then the CA's:
/// the chain a joining agent checks its `--ca-fingerprint` against), `dir/key.pem` (0600).
fn write_holder(dir: &Path, ca: &Ca, cert: &str, key: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_file(&dir.join("ca.pem"), &ca.cert_pem, 0o644)?;
    write_file(&dir.join("key.pem"), key, 0o600)?;
    write_file(
        &dir.join("cert.pem"),
        &format!("{cert}{}", ca.cert_pem),
        0o644,
    )
}

/// `muster tls init`: a CA in `dir` and a certificate for each `(id, names)`; returns the
/// directories written.
/// With `servers_sign_agents`, each server directory gets the CA key too (`ca.key`, 0600),
/// so servers sign the certificate requests of agents that join with a join token and
/// `--ca-fingerprint`; a server's compromise is then the CA's.
pub fn init(
    dir: &Path,
    servers: &[(u64, Vec<String>)],
    servers_sign_agents: bool,
) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(
        !dir.join("ca.key").exists(),
        "{} already holds a CA: rotate server certificates with `muster tls rotate`, or pick another --dir",
        dir.display()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = Ca::new("muster cluster CA")?;
    write_file(&dir.join("ca.key"), &ca.key_pem, 0o600)?;
    write_file(&dir.join("ca.pem"), &ca.cert_pem, 0o644)?;
    let mut out = Vec::new();
    for (id, names) in servers {
        let holder = issue_server(dir, &ca, *id, names, LEAF_VALIDITY)?;
        if servers_sign_agents {
            write_file(&holder.join("ca.key"), &ca.key_pem, 0o600)?;
        }
        out.push(holder);
    }
    Ok(out)
}

/// Issues server `id`'s certificate into `dir/server-ID`.
pub fn issue_server(
    dir: &Path,
    ca: &Ca,
    id: u64,
    names: &[String],
    valid_for: Duration,
) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(id > 0, "--member {id}=…: server ids start at 1");
    let (cert, key) = ca.issue(
        &format!("muster://server/{id}"),
        &server_names(names),
        valid_for,
        Duration::ZERO,
    )?;
    let holder = dir.join(format!("server-{id}"));
    write_holder(&holder, ca, &cert, &key)?;
    Ok(holder)
}

/// `muster tls fingerprint`: the CA's `SHA256:…`, for `muster agent --ca-fingerprint`.
pub fn fingerprint(dir: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(dir.join("ca.pem"))
        .with_context(|| format!("cannot read {}", dir.join("ca.pem").display()))?;
    Ok(muster_client::pki::fingerprint(&pem)?)
}

/// `muster tls rotate`: a new certificate for server `id` from the CA in `dir`.
pub fn rotate(dir: &Path, id: u64, names: &[String]) -> anyhow::Result<PathBuf> {
    issue_server(dir, &load_ca(dir)?, id, names, LEAF_VALIDITY)
}

/// `muster tls agent`: a certificate for node `node` of `compute` into `dir/agent-NODE`.
pub fn issue_agent(dir: &Path, compute: &str, node: &str) -> anyhow::Result<PathBuf> {
    let ca = load_ca(dir)?;
    let (cert, key) = ca.issue(
        &muster_client::pki::agent_uri(compute, node),
        &[],
        LEAF_VALIDITY,
        Duration::ZERO,
    )?;
    let holder = dir.join(format!("agent-{node}"));
    write_holder(&holder, &ca, &cert, &key)?;
    Ok(holder)
}

/// Parses `--server ID=NAME[,NAME...]`.
pub fn parse_server(text: &str) -> anyhow::Result<(u64, Vec<String>)> {
    let (id, names) = text.split_once('=').ok_or_else(|| {
        anyhow::anyhow!("--member {text:?}: give ID=HOST[,HOST...], e.g. 1=10.0.0.1,muster-1")
    })?;
    let id: u64 = id.trim().parse().map_err(|_| {
        anyhow::anyhow!("--member {text:?}: the id must be a number (1, 2, 3, ...)")
    })?;
    Ok((id, names.split(',').map(|n| n.trim().to_string()).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_ca_and_a_certificate_per_server_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let made = init(
            dir.path(),
            &[(1, vec!["muster-1".into()]), (2, vec!["10.0.0.2".into()])],
            true,
        )
        .unwrap();
        assert!(made[0].join("ca.key").exists(), "servers sign agents");
        assert_eq!(made.len(), 2);
        for holder in &made {
            for f in ["ca.pem", "cert.pem", "key.pem"] {
                assert!(holder.join(f).exists(), "{f} in {}", holder.display());
            }
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(holder.join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let err = init(dir.path(), &[(1, vec![])], false).unwrap_err();
        assert!(err.to_string().contains("already holds a CA"), "{err}");
        let before = std::fs::read_to_string(made[0].join("cert.pem")).unwrap();
        rotate(dir.path(), 1, &["muster-1".into()]).unwrap();
        assert_ne!(
            std::fs::read_to_string(made[0].join("cert.pem")).unwrap(),
            before
        );
        assert_eq!(
            parse_server("3=a,b").unwrap(),
            (3, vec!["a".into(), "b".into()])
        );
        assert!(parse_server("x=a").is_err() && parse_server("3").is_err());
    }
}
