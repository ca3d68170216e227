//! `muster server`.

use std::time::Duration;

use muster_server::ServerConfig;

use muster_cli::cli::ServerArgs;

/// Runs a server until Ctrl-C.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let listener = bind(&args.listen).await?;
    let local = listener.local_addr()?;
    anyhow::ensure!(
        local.ip().is_loopback() || args.insecure_no_tls || args.tls_dir.is_some(),
        "--listen {}: other hosts could reach this server, and without TLS API tokens and the cluster key would cross the network in plaintext: give --tls-dir (make the files with `muster tls init`), listen on 127.0.0.1, or pass --insecure-no-tls on a trusted network or behind a TLS-terminating proxy",
        args.listen
    );
    let mut config = ServerConfig::new(&args.data_dir);
    config.node_grace = Duration::from_secs(args.node_grace_secs);
    config.create_local_compute = args.local_compute;
    config.web_hosts = args.web_hosts.clone();
    config.raft.id = args.id;
    config.admin_token_file = args.admin_token_file.clone();
    config.tls = args.tls_dir.as_deref().map(muster_server::TlsFiles::in_dir);
    config.max_uploads_per_caller = args.max_uploads_per_caller;
    config.upload_bytes_per_sec = args.upload_mib_per_sec << 20;
    config.retention = args.retention;
    config.restore_from = args.restore_from.clone();
    config.retention_check = args.retention_check;
    if let Some(path) = &args.cluster_key_file {
        let key = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--cluster-key-file {}: {e}", path.display()))?;
        config.cluster_key = Some(key.trim().to_string());
    } else if let Some(key) = &args.cluster_key {
        config.cluster_key = Some(key.trim().to_string());
    }
    if let Some(peers) = &args.peers {
        anyhow::ensure!(
            !args.join,
            "--peers and --join exclude each other: a joining server learns the members from the leader"
        );
        config.peers = muster_server::cluster::parse_peers(peers).map_err(anyhow::Error::msg)?;
        config.raft.initial_voters = config.peers.keys().copied().collect();
    } else if args.join {
        config.raft.initial_voters = Vec::new();
    } else {
        config.raft.initial_voters = vec![args.id];
    }
    config.advertise = args.advertise.clone().or_else(|| {
        let addr = listener.local_addr().ok()?;
        (!addr.ip().is_unspecified() && !config.peers.contains_key(&args.id))
            .then(|| addr.to_string())
    });
    let data_dir = args.data_dir.display();
    let opened = muster_server::open(listener, config.clone()).await?;
    eprintln!(
        "muster server listening on {}://{} (data in {})",
        if config.tls.is_some() {
            "https"
        } else {
            "http"
        },
        local,
        data_dir
    );
    if config.raft.initial_voters.first() == Some(&config.raft.id) {
        eprintln!(
            "  the first admin's token is in {} (log in with: muster login --token-file {})",
            config.admin_token_path().display(),
            config.admin_token_path().display()
        );
    }
    opened.serve(crate::shutdown_signal()).await
}

/// Binds a listener, with an error that says what to do.
pub async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr}: {e}; pick another address with --listen (e.g. 127.0.0.1:7071)"
        )
    })
}
