//! Step 2 — the mask: the BEAM mask router (a lightweight linear layer that switches off some of
//! the K experts the base router picked, with a straight-through estimator for training), the
//! routing weights after masking, and the sentinel ids that make masked slots cost nothing.

use crate::activation::sigmoid;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::config::{BeamMaskConfig, MaskRouterShape};

/// The mask router: one logit `z_k` per selected slot, `p_k = sigmoid(z_k)`, `m_k = 1[p_k > τ]`.
///
/// Its weights start at zero and its bias at `beam.init_bias > logit(τ)`, so every mask starts at
/// 1 and training starts from the top-K model. The router holds parameters only; the threshold τ
/// is a setting of the layer ([`BeamMaskConfig::threshold`]) passed to [`forward`](Self::forward).
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
    /// A mask router with `beam`'s shape for a layer of `hidden_size`, `num_experts` and
    /// `top_k`, whose masks all start at 1.
    pub fn new(
        beam: &BeamMaskConfig,
        hidden_size: usize,
        num_experts: usize,
        top_k: usize,
        device: &B::Device,
    ) -> Self {
        let outputs = beam.outputs(num_experts, top_k);
        // Eager (not burn's lazy `Initializer`), so clones share the same values; see `init.rs`.
        let weight = Param::from_tensor(Tensor::zeros([hidden_size, outputs], device));
        let bias = Param::from_tensor(Tensor::full([outputs], beam.init_bias, device));
        let weight_scale = beam
            .weight_feature
            .then(|| Param::from_tensor(Tensor::zeros([outputs], device)));
        Self {
            proj: Linear {
                weight,
                bias: Some(bias),
            },
            weight_scale,
            shape: beam.shape,
        }
    }

    /// The router shape.
    pub fn shape(&self) -> MaskRouterShape {
        self.shape
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

    /// Decides the mask for tokens `x` routed to `expert_ids` with routing weights `weights`:
    /// a slot is kept when its probability exceeds `threshold` (τ, in `(0, 1)`).
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        expert_ids: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
        threshold: f64,
    ) -> MaskDecision<B> {
        let logits = self.logits(x, expert_ids, weights);
        let probs = sigmoid(logits.clone());
        let hard = probs.clone().detach().greater_elem(threshold).float();
        let ste = straight_through(hard.clone(), probs.clone());
        MaskDecision {
            logits,
            probs,
            hard,
            ste,
        }
    }
}

/// Routing weights after masking: `w'_k = m_k · w_k`, optionally rescaled so the kept weights sum
/// to the original top-K sum. A token with every slot masked gets all-zero weights, never NaN.
///
/// `mask` may be the straight-through mask: gradients then reach the mask router through it.
///
/// # Shapes
/// - `weights`, `mask`: `[T, K]`; output `[T, K]`
pub fn masked_weights<B: Backend>(
    weights: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    renormalize: bool,
) -> Tensor<B, 2> {
    let kept = weights.clone() * mask;
    if !renormalize {
        return kept;
    }
    let kept_sum = kept.clone().sum_dim(1);
    // Fully masked rows divide 0 by 1 instead of by 0.
    let nothing_kept = kept_sum.clone().equal_elem(0.0);
    let safe_sum = kept_sum.mask_fill(nothing_kept, 1.0);
    kept * weights.sum_dim(1) / safe_sum
}

/// Replaces the ids of masked slots (`mask == 0`) by the sentinel `num_experts`, which the
/// grouped-experts op drops before any expert work: a masked slot reads no weights and costs no
/// FLOPs.
///
/// # Shapes
/// - `expert_ids`: `[T, K]`, `mask`: `[T, K]` (0.0 / 1.0); output `[T, K]`
pub fn drop_masked_slots<B: Backend>(
    expert_ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    num_experts: usize,
) -> Tensor<B, 2, Int> {
    expert_ids.mask_fill(mask.lower_elem(0.5), num_experts as i64)
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
    use crate::config::BeamMoeConfig;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    // f32: NdArray<f32> and <f64> share device settings within one test binary.
    type B = NdArray<f32>;

    #[test]
    fn routing_weight_input_adds_scale_times_relative_log_weight() {
        let device = Default::default();
        let config = BeamMoeConfig::new(2, 3, 4, 2)
            .with_beam(Some(BeamMaskConfig::new().with_init_bias(1.0)));
        let beam = config.beam.as_ref().unwrap();
        let mut router = MaskRouter::<B>::new(beam, 2, 4, 2, &device);
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
