//! One module per noun.

pub mod agent;
pub mod cluster;
pub mod compute;
pub mod dev;
pub mod metrics;
pub mod node;
pub mod pipeline;
pub mod run;
pub mod server;
pub mod sweep;

use std::path::PathBuf;

/// `~/.local/share/muster/<what>` (or `$XDG_DATA_HOME/muster/<what>`).
pub fn default_data_dir(what: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("muster").join(what)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
