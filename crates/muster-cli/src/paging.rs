//! How the list commands page: `--page-size N` (alias `--limit`), `--all` and `--since`.
//!
//! A list shows the newest [`DEFAULT_ROWS`] (runs, sweeps, pipelines; nodes by name) and,
//! when more exist, says so on stderr with the flags that show them. The server pages
//! (ListRuns and the others take a `page_size` and a `page_token`, at most 1,000 a page);
//! [`fetch`] asks for pages until it has the rows wanted or the server says there are no
//! more, so `--page-size 5000` and `--all` work with any number of rows.
//!
//! `--since` takes a duration ago (`2h`, `30m`, `7d`: humantime's durations) or a time in
//! RFC 3339 (`2026-01-31T12:00:00Z`, humantime's parser: UTC, with `Z` or none).

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

/// Rows a list shows without `--page-size` or `--all`.
pub const DEFAULT_ROWS: u32 = 50;

/// The most a server puts on one page (larger page sizes are clamped to it).
pub const SERVER_MAX_PAGE: u32 = 1_000;

/// `--page-size` and `--all`.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct PageArgs {
    /// How many to show (default 50; 0: all): the newest (nodes: the first by name),
    /// fetched in pages of at most 1,000. `--limit` is the same flag.
    #[arg(long, alias = "limit", value_name = "N")]
    pub page_size: Option<u32>,
    /// Show every one (fetches every page).
    #[arg(long, conflicts_with = "page_size")]
    pub all: bool,
}

impl PageArgs {
    /// How many rows to show (`None`: every one).
    pub fn rows(&self) -> Option<usize> {
        match (self.all, self.page_size) {
            (true, _) | (false, Some(0)) => None,
            (false, Some(n)) => Some(n as usize),
            (false, None) => Some(DEFAULT_ROWS as usize),
        }
    }
}

/// What [`fetch`] got: the rows, in the order the server pages them, and whether more
/// exist beyond them.
#[derive(Debug)]
pub struct Fetched<T> {
    /// The rows of the pages fetched.
    pub rows: Vec<T>,
    /// The server has more rows than these.
    pub more: bool,
}

/// Fetches pages, each by `page(page_size, page_token)` returning its rows and its next
/// page token (empty on the last page), until `rows` rows (every page with `None`).
pub async fn fetch<T, E, F, Fut>(rows: Option<usize>, mut page: F) -> Result<Fetched<T>, E>
where
    F: FnMut(u32, String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), E>>,
{
    let mut got: Vec<T> = Vec::new();
    let mut token = String::new();
    loop {
        let size = match rows {
            Some(want) => (want - got.len()).min(SERVER_MAX_PAGE as usize) as u32,
            None => SERVER_MAX_PAGE,
        };
        let (items, next) = page(size, std::mem::take(&mut token)).await?;
        let empty = items.is_empty();
        got.extend(items);
        let done = next.is_empty() || rows.is_some_and(|want| got.len() >= want);
        // A page without rows ends it too: a server that predates paging, or a bug,
        // never makes this loop forever.
        if done || empty {
            return Ok(Fetched {
                rows: got,
                more: !next.is_empty(),
            });
        }
        token = next;
    }
}

/// The stderr line of a list that shows only `shown` (`the newest 50 runs`) of more: which
/// flags show the rest (`since`: whether `--since` applies to this list).
pub fn more_hint(shown: &str, noun: &str, since: bool) -> String {
    if since {
        format!("showing {shown} of more; --all for every {noun}, --page-size N, or --since 2h")
    } else {
        format!("showing {shown} of more; --all for every {noun} or --page-size N")
    }
}

/// Reads `--since`: a duration ago (`2h`, `30m`, `7d`) or an RFC 3339 time
/// (`2026-01-31T12:00:00Z`), as milliseconds since the epoch.
pub fn parse_since(text: &str) -> Result<u64, String> {
    since_at(text, SystemTime::now())
}

/// [`parse_since`] with `now` given.
fn since_at(text: &str, now: SystemTime) -> Result<u64, String> {
    let text = text.trim();
    let at = if let Ok(ago) = humantime::parse_duration(text) {
        now.checked_sub(ago).unwrap_or(UNIX_EPOCH)
    } else if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        t
    } else {
        return Err(format!(
            "{text:?} is neither a duration ago (2h, 30m, 7d) nor a time in RFC 3339, in UTC (2026-01-31T12:00:00Z)"
        ));
    };
    Ok(at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_ago_or_a_time() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(since_at("2h", now), Ok((1_000_000 - 7_200) * 1_000));
        assert_eq!(since_at("30m", now), Ok((1_000_000 - 1_800) * 1_000));
        assert_eq!(since_at("7d", now), Ok((1_000_000 - 604_800) * 1_000));
        assert_eq!(since_at("1y", now), Ok(0), "before the epoch is the epoch");
        assert_eq!(since_at("2026-01-31T12:00:00Z", now), Ok(1_769_860_800_000));
        assert_eq!(
            since_at("2026-01-31T12:00:00.250Z", now),
            Ok(1_769_860_800_250)
        );
        let err = since_at("yesterday", now).unwrap_err();
        assert!(
            err.contains("\"yesterday\" is neither a duration ago (2h"),
            "{err}"
        );
    }

    #[test]
    fn rows_default_to_50_and_all_or_0_is_every_row() {
        let args = |page_size, all| PageArgs { page_size, all };
        assert_eq!(args(None, false).rows(), Some(50));
        assert_eq!(args(Some(7), false).rows(), Some(7));
        assert_eq!(args(Some(0), false).rows(), None, "--limit 0 meant all");
        assert_eq!(args(None, true).rows(), None);
    }

    /// A server of `n` rows numbered from the newest down, paging as muster's does.
    async fn server_page(n: u32, size: u32, token: String) -> Result<(Vec<u32>, String), ()> {
        assert!((1..=SERVER_MAX_PAGE).contains(&size), "page size {size}");
        let start: u32 = if token.is_empty() {
            n
        } else {
            token.parse().unwrap()
        };
        let rows: Vec<u32> = (0..start).rev().take(size as usize).collect();
        let next = match rows.last() {
            Some(&last) if last > 0 => last.to_string(),
            _ => String::new(),
        };
        Ok((rows, next))
    }

    #[tokio::test]
    async fn fetch_pages_until_it_has_the_rows_or_the_last_page() {
        let calls = std::cell::Cell::new(0);
        let fetched = fetch(Some(50), |size, token| {
            calls.set(calls.get() + 1);
            server_page(120, size, token)
        })
        .await
        .unwrap();
        assert_eq!(fetched.rows.len(), 50);
        assert_eq!(fetched.rows[0], 119);
        assert!(fetched.more);
        assert_eq!(calls.get(), 1);
        let every = fetch(None, |size, token| server_page(2_500, size, token))
            .await
            .unwrap();
        assert_eq!(every.rows, (0..2_500).rev().collect::<Vec<_>>());
        assert!(!every.more);
        let many = fetch(Some(1_500), |size, token| server_page(2_500, size, token))
            .await
            .unwrap();
        assert_eq!((many.rows.len(), many.more), (1_500, true));
        let exact = fetch(Some(120), |size, token| server_page(120, size, token))
            .await
            .unwrap();
        assert_eq!((exact.rows.len(), exact.more), (120, false));
    }

    #[test]
    fn the_hint_names_the_flags() {
        assert_eq!(
            more_hint("the newest 50 runs", "run", true),
            "showing the newest 50 runs of more; --all for every run, --page-size N, or --since 2h"
        );
        assert_eq!(
            more_hint("the first 50 nodes by name", "node", false),
            "showing the first 50 nodes by name of more; --all for every node or --page-size N"
        );
    }
}
