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
//! [`router`] → [`mask`] → [`dispatch`] → [`experts`] → [`combine`], assembled in [`BeamMoe`].
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
//! The layer is generic over any backend implementing [`MoeBackend`], the backend extension that
//! runs grouped experts (a reference implementation from plain tensor ops for ndarray and
//! autodiff; cubecl kernels for CUDA and wgpu in `beam-kernels`).
#![warn(missing_docs)]

pub mod activation;
pub mod checkpoint;
pub mod combine;
pub mod config;
pub mod dispatch;
pub mod experts;
pub mod flops;
mod init;
pub mod layer;
pub mod loss;
pub mod mask;
pub mod model;
pub mod peers;
pub mod router;

pub use config::{
    BeamMaskConfig, BeamMoeConfig, ConfigError, GroupLimit, MaskRouterShape, RoutingRule,
    SharedExpertConfig, SparsityLossConfig, SparsityPenalty,
};
pub use dispatch::MoeBackend;
pub use flops::{moe_layer_flops, FlopsReport, MoeFlops};
pub use layer::{BeamMoe, BeamMoeOutput, MaskSource, RoutingFacts};
pub use peers::MaskRule;

/// Backends this crate implements [`MoeBackend`] for, re-exported for convenience.
pub mod backend {
    #[cfg(feature = "autodiff")]
    pub use burn::backend::Autodiff;
    #[cfg(feature = "ndarray")]
    pub use burn::backend::NdArray;
}
