//! Retention: finished runs leave the replicated state for archives in the blob store.
//!
//! A finished run costs about a kilobyte of `State` for as long as the cluster lives, and
//! every server holds the whole state in memory and in every snapshot. Like Slurm's
//! `MinJobAge` (a finished job leaves slurmctld's memory for the accounting database), a
//! retention setting moves runs that finished long enough ago out of the state:
//!
//! 1. the leader picks them ([`State::archivable`]: finished before the cut-off, oldest
//!    first, not a sweep's trial or a pipeline's step, which their sweep or pipeline still
//!    shows);
//! 2. it writes them, whole, into one archive blob ([`encode_archive`]) and copies it onto a
//!    majority of servers;
//! 3. only then it proposes [`Command::ArchiveRuns`](crate::Command::ArchiveRuns), which
//!    removes the runs and their idempotency keys and records the archive ([`RunArchive`],
//!    a few dozen bytes for a batch of runs).
//!
//! An archived run stays readable: the servers find it in the archives the state lists
//! (`run show`, its logs and outputs, which stay in the blob store). A failed step 2 records
//! nothing; a step 3 refused because a run changed meanwhile leaves an unreferenced blob.

use serde::{Deserialize, Serialize};

use crate::Millis;
use crate::state::{Applied, ApplyError, Run, State};

/// The most runs one archive takes (one [`Command::ArchiveRuns`](crate::Command::ArchiveRuns)):
/// a batch stays a small Raft entry and a blob of a few megabytes.
pub const MAX_ARCHIVE_RUNS: usize = 2_000;

/// The format tag at the start of every archive blob.
pub const ARCHIVE_FORMAT: &str = "muster-run-archive/1";

/// One archive of finished runs in the blob store, as the state records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunArchive {
    /// SHA-256 of the archive blob ([`encode_archive`]).
    pub sha256: String,
    /// How many runs it holds.
    pub runs: u64,
    /// Its length in bytes.
    pub bytes: u64,
    /// The cut-off: every run in it finished before this time.
    pub finished_before: Millis,
    /// When it was recorded.
    pub at: Millis,
}

/// What an archive blob holds.
#[derive(Serialize, Deserialize)]
struct ArchiveFile<R> {
    format: String,
    runs: Vec<R>,
}

/// An archive blob of `runs` (JSON, tagged with [`ARCHIVE_FORMAT`]).
pub fn encode_archive(runs: &[&Run]) -> Vec<u8> {
    serde_json::to_vec(&ArchiveFile {
        format: ARCHIVE_FORMAT.to_string(),
        runs: runs.to_vec(),
    })
    .expect("runs serialize")
}

/// The runs of an archive blob made by [`encode_archive`].
pub fn decode_archive(bytes: &[u8]) -> Result<Vec<Run>, String> {
    let file: ArchiveFile<Run> =
        serde_json::from_slice(bytes).map_err(|e| format!("run archive is unreadable: {e}"))?;
    if file.format != ARCHIVE_FORMAT {
        return Err(format!(
            "run archive has format {:?}; this server reads {ARCHIVE_FORMAT:?}: upgrade it",
            file.format
        ));
    }
    Ok(file.runs)
}

impl State {
    /// The runs retention may archive now: finished before `finished_before`, not a trial
    /// of a sweep or a step of a pipeline, at most `max`, oldest submission first.
    pub fn archivable(&self, finished_before: Millis, max: usize) -> Vec<String> {
        let held = self.held_by_sweeps_and_pipelines();
        let mut seqs: Vec<(u64, &str)> = self
            .runs
            .values()
            .filter(|r| {
                r.state.is_terminal()
                    && r.finished_at.is_some_and(|t| t < finished_before)
                    && !held.contains(r.id.as_str())
            })
            .map(|r| (r.seq, r.id.as_str()))
            .collect();
        seqs.sort_unstable();
        seqs.into_iter()
            .take(max)
            .map(|(_, id)| id.to_string())
            .collect()
    }

    /// Every run a sweep or pipeline refers to.
    fn held_by_sweeps_and_pipelines(&self) -> std::collections::HashSet<&str> {
        let trials = self
            .sweeps
            .values()
            .flat_map(|s| s.trials.iter().map(|t| t.run_id.as_str()));
        let steps = self
            .pipelines
            .values()
            .flat_map(|p| p.steps.values().filter_map(|s| s.run_id.as_deref()));
        trials.chain(steps).collect()
    }

    /// Applies [`Command::ArchiveRuns`](crate::Command::ArchiveRuns): every run must exist,
    /// be finished before the archive's cut-off and belong to no sweep or pipeline, or
    /// nothing changes.
    pub(crate) fn archive_runs(
        &mut self,
        run_ids: &[String],
        archive: &RunArchive,
    ) -> Result<Applied, ApplyError> {
        let refuse = |why: String| Err(ApplyError::InvalidArchive(why));
        if run_ids.is_empty() || run_ids.len() > MAX_ARCHIVE_RUNS {
            return refuse(format!(
                "an archive holds 1 to {MAX_ARCHIVE_RUNS} runs, not {}",
                run_ids.len()
            ));
        }
        if !crate::snapshot::is_sha256_hex(&archive.sha256) {
            return refuse(format!(
                "{:?} is not a SHA-256 in lowercase hex",
                archive.sha256
            ));
        }
        if archive.runs != run_ids.len() as u64 {
            return refuse(format!(
                "the archive says it holds {} runs but {} are named",
                archive.runs,
                run_ids.len()
            ));
        }
        if self.archives.iter().any(|a| a.sha256 == archive.sha256) {
            return refuse(format!("archive {} is already recorded", archive.sha256));
        }
        let held = self.held_by_sweeps_and_pipelines();
        let mut seen = std::collections::HashSet::new();
        for id in run_ids {
            let run = self
                .runs
                .get(id)
                .ok_or_else(|| ApplyError::UnknownRun(id.clone()))?;
            if !seen.insert(id.as_str()) {
                return refuse(format!("run {id} is named twice"));
            }
            if !run.state.is_terminal()
                || run.finished_at.is_none_or(|t| t >= archive.finished_before)
            {
                return refuse(format!(
                    "run {id} is {} and did not finish before the cut-off",
                    run.state.as_str()
                ));
            }
            if held.contains(id.as_str()) {
                return refuse(format!(
                    "run {id} belongs to a sweep or pipeline, which still shows it"
                ));
            }
        }
        let gone: std::collections::HashSet<&str> = run_ids.iter().map(String::as_str).collect();
        self.idempotency
            .retain(|_, run| !gone.contains(run.as_str()));
        for id in run_ids {
            if let Some(run) = self.runs.remove(id) {
                self.by_seq.0.remove(&run.seq);
            }
        }
        self.archives.push(archive.clone());
        Ok(Applied::Done)
    }
}
