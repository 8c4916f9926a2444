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
        // One element, whatever the shape: the loader replaces it at once, and a full-size empty
        // tensor is zero-filled by some backends (ndarray), which for the experts of a real
        // checkpoint meant writing gigabytes that were thrown away.
        Init::Placeholder => {
            let _ = shape;
            Tensor::empty([1; D], device)
        }
    })
}

/// How weights are created.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// `N(0, std²)`.
    Normal(f64),
    /// One-element stand-ins for weights a checkpoint overwrites right away (no random draws, no
    /// full-size allocation).
    Placeholder,
}
