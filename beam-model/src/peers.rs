//! Training-free peers of BEAM: rules that drop some of the K chosen experts from the router's
//! own numbers, with no learned parameters. They are what BEAM is compared against at matched
//! FLOPs. Every rule keeps at least the first-ranked expert of each token, so unlike BEAM they
//! never go below one expert per token.
//!
//! All rules run on the device from the router's outputs (no host read-back).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// A training-free rule deciding which of the K routed slots to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaskRule {
    /// Dynamic skipping (Lu et al. 2024, "Not All Experts are Equal"): drop slot `k` when
    /// `w_k / w_1 < beta`, with `w_1` the largest routing weight of the token.
    DynamicSkip {
        /// Relative-weight threshold in `[0, 1]`.
        beta: f64,
    },
    /// Top-p routing (Huang et al. 2024): keep the fewest highest-probability experts whose router
    /// probabilities sum to at least `p` (within the K chosen).
    TopP {
        /// Probability mass to keep, in `(0, 1]`.
        p: f64,
    },
    /// Entropy-adaptive K: a token keeps `clamp(ceil(alpha · K · H / ln E), 1, K)` experts, with
    /// `H` the entropy of its router distribution; confident tokens keep fewer.
    EntropyK {
        /// Scale of the entropy-to-K map (> 0).
        alpha: f64,
    },
    /// A fixed smaller K: every token keeps its `k` highest-weight slots (what an expert-count
    /// override does, e.g. llama.cpp's, but with the kept weights left as routed).
    FixedK {
        /// Slots kept per token, in `1..=K` (more than K keeps all).
        k: usize,
    },
}

impl MaskRule {
    /// Short name for tables and plots.
    pub fn name(&self) -> &'static str {
        match self {
            MaskRule::DynamicSkip { .. } => "dynamic-skip",
            MaskRule::TopP { .. } => "top-p",
            MaskRule::EntropyK { .. } => "entropy-k",
            MaskRule::FixedK { .. } => "fixed-k",
        }
    }

    /// The rule's parameter value.
    pub fn parameter(&self) -> f64 {
        match *self {
            MaskRule::DynamicSkip { beta } => beta,
            MaskRule::TopP { p } => p,
            MaskRule::EntropyK { alpha } => alpha,
            MaskRule::FixedK { k } => k as f64,
        }
    }

    /// The 0/1 mask of this rule.
    ///
    /// # Shapes
    /// - `scores`: the router's per-expert scores `[T, E]` (softmax probabilities, or sigmoid
    ///   scores, normalised here to sum to 1)
    /// - `expert_ids`, `weights`: the chosen experts and their routing weights `[T, K]`
    /// - output: `[T, K]`, 1.0 kept / 0.0 dropped
    pub fn mask<B: Backend>(
        &self,
        scores: Tensor<B, 2>,
        expert_ids: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let [_, experts] = scores.dims();
        let [_, top_k] = expert_ids.dims();
        // The normalised scores and the chosen experts' shares, for the rules that read them.
        let shares = || {
            let probs = scores.clone() / scores.clone().sum_dim(1);
            let chosen = probs.clone().gather(1, expert_ids.clone());
            (probs, chosen)
        };
        match *self {
            MaskRule::DynamicSkip { beta } => {
                let first = weights.clone().max_dim(1);
                weights.greater_equal(first.mul_scalar(beta)).float()
            }
            MaskRule::TopP { p } => {
                // Mass of the slots ranked before each slot; keep while it is still short of p.
                let (_, chosen) = shares();
                let before = ranked_before(chosen.clone());
                let mass_before = (before * chosen.unsqueeze_dim::<3>(1))
                    .sum_dim(2)
                    .squeeze_dim(2);
                mass_before.lower_elem(p).float()
            }
            MaskRule::EntropyK { alpha } => {
                let (probs, chosen) = shares();
                let entropy = (probs.clone() * probs.clamp_min(1e-30).log())
                    .sum_dim(1)
                    .neg();
                let scale = alpha * top_k as f64 / (experts as f64).ln();
                let keep = entropy.mul_scalar(scale).ceil().clamp(1.0, top_k as f64);
                let rank = ranked_before(chosen).sum_dim(2).squeeze_dim(2);
                rank.lower(keep).float()
            }
            MaskRule::FixedK { k } => {
                let rank = ranked_before(weights).sum_dim(2).squeeze_dim(2);
                rank.lower_elem(k as f64).float()
            }
        }
    }
}

/// `before[t, k, j] = 1` when slot `j` ranks before slot `k` for token `t` (higher value, ties
/// broken by slot index), so ranks do not depend on the rule's slot order.
///
/// # Shapes
/// - `values`: `[T, K]` → `[T, K, K]`
fn ranked_before<B: Backend>(values: Tensor<B, 2>) -> Tensor<B, 3> {
    let [tokens, top_k] = values.dims();
    let device = values.device();
    let own = values.clone().unsqueeze_dim::<3>(2).repeat_dim(2, top_k);
    let other = values.unsqueeze_dim::<3>(1).repeat_dim(1, top_k);
    let higher = other.clone().greater(own.clone()).float();
    let tie = other.equal(own).float();
    // Lower triangle (j < k): an equal value earlier in slot order ranks first.
    let earlier = Tensor::<B, 2>::ones([top_k, top_k], &device)
        .tril(-1)
        .unsqueeze_dim::<3>(0)
        .repeat_dim(0, tokens);
    higher + tie * earlier
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray<f32>;

    fn run(
        rule: MaskRule,
        scores: [[f32; 4]; 2],
        ids: [[i64; 3]; 2],
        weights: [[f32; 3]; 2],
    ) -> Vec<f32> {
        let device = Default::default();
        rule.mask(
            Tensor::<B, 2>::from_data(scores, &device),
            Tensor::<B, 2, Int>::from_data(TensorData::from(ids), &device),
            Tensor::<B, 2>::from_data(weights, &device),
        )
        .into_data()
        .to_vec()
        .unwrap()
    }

    const SCORES: [[f32; 4]; 2] = [[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]];
    const IDS: [[i64; 3]; 2] = [[0, 1, 2], [3, 1, 0]];
    const WEIGHTS: [[f32; 3]; 2] = [[0.5, 0.3, 0.15], [0.25, 0.25, 0.25]];

    #[test]
    fn dynamic_skip_drops_slots_below_beta_times_the_largest_weight() {
        let mask = run(MaskRule::DynamicSkip { beta: 0.4 }, SCORES, IDS, WEIGHTS);
        assert_eq!(mask, vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn top_p_keeps_the_fewest_slots_reaching_p() {
        // Token 0: 0.5 < 0.7 → keep, 0.5 + 0.3 ≥ 0.7 → drop the third.
        let mask = run(MaskRule::TopP { p: 0.7 }, SCORES, IDS, WEIGHTS);
        assert_eq!(mask, vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
        let mask = run(MaskRule::TopP { p: 0.5 }, SCORES, IDS, WEIGHTS);
        assert_eq!(mask, vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn fixed_k_keeps_the_k_highest_weight_slots() {
        // Token 1's weights tie: slot order breaks the tie.
        let weights = [[0.15, 0.5, 0.3], [0.25, 0.25, 0.25]];
        let mask = run(MaskRule::FixedK { k: 1 }, SCORES, IDS, weights);
        assert_eq!(mask, vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
        let mask = run(MaskRule::FixedK { k: 2 }, SCORES, IDS, weights);
        assert_eq!(mask, vec![0.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        let mask = run(MaskRule::FixedK { k: 5 }, SCORES, IDS, weights);
        assert!(mask.iter().all(|m| *m == 1.0));
    }

    #[test]
    fn entropy_k_keeps_fewer_experts_for_confident_tokens() {
        // Token 0 entropy 1.14 nats → ceil(0.5·3·1.14/ln 4) = 2; token 1 uniform → ceil(1.5) = 2
        // (equal probabilities rank by slot); alpha 0.2 → 1 each.
        let mask = run(MaskRule::EntropyK { alpha: 0.5 }, SCORES, IDS, WEIGHTS);
        assert_eq!(mask, vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
        let mask = run(MaskRule::EntropyK { alpha: 0.2 }, SCORES, IDS, WEIGHTS);
        assert_eq!(mask, vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    }
}
