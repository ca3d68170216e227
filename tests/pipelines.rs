//! Pipelines end to end (issue 6): a 4-step diamond whose steps run on two compute targets
//! and pass data through their outputs; an unchanged resubmission reused step by step; a
//! changed step re-running only itself and what depends on it; a failure failing its
//! dependents; bad pipelines refused before anything is stored.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use muster_agent::NoGpus;
use muster_proto::Word;
use muster_proto::v1;
use muster_testkit::agents::{AgentHandle, agent_config};
use muster_testkit::{DevCluster, muster};
use muster_tests::{
    all_runs, all_urls, cluster_agent, create_attached, rows, submit_id, urls_but, web_page, write,
};
use serde_json::Value;

/// Touches `$MEET_DIR/$1`, then waits (bounded: 60 s) for `$MEET_DIR/$2`: two steps that
/// both pass it were running at the same time.
const MEET: &str = r#"touch "$MEET_DIR/$1"
i=0
while [ ! -e "$MEET_DIR/$2" ]; do
  i=$((i+1))
  if [ $i -gt 1200 ]; then echo "gave up waiting for $2"; exit 9; fi
  sleep 0.05
done
echo "$1 met $2"
"#;

fn diamond(meet_dir: &Path, c_extra: &str, b_tail: &str) -> String {
    format!(
        r#"$schema: https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json
type: pipeline
display_name: diamond
experiment_name: pipelines-e2e
settings:
  default_compute: local
outputs:
  final:
    type: uri_folder
jobs:
  a:
    code: src
    command: echo from-a > ${{{{outputs.data}}}}/a.txt
    outputs:
      data:
        type: uri_folder
  b:
    code: src
    command: sh meet.sh b c && sed 's/^/b saw /' ${{{{inputs.data}}}}/a.txt > ${{{{outputs.out}}}}/b.txt{b_tail}
    environment_variables:
      MEET_DIR: {meet}
    inputs:
      data: ${{{{parent.jobs.a.outputs.data}}}}
    outputs:
      out:
        type: uri_folder
      notes:
        type: uri_folder
  c:
    code: src
    compute: cpu-pool
    command: sh meet.sh c b && sed 's/^/c saw /' ${{{{inputs.data}}}}/a.txt > ${{{{outputs.out}}}}/c.txt{c_extra}
    environment_variables:
      MEET_DIR: {meet}
    inputs:
      data:
        type: uri_folder
        path: ${{{{parent.jobs.a.outputs.data}}}}
    outputs:
      out:
        type: uri_folder
  d:
    command: cat ${{{{inputs.left}}}}/b.txt ${{{{inputs.right}}}}/c.txt && test -d ${{{{inputs.notes}}}} && echo notes-folder-present && echo done > ${{{{outputs.report}}}}/r.txt
    outputs:
      report: ${{{{parent.outputs.final}}}}
    inputs:
      left: ${{{{parent.jobs.b.outputs.out}}}}
      right: ${{{{parent.jobs.c.outputs.out}}}}
      notes: ${{{{parent.jobs.b.outputs.notes}}}}
"#,
        meet = meet_dir.display()
    )
}

/// A dev cluster plus a second compute target, `cpu-pool`, with one in-process agent.
struct Farm {
    dev: DevCluster,
    _agent: AgentHandle,
    _dirs: Vec<tempfile::TempDir>,
}

impl Farm {
    async fn start() -> Farm {
        let dev = DevCluster::start().await.unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let out = muster(
            &dev.url(),
            scratch.path(),
            &["compute", "create", "cpu-pool", "--type", "attached"],
        )
        .await;
        assert_eq!(out.code, 0, "{out:?}");
        let dir = tempfile::tempdir().unwrap();
        let config = agent_config(
            &dev.url(),
            dir.path(),
            "cpu-pool",
            "pool-node",
            Arc::new(NoGpus),
        );
        let agent = AgentHandle::start(&dev.url(), config).await.unwrap();
        Farm {
            dev,
            _agent: agent,
            _dirs: vec![scratch, dir],
        }
    }

    fn url(&self) -> String {
        self.dev.url()
    }
}

/// `muster pipeline submit -f FILE`: the new pipeline's id.
async fn submit(url: &str, project: &Path, file: &str) -> String {
    let id = submit_id(url, project, &["pipeline", "submit", "-f", file]).await;
    assert!(id.starts_with("pl-"), "{id}");
    id
}

/// Polls (bounded: `tries` × 100 ms) until `check` holds on the pipeline; none if it never did.
async fn poll_pipeline(
    url: &str,
    id: &str,
    tries: u32,
    check: impl Fn(&v1::Pipeline) -> bool,
) -> Option<v1::Pipeline> {
    let mut c = muster_testkit::access::clients(url).await.unwrap();
    for _ in 0..tries {
        let p = c
            .pipelines
            .get_pipeline(v1::GetPipelineRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if check(&p) {
            return Some(p);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Polls (bounded: 120 s) until the pipeline ends.
async fn wait_pipeline(url: &str, id: &str) -> v1::Pipeline {
    poll_pipeline(url, id, 1200, |p| {
        matches!(p.state().word(), "completed" | "failed" | "canceled")
    })
    .await
    .unwrap_or_else(|| panic!("pipeline {id} did not end within 120 s"))
}

async fn show_json(url: &str, project: &Path, id: &str) -> Value {
    let out = muster(url, project, &["pipeline", "show", id, "-o", "json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    serde_json::from_str(&out.stdout).unwrap()
}

fn step<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {p}"))
}

async fn logs(url: &str, project: &Path, run: &str) -> String {
    let out = muster(url, project, &["run", "logs", run]).await;
    assert_eq!(out.code, 0, "{out:?}");
    out.stdout
}

fn run_by_id<'a>(runs: &'a [v1::Run], id: &str) -> &'a v1::Run {
    runs.iter().find(|r| r.id == id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_pipeline_passes_data_runs_in_parallel_and_is_reused() {
    let farm = Farm::start().await;
    let url = farm.url();
    let project = tempfile::tempdir().unwrap();
    let meet = tempfile::tempdir().unwrap();
    write(project.path(), "src/meet.sh", MEET);
    write(
        project.path(),
        "pipeline.yml",
        &diamond(meet.path(), "", ""),
    );

    // 1. The first run: every step runs.
    let first = submit(&url, project.path(), "pipeline.yml").await;
    let p = wait_pipeline(&url, &first).await;
    assert_eq!(p.state().word(), "completed", "{p:?}");
    let shown = show_json(&url, project.path(), &first).await;
    assert_eq!(shown["state"], "completed");
    let mut run_of = std::collections::BTreeMap::new();
    for name in ["a", "b", "c", "d"] {
        let s = step(&shown, name);
        assert_eq!(s["state"], "completed", "{shown}");
        assert!(s["reused_from"].is_null(), "{shown}");
        run_of.insert(name, s["run_id"].as_str().unwrap().to_string());
    }
    assert_eq!(step(&shown, "c")["compute"], "cpu-pool");
    assert_eq!(step(&shown, "d")["compute"], "local");
    // Each step is a normal run, visible in `run list`, on its own compute target.
    let runs = all_runs(&url).await;
    assert_eq!(runs.len(), 4, "{runs:?}");
    let c_run = run_by_id(&runs, &run_of["c"]);
    assert_eq!(c_run.spec.as_ref().unwrap().compute, "cpu-pool");
    assert_eq!(
        c_run.attempts[0].placements[0].node_name, "pool-node",
        "{c_run:?}"
    );
    // B and C ran at once: each waited for the other's marker, and their attempts overlap.
    let b_run = run_by_id(&runs, &run_of["b"]);
    let (b, c) = (&b_run.attempts[0], &c_run.attempts[0]);
    assert!(
        b.started_at_ms.unwrap() < c.finished_at_ms.unwrap()
            && c.started_at_ms.unwrap() < b.finished_at_ms.unwrap(),
        "b {b:?} and c {c:?} did not overlap"
    );
    assert!(
        logs(&url, project.path(), &run_of["b"])
            .await
            .contains("b met c")
    );
    assert!(
        logs(&url, project.path(), &run_of["c"])
            .await
            .contains("c met b")
    );
    // D read B's and C's outputs (both from A's), and B's empty declared output folder.
    let d_log = logs(&url, project.path(), &run_of["d"]).await;
    assert!(d_log.contains("b saw from-a"), "{d_log}");
    assert!(d_log.contains("c saw from-a"), "{d_log}");
    assert!(d_log.contains("notes-folder-present"), "{d_log}");
    let d_inputs = step(&shown, "d")["inputs"].as_object().unwrap().clone();
    assert_eq!(d_inputs.len(), 3, "{shown}");
    assert!(d_inputs["left"].as_str().unwrap().ends_with("/out"));
    // The pipeline's output is D's report.
    let final_out = &shown["outputs"][0];
    assert_eq!(
        (&final_out["name"], &final_out["step"]),
        (&Value::from("final"), &Value::from("d")),
        "{shown}"
    );
    assert!(
        final_out["identity"].as_str().unwrap().ends_with("/report"),
        "{shown}"
    );

    // 2. Unchanged: every step is reused, no run executes, and show names the sources.
    let second = submit(&url, project.path(), "pipeline.yml").await;
    assert_ne!(second, first);
    let p = wait_pipeline(&url, &second).await;
    assert_eq!(p.state().word(), "completed", "{p:?}");
    assert_eq!(
        all_runs(&url).await.len(),
        4,
        "a reused pipeline runs nothing"
    );
    let shown = show_json(&url, project.path(), &second).await;
    for name in ["a", "b", "c", "d"] {
        let s = step(&shown, name);
        assert_eq!(s["state"], "reused", "{shown}");
        assert!(s["run_id"].is_null(), "{shown}");
        assert_eq!(s["reused_from"], run_of[name].as_str(), "{shown}");
    }
    let table = muster(&url, project.path(), &["pipeline", "show", &second]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(
        table.stdout.contains("reused") && table.stdout.contains(&run_of["d"]),
        "{table:?}"
    );

    // 3. C's command changed: C and D run again, A and B are reused.
    write(
        project.path(),
        "pipeline.yml",
        &diamond(meet.path(), " && echo c-v2 >> ${{outputs.out}}/c.txt", ""),
    );
    let third = submit(&url, project.path(), "pipeline.yml").await;
    let p = wait_pipeline(&url, &third).await;
    assert_eq!(p.state().word(), "completed", "{p:?}");
    let shown = show_json(&url, project.path(), &third).await;
    assert_eq!(step(&shown, "a")["state"], "reused", "{shown}");
    assert_eq!(step(&shown, "b")["state"], "reused", "{shown}");
    assert_eq!(step(&shown, "c")["state"], "completed", "{shown}");
    assert_eq!(step(&shown, "d")["state"], "completed", "{shown}");
    assert_eq!(all_runs(&url).await.len(), 6, "only C and D ran again");
    let d3 = step(&shown, "d")["run_id"].as_str().unwrap().to_string();
    assert_ne!(d3, run_of["d"]);
    let d_log = logs(&url, project.path(), &d3).await;
    assert!(
        d_log.contains("c-v2") && d_log.contains("b saw from-a"),
        "{d_log}"
    );

    // The list shows all three.
    let list = muster(&url, project.path(), &["pipeline", "list", "-o", "json"]).await;
    let list: Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");

    // The studio: the third pipeline's page shows which steps were reused (and from which
    // run), which ran, and where each input comes from.
    let addr = farm.dev.addr;
    let (code, page) = web_page(addr, &format!("/pipelines/{third}")).await;
    assert_eq!(code, 200, "{page}");
    let steps = rows(&page, "step");
    assert_eq!(steps.len(), 4, "{page}");
    let row = |name: &str| {
        *steps
            .iter()
            .find(|r| r.starts_with(&format!("<td>{name}</td>")))
            .unwrap_or_else(|| panic!("no step {name}: {page}"))
    };
    for name in ["a", "b"] {
        assert!(
            row(name).contains("class=reused>reused")
                && row(name).contains(&format!("reused from <a href=\"/runs/{}\"", run_of[name])),
            "{}",
            row(name)
        );
    }
    assert!(
        row("c").contains("class=completed>completed")
            && row("c").contains("<td>cpu-pool</td>")
            && row("c").contains("data ← a.data"),
        "{}",
        row("c")
    );
    let d = row("d");
    assert!(
        d.contains(&format!("href=\"/runs/{d3}\""))
            && d.contains("left ← b.out")
            && d.contains("right ← c.out")
            && d.contains("notes ← b.notes"),
        "{d}"
    );
    // The first pipeline's C ran on the pool's node: its run page says so.
    let (code, c_page) = web_page(addr, &format!("/runs/{}", run_of["c"])).await;
    assert_eq!(code, 200);
    assert!(
        c_page.contains("<th>nodes</th><td>pool-node</td>")
            && c_page.contains(&format!("href=\"/pipelines/{first}\"")),
        "{c_page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_fails_its_dependents_with_the_reason_and_the_rest_completes() {
    let farm = Farm::start().await;
    let url = farm.url();
    let project = tempfile::tempdir().unwrap();
    let meet = tempfile::tempdir().unwrap();
    write(project.path(), "src/meet.sh", MEET);
    // B fails once C is running.
    write(
        project.path(),
        "pipeline.yml",
        &diamond(meet.path(), "", " && echo boom && exit 3"),
    );
    let id = submit(&url, project.path(), "pipeline.yml").await;
    let p = wait_pipeline(&url, &id).await;
    assert_eq!(p.state().word(), "failed", "{p:?}");
    let shown = show_json(&url, project.path(), &id).await;
    assert_eq!(step(&shown, "a")["state"], "completed", "{shown}");
    assert_eq!(step(&shown, "b")["state"], "failed", "{shown}");
    assert_eq!(step(&shown, "c")["state"], "completed", "{shown}");
    let d = step(&shown, "d");
    assert_eq!(d["state"], "failed", "{shown}");
    assert!(d["run_id"].is_null(), "D never ran: {shown}");
    let reason = d["reason"].as_str().unwrap();
    assert!(
        reason.contains("not run: upstream step b failed"),
        "{reason}"
    );
    assert!(reason.contains('3'), "the reason carries B's: {reason}");
    // The pipeline names the root cause once and what never ran.
    let message = shown["message"].as_str().unwrap();
    assert!(
        message.starts_with("step b failed: ") && message.ends_with("; not run: d"),
        "{message}"
    );
    assert_eq!(all_runs(&url).await.len(), 3, "D never ran");
    // The studio lists the pipeline and shows each failure with its reason.
    let addr = farm.dev.addr;
    let (code, index) = web_page(addr, "/").await;
    assert_eq!(code, 200);
    let listed = rows(&index, "pipeline");
    assert_eq!(listed.len(), 1, "{index}");
    assert!(
        listed[0].contains(&format!("href=\"/pipelines/{id}\""))
            && listed[0].contains("class=failed>failed")
            && listed[0].contains("<td>4/4</td>"),
        "{}",
        listed[0]
    );
    let (code, page) = web_page(addr, &format!("/pipelines/{id}")).await;
    assert_eq!(code, 200, "{page}");
    let steps = rows(&page, "step");
    let b_run = step(&shown, "b")["run_id"].as_str().unwrap();
    let b_row = steps.iter().find(|r| r.starts_with("<td>b</td>")).unwrap();
    assert!(
        b_row.contains("class=failed>failed") && b_row.contains(&format!("href=\"/runs/{b_run}\"")),
        "{b_row}"
    );
    let d_row = steps.iter().find(|r| r.starts_with("<td>d</td>")).unwrap();
    assert!(
        d_row.contains("class=failed>failed") && d_row.contains("upstream step b failed"),
        "{d_row}"
    );
    let (code, missing) = web_page(addr, "/pipelines/pl-nope").await;
    assert_eq!(code, 404);
    assert!(
        missing.contains("pipeline pl-nope does not exist"),
        "{missing}"
    );
    // A finished pipeline cannot be canceled.
    let out = muster(&url, project.path(), &["pipeline", "cancel", &id]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("already ended"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pipelines_are_refused_naming_the_problem_and_store_nothing() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "typo.yml",
        "type: pipeline\njobs:\n  a:\n    comand: echo hi\n",
    );
    let out = muster(
        &url,
        project.path(),
        &["pipeline", "submit", "-f", "typo.yml"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("jobs.a.comand"), "{out:?}");

    let cycle = "type: pipeline
jobs:
  a:
    command: echo a
    inputs:
      x: ${{parent.jobs.b.outputs.o}}
    outputs:
      o:
        type: uri_folder
  b:
    command: echo b
    inputs:
      x: ${{parent.jobs.a.outputs.o}}
    outputs:
      o:
        type: uri_folder
";
    write(project.path(), "cycle.yml", cycle);
    let out = muster(
        &url,
        project.path(),
        &["pipeline", "submit", "-f", "cycle.yml"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("a → b → a") && out.stderr.contains("cycle"),
        "{out:?}"
    );

    // The server refuses them too (it is the enforcer), naming the path.
    let mut c = dev.clients().await.unwrap();
    let e = c
        .pipelines
        .submit_pipeline(v1::SubmitPipelineRequest {
            yaml: cycle.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("cycle"), "{e:?}");
    let e = c
        .pipelines
        .submit_pipeline(v1::SubmitPipelineRequest {
            yaml: "type: pipeline\njobs:\n  a:\n    command: echo\n".into(),
            code: [(
                "zz".to_string(),
                v1::CodeRef {
                    manifest: "0".repeat(64),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("code.zz"), "{e:?}");

    // A step on a compute target that does not exist is named.
    write(
        project.path(),
        "nowhere.yml",
        "type: pipeline\njobs:\n  a:\n    command: echo\n    compute: nowhere\n",
    );
    let out = muster(
        &url,
        project.path(),
        &["pipeline", "submit", "-f", "nowhere.yml"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("jobs.a.compute") && out.stderr.contains("nowhere"),
        "{out:?}"
    );

    // A pipeline YAML given to `run submit` points at `pipeline submit`.
    let out = muster(&url, project.path(), &["run", "submit", "-f", "cycle.yml"]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("muster pipeline submit"), "{out:?}");

    // Nothing was stored.
    let list = muster(&url, project.path(), &["pipeline", "list", "-o", "json"]).await;
    assert_eq!(list.code, 0, "{list:?}");
    assert_eq!(list.stdout.trim(), "[]", "{list:?}");
    assert!(all_runs(&url).await.is_empty());
    let out = muster(&url, project.path(), &["pipeline", "show", "pl-nope"]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("muster pipeline list"), "{out:?}");
}

const HA_PIPELINE: &str = r#"type: pipeline
experiment_name: ha-pipeline
settings:
  default_compute: ha-pool
jobs:
  a:
    command: echo from-a > ${{outputs.data}}/a.txt
    outputs:
      data:
        type: uri_folder
  b:
    command: sleep 4 && sed 's/^/b saw /' ${{inputs.data}}/a.txt > ${{outputs.out}}/b.txt
    inputs:
      data: ${{parent.jobs.a.outputs.data}}
    outputs:
      out:
        type: uri_folder
  c:
    command: sleep 4 && sed 's/^/c saw /' ${{inputs.data}}/a.txt > ${{outputs.out}}/c.txt
    inputs:
      data: ${{parent.jobs.a.outputs.data}}
    outputs:
      out:
        type: uri_folder
  d:
    command: cat ${{inputs.l}}/b.txt ${{inputs.r}}/c.txt
    inputs:
      l: ${{parent.jobs.b.outputs.out}}
      r: ${{parent.jobs.c.outputs.out}}
"#;

/// The pipeline as the first of `urls` that answers sees it.
async fn get_any(urls: &[String], id: &str) -> Option<v1::Pipeline> {
    for url in urls {
        if let Ok(mut c) = muster_testkit::access::clients(url).await
            && let Ok(Ok(p)) = tokio::time::timeout(
                Duration::from_secs(3),
                c.pipelines
                    .get_pipeline(v1::GetPipelineRequest { id: id.into() }),
            )
            .await
        {
            return Some(p.into_inner());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_pipeline_neither_loses_nor_duplicates_a_step() {
    use muster_testkit::cluster::TestCluster;
    let mut cluster = TestCluster::start(3).await.unwrap();
    create_attached(&cluster.urls(), "ha-pool").await;
    let data = tempfile::tempdir().unwrap();
    let _agent = cluster_agent(&cluster, data.path(), "ha-pool", "ha-node").await;

    let leader = cluster.leader().await.unwrap();
    let mut lc = muster_testkit::access::clients(&cluster.url(leader))
        .await
        .unwrap();
    let id = lc
        .pipelines
        .submit_pipeline(v1::SubmitPipelineRequest {
            yaml: HA_PIPELINE.into(),
            idempotency_key: Some("ha-pipeline-1".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    // Kill the leader while B runs (bounded: 60 s).
    let all = all_urls(&cluster);
    let mut b_running = false;
    for _ in 0..600 {
        let p = get_any(&all, &id).await.expect("a server answers");
        if p.steps
            .iter()
            .any(|s| s.name == "b" && s.state().word() == "running")
        {
            b_running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b_running, "step b never ran");
    cluster.kill(leader).await.unwrap();
    let alive = urls_but(&cluster, leader);
    // The new leader carries the pipeline to its end (bounded: 120 s).
    let mut done = None;
    for _ in 0..1200 {
        if let Some(p) = get_any(&alive, &id).await
            && matches!(p.state().word(), "completed" | "failed" | "canceled")
        {
            done = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = done.expect("the pipeline ended after the failover");
    assert_eq!(p.state().word(), "completed", "{p:?}");
    // Exactly one run per step: nothing lost, nothing duplicated.
    let mut c = muster_testkit::access::clients(&alive.join(","))
        .await
        .unwrap();
    let runs = c
        .runs
        .list_runs(v1::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 4, "{runs:?}");
    let mut steps: Vec<String> = runs
        .iter()
        .map(|r| r.spec.as_ref().unwrap().tags["muster.step"].clone())
        .collect();
    steps.sort();
    assert_eq!(steps, vec!["a", "b", "c", "d"]);
    for s in &p.steps {
        let run = s.run_id.as_ref().expect("every step ran");
        assert!(
            runs.iter()
                .any(|r| &r.id == run && r.state().word() == "completed")
        );
    }
    // A retry of the submission with the same key is the same pipeline.
    let again = c
        .pipelines
        .submit_pipeline(v1::SubmitPipelineRequest {
            yaml: HA_PIPELINE.into(),
            idempotency_key: Some("ha-pipeline-1".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceling_a_pipeline_cancels_its_running_step_and_fails_the_rest() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "slow.yml",
        "type: pipeline
jobs:
  first:
    command: sleep 60
    outputs:
      o:
        type: uri_folder
  second:
    command: ls ${{inputs.i}}
    inputs:
      i: ${{parent.jobs.first.outputs.o}}
",
    );
    let id = submit(&url, project.path(), "slow.yml").await;
    let running = poll_pipeline(&url, &id, 300, |p| p.steps[0].state().word() == "running").await;
    assert!(running.is_some(), "the first step never ran");
    let out = muster(&url, project.path(), &["pipeline", "cancel", &id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let p = wait_pipeline(&url, &id).await;
    assert_eq!(p.state().word(), "canceled", "{p:?}");
    assert_eq!(p.steps[0].state().word(), "canceled", "{p:?}");
    assert_eq!(p.steps[1].state().word(), "failed", "{p:?}");
    assert!(
        p.steps[1].reason.as_deref().unwrap().contains("canceled"),
        "{p:?}"
    );
    assert_eq!(all_runs(&url).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_in_containers_read_their_inputs_read_only() {
    use muster_testkit::images::{busybox_image, docker_or_skip};
    let Some(docker) = docker_or_skip().await else {
        return;
    };
    let image = busybox_image(&docker).await.unwrap();
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "boxed.yml",
        &format!(
            "type: pipeline
jobs:
  make:
    command: ls /.dockerenv && echo made-in-a-box > ${{{{outputs.data}}}}/x.txt
    environment:
      image: {image}
    outputs:
      data:
        type: uri_folder
  use:
    command: cat ${{{{inputs.data}}}}/x.txt && (touch ${{{{inputs.data}}}}/y 2>/dev/null && echo inputs-writable || echo inputs-read-only)
    environment:
      image: {image}
    inputs:
      data: ${{{{parent.jobs.make.outputs.data}}}}
"
        ),
    );
    let id = submit(&url, project.path(), "boxed.yml").await;
    let p = wait_pipeline(&url, &id).await;
    assert_eq!(p.state().word(), "completed", "{p:?}");
    let used = p.steps[1].run_id.clone().unwrap();
    let log = logs(&url, project.path(), &used).await;
    assert!(log.contains("made-in-a-box"), "{log}");
    assert!(log.contains("inputs-read-only"), "{log}");
}

/// An Azure ML sample's shape: a command component in its own file with its own code
/// folder, used by two steps, the second consuming the first's output; an inline
/// component with an optional input left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_steps_run_from_a_file_and_inline_and_pass_data() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "components/double/double.sh",
        "mkdir -p \"$2\"; if [ -n \"$1\" ] && [ -f \"$1/n.txt\" ]; then n=$(cat \"$1/n.txt\"); else n=$3; fi; echo $((n * 2)) > \"$2/n.txt\"; echo doubled to $((n * 2))\n",
    );
    write(
        project.path(),
        "components/double.yml",
        r#"$schema: https://azuremlschemas.azureedge.net/latest/commandComponent.schema.json
name: double
version: 1
type: command
display_name: Double a number
inputs:
  previous:
    type: uri_folder
    optional: true
  start:
    type: integer
    default: 3
outputs:
  result:
    type: uri_folder
code: ./double
command: sh double.sh "$[[${{inputs.previous}}]]" ${{outputs.result}} ${{inputs.start}}
"#,
    );
    write(
        project.path(),
        "pipeline.yml",
        r#"type: pipeline
settings:
  default_compute: local
outputs:
  final:
    type: uri_folder
jobs:
  first:
    type: command
    component: ./components/double.yml
    inputs:
      start: 5
  second:
    type: command
    component: ./components/double.yml
    inputs:
      previous: ${{parent.jobs.first.outputs.result}}
    outputs:
      result: ${{parent.outputs.final}}
  report:
    type: command
    component:
      type: command
      inputs:
        n: {type: uri_folder}
        note: {type: string, optional: true}
      command: cat ${{inputs.n}}/n.txt $[[&& echo ${{inputs.note}}]]
    inputs:
      n: ${{parent.jobs.second.outputs.result}}
"#,
    );
    let id = submit(&url, project.path(), "pipeline.yml").await;
    let p = wait_pipeline(&url, &id).await;
    assert_eq!(p.state().word(), "completed", "{p:?}");
    let shown = show_json(&url, project.path(), &id).await;
    let run_of = |s: &str| step(&shown, s)["run_id"].as_str().unwrap().to_string();
    assert!(
        logs(&url, project.path(), &run_of("first"))
            .await
            .contains("doubled to 10")
    );
    assert!(
        logs(&url, project.path(), &run_of("second"))
            .await
            .contains("doubled to 20")
    );
    assert_eq!(
        logs(&url, project.path(), &run_of("report")).await.trim(),
        "20"
    );

    // An unregistered component, and a step input the component lacks: refused, nothing stored.
    write(
        project.path(),
        "registered.yml",
        "type: pipeline\njobs:\n  a:\n    type: command\n    component: azureml:double:1\n",
    );
    let out = muster(
        &url,
        project.path(),
        &["pipeline", "submit", "-f", "registered.yml"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("jobs.a.component")
            && out.stderr.contains("component double:1 does not exist"),
        "{out:?}"
    );
    write(
        project.path(),
        "extra.yml",
        "type: pipeline\njobs:\n  a:\n    type: command\n    component: ./components/double.yml\n    inputs:\n      begin: 1\n",
    );
    let out = muster(
        &url,
        project.path(),
        &["pipeline", "submit", "-f", "extra.yml"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("jobs.a.inputs.begin")
            && out.stderr.contains("its inputs are previous, start"),
        "{out:?}"
    );
    assert_eq!(all_runs(&url).await.len(), 3);
}

/// A component registered once (with its code) runs in pipelines that name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_component_runs_with_its_registered_code() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "components/greet/greet.sh",
        "mkdir -p \"$2\"; echo \"hello $1\" | tee \"$2/said.txt\"\n",
    );
    write(
        project.path(),
        "components/greet.yml",
        "name: greet\nversion: 1\ntype: command\ninputs:\n  who: {type: string, default: world}\noutputs:\n  said: {type: uri_folder}\ncode: ./greet\ncommand: sh greet.sh ${{inputs.who}} ${{outputs.said}}\n",
    );
    let made = muster(
        &url,
        project.path(),
        &["component", "create", "-f", "components/greet.yml"],
    )
    .await;
    assert_eq!(made.code, 0, "{made:?}");
    assert!(
        made.stdout.contains("component: azureml:greet:1"),
        "{made:?}"
    );
    let again = muster(
        &url,
        project.path(),
        &["component", "create", "-f", "components/greet.yml"],
    )
    .await;
    assert_ne!(again.code, 0, "{again:?}");
    assert!(again.stderr.contains("greet:1 already exists"), "{again:?}");
    let shown = muster(&url, project.path(), &["component", "show", "greet@latest"]).await;
    assert!(shown.stdout.contains("command: sh greet.sh"), "{shown:?}");
    // A data asset the pipeline names as its input.
    write(project.path(), "names/who.txt", "ada\n");
    let asset = muster(
        &url,
        project.path(),
        &[
            "data",
            "create",
            "--name",
            "names",
            "--version",
            "1",
            "--path",
            "names",
        ],
    )
    .await;
    assert_eq!(asset.code, 0, "{asset:?}");
    // The pipeline lives elsewhere: the component's code travels from the registry.
    let elsewhere = tempfile::tempdir().unwrap();
    write(
        elsewhere.path(),
        "pipeline.yml",
        "type: pipeline\nsettings:\n  default_compute: local\ninputs:\n  names:\n    path: azureml:names:1\njobs:\n  a:\n    type: command\n    component: azureml:greet:1\n    inputs:\n      who: muster\n  b:\n    type: command\n    component: azureml:greet@latest\n  c:\n    command: cat ${{inputs.n}}/who.txt\n    inputs:\n      n: ${{parent.inputs.names}}\n",
    );
    let id = submit(&url, elsewhere.path(), "pipeline.yml").await;
    let p = wait_pipeline(&url, &id).await;
    assert_eq!(p.state().word(), "completed", "{p:?}");
    let shown = show_json(&url, elsewhere.path(), &id).await;
    let run_of = |s: &str| step(&shown, s)["run_id"].as_str().unwrap().to_string();
    assert_eq!(
        logs(&url, elsewhere.path(), &run_of("a")).await,
        "hello muster\n"
    );
    assert_eq!(
        logs(&url, elsewhere.path(), &run_of("b")).await,
        "hello world\n"
    );
    let missing = muster(&url, elsewhere.path(), &["component", "show", "greet:9"]).await;
    assert!(
        missing.stderr.contains("component greet:9 does not exist"),
        "{missing:?}"
    );
}

/// Local data inputs of a pipeline (the pipeline's own and a step's) travel with the
/// submit as `run submit`'s do: no warning, the nodes need not see the submitter's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_s_local_data_inputs_travel_with_the_submit() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "data/raw/a.csv", "1,2\n");
    write(project.path(), "data/lr.txt", "0.1\n");
    write(
        project.path(),
        "pipelines/p.yml",
        "type: pipeline\nsettings:\n  default_compute: local\ninputs:\n  raw:\n    type: uri_folder\n    path: ../data/raw\njobs:\n  a:\n    command: cat ${{inputs.raw}}/a.csv ${{inputs.lr}}\n    inputs:\n      raw: ${{parent.inputs.raw}}\n      lr:\n        type: uri_file\n        path: ../data/lr.txt\n",
    );
    let out = muster(
        &url,
        project.path(),
        &["pipeline", "submit", "-f", "pipelines/p.yml"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stderr.contains("warning"), "{out:?}");
    assert!(out.stderr.contains("(inputs.raw)"), "{out:?}");
    assert!(out.stderr.contains("(jobs.a.inputs.lr)"), "{out:?}");
    let id = out.stdout.trim().to_string();
    // The submitter's files go away: the step reads the uploaded copies.
    std::fs::remove_dir_all(project.path().join("data")).unwrap();
    let p = wait_pipeline(&url, &id).await;
    assert_eq!(p.state().word(), "completed", "{p:?}");
    let shown = show_json(&url, project.path(), &id).await;
    let run = step(&shown, "a")["run_id"].as_str().unwrap().to_string();
    assert_eq!(logs(&url, project.path(), &run).await, "1,2\n0.1\n");
}
