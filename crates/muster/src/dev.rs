//! `muster dev`: a single-voter server, a local agent and the web UI in one process.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use muster_agent::{AgentConfig, GpuProbe, NvmlProbe};
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
        }
    }
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
    let server = tokio::spawn(muster_server::run(listener, server_config, async move {
        let _ = server_stopped.await;
    }));
    let mut agent_config = AgentConfig::new(
        format!("http://{addr}"),
        config.data_dir.join("agent"),
        "local",
    );
    agent_config.unlimited = true;
    agent_config.process_fallback = true;
    // One machine: the MPI exec listener need not be reachable from elsewhere.
    agent_config.exec_listen = "127.0.0.1:0".into();
    agent_config.gpu_probe = config.gpu_probe.clone();
    agent_config.gpu_device_requests = config.gpu_device_requests;
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(muster_agent::run(agent_config, async move {
        let _ = agent_stopped.await;
    }));
    tokio::pin!(server);
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
    eprintln!("muster dev: server, local agent and web UI on http://{addr}");
    eprintln!("  data in {}", data_dir.display());
    eprintln!("  try: muster run submit --stream -- echo hello      (Ctrl-C stops muster dev)");
    serve(listener, DevConfig::new(data_dir), crate::shutdown_signal()).await
}
