//! Step 3 — the experts: E routed SwiGLU experts stored stacked, and the optional shared expert.
//! Their forward passes are one call each of the backend extension (`beam-kernels`): the grouped
//! experts op for the routed experts, the `[out, in]` linear op for the shared expert.

use crate::activation::{sigmoid, silu};
use beam_kernels::{linear_out_in, GroupedExpertsBackend, LinearBackend};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::config::{BeamMoeConfig, SharedExpertConfig};
use crate::init::{normal_param, Init};
use crate::weight::{grouped, Weight};

/// The E routed experts, stacked in the layout the kernels read.
///
/// # Shapes
/// - `gate_up`: `[E, 2I, H]` — rows `0..I` are expert `e`'s gate projection, `I..2I` its up
///   projection (transformers' fused `experts.gate_up_proj`)
/// - `down`: `[E, H, I]`
#[derive(Module, Debug)]
pub struct Experts<B: Backend> {
    /// Stacked gate+up projections `[E, 2I, H]` (float or q8).
    pub gate_up: Weight<B, 3>,
    /// Stacked down projections `[E, H, I]` (float or q8).
    pub down: Weight<B, 3>,
}

impl<B: Backend> Experts<B> {
    /// Normally initialised experts.
    pub fn new(config: &BeamMoeConfig, device: &B::Device) -> Self {
        Self::build(config, Init::Normal(config.init_std), device)
    }

    pub(crate) fn build(config: &BeamMoeConfig, init: Init, device: &B::Device) -> Self {
        let (e, h, i) = (
            config.num_experts,
            config.hidden_size,
            config.intermediate_size,
        );
        Self {
            gate_up: normal_param([e, 2 * i, h], init, device).into(),
            down: normal_param([e, h, i], init, device).into(),
        }
    }

    /// `[E, H, I]` → `(E, H, I)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        let [e, h, i] = self.down.dims();
        (e, h, i)
    }
}

impl<B: GroupedExpertsBackend> Experts<B> {
    /// `Σ_k weights[t, k] · Expert_{ids[t, k]}(x[t])`; slots with the sentinel id `E` are skipped
    /// (see [`drop_masked_slots`](crate::mask::drop_masked_slots)).
    ///
    /// # Shapes
    /// - `x`: `[T, H]`, `expert_ids`: `[T, K]`, `weights`: `[T, K]`; output `[T, H]`
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        expert_ids: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        grouped(x, expert_ids, weights, &self.gate_up, &self.down)
    }
}

/// An always-active SwiGLU expert (Qwen2-MoE `shared_expert`, DeepSeek `shared_experts`).
///
/// # Shapes
/// - `gate_up`: `[2I_s, H]`, `down`: `[H, I_s]` (same layout as one routed expert)
/// - `gate`: `[1, H]` when gated (Qwen2-MoE `shared_expert_gate`)
#[derive(Module, Debug)]
pub struct SharedExpert<B: Backend> {
    /// Gate+up projection `[2I_s, H]` (float or q8).
    pub gate_up: Weight<B, 2>,
    /// Down projection `[H, I_s]` (float or q8).
    pub down: Weight<B, 2>,
    /// Sigmoid output gate `[1, H]`, if any.
    pub gate: Option<Param<Tensor<B, 2>>>,
}

impl<B: Backend> SharedExpert<B> {
    /// A normally initialised shared expert.
    pub fn new(
        shared: &SharedExpertConfig,
        hidden_size: usize,
        init_std: f64,
        device: &B::Device,
    ) -> Self {
        Self::build(shared, hidden_size, Init::Normal(init_std), device)
    }

    pub(crate) fn build(
        shared: &SharedExpertConfig,
        hidden_size: usize,
        init: Init,
        device: &B::Device,
    ) -> Self {
        let i = shared.intermediate_size;
        Self {
            gate_up: normal_param([2 * i, hidden_size], init, device).into(),
            down: normal_param([hidden_size, i], init, device).into(),
            gate: shared
                .gated
                .then(|| normal_param([1, hidden_size], init, device)),
        }
    }
}

impl<B: LinearBackend> SharedExpert<B> {
    /// `[T, H]` → `[T, H]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [two_i, _] = self.gate_up.dims();
        let inter = two_i / 2;
        let gate_up = self.gate_up.linear(x.clone()); // [T, 2I]
        let h = silu(gate_up.clone().narrow(1, 0, inter)) * gate_up.narrow(1, inter, inter);
        let y = self.down.linear(h);
        match &self.gate {
            Some(gate) => y * sigmoid(linear_out_in(x, gate.val())),
            None => y,
        }
    }
}
