//! The counters a server keeps (rendered at `/metrics` by `web/prometheus.rs`); gauges of
//! the state are computed at scrape time. A leaf: imports only `prometheus-client`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Counters the server keeps; gauges of the state are computed at scrape time.
#[derive(Debug)]
pub struct Metrics {
    pub(crate) proposals: Counter,
    pub(crate) runs_submitted: Counter,
    pub(crate) schedule_seconds: Histogram,
    pub(crate) placements: Counter,
    pub(crate) last_pass_micros: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            proposals: Counter::default(),
            runs_submitted: Counter::default(),
            schedule_seconds: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
            placements: Counter::default(),
            last_pass_micros: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub(crate) fn observe_schedule(&self, took: Duration, placed: usize) {
        self.schedule_seconds.observe(took.as_secs_f64());
        self.placements.inc_by(placed as u64);
        self.last_pass_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
    }
}
