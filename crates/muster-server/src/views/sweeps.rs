//! A sweep as the API and the studio show it, and the trials' primary-metric series the
//! sweep controller decides on.

use muster_core::metrics::Series;
use muster_core::state::Sweep;
use muster_proto::sweep_to_wire;
use muster_proto::v1;

use crate::server::Server;

/// A sweep as the API (and the web UI) shows it: its trials ranked by the primary metric
/// (muster-core's `rank_trials`, through `sweep_to_wire`), each trial's series read from
/// this server's metric store.
pub(crate) fn sweep_view(server: &Server, sweep: &Sweep) -> v1::Sweep {
    let series = trial_series(server, sweep);
    server
        .coordinator
        .read(|s| sweep_to_wire(s, sweep, &series))
}

/// Each trial's primary-metric series from the metric store, in trial order (empty for
/// a trial that logged none yet).
pub(crate) fn trial_series(server: &Server, sweep: &Sweep) -> Vec<Series> {
    let metric = &sweep.spec.objective.primary_metric;
    sweep
        .trials
        .iter()
        .map(|t| {
            server
                .store
                .series
                .series(&t.run_id, metric)
                .unwrap_or_default()
        })
        .collect()
}
