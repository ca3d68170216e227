//! The Docker executor (being written).
