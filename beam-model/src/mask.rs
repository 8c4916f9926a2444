//! Step 2 — the BEAM mask router: a lightweight linear layer that switches off some of the K
//! experts the base router picked, with a straight-through estimator (STE) for training.

use crate::activation::sigmoid;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::config::{BeamMoeConfig, MaskRouterShape};

/// The mask router: one logit `z_k` per selected slot, `p_k = sigmoid(z_k)`, `m_k = 1[p_k > τ]`.
///
/// Its weights start at zero and its bias at `beam.init_bias > logit(τ)`, so every mask starts at
/// 1 and training starts from the top-K model.
///
/// # Shapes
/// - `proj`: `Linear(H → E)` ([`MaskRouterShape::PerExpert`], gathered at the top-K ids) or
///   `Linear(H → K)` ([`MaskRouterShape::PerSlot`])
/// - input: `[T, H]` and top-K ids `[T, K]`; outputs: see [`MaskDecision`]
#[derive(Module, Debug)]
pub struct MaskRouter<B: Backend> {
    /// The projection producing the mask logits.
    pub proj: Linear<B>,
    #[module(skip)]
    shape: MaskRouterShape,
    #[module(skip)]
    threshold: f64,
}

/// The mask for a batch of tokens, all `[T, K]` and aligned with the router's slots.
#[derive(Debug, Clone)]
pub struct MaskDecision<B: Backend> {
    /// Mask logits `z`.
    pub logits: Tensor<B, 2>,
    /// Mask probabilities `p = sigmoid(z)`.
    pub probs: Tensor<B, 2>,
    /// The binary mask `1[p > τ]` as 0.0 / 1.0 (no gradient).
    pub hard: Tensor<B, 2>,
    /// Straight-through mask: exactly `hard` forward, gradient `∂p/∂z` backward.
    pub ste: Tensor<B, 2>,
}

impl<B: Backend> MaskRouter<B> {
    /// A mask router for `config` whose masks all start at 1.
    pub fn new(config: &BeamMoeConfig, device: &B::Device) -> Self {
        let outputs = config.mask_router_outputs();
        // Eager (not burn's lazy `Initializer`), so clones share the same values; see `init.rs`.
        let weight = Param::from_tensor(Tensor::zeros([config.hidden_size, outputs], device));
        let bias = Param::from_tensor(Tensor::full([outputs], config.beam.init_bias, device));
        Self {
            proj: Linear {
                weight,
                bias: Some(bias),
            },
            shape: config.beam.shape,
            threshold: config.beam.threshold,
        }
    }

    /// The threshold τ.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The router shape.
    pub fn shape(&self) -> MaskRouterShape {
        self.shape
    }

    /// Same router with another threshold τ (e.g. to trade quality for speed at inference).
    ///
    /// # Panics
    /// If `threshold` is not in `(0, 1)`.
    pub fn with_threshold(mut self, threshold: f64) -> Self {
        assert!(
            threshold > 0.0 && threshold < 1.0,
            "mask threshold {threshold} must lie strictly between 0 and 1"
        );
        self.threshold = threshold;
        self
    }

    /// Mask logits `[T, K]` for tokens `x` (`[T, H]`) routed to `expert_ids` (`[T, K]`).
    pub fn logits(&self, x: Tensor<B, 2>, expert_ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let z = self.proj.forward(x);
        match self.shape {
            MaskRouterShape::PerExpert => z.gather(1, expert_ids),
            MaskRouterShape::PerSlot => z,
        }
    }

    /// Decides the mask for tokens `x` routed to `expert_ids`.
    pub fn forward(&self, x: Tensor<B, 2>, expert_ids: Tensor<B, 2, Int>) -> MaskDecision<B> {
        let logits = self.logits(x, expert_ids);
        let probs = sigmoid(logits.clone());
        let hard = probs.clone().detach().greater_elem(self.threshold).float();
        let ste = straight_through(hard.clone(), probs.clone());
        MaskDecision {
            logits,
            probs,
            hard,
            ste,
        }
    }
}

/// `hard + (p − stopgrad(p))`: the value is exactly `hard` (since `p − p = 0` in floating point)
/// while the gradient flows to `p` unchanged.
pub fn straight_through<B: Backend, const D: usize>(
    hard: Tensor<B, D>,
    probs: Tensor<B, D>,
) -> Tensor<B, D> {
    hard + (probs.clone() - probs.detach())
}
