//! The server as operators and other tools meet it: HTTP and gRPC on one port, health and
//! reflection, separate `muster server` and `muster agent` processes, live logs, Ctrl-C.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use muster_proto::Word;
use muster_proto::v1;
use muster_testkit::{DevCluster, muster, muster_bin};
use muster_tests::{ChildGuard, http_get, submit_sh, wait_for_state, write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_metrics_ui_and_grpc_reflection_share_the_port() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "--stream", "--", "echo", "<b>hi</b>"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let run = muster_tests::all_runs(&dev.url()).await.remove(0);
    let id = run.id.clone();
    // The dev agent runs whatever it is given: no CPU or memory figure to show.
    let node = run.attempts[0].placements[0].node_name.clone();
    for (what, args) in [
        ("cpu          ", ["compute", "show", "local"]),
        ("memory      ", ["node", "show", &node]),
    ] {
        let shown = muster(&dev.url(), project.path(), &args).await;
        assert!(
            shown
                .stdout
                .contains(&format!("{what}no limit (runs here are not packed)")),
            "{shown:?}"
        );
    }
    let addr = dev.addr;
    let (health, metrics, index, page, missing) = tokio::task::spawn_blocking(move || {
        (
            http_get(addr, "/healthz"),
            http_get(addr, "/metrics"),
            http_get(addr, "/"),
            http_get(addr, &format!("/runs/{id}")),
            http_get(addr, "/runs/run-nope"),
        )
    })
    .await
    .unwrap();
    assert_eq!(health.0, 200);
    assert!(health.1.contains("role: Leader"), "{health:?}");
    assert_eq!(metrics.0, 200);
    assert!(
        metrics.1.contains("muster_runs{state=\"completed\"} 1"),
        "{}",
        metrics.1
    );
    assert!(
        metrics.1.contains("muster_raft_applied_index"),
        "{}",
        metrics.1
    );
    // The run was placed by this server's scheduler: its passes are timed.
    let last_pass = metrics
        .1
        .lines()
        .find_map(|l| l.strip_prefix("muster_schedule_last_pass_microseconds "))
        .and_then(|v| v.trim().parse::<i64>().ok());
    assert!(last_pass.is_some_and(|us| us >= 0), "{}", metrics.1);
    assert!(
        metrics.1.contains("muster_placements_total 1"),
        "{}",
        metrics.1
    );
    assert_eq!(index.0, 200);
    assert!(
        index.1.contains("muster studio") && index.1.contains("completed"),
        "{}",
        index.1
    );
    assert_eq!(page.0, 200);
    assert!(
        page.1.contains("&#60;b&#62;hi&#60;/b&#62;") && !page.1.contains("<b>hi</b>"),
        "logs are shown, escaped: {}",
        page.1
    );
    assert!(
        page.1.contains("<th>nodes</th><td>")
            && page
                .1
                .contains("<th>end</th><td class=completed>completed (exit 0)"),
        "each attempt shows its nodes and how it ended: {}",
        page.1
    );
    assert!(
        index.1.contains("No sweeps yet") && index.1.contains("No pipelines yet"),
        "{}",
        index.1
    );
    assert_eq!(missing.0, 404);
    assert!(
        missing
            .1
            .contains("run run-nope does not exist: the studio's front page (/) lists the runs"),
        "{missing:?}"
    );

    // gRPC health and reflection (v1 and v1alpha) on the same port.
    let channel = tonic::transport::Endpoint::from_shared(dev.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let served = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "muster.v1.RunService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        served.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1 as refl;
    let mut reflection =
        refl::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            refl::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let listed = responses.next().await.unwrap().unwrap();
    let Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        listed.message_response
    else {
        panic!("unexpected reflection answer {listed:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for svc in [
        "muster.v1.RunService",
        "muster.v1.ComputeService",
        "muster.v1.BlobService",
        "muster.v1.AgentService",
    ] {
        assert!(names.contains(&svc.to_string()), "{names:?}");
    }
    use tonic_reflection::pb::v1alpha as alpha;
    let mut old = alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    assert!(
        old.server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner()
            .next()
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_stream_live_while_the_run_is_still_running() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    let id = submit_sh(
        &dev.url(),
        project.path(),
        &[],
        "echo first; sleep 30; echo never",
    )
    .await;
    let mut c = dev.clients().await.unwrap();
    let mut stream = c
        .runs
        .stream_logs(v1::StreamLogsRequest {
            id: id.clone(),
            attempt: None,
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let t0 = Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a chunk within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(first.data, b"first\n");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(
        wait_for_state(&dev.url(), &id, "running")
            .await
            .state()
            .word(),
        "running",
        "the log arrived while the run was running"
    );
    c.runs
        .cancel_run(v1::CancelRunRequest {
            id: id.clone(),
            reason: None,
        })
        .await
        .unwrap();
    // The follow ends when the run does.
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(15), stream.collect::<Vec<_>>())
        .await
        .expect("the stream ends");
    assert!(rest.iter().all(|c| c.is_ok()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_server_and_agent_processes_run_an_azure_ml_job_file() {
    let dir = tempfile::tempdir().unwrap();
    let port = muster_tests::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut server = ChildGuard(
        Command::new(muster_bin())
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.path().join("server"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let project = tempfile::tempdir().unwrap();
    // The founding server writes the first admin's token; the CLI calls below present it.
    muster_testkit::access::await_admin_token(&dir.path().join("server/admin-token"), &url)
        .await
        .expect("the server makes its first admin token");
    // Bounded wait for the server.
    let mut up = false;
    for _ in 0..200 {
        if muster(&url, project.path(), &["compute", "list"])
            .await
            .code
            == 0
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "muster server did not come up");
    write(
        project.path(),
        "cluster.yml",
        include_str!("../../shared/formats/v2_compute_cluster_low_priority.yml"),
    );
    let created = muster(
        &url,
        project.path(),
        &[
            "compute",
            "create",
            "lab-pool",
            "-f",
            "cluster.yml",
            "--type",
            "attached",
        ],
    )
    .await;
    assert_eq!(created.code, 0, "{created:?}");
    assert!(created.stdout.contains("low_priority"), "{created:?}");
    // The agent joins with a single-use join token made by the CLI.
    let join = muster(
        &url,
        project.path(),
        &["token", "create", "--join", "--compute", "lab-pool"],
    )
    .await;
    assert_eq!(join.code, 0, "{join:?}");
    let join = join.stdout.trim().to_string();
    assert!(join.starts_with("msj_"), "{join}");
    let mut agent = ChildGuard(
        Command::new(muster_bin())
            .args([
                "--server",
                &url,
                "agent",
                "--join",
                &join,
                "--compute",
                "lab-pool",
                "--name",
                "lab-01",
                "--cpus",
                "1",
                "--memory",
                "1g",
                "--labels",
                "rack=a",
                "--data-dir",
            ])
            .arg(dir.path().join("agent"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut node_json = serde_json::Value::Null;
    for _ in 0..200 {
        let nodes = muster(&url, project.path(), &["node", "list", "-o", "json"]).await;
        node_json = serde_json::from_str(&nodes.stdout).unwrap_or_default();
        if node_json.as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let node = &node_json[0];
    assert_eq!(node["name"], "lab-01");
    assert_eq!(node["capacity"]["cpu_millis"], 1000);
    assert_eq!(node["capacity"]["memory_bytes"], 1u64 << 30);
    assert_eq!(node["labels"]["rack"], "a");

    write(
        project.path(),
        "src/train.sh",
        "echo \"epochs=$1 lr=$2 seed=$SEED rank=$MUSTER_NODE_RANK\"\n",
    );
    write(
        project.path(),
        "job.yml",
        "$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json\ncode: src\ncommand: sh train.sh ${{inputs.epochs}} ${{inputs.lr}}\ninputs:\n  epochs: 3\n  lr: 0.1\nenvironment_variables:\n  SEED: 7\ncompute: azureml:lab-pool\nexperiment_name: yaml-job\ndisplay_name: from-yaml\nresources:\n  cpu: 1\n  memory: 512m\nlimits:\n  timeout: 60\n",
    );
    let run = muster(
        &url,
        project.path(),
        &["run", "submit", "-f", "job.yml", "--stream"],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "epochs=3 lr=0.1 seed=7 rank=0\n");
    let list = muster(
        &url,
        project.path(),
        &["run", "list", "--experiment", "yaml-job", "-o", "json"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(v[0]["display_name"], "from-yaml");
    assert_eq!(v[0]["nodes"][0], "lab-01");

    // A second agent with the same name is refused with a clear error (and its join token
    // is not spent).
    let join = muster(
        &url,
        project.path(),
        &["token", "create", "--join", "--compute", "lab-pool"],
    )
    .await
    .stdout;
    let clash = Command::new(muster_bin())
        .args([
            "--server",
            &url,
            "agent",
            "--join",
            join.trim(),
            "--compute",
            "lab-pool",
            "--name",
            "lab-01",
            "--data-dir",
        ])
        .arg(dir.path().join("agent2"))
        .output()
        .unwrap();
    assert_eq!(clash.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&clash.stderr).contains("node name \"lab-01\" is already used"),
        "{clash:?}"
    );

    // Ctrl-C stops both cleanly.
    for ChildGuard(child) in [&mut agent, &mut server] {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "did not stop on Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status:?}");
    }
}

/// The README's first command for a newcomer, `muster dev`, then the CLI on the same account
/// with nothing configured: the admin token `muster dev` kept for the CLI just works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_runs_muster_dev_and_submits_without_configuring_anything() {
    let home = tempfile::tempdir().unwrap();
    let project = tempfile::tempdir().unwrap();
    let port = muster_tests::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let newcomer = |cmd: &mut Command| {
        cmd.env("HOME", home.path())
            .env_remove("MUSTER_TOKEN")
            .env_remove("MUSTER_CONFIG_DIR")
            .env_remove("MUSTER_SERVER")
            .env_remove("MUSTER_CA_FILE")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME");
    };
    let mut dev = Command::new(muster_bin());
    dev.args(["dev", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    newcomer(&mut dev);
    let _dev = ChildGuard(dev.spawn().unwrap());
    let run = |args: Vec<String>| {
        let mut cmd = Command::new(muster_bin());
        cmd.args(&args).current_dir(project.path());
        newcomer(&mut cmd);
        cmd.output().unwrap()
    };
    let mut ready = false;
    for _ in 0..200 {
        let who = run(vec!["--server".into(), url.clone(), "whoami".into()]);
        if who.status.success() {
            assert!(
                String::from_utf8_lossy(&who.stdout).contains("user:admin"),
                "{who:?}"
            );
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "muster dev served the newcomer within 20 s");
    let out = run([
        "--server", &url, "run", "submit", "--stream", "--", "echo", "hello",
    ]
    .map(String::from)
    .to_vec());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello",
        "{out:?}"
    );
    let kept = home.path().join(".config/muster/credentials.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o600,
        "the token is kept for the user only"
    );
}
