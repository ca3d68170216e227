//! Checkpoints in the replicated state: a run's latest checkpoint (what rank 0 of an
//! attempt wrote to `MUSTER_CHECKPOINT_DIR`, archived into the blob store) and recording it
//! ([`Command::RecordCheckpoint`]).
//!
//! The agent uploads the folder when the attempt ends (preempted within its grace period,
//! or any other way) and, when the job asks (`checkpoint: {interval: 10m}`), while it runs;
//! the server puts the blob on a majority before it proposes the record. The next attempt
//! of the run is placed with the run's checkpoint as [`crate::Attempt::resumed_from`], and
//! its agent restores it before the command starts (`MUSTER_RESUMED=1`).
//!
//! The record is fenced: only the run's latest attempt, through the node of its rank 0,
//! may record, and a record replaces one only when it is newer (a later attempt, or a
//! later checkpoint of the same attempt). A stale attempt (a node declared lost that still
//! runs, a late periodic upload after the end's) is answered [`Applied::Stale`] and changes
//! nothing, so it can never overwrite a newer attempt's checkpoint.

use serde::{Deserialize, Serialize};

use crate::Millis;
use crate::snapshot::is_sha256_hex;
use crate::state::{Applied, ApplyError, SealedBlob, State};

/// When an attempt's checkpoint was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointCause {
    /// While it ran, at the job's `checkpoint.interval`.
    Periodic,
    /// When it was preempted (after SIGTERM, once it exited or its grace period ended).
    Preempted,
    /// When it ended any other way (completed, failed, canceled, timed out).
    Ended,
}

impl CheckpointCause {
    /// The words `muster run show` uses (`taken when preempted`).
    pub fn describe(self) -> &'static str {
        match self {
            CheckpointCause::Periodic => "taken periodically",
            CheckpointCause::Preempted => "taken when preempted",
            CheckpointCause::Ended => "taken when it ended",
        }
    }

    /// The lowercase name used in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointCause::Periodic => "periodic",
            CheckpointCause::Preempted => "preempted",
            CheckpointCause::Ended => "ended",
        }
    }
}

/// One checkpoint of a run: the archive of an attempt's `MUSTER_CHECKPOINT_DIR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// SHA-256 of the tar archive (its blob address; on a majority of servers).
    pub sha256: String,
    /// The attempt that took it.
    pub attempt: u32,
    /// Its number among that attempt's checkpoints, from 1 (the end's is the last).
    pub seq: u64,
    /// Files in it.
    pub files: u64,
    /// Their bytes, in all.
    pub bytes: u64,
    /// When it was taken.
    pub cause: CheckpointCause,
    /// When it was recorded (the proposer's clock).
    pub at: Millis,
}

impl Checkpoint {
    /// Whether this checkpoint is newer than `other`: a later attempt, or a later one of
    /// the same attempt.
    pub fn is_newer_than(&self, other: &Checkpoint) -> bool {
        (self.attempt, self.seq) > (other.attempt, other.seq)
    }

    /// `12 files, 3.4 KiB, taken when preempted`.
    pub fn summary(&self) -> String {
        format!(
            "{} file{}, {}, {}",
            self.files,
            if self.files == 1 { "" } else { "s" },
            human_bytes(self.bytes),
            self.cause.describe()
        )
    }
}

/// `512 B`, `3.4 KiB`, `1.2 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl State {
    /// Applies [`crate::state::Command::RecordCheckpoint`]: `checkpoint` becomes run
    /// `run_id`'s latest when its attempt is the run's latest, `node_id` holds that
    /// attempt's rank 0, and it is newer than the one recorded; otherwise the record is
    /// stale and changes nothing.
    pub(super) fn record_checkpoint(
        &mut self,
        run_id: &str,
        node_id: &str,
        checkpoint: &Checkpoint,
    ) -> Result<Applied, ApplyError> {
        if !is_sha256_hex(&checkpoint.sha256) {
            return Err(ApplyError::InvalidBlobHash {
                blob: SealedBlob::Checkpoint,
                run_id: run_id.to_string(),
                sha256: checkpoint.sha256.clone(),
            });
        }
        let run = self
            .runs
            .get_mut(run_id)
            .ok_or_else(|| ApplyError::UnknownRun(run_id.to_string()))?;
        let stale = Ok(Applied::Stale {
            run_id: run_id.to_string(),
            attempt: checkpoint.attempt,
        });
        let Some(latest) = run.attempts.last() else {
            return stale;
        };
        if latest.number != checkpoint.attempt
            || latest.placements.first().map(|p| p.node_id.as_str()) != Some(node_id)
        {
            return stale;
        }
        if run
            .checkpoint
            .as_ref()
            .is_some_and(|c| !checkpoint.is_newer_than(c))
        {
            return stale;
        }
        run.checkpoint = Some(checkpoint.clone());
        Ok(Applied::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(3482), "3.4 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        let c = Checkpoint {
            sha256: "a".repeat(64),
            attempt: 1,
            seq: 3,
            files: 12,
            bytes: 3482,
            cause: CheckpointCause::Preempted,
            at: 0,
        };
        assert_eq!(c.summary(), "12 files, 3.4 KiB, taken when preempted");
    }
}
