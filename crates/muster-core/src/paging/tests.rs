//! Paging: the index by submission number, page tokens, and that paging through every
//! page yields every matching item once, in order.

use std::cell::Cell;
use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::compute::{ComputeKind, ComputeSpec, Tier};
use crate::resources::Capacity;
use crate::spec::RunSpec;
use crate::state::Command;

const COMPUTES: [&str; 2] = ["cpu-pool", "gpu-pool"];
const EXPERIMENTS: [&str; 3] = ["mnist", "cifar", "imagenet"];

/// A state with both compute targets.
fn state() -> State {
    let mut s = State::default();
    for name in COMPUTES {
        s.apply(&Command::CreateCompute {
            spec: ComputeSpec::new(name, ComputeKind::Attached),
            at: 1,
        })
        .unwrap();
    }
    s
}

fn submit(s: &mut State, id: &str, experiment: &str, compute: &str, at: Millis) {
    let mut spec = RunSpec::new("python train.py");
    spec.experiment = experiment.into();
    spec.compute = compute.into();
    s.apply(&Command::SubmitRun {
        run_id: id.into(),
        spec: Box::new(spec),
        idempotency_key: None,
        at,
    })
    .unwrap();
}

fn cancel(s: &mut State, id: &str, at: Millis) {
    s.apply(&Command::CancelRun {
        run_id: id.into(),
        reason: None,
        at,
    })
    .unwrap();
}

/// `n` runs `run-0` … in submission order, alternating experiments and computes.
fn with_runs(n: usize) -> State {
    let mut s = state();
    for i in 0..n {
        submit(
            &mut s,
            &format!("run-{i}"),
            EXPERIMENTS[i % 3],
            COMPUTES[i % 2],
            1_000 + i as u64,
        );
    }
    s
}

fn ids(runs: &[&Run]) -> Vec<String> {
    runs.iter().map(|r| r.id.clone()).collect()
}

/// Every page from the first, following the tokens; the runs in the order received.
fn all_pages(s: &State, size: usize, filter: &RunFilter) -> (Vec<String>, usize) {
    let (mut seen, mut pages, mut after) = (Vec::new(), 0, None);
    loop {
        let page = s
            .runs_page(after.as_ref(), size, |r| filter.matches(r))
            .unwrap();
        assert!(page.items.len() <= size, "a page holds at most {size}");
        pages += 1;
        seen.extend(ids(&page.items));
        match page.next {
            // The token goes through its text, as a client carries it.
            Some(t) => {
                assert!(!page.items.is_empty(), "a page with a next token has items");
                after = Some(PageToken::parse(Listing::Runs, &t.to_string()).unwrap());
            }
            None => return (seen, pages),
        }
    }
}

/// What paging must yield: the matching runs, newest first, by a plain sort.
fn expected(s: &State, filter: &RunFilter) -> Vec<String> {
    let mut runs: Vec<&Run> = s.runs.values().filter(|r| filter.matches(r)).collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.seq));
    ids(&runs)
}

#[test]
fn a_page_request_reads_page_size_token_and_limit() {
    use PageRequest::*;
    assert_eq!(PageRequest::of(0, "", 0), Legacy(None));
    assert_eq!(PageRequest::of(0, "", 7), Legacy(Some(7)));
    // Legacy answers are not capped: old clients asked for any number.
    assert_eq!(PageRequest::of(0, "", 5_000).size(), 5_000);
    assert_eq!(PageRequest::of(0, "", 0).size(), usize::MAX);
    assert_eq!(PageRequest::of(50, "", 0), Paged(50));
    assert_eq!(
        PageRequest::of(50, "", 7),
        Paged(50),
        "page_size wins over limit"
    );
    assert_eq!(
        PageRequest::of(0, "runs.9", 7),
        Paged(7),
        "a token with a limit"
    );
    assert_eq!(PageRequest::of(0, "runs.9", 0), Paged(DEFAULT_PAGE_SIZE));
    assert_eq!(
        PageRequest::of(5_000, "", 0),
        Paged(MAX_PAGE_SIZE),
        "clamped"
    );
    assert!(PageRequest::of(0, "", 3).oldest_first());
    assert!(!PageRequest::of(3, "", 0).oldest_first());
}

#[test]
fn tokens_round_trip_and_a_bad_one_says_what_to_send() {
    for (listing, token) in [
        (Listing::Runs, PageToken::Run(41)),
        (
            Listing::Sweeps,
            PageToken::Created(Listing::Sweeps, 1_767_225_600_000, "sweep-ab.12".into()),
        ),
        (
            Listing::Pipelines,
            PageToken::Created(Listing::Pipelines, 3, "pl-1".into()),
        ),
        (Listing::Nodes, PageToken::Node("gpu-07".into())),
    ] {
        let text = token.to_string();
        assert_eq!(PageToken::parse(listing, &text), Ok(token), "{text}");
    }
    assert_eq!(PageToken::parse_opt(Listing::Runs, ""), Ok(None));
    for (listing, bad, says) in [
        (Listing::Runs, "runs.x", "malformed page token \"runs.x\""),
        (Listing::Runs, "runs.", "malformed page token"),
        (
            Listing::Runs,
            "41",
            "\"41\" is not a page token of the runs list",
        ),
        (
            Listing::Runs,
            "nodes.a",
            "not a page token of the runs list",
        ),
        (Listing::Sweeps, "sweeps.12", "malformed page token"),
        (Listing::Sweeps, "sweeps.12.", "malformed page token"),
        (
            Listing::Sweeps,
            "pipelines.1.p",
            "not a page token of the sweeps list",
        ),
        (Listing::Nodes, "nodes.", "malformed page token"),
    ] {
        let err = PageToken::parse(listing, bad).unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
        assert!(
            err.contains("send the next_page_token of the previous answer"),
            "{bad}: {err}"
        );
    }
    let long = "x".repeat(1_000);
    let err = PageToken::parse(Listing::Runs, &long).unwrap_err();
    assert!(err.len() < 300, "a long token is not quoted whole: {err}");
    // A token of one listing given to another's page.
    let err = with_runs(1)
        .runs_page(Some(&PageToken::Node("a".into())), 5, |_| true)
        .unwrap_err();
    assert!(err.contains("a page token of the nodes list"), "{err}");
}

#[test]
fn apply_keeps_the_index_and_a_snapshot_neither_stores_nor_needs_it() {
    let s = with_runs(5);
    s.sanity_check().unwrap();
    let newest: Vec<_> = s.runs_newest_first(None).map(|r| r.id.clone()).collect();
    assert_eq!(newest, ["run-4", "run-3", "run-2", "run-1", "run-0"]);
    let older: Vec<_> = s.runs_newest_first(Some(3)).map(|r| r.id.clone()).collect();
    assert_eq!(older, ["run-2", "run-1", "run-0"]);
    // The snapshot format is what it was: runs by id, no index.
    let snapshot = s.to_snapshot();
    let json: serde_json::Value = serde_json::from_slice(&snapshot).unwrap();
    assert!(json.get("by_seq").is_none(), "{json}");
    let restored = State::from_snapshot(&snapshot).unwrap();
    restored.sanity_check().unwrap();
    assert_eq!(restored, s);
    assert_eq!(
        restored
            .runs_newest_first(None)
            .map(|r| r.id.clone())
            .collect::<Vec<_>>(),
        newest
    );
    // A snapshot of a version before the index (written by hand, as that version did).
    let mut run = serde_json::to_value(&s.runs["run-1"]).unwrap();
    run["seq"] = 7.into();
    let old = serde_json::json!({
        "computes": json["computes"], "nodes": {}, "runs": {"run-1": run},
        "queue": [], "idempotency": {}, "next_seq": 8,
    });
    let mut old = State::from_snapshot(old.to_string().as_bytes()).unwrap();
    let page = old.runs_page(None, 10, |_| true).unwrap();
    assert_eq!(ids(&page.items), ["run-1"]);
    // New runs go on from next_seq, newest first.
    submit(&mut old, "run-new", "mnist", "cpu-pool", 9);
    let page = old.runs_page(None, 10, |_| true).unwrap();
    assert_eq!(ids(&page.items), ["run-new", "run-1"]);
}

#[test]
fn the_first_page_of_many_runs_looks_at_the_page_and_one_more() {
    let s = with_runs(10_000);
    let looked = Cell::new(0);
    let page = s
        .runs_page(None, 50, |_| {
            looked.set(looked.get() + 1);
            true
        })
        .unwrap();
    assert_eq!(page.items.len(), 50);
    assert_eq!(page.items[0].id, "run-9999");
    assert_eq!(page.items[49].id, "run-9950");
    assert_eq!(page.next, Some(PageToken::Run(9950)));
    assert_eq!(looked.get(), 51);
    // The next page starts right after it.
    let next = s.runs_page(page.next.as_ref(), 50, |_| true).unwrap();
    assert_eq!(next.items[0].id, "run-9949");
    // The last page says so: no token.
    let last = s.runs_page(Some(&PageToken::Run(3)), 50, |_| true).unwrap();
    assert_eq!(ids(&last.items), ["run-2", "run-1", "run-0"]);
    assert_eq!(last.next, None);
    // A page that ends exactly at the oldest run has no token either.
    let exact = s.runs_page(Some(&PageToken::Run(3)), 3, |_| true).unwrap();
    assert_eq!((exact.items.len(), exact.next), (3, None));
}

#[test]
fn filters_apply_while_paging() {
    let mut s = with_runs(30);
    for i in (0..30).step_by(4) {
        cancel(&mut s, &format!("run-{i}"), 5_000);
    }
    let mnist = RunFilter {
        experiment: Some("mnist".into()),
        ..RunFilter::default()
    };
    let (seen, pages) = all_pages(&s, 4, &mnist);
    assert_eq!(seen, expected(&s, &mnist));
    assert_eq!(seen.len(), 10);
    assert_eq!(pages, 3);
    let canceled_on_cpu = RunFilter {
        state: Some(RunState::Canceled),
        compute: Some("cpu-pool".into()),
        ..RunFilter::default()
    };
    let (seen, _) = all_pages(&s, 2, &canceled_on_cpu);
    assert_eq!(
        seen,
        [
            "run-28", "run-24", "run-20", "run-16", "run-12", "run-8", "run-4", "run-0"
        ]
    );
    // `since`: submitted at or after.
    let since = RunFilter {
        since: Some(1_027),
        ..RunFilter::default()
    };
    assert_eq!(all_pages(&s, 100, &since).0, ["run-29", "run-28", "run-27"]);
    // Nothing matches: one empty page, no token.
    let none = RunFilter {
        experiment: Some("nope".into()),
        ..RunFilter::default()
    };
    assert_eq!(all_pages(&s, 10, &none), (Vec::new(), 1));
}

/// The state never removes a run today (no retention, no delete); if runs are taken out
/// of `runs` (by a future retention command, or by hand as here), paging skips the gaps
/// and still yields every remaining run once, newest first.
#[test]
fn runs_taken_out_leave_gaps_that_paging_skips() {
    let mut s = with_runs(20);
    for i in [0, 5, 6, 7, 19] {
        s.runs.remove(&format!("run-{i}"));
    }
    let all = RunFilter::default();
    for size in 1..=16 {
        let (seen, _) = all_pages(&s, size, &all);
        assert_eq!(seen, expected(&s, &all), "page size {size}");
        assert_eq!(seen.len(), 15);
        assert_eq!(seen[0], "run-18");
    }
    // A token naming a run that is gone still says where the next page starts.
    let page = s.runs_page(Some(&PageToken::Run(7)), 2, |_| true).unwrap();
    assert_eq!(ids(&page.items), ["run-4", "run-3"]);
}

#[test]
fn sweeps_and_pipelines_go_newest_first_by_creation_then_id() {
    struct Item {
        at: Millis,
        id: String,
    }
    let items: Vec<Item> = [(5, "b"), (5, "a"), (9, "c"), (1, "z"), (5, "c")]
        .into_iter()
        .map(|(at, id)| Item { at, id: id.into() })
        .collect();
    fn key(i: &Item) -> (Millis, &str) {
        (i.at, i.id.as_str())
    }
    let order = |after: Option<(Millis, &str)>| {
        newest_created(items.iter(), key, after, |_| true)
            .into_iter()
            .map(|i| i.id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(order(None), ["c", "c", "b", "a", "z"]);
    assert_eq!(order(Some((5, "b"))), ["a", "z"]);
    assert_eq!(order(Some((9, "c"))), ["c", "b", "a", "z"]);
    assert!(created_after(Some(&PageToken::Run(1)), Listing::Sweeps).is_err());
    let empty = State::default();
    let page = empty.sweeps_page(None, 10, |_| true).unwrap();
    assert!(page.items.is_empty() && page.next.is_none());
    let token = PageToken::Created(Listing::Sweeps, 1, "s".into());
    assert!(empty.pipelines_page(Some(&token), 10, |_| true).is_err());
}

#[test]
fn nodes_page_by_name() {
    let mut s = state();
    for (id, name) in [
        ("n1", "gpu-b"),
        ("n2", "gpu-a"),
        ("n3", "cpu-z"),
        ("n4", "gpu-c"),
    ] {
        s.apply(&Command::RegisterNode {
            node_id: id.into(),
            name: name.into(),
            compute: "gpu-pool".into(),
            capacity: Capacity::default(),
            labels: BTreeMap::new(),
            tier: Tier::Dedicated,
            address: "10.0.0.1".into(),
            at: 2,
        })
        .unwrap();
    }
    let names = |p: &Page<'_, Node>| p.items.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
    let first = s.nodes_page(None, 2, |_| true).unwrap();
    assert_eq!(names(&first), ["cpu-z", "gpu-a"]);
    assert_eq!(first.next, Some(PageToken::Node("gpu-a".into())));
    let second = s.nodes_page(first.next.as_ref(), 2, |_| true).unwrap();
    assert_eq!(names(&second), ["gpu-b", "gpu-c"]);
    assert_eq!(second.next, None);
    let gpus = s
        .nodes_page(None, 10, |n| n.name.starts_with("gpu"))
        .unwrap();
    assert_eq!(names(&gpus), ["gpu-a", "gpu-b", "gpu-c"]);
}

/// A run of the property test: its experiment, compute, submission time, whether it is
/// canceled, whether it is then taken out of the state by hand.
fn run_params() -> impl Strategy<Value = (usize, usize, u64, bool, bool)> {
    (
        0..3usize,
        0..2usize,
        0..50u64,
        any::<bool>(),
        prop::bool::weighted(0.1),
    )
}

fn filter() -> impl Strategy<Value = RunFilter> {
    (
        prop::option::of(0..4usize),
        prop::option::of(prop::bool::ANY),
        prop::option::of(0..2usize),
        prop::option::of(0..55u64),
    )
        .prop_map(|(e, canceled, c, since)| RunFilter {
            experiment: e.map(|e| EXPERIMENTS.get(e).copied().unwrap_or("nope").to_string()),
            state: canceled.map(|c| {
                if c {
                    RunState::Canceled
                } else {
                    RunState::Queued
                }
            }),
            compute: c.map(|c| COMPUTES[c].to_string()),
            since,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Paging through every page, with any page size and any filter, yields every
    /// matching run exactly once, newest first; so does a state with runs taken out.
    #[test]
    fn every_page_in_turn_yields_every_matching_run_once_newest_first(
        runs in proptest::collection::vec(run_params(), 0..120),
        filter in filter(),
        size in 1..130usize,
    ) {
        let mut s = state();
        let mut taken_out = Vec::new();
        for (i, (e, c, at, canceled, take_out)) in runs.iter().enumerate() {
            let id = format!("run-{i:03}");
            submit(&mut s, &id, EXPERIMENTS[*e], COMPUTES[*c], *at);
            if *canceled {
                cancel(&mut s, &id, at + 1);
            }
            if *take_out {
                taken_out.push(id);
            }
        }
        prop_assert!(s.sanity_check().is_ok());
        for id in &taken_out {
            s.runs.remove(id);
        }
        let want = expected(&s, &filter);
        let (seen, pages) = all_pages(&s, size, &filter);
        prop_assert_eq!(&seen, &want);
        prop_assert_eq!(pages, want.len().div_ceil(size).max(1));
        // Legacy answers (every run, or the newest N) are the same runs.
        let every = s.runs_page(None, usize::MAX, |r| filter.matches(r)).unwrap();
        prop_assert_eq!(ids(&every.items), want.clone());
        prop_assert!(every.next.is_none());
    }
}
