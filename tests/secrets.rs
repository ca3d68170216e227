//! Workspace secrets end to end (issue 19 item 4; DESIGN.md invariant 9): a canary secret
//! set with the CLI, read by a real process run as a variable and as a file, shows as `***`
//! in the run's log and nowhere else — not in `run show` (table or JSON), GetRun, ListRuns,
//! `secret list`, the audit log, nor any file of the server's data directory (Raft log,
//! snapshots, blobs, logs). A run naming an unknown secret, or a secret of another
//! workspace, is refused at submit with what to do.

use std::path::Path;

use muster_proto::v1;
use muster_testkit::cluster::TestCluster;
use muster_testkit::{DevCluster, muster};
use muster_tests::{wait_done, write};

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

const JOB: &str = r#"command: >-
  echo "env=$TOKEN_ENV" &&
  printf 'file=' && cat "$MUSTER_SECRETS_DIR/CANARY_TOKEN" && echo &&
  echo "mode=$(stat -c %a "$MUSTER_SECRETS_DIR/CANARY_TOKEN")" &&
  echo "dir=$MUSTER_SECRETS_DIR"
secrets: [CANARY_TOKEN]
environment_variables:
  TOKEN_ENV: ${{secrets.CANARY_TOKEN}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_secret_reaches_its_run_and_nothing_else() {
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let project = tempfile::tempdir().unwrap();
    let private = tempfile::tempdir().unwrap();
    let canary = format!(
        "canary-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    std::fs::write(private.path().join("value"), &canary).unwrap();
    let value_file = private.path().join("value").display().to_string();

    // Set with the CLI; the answer names it, never shows it.
    let set = muster(
        &url,
        project.path(),
        &["secret", "set", "CANARY_TOKEN", "--from-file", &value_file],
    )
    .await;
    assert_eq!(set.code, 0, "{set:?}");
    assert!(set.stdout.contains("CANARY_TOKEN") && !set.stdout.contains(&canary));
    for args in [
        &["secret", "list"][..],
        &["secret", "list", "-o", "json"][..],
    ] {
        let list = muster(&url, project.path(), args).await;
        assert_eq!(list.code, 0, "{list:?}");
        assert!(list.stdout.contains("CANARY_TOKEN"), "{list:?}");
        assert!(list.stdout.contains("user:admin"), "who set it: {list:?}");
        assert!(!list.stdout.contains(&canary), "{list:?}");
    }

    // A run that echoes it as a variable and cats the file.
    write(project.path(), "job.yml", JOB);
    let submit = muster(&url, project.path(), &["run", "submit", "-f", "job.yml"]).await;
    assert_eq!(submit.code, 0, "{submit:?}");
    let id = submit.stdout.trim().to_string();
    let run = wait_done(&url, &id).await;
    assert_eq!(run.state(), v1::RunState::Completed, "{run:?}");
    let logs = muster(&url, project.path(), &["run", "logs", &id]).await;
    assert_eq!(logs.code, 0, "{logs:?}");
    assert!(logs.stdout.contains("env=***"), "{logs:?}");
    assert!(logs.stdout.contains("file=***"), "{logs:?}");
    assert!(logs.stdout.contains("mode=400"), "a 0400 file: {logs:?}");
    assert!(!logs.stdout.contains(&canary), "{logs:?}");
    // The secret directory is gone with the attempt.
    let dir = logs
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("dir="))
        .expect("the run printed its secret directory")
        .to_string();
    assert!(!Path::new(&dir).exists(), "{dir} outlived the attempt");

    // No read API gives it away.
    for args in [
        &["run", "show", id.as_str()][..],
        &["run", "show", id.as_str(), "-o", "json"][..],
        &["run", "list", "-o", "json"][..],
        &["audit"][..],
    ] {
        let out = muster(&url, project.path(), args).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        assert!(!out.stdout.contains(&canary), "{args:?}: {out:?}");
    }
    let show = muster(&url, project.path(), &["run", "show", &id, "-o", "json"]).await;
    assert!(
        show.stdout.contains("CANARY_TOKEN"),
        "the name is shown: {show:?}"
    );
    let mut c = dev.clients().await.unwrap();
    let got = c
        .runs
        .get_run(v1::GetRunRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let listed = c
        .runs
        .list_runs(v1::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let audit = c
        .access
        .list_audit(v1::ListAuditRequest { limit: 1000 })
        .await
        .unwrap()
        .into_inner();
    for (what, text) in [
        ("GetRun", format!("{got:?}")),
        ("ListRuns", format!("{listed:?}")),
        ("ListAudit", format!("{audit:?}")),
    ] {
        assert!(!text.contains(&canary), "{what}: {text}");
    }
    let audit_text = format!("{audit:?}");
    assert!(
        audit_text.contains("secret.set") && audit_text.contains("CANARY_TOKEN"),
        "the audit log records who set which name: {audit_text}"
    );

    // An unknown secret is refused at submit, saying how to set it.
    write(
        project.path(),
        "unknown.yml",
        "command: echo hi\nsecrets: [NO_SUCH_SECRET]\n",
    );
    let refused = muster(
        &url,
        project.path(),
        &["run", "submit", "-f", "unknown.yml"],
    )
    .await;
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains("NO_SUCH_SECRET")
            && refused.stderr.contains("muster secret set NO_SUCH_SECRET"),
        "{refused:?}"
    );

    // Another workspace does not see it, and its runs cannot use it.
    let ws = muster(&url, project.path(), &["workspace", "create", "other"]).await;
    assert_eq!(ws.code, 0, "{ws:?}");
    let other_list = muster(
        &url,
        project.path(),
        &["secret", "list", "--workspace", "other"],
    )
    .await;
    assert_eq!(other_list.code, 0, "{other_list:?}");
    assert!(
        !other_list.stdout.contains("CANARY_TOKEN"),
        "{other_list:?}"
    );
    let cross = muster(
        &url,
        project.path(),
        &["run", "submit", "-f", "job.yml", "--workspace", "other"],
    )
    .await;
    assert_ne!(cross.code, 0, "{cross:?}");
    assert!(
        cross.stderr.contains("CANARY_TOKEN") && cross.stderr.contains("workspace other"),
        "{cross:?}"
    );

    // Delete: gone from the list, audited; a run naming it is refused again.
    let del = muster(&url, project.path(), &["secret", "delete", "CANARY_TOKEN"]).await;
    assert_eq!(del.code, 0, "{del:?}");
    let list = muster(&url, project.path(), &["secret", "list"]).await;
    assert!(!list.stdout.contains("CANARY_TOKEN"), "{list:?}");
    let audit = muster(&url, project.path(), &["audit"]).await;
    assert!(audit.stdout.contains("secret.delete"), "{audit:?}");
    let again = muster(&url, project.path(), &["run", "submit", "-f", "job.yml"]).await;
    assert_ne!(again.code, 0, "{again:?}");

    // Nothing on the server's disk holds the value: not the Raft log, not a snapshot, not
    // a blob or a log (the stored log is the redacted one). The key file is 0600.
    let data_dir = dev.data_dir.clone();
    let hits = files_containing(&data_dir, canary.as_bytes());
    assert!(hits.is_empty(), "the canary is in {hits:?}");
    let key = std::fs::read_dir(&data_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .chain(
            std::fs::read_dir(&data_dir)
                .unwrap()
                .flatten()
                .filter(|e| e.path().is_dir())
                .flat_map(|d| {
                    std::fs::read_dir(d.path())
                        .unwrap()
                        .flatten()
                        .map(|e| e.path())
                }),
        )
        .find(|p| p.file_name().is_some_and(|n| n == "secret.key"))
        .expect("the server keeps its secret key in its data directory");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", key.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_gets_the_founders_secret_key_and_seals_with_it() {
    let cluster = TestCluster::start(3).await.unwrap();
    let read_key = |id: u64| std::fs::read_to_string(cluster.data_dir(id).join("secret.key")).ok();
    let founder = read_key(1).expect("the founding server made the key");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while [2, 3]
        .iter()
        .any(|id| read_key(*id).as_deref() != Some(founder.as_str()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the other servers did not get the founder's key: {:?}",
            [2, 3].map(read_key)
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Each server seals with the one key: a secret set through any of them opens for all
    // (a follower seals locally, then forwards the proposal to the leader).
    for id in cluster.ids() {
        let mut c = muster_testkit::access::clients(&cluster.url(id))
            .await
            .unwrap();
        let info = c
            .secrets
            .set_secret(v1::SetSecretRequest {
                workspace: String::new(),
                name: format!("VIA_SERVER_{id}"),
                value: b"some-value".to_vec(),
            })
            .await
            .unwrap_or_else(|e| panic!("server {id}: {e:?}"))
            .into_inner();
        assert_eq!(info.workspace, "default");
    }
    let mut c = muster_testkit::access::clients(&cluster.urls())
        .await
        .unwrap();
    let listed = c
        .secrets
        .list_secrets(v1::ListSecretsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.secrets.len(), 3, "{listed:?}");
    assert!(!format!("{listed:?}").contains("some-value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_stderr_never_holds_a_secret() {
    // The real `muster dev` process (server and agent), logging at debug to a file.
    let data = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let stderr_path = elsewhere.path().join("stderr.log");
    let addr = format!("127.0.0.1:{}", muster_tests::free_port());
    let url = format!("http://{addr}");
    let child = std::process::Command::new(muster_testkit::muster_bin())
        .args(["dev", "--listen", &addr, "--data-dir"])
        .arg(data.path())
        .env("MUSTER_CONFIG_DIR", data.path().join("cli-config"))
        .env("MUSTER_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let guard = muster_tests::ChildGuard(child);
    muster_testkit::access::await_admin_token(&data.path().join("server/admin-token"), &url)
        .await
        .unwrap();
    let mut ready = false;
    for _ in 0..400 {
        if let Ok(mut c) = muster_testkit::access::clients(&url).await
            && let Ok(nodes) = c.compute.list_nodes(v1::ListNodesRequest::default()).await
            && nodes
                .get_ref()
                .nodes
                .iter()
                .any(|n| n.state() == v1::NodeState::Ready)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(ready, "muster dev did not become ready");

    let canary = format!("stderr-canary-{}", std::process::id());
    std::fs::write(elsewhere.path().join("value"), &canary).unwrap();
    let value_file = elsewhere.path().join("value").display().to_string();
    let project = tempfile::tempdir().unwrap();
    let set = muster(
        &url,
        project.path(),
        &["secret", "set", "CANARY_TOKEN", "--from-file", &value_file],
    )
    .await;
    assert_eq!(set.code, 0, "{set:?}");
    write(project.path(), "job.yml", JOB);
    let submit = muster(&url, project.path(), &["run", "submit", "-f", "job.yml"]).await;
    assert_eq!(submit.code, 0, "{submit:?}");
    let id = submit.stdout.trim().to_string();
    let run = wait_done(&url, &id).await;
    assert_eq!(run.state(), v1::RunState::Completed, "{run:?}");
    drop(guard);

    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        stderr.contains(&id),
        "the debug log follows the run (so this checks something): {stderr}"
    );
    assert!(
        !stderr.contains(&canary),
        "the daemons' stderr holds the secret"
    );
    let hits = files_containing(data.path(), canary.as_bytes());
    assert!(hits.is_empty(), "the canary is in {hits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_run_reads_its_secret_at_run_secrets_and_logs_stars() {
    let Some(docker) = muster_testkit::images::docker_or_skip().await else {
        return;
    };
    let image = muster_testkit::images::busybox_image(&docker)
        .await
        .unwrap();
    let dev = DevCluster::start().await.unwrap();
    let url = dev.url();
    let project = tempfile::tempdir().unwrap();
    let private = tempfile::tempdir().unwrap();
    let canary = format!("container-canary-{}", std::process::id());
    std::fs::write(private.path().join("value"), &canary).unwrap();
    let value_file = private.path().join("value").display().to_string();
    let set = muster(
        &url,
        project.path(),
        &["secret", "set", "CANARY_TOKEN", "--from-file", &value_file],
    )
    .await;
    assert_eq!(set.code, 0, "{set:?}");
    write(
        project.path(),
        "job.yml",
        &format!("{JOB}environment:\n  image: {image}\n"),
    );
    let submit = muster(&url, project.path(), &["run", "submit", "-f", "job.yml"]).await;
    assert_eq!(submit.code, 0, "{submit:?}");
    let id = submit.stdout.trim().to_string();
    let run = wait_done(&url, &id).await;
    let logs = muster(&url, project.path(), &["run", "logs", &id]).await;
    assert_eq!(run.state(), v1::RunState::Completed, "{run:?} {logs:?}");
    for line in ["env=***", "file=***", "mode=400", "dir=/run/secrets"] {
        assert!(logs.stdout.contains(line), "{line}: {logs:?}");
    }
    assert!(!logs.stdout.contains(&canary), "{logs:?}");
    let hits = files_containing(&dev.data_dir, canary.as_bytes());
    assert!(hits.is_empty(), "the canary is in {hits:?}");
}
