//! Retention as a user meets it: with `--retention`, finished runs leave the replicated state
//! (and `run list`), while `run show`, `run wait`, `run logs` and the run's blobs keep
//! working, with the same access rules as before: a user of another workspace finds
//! nothing. A running run stays (the trials of sweeps stay too: muster-core's
//! `a_sweep_through_the_state_machine_runs_exactly_its_trials`).

use std::time::Duration;

use muster_client::Credentials;
use muster_proto::Word;
use muster_proto::v1;
use muster_testkit::{DevCluster, access, muster};
use muster_tests::{submit_sh, wait_done};
use tonic::Code;

/// The ids `run list --all -o json` shows.
async fn listed(url: &str, cwd: &std::path::Path) -> Vec<String> {
    let out = muster(url, cwd, &["run", "list", "--all", "-o", "json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let runs: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    runs.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// Clients of a new user `name` with `role` in `workspace`.
async fn as_user(url: &str, name: &str, role: &str, workspace: &str) -> muster_client::Clients {
    let token = access::user_token(url, name, role, Some(workspace))
        .await
        .unwrap();
    muster_client::connect(url, Credentials::bearer(&token).unwrap())
        .await
        .unwrap()
}

async fn get_run(c: &mut muster_client::Clients, id: &str) -> Result<v1::Run, tonic::Status> {
    c.runs
        .get_run(v1::GetRunRequest {
            id: id.to_string(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_leave_the_state_and_stay_readable() {
    let dev = DevCluster::start_with(|c| {
        c.server.retention = Some(Duration::from_secs(1));
        c.server.retention_check = Duration::from_millis(200);
    })
    .await
    .unwrap();
    let url = dev.url();
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("train.py"), "print('kept')\n").unwrap();
    // The other runs come from another directory, so only the archived run refers to
    // this snapshot (its blob is readable through the archive alone).
    let elsewhere = tempfile::tempdir().unwrap();
    let done = submit_sh(&url, project.path(), &[], "echo archived-hello").await;
    let sleeper = submit_sh(&url, elsewhere.path(), &[], "sleep 30").await;
    assert_eq!(wait_done(&url, &done).await.state().word(), "completed");

    // Within a few retention checks the finished run is archived; the running one stays.
    let mut gone = false;
    for _ in 0..150 {
        let ids = listed(&url, project.path()).await;
        assert!(ids.contains(&sleeper), "an active run is never archived");
        if !ids.contains(&done) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "run {done} was not archived within 15 s");

    // It is still shown, waited for, and its log read, from the archive.
    let show = muster(&url, project.path(), &["run", "show", &done]).await;
    assert_eq!(show.code, 0, "{show:?}");
    assert!(show.stdout.contains("completed"), "{show:?}");
    assert!(show.stdout.contains("archived"), "{show:?}");
    let json = muster(&url, project.path(), &["run", "show", &done, "-o", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let archive = json["archive"].as_str().unwrap().to_string();
    assert_eq!(archive.len(), 64, "{json}");
    let logs = muster(&url, project.path(), &["run", "logs", &done]).await;
    assert_eq!(logs.code, 0, "{logs:?}");
    assert!(logs.stdout.contains("archived-hello"), "{logs:?}");
    let mut admin = access::clients(&url).await.unwrap();
    let waited = admin
        .runs
        .wait_run(v1::WaitRunRequest {
            id: done.clone(),
            timeout_ms: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waited.state().word(), "completed");
    assert_eq!(waited.archive, archive);

    // A user of another workspace finds neither the run nor its snapshot's blob; a reader
    // of its workspace finds both.
    admin
        .access
        .create_workspace(v1::CreateWorkspaceRequest {
            name: "other".into(),
        })
        .await
        .unwrap();
    let run = waited;
    let manifest = run
        .spec
        .as_ref()
        .and_then(|s| s.code.as_ref())
        .map(|c| c.manifest.clone())
        .expect("a code snapshot");
    let mut outsider = as_user(&url, "olga", "user", "other").await;
    let refused = get_run(&mut outsider, &done).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    assert!(outsider.blobs.download_bytes(&manifest).await.is_err());
    let mut reader = as_user(&url, "rita", "reader", "default").await;
    let seen = get_run(&mut reader, &done).await.unwrap();
    assert_eq!(seen.id, done);
    let bytes = reader.blobs.download_bytes(&manifest).await.unwrap();
    assert!(String::from_utf8_lossy(&bytes).contains("train.py"));

    // The state records the archive, and the cluster carries on: a new run completes.
    let again = submit_sh(&url, elsewhere.path(), &[], "true").await;
    assert_eq!(wait_done(&url, &again).await.state().word(), "completed");
    let cancel = muster(&url, project.path(), &["run", "cancel", &sleeper]).await;
    assert_eq!(cancel.code, 0, "{cancel:?}");
}
