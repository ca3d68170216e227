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

/// What an agent writes to a run's log while it pulls the run's image: one line per change
/// of a layer's status, `muster: pulling image IMAGE: LAYER: STATUS`.
const PULL_PREFIX: &str = "muster: pulling image ";

/// Turns the pull lines at the start of a streamed log into one progress line (layers
/// complete of those seen) for a person at a terminal, and prints a one-line summary when
/// the run's own output starts. Everything after the first line that is not a pull line
/// passes through untouched; so does everything when `active` is false (a redirected
/// stdout keeps every line).
#[derive(Debug)]
pub struct PullLines {
    active: bool,
    /// A line not yet ended, held while pull lines may still come.
    partial: Vec<u8>,
    image: String,
    /// Each layer's last status.
    layers: std::collections::BTreeMap<String, String>,
    bar: Option<ProgressBar>,
}

impl PullLines {
    /// A filter that folds pull lines when `active`.
    pub fn new(active: bool) -> PullLines {
        PullLines {
            active,
            partial: Vec::new(),
            image: String::new(),
            layers: std::collections::BTreeMap::new(),
            bar: None,
        }
    }

    /// For stdout: active when both stdout and stderr (where the bar is drawn) are terminals.
    pub fn for_terminal() -> PullLines {
        PullLines::new(std::io::stdout().is_terminal() && std::io::stderr().is_terminal())
    }

    /// The layers seen and those complete.
    pub fn layers(&self) -> (usize, usize) {
        let done = self
            .layers
            .values()
            .filter(|s| s.starts_with("Pull complete") || s.starts_with("Already exists"))
            .count();
        (self.layers.len(), done)
    }

    /// What of `data` to print now.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if !self.active {
            return data.to_vec();
        }
        self.partial.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            match text.trim_end().strip_prefix(PULL_PREFIX) {
                Some(rest) => self.pulled(rest),
                None => {
                    self.done();
                    out.extend_from_slice(&line);
                    out.append(&mut self.partial);
                    self.active = false;
                    return out;
                }
            }
        }
        // An unfinished line that cannot be a pull line is the run's own output.
        let could_be_pull = self.partial.len() < PULL_PREFIX.len()
            && PULL_PREFIX.as_bytes().starts_with(&self.partial)
            || self.partial.starts_with(PULL_PREFIX.as_bytes());
        if !self.partial.is_empty() && !could_be_pull {
            self.done();
            out.append(&mut self.partial);
            self.active = false;
        }
        out
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        self.done();
        std::mem::take(&mut self.partial)
    }

    /// One pull line: `IMAGE: LAYER: STATUS` or `IMAGE: STATUS`.
    fn pulled(&mut self, rest: &str) {
        let mut parts = rest.splitn(3, ": ");
        let image = parts.next().unwrap_or_default().to_string();
        if let (Some(layer), Some(status)) = (parts.next(), parts.next()) {
            self.layers.insert(layer.to_string(), status.to_string());
        }
        let (seen, done) = self.layers();
        let bar = self.bar.get_or_insert_with(|| bytes_unknown(""));
        bar.set_message(format!("pulling image {image}: {done} of {seen} layers"));
        bar.tick();
        self.image = image;
    }

    /// Ends the pull's progress line with its summary.
    fn done(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            let (seen, _) = self.layers();
            eprintln!("muster: pulled image {} ({seen} layers)", self.image);
        }
    }
}

#[cfg(test)]
mod pull_tests {
    use super::*;

    #[test]
    fn pull_lines_fold_into_a_count_and_the_run_s_output_passes() {
        let mut p = PullLines::new(true);
        let mut out = p.push(b"muster: pulling image py:3: not found locally\nmuster: pulling image py:3: a1: Pulling fs layer\nmuster: pulling image py:3: b2: Pulling fs layer\nmuster: pull");
        assert!(out.is_empty(), "{out:?}");
        out.extend(p.push(b"ing image py:3: a1: Pull complete\n"));
        assert_eq!(p.layers(), (2, 1));
        out.extend(p.push(b"hello\nmuster: pulling image later: not a pull\n"));
        out.extend(p.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "hello\nmuster: pulling image later: not a pull\n"
        );
        // Off a terminal every line stays.
        let mut plain = PullLines::new(false);
        let line = b"muster: pulling image py:3: a1: Pull complete\n";
        assert_eq!(plain.push(line), line.to_vec());
        // A partial line that cannot be a pull line is printed at once (a prompt).
        let mut p = PullLines::new(true);
        assert_eq!(p.push(b"Password: "), b"Password: ".to_vec());
    }
}
