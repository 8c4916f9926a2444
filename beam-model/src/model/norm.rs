//! RMSNorm as transformers computes it: `w · x / sqrt(mean(x²) + ε)`.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Root-mean-square normalisation over the last dimension.
///
/// # Shapes
/// - weight: `[N]`; input `[..., N]` → output `[..., N]`
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale `[N]`.
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A norm with weight `weight`.
    pub fn new(weight: Param<Tensor<B, 1>>, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// Normalises the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let rms = x
            .clone()
            .powi_scalar(2)
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        let weight = self.weight.val().unsqueeze::<D>();
        x / rms * weight
    }
}
