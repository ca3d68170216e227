//! Forwarding writes from a follower to the leader, batched.
//!
//! Every write a follower receives goes to the leader (DESIGN.md section 5). One gRPC
//! request per write made a follower's writes cost twice a leader's (an HTTP/2 request
//! each way per write, on top of the client's), so the writes that arrive while earlier
//! ones are on their way travel together: a forwarder task takes whatever is waiting (up
//! to [`MAX_BATCH`]) into one `Forward` request, with up to [`IN_FLIGHT`] requests out at
//! once. An idle follower sends a lone write at once, so batching adds no wait; under load
//! the batches grow by themselves. The leader proposes a batch's commands together, and
//! answers each one's result (or why it failed) with its applied index after them.

use std::collections::BTreeMap;
use std::sync::Arc;

use muster_proto::v1;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::cluster::Peers;

/// Most commands in one forwarded request.
const MAX_BATCH: usize = 256;
/// Most forwarded requests out at once.
const IN_FLIGHT: usize = 4;

/// The leader's answer to one forwarded command: its apply result and the leader's applied
/// index after it; or why it was not applied, in words.
pub(crate) type Answer = Result<(Vec<u8>, u64), String>;

struct Pending {
    leader: u64,
    command: Vec<u8>,
    reply: oneshot::Sender<Answer>,
}

/// The queue of writes on their way to the leader; its task ends when this is dropped.
#[derive(Debug)]
pub(crate) struct Forwarder {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Forwarder {
    /// Starts the forwarder task (on the current Tokio runtime).
    pub(crate) fn start(peers: Peers) -> Forwarder {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(run(waiting, peers));
        Forwarder { queue }
    }

    /// Forwards one encoded command to `leader` and waits for its answer.
    pub(crate) async fn forward(&self, leader: u64, command: Vec<u8>) -> Answer {
        let stopped = || "this server is shutting down".to_string();
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                leader,
                command,
                reply,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(mut waiting: mpsc::UnboundedReceiver<Pending>, peers: Peers) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = waiting.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH
            && let Ok(next) = waiting.try_recv()
        {
            batch.push(next);
        }
        // One leader almost always; a batch that spans a leader change is split.
        let mut by_leader: BTreeMap<u64, Vec<Pending>> = BTreeMap::new();
        for p in batch {
            by_leader.entry(p.leader).or_default().push(p);
        }
        for (leader, pending) in by_leader {
            // While IN_FLIGHT requests are out, the next batch grows instead.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let peers = peers.clone();
            tokio::spawn(async move {
                send(&peers, leader, pending).await;
                drop(slot);
            });
        }
    }
}

/// Sends one batch to `leader` and hands each command its answer.
async fn send(peers: &Peers, leader: u64, pending: Vec<Pending>) {
    let (commands, replies): (Vec<Vec<u8>>, Vec<oneshot::Sender<Answer>>) =
        pending.into_iter().map(|p| (p.command, p.reply)).unzip();
    let fail_all = |replies: Vec<oneshot::Sender<Answer>>, why: String| {
        for r in replies {
            let _ = r.send(Err(why.clone()));
        }
    };
    let Some(mut client) = peers.client(leader) else {
        return fail_all(replies, "its address is unknown to this server".into());
    };
    let sent = commands.len();
    let answer = match client.forward(v1::ForwardRequest { commands }).await {
        Ok(a) => a.into_inner(),
        Err(s) => return fail_all(replies, s.message().to_string()),
    };
    if answer.outcomes.len() != sent {
        return fail_all(
            replies,
            format!(
                "the leader answered {} of {sent} forwarded writes",
                answer.outcomes.len()
            ),
        );
    }
    for (outcome, reply) in answer.outcomes.into_iter().zip(replies) {
        let _ = reply.send(match outcome.error {
            Some(why) => Err(why),
            None => Ok((outcome.result, answer.index)),
        });
    }
}
