//! Auxiliary losses: BEAM's sparsity term and the base model's load-balance term.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::config::{SparsityLossConfig, SparsityPenalty};

/// The mean active fraction the sparsity term penalises: the mean over tokens and slots of the
/// mask probability or of the straight-through mask, per `penalty`.
///
/// # Shapes
/// - `probs`, `ste_mask`: `[T, K]`; output `[1]`
pub fn active_fraction<B: Backend>(
    probs: Tensor<B, 2>,
    ste_mask: Tensor<B, 2>,
    penalty: SparsityPenalty,
) -> Tensor<B, 1> {
    match penalty {
        SparsityPenalty::Probability => probs.mean(),
        SparsityPenalty::SteMask => ste_mask.mean(),
    }
}

/// `L_sparse` from an [`active_fraction`] `a`: `a` itself, or `(a − target)²` when a target
/// active fraction is set.
///
/// # Shapes
/// - `active`: `[1]`; output `[1]`
pub fn sparsity_penalty<B: Backend>(active: Tensor<B, 1>, target: Option<f64>) -> Tensor<B, 1> {
    match target {
        Some(target) => (active - target).powi_scalar(2),
        None => active,
    }
}

/// `L_sparse`: the mean over tokens and slots of the mask probability (or of the straight-through
/// mask), or `(mean − target)²` when a target active fraction is set.
///
/// # Shapes
/// - `probs`, `ste_mask`: `[T, K]`; output `[1]`
pub fn sparsity_loss<B: Backend>(
    probs: Tensor<B, 2>,
    ste_mask: Tensor<B, 2>,
    config: &SparsityLossConfig,
) -> Tensor<B, 1> {
    sparsity_penalty(
        active_fraction(probs, ste_mask, config.penalty),
        config.target_active_fraction,
    )
}

/// Switch-Transformer load-balance loss as transformers' `load_balancing_loss_func` computes it
/// for one layer: `E · Σ_e f_e · P_e`, with `f_e` the number of top-K assignments to expert `e`
/// per token and `P_e` the mean softmax probability of `e`.
///
/// # Shapes
/// - `router_logits`: `[T, E]`, `expert_ids`: `[T, K]`; output `[1]`
pub fn load_balance_loss<B: Backend>(
    router_logits: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    let [tokens, experts] = router_logits.dims();
    let probs_per_expert = softmax(router_logits, 1).mean_dim(0).reshape([experts]);
    let assignments: Tensor<B, 3> = expert_ids.one_hot(experts).float();
    let tokens_per_expert = assignments
        .sum_dim(1)
        .sum_dim(0)
        .reshape([experts])
        .div_scalar(tokens as f64);
    (tokens_per_expert * probs_per_expert)
        .sum()
        .mul_scalar(experts as f64)
}
