//! Parameter initialisation shared by the layer's modules.

use burn::module::{Initializer, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// A parameter drawn from `N(0, std²)`.
pub(crate) fn normal_param<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Initializer::Normal { mean: 0.0, std }.init(shape, device)
}
