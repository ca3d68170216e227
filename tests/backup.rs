//! Backups (issue 20, item 3): `muster cluster backup` of a running cluster, and
//! `muster server --restore-from` founding a one-server cluster from it with the same
//! users, tokens, compute targets, runs, logs and blobs.

use std::time::Duration;

use muster_testkit::{DevCluster, muster};
use muster_tests::{ChildGuard, free_port, write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_founds_a_cluster_with_the_same_users_runs_and_blobs() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let project = tempfile::tempdir().unwrap();
    write(
        project.path(),
        "train.sh",
        "echo from-the-backed-up-cluster\n",
    );
    let ran = muster(
        &url,
        project.path(),
        &["run", "submit", "--stream", "--", "sh", "train.sh"],
    )
    .await;
    assert_eq!(ran.code, 0, "{ran:?}");
    let run = muster_tests::all_runs(&url).await[0].id.clone();
    let made = muster(
        &url,
        project.path(),
        &["compute", "create", "gpu-pool", "--type", "attached"],
    )
    .await;
    assert_eq!(made.code, 0, "{made:?}");

    let saved = tempfile::tempdir().unwrap();
    let file = saved.path().join("muster.backup");
    let file_arg = file.to_str().unwrap();
    let out = muster(
        &url,
        project.path(),
        &["cluster", "backup", "--out", file_arg],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.starts_with("Backed up the state at index "),
        "{out:?}"
    );
    assert!(
        !out.stderr.contains("warning"),
        "every blob is there: {out:?}"
    );
    assert!(!saved.path().join("muster.partial").exists());

    // A new server, founded from the file, in an empty directory.
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let restored_url = format!("http://127.0.0.1:{port}");
    let data_dir = data.path().join("restored");
    let start = |extra: &[&str]| {
        std::process::Command::new(muster_testkit::muster_bin())
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(&data_dir)
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let server = ChildGuard(start(&["--restore-from", file_arg]));
    // The backed-up cluster's admin token works there.
    muster_testkit::access::register(&restored_url, &dev.token());
    let mut shown = None;
    for _ in 0..100 {
        let out = muster(&restored_url, project.path(), &["run", "show", &run]).await;
        if out.code == 0 {
            shown = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown = shown.expect("the restored server answers within 10 s");
    assert!(shown.stdout.contains("completed"), "{shown:?}");
    // Its sealed log came in the backup's blobs.
    let logs = muster(&restored_url, project.path(), &["run", "logs", &run]).await;
    assert_eq!(logs.stdout, "from-the-backed-up-cluster\n", "{logs:?}");
    let computes = muster(&restored_url, project.path(), &["compute", "list"]).await;
    assert!(computes.stdout.contains("gpu-pool"), "{computes:?}");
    // It takes new work.
    let submitted = muster(
        &restored_url,
        project.path(),
        &["run", "submit", "--compute", "gpu-pool", "--", "true"],
    )
    .await;
    assert_eq!(submitted.code, 0, "{submitted:?}");
    drop(server);

    // A restore never lands on existing state.
    let again = start(&["--restore-from", file_arg])
        .wait_with_output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds cluster state"), "{err}");
    // Nor on a file that is not a backup.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("x"), "not a tar").unwrap();
    let bad = std::process::Command::new(muster_testkit::muster_bin())
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(other.path().join("d"))
        .arg("--restore-from")
        .arg(other.path().join("x"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--restore-from"), "{err}");
}
