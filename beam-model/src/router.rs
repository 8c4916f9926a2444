//! Step 1 — the base top-K router, unchanged by BEAM: picks K experts per token and their weights
//! with the family's exact rule ([`RoutingRule`]).

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;

use crate::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::config::{BeamMoeConfig, GroupLimit, RoutingRule};
use crate::init::{normal_param, Init};
use beam_kernels::{linear_out_in, LinearBackend};

/// The base router: `logits = x · W_gᵀ`, then the family's selection rule.
///
/// # Shapes
/// - weight: `[E, H]` (the layout of `mlp.gate.weight` on disk)
/// - input: `[T, H]`; outputs: see [`RouterOutput`]
#[derive(Module, Debug)]
pub struct Router<B: Backend> {
    /// Gate weight `[E, H]`.
    pub weight: Param<Tensor<B, 2>>,
    /// DeepSeek-V3 `e_score_correction_bias` `[E]`: shifts which experts are chosen, not their
    /// weights. `None` for the other rules.
    pub score_correction_bias: Option<Param<Tensor<B, 1>>>,
    #[module(skip)]
    rule: RoutingRule,
    #[module(skip)]
    top_k: usize,
}

/// What the router decided for a batch of tokens.
#[derive(Debug, Clone)]
pub struct RouterOutput<B: Backend> {
    /// Router logits `[T, E]`.
    pub logits: Tensor<B, 2>,
    /// The rule's per-expert scores `[T, E]` (softmax probabilities, or sigmoid scores for
    /// DeepSeek-V3).
    pub scores: Tensor<B, 2>,
    /// Chosen experts `[T, K]`, in the rule's slot order (descending score for softmax rules).
    pub expert_ids: Tensor<B, 2, Int>,
    /// Routing weights `[T, K]` of the chosen experts (renormalised / scaled per the rule).
    /// Differentiable with respect to the gate weight; the choice itself is not.
    pub weights: Tensor<B, 2>,
}

impl<B: Backend> Router<B> {
    /// A router with normally initialised weights (std `config.init_std`).
    pub fn new(config: &BeamMoeConfig, device: &B::Device) -> Self {
        Self::build(config, Init::Normal(config.init_std), device)
    }

    pub(crate) fn build(config: &BeamMoeConfig, init: Init, device: &B::Device) -> Self {
        let score_correction_bias = matches!(config.routing, RoutingRule::DeepSeekV3 { .. })
            .then(|| Param::from_tensor(Tensor::zeros([config.num_experts], device)));
        Self {
            weight: normal_param([config.num_experts, config.hidden_size], init, device),
            score_correction_bias,
            rule: config.routing.clone(),
            top_k: config.top_k,
        }
    }

    /// The routing rule.
    pub fn rule(&self) -> &RoutingRule {
        &self.rule
    }
}

impl<B: LinearBackend> Router<B> {
    /// Routes `x` (`[T, H]`).
    pub fn forward(&self, x: Tensor<B, 2>) -> RouterOutput<B> {
        let logits = linear_out_in(x, self.weight.val());
        let k = self.top_k;
        let (scores, expert_ids, weights) = match &self.rule {
            RoutingRule::Softmax { normalize_top_k } => {
                let scores = softmax(logits.clone(), 1);
                let ids = top_k_ids(scores.clone(), k);
                let mut weights = scores.clone().gather(1, ids.clone());
                if *normalize_top_k {
                    weights = weights.clone() / weights.sum_dim(1);
                }
                (scores, ids, weights)
            }
            RoutingRule::DeepSeekV2 {
                group,
                routed_scaling_factor,
            } => {
                let scores = softmax(logits.clone(), 1);
                let choice = match group {
                    // A group's score is its best expert; other groups' experts drop to 0.
                    Some(group) => {
                        let group_scores = grouped(scores.clone(), group).max_dim(2);
                        restrict_to_groups(scores.clone(), group_scores, group, 0.0)
                    }
                    None => scores.clone(),
                };
                let ids = top_k_ids(choice, k);
                let weights = scores.clone().gather(1, ids.clone()) * *routed_scaling_factor;
                (scores, ids, weights)
            }
            RoutingRule::DeepSeekV3 {
                group,
                normalize_top_k,
                routed_scaling_factor,
            } => {
                let scores = sigmoid(logits.clone());
                let bias = self
                    .score_correction_bias
                    .as_ref()
                    .expect("DeepSeek-V3 router always holds a correction bias")
                    .val();
                let choice = scores.clone().detach() + bias.detach().unsqueeze_dim(0);
                // A group's score is the sum of its two best (bias-corrected) experts.
                let group_scores = grouped(choice.clone(), group)
                    .sort_descending(2)
                    .narrow(2, 0, 2)
                    .sum_dim(2);
                let choice = restrict_to_groups(choice, group_scores, group, f32::NEG_INFINITY);
                let ids = top_k_ids(choice, k);
                let mut weights = scores.clone().gather(1, ids.clone());
                if *normalize_top_k {
                    weights = weights.clone() / (weights.sum_dim(1) + 1e-20);
                }
                (scores, ids, weights * *routed_scaling_factor)
            }
        };
        RouterOutput {
            logits,
            scores,
            expert_ids,
            weights,
        }
    }
}

/// Indices of the `k` largest entries of each row (selection carries no gradient).
fn top_k_ids<B: Backend>(scores: Tensor<B, 2>, k: usize) -> Tensor<B, 2, Int> {
    scores.detach().topk_with_indices(k, 1).1
}

/// `[T, E]` → `[T, n_group, E / n_group]`.
fn grouped<B: Backend>(scores: Tensor<B, 2>, group: &GroupLimit) -> Tensor<B, 3> {
    let [tokens, experts] = scores.dims();
    scores.reshape([tokens, group.n_group, experts / group.n_group])
}

/// Replaces the scores of experts outside the `topk_group` best groups by `fill`.
///
/// `group_scores`: `[T, n_group, 1]`.
fn restrict_to_groups<B: Backend>(
    scores: Tensor<B, 2>,
    group_scores: Tensor<B, 3>,
    group: &GroupLimit,
    fill: f32,
) -> Tensor<B, 2> {
    let [tokens, experts] = scores.dims();
    let group_scores = group_scores.detach().reshape([tokens, group.n_group]);
    let best_groups = group_scores
        .clone()
        .topk_with_indices(group.topk_group, 1)
        .1;
    let chosen = group_scores
        .zeros_like()
        .scatter(
            1,
            best_groups.clone(),
            best_groups.ones_like().float(),
            burn::tensor::IndexingUpdateOp::Add,
        )
        .unsqueeze_dim::<3>(2)
        .repeat_dim(2, experts / group.n_group)
        .reshape([tokens, experts]);
    scores.mask_fill(chosen.lower_elem(0.5), fill)
}
