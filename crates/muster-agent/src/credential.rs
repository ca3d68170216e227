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

use muster_client::Credentials;
use muster_proto::v1::{self, agent_service_client::AgentServiceClient};
use tonic::Code;

use crate::{AgentConfig, AgentError};

/// The file, in the agent's data directory.
pub(crate) const CREDENTIAL_FILE: &str = "credential";

/// How long joining may keep trying servers that do not answer.
const JOIN_PATIENCE: Duration = Duration::from_secs(300);

/// The node's credential: read from the data directory, or obtained with the join token.
pub(crate) async fn obtain(config: &AgentConfig) -> Result<Credentials, AgentError> {
    // A certificate of the cluster CA names the node itself: nothing else to present.
    if let Some(tls) = config.tls.as_ref().filter(|t| t.has_identity()) {
        return Ok(Credentials::none().with_tls(tls.clone()));
    }
    let path = config.data_dir.join(CREDENTIAL_FILE);
    let with_tls = |c: Credentials| match &config.tls {
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
        Err(e) => {
            return Err(AgentError::Refused(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
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
    let credential = join_cluster(config, join).await?;
    muster_client::write_secret_file(&path, &format!("{credential}\n"), 0o600)
        .map_err(|e| AgentError::Refused(format!("cannot write {}: {e}", path.display())))?;
    tracing::info!(node = %config.name, "joined the cluster; credential kept in {}", path.display());
    bearer(&credential)
}

async fn join_cluster(config: &AgentConfig, join: &str) -> Result<String, AgentError> {
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    let mut delay = Duration::from_millis(100);
    loop {
        let mut last = String::new();
        let anonymous = match &config.tls {
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
                    return Ok(r.credential);
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
