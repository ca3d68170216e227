//! One module per noun (the daemon subcommands are run by the `muster` crate).

pub mod access;
pub mod attach;
pub mod cluster;
pub mod component;
pub mod compute;
pub mod data;
pub mod metrics;
pub mod node;
pub mod pipeline;
pub mod run;
pub mod secret;
pub mod sweep;
