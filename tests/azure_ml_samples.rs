//! Issue 17's measurement: how many Azure ML files run as written. Every sample in
//! `tests/samples/azure_ml/` and every fixture in `../shared/formats` is submitted to one
//! `muster dev` through the real CLI and followed to its end, the way an Azure ML user would
//! after an admin made compute targets with the names the files use (`cpu-cluster` with four
//! nodes, `gpu-cluster` with two; `serverless` is `local`) and registered what the files name
//! (the `iris` and `cifar-10-example` data assets, the `train_model` component, the `shared`
//! datastore). Curated `azureml:` environments are warned about and the node's own `python`
//! runs the code. The table printed at the end (`-- --nocapture`) is what docs/USAGE.md
//! reports; a sample that stops running fails the test.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use muster_agent::NoGpus;
use muster_testkit::agents::{AgentHandle, agent_config, wait_for_node};
use muster_testkit::{CliOutput as Output, DevCluster, muster};
use muster_tests::write;
use serde_json::Value;

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/azure_ml");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/formats");

/// One file's outcome, for the table.
struct Row {
    file: String,
    changed: &'static str,
    ran: bool,
    detail: String,
}

/// Copies `from` into `to`, recursively.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(Path::new(FIXTURES).join(name)).unwrap()
}

/// Polls `KIND show ID -o json` (bounded: 180 s) until its state is final.
async fn wait_final(url: &str, cwd: &Path, kind: &str, id: &str) -> Value {
    for _ in 0..900 {
        let out = muster(url, cwd, &[kind, "show", id, "-o", "json"]).await;
        if out.code == 0 {
            let v: Value = serde_json::from_str(&out.stdout).unwrap();
            if matches!(
                v["state"].as_str(),
                Some("completed" | "failed" | "canceled")
            ) {
                return v;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{kind} {id} did not end within 180 s");
}

/// A run followed with `--stream`: ran when it exited 0 and printed `expect`.
fn streamed(file: &str, changed: &'static str, out: &Output, expect: &str) -> Row {
    let ran = out.code == 0 && out.stdout.contains(expect);
    Row {
        file: file.to_string(),
        changed,
        ran,
        detail: if ran {
            warnings(out)
        } else {
            format!("exit {}: {}{}", out.code, out.stdout, out.stderr)
        },
    }
}

/// The keys the submit warned about (what muster read but did not act on).
fn warnings(out: &Output) -> String {
    let keys: Vec<String> = out
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("warning: "))
        .map(|w| {
            // `FILE: KEY: why`, `jobs.STEP: KEY: why` or `trial: KEY: why`: the key.
            let mut parts = w
                .split(": ")
                .filter(|p| !p.ends_with(".yml") && !p.ends_with(".runconfig"));
            let first = parts.next().unwrap_or_default();
            if first == "trial" || first.starts_with("jobs.") {
                format!("{first}.{}", parts.next().unwrap_or_default())
            } else {
                first.to_string()
            }
        })
        .collect();
    if keys.is_empty() {
        "no warning".to_string()
    } else {
        format!("warned: {}", keys.join(", "))
    }
}

/// A pipeline or sweep submitted and followed to its end: ran when it completed.
async fn followed(
    url: &str,
    cwd: &Path,
    kind: &str,
    file: &str,
    args: &[&str],
    changed: &'static str,
) -> Row {
    let out = muster(url, cwd, args).await;
    if out.code != 0 {
        return Row {
            file: file.to_string(),
            changed,
            ran: false,
            detail: format!("refused: {}", out.stderr),
        };
    }
    let end = wait_final(url, cwd, kind, out.stdout.trim()).await;
    let ran = end["state"] == "completed";
    Row {
        file: file.to_string(),
        changed,
        ran,
        detail: if ran { warnings(&out) } else { end.to_string() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_ml_files_run_as_written() {
    assert!(
        std::process::Command::new("python")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "the samples run `python` as Azure ML's do: put one on PATH (Debian: python-is-python3)"
    );
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let project_dir = tempfile::tempdir().unwrap();
    let project = project_dir.path();
    copy_tree(Path::new(SAMPLES), project);

    // What an admin and a user would have made before: targets named as the files name them.
    let mut agents = Vec::new();
    let mut dirs = Vec::new();
    for (target, nodes) in [("cpu-cluster", 4), ("gpu-cluster", 2)] {
        let made = muster(
            &url,
            project,
            &["compute", "create", target, "--type", "attached"],
        )
        .await;
        assert_eq!(made.code, 0, "{made:?}");
        for i in 0..nodes {
            let dir = tempfile::tempdir().unwrap();
            let name = format!("{target}-{i}");
            let config = agent_config(&url, dir.path(), target, &name, Arc::new(NoGpus));
            agents.push(AgentHandle::start(&url, config).await.unwrap());
            wait_for_node(&url, &name).await.unwrap();
            dirs.push(dir);
        }
    }
    let share: PathBuf = project.join("share");
    for args in [
        vec!["data", "create", "-f", "data/iris.yml"],
        vec!["component", "create", "-f", "components/train.yml"],
        vec![
            "datastore",
            "create",
            "shared",
            "--path",
            share.to_str().unwrap(),
        ],
    ] {
        let out = muster(&url, project, &args).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
    }

    let mut rows = Vec::new();
    let as_written = "none";
    for (file, expect) in [
        ("command-outputs.yml", "done"),
        ("command-data-asset.yml", "read 4 rows"),
        (
            "command-local-data.yml",
            "labels: ['setosa', 'versicolor', 'virginica']",
        ),
        ("command-datastore.yml", "read 4 rows"),
        ("command-named-output.yml", "done"),
        ("command-reads-named-output.yml", "epochs=2"),
    ] {
        let out = muster(&url, project, &["run", "submit", "-f", file, "--stream"]).await;
        rows.push(streamed(file, as_written, &out, expect));
    }
    for file in ["pipeline-components.yml", "pipeline-local-data.yml"] {
        let args = ["pipeline", "submit", "-f", file];
        rows.push(followed(&url, project, "pipeline", file, &args, as_written).await);
    }
    let args = ["sweep", "submit", "-f", "sweep-data.yml"];
    rows.push(followed(&url, project, "sweep", "sweep-data.yml", &args, as_written).await);
    // The v1 file's docker base image is on a registry this farm cannot reach: the
    // environment changes to the node's own interpreter.
    let runconfig = std::fs::read_to_string(project.join(".azureml/train.runconfig")).unwrap();
    write(
        project,
        ".azureml/train.runconfig",
        &runconfig.replace("    enabled: true", "    enabled: false"),
    );
    let out = muster(&url, project, &["run", "submit", "-c", "train", "--stream"]).await;
    rows.push(streamed(
        ".azureml/train.runconfig",
        "environment: docker.enabled false (no registry)",
        &out,
        "done",
    ));

    // The fixtures, each in a project of its own with stand-ins for its scripts.
    let src = Path::new(SAMPLES).join("src");
    let distributed = tempfile::tempdir().unwrap();
    let d = distributed.path();
    write(
        d,
        "job.yml",
        &fixture("v2_command_job_pytorch_distributed.yml"),
    );
    copy_tree(&src, &d.join("src"));
    write(d, "cifar/data_batch_1.bin", "0123\n");
    let made = muster(
        &url,
        d,
        &[
            "data",
            "create",
            "--name",
            "cifar-10-example",
            "--version",
            "1",
            "--path",
            "cifar",
        ],
    )
    .await;
    assert_eq!(made.code, 0, "{made:?}");
    let out = muster(&url, d, &["run", "submit", "-f", "job.yml", "--stream"]).await;
    rows.push(streamed(
        "v2_command_job_pytorch_distributed.yml",
        as_written,
        &out,
        "rank 1 of 2",
    ));

    let sweep = tempfile::tempdir().unwrap();
    write(sweep.path(), "sweep.yml", &fixture("v2_sweep_job.yml"));
    copy_tree(&src, &sweep.path().join("src"));
    let args = ["sweep", "submit", "-f", "sweep.yml"];
    rows.push(
        followed(
            &url,
            sweep.path(),
            "sweep",
            "v2_sweep_job.yml",
            &args,
            as_written,
        )
        .await,
    );

    let hd = tempfile::tempdir().unwrap();
    write(hd.path(), "hdconfig.yml", &fixture("v1_hdconfig.yml"));
    copy_tree(&src, hd.path());
    let args = [
        "sweep",
        "submit",
        "--hyperdrive-config",
        "hdconfig.yml",
        "--",
        "python",
        "hyperdrive.py",
    ];
    rows.push(
        followed(
            &url,
            hd.path(),
            "sweep",
            "v1_hdconfig.yml",
            &args,
            as_written,
        )
        .await,
    );

    let mnist = tempfile::tempdir().unwrap();
    let m = mnist.path();
    write(
        m,
        ".azureml/mnist.runconfig",
        &fixture("mlops_mnist.runconfig.yml"),
    );
    write(
        m,
        ".azureml/conda_dependencies.yml",
        "name: project_environment\ndependencies:\n- python=3.11\n",
    );
    write(
        m,
        "train.py",
        "import sys\nprint('mnist stand-in', ' '.join(sys.argv[1:]))\n",
    );
    let out = muster(&url, m, &["run", "submit", "-c", "mnist", "--stream"]).await;
    rows.push(streamed(
        "mlops_mnist.runconfig.yml",
        as_written,
        &out,
        "mnist stand-in --data-folder",
    ));

    let compute = tempfile::tempdir().unwrap();
    write(
        compute.path(),
        "cluster.yml",
        &fixture("v2_compute_cluster_low_priority.yml"),
    );
    let out = muster(
        &url,
        compute.path(),
        &["compute", "create", "-f", "cluster.yml"],
    )
    .await;
    let shown = muster(
        &url,
        compute.path(),
        &["compute", "show", "low-pri-example"],
    )
    .await;
    rows.push(Row {
        file: "v2_compute_cluster_low_priority.yml".into(),
        changed: as_written,
        ran: out.code == 0 && shown.stdout.contains("low_priority"),
        detail: warnings(&out),
    });
    // Azure ML's cluster autoscales; without a provisioner muster's does not, and says so.
    assert!(
        out.stderr.contains(
            "warning: provisioner: compute target \"low-pri-example\" has the static provisioner"
        ),
        "{out:?}"
    );

    let ran = rows.iter().filter(|r| r.ran).count();
    let unchanged = rows
        .iter()
        .filter(|r| r.ran && r.changed == as_written)
        .count();
    println!("| file | ran | changed | notes |\n|---|---|---|---|");
    for r in &rows {
        println!(
            "| `{}` | {} | {} | {} |",
            r.file,
            if r.ran { "yes" } else { "no" },
            r.changed,
            r.detail.replace('\n', " ")
        );
    }
    println!(
        "{ran} of {} files ran; {unchanged} of them as written (compute and environment names kept)",
        rows.len()
    );
    let failed: Vec<_> = rows.iter().filter(|r| !r.ran).map(|r| &r.file).collect();
    assert!(failed.is_empty(), "did not run: {failed:?}");
    drop(agents);
}
