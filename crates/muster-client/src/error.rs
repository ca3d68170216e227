//! What can go wrong talking to muster, split the way openraft splits `APIError` from
//! `Fatal`: [`ClientError::is_retryable`] says whether the same request may succeed if sent
//! again (to this server later, or to another one), or whether the answer is final.

use std::path::PathBuf;

use tonic::{Code, Status};

/// The metadata key a server puts on an UNAVAILABLE answer that names the leader
/// (`host:port`): "this server is not the leader; the leader is at …".
pub const LEADER_HEADER: &str = "muster-leader";

/// An error of a muster client call. Its `Display` is the message a person needs (the
/// server's own words for a refusal); none of them wraps a debug dump.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No server of the list answered (each is named with its cause). Retryable: a server
    /// that is starting, or restarting after a failover, answers a moment later.
    #[error(
        "cannot reach a muster server at {tried}: start one with `muster dev`, or point --server (or MUSTER_SERVER) at a running server"
    )]
    Unreachable {
        /// Every address tried, with why it failed: `http://a:7070 (connection refused), …`.
        tried: String,
    },
    /// The server list names no server at all. Fatal.
    #[error("no muster server to talk to: point --server (or MUSTER_SERVER) at a running server")]
    NoServers,
    /// A server answered with an error status: a refusal (fatal) or UNAVAILABLE (no leader
    /// yet, shutting down, not the leader: retryable).
    #[error("{}", .status.message())]
    Status {
        /// The server's answer.
        status: Status,
    },
    /// A blob transfer was refused or cut off; like [`ClientError::Status`], named by blob.
    #[error("blob {sha256}: {}", .status.message())]
    Blob {
        /// The blob's address.
        sha256: String,
        /// The server's answer.
        status: Status,
    },
    /// A downloaded blob does not hash to its address. Retryable: another copy (or the same
    /// one, sent again) is intact.
    #[error("blob {sha256} arrived corrupted (hashes to {actual})")]
    Corrupted {
        /// The blob's address.
        sha256: String,
        /// What the received bytes hash to.
        actual: String,
    },
    /// The data of an upload could not be read. Fatal.
    #[error("cannot read the data of blob {sha256}: {error}")]
    ReadSource {
        /// The blob's address.
        sha256: String,
        /// The cause.
        error: std::io::Error,
    },
    /// A local file could not be read or written. Fatal: sending again does not help.
    #[error("cannot {action} {}: {error}", .path.display())]
    Io {
        /// `read`, `write`, `create` …: what was being done to `path`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// The stored credentials could not be read or used. Fatal.
    #[error("{0}")]
    Credentials(String),
}

impl ClientError {
    /// A server's error answer.
    pub fn status(status: Status) -> ClientError {
        ClientError::Status { status }
    }

    /// Whether sending the same request again may succeed: UNAVAILABLE answers (no leader
    /// yet, a leader change, a server shutting down, a connection that broke), servers that
    /// do not answer at all, and corrupted transfers. Everything else is the server's
    /// final word (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ALREADY_EXISTS,
    /// FAILED_PRECONDITION, …) or a local failure, and is returned at once.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Corrupted { .. } => true,
            ClientError::Status { status } | ClientError::Blob { status, .. } => {
                is_retryable_code(status.code()) || is_broken_connection(status)
            }
            ClientError::NoServers
            | ClientError::ReadSource { .. }
            | ClientError::Io { .. }
            | ClientError::Credentials(_) => false,
        }
    }

    /// The gRPC code of a server's answer (`None` when no server answered).
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status { status } | ClientError::Blob { status, .. } => {
                Some(status.code())
            }
            _ => None,
        }
    }

    /// The leader's address (`host:port`) when a follower named it in its answer.
    pub fn leader_hint(&self) -> Option<&str> {
        match self {
            ClientError::Status { status } | ClientError::Blob { status, .. } => {
                leader_hint(status)
            }
            _ => None,
        }
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> ClientError {
        ClientError::Status { status }
    }
}

/// A gRPC status as a [`ClientError`] (for `.map_err(status)?` on a raw call).
pub fn status(status: Status) -> ClientError {
    ClientError::Status { status }
}

/// Whether `status` is no server's answer but the connection breaking under the request
/// (a server killed mid-call): tonic makes those itself, as UNKNOWN "transport error" with
/// the transport's error as the source, which no server-sent status has. The request may
/// or may not have been carried out, so it is retried as a lost answer is: muster's writes
/// carry idempotency keys or are idempotent (a cancel, a drain), so sending again is safe.
pub fn is_broken_connection(status: &Status) -> bool {
    status.code() == Code::Unknown && std::error::Error::source(status).is_some()
}

/// Whether an answer with this code may be different if the request is sent again.
pub fn is_retryable_code(code: Code) -> bool {
    code == Code::Unavailable
}

/// The leader's address a follower put in an UNAVAILABLE answer's [`LEADER_HEADER`].
pub fn leader_hint(status: &Status) -> Option<&str> {
    if status.code() != Code::Unavailable {
        return None;
    }
    status
        .metadata()
        .get(LEADER_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_and_unreachable_are_retryable_and_refusals_are_fatal() {
        let retryable = [
            ClientError::status(Status::unavailable("no leader yet")),
            ClientError::Unreachable {
                tried: "http://127.0.0.1:1 (connection refused)".into(),
            },
            ClientError::Blob {
                sha256: "ab".into(),
                status: Status::unavailable("shutting down"),
            },
            ClientError::Corrupted {
                sha256: "ab".into(),
                actual: "cd".into(),
            },
            // The connection broke under the call (tonic's own status, with its cause).
            ClientError::status(Status::from_error(Box::new(std::io::Error::other(
                "connection reset",
            )))),
        ];
        for e in &retryable {
            assert!(e.is_retryable(), "{e:?} should be retryable");
        }
        let fatal = [
            ClientError::status(Status::invalid_argument("name: bad")),
            ClientError::status(Status::not_found("run r-1 not found")),
            ClientError::status(Status::permission_denied("not yours")),
            ClientError::status(Status::already_exists("taken")),
            ClientError::status(Status::failed_precondition("has nodes")),
            ClientError::status(Status::deadline_exceeded("did not catch up")),
            // A server's own UNKNOWN answer has no source.
            ClientError::status(Status::unknown("the handler failed")),
            ClientError::Blob {
                sha256: "ab".into(),
                status: Status::not_found("no such blob"),
            },
            ClientError::NoServers,
            ClientError::Io {
                action: "write",
                path: "/x".into(),
                error: std::io::Error::other("disk full"),
            },
        ];
        for e in &fatal {
            assert!(!e.is_retryable(), "{e:?} should be fatal");
        }
    }

    #[test]
    fn a_refusal_reads_as_the_servers_message() {
        let e = ClientError::status(Status::invalid_argument("compute: no target named gpu"));
        assert_eq!(e.to_string(), "compute: no target named gpu");
        assert_eq!(e.code(), Some(Code::InvalidArgument));
        let e = ClientError::Blob {
            sha256: "ab12".into(),
            status: Status::not_found("not here"),
        };
        assert_eq!(e.to_string(), "blob ab12: not here");
    }

    #[test]
    fn the_leader_hint_is_read_from_an_unavailable_answer_only() {
        let mut s = Status::unavailable("this server is not the leader; the leader is at b:7070");
        s.metadata_mut()
            .insert(LEADER_HEADER, "b:7070".parse().unwrap());
        assert_eq!(ClientError::status(s).leader_hint(), Some("b:7070"));

        let mut s = Status::invalid_argument("bad");
        s.metadata_mut()
            .insert(LEADER_HEADER, "b:7070".parse().unwrap());
        assert_eq!(ClientError::status(s).leader_hint(), None);
        assert_eq!(
            ClientError::status(Status::unavailable("no leader")).leader_hint(),
            None
        );
    }
}
