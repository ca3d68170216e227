//! Azure ML job files as written (issue 17): declared outputs, a job without `code:`,
//! keys muster reads but does not act on, and jobs that can never fit their target.

use muster_proto::Word;
use muster_testkit::{DevCluster, muster};
use muster_tests::{submit_id, wait_done, write};

/// A command job shaped like Azure ML's samples: a model folder, a report file and an
/// untyped output, no `code:`, and an `instance_type` that sizes nothing on `local`.
const JOB: &str = r#"$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json
type: command
command: >-
  test -d ${{outputs.model}} && test -d ${{outputs.extra}} && test ! -e ${{outputs.report}} &&
  echo weights > ${{outputs.model}}/weights.txt &&
  echo accuracy=0.9 > ${{outputs.report}} &&
  ls -a
outputs:
  model:
    type: uri_folder
  report:
    type: uri_file
  extra:
resources:
  instance_type: Standard_NC6
display_name: outputs-sample
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_outputs_exist_before_the_command_and_download_one_by_one() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "job.yml", JOB);
    // Files beside the job that a snapshot would carry: without `code:` none travel.
    write(project.path(), "secret-notes.txt", "not for the run");

    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "job.yml"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("resources.instance_type: Standard_NC6 sizes nothing: compute target \"local\" has no size"),
        "{out:?}"
    );
    assert!(
        !out.stderr.contains("Uploaded"),
        "no code, no snapshot: {out:?}"
    );
    let id = out.stdout.trim().to_string();
    let run = wait_done(&dev.url(), &id).await;
    assert_eq!(run.state().word(), "completed", "{run:?}");
    let spec = run.spec.clone().unwrap();
    assert!(spec.code.is_none(), "{spec:?}");
    assert_eq!(spec.warnings.len(), 1, "{spec:?}");

    // The run's working directory held only what muster made: no snapshot of the project.
    let logs = muster(&dev.url(), project.path(), &["run", "logs", &id]).await;
    assert!(!logs.stdout.contains("secret-notes.txt"), "{logs:?}");
    assert!(logs.stdout.contains("outputs"), "{logs:?}");

    // `run show` names the outputs and the warning.
    let show = muster(&dev.url(), project.path(), &["run", "show", &id]).await;
    assert!(
        show.stdout
            .contains("outputs     extra (uri_folder), model (uri_folder), report (uri_file)"),
        "{show:?}"
    );
    assert!(
        show.stdout.contains("warning     resources.instance_type"),
        "{show:?}"
    );

    // One output at a time, without the logs.
    let download = |name: &'static str| {
        let (url, cwd, id) = (dev.url(), project.path().to_path_buf(), id.clone());
        async move {
            let to = cwd.join(format!("{name}-only"));
            let args = [
                "run",
                "download",
                &id,
                "--output-name",
                name,
                "--to",
                to.to_str().unwrap(),
            ];
            let dl = muster(&url, &cwd, &args).await;
            assert_eq!(dl.code, 0, "{dl:?}");
            to
        }
    };
    let to = download("model").await;
    assert_eq!(
        std::fs::read_to_string(to.join("outputs/model/weights.txt")).unwrap(),
        "weights\n"
    );
    assert!(!to.join("outputs/report").exists());
    assert!(!to.join("logs").exists());
    let to = download("report").await;
    assert_eq!(
        std::fs::read_to_string(to.join("outputs/report")).unwrap(),
        "accuracy=0.9\n"
    );
    let bad = muster(
        &dev.url(),
        project.path(),
        &["run", "download", &id, "--output-name", "weights"],
    )
    .await;
    assert_ne!(bad.code, 0, "{bad:?}");
    assert!(
        bad.stderr
            .contains("declares no output \"weights\"; its outputs are extra, model, report"),
        "{bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_its_target_can_never_hold_is_refused_at_submit_and_nothing_queues() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "cluster.yml",
        "name: gpu-pool\ntype: amlcompute\nmin_instances: 0\nmax_instances: 2\nprovisioner:\n  type: command\n  scale_up: 'true'\n  scale_down: 'true'\n",
    );
    let created = muster(
        &dev.url(),
        project.path(),
        &["compute", "create", "-f", "cluster.yml"],
    )
    .await;
    assert_eq!(created.code, 0, "{created:?}");
    write(
        project.path(),
        "job.yml",
        "command: hostname\ncompute: azureml:gpu-pool\nresources:\n  instance_count: 1000\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "job.yml"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("resources.instance_count")
            && out.stderr.contains("the run spans 1000 nodes")
            && out.stderr.contains("at most 2 (max_instances)"),
        "{out:?}"
    );
    assert!(muster_tests::all_runs(&dev.url()).await.is_empty());
    // What fits is taken.
    let id = submit_id(
        &dev.url(),
        project.path(),
        &[
            "run",
            "submit",
            "--compute",
            "gpu-pool",
            "--instance-count",
            "2",
            "--",
            "true",
        ],
    )
    .await;
    assert!(id.starts_with("run-"), "{id}");

    // Once a node of the provisioned target has joined, more GPUs than it has never fit.
    let dir = tempfile::tempdir().unwrap();
    let config = muster_testkit::agents::agent_config(
        &dev.url(),
        dir.path(),
        "gpu-pool",
        "pool-node",
        std::sync::Arc::new(muster_agent::NoGpus),
    );
    let _agent = muster_testkit::agents::AgentHandle::start(&dev.url(), config)
        .await
        .unwrap();
    muster_testkit::agents::wait_for_node(&dev.url(), "pool-node")
        .await
        .unwrap();
    let gpus = [
        "run",
        "submit",
        "--compute",
        "gpu-pool",
        "--gpus",
        "2",
        "--",
        "true",
    ];
    let out = muster(&dev.url(), project.path(), &gpus).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("resources.gpus")
            && out
                .stderr
                .contains("2 GPUs on one node, but its nodes have at most 0")
            && out
                .stderr
                .contains("command provisioner, and 1 node joined"),
        "{out:?}"
    );
    assert_eq!(muster_tests::all_runs(&dev.url()).await.len(), 1);
    // With `-o json` the refusal is a JSON object: the server's code, the message, the field.
    let json_args = [&["-o", "json"][..], &gpus[..]].concat();
    let out = muster(&dev.url(), project.path(), &json_args).await;
    assert_eq!(out.code, 1, "{out:?}");
    let error: serde_json::Value = serde_json::from_str(out.stderr.trim()).unwrap();
    assert_eq!(error["error"]["code"], "invalid_argument", "{error}");
    assert_eq!(error["error"]["field"], "resources.gpus", "{error}");
    assert!(out.stdout.is_empty(), "{out:?}");
    // `local` takes any node that joins: the run waits, with a warning that says why.
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "--gpus", "1", "--", "true"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("warning: resources.gpus: the run asks for 1 GPU on one node, but its nodes have at most 0")
            && out.stderr.contains("it waits until a larger node joins"),
        "{out:?}"
    );
    // Waiting for it says why it waits, and gives up with its own exit code.
    let id = out.stdout.trim().to_string();
    let waited = muster(
        &dev.url(),
        project.path(),
        &["run", "wait", &id, "--timeout", "3"],
    )
    .await;
    assert_eq!(waited.code, 75, "{waited:?}");
    assert!(
        waited
            .stderr
            .contains(&format!("run {id} is queued: waiting: "))
            && waited.stderr.contains("GPU"),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serverless_jobs_run_on_the_workspace_s_serverless_target() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "job.yml",
        "command: echo serverless-ran\ncompute: azureml:serverless\n",
    );
    // `muster dev` runs serverless jobs on `local`, and says so.
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "job.yml"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("compute local for serverless"),
        "{out:?}"
    );
    let id = out.stdout.trim().to_string();
    let run = wait_done(&dev.url(), &id).await;
    assert_eq!(run.state().word(), "completed", "{run:?}");
    let show = muster(&dev.url(), project.path(), &["run", "show", &id]).await;
    assert!(
        show.stdout.contains("compute     local (for serverless)"),
        "{show:?}"
    );
    let list = muster(&dev.url(), project.path(), &["workspace", "list"]).await;
    assert!(list.stdout.contains("local"), "{list:?}");

    // Without a serverless target, such jobs are refused with what to do.
    let off = muster(
        &dev.url(),
        project.path(),
        &["workspace", "update", "default", "--no-serverless-compute"],
    )
    .await;
    assert_eq!(off.code, 0, "{off:?}");
    let refused = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "job.yml"],
    )
    .await;
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains(
            "workspace \"default\" has no serverless compute target: an operator names one with `muster workspace update default --serverless-compute NAME`"
        ),
        "{refused:?}"
    );
    // Only a target of the workspace can be named, and none may be called serverless.
    let bad = muster(
        &dev.url(),
        project.path(),
        &[
            "workspace",
            "update",
            "default",
            "--serverless-compute",
            "nope",
        ],
    )
    .await;
    assert_ne!(bad.code, 0, "{bad:?}");
    assert!(bad.stderr.contains("is not in workspace"), "{bad:?}");
    let named = muster(
        &dev.url(),
        project.path(),
        &["compute", "create", "serverless", "--type", "attached"],
    )
    .await;
    assert_ne!(named.code, 0, "{named:?}");
    assert!(named.stderr.contains("pick another name"), "{named:?}");
    let back = muster(
        &dev.url(),
        project.path(),
        &[
            "workspace",
            "update",
            "default",
            "--serverless-compute",
            "local",
        ],
    )
    .await;
    assert_eq!(back.code, 0, "{back:?}");
    submit_id(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "job.yml"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_run_configuration_runs_as_az_ml_run_submit_script_would() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "train.sh",
        "echo \"args: $*\"; echo \"var: $EXAMPLE_ENV_VAR\"; test -f .azureml/train.runconfig && echo snapshot-has-runconfig\n",
    );
    // The seed's shape, as `az ml folder attach` writes it, for a shell script.
    write(
        project.path(),
        ".azureml/train.runconfig",
        "script: train.sh\narguments: [--epochs, 3]\ntarget: local\nframework: Python\ncommunicator: None\nmaxRunDurationSeconds: 600\nnodeCount: 1\nenvironment:\n  name: project-env\n  environmentVariables:\n    EXAMPLE_ENV_VAR: EXAMPLE_VALUE\n  python:\n    userManagedDependencies: true\n    interpreterPath: sh\n  docker:\n    enabled: false\n    shmSize: 2g\n    arguments: []\nhistory:\n  outputCollection: true\n  snapshotProject: true\n  directoriesToWatch:\n  - logs\nspark:\n  configuration:\n    spark.app.name: Azure ML Experiment\nhdi:\n  yarnDeployMode: cluster\ntensorflow:\n  workerCount: 1\n  parameterServerCount: 1\nmpi:\n  processCountPerNode: 1\ndataReferences: {}\ndata: {}\namlcompute:\n  vmSize:\n  retainCluster: false\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-c", "train", "--stream"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("args: --epochs 3"), "{out:?}");
    assert!(out.stdout.contains("var: EXAMPLE_VALUE"), "{out:?}");
    assert!(out.stdout.contains("snapshot-has-runconfig"), "{out:?}");
    assert!(!out.stderr.contains("warning"), "nothing unused: {out:?}");

    // The seed file itself: its warnings name what muster does not do yet.
    write(
        project.path(),
        ".azureml/seed.runconfig",
        &include_str!("../../shared/formats/mlops_mnist.runconfig.yml")
            .replace("target: cpu-cluster", "target: local")
            .replace("nodeCount: 4", "nodeCount: 1")
            .replace("script: train.py", "script: train.sh")
            .replace("interpreterPath: python", "interpreterPath: sh"),
    );
    let seed = muster(
        &dev.url(),
        project.path(),
        &[
            "run",
            "submit",
            "--runconfig",
            ".azureml/seed.runconfig",
            "--stream",
        ],
    )
    .await;
    assert_eq!(seed.code, 0, "{seed:?}");
    assert!(
        seed.stdout
            .contains("args: --data-folder DatasetConsumptionConfig:mnist"),
        "{seed:?}"
    );
    for key in [
        "arguments",
        "environment.docker.baseImage",
        "environment.python.userManagedDependencies",
        "data.mnist",
    ] {
        assert!(
            seed.stderr
                .contains(&format!("warning: .azureml/seed.runconfig: {key}:")),
            "{key}: {seed:?}"
        );
    }
    // A typo is an error that names the key, and nothing is submitted.
    write(
        project.path(),
        ".azureml/typo.runconfig",
        "script: train.sh\nnodeCont: 2\n",
    );
    let typo = muster(&dev.url(), project.path(), &["run", "submit", "-c", "typo"]).await;
    assert_ne!(typo.code, 0, "{typo:?}");
    assert!(typo.stderr.contains("nodeCont"), "{typo:?}");
    assert_eq!(muster_tests::all_runs(&dev.url()).await.len(), 2);
}

/// A bounded HTTP/1.1 file server on 127.0.0.1: `/iris.csv` with an ETag (304 when the
/// client already has it), 404 for anything else. Counts the full bodies it sent.
async fn file_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let bodies = std::sync::Arc::new(AtomicUsize::new(0));
    let sent = bodies.clone();
    tokio::spawn(async move {
        for _ in 0..64 {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                    match conn.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(m) => n += m,
                    }
                }
                let request = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                let body = "sepal,petal\n5.1,1.4\n4.9,1.4\n";
                let answer = if !request.starts_with("get /iris.csv ") {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_string()
                } else if request.contains("if-none-match: \"v1\"") {
                    "HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\nconnection: close\r\n\r\n"
                        .to_string()
                } else {
                    sent.fetch_add(1, Ordering::SeqCst);
                    format!(
                        "HTTP/1.1 200 OK\r\netag: \"v1\"\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    (url, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_style_url_input_is_fetched_once_per_node_and_a_missing_one_fails_clearly() {
    use std::sync::atomic::Ordering;
    let dev = DevCluster::start().await.unwrap();
    let (server, bodies) = file_server().await;
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "job.yml",
        &format!(
            "command: wc -l < ${{{{inputs.iris}}}} && cat ${{{{inputs.iris}}}}\ninputs:\n  iris:\n    type: uri_file\n    path: {server}/iris.csv\n"
        ),
    );
    for round in 0..2 {
        let out = muster(
            &dev.url(),
            project.path(),
            &["run", "submit", "-f", "job.yml", "--stream"],
        )
        .await;
        assert_eq!(out.code, 0, "round {round}: {out:?}");
        assert!(out.stdout.contains("4.9,1.4"), "{out:?}");
        assert!(!out.stderr.contains("warning"), "{out:?}");
    }
    assert_eq!(
        bodies.load(Ordering::SeqCst),
        1,
        "the second run revalidated the node's copy"
    );
    write(
        project.path(),
        "missing.yml",
        &format!(
            "command: cat ${{{{inputs.x}}}}\ninputs:\n  x:\n    type: uri_file\n    path: {server}/nope.csv\n"
        ),
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "missing.yml", "--stream"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("input x:") && out.stderr.contains("404"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_data_inputs_travel_with_the_submit() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "data/train/a.csv", "1,2\n");
    write(project.path(), "data/train/b.csv", "3,4\n");
    write(project.path(), "data/labels.csv", "cat\ndog\n");
    write(
        project.path(),
        "jobs/job.yml",
        "command: cat ${{inputs.train}}/a.csv ${{inputs.train}}/b.csv ${{inputs.labels}}\ninputs:\n  train:\n    type: uri_folder\n    path: ../data/train\n  labels:\n    type: uri_file\n    path: ../data/labels.csv\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "jobs/job.yml", "--stream"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "1,2\n3,4\ncat\ndog\n", "{out:?}");
    assert!(out.stderr.contains("(inputs.train)"), "{out:?}");
    assert!(!out.stderr.contains("warning"), "{out:?}");
    let run = &muster_tests::all_runs(&dev.url()).await[0];
    let spec = run.spec.clone().unwrap();
    assert_eq!(
        spec.command,
        "cat inputs/train/a.csv inputs/train/b.csv inputs/labels/labels.csv"
    );
    assert_eq!(spec.snapshot_inputs.len(), 2, "{spec:?}");

    // A process's ro_mount input (the default) has read-only files; a download one not.
    write(
        project.path(),
        "modes.yml",
        "command: stat -c %A ${{inputs.ro}}/a.csv ${{inputs.rw}}/a.csv\ninputs:\n  ro:\n    type: uri_folder\n    path: data/train\n  rw:\n    type: uri_folder\n    path: data/train\n    mode: download\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "modes.yml", "--stream"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "-r--r--r--\n-rw-r--r--\n", "{out:?}");

    // A path that is not there is refused before anything is uploaded.
    write(
        project.path(),
        "missing.yml",
        "command: ls ${{inputs.x}}\ninputs:\n  x:\n    type: uri_folder\n    path: ./nope\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "missing.yml"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("inputs.x.path:") && out.stderr.contains("does not exist"),
        "{out:?}"
    );
    assert_eq!(muster_tests::all_runs(&dev.url()).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_assets_are_made_once_per_version_and_jobs_name_them() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "raw/iris.csv", "5.1,setosa\n");
    write(project.path(), "raw/train/part-0.csv", "a\n");
    write(project.path(), "raw/train/part-1.csv", "b\n");
    write(
        project.path(),
        "train-data.yml",
        "$schema: https://azuremlschemas.azureedge.net/latest/data.schema.json\ntype: uri_folder\nname: train\nversion: 1\npath: raw/train\ndescription: two parts\n",
    );
    let made = muster(
        &dev.url(),
        project.path(),
        &[
            "data",
            "create",
            "--name",
            "iris",
            "--version",
            "1",
            "--path",
            "raw/iris.csv",
            "--type",
            "uri_file",
        ],
    )
    .await;
    assert_eq!(made.code, 0, "{made:?}");
    assert!(
        made.stdout.contains("use it as `path: azureml:iris:1`"),
        "{made:?}"
    );
    let from_file = muster(
        &dev.url(),
        project.path(),
        &["data", "create", "-f", "train-data.yml"],
    )
    .await;
    assert_eq!(from_file.code, 0, "{from_file:?}");
    let again = muster(
        &dev.url(),
        project.path(),
        &[
            "data",
            "create",
            "--name",
            "iris",
            "--version",
            "1",
            "--path",
            "raw/iris.csv",
            "--type",
            "uri_file",
        ],
    )
    .await;
    assert_ne!(again.code, 0, "{again:?}");
    assert!(again.stderr.contains("iris:1 already exists"), "{again:?}");
    let list = muster(&dev.url(), project.path(), &["data", "list"]).await;
    assert!(
        list.stdout.contains("iris") && list.stdout.contains("train"),
        "{list:?}"
    );
    let show = muster(
        &dev.url(),
        project.path(),
        &["data", "show", "train@latest", "-o", "json"],
    )
    .await;
    let shown: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(
        (shown["type"].as_str(), shown["version"].as_str()),
        (Some("uri_folder"), Some("1"))
    );

    write(
        project.path(),
        "job.yml",
        "command: cat ${{inputs.iris}} ${{inputs.train}}/part-0.csv ${{inputs.train}}/part-1.csv\ninputs:\n  iris:\n    type: uri_file\n    path: azureml:iris:1\n  train:\n    path: azureml:train@latest\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "job.yml", "--stream"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "5.1,setosa\na\nb\n", "{out:?}");
    assert!(!out.stderr.contains("warning"), "{out:?}");
    let missing = muster(&dev.url(), project.path(), &["data", "show", "iris:7"]).await;
    assert_ne!(missing.code, 0, "{missing:?}");
    assert!(
        missing.stderr.contains("data asset iris:7 does not exist"),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datastore_input_reads_the_shared_folder_and_nobody_submits_host_paths() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    write(share.path(), "imagenet/train/n01.txt", "tench\n");
    let share_path = share.path().to_str().unwrap().to_string();
    let made = muster(
        &dev.url(),
        project.path(),
        &["datastore", "create", "shared", "--path", &share_path],
    )
    .await;
    assert_eq!(made.code, 0, "{made:?}");
    let list = muster(&dev.url(), project.path(), &["datastore", "list"]).await;
    assert!(
        list.stdout.contains("shared") && list.stdout.contains(&share_path),
        "{list:?}"
    );
    write(
        project.path(),
        "job.yml",
        "command: cat ${{inputs.images}}/n01.txt\ninputs:\n  images:\n    type: uri_folder\n    path: azureml://datastores/shared/paths/imagenet/train\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "job.yml", "--stream"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "tench\n", "{out:?}");
    // An unknown datastore is refused with what to do.
    write(
        project.path(),
        "other.yml",
        "command: ls ${{inputs.x}}\ninputs:\n  x:\n    path: azureml://datastores/nope/paths/a\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "other.yml"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("has no datastore \"nope\""), "{out:?}");
    // Host paths come only from datastores: a spec that brings its own is refused.
    let mut c = muster_testkit::access::clients(&dev.url()).await.unwrap();
    let forged = c
        .runs
        .submit_run(muster_proto::v1::SubmitRunRequest {
            spec: Some(muster_proto::v1::RunSpec {
                command: "cat inputs/x/shadow".into(),
                compute: "local".into(),
                experiment: "e".into(),
                instance_count: 1,
                max_attempts: 1,
                host_inputs: [("x".to_string(), "/etc".to_string())].into(),
                ..Default::default()
            }),
            idempotency_key: None,
        })
        .await;
    assert_eq!(forged.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(muster_tests::all_runs(&dev.url()).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_output_becomes_a_data_asset_a_later_job_reads() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "train.yml",
        "command: echo weights-$MUSTER_RUN_ID > ${{outputs.model}}/w.txt\noutputs:\n  model:\n    type: uri_folder\n    name: my-model\n",
    );
    let first = submit_id(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "train.yml"],
    )
    .await;
    assert_eq!(
        wait_done(&dev.url(), &first).await.state().word(),
        "completed"
    );
    let second = submit_id(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "train.yml"],
    )
    .await;
    assert_eq!(
        wait_done(&dev.url(), &second).await.state().word(),
        "completed"
    );
    let show = muster(
        &dev.url(),
        project.path(),
        &["data", "show", "my-model@latest", "-o", "json"],
    )
    .await;
    let shown: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(shown["version"], "2", "{shown}");
    assert_eq!(shown["created_by"], format!("run {second}"), "{shown}");

    write(
        project.path(),
        "eval.yml",
        "command: cat ${{inputs.model}}/w.txt\ninputs:\n  model:\n    type: uri_folder\n    path: azureml:my-model:1\n",
    );
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "eval.yml", "--stream"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, format!("weights-{first}\n"), "{out:?}");

    // A version that exists is not overwritten; the run says so.
    write(
        project.path(),
        "again.yml",
        "command: echo x > ${{outputs.model}}/w.txt\noutputs:\n  model:\n    name: my-model\n    version: 1\n",
    );
    let again = submit_id(
        &dev.url(),
        project.path(),
        &["run", "submit", "-f", "again.yml"],
    )
    .await;
    let run = wait_done(&dev.url(), &again).await;
    assert_eq!(run.state().word(), "completed");
    assert_eq!(
        run.message.as_deref(),
        Some("output model was not registered: data asset my-model:1 already exists")
    );
}
