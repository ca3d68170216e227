//! What a server can say of a run's logs: per attempt, which ranks are sealed and which
//! will grow no more ([`AttemptLogs`], the basis of `StreamLogs`' follow), a rank's bytes
//! from wherever they are (sealed blob or live file), and an attempt's ranks combined line
//! by line for the studio.

use muster_core::loglines::RankLines;
use muster_core::state::{AttemptState, SealedLog};
use muster_core::{NodeState, State};

use crate::coordinator::now_ms;
use crate::server::Server;
use crate::store::StoreError;

/// The sealed log of `rank` of an attempt, if the replicated state records one.
pub(crate) fn sealed_log(s: &State, run: &str, attempt: u32, rank: u32) -> Option<SealedLog> {
    s.runs
        .get(run)?
        .attempts
        .get(attempt.checked_sub(1)? as usize)?
        .logs
        .get(&rank)
        .cloned()
}

/// Reads a rank's log: from its sealed blob once it ended (on any server), else from the
/// file this server holds (the live log, on the leader).
pub(crate) async fn read_log(
    server: &Server,
    run: &str,
    attempt: u32,
    rank: u32,
    offset: u64,
    max: usize,
) -> Result<Vec<u8>, StoreError> {
    let sealed = server
        .coordinator
        .read(|s| sealed_log(s, run, attempt, rank));
    server
        .store
        .read_log(sealed.as_ref(), (run, attempt, rank), offset, max)
        .await
}

/// What this server knows of one attempt's logs.
pub(crate) struct AttemptLogs {
    /// How many ranks the attempt has.
    pub ranks: u32,
    /// Whether the attempt ended.
    pub ended: bool,
    /// The sealed log of each rank, by rank.
    pub sealed: Vec<Option<SealedLog>>,
    /// Whether each rank's log will grow no more though it is not sealed: the attempt
    /// ended and the rank reported its end before logs were sealed, or its node is lost
    /// (what the leader had of it was sealed), or the rank's end is overdue (it was never
    /// started, or its agent vanished after the attempt ended).
    pub settled: Vec<bool>,
}

impl AttemptLogs {
    /// What `s` says of attempt `attempt` of `run`.
    pub fn of(
        s: &muster_core::State,
        config: &crate::ServerConfig,
        run: &muster_core::Run,
        attempt: u32,
    ) -> Option<AttemptLogs> {
        let a = run.attempts.get(attempt.checked_sub(1)? as usize)?;
        let ended = matches!(a.state, AttemptState::Ended(_));
        let overdue = a.finished_at.is_some_and(|at| {
            let wait = config.stop_grace + config.node_grace;
            now_ms() > at + wait.as_millis() as u64 + RANK_END_SLACK_MS
        });
        let (sealed, settled) = a
            .placements
            .iter()
            .enumerate()
            .map(|(rank, p)| {
                let rank = rank as u32;
                let node_lost = s
                    .nodes
                    .get(&p.node_id)
                    .is_none_or(|n| n.state == NodeState::Lost);
                let settled = ended && (a.rank_ends.contains_key(&rank) || node_lost || overdue);
                (a.logs.get(&rank).cloned(), settled)
            })
            .unzip();
        Some(AttemptLogs {
            ranks: a.placements.len() as u32,
            ended,
            sealed,
            settled,
        })
    }
}

/// How long past an attempt's end (plus the stop grace and the node grace) a follower of
/// its log waits for a rank that never reported its end.
const RANK_END_SLACK_MS: u64 = 5_000;

/// Most of an attempt's log a run page shows.
pub(crate) const PAGE_LOG_BYTES: usize = 1 << 20;

/// An attempt's log for its page, at most [`PAGE_LOG_BYTES`] of it, and what was left out
/// when that is not all of it.
pub(crate) struct PageLog {
    /// The bytes shown.
    pub bytes: Vec<u8>,
    /// The bytes not shown (before them for one rank, after them for several), if any.
    pub left_out: Option<u64>,
}

/// An attempt's log for its page: rank 0's **last** [`PAGE_LOG_BYTES`] (where a failing
/// job says why), from the start of a line; or for a multi-instance attempt every rank's,
/// line by line, each line prefixed `[rank N] ` (the ranks read in turns, a chunk at a time,
/// as `muster run logs` shows them), its first [`PAGE_LOG_BYTES`]. An ended rank's log
/// comes from its sealed blob (on any server); a live one from this server's file (the
/// leader's).
pub(crate) async fn combined_log(c: &Server, run: &muster_core::Run, attempt: u32) -> PageLog {
    let ranks = run
        .attempts
        .get(attempt as usize - 1)
        .map_or(1, |a| a.placements.len() as u32);
    // The run's own seals first (an archived run is not in the state), else the state's
    // (sealed since `run` was read) or the live file.
    let read = |rank: u32, offset: u64, max: usize| async move {
        let sealed = run
            .attempts
            .get(attempt as usize - 1)
            .and_then(|a| a.logs.get(&rank));
        match sealed {
            Some(log) => c.store.read_sealed(log, offset, max).await,
            None => read_log(c, &run.id, attempt, rank, offset, max).await,
        }
    };
    if ranks <= 1 {
        let total = match run
            .attempts
            .get(attempt as usize - 1)
            .and_then(|a| a.logs.get(&0))
        {
            Some(sealed) => sealed.bytes,
            None => c.store.logs.len(&run.id, attempt, 0),
        };
        let start = total.saturating_sub(PAGE_LOG_BYTES as u64);
        let mut bytes = read(0, start, PAGE_LOG_BYTES).await.unwrap_or_default();
        if start == 0 {
            return PageLog {
                bytes,
                left_out: None,
            };
        }
        // Never from the middle of a line.
        let cut = bytes.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.drain(..cut);
        return PageLog {
            bytes,
            left_out: Some(start + cut as u64),
        };
    }
    let mut lines = RankLines::new();
    let mut out = Vec::new();
    let mut offsets: Vec<(u32, u64)> = (0..ranks).map(|r| (r, 0)).collect();
    while !offsets.is_empty() && out.len() < PAGE_LOG_BYTES {
        let mut still = Vec::new();
        for (rank, offset) in offsets {
            let data = read(rank, offset, 64 * 1024).await.unwrap_or_default();
            if !data.is_empty() {
                out.extend(lines.push(rank, &data));
                still.push((rank, offset + data.len() as u64));
            }
        }
        offsets = still;
    }
    let more: u64 = offsets
        .iter()
        .map(|(rank, offset)| {
            let total = run
                .attempts
                .get(attempt as usize - 1)
                .and_then(|a| a.logs.get(rank))
                .map_or_else(|| c.store.logs.len(&run.id, attempt, *rank), |s| s.bytes);
            total.saturating_sub(*offset)
        })
        .sum();
    out.extend(lines.finish());
    PageLog {
        bytes: out,
        left_out: (more > 0).then_some(more),
    }
}
