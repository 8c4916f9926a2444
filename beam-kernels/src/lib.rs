//! # beam-kernels
//!
//! cubecl kernels for BEAM's fast path on burn's CUDA and wgpu backends: device-side routing
//! compaction and grouped SwiGLU expert GEMMs that skip masked (token, expert) pairs.
//!
//! Not implemented yet (tracked by the kernels issue). Until then every backend runs the
//! reference implementation of [`beam_model::MoeBackend`](../beam_model/dispatch/trait.MoeBackend.html),
//! which already skips masked pairs. The kernels will be plugged in as `MoeBackend`
//! implementations for the cubecl backends, so layers need no change.
