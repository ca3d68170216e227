//! # muster-docker: the Docker engine as both daemons meet it
//!
//! The agent runs attempts in containers (`muster-agent`'s executor) and the leader starts
//! agent containers for the `docker` provisioner (`muster-server`). Both connect to the
//! same kind of engine the same way and turn its errors into the same sentences; this
//! crate is that one place. It knows nothing of runs, nodes or servers.
//!
//! bollard is the engine client (async, typed models, the engine's own API version
//! negotiated down); this crate adds only what muster says about it.

use std::time::Duration;

use bollard::Docker;
pub use bollard::errors::Error as EngineError;

/// How long to wait for the engine to answer when connecting.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// No engine answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no Docker engine at {host}: {cause}; start dockerd or set DOCKER_HOST")]
pub struct NoEngine {
    /// `DOCKER_HOST`, or the default socket.
    pub host: String,
    /// What failed.
    pub cause: String,
}

/// Where the engine is looked for: `DOCKER_HOST`, else the local socket.
pub fn engine_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
}

/// Connects to the engine at [`engine_host`], negotiates the API version down to the
/// engine's, and pings it, all within [`CONNECT_LIMIT`].
pub async fn connect() -> Result<Docker, NoEngine> {
    let no_engine = |cause: String| NoEngine {
        host: engine_host(),
        cause,
    };
    let docker = Docker::connect_with_defaults().map_err(|e| no_engine(message(&e)))?;
    tokio::time::timeout(CONNECT_LIMIT, async {
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok::<_, EngineError>(docker)
    })
    .await
    .map_err(|_| no_engine(format!("no answer within {} s", CONNECT_LIMIT.as_secs())))?
    .map_err(|e| no_engine(message(&e)))
}

/// The HTTP status of an engine error, if the engine answered one.
pub fn status_of(e: &EngineError) -> Option<u16> {
    match e {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// What the engine said, without bollard's wrapping where the engine said something.
pub fn message(e: &EngineError) -> String {
    match e {
        EngineError::DockerResponseServerError { message, .. } if !message.is_empty() => {
            message.trim().to_string()
        }
        EngineError::DockerStreamError { error } => error.trim().to_string(),
        EngineError::RequestTimeoutError => "the Docker engine did not answer in time".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_s_words_are_kept_and_bollard_s_wrapping_dropped() {
        let refused = EngineError::DockerResponseServerError {
            status_code: 409,
            message: " Conflict. The container name is already in use \n".into(),
        };
        assert_eq!(status_of(&refused), Some(409));
        assert_eq!(
            message(&refused),
            "Conflict. The container name is already in use"
        );
        assert_eq!(status_of(&EngineError::RequestTimeoutError), None);
        assert_eq!(
            message(&EngineError::RequestTimeoutError),
            "the Docker engine did not answer in time"
        );
        let stream = EngineError::DockerStreamError {
            error: "manifest unknown ".into(),
        };
        assert_eq!(message(&stream), "manifest unknown");
    }

    #[test]
    fn no_engine_says_what_to_do() {
        let e = NoEngine {
            host: "unix:///var/run/docker.sock".into(),
            cause: "connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "no Docker engine at unix:///var/run/docker.sock: connection refused; start dockerd or set DOCKER_HOST"
        );
    }
}
