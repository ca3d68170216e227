//! Progress bars on the CLI's uploads and downloads, for a person at a terminal.
//!
//! Drawn with `indicatif` (the progress-bar crate of cargo-like tools: rate-limited
//! redraws, byte units, ETA) on stderr, and only when stderr is a terminal: a redirected
//! log or a script sees only the one-line summaries the commands print anyway.

use std::io::IsTerminal;
use std::pin::Pin;
use std::task::{Context, Poll};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncRead, ReadBuf};

/// A bar for `total` bytes of `what` ("uploading code"), hidden off a terminal.
pub fn bytes(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A counter of bytes for `what` whose size is not known up front, hidden off a terminal.
pub fn bytes_unknown(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
            .expect("a valid template"),
    );
    bar.set_message(what.to_string());
    bar
}

/// A reader that moves `bar` by what it reads.
#[derive(Debug)]
pub struct Counting<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R> Counting<R> {
    /// `inner`, counted on `bar`.
    pub fn new(inner: R, bar: ProgressBar) -> Counting<R> {
        Counting { inner, bar }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            self.bar.inc((buf.filled().len() - before) as u64);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn a_counting_reader_moves_its_bar_by_what_it_reads() {
        let bar = ProgressBar::hidden();
        bar.set_length(11);
        let mut r = Counting::new(&b"hello world"[..], bar.clone());
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
        assert_eq!(bar.position(), 11);
    }
}
