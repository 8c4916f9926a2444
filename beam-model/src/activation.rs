//! Activations computed in the backend's own float precision (`sigmoid`, `silu`), defined in
//! `beam-kernels` beside the reference that uses them and re-exported here for the layer.

pub use beam_kernels::activation::{sigmoid, silu};
