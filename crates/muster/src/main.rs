//! The `muster` binary: parse flags, set up logging, run, exit with the right code.

use clap::Parser;
use muster_cli::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Daemon(_));
    if !daemon {
        end_quietly_on_a_closed_pipe();
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if daemon {
        // The daemons' periodic blocking work (the GPU probe every 30 s) finds its thread
        // still there instead of starting one each time (Tokio's default keeps 10 s).
        runtime.thread_keep_alive(std::time::Duration::from_secs(120));
    }
    let runtime = runtime.build().expect("a Tokio runtime");
    runtime.block_on(run(cli, daemon));
}

/// A client command whose reader went away (`muster run show ID -o json | head -c 1`) ends
/// quietly, as `cat` does, instead of panicking in `println!`: SIGPIPE goes back to its
/// default action. The daemons keep Rust's setting (ignored), as they treat a closed socket
/// as an error to handle.
#[allow(unsafe_code)]
fn end_quietly_on_a_closed_pipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called before the runtime starts any thread; installing SIG_DFL runs no
    // handler code, so nothing async-signal-unsafe can happen.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

async fn run(cli: Cli, daemon: bool) {
    let default_level = if daemon { "info,raft=warn" } else { "warn" };
    // Colour only for a person at a terminal: a redirected log stays plain, and NO_COLOR
    // (no-color.org) turns it off.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_ansi(colour)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MUSTER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let json = cli.output == muster_cli::cli::OutputFormat::Json && !daemon;
    match muster::execute(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) if json => {
            eprintln!("{}", muster_cli::output::error_json(&e));
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
