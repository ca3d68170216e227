//! # muster-proto: the wire types
//!
//! Generated tonic/prost code for `proto/muster/v1/*.proto` (compiled with protox, so no
//! system `protoc` is needed) and the conversions between wire types and muster-core's
//! domain types. No logic lives here beyond those conversions.

#![allow(missing_docs, missing_debug_implementations)]

mod convert;
mod enums;

/// The generated code of package `muster.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("muster.v1");
}

pub use convert::*;
pub use enums::{EnumError, Word, decode_enum};
pub use v1::*;

/// The encoded file descriptor set of the API, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/muster_descriptor.bin"));
