//! # muster-rsh: the rsh agent of distributed runs
//!
//! `mpirun` starts its daemons on the other hosts of a hostfile through an "rsh agent":
//! `AGENT <host> <command...>`, normally ssh. muster mounts this small, statically linked
//! binary read-only into the containers of a distributed run (at
//! `/opt/muster/bin/muster-rsh`) and points Open MPI at it, so user images need no sshd and
//! nothing of muster's installed. It connects to the muster agent of `<host>`'s node (from
//! `MUSTER_RSH_PEERS`, `name=addr:port,...`), proves it belongs to the attempt with the
//! attempt's secret (`MUSTER_RSH_SECRET`), and that agent runs the command with `docker
//! exec` inside the run's container there, streaming stdin, stdout and stderr both ways and
//! returning the exit code, as ssh does.
//!
//! This crate is also the wire protocol, shared with the agent's listener
//! (`muster-agent/src/rsh_server.rs`). Everything is length-prefixed, big-endian:
//!
//! - request: [`MAGIC`], then a `u32` body length, then the body: five fields, each a `u32`
//!   length and its bytes: the operation (`exec`, `ready`, `release`), the run id, the
//!   attempt number (decimal), the secret, the command (empty except for `exec`);
//! - then frames both ways: a kind byte, a `u32` length, the payload. The client sends
//!   [`STDIN`] data and one [`STDIN_EOF`]; the agent sends [`STDOUT`] and [`STDERR`] data and
//!   ends with [`EXIT`] (an `i32` exit code) or [`ERROR`] (a message).
//!
//! `ready` answers `EXIT 0` once the attempt's container runs on that node (the launcher
//! waits for this from every worker before it starts); `release` tells a worker's agent that
//! the launcher finished, so the worker's idle container ends as completed.
//!
//! Standard library only: it must link statically (`-C target-feature=+crt-static`) and
//! run in any image.

use std::io::{self, Read, Write};

/// The first bytes of a request.
pub const MAGIC: &[u8; 6] = b"MRSH1\n";
/// Frame: bytes for the command's stdin (client to agent).
pub const STDIN: u8 = 0;
/// Frame: the client's stdin is over.
pub const STDIN_EOF: u8 = 1;
/// Frame: bytes the command wrote to stdout.
pub const STDOUT: u8 = 2;
/// Frame: bytes the command wrote to stderr.
pub const STDERR: u8 = 3;
/// Frame: the command ended with this exit code (`i32`, big-endian); the last frame.
pub const EXIT: u8 = 4;
/// Frame: the request failed (a message); the last frame.
pub const ERROR: u8 = 5;
/// The largest request body or frame accepted.
pub const MAX_LEN: u32 = 1 << 20;

/// What a client asks of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Run a command in the attempt's container and stream it.
    Exec,
    /// Is the attempt's container running on this node?
    Ready,
    /// The launcher finished: end the attempt's idle container as completed.
    Release,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Exec => "exec",
            Op::Ready => "ready",
            Op::Release => "release",
        }
    }
}

/// A request, as sent after [`MAGIC`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// The run.
    pub run_id: String,
    /// The attempt number.
    pub attempt: u32,
    /// The attempt's secret.
    pub secret: String,
    /// The shell command for `exec` (run with `sh -c`).
    pub command: String,
}

impl Request {
    /// The request's bytes: magic, length, body.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for field in [
            self.op.as_str(),
            &self.run_id,
            &self.attempt.to_string(),
            &self.secret,
            &self.command,
        ] {
            body.extend_from_slice(&(field.len() as u32).to_be_bytes());
            body.extend_from_slice(field.as_bytes());
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a request body (what follows the magic and the length).
    pub fn decode(body: &[u8]) -> Result<Request, String> {
        let mut rest = body;
        let mut field = || -> Result<String, String> {
            if rest.len() < 4 {
                return Err("truncated request".into());
            }
            let n = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            if rest.len() < 4 + n {
                return Err("truncated request".into());
            }
            let s = String::from_utf8(rest[4..4 + n].to_vec())
                .map_err(|_| "a request field is not UTF-8".to_string())?;
            rest = &rest[4 + n..];
            Ok(s)
        };
        let op = match field()?.as_str() {
            "exec" => Op::Exec,
            "ready" => Op::Ready,
            "release" => Op::Release,
            other => return Err(format!("unknown operation {other:?}")),
        };
        let run_id = field()?;
        let attempt = field()?
            .parse()
            .map_err(|_| "the attempt is not a number".to_string())?;
        let secret = field()?;
        let command = field()?;
        Ok(Request {
            op,
            run_id,
            attempt,
            secret,
            command,
        })
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.push(kind);
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame; `None` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..])?;
    let len = u32::from_be_bytes(head[1..].try_into().expect("4 bytes"));
    if len > MAX_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is too large"),
        ));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

/// Finds `host` in `MUSTER_RSH_PEERS` (`name=addr:port,...`): by node name, else by
/// address when exactly one peer has it. Returns `addr:port`.
pub fn resolve(peers: &str, host: &str) -> Result<String, String> {
    let entries: Vec<(&str, &str)> = peers
        .split(',')
        .filter(|e| !e.is_empty())
        .filter_map(|e| e.split_once('='))
        .collect();
    if let Some((_, target)) = entries.iter().find(|(name, _)| *name == host) {
        return Ok(target.to_string());
    }
    let by_addr: Vec<&&str> = entries
        .iter()
        .map(|(_, t)| t)
        .filter(|t| t.rsplit_once(':').is_some_and(|(a, _)| a == host))
        .collect();
    match by_addr.as_slice() {
        [one] => Ok(one.to_string()),
        _ => Err(format!(
            "host {host:?} is not a node of this run (MUSTER_RSH_PEERS={peers:?}); use the hostfile muster wrote"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = Request {
            op: Op::Exec,
            run_id: "run-1".into(),
            attempt: 2,
            secret: "abc".into(),
            command: "orted -mca x 'y z'".into(),
        };
        let bytes = r.encode();
        assert_eq!(&bytes[..6], MAGIC);
        let len = u32::from_be_bytes(bytes[6..10].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 10);
        assert_eq!(Request::decode(&bytes[10..]).unwrap(), r);
        assert!(Request::decode(&bytes[10..bytes.len() - 1]).is_err());
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, STDOUT, b"hello").unwrap();
        write_frame(&mut buf, EXIT, &3i32.to_be_bytes()).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((STDOUT, b"hello".to_vec()))
        );
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((EXIT, 3i32.to_be_bytes().to_vec()))
        );
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn hosts_resolve_by_name_then_unique_address() {
        let peers = "a=127.0.0.1:7001,b=127.0.0.1:7002,c=10.0.0.3:7003";
        assert_eq!(resolve(peers, "b").unwrap(), "127.0.0.1:7002");
        assert_eq!(resolve(peers, "10.0.0.3").unwrap(), "10.0.0.3:7003");
        assert!(resolve(peers, "127.0.0.1").is_err());
        assert!(resolve(peers, "zzz").unwrap_err().contains("zzz"));
    }
}
