//! Bridges raft-rs's slog logger to `tracing`, so raft-rs never prints on its own.
//!
//! Events use the target `raft`; their key-value pairs are rendered into a `kv` field.

use std::fmt::{self, Write as _};

use slog::{Drain, KV, Level, Never, OwnedKVList, Record};

/// A slog drain that re-emits every record as a `tracing` event with target `raft`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TracingDrain;

/// A slog root logger forwarding to `tracing`.
pub(crate) fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

macro_rules! forward {
    ($level:expr, $record:expr, $values:expr) => {
        if tracing::enabled!(target: "raft", $level) {
            let kv = render_kv($record, $values);
            tracing::event!(target: "raft", $level, kv = %kv, "{}", $record.msg());
        }
    };
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), Never> {
        match record.level() {
            Level::Critical | Level::Error => forward!(tracing::Level::ERROR, record, values),
            Level::Warning => forward!(tracing::Level::WARN, record, values),
            Level::Info => forward!(tracing::Level::INFO, record, values),
            Level::Debug => forward!(tracing::Level::DEBUG, record, values),
            Level::Trace => forward!(tracing::Level::TRACE, record, values),
        }
        Ok(())
    }
}

/// `key=value` pairs of the record, then of the logger, space separated.
fn render_kv(record: &Record<'_>, values: &OwnedKVList) -> String {
    let mut out = KvString(String::new());
    // Rendering into a String cannot fail; a failing KV impl only loses its own pairs.
    let _ = record.kv().serialize(record, &mut out);
    let _ = values.serialize(record, &mut out);
    out.0
}

struct KvString(String);

impl slog::Serializer for KvString {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments<'_>) -> slog::Result {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = write!(self.0, "{key}={val}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logging_through_the_bridge_does_not_panic() {
        let log = logger().new(slog::o!("raft_id" => 3u64));
        slog::info!(log, "became leader"; "term" => 2u64);
        slog::debug!(log, "debug line");
        slog::error!(log, "error line");
    }
}
