//! Bad input: each gets a clear message naming the field, a non-zero exit, and changes nothing.

use muster_testkit::{DevCluster, muster};
use muster_tests::{all_runs, write};

async fn computes(url: &str) -> usize {
    let mut c = muster_testkit::access::clients(url).await.unwrap();
    c.compute
        .list_computes(muster_proto::v1::ListComputesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .computes
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_clear_message_and_changes_nothing() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let expect_err = |out: &muster_testkit::CliOutput, needles: &[&str]| {
        assert_ne!(out.code, 0, "{out:?}");
        for n in needles {
            assert!(out.stderr.contains(n), "expected {n:?} in {out:?}");
        }
        assert!(!out.stderr.contains("Status {"), "no debug dumps: {out:?}");
    };

    // Compute targets.
    let out = muster(
        &url,
        p,
        &["compute", "create", "gpu_1", "--type", "cluster"],
    )
    .await;
    expect_err(
        &out,
        &[
            "invalid compute target name \"gpu_1\"",
            "letters, digits and '-'",
        ],
    );
    let out = muster(
        &url,
        p,
        &["compute", "create", "gpu-1", "--type", "cluster"],
    )
    .await;
    expect_err(&out, &["followed later by at least one letter"]);
    let ok = muster(
        &url,
        p,
        &["compute", "create", "gpu-pool", "--type", "attached"],
    )
    .await;
    assert_eq!(ok.code, 0, "{ok:?}");
    let out = muster(
        &url,
        p,
        &["compute", "create", "gpu-pool", "--type", "attached"],
    )
    .await;
    expect_err(&out, &["already exists"]);
    write(
        p,
        "compute.yml",
        "name: cpu-pool\ntype: amlcompute\nmax_instance: 2\n",
    );
    let out = muster(&url, p, &["compute", "create", "-f", "compute.yml"]).await;
    expect_err(
        &out,
        &["compute.yml", "max_instance: unknown key", "line 3"],
    );
    assert_eq!(computes(&url).await, 2, "local and gpu-pool only");

    // Runs.
    let out = muster(
        &url,
        p,
        &["run", "submit", "--compute", "nowhere", "--", "true"],
    )
    .await;
    expect_err(
        &out,
        &[
            "compute target \"nowhere\" does not exist",
            "muster compute create",
        ],
    );
    write(p, "bad.yml", "command: echo hi\n  resources: [1\n");
    let out = muster(&url, p, &["run", "submit", "-f", "bad.yml"]).await;
    expect_err(&out, &["bad.yml", "line 2"]);
    write(
        p,
        "unknown.yml",
        "command: echo hi\nresources:\n  instance_cont: 2\n",
    );
    let out = muster(&url, p, &["run", "submit", "-f", "unknown.yml"]).await;
    expect_err(
        &out,
        &[
            "unknown.yml: resources.instance_cont: unknown key",
            "line 3",
        ],
    );
    write(p, "nocommand.yml", "compute: local\n");
    let out = muster(&url, p, &["run", "submit", "-f", "nocommand.yml"]).await;
    expect_err(&out, &["command: missing"]);
    let out = muster(&url, p, &["run", "submit"]).await;
    expect_err(&out, &["command: missing"]);
    for i in 0..4 {
        write(p, &format!("many/f{i}.txt"), "x");
    }
    let out = muster(
        &url,
        &p.join("many"),
        &["run", "submit", "--max-snapshot-files", "3", "--", "true"],
    )
    .await;
    expect_err(&out, &["4 files, over the limit of 3", ".amlignore"]);
    write(p, "big/blob.bin", &"x".repeat(5000));
    let out = muster(
        &url,
        &p.join("big"),
        &[
            "run",
            "submit",
            "--max-snapshot-bytes",
            "1000",
            "--",
            "true",
        ],
    )
    .await;
    expect_err(&out, &["5.0 KB, over the limit of 1.0 KB", "blob.bin"]);
    let out = muster(&url, p, &["run", "show", "run-nope"]).await;
    expect_err(&out, &["run \"run-nope\" does not exist"]);
    let out = muster(&url, p, &["run", "list", "--state", "sleeping"]).await;
    expect_err(&out, &["state: unknown run state \"sleeping\""]);
    let out = muster(
        &url,
        p,
        &["run", "submit", "--distribution", "horovod", "--", "true"],
    )
    .await;
    expect_err(
        &out,
        &[
            "distribution.type: unknown distribution \"horovod\"",
            "pytorch, mpi or tensorflow",
        ],
    );
    let out = muster(
        &url,
        p,
        &["run", "submit", "--distribution", "mpi", "--", "true"],
    )
    .await;
    expect_err(&out, &["distribution.process_count_per_instance: missing"]);
    let out = muster(
        &url,
        p,
        &[
            "run",
            "submit",
            "--process-count-per-instance",
            "2",
            "--",
            "true",
        ],
    )
    .await;
    expect_err(&out, &["--process-count-per-instance needs a distribution"]);
    let out = muster(
        &url,
        p,
        &["run", "submit", "--checkpoint-interval", "2s", "--", "true"],
    )
    .await;
    expect_err(
        &out,
        &["--checkpoint-interval: \"2s\" is outside 10s to 7d"],
    );
    let out = muster(
        &url,
        p,
        &[
            "run",
            "submit",
            "--checkpoint-interval",
            "often",
            "--",
            "true",
        ],
    )
    .await;
    expect_err(
        &out,
        &[
            "--checkpoint-interval: \"often\" is not a duration",
            "`10m`",
        ],
    );
    assert!(all_runs(&url).await.is_empty(), "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_says_where_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let port = muster_tests::free_port();
    let out = muster(
        &format!("http://127.0.0.1:{port}"),
        dir.path(),
        &["run", "list"],
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "cannot reach a muster server at http://127.0.0.1:{port}"
        )),
        "{out:?}"
    );
    assert!(out.stderr.contains("muster dev"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_or_corrupt_data_dir_is_refused() {
    let dev = DevCluster::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = muster(
        &dev.url(),
        dir.path(),
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dev.data_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("is in use by another muster process"),
        "{out:?}"
    );

    let corrupt = tempfile::tempdir().unwrap();
    write(
        corrupt.path(),
        "server/raft/raft.redb",
        "this is not a database",
    );
    let out = muster(
        &dev.url(),
        dir.path(),
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            corrupt.path().to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("raft.redb"), "{out:?}");
    assert_eq!(
        std::fs::read(corrupt.path().join("server/raft/raft.redb")).unwrap(),
        b"this is not a database",
        "left untouched"
    );
}

/// `muster server --data-dir DIR` on a free loopback port: its exit status and stderr, or
/// None if it was still running (serving) after 20 s.
async fn server_on(data: &std::path::Path) -> Option<(std::process::ExitStatus, String)> {
    let port = muster_tests::free_port();
    let child = tokio::process::Command::new(muster_testkit::muster_bin())
        .args(["server", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .ok()?
        .unwrap();
    Some((
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A data directory that cannot be used is refused before `muster server` says it listens,
/// and is left as it was: one whose stores hold data but whose Raft log was deleted
/// (starting there would found an empty cluster beside them), a corrupt one, and one in
/// use by another server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_data_directory_is_refused_before_the_server_listens() {
    let dir = tempfile::tempdir().unwrap();
    let orphaned = dir.path().join("orphaned");
    write(&orphaned, "blobs/ab/old", "a snapshot");
    let corrupt = dir.path().join("corrupt");
    write(&corrupt, "raft/raft.redb", "this is not a database");
    let dev = DevCluster::start().await.unwrap();
    let busy = dev.data_dir.join("server");
    for (data, says) in [
        (&orphaned, &["has blobs but no Raft log", "--join"][..]),
        (&corrupt, &["raft.redb"][..]),
        (&busy, &["in use by another muster process"][..]),
    ] {
        let (status, stderr) = server_on(data).await.expect("refused, not serving");
        assert!(!status.success(), "{stderr}");
        for needle in says {
            assert!(stderr.contains(needle), "{needle:?} in {stderr}");
        }
        assert!(!stderr.contains("listening"), "{stderr}");
    }
    assert!(!orphaned.join("raft").exists(), "nothing was started there");
    assert_eq!(
        std::fs::read(corrupt.join("raft/raft.redb")).unwrap(),
        b"this is not a database"
    );
}

/// A client command whose reader has gone (`muster … | head -c 1`) ends quietly: no panic,
/// no backtrace, just the end a closed pipe brings.
#[test]
fn a_closed_pipe_ends_a_client_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(muster_testkit::muster_bin())
        .args(["cluster", "key"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(13),
        "ended by SIGPIPE: {:?}",
        out.status
    );
}

/// Issue 16's CLI rules: a name's every broken rule at once, a YAML quote left open
/// pointed at where it opens, Azure-only compute keys refused with what to do, v1 flags
/// as aliases, a bad `--compute` found before any upload, and a second machine refused
/// by a compute instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_and_job_files_are_checked_whole_and_before_any_upload() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let before = computes(&url).await;

    let out = muster(
        &url,
        p,
        &["compute", "create", "1_gpu pool-2", "--type", "cluster"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("start with a letter; use only letters, digits and '-' (found '_', ' '); a '-' must be followed later by at least one letter"),
        "{out:?}"
    );

    write(
        p,
        "job.yml",
        "command: echo hi\ndisplay_name: \"unterminated\nexperiment_name: x\n",
    );
    let out = muster(&url, p, &["run", "submit", "-f", "job.yml"]).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("display_name: this quote is never closed")
            && out.stderr.contains("(line 2, column 15)"),
        "{out:?}"
    );

    for (yaml, says) in [
        (
            "location: westeurope\n",
            "location: muster's nodes are your own machines",
        ),
        (
            "identity:\n  type: system_assigned\n",
            "identity: muster gives compute targets no managed identity",
        ),
        (
            "ssh_settings:\n  admin_username: a\n",
            "ssh_settings: muster opens no SSH login",
        ),
    ] {
        write(
            p,
            "c.yml",
            &format!("name: azpool\ntype: amlcompute\n{yaml}"),
        );
        let out = muster(&url, p, &["compute", "create", "-f", "c.yml"]).await;
        assert_ne!(out.code, 0, "{out:?}");
        assert!(out.stderr.contains(says), "{says}: {out:?}");
    }
    write(p, "c.yml", "name: azpool\nmax_nodes: 2\n");
    let out = muster(&url, p, &["compute", "create", "-f", "c.yml"]).await;
    assert!(out.stderr.contains("type: missing"), "{out:?}");
    let out = muster(
        &url,
        p,
        &["compute", "create", "-f", "c.yml", "--type", "kubernetes"],
    )
    .await;
    assert!(
        out.stderr.contains("kubernetes compute is not supported"),
        "{out:?}"
    );
    assert_eq!(computes(&url).await, before, "nothing was made");

    // v1 spellings; tags kept and shown.
    write(
        p,
        "c.yml",
        "name: oldpool\ntype: amlcompute\nvm_priority: lowpriority\ntags:\n  team: vision\n",
    );
    let out = muster(
        &url,
        p,
        &[
            "compute",
            "create",
            "-f",
            "c.yml",
            "--min-nodes",
            "0",
            "--max-nodes",
            "3",
            "--vm-size",
            "STANDARD_NC6",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    for shown in [
        "low_priority",
        "size         STANDARD_NC6",
        "instances    0 to 3",
        "tags         team=vision",
    ] {
        assert!(out.stdout.contains(shown), "{shown}: {out:?}");
    }

    // A typo in --compute is found before the code is uploaded.
    write(p, "train.py", "print('hi')\n");
    let out = muster(
        &url,
        p,
        &[
            "run",
            "submit",
            "--compute",
            "nosuch",
            "--",
            "python",
            "train.py",
        ],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("compute target \"nosuch\" does not exist"),
        "{out:?}"
    );
    assert!(out.stderr.contains("nothing was uploaded"), "{out:?}");
    assert!(!out.stderr.contains("Snapshot of"), "{out:?}");

    // An instance is one machine: a second agent is refused while the first is up.
    let out = muster(
        &url,
        p,
        &["compute", "create", "onebox", "--type", "instance"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let agent = |name: &str| {
        let data = p.join(name);
        let config = muster_testkit::agents::agent_config(
            &url,
            &data,
            "onebox",
            name,
            std::sync::Arc::new(muster_agent::NoGpus),
        );
        muster_testkit::agents::AgentHandle::start(&url, config)
    };
    let first = agent("box-a").await.unwrap();
    let Err(err) = agent("box-b").await else {
        panic!("a second machine joined the instance");
    };
    assert!(
        format!("{err:#}").contains("is one machine, and node box-a is it already"),
        "{err:#}"
    );
    first.stop().await.unwrap();
}
