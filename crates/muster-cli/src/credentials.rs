//! Where the CLI keeps its API tokens, and which one a call presents.
//!
//! Tokens are kept per server URL in `credentials.json` under the config directory
//! (`$MUSTER_CONFIG_DIR`, else `$XDG_CONFIG_HOME/muster`, else `~/.config/muster`),
//! readable only by the user (0600, in a 0700 directory), like Docker's `config.json`
//! keeps registry logins: one account can talk to several clusters, and `muster dev`
//! writes its admin token here for its own URL so the CLI on the same account just works.
//! `MUSTER_TOKEN` in the environment wins over the file (for scripts and CI).
//! Writers take `credentials.lock` so two `muster dev` starts do not lose each other's entry.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use anyhow::Context;
use muster_client::{Credentials, Servers};
use serde::{Deserialize, Serialize};

/// The environment variable that overrides stored tokens.
pub const TOKEN_ENV: &str = "MUSTER_TOKEN";

/// The CLI's config directory.
pub fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MUSTER_CONFIG_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("muster")
}

/// The file tokens are kept in.
pub fn credentials_path() -> PathBuf {
    config_dir().join("credentials.json")
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Store {
    /// Server URL → its entry.
    #[serde(default)]
    servers: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    token: String,
}

fn read_store() -> anyhow::Result<Store> {
    let path = credentials_path();
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a muster credentials file: fix or delete it, then `muster login`",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Store::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Changes the store under its lock and writes it back (0600, atomically).
fn update(change: impl FnOnce(&mut Store)) -> anyhow::Result<PathBuf> {
    let dir = config_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let lock = std::fs::File::create(dir.join("credentials.lock"))
        .with_context(|| format!("cannot lock {}", dir.display()))?;
    lock.lock()?;
    let mut store = read_store()?;
    change(&mut store);
    let path = credentials_path();
    muster_client::write_secret_file(&path, &serde_json::to_string_pretty(&store)?, 0o600)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Keeps `token` for every server of `servers` (a `--server` list); returns the file.
pub fn store_token(servers: &str, token: &str) -> anyhow::Result<PathBuf> {
    let urls = Servers::parse(servers).urls().to_vec();
    update(|store| {
        for url in urls {
            store.servers.insert(
                url,
                Entry {
                    token: token.trim().to_string(),
                },
            );
        }
    })
}

/// Forgets the tokens of `servers`; returns how many were kept.
pub fn remove_token(servers: &str) -> anyhow::Result<usize> {
    let urls = Servers::parse(servers).urls().to_vec();
    let mut removed = 0;
    update(|store| {
        for url in &urls {
            removed += usize::from(store.servers.remove(url).is_some());
        }
    })?;
    Ok(removed)
}

/// The token calls to `servers` present: `MUSTER_TOKEN`, else the first stored for one of
/// the servers, else none.
pub fn token_for(servers: &str) -> anyhow::Result<Option<String>> {
    if let Ok(token) = std::env::var(TOKEN_ENV)
        && !token.trim().is_empty()
    {
        return Ok(Some(token.trim().to_string()));
    }
    let store = read_store()?;
    Ok(Servers::parse(servers)
        .urls()
        .iter()
        .find_map(|url| store.servers.get(url).map(|e| e.token.clone())))
}

/// The credentials calls to `servers` present.
pub fn credentials_for(servers: &str) -> anyhow::Result<Credentials> {
    match token_for(servers)? {
        Some(token) => Credentials::bearer(&token).map_err(Into::into),
        None => Ok(Credentials::none()),
    }
}
