//! The combined log of a multi-instance attempt: every rank's bytes, line by line, each
//! line prefixed `[rank N] `.
//!
//! Ranks' logs arrive as separate byte streams in chunks that may end mid-line. A
//! [`RankLines`] keeps each rank's unfinished line until its newline comes, so a partial
//! line of one rank is never split by another rank's output; lines of different ranks
//! come out in the order their newlines were fed.

use std::collections::BTreeMap;

/// A rank's unfinished line longer than this is cut (and ended with a newline), so a rank
/// that never prints a newline cannot make the combiner hold its whole log.
pub const MAX_PENDING_LINE: usize = 64 * 1024;

/// Line-buffers the logs of several ranks into one prefixed stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RankLines {
    pending: BTreeMap<u32, Vec<u8>>,
}

/// The prefix of every combined line of `rank`.
pub fn rank_prefix(rank: u32) -> String {
    format!("[rank {rank}] ")
}

impl RankLines {
    /// An empty combiner.
    pub fn new() -> RankLines {
        RankLines::default()
    }

    /// Feeds the next bytes of `rank`'s log; returns the lines they complete, each with
    /// its prefix and its newline (nothing if they complete none).
    pub fn push(&mut self, rank: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let pending = self.pending.entry(rank).or_default();
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            out.extend_from_slice(rank_prefix(rank).as_bytes());
            out.append(pending);
            out.extend_from_slice(&rest[..=nl]);
            rest = &rest[nl + 1..];
        }
        pending.extend_from_slice(rest);
        while pending.len() > MAX_PENDING_LINE {
            let tail = pending.split_off(MAX_PENDING_LINE);
            out.extend_from_slice(rank_prefix(rank).as_bytes());
            out.append(pending);
            out.push(b'\n');
            *pending = tail;
        }
        if pending.is_empty() {
            self.pending.remove(&rank);
        }
        out
    }

    /// Ends every rank's unfinished line (at the end of an attempt or of the stream): each
    /// is written with its prefix and a newline, by rank.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for (rank, line) in std::mem::take(&mut self.pending) {
            out.extend_from_slice(rank_prefix(rank).as_bytes());
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
        out
    }

    /// Whether no rank has an unfinished line.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn partial_lines_wait_for_their_newline() {
        let mut c = RankLines::new();
        assert_eq!(c.push(0, b"hel"), b"");
        assert_eq!(c.push(1, b"one\ntw"), b"[rank 1] one\n");
        assert_eq!(c.push(0, b"lo\nwor"), b"[rank 0] hello\n");
        assert_eq!(c.push(1, b"o\n"), b"[rank 1] two\n");
        assert!(!c.is_empty());
        assert_eq!(c.finish(), b"[rank 0] wor\n");
        assert!(c.is_empty());
        assert_eq!(c.finish(), b"");
    }

    #[test]
    fn empty_lines_and_empty_chunks() {
        let mut c = RankLines::new();
        assert_eq!(c.push(2, b""), b"");
        assert_eq!(c.push(2, b"\n\n"), b"[rank 2] \n[rank 2] \n");
        assert!(c.is_empty());
    }

    #[test]
    fn an_endless_line_is_cut() {
        let mut c = RankLines::new();
        let long = vec![b'x'; MAX_PENDING_LINE + 10];
        let out = c.push(0, &long);
        let mut expected = b"[rank 0] ".to_vec();
        expected.extend(std::iter::repeat_n(b'x', MAX_PENDING_LINE));
        expected.push(b'\n');
        assert_eq!(out, expected);
        assert_eq!(c.finish(), b"[rank 0] xxxxxxxxxx\n");
    }

    /// Splits `text` into chunks at the given cut points (sorted, deduplicated, in range).
    fn chunks(text: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (text.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([text.len()]) {
            out.push(text[at..c].to_vec());
            at = c;
        }
        out
    }

    proptest! {
        /// However the ranks' logs are chunked and interleaved, every line of every rank
        /// comes out exactly once, whole, with its rank's prefix, in the rank's order.
        #[test]
        fn every_line_once_whole_and_in_order(
            lines in proptest::collection::vec(proptest::collection::vec("[a-z ]{0,12}", 0..8), 1..4),
            cuts in proptest::collection::vec(proptest::collection::vec(0usize..200, 0..8), 4),
            order in proptest::collection::vec(0usize..4, 0..64),
        ) {
            let ranks = lines.len();
            let mut queues: Vec<std::collections::VecDeque<Vec<u8>>> = lines
                .iter()
                .enumerate()
                .map(|(r, ls)| {
                    let text: String = ls.iter().map(|l| format!("{l}\n")).collect();
                    chunks(text.as_bytes(), &cuts[r]).into()
                })
                .collect();
            let mut c = RankLines::new();
            let mut out = Vec::new();
            let mut picks = order.into_iter().map(|o| o % ranks);
            loop {
                let live: Vec<usize> = (0..ranks).filter(|r| !queues[*r].is_empty()).collect();
                if live.is_empty() {
                    break;
                }
                let r = picks.next().filter(|r| live.contains(r)).unwrap_or(live[0]);
                let chunk = queues[r].pop_front().unwrap();
                out.extend(c.push(r as u32, &chunk));
            }
            out.extend(c.finish());
            let text = String::from_utf8(out).unwrap();
            for (r, ls) in lines.iter().enumerate() {
                let prefix = rank_prefix(r as u32);
                let got: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix(prefix.as_str()))
                    .collect();
                prop_assert_eq!(&got, ls);
            }
            prop_assert_eq!(text.lines().count(), lines.iter().map(Vec::len).sum::<usize>());
        }
    }
}
