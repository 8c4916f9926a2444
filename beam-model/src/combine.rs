//! Step 4 — combine: the layer output
//! `y = Σ_k m_k · w_k · Expert_{i_k}(x) + S(x)`.
//!
//! The weighted sum over the kept slots is the last stage of the grouped-experts op
//! ([`crate::experts::Experts::forward`]): every backend adds each token's slot rows in slot order,
//! so the result does not depend on how the work was split. What is left here is the always-on
//! shared expert `S`, which BEAM never masks.

use burn::tensor::Tensor;

use crate::experts::SharedExpert;
use beam_kernels::LinearBackend;

/// `routed + shared(x)`, or `routed` alone for a layer without a shared expert.
///
/// # Shapes
/// - `routed`, `x`: `[T, H]`; output `[T, H]`
pub fn combine<B: LinearBackend>(
    routed: Tensor<B, 2>,
    shared: Option<&SharedExpert<B>>,
    x: Tensor<B, 2>,
) -> Tensor<B, 2> {
    match shared {
        Some(shared) => routed + shared.forward(x),
        None => routed,
    }
}
