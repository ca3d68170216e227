//! Sweeps end to end: the leader's controller starts trials as runs (at most
//! max_concurrent_trials at once), ranks them by the metric they log, stops the clearly bad
//! ones early, and survives the loss of the leader without losing or duplicating a trial.

use std::time::Duration;

use muster_proto::Word;
use muster_proto::v1::{self, sweep_service_client::SweepServiceClient};
use muster_testkit::cluster::TestCluster;
use muster_testkit::{DevCluster, muster};
use muster_tests::{
    all_runs, cluster_agent, create_attached, rows, submit_id, urls_but, web_page, write,
};
use serde_json::Value;

/// A trial whose accuracy is `1 - (lr - 0.3)^2`, logged at 3 steps.
const TRIAL: &str = r###"lr="$1"
for step in 1 2 3; do
  acc=$(awk -v lr="$lr" 'BEGIN { printf "%.6f", 1 - (lr - 0.3) * (lr - 0.3) }')
  echo "##muster[metric] name=accuracy value=$acc step=$step"
  sleep 0.2
done
"###;

const SWEEP: &str = r###"$schema: https://azuremlschemas.azureedge.net/latest/sweepJob.schema.json
type: sweep
display_name: lr-sweep
experiment_name: sweeps
trial:
  command: sh trial.sh ${{search_space.lr}}
  code: .
  compute: local
sampling_algorithm: grid
search_space:
  lr:
    type: choice
    values: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
objective:
  primary_metric: accuracy
  goal: maximize
limits:
  max_total_trials: 8
  max_concurrent_trials: 2
"###;

async fn client(url: &str) -> SweepServiceClient<muster_client::Channel> {
    SweepServiceClient::new(muster_testkit::access::channel(url).await.expect("connect"))
}

/// Polls (bounded: `tries` × 100 ms) the sweep on `url` until `check` holds; the last one read.
async fn poll_sweep(
    url: &str,
    id: &str,
    tries: u32,
    check: impl Fn(&v1::Sweep) -> bool,
) -> v1::Sweep {
    let mut c = client(url).await;
    let mut last = v1::Sweep::default();
    for _ in 0..tries {
        last = c
            .get_sweep(v1::GetSweepRequest {
                id: id.into(),
                stale: false,
            })
            .await
            .unwrap()
            .into_inner();
        if check(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Polls (bounded: `limit`) until the sweep has ended, asking each of `urls` in turn
/// (a server that is down or has no leader is skipped).
async fn wait_sweep_done(urls: &[String], id: &str, limit: Duration) -> v1::Sweep {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = None;
    let mut i = 0;
    while tokio::time::Instant::now() < deadline {
        i += 1;
        let url = &urls[i % urls.len()];
        if let Ok(channel) = muster_testkit::access::channel(url).await
            && let mut c = SweepServiceClient::new(channel)
            && let Ok(s) = c
                .get_sweep(v1::GetSweepRequest {
                    id: id.into(),
                    stale: false,
                })
                .await
        {
            let s = s.into_inner();
            if matches!(s.state().word(), "completed" | "timed_out" | "canceled") {
                return s;
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("sweep {id} did not end within {limit:?}: {last:#?}");
}

/// The most attempts of `runs` running at the same moment.
fn max_overlap(runs: &[v1::Run]) -> usize {
    let intervals: Vec<(u64, u64)> = runs
        .iter()
        .flat_map(|r| &r.attempts)
        .filter_map(|a| Some((a.started_at_ms?, a.finished_at_ms?)))
        .collect();
    intervals
        .iter()
        .map(|(start, _)| {
            intervals
                .iter()
                .filter(|(s, f)| s <= start && start < f)
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn trial_runs(runs: &[v1::Run], sweep_id: &str) -> Vec<v1::Run> {
    runs.iter()
        .filter(|r| {
            r.spec
                .as_ref()
                .is_some_and(|s| s.tags.get("muster.sweep").map(String::as_str) == Some(sweep_id))
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_sweep_runs_eight_trials_two_at_a_time_and_ranks_the_best_first() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "trial.sh", TRIAL);
    write(project.path(), "sweep.yml", SWEEP);

    // `run submit` points at `sweep submit`.
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "sweep.yml"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("muster sweep submit"), "{out:?}");

    let out = muster(
        &dev.url(),
        project.path(),
        &[
            "sweep",
            "submit",
            "-f",
            "sweep.yml",
            "--idempotency-key",
            "lr-1",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let submitted: Value = serde_json::from_str(&out.stdout).unwrap();
    let id = submitted["id"].as_str().unwrap().to_string();
    assert_eq!(submitted["state"], "running");
    assert_eq!(submitted["max_concurrent_trials"], 2);
    // A retry with the same key is the same sweep.
    let again = muster(
        &dev.url(),
        project.path(),
        &[
            "sweep",
            "submit",
            "-f",
            "sweep.yml",
            "--idempotency-key",
            "lr-1",
        ],
    )
    .await;
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.stdout.trim(), id);

    let sweep = wait_sweep_done(&[dev.url()], &id, Duration::from_secs(120)).await;
    assert_eq!(sweep.state().word(), "completed", "{sweep:#?}");
    assert_eq!(sweep.trials.len(), 8);

    // Each trial is a normal run; never more than two ran at once.
    let runs = trial_runs(&all_runs(&dev.url()).await, &id);
    assert_eq!(runs.len(), 8, "one run per trial");
    assert_eq!(all_runs(&dev.url()).await.len(), 8, "and no other run");
    assert!(
        runs.iter().all(|r| r.state().word() == "completed"),
        "{runs:#?}"
    );
    let overlap = max_overlap(&runs);
    assert!(
        (1..=2).contains(&overlap),
        "at most 2 trials run at once, saw {overlap}"
    );

    // The best trial is the one the function says: lr = 0.3, accuracy 1.
    let show = muster(
        &dev.url(),
        project.path(),
        &["sweep", "show", &id, "-o", "json"],
    )
    .await;
    assert_eq!(show.code, 0, "{show:?}");
    let v: Value = serde_json::from_str(&show.stdout).unwrap();
    let trials = v["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 8);
    assert_eq!(trials[0]["params"]["lr"], "0.3", "{v:#}");
    assert_eq!(trials[0]["best"].as_f64(), Some(1.0), "{v:#}");
    assert_eq!(v["best_trial"], trials[0]["index"]);
    // Ranked best first: accuracy falls with the distance from 0.3.
    let bests: Vec<f64> = trials.iter().map(|t| t["best"].as_f64().unwrap()).collect();
    assert!(bests.windows(2).all(|w| w[0] >= w[1]), "{bests:?}");
    assert_eq!(trials[7]["params"]["lr"], "0.7", "{v:#}");

    let table = muster(&dev.url(), project.path(), &["sweep", "show", &id]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(
        table.stdout.contains("Best trial:") && table.stdout.contains("lr=0.3"),
        "{table:?}"
    );
    let list = muster(&dev.url(), project.path(), &["sweep", "list", "-o", "json"]).await;
    let list: Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());

    // The studio: the sweep on the front page with its best trial, ...
    let best_run = trials[0]["run_id"].as_str().unwrap();
    let (code, index) = web_page(dev.addr, "/").await;
    assert_eq!(code, 200);
    let row = rows(&index, "sweep")
        .into_iter()
        .find(|r| r.contains(&format!("href=\"/sweeps/{id}\"")))
        .unwrap_or_else(|| panic!("no row of sweep {id}: {index}"));
    assert!(
        row.contains("class=completed>completed")
            && row.contains("maximize accuracy")
            && row.contains("<td>8/8</td>")
            && row.contains(&format!("trial {} (", v["best_trial"]))
            && row.contains(&format!("href=\"/runs/{best_run}\""))
            && row.contains(") 1</td>"),
        "{row}"
    );
    // ... its page: the settings, and the trials ranked as `sweep show` ranks them, ...
    let (code, page) = web_page(dev.addr, &format!("/sweeps/{id}")).await;
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("<th>sampling</th><td>grid")
            && page.contains("8 trials at most, 2 at once")
            && page.contains("<th>early termination</th><td>none"),
        "{page}"
    );
    let ranked: Vec<&str> = rows(&page, "trial");
    assert_eq!(ranked.len(), 8, "{page}");
    for (row, trial) in ranked.iter().zip(trials) {
        let lr = trial["params"]["lr"].as_str().unwrap();
        let run = trial["run_id"].as_str().unwrap();
        assert!(
            row.contains(&format!("lr={lr}<"))
                && row.contains(&format!("href=\"/runs/{run}\""))
                && row.contains(&format!("<td>{}</td>", trial["best"].as_f64().unwrap()))
                && row.contains("class=completed>completed"),
            "rank of lr={lr}: {row}"
        );
    }
    assert!(ranked[0].starts_with("<td>1</td>") && ranked[0].contains("lr=0.3<"));
    // ... an unknown sweep is a 404 that says so, ...
    let (code, missing) = web_page(dev.addr, "/sweeps/sweep-nope").await;
    assert_eq!(code, 404);
    assert!(
        missing.contains("sweep sweep-nope does not exist"),
        "{missing}"
    );
    // ... and a trial's run page its metrics' last values, its attempt and its sweep.
    let lr01 = trials.iter().find(|t| t["params"]["lr"] == "0.1").unwrap();
    let (code, run_page) = web_page(
        dev.addr,
        &format!("/runs/{}", lr01["run_id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        rows(&run_page, "metric"),
        ["<td>accuracy</td><td>0.96</td><td>3</td>"],
        "{run_page}"
    );
    assert!(
        run_page.contains(&format!("href=\"/sweeps/{id}\""))
            && run_page.contains("<h2>Attempt 1</h2>")
            && run_page.contains("<th>end</th><td class=completed>completed (exit 0)"),
        "{run_page}"
    );
}

/// Good trials log 0.9 a few times and finish; bad ones log 0.05 every half second for a
/// minute unless stopped.
const MIXED_TRIAL: &str = r###"q="$1"
if awk -v q="$q" 'BEGIN { exit !(q < 0.5) }'; then steps=120; else steps=4; fi
i=1
while [ $i -le $steps ]; do
  echo "##muster[metric] name=accuracy value=$q step=$i"
  sleep 0.5
  i=$((i+1))
done
"###;

const BANDIT_SWEEP: &str = r###"type: sweep
trial:
  command: sh mixed.sh ${{search_space.q}}
  code: .
  compute: local
sampling_algorithm: grid
search_space:
  q:
    type: choice
    values: [0.9, 0.05, 0.88, 0.04]
objective:
  primary_metric: accuracy
  goal: maximize
early_termination:
  type: bandit
  slack_factor: 0.2
  evaluation_interval: 1
  delay_evaluation: 1
limits:
  max_total_trials: 4
  max_concurrent_trials: 2
"###;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandit_policy_stops_the_clearly_bad_trials_early() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "mixed.sh", MIXED_TRIAL);
    write(project.path(), "sweep.yml", BANDIT_SWEEP);
    let id = submit_id(
        &dev.url(),
        project.path(),
        &["sweep", "submit", "-f", "sweep.yml"],
    )
    .await;
    // Unstopped, the bad trials would take a minute each.
    let sweep = wait_sweep_done(&[dev.url()], &id, Duration::from_secs(100)).await;
    assert_eq!(sweep.state().word(), "completed", "{sweep:#?}");
    assert_eq!(sweep.trials.len(), 4);
    for t in &sweep.trials {
        let bad = t.params["q"].parse::<f64>().unwrap() < 0.5;
        if bad {
            assert!(
                t.early_terminated,
                "trial {} stopped early: {t:#?}",
                t.index
            );
            assert_eq!(t.state().word(), "canceled", "{t:#?}");
            assert!(t.points < 120, "{t:#?}");
        } else {
            assert!(!t.early_terminated, "{t:#?}");
            assert_eq!(t.state().word(), "completed", "{t:#?}");
        }
    }
    let show = muster(&dev.url(), project.path(), &["sweep", "show", &id]).await;
    assert_eq!(show.code, 0, "{show:?}");
    assert_eq!(
        show.stdout
            .matches("stopped early: by the bandit policy")
            .count(),
        2,
        "{}",
        show.stdout
    );
    let best = sweep.best_trial.unwrap();
    assert_eq!(sweep.trials[0].index, best);
    assert_eq!(sweep.trials[0].params["q"], "0.9");
    // The studio's sweep page shows the policy and which trials it stopped, and why.
    let (code, page) = web_page(dev.addr, &format!("/sweeps/{id}")).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("bandit (slack_factor 0.2)"), "{page}");
    let trials = rows(&page, "trial");
    assert_eq!(trials.len(), 4, "{page}");
    assert!(trials[0].contains("q=0.9<"), "best first: {page}");
    let stopped: Vec<&&str> = trials
        .iter()
        .filter(|r| r.contains("stopped early: by the bandit policy"))
        .collect();
    assert_eq!(stopped.len(), 2, "{page}");
    assert!(
        stopped
            .iter()
            .all(|r| r.contains("q=0.05<") || r.contains("q=0.04<")),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canceled_sweep_cancels_its_trials_and_starts_no_more() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "mixed.sh", MIXED_TRIAL);
    write(
        project.path(),
        "sweep.yml",
        &BANDIT_SWEEP
            .replace("[0.9, 0.05, 0.88, 0.04]", "[0.01, 0.02, 0.03, 0.04]")
            .replace("early_termination:\n  type: bandit\n  slack_factor: 0.2\n  evaluation_interval: 1\n  delay_evaluation: 1\n", ""),
    );
    let id = submit_id(
        &dev.url(),
        project.path(),
        &["sweep", "submit", "-f", "sweep.yml"],
    )
    .await;
    poll_sweep(&dev.url(), &id, 300, |s| {
        s.trials.iter().any(|t| t.state().word() == "running")
    })
    .await;
    let out = muster(&dev.url(), project.path(), &["sweep", "cancel", &id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let sweep = wait_sweep_done(&[dev.url()], &id, Duration::from_secs(60)).await;
    assert_eq!(sweep.state().word(), "canceled", "{sweep:#?}");
    assert_eq!(sweep.trials.len(), 2, "no trial starts after the cancel");
    assert!(
        sweep.trials.iter().all(|t| t.state().word() == "canceled"),
        "{sweep:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sweep_input_names_the_field_and_stores_nothing() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "trial.sh", TRIAL);
    let cases = [
        (
            SWEEP.replace("    values: [", "    valuez: ["),
            "search_space.lr.valuez",
        ),
        (
            SWEEP.replace("limits:\n", "limits:\n  max_trials: 3\n"),
            "limits.max_trials",
        ),
        (
            SWEEP.replace(
                "    type: choice\n    values: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]",
                "    type: uniform\n    min_value: 0\n    max_value: 1",
            ),
            "search_space.lr",
        ),
        (
            SWEEP.replace("${{search_space.lr}}", "${{search_space.rate}}"),
            "trial.command",
        ),
    ];
    for (i, (yaml, path)) in cases.iter().enumerate() {
        let file = format!("bad{i}.yml");
        write(project.path(), &file, yaml);
        let out = muster(
            &dev.url(),
            project.path(),
            &["sweep", "submit", "-f", &file],
        )
        .await;
        assert_ne!(out.code, 0, "{out:?}");
        assert!(
            out.stderr.contains(path) && out.stderr.contains(&file),
            "the error names {path}: {out:?}"
        );
    }
    // A grid over a uniform says why.
    let out = muster(
        &dev.url(),
        project.path(),
        &["sweep", "submit", "-f", "bad2.yml"],
    )
    .await;
    assert!(out.stderr.contains("grid"), "{out:?}");
    // v1: an unknown key in the HyperDrive config names its path; a trial is required.
    write(
        project.path(),
        "hdconfig.yml",
        "sampling:\n  type: random\n  parameter_space:\n  - name: --lr\n    expression: uniform\n    values: [0, 1]\nprimary_metric_name: accuracy\nprimary_metric_goal: maximize\nmax_total_runs: 2\nmax_concurrent_run: 1\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &[
            "sweep",
            "submit",
            "--hyperdrive-config",
            "hdconfig.yml",
            "--",
            "sh",
            "trial.sh",
        ],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("max_concurrent_run"), "{out:?}");
    let out = muster(
        &dev.url(),
        project.path(),
        &["sweep", "submit", "--hyperdrive-config", "hdconfig.yml"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("-- COMMAND"), "{out:?}");
    // An unknown sweep is named.
    let out = muster(&dev.url(), project.path(), &["sweep", "show", "sweep-nope"]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("sweep-nope"), "{out:?}");

    // Nothing was stored.
    let list = muster(&dev.url(), project.path(), &["sweep", "list", "-o", "json"]).await;
    assert_eq!(list.code, 0, "{list:?}");
    assert_eq!(list.stdout.trim(), "[]");
    assert!(all_runs(&dev.url()).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_hyperdrive_config_appends_the_parameters_to_the_trial_command() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "train.sh",
        "while [ $# -gt 0 ]; do [ \"$1\" = --lr ] && lr=$2; shift; done\necho \"##muster[metric] name=Accuracy value=$lr\"\n",
    );
    write(
        project.path(),
        "hdconfig.yml",
        "sampling:\n  type: grid\n  parameter_space:\n  - name: --lr\n    expression: choice\n    values: [0.5, 1, 1.5]\npolicy:\n  type: BanditPolicy\n  evaluation_interval: 1\n  slack_factor: 0.2\nprimary_metric_name: Accuracy\nprimary_metric_goal: Maximize\nmax_total_runs: 3\nmax_concurrent_runs: 1\nmax_duration_minutes: 10\n",
    );
    let id = submit_id(
        &dev.url(),
        project.path(),
        &[
            "sweep",
            "submit",
            "--hyperdrive-config",
            "hdconfig.yml",
            "--",
            "sh",
            "train.sh",
        ],
    )
    .await;
    let sweep = wait_sweep_done(&[dev.url()], &id, Duration::from_secs(60)).await;
    assert_eq!(sweep.state().word(), "completed", "{sweep:#?}");
    assert_eq!(sweep.trials.len(), 3);
    let runs = trial_runs(&all_runs(&dev.url()).await, &id);
    let mut commands: Vec<String> = runs
        .iter()
        .map(|r| r.spec.as_ref().unwrap().command.clone())
        .collect();
    commands.sort();
    assert_eq!(
        commands,
        [
            "sh train.sh --lr 0.5",
            "sh train.sh --lr 1",
            "sh train.sh --lr 1.5"
        ]
    );
    assert_eq!(sweep.trials[0].params["--lr"], "1.5", "{sweep:#?}");

    // The trial as a command job file instead of `-- COMMAND`.
    write(
        project.path(),
        "job.yml",
        "command: sh train.sh --seed 1\ncode: .\nexperiment_name: v1-job\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &[
            "sweep",
            "submit",
            "--hyperdrive-config",
            "hdconfig.yml",
            "-f",
            "job.yml",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["experiment"], "v1-job");
    let sweep = wait_sweep_done(&[dev.url()], &id, Duration::from_secs(60)).await;
    assert_eq!(sweep.state().word(), "completed", "{sweep:#?}");
    let best = &sweep.trials[0];
    assert_eq!(best.params["--lr"], "1.5", "{sweep:#?}");
    let runs = trial_runs(&all_runs(&dev.url()).await, &id);
    let run = runs.iter().find(|r| r.id == best.run_id).unwrap();
    assert_eq!(
        run.spec.as_ref().unwrap().command,
        "sh train.sh --seed 1 --lr 1.5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_sweep_finishes_with_exactly_eight_trials() {
    let mut cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "sweep-pool").await;
    let data = tempfile::tempdir().unwrap();
    let _agent = cluster_agent(&cluster, data.path(), "sweep-pool", "sweep-node").await;
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "trial.sh", TRIAL);
    write(
        project.path(),
        "sweep.yml",
        &SWEEP.replace("compute: local", "compute: sweep-pool"),
    );
    let id = submit_id(
        &cluster.urls(),
        project.path(),
        &["sweep", "submit", "-f", "sweep.yml"],
    )
    .await;

    // Mid-sweep (some trials decided, not all), the leader dies.
    let leader = cluster.leader().await.unwrap();
    let decided = poll_sweep(&cluster.url(leader), &id, 600, |s| s.trials.len() >= 3)
        .await
        .trials
        .len();
    assert!((3..8).contains(&decided), "mid-sweep: {decided} trials");
    cluster.kill(leader).await.unwrap();
    let survivors = urls_but(&cluster, leader);

    let sweep = wait_sweep_done(&survivors, &id, Duration::from_secs(180)).await;
    assert_eq!(sweep.state().word(), "completed", "{sweep:#?}");
    assert_eq!(sweep.trials.len(), 8, "{sweep:#?}");
    let mut indexes: Vec<u32> = sweep.trials.iter().map(|t| t.index).collect();
    indexes.sort();
    assert_eq!(indexes, (0..8).collect::<Vec<_>>());
    // Exactly one run per trial: none lost, none duplicated by the new leader.
    let runs = trial_runs(&all_runs(&survivors[0]).await, &id);
    assert_eq!(runs.len(), 8, "{runs:#?}");
    let mut lrs: Vec<String> = sweep
        .trials
        .iter()
        .map(|t| t.params["lr"].clone())
        .collect();
    lrs.sort();
    assert_eq!(
        lrs,
        ["0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"],
        "the grid, each point once"
    );
    assert!(max_overlap(&runs) <= 2);
    let unfinished: Vec<(&str, &str, Option<&String>)> = runs
        .iter()
        .filter(|r| r.state().word() != "completed")
        .map(|r| (r.id.as_str(), r.state().word(), r.message.as_ref()))
        .collect();
    assert!(
        unfinished.is_empty(),
        "every trial completed: {unfinished:?}"
    );
    // The metrics of trials that ended under the old leader survived it: the ranking holds.
    let best = sweep.best_trial.expect("a best trial");
    assert_eq!(sweep.trials[0].index, best, "{sweep:#?}");
    assert_eq!(sweep.trials[0].params["lr"], "0.3", "{sweep:#?}");
}

/// The server is the enforcer: a sweep sent past the CLI's checks is refused with the field
/// named, and a reused idempotency key for another sweep is refused; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_a_bad_sweep_sent_past_the_cli() {
    let dev = DevCluster::start().await.unwrap();
    let spec = muster_core::sweep::parse_sweep_yaml(
        &SWEEP
            .replace("sampling_algorithm: grid", "sampling_algorithm: random")
            .replace(
                "    type: choice\n    values: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]",
                "    type: uniform\n    min_value: 0\n    max_value: 1",
            ),
        "e",
    )
    .unwrap();
    let good = muster_proto::sweep_spec_to_wire(&spec);
    let mut grid = good.clone();
    let mut def: Value = serde_json::from_str(&grid.definition_json).unwrap();
    def["sampling"] = serde_json::json!({"type": "grid"});
    grid.definition_json = def.to_string();
    let mut no_metric = good.clone();
    let mut def: Value = serde_json::from_str(&no_metric.definition_json).unwrap();
    def["objective"]["primary_metric"] = "".into();
    no_metric.definition_json = def.to_string();
    let mut c = client(&dev.url()).await;
    for (spec, field) in [
        (grid, "search_space.lr"),
        (no_metric, "objective.primary_metric"),
    ] {
        let err = c
            .submit_sweep(v1::SubmitSweepRequest {
                spec: Some(spec),
                idempotency_key: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{err:?}");
    }
    assert!(
        c.list_sweeps(v1::ListSweepsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sweeps
            .is_empty()
    );
    // A key names one sweep: its retry returns it, another sweep under it is refused.
    let first = c
        .submit_sweep(v1::SubmitSweepRequest {
            spec: Some(good.clone()),
            idempotency_key: Some("k".into()),
        })
        .await
        .unwrap()
        .into_inner();
    let retry = c
        .submit_sweep(v1::SubmitSweepRequest {
            spec: Some(good.clone()),
            idempotency_key: Some("k".into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.id, retry.id);
    let mut other = good.clone();
    let mut def: Value = serde_json::from_str(&other.definition_json).unwrap();
    def["limits"]["max_total_trials"] = 2.into();
    other.definition_json = def.to_string();
    let err = c
        .submit_sweep(v1::SubmitSweepRequest {
            spec: Some(other),
            idempotency_key: Some("k".into()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("idempotency_key"), "{err:?}");
    let sweeps = c
        .list_sweeps(v1::ListSweepsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sweeps;
    assert_eq!(sweeps.len(), 1);
}

/// `limits.timeout` cancels the active trials, says why on each, and ends the sweep as
/// timed out; a bayesian (TPE) sweep's trials are real runs like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_past_its_timeout_cancels_its_trials_and_ends_timed_out() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "slow.sh",
        "echo \"##muster[metric] name=accuracy value=$1\"\nsleep 60\n",
    );
    write(
        project.path(),
        "sweep.yml",
        "type: sweep\ntrial:\n  command: sh slow.sh ${{search_space.lr}}\n  code: .\nsampling_algorithm: bayesian\nsearch_space:\n  lr:\n    type: uniform\n    min_value: 0\n    max_value: 1\nobjective:\n  primary_metric: accuracy\n  goal: maximize\nlimits:\n  max_total_trials: 10\n  max_concurrent_trials: 2\n  timeout: 3\n",
    );
    let id = submit_id(
        &dev.url(),
        project.path(),
        &["sweep", "submit", "-f", "sweep.yml"],
    )
    .await;
    let sweep = wait_sweep_done(&[dev.url()], &id, Duration::from_secs(60)).await;
    assert_eq!(sweep.state().word(), "timed_out", "{sweep:#?}");
    assert_eq!(sweep.sampling, "bayesian");
    assert_eq!(
        sweep.trials.len(),
        2,
        "the first two never end by themselves"
    );
    for t in &sweep.trials {
        assert_eq!(t.state().word(), "canceled", "{t:#?}");
        assert!(!t.early_terminated, "{t:#?}");
        assert!(
            t.stopped
                .as_deref()
                .is_some_and(|s| s.contains("timeout of 3 s")),
            "{t:#?}"
        );
    }
    let show = muster(&dev.url(), project.path(), &["sweep", "show", &id]).await;
    assert!(
        show.stdout.contains("timed_out") && show.stdout.contains("stopped: the sweep's timeout"),
        "{show:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trials_read_a_data_asset_the_sweep_names() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "base.txt", "base=40\n");
    let made = muster(
        &dev.url(),
        project.path(),
        &[
            "data",
            "create",
            "--name",
            "base",
            "--version",
            "1",
            "--path",
            "base.txt",
            "--type",
            "uri_file",
        ],
    )
    .await;
    assert_eq!(made.code, 0, "{made:?}");
    write(
        project.path(),
        "sweep.yml",
        "type: sweep\ntrial:\n  command: cat ${{inputs.base}} && echo lr=${{search_space.lr}}\n  inputs:\n    base:\n      type: uri_file\n      path: azureml:base@latest\nsampling_algorithm: grid\nsearch_space:\n  lr:\n    type: choice\n    values: [1, 2]\nobjective:\n  primary_metric: accuracy\n  goal: maximize\nlimits:\n  max_total_trials: 2\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["sweep", "submit", "-f", "sweep.yml"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stderr.contains("warning"), "{out:?}");
    let sweep = wait_sweep_done(&[dev.url()], out.stdout.trim(), Duration::from_secs(60)).await;
    for t in &sweep.trials {
        let logs = muster(&dev.url(), project.path(), &["run", "logs", &t.run_id]).await;
        assert!(logs.stdout.starts_with("base=40\nlr="), "{logs:?}");
    }
    assert_eq!(sweep.trials.len(), 2);
}

/// A sweep's local data input is uploaded with the submit and read by every trial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trials_read_a_local_data_input_uploaded_with_the_sweep() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "data/base.txt", "base=40\n");
    write(
        project.path(),
        "sweeps/sweep.yml",
        "type: sweep\ninputs:\n  base:\n    type: uri_folder\n    path: ../data\ntrial:\n  command: cat ${{inputs.base}}/base.txt && echo lr=${{search_space.lr}}\nsampling_algorithm: grid\nsearch_space:\n  lr:\n    type: choice\n    values: [1, 2]\nobjective:\n  primary_metric: accuracy\n  goal: maximize\nlimits:\n  max_total_trials: 2\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["sweep", "submit", "-f", "sweeps/sweep.yml"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stderr.contains("warning"), "{out:?}");
    assert!(out.stderr.contains("(inputs.base)"), "{out:?}");
    std::fs::remove_dir_all(project.path().join("data")).unwrap();
    let sweep = wait_sweep_done(&[dev.url()], out.stdout.trim(), Duration::from_secs(60)).await;
    assert_eq!(sweep.trials.len(), 2);
    for t in &sweep.trials {
        let logs = muster(&dev.url(), project.path(), &["run", "logs", &t.run_id]).await;
        assert!(logs.stdout.starts_with("base=40\nlr="), "{logs:?}");
    }
}
