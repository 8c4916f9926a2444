//! Parameter initialisation shared by the layer's modules.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

/// A parameter drawn from `N(0, std²)`, materialised now.
///
/// burn's `Initializer` makes *lazy* parameters: a module cloned before its first forward clones
/// the initialiser, and every clone then draws different weights. Eager parameters make
/// `layer.clone()` a true copy whenever it happens.
pub(crate) fn normal_param<B: Backend, const D: usize>(
    shape: [usize; D],
    init: Init,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(match init {
        Init::Normal(std) => Tensor::random(shape, Distribution::Normal(0.0, std), device),
        Init::Placeholder => Tensor::empty(shape, device),
    })
}

/// How weights are created.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// `N(0, std²)`.
    Normal(f64),
    /// Uninitialised memory for weights a checkpoint overwrites right away (no random draws).
    Placeholder,
}
