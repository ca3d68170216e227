//! Credentials in a test: every cluster the testkit starts registers its admin token here,
//! by URL, so a test reaches its servers the way a logged-in user does without passing
//! tokens around: [`channel`] and [`clients`] present it, [`crate::muster`] gives the CLI
//! `MUSTER_TOKEN`, and agents started by the testkit get a join token made with it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use muster_client::{Channel, Clients, Credentials, Servers};
use muster_proto::v1;

fn tokens() -> &'static Mutex<HashMap<String, String>> {
    static TOKENS: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    TOKENS.get_or_init(Default::default)
}

fn cas() -> &'static Mutex<HashMap<String, std::path::PathBuf>> {
    static CAS: OnceLock<Mutex<HashMap<String, std::path::PathBuf>>> = OnceLock::new();
    CAS.get_or_init(Default::default)
}

/// Remembers that `servers` speak TLS with the CA certificate in `ca` (a PEM file).
pub fn register_ca(servers: &str, ca: &Path) {
    let mut map = cas().lock().expect("cas lock");
    for url in Servers::parse(servers).urls() {
        map.insert(url.clone(), ca.to_path_buf());
    }
}

/// The CA file of the cluster one of `servers` belongs to, if it speaks TLS.
pub fn ca_file(servers: &str) -> Option<std::path::PathBuf> {
    let map = cas().lock().expect("cas lock");
    Servers::parse(servers)
        .urls()
        .iter()
        .find_map(|u| map.get(u).cloned())
}

/// `credentials` with the TLS of `servers`, when they speak it.
pub fn with_tls(servers: &str, credentials: Credentials) -> Credentials {
    match ca_file(servers).and_then(|ca| muster_client::ClientTls::from_ca_file(&ca).ok()) {
        Some(tls) => credentials.with_tls(tls),
        None => credentials,
    }
}

/// Remembers `token` as the admin token of every server of `servers`.
pub fn register(servers: &str, token: &str) {
    let mut map = tokens().lock().expect("tokens lock");
    for url in Servers::parse(servers).urls() {
        map.insert(url.clone(), token.to_string());
    }
}

/// The admin token of the cluster one of `servers` belongs to.
pub fn admin_token(servers: &str) -> Option<String> {
    let map = tokens().lock().expect("tokens lock");
    Servers::parse(servers)
        .urls()
        .iter()
        .find_map(|u| map.get(u).cloned())
}

/// The admin's credentials for `servers` (none for a server the testkit did not start).
pub fn admin(servers: &str) -> Credentials {
    let credentials = admin_token(servers)
        .and_then(|t| Credentials::bearer(&t).ok())
        .unwrap_or_default();
    with_tls(servers, credentials)
}

/// A channel to the first of `servers` that answers, as the admin.
pub async fn channel(servers: &str) -> anyhow::Result<Channel> {
    let (_, channel) = Servers::parse(servers)
        .with_credentials(admin(servers))
        .connect()
        .await?;
    Ok(channel)
}

/// Clients of every service, as the admin.
pub async fn clients(servers: &str) -> anyhow::Result<Clients> {
    Ok(muster_client::connect(servers, admin(servers)).await?)
}

/// Reads the admin token a founding server wrote to `path`, once it works (within 60 s: a
/// server restarted after a kill may first repair its Raft database, which on a loaded
/// machine takes a while).
pub async fn await_admin_token(path: &Path, servers: &str) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path) {
            let token = text.trim().to_string();
            let credentials = with_tls(servers, Credentials::bearer(&token)?);
            if let Ok(mut c) = muster_client::connect(servers, credentials).await
                && c.access.who_am_i(v1::WhoAmIRequest {}).await.is_ok()
            {
                register(servers, &token);
                return Ok(token);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("no working admin token in {} within 60 s", path.display())
}

/// Creates the attached compute target `name` (no nodes until an agent joins it: runs
/// submitted to it stay queued) as the admin of `servers`.
pub async fn create_attached(servers: &str, name: &str) -> anyhow::Result<()> {
    let mut c = clients(servers).await?;
    c.compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(v1::ComputeTarget {
                name: name.into(),
                r#type: "attached".into(),
                ..Default::default()
            }),
        })
        .await?;
    Ok(())
}

/// A single-use join token for `compute`, made by the admin of `servers`.
pub async fn join_token(servers: &str, compute: &str) -> anyhow::Result<String> {
    let mut c = clients(servers).await?;
    let made = c
        .access
        .create_token(v1::CreateTokenRequest {
            join: true,
            compute: compute.into(),
            name: "test agent".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(made.token)
}

/// A new user `name` with `role` in `workspace` (`None`: cluster-wide), and their token.
pub async fn user_token(
    servers: &str,
    name: &str,
    role: &str,
    workspace: Option<&str>,
) -> anyhow::Result<String> {
    let mut c = clients(servers).await?;
    c.access
        .grant_role(v1::RoleRequest {
            grant: Some(v1::Grant {
                user: name.into(),
                workspace: workspace.unwrap_or_default().into(),
                role: role.into(),
            }),
        })
        .await?;
    let made = c
        .access
        .create_token(v1::CreateTokenRequest {
            user: name.into(),
            name: "test".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(made.token)
}
