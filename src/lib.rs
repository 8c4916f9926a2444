#![doc = include_str!("../README.md")]
//!
//! This facade re-exports [`beam_model`] so the workspace's top-level `examples/` and `tests/`
//! build as one package.

pub use beam_model::*;
