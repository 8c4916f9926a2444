//! # beam-model
//!
//! A Mixture-of-Experts layer for [burn](https://burn.dev) with **BEAM** (Binary Expert
//! Activation Masking): a small learned mask router switches off some of the K experts the base
//! top-K router picked, per token, so easy tokens run fewer experts. Masked experts cost nothing
//! at inference: they are dropped before tokens are grouped by expert. The mask is trained with a
//! straight-through estimator (hard 0/1 forward, sigmoid gradient backward) and an auxiliary
//! sparsity loss, so training and inference see the same sparsity.
//!
//! The layer reads as the method, one module per step:
//! [`router`] → [`mask`] → [`experts`] → [`combine`], assembled in [`layer`] ([`BeamMoe`]).
//!
//! ```
//! use beam_model::{BeamMoeConfig, RoutingRule, backend::NdArray};
//! use burn::tensor::{Distribution, Tensor};
//!
//! let device = Default::default();
//! let config = BeamMoeConfig::new(64, 32, 8, 2).with_routing(RoutingRule::mixtral());
//! let layer = config.init::<NdArray>(&device);
//! let out = layer.forward(Tensor::random([1, 4, 64], Distribution::Default, &device));
//! println!("kept {} of {} pairs, FLOPs cut {:.1}%", out.facts.kept_pairs(), 4 * 2,
//!          100.0 * out.facts.flops(&config).reduction());
//! ```
//!
//! The layer is generic over any backend implementing [`MoeBackend`], the backend extension of
//! the `beam-kernels` crate (re-exported as [`kernels`]): its grouped-experts op
//! ([`GroupedExpertsBackend`]) and its `[out, in]` linear op ([`LinearBackend`]), with host
//! kernels for ndarray, cubecl kernels for CUDA and wgpu, and a reference from plain tensor ops
//! for autodiff and any other backend. No file of this crate names a backend's storage type.
#![warn(missing_docs)]

pub use beam_kernels as kernels;

pub mod activation;
pub mod checkpoint;
pub mod combine;
pub mod config;
pub mod experts;
pub mod flops;
mod init;
pub mod layer;
pub mod loss;
pub mod mask;
pub mod model;
pub mod peers;
pub mod router;
pub mod weight;

pub use beam_kernels::{
    grouped_experts, linear_out_in, GroupedExpertsBackend, LinearBackend, MoeBackend,
};
pub use config::{
    BeamMaskConfig, BeamMoeConfig, ConfigError, GroupLimit, MaskRouterShape, RoutingRule,
    SharedExpertConfig, SparsityLossConfig, SparsityPenalty,
};
pub use flops::{moe_layer_flops, FlopsReport, MoeFlops};
pub use layer::{BeamMoe, BeamMoeOutput, MaskSource, RoutingFacts};
pub use peers::MaskRule;

/// Where the old `dispatch` module's items live now.
#[deprecated(
    since = "0.1.0",
    note = "the backend extension moved to `beam_kernels` (re-exported as `beam_model::kernels`); \
            `drop_masked_slots` is in `beam_model::mask`"
)]
pub mod dispatch {
    pub use crate::mask::drop_masked_slots;
    pub use beam_kernels::reference::{dense_experts_reference, grouped_experts_reference};
    pub use beam_kernels::{grouped_experts, linear_out_in, DispatchPlan, MoeBackend};
}

/// Backends `beam-kernels` implements [`MoeBackend`] for (with this crate's features on),
/// re-exported for convenience.
pub mod backend {
    #[cfg(feature = "autodiff")]
    pub use burn::backend::Autodiff;
    #[cfg(feature = "ndarray")]
    pub use burn::backend::NdArray;
}
