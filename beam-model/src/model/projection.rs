//! A linear projection as checkpoints store it: weight `[out, in]` (float or q8) and an optional
//! bias, applied to `[B, T, in]` activations.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::weight::Weight;
use beam_kernels::LinearBackend;

/// A linear projection stored as on disk: weight `[out, in]`, optional bias `[out]`.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    /// Weight `[out, in]` (float or q8).
    pub weight: Weight<B, 2>,
    /// Bias `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: LinearBackend> Projection<B> {
    /// `x · Wᵀ + b` on `[B, T, in]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, tokens, input] = x.dims();
        let y = self.weight.linear(x.reshape([batch * tokens, input]));
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze::<2>(),
            None => y,
        };
        let [_, out] = y.dims();
        y.reshape([batch, tokens, out])
    }
}
