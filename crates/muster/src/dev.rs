//! `muster dev`: a single-voter server, a local agent and the web UI in one process.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use muster_agent::{AgentConfig, GpuProbe, NvmlProbe};
use muster_proto::v1;
use muster_server::ServerConfig;
use tokio::net::TcpListener;

use muster_cli::cli::DevArgs;

/// How `muster dev` runs (the testkit builds one directly).
#[derive(Debug, Clone)]
pub struct DevConfig {
    /// Server data under `<data_dir>/server`, agent data under `<data_dir>/agent`.
    pub data_dir: PathBuf,
    /// The server's settings (data_dir is overridden).
    pub server: ServerConfig,
    /// GPUs of the local agent.
    pub gpu_probe: Arc<dyn GpuProbe>,
    /// Ask Docker for the local agent's GPUs with NVIDIA device requests (off for fake GPUs).
    pub gpu_device_requests: bool,
    /// Keep the admin token in the CLI's credentials file for this server's URL, so the
    /// CLI on the same account just works (off in tests, which pass the token themselves).
    pub store_credentials: bool,
    /// The local agent runs at most this many runs at once (it reserves no CPU or memory
    /// per run, so this is what keeps a burst of submissions from starting all at once).
    pub max_runs: u32,
}

/// `muster dev`'s default cap on runs at once: 4 per CPU (short runs mostly wait on I/O).
pub fn default_max_runs() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * 4).min(u32::MAX as usize) as u32
}

impl DevConfig {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> DevConfig {
        let data_dir = data_dir.into();
        let mut server = ServerConfig::new(data_dir.join("server"));
        server.create_local_compute = true;
        DevConfig {
            data_dir,
            server,
            gpu_probe: Arc::new(NvmlProbe::new()),
            gpu_device_requests: true,
            store_credentials: true,
            max_runs: default_max_runs(),
        }
    }

    /// Where the first admin's token is (written by the server on first start).
    pub fn admin_token_path(&self) -> PathBuf {
        let mut server = self.server.clone();
        server.data_dir = self.data_dir.join("server");
        server.admin_token_path()
    }
}

/// Waits (bounded) for the server to have written the admin token and applied it, and
/// returns it.
async fn admin_token(path: &std::path::Path, url: &str) -> anyhow::Result<String> {
    for _ in 0..300 {
        if let Ok(text) = std::fs::read_to_string(path) {
            let token = text.trim().to_string();
            let credentials = muster_client::Credentials::bearer(&token)?;
            if let Ok(mut c) = muster_client::connect(url, credentials).await
                && c.access.who_am_i(v1::WhoAmIRequest {}).await.is_ok()
            {
                return Ok(token);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "the server did not make its admin token ({}) within 30 s",
        path.display()
    )
}

/// A join token for the local agent, unless it already holds a credential.
async fn local_join_token(
    url: &str,
    token: &str,
    agent_dir: &std::path::Path,
) -> anyhow::Result<Option<String>> {
    if agent_dir.join("credential").exists() {
        return Ok(None);
    }
    let mut c = muster_client::connect(url, muster_client::Credentials::bearer(token)?).await?;
    let made = c
        .access
        .create_token(v1::CreateTokenRequest {
            join: true,
            compute: muster_core::spec::DEFAULT_COMPUTE.into(),
            name: "muster dev's local agent".into(),
            ..Default::default()
        })
        .await
        .map_err(muster_client::status)?
        .into_inner();
    Ok(Some(made.token))
}

/// Runs a dev cluster on `listener` until `shutdown`: the agent stops first, then the server.
pub async fn serve(
    listener: TcpListener,
    config: DevConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let mut server_config = config.server.clone();
    server_config.data_dir = config.data_dir.join("server");
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_path = config.admin_token_path();
    let server = tokio::spawn(muster_server::run(listener, server_config, async move {
        let _ = server_stopped.await;
    }));
    tokio::pin!(server);
    let url = format!("http://{addr}");
    // The agent joins with a token the admin makes; the server must be up for that.
    let ready = tokio::select! {
        r = &mut server => return r?,
        r = admin_token(&admin_path, &url) => r,
    };
    let token = match ready {
        Ok(t) => t,
        Err(e) => {
            let _ = stop_server.send(());
            let _ = server.await;
            return Err(e);
        }
    };
    if config.store_credentials {
        let names = format!("{url},http://localhost:{}", addr.port());
        let file = muster_cli::credentials::store_token(&names, &token)?;
        eprintln!(
            "  the admin token is kept in {} for the CLI",
            file.display()
        );
        eprintln!("  open the web UI: {url}/login?token={token}");
    }
    let join_token = local_join_token(&url, &token, &config.data_dir.join("agent")).await?;
    let mut agent_config = AgentConfig::new(
        format!("http://{addr}"),
        config.data_dir.join("agent"),
        "local",
    );
    agent_config.unlimited = true;
    agent_config.max_runs = Some(config.max_runs);
    agent_config.process_fallback = true;
    // One machine: the MPI exec listener need not be reachable from elsewhere.
    agent_config.exec_listen = "127.0.0.1:0".into();
    agent_config.gpu_probe = config.gpu_probe.clone();
    agent_config.gpu_device_requests = config.gpu_device_requests;
    agent_config.join_token = join_token;
    // The agent talks to the server in this same process: no partition can split them.
    agent_config.keep_alive = std::time::Duration::from_secs(20);
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(muster_agent::run(agent_config, async move {
        let _ = agent_stopped.await;
    }));
    let early = tokio::select! {
        _ = shutdown => None,
        r = &mut server => Some(r),
    };
    if let Some(result) = early {
        // The server could not start (data dir held or corrupt, ...): stop the agent and say why.
        let _ = stop_agent.send(());
        let _ = agent.await;
        return result?;
    }
    let _ = stop_agent.send(());
    let agent_result = agent.await?;
    let _ = stop_server.send(());
    server.await??;
    Ok(agent_result?)
}

/// `muster dev` from the command line.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| crate::default_data_dir("dev"));
    let listener = crate::server::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "--listen {}: muster dev serves this machine only (it speaks no TLS and its agent runs commands as you); listen on 127.0.0.1, or run `muster server` and `muster agent` for a shared farm (docs/USAGE.md)",
        args.listen
    );
    eprintln!("muster dev: server, local agent and web UI on http://{addr} (this machine only)");
    eprintln!("  data in {}", data_dir.display());
    let mut config = DevConfig::new(data_dir);
    if let Some(n) = args.max_runs {
        anyhow::ensure!(n > 0, "--max-runs 0 would run nothing: give at least 1");
        config.max_runs = n;
    }
    eprintln!(
        "  the local agent runs up to {} runs at once (--max-runs; 4 per CPU by default)",
        config.max_runs
    );
    config.server.retention = args.retention;
    config.server.retention_check = args.retention_check;
    if let Some(r) = args.retention {
        eprintln!(
            "  finished runs are archived {} after they end (--retention)",
            humantime::format_duration(r)
        );
    }
    eprintln!("  try: muster run submit --stream -- echo hello      (Ctrl-C stops muster dev)");
    serve(listener, config, crate::shutdown_signal()).await
}
