//! Paged lists (issue 18): `ListRuns` pages newest first with the filters applied on the
//! server, within the workspaces the caller may read; old requests (no page size, no
//! token) are answered as before; `muster run list` shows the newest page and says on
//! stderr how to see more.

use std::collections::BTreeSet;

use muster_client::{Clients, Credentials};
use muster_proto::v1;
use muster_testkit::{DevCluster, access, muster};
use tonic::Code;

/// A compute target with no nodes: runs submitted to it stay queued.
const PARKED: &str = "park-pool";

async fn create_compute(c: &mut Clients, name: &str, workspace: &str) {
    c.compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(v1::ComputeTarget {
                name: name.into(),
                r#type: "attached".into(),
                workspace: workspace.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

/// Submits a run that stays queued; its id.
async fn submit(c: &mut Clients, compute: &str, workspace: &str, experiment: &str) -> String {
    c.runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(v1::RunSpec {
                command: "true".into(),
                compute: compute.into(),
                experiment: experiment.into(),
                instance_count: 1,
                max_attempts: 1,
                workspace: workspace.into(),
                ..Default::default()
            }),
            idempotency_key: None,
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

/// Every page of `request` in turn (`page_size` each); the runs in the order received and
/// the number of pages.
async fn every_page(
    c: &mut Clients,
    request: v1::ListRunsRequest,
    page_size: u32,
) -> (Vec<v1::Run>, usize) {
    let (mut runs, mut pages, mut token) = (Vec::new(), 0, String::new());
    loop {
        let answer = c
            .runs
            .list_runs(v1::ListRunsRequest {
                page_size,
                page_token: token,
                ..request.clone()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(answer.runs.len() <= page_size as usize);
        pages += 1;
        runs.extend(answer.runs);
        if answer.next_page_token.is_empty() {
            return (runs, pages);
        }
        assert!(pages < 1_000, "paging does not end");
        token = answer.next_page_token;
    }
}

fn ids(runs: &[v1::Run]) -> Vec<String> {
    runs.iter().map(|r| r.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_runs_pages_newest_first_with_the_filters_applied_on_the_server() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let mut admin = dev.clients().await.unwrap();
    create_compute(&mut admin, PARKED, "default").await;
    admin
        .access
        .create_workspace(v1::CreateWorkspaceRequest {
            name: "other".into(),
        })
        .await
        .unwrap();
    create_compute(&mut admin, "other-pool", "other").await;

    // 250 runs in two experiments (150 alpha, 100 beta), interleaved, and 10 in another
    // workspace; every tenth alpha run canceled.
    let mut alpha = Vec::new();
    for i in 0..250 {
        if i % 5 < 3 {
            alpha.push(submit(&mut admin, PARKED, "default", "alpha").await);
        } else {
            submit(&mut admin, PARKED, "default", "beta").await;
        }
        if i % 25 == 24 {
            submit(&mut admin, "other-pool", "other", "alpha").await;
        }
    }
    assert_eq!(alpha.len(), 150);
    for id in alpha.iter().step_by(10) {
        admin
            .runs
            .cancel_run(v1::CancelRunRequest {
                id: id.clone(),
                reason: None,
            })
            .await
            .unwrap();
    }

    // Not paged (what clients before paging send): every run, oldest first, as before.
    let legacy = admin
        .runs
        .list_runs(v1::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(legacy.runs.len(), 260);
    assert!(legacy.next_page_token.is_empty());
    let mut newest_first = ids(&legacy.runs);
    newest_first.reverse();

    // Paged: every run once, newest first, whatever the page size.
    for size in [1, 40, 259, 260, 1_000] {
        let (runs, pages) = every_page(&mut admin, v1::ListRunsRequest::default(), size).await;
        assert_eq!(ids(&runs), newest_first, "page size {size}");
        assert_eq!(pages, 260_usize.div_ceil(size as usize), "page size {size}");
    }

    // Filtered on the server: an experiment, with a state, since a time.
    let only_alpha = v1::ListRunsRequest {
        experiment: Some("alpha".into()),
        workspace: Some("default".into()),
        ..Default::default()
    };
    let (runs, pages) = every_page(&mut admin, only_alpha.clone(), 64).await;
    assert_eq!(pages, 3);
    let mut alpha_newest_first = alpha.clone();
    alpha_newest_first.reverse();
    assert_eq!(ids(&runs), alpha_newest_first);
    let canceled = v1::ListRunsRequest {
        state: Some(v1::RunState::Canceled.into()),
        ..only_alpha.clone()
    };
    let (runs, _) = every_page(&mut admin, canceled, 4).await;
    let expected: Vec<String> = alpha.iter().step_by(10).rev().cloned().collect();
    assert_eq!(ids(&runs), expected);
    let since = legacy.runs[200].created_at_ms;
    let (runs, _) = every_page(
        &mut admin,
        v1::ListRunsRequest {
            since_ms: Some(since),
            ..Default::default()
        },
        25,
    )
    .await;
    let want: Vec<String> = legacy
        .runs
        .iter()
        .rev()
        .filter(|r| r.created_at_ms >= since)
        .map(|r| r.id.clone())
        .collect();
    assert!(want.len() >= 60, "{}", want.len());
    assert_eq!(ids(&runs), want);

    // A reader of the default workspace pages through its 250 runs, never the other's.
    let rita = access::user_token(&url, "rita", "reader", Some("default"))
        .await
        .unwrap();
    let mut rita = muster_client::connect(&url, Credentials::bearer(&rita).unwrap())
        .await
        .unwrap();
    let (runs, pages) = every_page(&mut rita, v1::ListRunsRequest::default(), 100).await;
    assert_eq!(pages, 3);
    assert_eq!(runs.len(), 250);
    assert!(
        runs.iter()
            .all(|r| r.spec.as_ref().unwrap().workspace == "default")
    );
    assert_eq!(
        runs.iter().map(|r| &r.id).collect::<BTreeSet<_>>().len(),
        250,
        "each run once"
    );
    let other = rita
        .runs
        .list_runs(v1::ListRunsRequest {
            workspace: Some("other".into()),
            page_size: 10,
            ..Default::default()
        })
        .await;
    assert_eq!(other.unwrap_err().code(), Code::NotFound);

    // `limit` (older clients): the newest N, oldest first, and a token for older runs.
    let limited = admin
        .runs
        .list_runs(v1::ListRunsRequest {
            limit: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut newest_five = newest_first[..5].to_vec();
    newest_five.reverse();
    assert_eq!(ids(&limited.runs), newest_five);
    assert!(!limited.next_page_token.is_empty());
    let older = admin
        .runs
        .list_runs(v1::ListRunsRequest {
            limit: 5,
            page_token: limited.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&older.runs), newest_first[5..10]);

    // A token that is not one: INVALID_ARGUMENT naming the field and what to send.
    for bad in ["garbage", "runs.x", "nodes.a"] {
        let err = admin
            .runs
            .list_runs(v1::ListRunsRequest {
                page_size: 10,
                page_token: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert!(
            err.message().starts_with("page_token: ")
                && err
                    .message()
                    .contains("send the next_page_token of the previous answer"),
            "{bad}: {err:?}"
        );
    }

    // Nodes page by name: the dev server's one local node.
    let nodes = admin
        .compute
        .list_nodes(v1::ListNodesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nodes.nodes.len(), 1);
    assert!(nodes.next_page_token.is_empty());
    let sweeps = admin
        .sweeps
        .list_sweeps(v1::ListSweepsRequest {
            page_size: 10,
            page_token: "runs.4".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(sweeps.code(), Code::InvalidArgument, "{sweeps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_list_shows_the_newest_page_and_says_how_to_see_more() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let dir = tempfile::tempdir().unwrap();
    let mut c = dev.clients().await.unwrap();
    create_compute(&mut c, PARKED, "default").await;
    let mut submitted = Vec::new();
    for i in 0..60 {
        let experiment = if i % 6 == 0 { "few" } else { "many" };
        submitted.push(submit(&mut c, PARKED, "default", experiment).await);
    }
    submitted.reverse();
    let hint =
        "showing the newest 50 runs of more; --all for every run, --page-size N, or --since 2h";

    // The newest 50, newest first, and the hint on stderr.
    let out = muster(&url, dir.path(), &["run", "list", "-o", "json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    let listed: Vec<&str> = listed.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(listed, submitted[..50]);
    assert_eq!(out.stderr.trim(), hint, "{out:?}");
    let table = muster(&url, dir.path(), &["run", "list"]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.contains(&submitted[0]) && !table.stdout.contains(&submitted[50]));
    assert_eq!(table.stderr.trim(), hint, "{table:?}");

    // --all: every run, no hint.
    let out = muster(&url, dir.path(), &["run", "list", "--all", "-o", "json"]).await;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    let listed: Vec<&str> = listed.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(listed, submitted);
    assert_eq!(out.stderr, "", "{out:?}");

    // --page-size N and its older name --limit N.
    for flag in ["--page-size", "--limit"] {
        let out = muster(&url, dir.path(), &["run", "list", flag, "7", "-o", "json"]).await;
        let listed: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(listed.len(), 7, "{flag}: {out:?}");
        assert!(
            out.stderr.contains("showing the newest 7 runs of more"),
            "{flag}: {out:?}"
        );
    }

    // A filter that fits on a page: no hint. --since: a duration ago, or a time.
    let out = muster(
        &url,
        dir.path(),
        &["run", "list", "--experiment", "few", "-o", "json"],
    )
    .await;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(listed.len(), 10);
    assert_eq!(out.stderr, "", "{out:?}");
    let out = muster(
        &url,
        dir.path(),
        &["run", "list", "--since", "1h", "--all", "-o", "json"],
    )
    .await;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(listed.len(), 60, "{out:?}");
    let out = muster(
        &url,
        dir.path(),
        &[
            "run",
            "list",
            "--since",
            "2999-01-01T00:00:00Z",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(out.stdout.trim(), "[]", "{out:?}");
    let out = muster(&url, dir.path(), &["run", "list", "--since", "lately"]).await;
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("\"lately\" is neither a duration ago (2h, 30m, 7d)"),
        "{out:?}"
    );
}
