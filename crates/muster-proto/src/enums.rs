//! The API's enums (states, ends, reasons): their words, and their conversions to and from
//! muster-core's types.
//!
//! On the wire an enum is an `i32`, and prost's getters (`run.state()`) turn a value this
//! version does not know into the default, silently. Code that acts on a value decodes it
//! with [`decode_enum`] (or [`Word::from_wire`]) instead, which makes an unknown value an
//! [`EnumError`]; the words (`timed_out`) are what the CLI and the web UI show and what
//! the CLI's flags take.

use std::borrow::Cow;

use muster_core::state::{
    AttemptEnd as CoreAttemptEnd, AttemptState as CoreAttemptState,
    CheckpointCause as CoreCheckpointCause, NodeState as CoreNodeState,
    ProvisionPhase as CorePhase, RunState as CoreRunState,
};

use crate::v1;

/// A wire enum value that does not convert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnumError {
    /// A value this version does not know: the sender runs another muster version.
    Unknown {
        /// What the value is (`attempt end`).
        what: &'static str,
        /// The raw value.
        value: i32,
    },
    /// The value is unset (`*_UNSPECIFIED`) where one is required.
    Unspecified {
        /// What the value is.
        what: &'static str,
    },
}

impl std::fmt::Display for EnumError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnumError::Unknown { what, value } => write!(
                f,
                "unknown {what} {value}: the sender may run a different muster version; run the same version everywhere"
            ),
            EnumError::Unspecified { what } => write!(f, "no {what} given"),
        }
    }
}

impl std::error::Error for EnumError {}

/// One of the API's enums, with the lowercase word it is shown and parsed as.
pub trait Word: Copy + Sized + 'static {
    /// What a value is, for errors (`run state`).
    const WHAT: &'static str;
    /// Every value but the unspecified one.
    const ALL: &'static [Self];
    /// The word (`timed_out`; `unspecified` for the zero value).
    fn word(self) -> &'static str;
    /// The value of a raw wire number, if this version knows it.
    fn known(raw: i32) -> Option<Self>;

    /// The value of a raw wire number; unknown or unspecified is an error.
    fn from_wire(raw: i32) -> Result<Self, EnumError> {
        match Self::known(raw) {
            Some(v) if raw != 0 => Ok(v),
            Some(_) => Err(EnumError::Unspecified { what: Self::WHAT }),
            None => Err(EnumError::Unknown {
                what: Self::WHAT,
                value: raw,
            }),
        }
    }

    /// The word of a raw wire number, for display: one this version does not know shows
    /// as `unknown (N)`.
    fn word_of(raw: i32) -> Cow<'static, str> {
        match Self::known(raw) {
            Some(v) => Cow::Borrowed(v.word()),
            None => Cow::Owned(format!("unknown ({raw})")),
        }
    }

    /// The value named by `word` (a CLI flag), or an error listing the words.
    fn from_word(word: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|v| v.word() == word)
            .ok_or_else(|| {
                let words: Vec<&str> = Self::ALL.iter().map(|v| v.word()).collect();
                format!(
                    "unknown {} {word:?}: use one of {}",
                    Self::WHAT,
                    words.join(", ")
                )
            })
    }
}

/// Decodes a raw wire number straight into muster-core's type.
pub fn decode_enum<W, C>(raw: i32) -> Result<C, EnumError>
where
    W: Word,
    C: TryFrom<W, Error = EnumError>,
{
    C::try_from(W::from_wire(raw)?)
}

macro_rules! words {
    ($wire:ident, $what:literal, { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl Word for v1::$wire {
            const WHAT: &'static str = $what;
            const ALL: &'static [Self] = &[$(v1::$wire::$variant),+];
            fn word(self) -> &'static str {
                match self {
                    v1::$wire::Unspecified => "unspecified",
                    $(v1::$wire::$variant => $word),+
                }
            }
            fn known(raw: i32) -> Option<Self> {
                v1::$wire::try_from(raw).ok()
            }
        }
    };
}

/// `From` core for the wire enum, and `TryFrom` the wire enum for core (unspecified is an
/// error), variant by variant.
macro_rules! core_pair {
    ($wire:ident, $core:ident, { $($variant:ident),+ $(,)? }) => {
        impl From<$core> for v1::$wire {
            fn from(c: $core) -> Self {
                match c {
                    $($core::$variant => v1::$wire::$variant),+
                }
            }
        }

        impl TryFrom<v1::$wire> for $core {
            type Error = EnumError;
            fn try_from(w: v1::$wire) -> Result<Self, EnumError> {
                match w {
                    v1::$wire::Unspecified => Err(EnumError::Unspecified {
                        what: <v1::$wire as Word>::WHAT,
                    }),
                    $(v1::$wire::$variant => Ok($core::$variant)),+
                }
            }
        }
    };
}

words!(AttemptState, "attempt state", {
    Scheduled => "scheduled",
    Preparing => "preparing",
    Running => "running",
    Ended => "ended",
});
words!(AttemptEnd, "attempt end", {
    Completed => "completed",
    Failed => "failed",
    Canceled => "canceled",
    TimedOut => "timed_out",
    Preempted => "preempted",
    NodeLost => "node_lost",
});
core_pair!(AttemptEnd, CoreAttemptEnd, {
    Completed, Failed, Canceled, TimedOut, Preempted, NodeLost,
});
words!(CheckpointCause, "checkpoint cause", {
    Periodic => "periodic",
    Preempted => "preempted",
    Ended => "ended",
});
core_pair!(CheckpointCause, CoreCheckpointCause, { Periodic, Preempted, Ended });
words!(RunState, "run state", {
    Queued => "queued",
    Scheduled => "scheduled",
    Preparing => "preparing",
    Running => "running",
    Completed => "completed",
    Failed => "failed",
    Canceled => "canceled",
    TimedOut => "timed_out",
});
core_pair!(RunState, CoreRunState, {
    Queued, Scheduled, Preparing, Running, Completed, Failed, Canceled, TimedOut,
});
words!(NodeState, "node state", {
    Ready => "ready",
    Draining => "draining",
    Lost => "lost",
    Evicted => "evicted",
});
core_pair!(NodeState, CoreNodeState, { Ready, Draining, Lost, Evicted });
words!(ProvisionPhase, "provision phase", {
    Requested => "requested",
    Launched => "launched",
    Releasing => "releasing",
});
core_pair!(ProvisionPhase, CorePhase, { Requested, Launched, Releasing });
words!(StopReason, "stop reason", {
    Canceled => "canceled",
    Preempted => "preempted",
    Stale => "stale",
});
words!(PipelineState, "pipeline state", {
    Running => "running",
    Canceling => "canceling",
    Completed => "completed",
    Failed => "failed",
    Canceled => "canceled",
});
words!(StepState, "step state", {
    Pending => "pending",
    Reused => "reused",
    Queued => "queued",
    Scheduled => "scheduled",
    Preparing => "preparing",
    Running => "running",
    Completed => "completed",
    Failed => "failed",
    Canceled => "canceled",
    TimedOut => "timed_out",
});
words!(SweepState, "sweep state", {
    Running => "running",
    Canceling => "canceling",
    Completed => "completed",
    TimedOut => "timed_out",
    Canceled => "canceled",
});

impl From<CoreAttemptState> for v1::AttemptState {
    fn from(s: CoreAttemptState) -> Self {
        match s {
            CoreAttemptState::Scheduled => v1::AttemptState::Scheduled,
            CoreAttemptState::Preparing => v1::AttemptState::Preparing,
            CoreAttemptState::Running => v1::AttemptState::Running,
            CoreAttemptState::Ended(_) => v1::AttemptState::Ended,
        }
    }
}

impl From<CoreRunState> for v1::StepState {
    fn from(s: CoreRunState) -> Self {
        match s {
            CoreRunState::Queued => v1::StepState::Queued,
            CoreRunState::Scheduled => v1::StepState::Scheduled,
            CoreRunState::Preparing => v1::StepState::Preparing,
            CoreRunState::Running => v1::StepState::Running,
            CoreRunState::Completed => v1::StepState::Completed,
            CoreRunState::Failed => v1::StepState::Failed,
            CoreRunState::Canceled => v1::StepState::Canceled,
            CoreRunState::TimedOut => v1::StepState::TimedOut,
        }
    }
}

impl v1::RunState {
    /// Whether a run in this state is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            v1::RunState::Completed
                | v1::RunState::Failed
                | v1::RunState::Canceled
                | v1::RunState::TimedOut
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<W: Word + PartialEq + std::fmt::Debug + Into<i32>>() {
        for &v in W::ALL {
            assert_eq!(W::from_wire(v.into()), Ok(v));
            assert_eq!(W::from_word(v.word()), Ok(v));
            assert_eq!(W::word_of(v.into()), v.word());
        }
        assert_eq!(
            W::from_wire(0),
            Err(EnumError::Unspecified { what: W::WHAT })
        );
        assert_eq!(
            W::from_wire(99),
            Err(EnumError::Unknown {
                what: W::WHAT,
                value: 99
            })
        );
        assert_eq!(W::word_of(99), "unknown (99)");
    }

    #[test]
    fn every_enum_round_trips_and_an_unknown_value_is_an_error() {
        round_trips::<v1::AttemptState>();
        round_trips::<v1::AttemptEnd>();
        round_trips::<v1::RunState>();
        round_trips::<v1::NodeState>();
        round_trips::<v1::ProvisionPhase>();
        round_trips::<v1::StopReason>();
        round_trips::<v1::PipelineState>();
        round_trips::<v1::StepState>();
        round_trips::<v1::SweepState>();
    }

    #[test]
    fn core_values_round_trip_with_the_same_words() {
        for end in [
            CoreAttemptEnd::Completed,
            CoreAttemptEnd::Failed,
            CoreAttemptEnd::Canceled,
            CoreAttemptEnd::TimedOut,
            CoreAttemptEnd::Preempted,
            CoreAttemptEnd::NodeLost,
        ] {
            let wire = v1::AttemptEnd::from(end);
            assert_eq!(wire.word(), end.as_str());
            assert_eq!(
                decode_enum::<v1::AttemptEnd, CoreAttemptEnd>(wire.into()),
                Ok(end)
            );
        }
        for state in [
            CoreRunState::Queued,
            CoreRunState::Scheduled,
            CoreRunState::Preparing,
            CoreRunState::Running,
            CoreRunState::Completed,
            CoreRunState::Failed,
            CoreRunState::Canceled,
            CoreRunState::TimedOut,
        ] {
            let wire = v1::RunState::from(state);
            assert_eq!(wire.word(), state.as_str());
            assert_eq!(wire.is_terminal(), state.is_terminal());
            assert_eq!(v1::StepState::from(state).word(), state.as_str());
            assert_eq!(CoreRunState::try_from(wire), Ok(state));
        }
        assert_eq!(
            decode_enum::<v1::AttemptEnd, CoreAttemptEnd>(7),
            Err(EnumError::Unknown {
                what: "attempt end",
                value: 7
            })
        );
        assert!(CoreNodeState::try_from(v1::NodeState::Unspecified).is_err());
        assert_eq!(
            v1::RunState::from_word("done").unwrap_err(),
            "unknown run state \"done\": use one of queued, scheduled, preparing, running, completed, failed, canceled, timed_out"
        );
    }
}
