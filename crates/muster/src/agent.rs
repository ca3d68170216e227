//! `muster agent`.

use std::sync::Arc;

use muster_agent::{AgentConfig, NvmlProbe};
use muster_cli::cli::{AgentArgs, parse_labels};
use muster_core::compute::Tier;
use muster_core::resources::{parse_cpu, parse_memory};

/// Runs an agent until Ctrl-C.
pub async fn run(
    server: &str,
    ca_file: Option<&std::path::Path>,
    args: AgentArgs,
) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| crate::default_data_dir("agent"));
    let mut config = AgentConfig::new(String::new(), data_dir, args.compute);
    config.servers = muster_client::Servers::parse(server).urls().to_vec();
    anyhow::ensure!(
        !config.servers.is_empty(),
        "--server names no server: point it (or MUSTER_SERVER) at one or more servers, comma-separated"
    );
    if let Some(name) = args.name {
        config.name = name;
    }
    config.tier = Tier::parse(&args.tier).map_err(|e| anyhow::anyhow!("--tier: {e}"))?;
    config.labels = parse_labels(&args.labels)?;
    config.advertise_addr = args.advertise_addr;
    config.cpu_millis = args
        .cpus
        .as_deref()
        .map(parse_cpu)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--cpus: {e}"))?;
    config.memory_bytes = args
        .memory
        .as_deref()
        .map(parse_memory)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
    if args.max_runs == Some(0) {
        anyhow::bail!("--max-runs 0 would run nothing: give at least 1");
    }
    // Runs that ask for no CPU or memory would otherwise all be placed here at once: a
    // burst of submissions is capped at 4 per CPU, as `muster dev` caps its agent.
    let max_runs = args.max_runs.unwrap_or_else(|| {
        let cpus = config
            .cpu_millis
            .map(|m| m.div_ceil(1000) as usize)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let n = (cpus.max(1) * 4).min(u32::MAX as usize) as u32;
        eprintln!("muster agent: runs up to {n} runs at once (--max-runs; 4 per CPU by default)");
        n
    });
    config.max_runs = Some(max_runs);
    config.exec_listen = args.exec_listen;
    if let Some(helper) = args.rsh_helper {
        anyhow::ensure!(
            helper.is_file(),
            "--rsh-helper: {} is not a file: build muster-rsh (see docs/USAGE.md, Distributed runs) or drop the flag",
            helper.display()
        );
        config.rsh_helper = Some(helper);
    }
    config.peer_wait = std::time::Duration::from_secs(args.peer_wait_secs);
    if let Some(user) = &args.run_as {
        config.run_as = Some(
            muster_agent::executor::confine::resolve_run_as(user).map_err(anyhow::Error::msg)?,
        );
    }
    config.gpu_probe = Arc::new(NvmlProbe::new());
    config.tls = match (&args.tls_dir, ca_file) {
        (Some(dir), _) => Some(
            muster_client::ClientTls::from_ca_file(&dir.join("ca.pem"))
                .and_then(|t| t.with_identity_files(&dir.join("cert.pem"), &dir.join("key.pem")))
                .map_err(|e| anyhow::anyhow!("--tls-dir: {e}"))?,
        ),
        (None, Some(ca)) => Some(
            muster_client::ClientTls::from_ca_file(ca)
                .map_err(|e| anyhow::anyhow!("--ca-file: {e}"))?,
        ),
        (None, None) => None,
    };
    // A command provisioner's script launches several nodes at once: each agent finds its
    // own token in MUSTER_JOIN_TOKENS (`NODE=TOKEN` pairs) when --join is not given.
    config.ca_fingerprint = args.ca_fingerprint.clone().filter(|f| !f.trim().is_empty());
    config.join_token = args.join.filter(|j| !j.trim().is_empty()).or_else(|| {
        let pairs = std::env::var("MUSTER_JOIN_TOKENS").ok()?;
        pairs.split_whitespace().find_map(|pair| {
            let (node, token) = pair.split_once('=')?;
            (node == config.name).then(|| token.to_string())
        })
    });
    eprintln!(
        "muster agent {} joining compute {} via {}",
        config.name,
        config.compute,
        config.servers.join(", ")
    );
    Ok(muster_agent::run(config, crate::shutdown_signal()).await?)
}
