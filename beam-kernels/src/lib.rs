//! # beam-kernels
//!
//! BEAM's hot path as [cubecl](https://github.com/tracel-ai/cubecl) kernels for burn's CUDA and
//! wgpu backends, with a host reference beside every kernel. A masked (token, expert) pair costs
//! nothing: it is dropped on the device before any expert work, so its expert's weights are never
//! read.
//!
//! The pipeline, one kernel each (`kernel.rs`), launched by [`masked_moe`] (`forward.rs`):
//!
//! 1. **routing compaction** ([`compact_routes`]): per-expert counts, prefix sum and the kept
//!    (token, slot) list sorted by expert, with masked slots dropped; no read-back to the host;
//! 2. **gate+up GEMM** over each expert's pairs with `silu(g) ⊙ u` in the epilogue;
//! 3. **down GEMM** with the routing weight in the epilogue, one output row per kept slot;
//! 4. **combine**: each token sums its K slot rows in a fixed order (deterministic, no atomics).
//!
//! Steps 2–3 have two regimes chosen from the shape ([`Regime::from_shape`]): **decode** (few
//! tokens per expert: GEMV, vectorised loads, weight-bandwidth bound) and **prefill** (many tokens
//! per expert: shared-memory tiled GEMM).
//!
//! `beam-model` plugs [`masked_moe`] into its `MoeBackend` extension for burn's `CubeBackend`
//! (and `Fusion<CubeBackend>`), so burn's `Cuda` / `Wgpu` users get it with no change to their
//! model. Training (`Autodiff<…>`) uses beam-model's reference path, built from burn tensor ops,
//! whose gradients autodiff derives exactly.
//!
//! On the CPU, [`host`] runs the same pipeline as host GEMVs on borrowed weight slices (AVX2+FMA
//! when the CPU has them, rayon over row blocks); `beam-model` uses it for burn's ndarray backend
//! whenever few pairs per expert are kept, and [`host::linear`] for its `[out, in]` linear layers.
//!
//! Without the `cubecl` feature only the host code builds: [`host`] and the references
//! ([`reference`]).

pub mod host;
pub mod reference;

#[cfg(feature = "cubecl")]
pub mod kernel;

#[cfg(feature = "cubecl")]
mod forward;
#[cfg(feature = "cubecl")]
pub use forward::{compact_routes, masked_moe, CompactRoutes};

/// Which expert-GEMM kernels [`masked_moe`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regime {
    /// Few tokens per expert: one GEMV per (weight row block, expert), weight-bandwidth bound.
    Decode,
    /// Many tokens per expert: a tiled GEMM per expert that reads each weight tile once per
    /// 64-token row tile.
    Prefill,
}

impl Regime {
    /// Decode while an expert would get at most [`DECODE_MAX_PAIRS_PER_EXPERT`] pairs on average
    /// (`T · K / E`, the unmasked load), prefill above. Chosen from shapes only, never from the
    /// device-side routing, so no read-back is needed.
    pub fn from_shape(tokens: usize, top_k: usize, experts: usize) -> Self {
        if tokens * top_k <= DECODE_MAX_PAIRS_PER_EXPERT * experts.max(1) {
            Regime::Decode
        } else {
            Regime::Prefill
        }
    }
}

/// Mean pairs per expert up to which [`Regime::from_shape`] picks the GEMV kernels: a GEMV re-reads
/// an expert's weights (from cache) for each of its tokens, a 64-row tile wastes most of its work
/// on a handful of tokens.
pub const DECODE_MAX_PAIRS_PER_EXPERT: usize = 4;

/// Options of [`masked_moe`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskedMoeOptions {
    /// Force a regime; `None` picks it with [`Regime::from_shape`].
    pub regime: Option<Regime>,
    /// Fill every scratch and output buffer with NaN (`u32::MAX` for indices) before the kernels
    /// run, so an element a kernel fails to write shows up. For tests; costs extra fills.
    pub poison: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regime_follows_tokens_per_expert() {
        // OLMoE-like E = 64, K = 8: decode up to T = 32, prefill from there.
        assert_eq!(Regime::from_shape(1, 8, 64), Regime::Decode);
        assert_eq!(Regime::from_shape(16, 8, 64), Regime::Decode);
        assert_eq!(Regime::from_shape(32, 8, 64), Regime::Decode);
        assert_eq!(Regime::from_shape(33, 8, 64), Regime::Prefill);
        assert_eq!(Regime::from_shape(512, 8, 64), Regime::Prefill);
        assert_eq!(Regime::from_shape(0, 8, 64), Regime::Decode);
    }
}
