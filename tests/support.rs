//! Shared helpers for the end-to-end scenarios.

use std::path::Path;
use std::time::Duration;

use muster_proto::v1;

/// Writes `content` to `dir/rel`, creating directories.
pub fn write(dir: &Path, rel: &str, content: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
    std::fs::write(p, content).expect("write");
}

/// Polls (bounded: 30 s) until `run` reaches `state`.
pub async fn wait_for_state(server: &str, id: &str, state: &str) -> v1::Run {
    let mut c = muster_cli::client::connect(server).await.expect("connect");
    for _ in 0..600 {
        let r = c
            .runs
            .get_run(v1::GetRunRequest { id: id.into() })
            .await
            .expect("get")
            .into_inner();
        if r.state == state {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {id} did not reach {state} within 30 s");
}

/// Lists every run.
pub async fn all_runs(server: &str) -> Vec<v1::Run> {
    let mut c = muster_cli::client::connect(server).await.expect("connect");
    c.runs
        .list_runs(v1::ListRunsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .runs
}
