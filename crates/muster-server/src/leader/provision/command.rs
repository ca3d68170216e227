//! The `command` provisioner: an admin's `scale_up` and `scale_down` scripts, run on the
//! leader as `SCRIPT COMPUTE SIZE NODE...` with the same facts in the environment
//! (`MUSTER_COMPUTE`, `MUSTER_SIZE`, `MUSTER_NODES` space-separated, `MUSTER_TIER`, and
//! `MUSTER_SERVERS` / `MUSTER_SERVER`: the servers the agents must connect to, which
//! `muster agent` reads as its `--server`). Exit 0 means done. The script's output goes
//! to `<data dir>/provision/<compute>.log` (a file, not a pipe, so agents it starts in
//! the background do not hold the leader up); the tail of it explains a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use muster_core::compute::CommandProvisioner;
use muster_core::state::ProvisionOutcome;

use super::{Step, Work};

/// A script running longer than this is killed and counts as failed.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `scale_up` for the nodes to launch and `scale_down` for those being released.
pub(crate) async fn reconcile(
    settings: &CommandProvisioner,
    servers: &[String],
    work: &Work,
    log_dir: &Path,
    joins: &BTreeMap<String, String>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for (script, nodes, outcome) in [
        (&settings.scale_up, &work.launch, ProvisionOutcome::Launched),
        (
            &settings.scale_down,
            &work.release,
            ProvisionOutcome::Released,
        ),
    ] {
        if nodes.is_empty() {
            continue;
        }
        match run_script(script, servers, work, nodes, log_dir, joins).await {
            Ok(()) => steps.push(Step::Done(outcome, nodes.clone())),
            Err(e) => steps.push(Step::Failed(nodes.clone(), e)),
        }
    }
    steps
}

async fn run_script(
    script: &str,
    servers: &[String],
    work: &Work,
    nodes: &[String],
    log_dir: &Path,
    joins: &BTreeMap<String, String>,
) -> Result<(), String> {
    let log_path: PathBuf = log_dir.join(format!("{}.log", work.compute));
    std::fs::create_dir_all(log_dir)
        .map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let err = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let size = work.size.clone().unwrap_or_default();
    let servers = servers.join(",");
    let mut cmd = tokio::process::Command::new(script);
    cmd.arg(&work.compute)
        .arg(&size)
        .args(nodes)
        .env("MUSTER_COMPUTE", &work.compute)
        .env("MUSTER_SIZE", &size)
        .env("MUSTER_NODES", nodes.join(" "))
        .env("MUSTER_TIER", work.tier.as_str())
        .env("MUSTER_SERVERS", &servers)
        .env("MUSTER_SERVER", &servers)
        // One single-use join token per node to launch: `NODE=TOKEN` pairs, and for a
        // single node MUSTER_JOIN_TOKEN itself (`muster agent --join` reads it).
        .env(
            "MUSTER_JOIN_TOKENS",
            nodes
                .iter()
                .filter_map(|n| joins.get(n).map(|j| format!("{n}={j}")))
                .collect::<Vec<_>>()
                .join(" "),
        )
        .env(
            "MUSTER_JOIN_TOKEN",
            match nodes {
                [one] => joins.get(one).cloned().unwrap_or_default(),
                _ => String::new(),
            },
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    let status = match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("{script}: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            return Err(format!(
                "{script} ran longer than {} s and was killed",
                SCRIPT_TIMEOUT.as_secs()
            ));
        }
    };
    if status.success() {
        return Ok(());
    }
    let tail = std::fs::read(&log_path)
        .map(|b| {
            let text = String::from_utf8_lossy(&b[(start as usize).min(b.len())..]).into_owned();
            let lines: Vec<&str> = text.lines().rev().take(3).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
        })
        .unwrap_or_default();
    Err(format!(
        "{script} {} failed ({status}){}",
        nodes.join(" "),
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    ))
}
