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
    /// Per-output scale `a` of the relative log routing weight (`[E]` or `[K]`), when
    /// `beam.weight_feature` is on.
    pub weight_scale: Option<Param<Tensor<B, 1>>>,
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
        let weight_scale = config
            .beam
            .weight_feature
            .then(|| Param::from_tensor(Tensor::zeros([outputs], device)));
        Self {
            proj: Linear {
                weight,
                bias: Some(bias),
            },
            weight_scale,
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

    /// Mask logits `[T, K]` for tokens `x` (`[T, H]`) routed to `expert_ids` with routing
    /// weights `weights` (both `[T, K]`; the weights are only read with `weight_feature`, and no
    /// gradient flows back into them).
    pub fn logits(
        &self,
        x: Tensor<B, 2>,
        expert_ids: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let z = self.proj.forward(x);
        let per_slot = |t: Tensor<B, 2>| match self.shape {
            MaskRouterShape::PerExpert => t.gather(1, expert_ids.clone()),
            MaskRouterShape::PerSlot => t,
        };
        let z = per_slot(z);
        match &self.weight_scale {
            Some(scale) => {
                let [tokens, _] = weights.dims();
                let weights = weights.detach().clamp_min(1e-30);
                let relative = weights.clone().log() - weights.max_dim(1).log();
                let outputs = scale.dims()[0];
                let scale = per_slot(scale.val().unsqueeze_dim::<2>(0).expand([tokens, outputs]));
                z + scale * relative
            }
            None => z,
        }
    }

    /// Decides the mask for tokens `x` routed to `expert_ids` with routing weights `weights`.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        expert_ids: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
    ) -> MaskDecision<B> {
        let logits = self.logits(x, expert_ids, weights);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BeamMaskConfig;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    // f32: NdArray<f32> and <f64> share device settings within one test binary.
    type B = NdArray<f32>;

    #[test]
    fn routing_weight_input_adds_scale_times_relative_log_weight() {
        let device = Default::default();
        let config =
            BeamMoeConfig::new(2, 3, 4, 2).with_beam(BeamMaskConfig::new().with_init_bias(1.0));
        let mut router = MaskRouter::<B>::new(&config, &device);
        router.weight_scale = Some(Param::from_tensor(Tensor::from_floats(
            [0.5, 1.0, 2.0, 4.0],
            &device,
        )));
        let x = Tensor::<B, 2>::from_floats([[0.3, -0.7], [1.0, 2.0]], &device);
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::from([[2i64, 0], [1, 3]]), &device);
        let w = Tensor::<B, 2>::from_floats([[0.6, 0.2], [0.25, 0.5]], &device);
        let z: Vec<f64> = router
            .logits(x.clone(), ids.clone(), w.clone())
            .into_data()
            .convert::<f64>()
            .to_vec()
            .unwrap();
        let expected = [
            1.0,
            1.0 + 0.5 * (0.2f64 / 0.6).ln(),
            1.0 + 1.0 * (0.25f64 / 0.5).ln(),
            1.0,
        ];
        for (a, b) in z.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{z:?} vs {expected:?}");
        }
        // Without the input the logits are the linear part only.
        router.weight_scale = None;
        let z: Vec<f32> = router
            .logits(x, ids, w)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        assert_eq!(z, vec![1.0; 4]);
    }
}
