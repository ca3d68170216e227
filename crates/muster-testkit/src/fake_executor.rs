//! A fake executor for agent tests without Docker or real processes: it records every
//! launch the agent makes (command, environment, container spec) and holds it "running"
//! until the test ends it with an exit code, or a stop order (cancel, preemption) stops it.
//! Give it to an agent as `AgentConfig::executor`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use muster_agent::executor::process::wait_stop;
use muster_agent::executor::{
    Executor, ExecutorError, Launch, Managed, Outcome, StopOrders, stopped,
};
use muster_core::AttemptEnd;
use tokio::sync::{Notify, oneshot};

/// Records launches; a test ends them. Clones share the record.
#[derive(Debug, Clone, Default)]
pub struct FakeExecutor {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    launches: Mutex<Vec<Slot>>,
    changed: Notify,
}

#[derive(Debug)]
struct Slot {
    launch: Launch,
    /// Taken by [`FakeExecutor::finish`].
    finish: Option<oneshot::Sender<i32>>,
    /// How it ended, once it did.
    outcome: Option<Outcome>,
}

impl FakeExecutor {
    /// A fake with no launches yet.
    pub fn new() -> FakeExecutor {
        FakeExecutor::default()
    }

    /// Every launch so far, in order.
    pub fn launches(&self) -> Vec<Launch> {
        self.lock().iter().map(|s| s.launch.clone()).collect()
    }

    /// Waits (bounded by `limit`) until launch number `index` (0-based) exists; returns it.
    pub async fn wait_for_launch(&self, index: usize, limit: Duration) -> anyhow::Result<Launch> {
        self.wait_until(limit, |slots| slots.get(index).map(|s| s.launch.clone()))
            .await
            .map_err(|_| anyhow::anyhow!("launch {index} did not happen within {limit:?}"))
    }

    /// Ends launch `index` as if its command exited with `exit_code`.
    pub fn finish(&self, index: usize, exit_code: i32) -> anyhow::Result<()> {
        let sender = self
            .lock()
            .get_mut(index)
            .and_then(|s| s.finish.take())
            .ok_or_else(|| anyhow::anyhow!("launch {index} is not running"))?;
        sender
            .send(exit_code)
            .map_err(|_| anyhow::anyhow!("launch {index} already ended"))
    }

    /// Waits (bounded by `limit`) until launch `index` has ended; returns how.
    pub async fn wait_for_end(&self, index: usize, limit: Duration) -> anyhow::Result<Outcome> {
        self.wait_until(limit, |slots| {
            slots.get(index).and_then(|s| s.outcome.clone())
        })
        .await
        .map_err(|_| anyhow::anyhow!("launch {index} did not end within {limit:?}"))
    }

    async fn wait_until<T>(
        &self,
        limit: Duration,
        mut found: impl FnMut(&[Slot]) -> Option<T>,
    ) -> Result<T, tokio::time::error::Elapsed> {
        tokio::time::timeout(limit, async {
            loop {
                let changed = self.inner.changed.notified();
                if let Some(v) = found(&self.lock()) {
                    return v;
                }
                changed.await;
            }
        })
        .await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.inner.launches.lock().expect("fake executor lock")
    }

    async fn run_one(
        &self,
        launch: Launch,
        mut stop: StopOrders,
        started: oneshot::Sender<()>,
    ) -> Outcome {
        let (finish, finished) = oneshot::channel();
        let index = {
            let mut slots = self.lock();
            slots.push(Slot {
                launch,
                finish: Some(finish),
                outcome: None,
            });
            slots.len() - 1
        };
        self.inner.changed.notify_waiters();
        let _ = started.send(());
        let outcome = tokio::select! {
            code = finished => exited(code.unwrap_or(-1)),
            order = wait_stop(&mut stop) => stopped(order.reason, None),
        };
        if let Some(slot) = self.lock().get_mut(index) {
            slot.outcome = Some(outcome.clone());
            slot.finish = None;
        }
        self.inner.changed.notify_waiters();
        outcome
    }
}

/// The outcome of a command that exited with `code`, as the real executors word it.
fn exited(code: i32) -> Outcome {
    if code == 0 {
        Outcome {
            end: AttemptEnd::Completed,
            exit_code: Some(0),
            message: None,
        }
    } else {
        Outcome {
            end: AttemptEnd::Failed,
            exit_code: Some(code),
            message: Some(format!("exited with code {code}")),
        }
    }
}

impl Executor for FakeExecutor {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn run(
        &self,
        launch: Launch,
        stop: StopOrders,
        started: oneshot::Sender<()>,
    ) -> BoxFuture<'_, Outcome> {
        Box::pin(self.run_one(launch, stop, started))
    }

    fn managed<'a>(
        &'a self,
        _node_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Managed>, ExecutorError>> {
        // Nothing survives an agent restart: the fake's "processes" live in this test.
        Box::pin(async { Ok(Vec::new()) })
    }

    fn adopt<'a>(
        &'a self,
        managed: &'a Managed,
        _log_path: &'a Path,
        _stop: StopOrders,
    ) -> BoxFuture<'a, Outcome> {
        let message = format!("the fake executor has nothing to re-adopt ({})", managed.id);
        Box::pin(async move {
            Outcome {
                end: AttemptEnd::Failed,
                exit_code: None,
                message: Some(message),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_agent::executor::{Stop, StopReason};

    fn launch() -> Launch {
        Launch {
            command: "train".into(),
            workdir: "/w".into(),
            env: vec![("A".into(), "1".into())],
            log_path: "/w/log".into(),
            timeout: None,
            container: None,
            redact: Default::default(),
            process_limits: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_launch_runs_until_the_test_finishes_it() {
        let fake = FakeExecutor::new();
        let (_stop_tx, stop) = tokio::sync::watch::channel(None);
        let (started, started_rx) = oneshot::channel();
        let run = tokio::spawn({
            let fake = fake.clone();
            async move { fake.run(launch(), stop, started).await }
        });
        started_rx.await.unwrap();
        let seen = fake
            .wait_for_launch(0, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(seen.command, "train");
        fake.finish(0, 3).unwrap();
        let out = run.await.unwrap();
        assert_eq!((out.end, out.exit_code), (AttemptEnd::Failed, Some(3)));
        assert_eq!(
            fake.wait_for_end(0, Duration::from_secs(5)).await.unwrap(),
            out
        );
        assert!(
            fake.finish(0, 0).is_err(),
            "an ended launch cannot end again"
        );
    }

    #[tokio::test]
    async fn a_stop_order_ends_a_launch() {
        let fake = FakeExecutor::new();
        let (stop_tx, stop) = tokio::sync::watch::channel(None);
        let (started, _) = oneshot::channel();
        let run = tokio::spawn({
            let fake = fake.clone();
            async move { fake.run(launch(), stop, started).await }
        });
        fake.wait_for_launch(0, Duration::from_secs(5))
            .await
            .unwrap();
        stop_tx.send_replace(Some(Stop {
            reason: StopReason::Canceled,
            grace: Duration::from_secs(1),
        }));
        assert_eq!(run.await.unwrap().end, AttemptEnd::Canceled);
    }
}
