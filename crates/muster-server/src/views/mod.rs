//! # views: read models, built once
//!
//! What a client reads — a compute target with its nodes' heartbeats, a run with why it waits, a sweep with its trials ranked, a run's
//! metrics, an attempt's logs — assembled here from the replicated state, the stores and
//! the leader's memory, for the gRPC services and the studio's pages alike (muster-proto
//! converts core types to wire messages; this layer decides what goes in).
//!
//! A pipeline and a compute target's own settings join nothing beyond the replicated
//! state, so their read model is muster-proto's conversion (`pipeline_to_wire`,
//! `compute_to_wire`), which the gRPC services and the studio call inside one read; what
//! joins the stores or the leader's memory (a compute target's status and nodes, runs,
//! sweeps, metrics, logs, archives) is built here.
//!
//! May import: `coordinator`, `store`, muster-core
//! and muster-proto. A view whose data lives only on the leader (a live run's metrics)
//! relays the read to the leader's API; it never imports the transport layers.

pub(crate) mod access;
pub(crate) mod archive;
pub(crate) mod compute;
pub(crate) mod logs;
pub(crate) mod metrics;
pub(crate) mod runs;
pub(crate) mod sweeps;
