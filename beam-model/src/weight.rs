//! A large weight as a model holds it: a float tensor (`f32`, `f16`, `bf16`) or quantized (q8 or
//! q4: packed values and block scales, [`beam_kernels::quant`]). The linear layers, experts and
//! LM head hold one; routers, norms and embeddings stay plain float parameters.

use beam_kernels::quant::{QuantFormat, QuantTensor};
use beam_kernels::{
    grouped_experts, grouped_experts_parts, grouped_experts_quant, linear_out_in,
    linear_out_in_quant,
};
use beam_kernels::{GroupedExpertsBackend, LinearBackend};
use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// A weight of shape `[.., C]`: float, or quantized (q8 or q4, one `f16` scale per block of
/// consecutive values along `C`).
#[derive(Module, Debug)]
pub enum Weight<B: Backend, const D: usize> {
    /// A float tensor in the precision it is held in.
    Float(Param<Tensor<B, D>>),
    /// Packed values (int8 for q8, two 4-bit values per byte for q4) and block scales.
    Quant(QuantParam<B, D>),
    /// A stacked `[E, P·R, C]` weight of the routed experts as its `E × P` tensors `[R, C]`
    /// (`parts[e][p]`; expert `e`'s block is its parts one above the other), the way a
    /// checkpoint stores them: what the loader gives backends that read them in place
    /// ([`GroupedExpertsBackend::expert_parts_in_place`](beam_kernels::GroupedExpertsBackend::expert_parts_in_place)),
    /// borrowed from the mapped file rather than copied into a stacked buffer. Only 3-D weights
    /// are held this way.
    Parts(Vec<Vec<Param<Tensor<B, 2>>>>),
}

/// The parameters of a quantized [`Weight`].
///
/// # Shapes
/// - `values`: `[.., C / v]` (`I8` int tensor; `v` weights per byte:
///   [`QuantFormat::values_per_byte`])
/// - `scales`: `[.., C / block]` (`f16`; `f32` on a backend without `f16`)
#[derive(Module, Debug)]
pub struct QuantParam<B: Backend, const D: usize> {
    /// Packed values.
    pub values: Param<Tensor<B, D, Int>>,
    /// Block scales.
    pub scales: Param<Tensor<B, D>>,
    /// How the values are packed.
    #[module(skip)]
    pub format: QuantFormat,
}

impl<B: Backend, const D: usize> Weight<B, D> {
    /// A quantized weight from its tensors.
    pub fn quantized(q: QuantTensor<B, D>) -> Self {
        Self::Quant(QuantParam {
            values: Param::initialized(ParamId::new(), q.values),
            scales: Param::from_tensor(q.scales),
            format: q.format,
        })
    }

    /// The weight's shape.
    pub fn dims(&self) -> [usize; D] {
        match self {
            Self::Float(w) => w.dims(),
            Self::Quant(q) => q.tensor().dims(),
            Self::Parts(parts) => {
                let [rows, cols] = parts[0][0].dims();
                [parts.len(), parts[0].len() * rows, cols]
                    .as_slice()
                    .try_into()
                    .expect("per-expert parts make a 3-D weight")
            }
        }
    }

    /// The weight as a float tensor: itself, the quantized values dequantized (`f32`), or the
    /// parts stacked (both a new full-size tensor: for inspection and tests, not for the
    /// forward pass).
    pub fn val(&self) -> Tensor<B, D> {
        match self {
            Self::Float(w) => w.val(),
            Self::Quant(q) => q.tensor().dequantize(),
            Self::Parts(parts) => {
                let experts: Vec<Tensor<B, 2>> = parts
                    .iter()
                    .map(|expert| Tensor::cat(expert.iter().map(|p| p.val()).collect(), 0))
                    .collect();
                Tensor::stack::<3>(experts, 0).reshape(self.dims())
            }
        }
    }

    /// Whether the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quant(_))
    }

    /// The weight's quantized format, if it is quantized.
    pub fn quant_format(&self) -> Option<QuantFormat> {
        match self {
            Self::Quant(q) => Some(q.format),
            _ => None,
        }
    }

    /// The device the weight is on.
    pub fn device(&self) -> B::Device {
        match self {
            Self::Float(w) => w.device(),
            Self::Quant(q) => q.scales.device(),
            Self::Parts(parts) => parts[0][0].device(),
        }
    }
}

impl<B: Backend, const D: usize> QuantParam<B, D> {
    /// The quantized tensors (clones share storage).
    pub fn tensor(&self) -> QuantTensor<B, D> {
        QuantTensor {
            values: self.values.val(),
            scales: self.scales.val(),
            format: self.format,
        }
    }
}

impl<B: Backend, const D: usize> From<Param<Tensor<B, D>>> for Weight<B, D> {
    fn from(param: Param<Tensor<B, D>>) -> Self {
        Self::Float(param)
    }
}

impl<B: Backend, const D: usize> From<Tensor<B, D>> for Weight<B, D> {
    fn from(tensor: Tensor<B, D>) -> Self {
        Self::Float(Param::from_tensor(tensor))
    }
}

impl<B: LinearBackend> Weight<B, 2> {
    /// `x · Wᵀ` for this `[out, in]` weight (the backend's quantized op when it is quantized).
    ///
    /// # Shapes
    /// - `x`: `[T, in]`; output `[T, out]`
    pub fn linear(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Float(w) => linear_out_in(x, w.val()),
            Self::Quant(q) => linear_out_in_quant(x, q.tensor()),
            Self::Parts(_) => linear_out_in(x, self.val()),
        }
    }
}

/// The grouped experts op on stacked `[E, 2I, H]` / `[E, H, I]` weights: the quantized op when
/// both are quantized, the per-expert op when both are [`Weight::Parts`] (gate and up, then
/// down), else the float op (a quantized weight beside a float one is dequantized, parts beside a
/// stacked weight stacked).
///
/// # Shapes
/// As [`beam_kernels::GroupedExpertsBackend::grouped_experts`].
pub fn grouped<B: GroupedExpertsBackend>(
    x: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    gate_up: &Weight<B, 3>,
    down: &Weight<B, 3>,
) -> Tensor<B, 2> {
    match (gate_up, down) {
        (Weight::Quant(gate_up), Weight::Quant(down)) => {
            grouped_experts_quant(x, expert_ids, weights, gate_up.tensor(), down.tensor())
        }
        (Weight::Parts(gate_up), Weight::Parts(down))
            if gate_up.iter().all(|p| p.len() == 2) && down.iter().all(|p| p.len() == 1) =>
        {
            let part = |parts: &[Vec<Param<Tensor<B, 2>>>], p: usize| {
                parts.iter().map(|expert| expert[p].val()).collect()
            };
            grouped_experts_parts(
                x,
                expert_ids,
                weights,
                [part(gate_up, 0), part(gate_up, 1), part(down, 0)],
            )
        }
        _ => grouped_experts(x, expert_ids, weights, gate_up.val(), down.val()),
    }
}
