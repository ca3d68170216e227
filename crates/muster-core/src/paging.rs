//! Paged listings of the replicated state: pages of runs, sweeps, pipelines and nodes, and
//! the page tokens that say where the next page starts.
//!
//! A page is produced without touching what is not on it: runs are read newest first from
//! the state's index by submission number ([`State::runs_newest_first`]), so the first
//! page of 100,000 runs looks at 51 of them (the page, and one more to know whether
//! another page follows), and only the runs on the page are handed to the caller, by
//! reference, to convert. Filters (experiment, state, compute target, creation time, and
//! the caller's workspaces, which the server adds) are applied while walking, so a filter
//! that matches few runs walks further for them but still converts only the page.
//!
//! Orders, each total and stable while items are added:
//!
//! - runs: newest first, by [`Run::seq`] (submission order);
//! - sweeps and pipelines: newest first, by (creation time, id);
//! - nodes: by name.
//!
//! A page token is the key of the last item of the page before it, as text with the name
//! of its listing (`runs.41`, `sweeps.1767225600000.sweep-ab12`, `nodes.gpu-07`). Clients
//! treat it as opaque and pass it back unchanged; [`PageToken::parse`] checks it and says
//! what to do with one that is not a token of the listing. A run submitted after a token
//! was handed out has a higher submission number and sorts before it, so paging on never
//! repeats or skips a run (sweeps and pipelines go by the proposer's clock: the same,
//! unless a server's clock went back).

use crate::Millis;
use crate::state::{Node, Pipeline, Run, RunState, State, Sweep};

/// The largest page a listing answers: a larger `page_size` is clamped to it.
pub const MAX_PAGE_SIZE: usize = 1_000;

/// The page size of a request that sends a page token but neither a page size nor a limit.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// How a list request asked to be answered, from its `page_size`, `page_token` and (the
/// older field) `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRequest {
    /// Neither a page size nor a token: what clients that predate paging get. Every
    /// matching item (`None`) or only the newest `limit`, oldest first, as before paging;
    /// no page-size cap.
    Legacy(Option<usize>),
    /// A page of at most this many items (1 to [`MAX_PAGE_SIZE`]), newest first.
    Paged(usize),
}

impl PageRequest {
    /// Reads a request's fields: a `page_size` or a `page_token` makes it paged (of
    /// `page_size`, else `limit`, else [`DEFAULT_PAGE_SIZE`] items, clamped to
    /// [`MAX_PAGE_SIZE`]); otherwise it is [`PageRequest::Legacy`] with `limit` (0: all).
    pub fn of(page_size: u32, page_token: &str, limit: u32) -> PageRequest {
        if page_size == 0 && page_token.is_empty() {
            return PageRequest::Legacy((limit > 0).then_some(limit as usize));
        }
        let size = match (page_size, limit) {
            (0, 0) => DEFAULT_PAGE_SIZE,
            (0, limit) => limit as usize,
            (size, _) => size as usize,
        };
        PageRequest::Paged(size.min(MAX_PAGE_SIZE))
    }

    /// The most items the page holds (`usize::MAX`: every one).
    pub fn size(self) -> usize {
        match self {
            PageRequest::Legacy(limit) => limit.unwrap_or(usize::MAX),
            PageRequest::Paged(size) => size,
        }
    }

    /// Whether the items go oldest first (legacy answers), rather than newest first.
    pub fn oldest_first(self) -> bool {
        matches!(self, PageRequest::Legacy(_))
    }
}

/// The listings that page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// `ListRuns`, by submission number.
    Runs,
    /// `ListSweeps`, by creation.
    Sweeps,
    /// `ListPipelines`, by creation.
    Pipelines,
    /// `ListNodes`, by name.
    Nodes,
}

impl Listing {
    /// The token prefix, and the listing's name in messages.
    fn name(self) -> &'static str {
        match self {
            Listing::Runs => "runs",
            Listing::Sweeps => "sweeps",
            Listing::Pipelines => "pipelines",
            Listing::Nodes => "nodes",
        }
    }
}

/// Where a page of a listing starts: after (in the listing's order) this key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageToken {
    /// Runs: those submitted before this submission number.
    Run(u64),
    /// Sweeps or pipelines: those created before this (creation time, id).
    Created(Listing, Millis, String),
    /// Nodes: those named after this.
    Node(String),
}

impl PageToken {
    /// Reads `token` as a page token of `listing`; the message says what is wrong with it
    /// and what to send instead (without the field's name: the caller adds it).
    pub fn parse(listing: Listing, token: &str) -> Result<PageToken, String> {
        let bad = |why: &str| {
            format!(
                "{why}: send the next_page_token of the previous answer of this listing unchanged, or none for the first page"
            )
        };
        let Some(key) = token
            .strip_prefix(listing.name())
            .and_then(|t| t.strip_prefix('.'))
        else {
            return Err(bad(&format!(
                "{:?} is not a page token of the {} list",
                shorten(token),
                listing.name()
            )));
        };
        let malformed = || bad(&format!("malformed page token {:?}", shorten(token)));
        match listing {
            Listing::Runs => key
                .parse::<u64>()
                .map(PageToken::Run)
                .map_err(|_| malformed()),
            Listing::Sweeps | Listing::Pipelines => {
                let (at, id) = key.split_once('.').ok_or_else(malformed)?;
                let at = at.parse::<Millis>().map_err(|_| malformed())?;
                if id.is_empty() {
                    return Err(malformed());
                }
                Ok(PageToken::Created(listing, at, id.to_string()))
            }
            Listing::Nodes if key.is_empty() => Err(malformed()),
            Listing::Nodes => Ok(PageToken::Node(key.to_string())),
        }
    }

    /// Reads an optional token: the empty string is the first page.
    pub fn parse_opt(listing: Listing, token: &str) -> Result<Option<PageToken>, String> {
        if token.is_empty() {
            return Ok(None);
        }
        PageToken::parse(listing, token).map(Some)
    }
}

impl std::fmt::Display for PageToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PageToken::Run(seq) => write!(f, "runs.{seq}"),
            PageToken::Created(listing, at, id) => write!(f, "{}.{at}.{id}", listing.name()),
            PageToken::Node(name) => write!(f, "nodes.{name}"),
        }
    }
}

/// A token as an error message quotes it: at most 64 characters.
fn shorten(token: &str) -> String {
    let mut s: String = token.chars().take(64).collect();
    if s.len() < token.len() {
        s.push('…');
    }
    s
}

/// One page of a listing.
#[derive(Debug)]
pub struct Page<'a, T> {
    /// The items on the page, in the listing's order.
    pub items: Vec<&'a T>,
    /// Where the next page starts; `None` on the last page (no further item matches).
    pub next: Option<PageToken>,
}

impl<'a, T> Page<'a, T> {
    /// The first `size` items of `ordered` that `keep` accepts, and (when one more is
    /// accepted after them) the token of the last one. Walks `ordered` only as far as the
    /// item after the page's last.
    pub fn take(
        ordered: impl IntoIterator<Item = &'a T>,
        size: usize,
        mut keep: impl FnMut(&T) -> bool,
        token_of: impl Fn(&T) -> PageToken,
    ) -> Page<'a, T> {
        let mut items = Vec::with_capacity(size.min(MAX_PAGE_SIZE));
        let mut more = false;
        for item in ordered.into_iter().filter(|i| keep(i)) {
            if items.len() == size {
                more = true;
                break;
            }
            items.push(item);
        }
        let next = if more {
            items.last().map(|i| token_of(i))
        } else {
            None
        };
        Page { items, next }
    }
}

/// What a run listing keeps (the caller's workspaces aside: the server checks those).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only this experiment.
    pub experiment: Option<String>,
    /// Only runs in this state.
    pub state: Option<RunState>,
    /// Only runs on this compute target.
    pub compute: Option<String>,
    /// Only runs submitted at or after this time.
    pub since: Option<Millis>,
}

impl RunFilter {
    /// Whether `run` is kept.
    pub fn matches(&self, run: &Run) -> bool {
        self.experiment
            .as_ref()
            .is_none_or(|e| &run.spec.experiment == e)
            && self.state.is_none_or(|s| run.state == s)
            && self.compute.as_ref().is_none_or(|c| &run.spec.compute == c)
            && self.since.is_none_or(|t| run.created_at >= t)
    }
}

impl PageToken {
    /// The listing this token belongs to.
    fn listing(&self) -> Listing {
        match self {
            PageToken::Run(_) => Listing::Runs,
            PageToken::Created(l, ..) => *l,
            PageToken::Node(_) => Listing::Nodes,
        }
    }

    /// The error of a token of another listing than `listing`.
    fn wrong(&self, listing: Listing) -> String {
        format!(
            "a page token of the {} list, not of the {} list: send the next_page_token of the previous answer of this listing unchanged, or none for the first page",
            self.listing().name(),
            listing.name()
        )
    }
}

/// The (creation time, id) a page of `listing` starts after.
fn created_after(
    after: Option<&PageToken>,
    listing: Listing,
) -> Result<Option<(Millis, &str)>, String> {
    match after {
        None => Ok(None),
        Some(PageToken::Created(l, at, id)) if *l == listing => Ok(Some((*at, id.as_str()))),
        Some(other) => Err(other.wrong(listing)),
    }
}

/// Items created before (`at`, `id`), newest first, that `keep` accepts: sorted by
/// reference (sweeps and pipelines are few beside runs; nothing is cloned).
fn newest_created<'a, T>(
    items: impl Iterator<Item = &'a T>,
    key: impl Fn(&T) -> (Millis, &str),
    after: Option<(Millis, &str)>,
    mut keep: impl FnMut(&T) -> bool,
) -> Vec<&'a T> {
    let mut kept: Vec<&T> = items
        .filter(|i| after.is_none_or(|a| key(i) < a))
        .filter(|i| keep(i))
        .collect();
    kept.sort_unstable_by(|a, b| key(b).cmp(&key(a)));
    kept
}

impl State {
    /// A page of at most `size` runs that `keep` accepts, newest first, after `after`
    /// (from the newest without it). See the module doc.
    pub fn runs_page(
        &self,
        after: Option<&PageToken>,
        size: usize,
        keep: impl FnMut(&Run) -> bool,
    ) -> Result<Page<'_, Run>, String> {
        let before = match after {
            None => None,
            Some(PageToken::Run(seq)) => Some(*seq),
            Some(other) => return Err(other.wrong(Listing::Runs)),
        };
        Ok(Page::take(
            self.runs_newest_first(before),
            size,
            keep,
            |r| PageToken::Run(r.seq),
        ))
    }

    /// A page of at most `size` sweeps that `keep` accepts, newest first (by creation
    /// time, then id), after `after`.
    pub fn sweeps_page(
        &self,
        after: Option<&PageToken>,
        size: usize,
        keep: impl FnMut(&Sweep) -> bool,
    ) -> Result<Page<'_, Sweep>, String> {
        let after = created_after(after, Listing::Sweeps)?;
        let kept = newest_created(
            self.sweeps.values(),
            |s| (s.created_at, s.id.as_str()),
            after,
            keep,
        );
        Ok(Page::take(
            kept,
            size,
            |_| true,
            |s| PageToken::Created(Listing::Sweeps, s.created_at, s.id.clone()),
        ))
    }

    /// A page of at most `size` pipelines that `keep` accepts, newest first (by creation
    /// time, then id), after `after`.
    pub fn pipelines_page(
        &self,
        after: Option<&PageToken>,
        size: usize,
        keep: impl FnMut(&Pipeline) -> bool,
    ) -> Result<Page<'_, Pipeline>, String> {
        let after = created_after(after, Listing::Pipelines)?;
        let kept = newest_created(
            self.pipelines.values(),
            |p| (p.created_at, p.id.as_str()),
            after,
            keep,
        );
        Ok(Page::take(
            kept,
            size,
            |_| true,
            |p| PageToken::Created(Listing::Pipelines, p.created_at, p.id.clone()),
        ))
    }

    /// A page of at most `size` nodes that `keep` accepts, by name, after `after`.
    pub fn nodes_page(
        &self,
        after: Option<&PageToken>,
        size: usize,
        mut keep: impl FnMut(&Node) -> bool,
    ) -> Result<Page<'_, Node>, String> {
        let after = match after {
            None => None,
            Some(PageToken::Node(name)) => Some(name.as_str()),
            Some(other) => return Err(other.wrong(Listing::Nodes)),
        };
        let mut kept: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| after.is_none_or(|a| n.name.as_str() > a))
            .filter(|n| keep(n))
            .collect();
        kept.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(Page::take(
            kept,
            size,
            |_| true,
            |n| PageToken::Node(n.name.clone()),
        ))
    }
}

#[cfg(test)]
mod tests;
