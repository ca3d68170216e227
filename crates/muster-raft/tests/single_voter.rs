//! A single-voter node (`muster dev`): election, durability across restarts, snapshots and
//! compaction, and the errors a person sees when the data directory is unusable.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use muster_raft::{ProposeError, RaftConfig, RaftError, RaftNode, Role};
use support::{Counter, CounterState, data_dir, no_transport, output, value, wait_status};

fn single(snapshot_interval: u64, log_retained_after_snapshot: u64) -> RaftConfig {
    RaftConfig {
        snapshot_interval,
        log_retained_after_snapshot,
        ..RaftConfig::default()
    }
}

/// Proposes `values` with `concurrency` proposers; returns the outputs.
async fn propose_all(
    handle: &muster_raft::RaftHandle,
    values: Vec<u64>,
    concurrency: usize,
) -> Vec<u64> {
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in values.chunks(values.len().div_ceil(concurrency)) {
        let handle = handle.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            let mut outputs = Vec::new();
            for v in chunk {
                outputs.push(output(&handle.propose(value(v)).await.unwrap()));
            }
            outputs
        });
    }
    let mut outputs = Vec::new();
    while let Some(result) = tasks.join_next().await {
        outputs.extend(result.unwrap());
    }
    outputs
}

#[tokio::test]
async fn single_voter_elects_itself_at_once_and_restarts_with_the_same_state() {
    let root = tempfile::tempdir().unwrap();
    let dir = data_dir(root.path());

    let started = Instant::now();
    let sm = Counter::default();
    let handle = RaftNode::start(RaftConfig::default(), &dir, sm.clone(), no_transport()).unwrap();
    let first = handle.propose(value(1)).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(output(&first), 1);
    // No election timeout (1-2 s) to wait for: the sole voter campaigns at once.
    assert!(
        elapsed < Duration::from_millis(900),
        "first proposal took {elapsed:?}"
    );

    let outputs = propose_all(&handle, (2..=300).collect(), 16).await;
    // Every proposer got its own entry's output: the counts 2..=300, each once.
    let outputs: BTreeSet<u64> = outputs.into_iter().collect();
    assert_eq!(outputs, (2..=300).collect::<BTreeSet<u64>>());

    let read = handle.read_index().await.unwrap();
    let before = sm.state.lock().unwrap().clone();
    assert_eq!(before.count, 300);
    assert_eq!(before.sum, (1..=300).sum::<u64>());
    assert!(read >= before.last_index);
    // The status published before an answer reflects it.
    let status = handle.status();
    assert_eq!(status.role, Role::Leader);
    assert_eq!(status.leader, Some(1));
    assert_eq!(status.voters, vec![1]);
    assert!(status.applied_index >= before.last_index, "{status:?}");

    handle.shutdown().await;
    let status = handle.status();
    assert!(status.stopped);
    assert_eq!(status.applied_index, status.commit_index);
    assert_eq!(
        handle.propose(value(9)).await.unwrap_err(),
        ProposeError::Shutdown
    );
    assert_eq!(
        handle.read_index().await.unwrap_err(),
        ProposeError::Shutdown
    );

    // Same directory, a brand-new state machine: the log brings back exactly the same state.
    let sm = Counter::default();
    let handle = RaftNode::start(RaftConfig::default(), &dir, sm.clone(), no_transport()).unwrap();
    wait_status(&handle, "replay of the log", |s| {
        s.role == Role::Leader && s.applied_index >= status.commit_index
    })
    .await;
    let after = sm.state.lock().unwrap().clone();
    assert_eq!(after, before);
    assert!(
        handle.status().term > status.term,
        "a restart starts a new term"
    );

    assert_eq!(output(&handle.propose(value(301)).await.unwrap()), 301);
    handle.shutdown().await;
}

#[tokio::test]
async fn snapshots_compact_the_log_and_restart_recovers_from_snapshot_and_tail() {
    let root = tempfile::tempdir().unwrap();
    let dir = data_dir(root.path());
    let config = single(50, 5);

    let sm = Counter::default();
    let handle = RaftNode::start(config.clone(), &dir, sm.clone(), no_transport()).unwrap();
    propose_all(&handle, (1..=500).collect(), 8).await;
    handle.shutdown().await;
    let status = handle.status();
    let before = sm.state.lock().unwrap().clone();
    assert_eq!(before.count, 500);
    // Snapshots every 50 applied entries; the log keeps 5 entries behind the latest one.
    assert!(
        status.snapshot_index > status.applied_index - 50,
        "{status:?}"
    );
    assert_eq!(
        status.first_index,
        status.snapshot_index - 5 + 1,
        "{status:?}"
    );

    let sm = Counter::default();
    let handle = RaftNode::start(config, &dir, sm.clone(), no_transport()).unwrap();
    // Read back from the database before anything runs: the log starts behind the snapshot.
    let recovered = handle.status();
    assert_eq!(recovered.snapshot_index, status.snapshot_index);
    assert_eq!(recovered.first_index, status.first_index);
    assert!(
        recovered.first_index > 400,
        "the log was compacted: {recovered:?}"
    );
    assert!(recovered.last_index >= status.commit_index);
    // Restored from the snapshot, then the tail after it applied again.
    wait_status(&handle, "replay of the tail", |s| {
        s.applied_index >= status.commit_index
    })
    .await;
    let after = sm.state.lock().unwrap().clone();
    assert_eq!(after, before);
    handle.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_database_is_refused_with_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let dir = data_dir(root.path());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("raft.redb"),
        b"definitely not a database".repeat(1000),
    )
    .unwrap();

    let err = RaftNode::start(
        RaftConfig::default(),
        &dir,
        Counter::default(),
        no_transport(),
    )
    .unwrap_err();
    assert!(matches!(err, RaftError::Corrupt { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&dir.join("raft.redb").display().to_string()),
        "{message}"
    );
    assert!(message.contains("will not start over it"), "{message}");
    // The file is left as it was for a person to look at.
    assert_eq!(
        std::fs::read(dir.join("raft.redb")).unwrap(),
        b"definitely not a database".repeat(1000)
    );
}

#[tokio::test]
async fn a_data_dir_held_by_a_running_node_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = data_dir(root.path());
    let first = RaftNode::start(
        RaftConfig::default(),
        &dir,
        Counter::default(),
        no_transport(),
    )
    .unwrap();
    first.propose(value(1)).await.unwrap();

    let err = RaftNode::start(
        RaftConfig::default(),
        &dir,
        Counter::default(),
        no_transport(),
    )
    .unwrap_err();
    assert!(matches!(err, RaftError::DatabaseLocked { .. }), "{err:?}");
    assert!(err.to_string().contains("already in use"), "{err}");

    // Once the first node is shut down, the directory opens again with its data.
    first.shutdown().await;
    let sm = Counter::default();
    let second = RaftNode::start(RaftConfig::default(), &dir, sm.clone(), no_transport()).unwrap();
    assert_eq!(output(&second.propose(value(2)).await.unwrap()), 2);
    let state: CounterState = sm.state.lock().unwrap().clone();
    assert_eq!((state.count, state.sum), (2, 3));
    second.shutdown().await;
}

#[tokio::test]
async fn a_data_dir_of_another_node_id_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = data_dir(root.path());
    let node = RaftNode::start(
        RaftConfig::default(),
        &dir,
        Counter::default(),
        no_transport(),
    )
    .unwrap();
    node.shutdown().await;

    let config = RaftConfig {
        id: 2,
        initial_voters: vec![2],
        ..RaftConfig::default()
    };
    let err = RaftNode::start(config, &dir, Counter::default(), no_transport()).unwrap_err();
    assert!(
        matches!(
            err,
            RaftError::WrongNode {
                stored: 1,
                configured: 2,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_invalid_config_is_refused_before_touching_the_disk() {
    let root = tempfile::tempdir().unwrap();
    let dir = data_dir(root.path());
    let config = RaftConfig {
        election_tick: 1,
        ..RaftConfig::default()
    };
    let err = RaftNode::start(config, &dir, Counter::default(), no_transport()).unwrap_err();
    assert!(matches!(err, RaftError::InvalidConfig(_)), "{err:?}");
    assert!(!dir.exists());
}

#[tokio::test]
async fn garbage_from_a_peer_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let handle = RaftNode::start(
        RaftConfig::default(),
        &data_dir(root.path()),
        Counter::default(),
        no_transport(),
    )
    .unwrap();
    let err = handle.step(vec![0xff; 10]).unwrap_err();
    assert!(matches!(err, RaftError::InvalidMessage(_)), "{err:?}");
    handle.shutdown().await;
    assert!(handle.status().stopped);
}

#[tokio::test]
async fn a_lone_leader_sleeps_while_idle_and_answers_a_proposal_at_once() {
    let root = tempfile::tempdir().unwrap();
    let dir = data_dir(root.path());
    let sm = Counter::default();
    let handle = RaftNode::start(RaftConfig::default(), &dir, sm, no_transport()).unwrap();
    handle.propose(value(1)).await.unwrap();
    // Let the election's and the first entry's follow-up work settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = handle.status();
    // Two seconds idle: a ticking node would wake 20 times (100 ms ticks).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = handle.status();
    assert!(
        idle.wakeups - before.wakeups <= 1,
        "woke {} times while idle",
        idle.wakeups - before.wakeups
    );
    assert_eq!(
        idle.log_writes, before.log_writes,
        "nothing written while idle"
    );
    // A proposal wakes it at once: no tick to wait for.
    let started = Instant::now();
    assert_eq!(output(&handle.propose(value(2)).await.unwrap()), 2);
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "the proposal took {took:?}"
    );
    assert_eq!(handle.status().role, Role::Leader);
    handle.shutdown().await;
}

#[tokio::test]
async fn a_log_that_cannot_be_written_refuses_writes_then_resumes_by_itself() {
    let root = tempfile::tempdir().unwrap();
    let dir = data_dir(root.path());
    let faults = muster_raft::WriteFaults::default();
    let config = RaftConfig {
        write_faults: Some(faults.clone()),
        ..RaftConfig::default()
    };
    let sm = Counter::default();
    let handle = RaftNode::start(config.clone(), &dir, sm.clone(), no_transport()).unwrap();
    assert_eq!(output(&handle.propose(value(1)).await.unwrap()), 1);

    // The disk fills: the next entry's write fails; its proposer waits, the node says why.
    faults.set(true);
    let waiting = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.propose(value(2)).await })
    };
    let stalled = wait_status(&handle, "a storage error", |s| s.storage_error.is_some()).await;
    assert!(
        stalled
            .storage_error
            .as_deref()
            .unwrap()
            .contains("No space left"),
        "{stalled:?}"
    );
    assert!(!stalled.stopped, "the node does not stop");
    // Further writes and reads are refused at once, naming the cause and the way out.
    match handle.propose(value(3)).await {
        Err(ProposeError::Unwritable(why)) => {
            assert!(why.contains("cannot write its raft log"), "{why}");
            assert!(why.contains("free space"), "{why}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(handle.read_index().await.is_err());
    assert!(
        !waiting.is_finished(),
        "the stalled entry is neither lost nor acknowledged"
    );

    // Space comes back: the node writes the entry, answers its proposer, and goes on.
    faults.set(false);
    let answered = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("resumes within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(output(&answered), 2);
    let resumed = wait_status(&handle, "the storage error to clear", |s| {
        s.storage_error.is_none()
    })
    .await;
    assert_eq!(resumed.role, Role::Leader);
    assert_eq!(output(&handle.propose(value(3)).await.unwrap()), 3);
    handle.shutdown().await;

    // All three are durable.
    let sm = Counter::default();
    let handle = RaftNode::start(RaftConfig::default(), &dir, sm.clone(), no_transport()).unwrap();
    // A read right after the start (before the new term's first commit) is answered at
    // once, not after the lone leader's long sleep.
    let started = Instant::now();
    handle.read_index().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the first read waited {:?}",
        started.elapsed()
    );
    wait_status(&handle, "the applied index", |s| {
        s.applied_index >= resumed.applied_index
    })
    .await;
    assert_eq!(sm.state.lock().unwrap().count, 3);
    handle.shutdown().await;
}
