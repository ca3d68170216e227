//! One run end to end, as a user walks it: submit, stream, list, logs, download, cancel,
//! and finding everything again after the server restarts or is killed.

use muster_proto::Word;
use std::time::{Duration, Instant};

use muster_testkit::{DevCluster, DevProcess, muster};
use muster_tests::{all_runs, submit_id, submit_sh, wait_done, wait_for_state, write};

const SCRIPT: &str = r#"echo "hello from $MUSTER_RUN_ID attempt $MUSTER_ATTEMPT"
mkdir -p outputs && echo 42 > outputs/result.txt
echo "to stderr" >&2
exit 3
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_run_streams_its_logs_exit_code_and_outputs() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "train.sh", SCRIPT);

    let out = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "--stream", "--", "sh", "train.sh"],
    )
    .await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stdout.contains("hello from run-") && out.stdout.contains("attempt 1"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("to stderr"),
        "stderr is in the combined log: {out:?}"
    );
    assert!(out.stderr.contains("failed: exited with code 3"), "{out:?}");

    let runs = all_runs(&dev.url()).await;
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(
        (run.state().word(), run.exit_code, run.attempt),
        ("failed", Some(3), 1)
    );

    // JSON has the documented keys.
    let json = muster(
        &dev.url(),
        project.path(),
        &["run", "show", &run.id, "-o", "json"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    for key in [
        "id",
        "experiment",
        "compute",
        "state",
        "attempt",
        "exit_code",
        "created_at",
        "started_at",
        "finished_at",
        "nodes",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["state"], "failed");
    let list = muster(&dev.url(), project.path(), &["run", "list", "-o", "json"]).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Outputs and logs download.
    let to = project.path().join("download");
    let dl = muster(
        &dev.url(),
        project.path(),
        &["run", "download", &run.id, "--to", to.to_str().unwrap()],
    )
    .await;
    assert_eq!(dl.code, 0, "{dl:?}");
    assert_eq!(
        std::fs::read_to_string(to.join("outputs/result.txt")).unwrap(),
        "42\n"
    );
    let log = std::fs::read_to_string(to.join("logs/attempt-1.std_log.txt")).unwrap();
    assert!(
        log.contains("hello from") && log.contains("to stderr"),
        "{log}"
    );

    // `run logs` prints the same log.
    let logs = muster(&dev.url(), project.path(), &["run", "logs", &run.id]).await;
    assert_eq!(logs.stdout, log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_code_is_not_uploaded_twice_and_git_state_is_recorded() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    write(project.path(), "train.py", "print('hi')\n");
    write(project.path(), "data/big.bin", "x");
    write(project.path(), ".amlignore", "data/\n");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(project.path())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let have_git = git(&["init", "-q", "-b", "main"])
        && git(&["-c", "user.email=t@t", "-c", "user.name=t", "add", "."])
        && git(&[
            "-c",
            "user.email=t@t",
            "-c",
            "user.name=t",
            "commit",
            "-qm",
            "x",
        ]);

    let first = muster(&dev.url(), project.path(), &["run", "submit", "--", "true"]).await;
    assert_eq!(first.code, 0, "{first:?}");
    assert!(
        first.stderr.contains("2 files") && first.stderr.contains("(2 uploaded"),
        "{first:?}"
    );
    let second = muster(
        &dev.url(),
        project.path(),
        &["run", "submit", "-o", "json", "--", "true"],
    )
    .await;
    assert_eq!(second.code, 0, "{second:?}");
    let v: serde_json::Value = serde_json::from_str(&second.stdout).unwrap();
    assert_eq!(
        v["code"]["files"], 2,
        "data/ is excluded by .amlignore: {v}"
    );
    if have_git {
        assert_eq!(v["code"]["git"]["branch"], "main", "{v}");
        assert_eq!(v["code"]["git"]["dirty"], false, "{v}");
        assert_eq!(
            v["code"]["git"]["commit"].as_str().unwrap().len(),
            40,
            "{v}"
        );
    }
    let again = muster(&dev.url(), project.path(), &["run", "submit", "--", "true"]).await;
    assert!(
        again.stderr.contains("(0 uploaded, 0 B)"),
        "a second submit of an unchanged directory uploads nothing: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_sleeping_run_within_the_grace_period() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    // The shell ignores SIGTERM: only the SIGKILL after the grace (2 s in tests) ends it.
    let id = submit_sh(
        &dev.url(),
        project.path(),
        &[],
        "trap '' TERM; sleep 300 & wait; sleep 300",
    )
    .await;
    wait_for_state(&dev.url(), &id, "running").await;
    let t0 = Instant::now();
    let cancel = muster(&dev.url(), project.path(), &["run", "cancel", &id]).await;
    assert_eq!(cancel.code, 0, "{cancel:?}");
    let waited = muster(&dev.url(), project.path(), &["run", "wait", &id]).await;
    assert_eq!(waited.code, 143, "a canceled run: {waited:?}");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(8), "canceled in {took:?}");
    let run = wait_for_state(&dev.url(), &id, "canceled").await;
    assert_eq!(run.attempts[0].end().word(), "canceled");

    // Canceling it again is answered as the first cancel was (a retry whose answer was
    // lost must not fail); a run that finished otherwise says so.
    let again = muster(&dev.url(), project.path(), &["run", "cancel", &id]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again.stdout.contains(&format!("Canceled run {id}.")),
        "{again:?}"
    );
    let done = muster_tests::submit_sh(&dev.url(), project.path(), &[], "true").await;
    muster_tests::wait_done(&dev.url(), &done).await;
    let late = muster(&dev.url(), project.path(), &["run", "cancel", &done]).await;
    assert_ne!(late.code, 0);
    assert!(
        late.stderr.contains("already finished (completed)"),
        "{late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_ends_a_run_as_timed_out() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    let out = muster(
        &dev.url(),
        project.path(),
        &[
            "run",
            "submit",
            "--timeout",
            "1",
            "--stream",
            "--",
            "sleep",
            "30",
        ],
    )
    .await;
    assert_eq!(out.code, 124, "{out:?}");
    let runs = all_runs(&dev.url()).await;
    assert_eq!(runs[0].state().word(), "timed_out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_every_run_and_its_logs() {
    let mut dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let out = muster(
            &dev.url(),
            project.path(),
            &[
                "run",
                "submit",
                "--stream",
                "--",
                "echo",
                &format!("line {i}"),
            ],
        )
        .await;
        assert_eq!(out.code, 0, "{out:?}");
    }
    let before = all_runs(&dev.url()).await;
    dev.restart().await.unwrap();
    let after = all_runs(&dev.url()).await;
    assert_eq!(before, after);
    for (i, r) in after.iter().enumerate() {
        let logs = muster(&dev.url(), project.path(), &["run", "logs", &r.id]).await;
        assert_eq!(logs.stdout, format!("line {i}\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_comes_back_with_every_run_and_its_logs() {
    let data = tempfile::tempdir().unwrap();
    let project = tempfile::tempdir().unwrap();
    let mut dev = DevProcess::start(data.path()).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let out = muster(
            &dev.url(),
            project.path(),
            &[
                "run",
                "submit",
                "--stream",
                "--",
                "echo",
                &format!("run {i}"),
            ],
        )
        .await;
        assert_eq!(out.code, 0, "{out:?}");
    }
    // Acknowledged but not yet finished: must survive too.
    ids.push(
        submit_id(
            &dev.url(),
            project.path(),
            &["run", "submit", "--", "sleep", "1"],
        )
        .await,
    );
    let before = all_runs(&dev.url()).await;
    assert_eq!(before.len(), 6);
    dev.kill();
    let dev = DevProcess::start_on(data.path(), dev.addr).await.unwrap();
    let after = all_runs(&dev.url()).await;
    assert_eq!(after.len(), 6, "every acknowledged run is still there");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.id, a.id);
        assert_eq!(b.spec, a.spec);
        if b.state().word() == "completed" {
            assert_eq!(b, a);
        }
    }
    for (i, r) in after.iter().take(5).enumerate() {
        let logs = muster(&dev.url(), project.path(), &["run", "logs", &r.id]).await;
        assert_eq!(logs.stdout, format!("run {i}\n"));
    }
    // The run that was in flight finishes (as a new attempt if its process died with the server).
    let done = wait_done(&dev.url(), &ids[0]).await;
    assert_eq!(done.state().word(), "completed", "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_while_streaming_leaves_the_run_running_and_says_how_to_stop_it() {
    let dev = DevCluster::start().await.unwrap();
    let project = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(muster_testkit::muster_bin());
    if let Some(token) = muster_testkit::access::admin_token(&dev.url()) {
        cmd.env("MUSTER_TOKEN", token);
    }
    let child = cmd
        .args(["--server", &dev.url(), "run", "submit", "--stream", "--"])
        .args(["sh", "-c", "echo started; sleep 120"])
        .current_dir(project.path())
        .env_remove("MUSTER_SERVER")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let run = {
        let mut found = None;
        for _ in 0..200 {
            if let Some(r) = all_runs(&dev.url()).await.into_iter().next()
                && r.state().word() == "running"
            {
                found = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        found.expect("the run starts within 10 s")
    };
    // Give the CLI a moment to be streaming, then press Ctrl-C.
    tokio::time::sleep(Duration::from_millis(500)).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "run {} keeps running: `muster run cancel {}` stops it",
            run.id, run.id
        )),
        "{stderr}"
    );
    assert_eq!(
        all_runs(&dev.url()).await[0].state().word(),
        "running",
        "Ctrl-C stops the CLI, not the run"
    );
    // A wait that gives up has its own code, not the timed-out run's.
    let waited = muster(
        &dev.url(),
        project.path(),
        &["run", "wait", &run.id, "--timeout", "1"],
    )
    .await;
    assert_eq!(waited.code, 75, "{waited:?}");
    assert!(
        waited.stderr.contains("still running after the timeout"),
        "{waited:?}"
    );
    let cancel = muster(&dev.url(), project.path(), &["run", "cancel", &run.id]).await;
    assert_eq!(cancel.code, 0, "{cancel:?}");
}
