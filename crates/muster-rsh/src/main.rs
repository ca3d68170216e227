//! `muster-rsh <host> <command...>`: run a command in this run's container on `<host>`'s
//! node, as `ssh <host> <command...>` would (see the crate docs). Exit code 255 means
//! muster-rsh itself failed, as with ssh.
//!
//! `muster-rsh --idle` sleeps until it is stopped: the command of an MPI run's worker
//! containers, which only host the processes the launcher starts in them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use muster_rsh::{
    ERROR, EXIT, MAGIC, Op, Request, STDERR, STDIN, STDIN_EOF, STDOUT, read_frame, resolve,
    write_frame,
};

/// How long to keep trying to reach the peer's agent.
const CONNECT_LIMIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--idle") {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    match run(&args) {
        Ok(code) => ExitCode::from((code & 0xff) as u8),
        Err(message) => {
            eprintln!("muster-rsh: {message}");
            ExitCode::from(255)
        }
    }
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| {
        format!(
            "{name} is not set: muster-rsh runs inside the containers of a distributed muster run"
        )
    })
}

fn run(args: &[String]) -> Result<i32, String> {
    // ssh-style options before the host (`-x`, `-l user`, ...) are accepted and ignored.
    let mut i = 0;
    while i < args.len() && args[i].starts_with('-') {
        if matches!(args[i].as_str(), "-l" | "-p" | "-o" | "-i" | "-F") {
            i += 1;
        }
        i += 1;
    }
    let Some(host) = args.get(i) else {
        return Err("usage: muster-rsh <host> <command...>".into());
    };
    let command = args[i + 1..].join(" ");
    if command.is_empty() {
        return Err("no command given: usage: muster-rsh <host> <command...>".into());
    }
    let target = resolve(&env("MUSTER_RSH_PEERS")?, host)?;
    let request = Request {
        op: Op::Exec,
        run_id: env("MUSTER_RUN_ID")?,
        attempt: env("MUSTER_ATTEMPT")?
            .parse()
            .map_err(|_| "MUSTER_ATTEMPT is not a number".to_string())?,
        secret: env("MUSTER_RSH_SECRET")?,
        command,
    };

    let deadline = Instant::now() + CONNECT_LIMIT;
    let mut stream = loop {
        match TcpStream::connect(&target) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "cannot reach the muster agent of {host} at {target}: {e}"
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let _ = stream.set_nodelay(true);
    stream
        .write_all(&request.encode())
        .map_err(|e| format!("sending the request to {target}: {e}"))?;
    debug_assert_eq!(&request.encode()[..MAGIC.len()], MAGIC);

    // stdin → the agent, on its own thread.
    let mut writer = stream
        .try_clone()
        .map_err(|e| format!("cloning the connection: {e}"))?;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if write_frame(&mut writer, STDIN, &buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = write_frame(&mut writer, STDIN_EOF, &[]);
    });

    // The agent → stdout, stderr, and the exit code.
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        match read_frame(&mut stream).map_err(|e| format!("connection to {target}: {e}"))? {
            None => return Err(format!("the agent at {target} closed the connection")),
            Some((STDOUT, data)) => {
                let _ = stdout.write_all(&data);
                let _ = stdout.flush();
            }
            Some((STDERR, data)) => {
                let _ = stderr.write_all(&data);
                let _ = stderr.flush();
            }
            Some((EXIT, data)) => {
                let code: [u8; 4] = data
                    .as_slice()
                    .try_into()
                    .map_err(|_| "malformed exit frame".to_string())?;
                return Ok(i32::from_be_bytes(code));
            }
            Some((ERROR, data)) => {
                return Err(format!(
                    "the agent of {host} refused: {}",
                    String::from_utf8_lossy(&data)
                ));
            }
            Some((kind, _)) => return Err(format!("unexpected frame kind {kind}")),
        }
    }
}
