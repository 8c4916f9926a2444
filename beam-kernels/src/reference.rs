//! References for every path of the extension.
//!
//! - **Tensor-ops reference** ([`grouped_experts_reference`], [`linear_out_in_reference`]): built
//!   from plain burn tensor ops, so every backend can run it, and under `Autodiff<B>` its
//!   gradients are exact. It is the default of [`GroupedExpertsBackend`](crate::GroupedExpertsBackend)
//!   and [`LinearBackend`](crate::LinearBackend), with the pieces it needs ([`swiglu`],
//!   [`scatter_add_rows`]).
//! - **Dense check** ([`dense_experts_reference`]): every expert on every token, a different
//!   formulation the grouped paths are tested against.
//! - **Host `f64` reference** ([`masked_moe_f64`]): what the host and cubecl kernels compute,
//!   accumulated in `f64`.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::activation::silu;
use crate::plan::{DispatchPlan, MoeDims};
use crate::quant::QuantTensor;
use crate::QuantPrimitive;
use crate::{float, primitive};

/// `down · (silu(gate · x) ⊙ up · x)` on rows `x` (`[N, H]`), with `gate_up` `[2I, H]` (gate rows
/// first) and `down` `[H, I]`. Output `[N, H]`.
///
/// Computed column-wise (`W · xᵀ`) so the weights are read in their stored `[out, in]` layout: a
/// transposed weight operand makes burn's ndarray matmul copy the whole weight matrix first, which
/// cost more than the product itself at decode (measured in docs/BENCHMARKS.md). Only the small
/// activations are transposed.
pub fn swiglu<B: Backend>(
    x: Tensor<B, 2>,
    gate_up: Tensor<B, 2>,
    down: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let [two_i, _] = gate_up.dims();
    let inter = two_i / 2;
    let gu = gate_up.matmul(x.transpose()); // [2I, N]
    let h = silu(gu.clone().narrow(0, 0, inter)) * gu.narrow(0, inter, inter); // [I, N]
    down.matmul(h).transpose() // [N, H]
}

/// `out[token_index[p]] += row_weights[p] · rows[p]` into a zero `[tokens, H]` tensor.
///
/// # Shapes
/// - `rows`: `[P, H]`, `row_weights`: `[P]`, `token_index`: `[P]`; output `[tokens, H]`
pub fn scatter_add_rows<B: Backend>(
    rows: Tensor<B, 2>,
    row_weights: Tensor<B, 1>,
    token_index: Tensor<B, 1, Int>,
    tokens: usize,
) -> Tensor<B, 2> {
    let [_, hidden] = rows.dims();
    let weighted = rows * row_weights.unsqueeze_dim(1);
    Tensor::zeros([tokens, hidden], &weighted.device()).select_assign(
        0,
        token_index,
        weighted,
        IndexingUpdateOp::Add,
    )
}

/// Reference for [`GroupedExpertsBackend::grouped_experts`](crate::GroupedExpertsBackend::grouped_experts):
/// reads the id table back to the host, groups kept pairs by expert ([`DispatchPlan`]), runs each
/// expert once on the rows of its tokens (touching only that expert's weights), weights the rows
/// and scatter-adds them back.
///
/// # Shapes
/// - `x`: `[T, H]`, `expert_ids`: `[T, K]` (int), `weights`: `[T, K]`
/// - `gate_up`: `[E, 2I, H]` (gate rows first), `down`: `[E, H, I]`
/// - output: `[T, H]`
pub fn grouped_experts_reference<B: Backend>(
    x: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    gate_up: Tensor<B, 3>,
    down: Tensor<B, 3>,
) -> Tensor<B, 2> {
    let [experts, _, _] = gate_up.dims();
    let dtype = x.dtype();
    // 16-bit weights (Flex, cubecl) are widened to the activations' dtype one routed expert at a
    // time.
    grouped_by_expert(x, expert_ids, weights, experts, |expert| {
        (
            like(expert_weights(gate_up.clone(), expert), dtype),
            like(expert_weights(down.clone(), expert), dtype),
        )
    })
}

/// Reference for [`GroupedExpertsBackend::grouped_experts_quant`](crate::GroupedExpertsBackend::grouped_experts_quant):
/// [`grouped_experts_reference`] with each routed expert's quantized weights sliced out and dequantized
/// with tensor ops (idle experts' values and scales are not touched).
///
/// # Shapes
/// As [`grouped_experts_reference`], with `gate_up`, `down` as [`QuantTensor`]s of those shapes.
pub fn grouped_experts_quant_reference<B: Backend>(
    x: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    gate_up: QuantTensor<B, 3>,
    down: QuantTensor<B, 3>,
) -> Tensor<B, 2> {
    let [experts, two_i, hidden] = gate_up.dims();
    let [_, _, inter] = down.dims();
    let dtype = x.dtype();
    grouped_by_expert(x, expert_ids, weights, experts, |expert| {
        (
            like(
                gate_up
                    .narrow_first(expert)
                    .dequantize()
                    .reshape([two_i, hidden]),
                dtype,
            ),
            like(
                down.narrow_first(expert)
                    .dequantize()
                    .reshape([hidden, inter]),
                dtype,
            ),
        )
    })
}

/// [`grouped_experts_quant_reference`] on primitives: the default of
/// [`GroupedExpertsBackend::grouped_experts_quant`](crate::GroupedExpertsBackend::grouped_experts_quant).
pub fn grouped_experts_quant_primitive<B: Backend>(
    x: FloatTensor<B>,
    expert_ids: IntTensor<B>,
    weights: FloatTensor<B>,
    gate_up: QuantPrimitive<B>,
    down: QuantPrimitive<B>,
) -> FloatTensor<B> {
    primitive(grouped_experts_quant_reference::<B>(
        float(x),
        Tensor::from_primitive(expert_ids),
        float(weights),
        QuantTensor::from_primitive(gate_up),
        QuantTensor::from_primitive(down),
    ))
}

/// The grouped pipeline of the references: reads the id table back, groups kept pairs by
/// expert, runs each routed expert once on its tokens' rows with the `[2I, H]` and `[H, I]`
/// weights `expert_weights(e)` gives, weights the rows and scatter-adds them back.
fn grouped_by_expert<B: Backend>(
    x: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    experts: usize,
    expert_weights: impl Fn(usize) -> (Tensor<B, 2>, Tensor<B, 2>),
) -> Tensor<B, 2> {
    let [tokens, hidden] = x.dims();
    let [_, top_k] = expert_ids.dims();
    let device = x.device();
    let ids = expert_ids
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("int tensor data converts to i64");
    let plan = DispatchPlan::from_ids(&ids, top_k, experts);
    if plan.kept() == 0 {
        return Tensor::zeros([tokens, hidden], &device);
    }
    let index = |values: Vec<usize>| {
        let len = values.len();
        let values: Vec<i64> = values.into_iter().map(|v| v as i64).collect();
        Tensor::<B, 1, Int>::from_data(TensorData::new(values, [len]), &device)
    };
    let token_index = index(plan.tokens());
    let rows = x.select(0, token_index.clone());
    let pair_weights = weights
        .reshape([tokens * top_k])
        .select(0, index(plan.pairs.clone()));
    let outputs: Vec<Tensor<B, 2>> = plan
        .groups()
        .map(|(expert, start, len)| {
            let (gate_up, down) = expert_weights(expert);
            swiglu(rows.clone().narrow(0, start, len), gate_up, down)
        })
        .collect();
    scatter_add_rows(Tensor::cat(outputs, 0), pair_weights, token_index, tokens)
}

/// [`grouped_experts_reference`] on primitives: the default of
/// [`GroupedExpertsBackend::grouped_experts`](crate::GroupedExpertsBackend::grouped_experts) and
/// the fallback of backends whose fast path declines a call.
pub fn grouped_experts_primitive<B: Backend>(
    x: FloatTensor<B>,
    expert_ids: IntTensor<B>,
    weights: FloatTensor<B>,
    gate_up: FloatTensor<B>,
    down: FloatTensor<B>,
) -> FloatTensor<B> {
    primitive(grouped_experts_reference::<B>(
        float(x),
        Tensor::from_primitive(expert_ids),
        float(weights),
        float(gate_up),
        float(down),
    ))
}

/// Reference for [`KvCacheBackend::kv_append`](crate::KvCacheBackend::kv_append): the cache
/// and the new positions concatenated along the sequence dimension (a new tensor each call),
/// in the cache's dtype (`new` is cast to it if it differs).
///
/// # Shapes
/// - `cache`: `[B, H, S, D]`, `new`: `[B, H, T, D]`; output `[B, H, S + T, D]`
pub fn kv_append_reference<B: Backend>(cache: Tensor<B, 4>, new: Tensor<B, 4>) -> Tensor<B, 4> {
    // `cast` returns a tensor of the same dtype as it is.
    let new = new.cast(cache.dtype());
    Tensor::cat(vec![cache, new], 2)
}

/// Rotary position embedding on the halves of the last dimension: `x · cos + rotate_half(x) ·
/// sin`, `rotate_half(x) = cat(−x[.., D/2..], x[.., ..D/2])` (transformers' `rotate_half`), the
/// tables broadcast to `x`. What [`rope_reference`] and every RoPE of the model computes.
///
/// # Shapes
/// - `x`: `[.., D]` (4 dimensions), `cos`, `sin`: broadcastable to it (e.g. `[1, T, 1, D]`)
/// - output: `x`'s shape
pub fn rotate_half<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [_, _, _, d] = x.dims();
    let half = d / 2;
    let rotated = Tensor::cat(
        vec![
            x.clone().narrow(3, half, d - half).neg(),
            x.clone().narrow(3, 0, half),
        ],
        3,
    );
    x * cos + rotated * sin
}

/// Reference for [`KvCacheBackend::kv_rope`](crate::KvCacheBackend::kv_rope): [`rotate_half`]
/// with the tables of the `T` positions broadcast over the batch and the heads.
///
/// # Shapes
/// - `x`: `[B, T, H, D]` (tokens first), `cos`, `sin`: `[T, D]`; output `[B, T, H, D]`
pub fn rope_reference<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    let [t, d] = cos.dims();
    rotate_half(x, cos.reshape([1, t, 1, d]), sin.reshape([1, t, 1, d]))
}

/// Reference for [`KvCacheBackend::kv_attention`](crate::KvCacheBackend::kv_attention): grouped-query
/// scaled dot-product attention from tensor ops, `softmax(q · kᵀ · scale + mask) · v`, each key
/// and value head repeated for the `H / H_kv` query heads that read it. Keys and values held in
/// another precision than `q` (a 16-bit cache) are cast to `q`'s first.
///
/// # Shapes
/// - `q`: `[B, H, T, D]`, `k`: `[B, H_kv, S, D]`, `v`: `[B, H_kv, S, D_v]`
/// - `mask`: additive, broadcast to `[B, H, T, S]` (e.g. `[1, 1, T, S]`)
/// - output `[B, H, T, D_v]`
pub fn attention_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    let [batch, heads, _, _] = q.dims();
    let kv_heads = k.dims()[1];
    // `cast` returns a tensor of the same dtype as it is.
    let (k, v) = (k.cast(q.dtype()), v.cast(q.dtype()));
    let group = heads / kv_heads.max(1);
    // Query head h reads key/value head h / group (no copy when every head has its own).
    let repeat = |t: Tensor<B, 4>| {
        if group == 1 {
            return t;
        }
        let [_, _, positions, dim] = t.dims();
        t.unsqueeze_dim::<5>(2)
            .repeat_dim(2, group)
            .reshape([batch, heads, positions, dim])
    };
    let scores = q.matmul(repeat(k).swap_dims(2, 3)) * scale;
    burn::tensor::activation::softmax(scores + mask, 3).matmul(repeat(v))
}

/// [`attention_reference`] on primitives: the trait's default and the fallback of backends whose
/// fast path declines a call.
pub fn attention_primitive<B: Backend>(
    [q, k, v, mask]: [FloatTensor<B>; 4],
    scale: f64,
) -> FloatTensor<B> {
    primitive(attention_reference::<B>(
        float(q),
        float(k),
        float(v),
        float(mask),
        scale,
    ))
}

/// Reference for [`LinearBackend::linear_out_in`](crate::LinearBackend::linear_out_in):
/// `x.matmul(weight.transpose())`, a weight in another float dtype than `x` (16-bit weights with
/// `f32` activations) widened to `x`'s first.
///
/// # Shapes
/// - `x`: `[T, in]`, `weight`: `[out, in]`; output `[T, out]`
pub fn linear_out_in_reference<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    let dtype = x.dtype();
    x.matmul(like(weight, dtype).transpose())
}

/// Reference for [`LinearBackend::linear_out_in_quant`](crate::LinearBackend::linear_out_in_quant):
/// the weight dequantized with tensor ops, then [`linear_out_in_reference`]; on primitives (the
/// trait's default and the fallback of backends whose fast path declines a call).
pub fn linear_out_in_quant_primitive<B: Backend>(
    x: FloatTensor<B>,
    weight: QuantPrimitive<B>,
) -> FloatTensor<B> {
    primitive(linear_out_in_reference::<B>(
        float(x),
        QuantTensor::<B, 2>::from_primitive(weight).dequantize(),
    ))
}

/// `tensor` in float dtype `dtype` (unchanged if it is already).
pub fn like<B: Backend, const D: usize>(tensor: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if tensor.dtype() == dtype {
        tensor
    } else {
        tensor.cast(dtype)
    }
}

/// An independent dense formulation used to check the grouped paths: every expert runs on every
/// token, then a `[T, E]` coefficient matrix picks and weights the outputs. `O(T · E)` expert work.
///
/// # Shapes
/// As [`grouped_experts_reference`].
pub fn dense_experts_reference<B: Backend>(
    x: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    gate_up: Tensor<B, 3>,
    down: Tensor<B, 3>,
) -> Tensor<B, 2> {
    let [tokens, hidden] = x.dims();
    let [experts, two_i, _] = gate_up.dims();
    let inter = two_i / 2;
    // coefficient[t, e] = Σ_k weights[t, k] · 1[ids[t, k] == e]; the sentinel column E is dropped.
    let one_hot: Tensor<B, 3> = expert_ids.one_hot(experts + 1).float();
    let coefficient = (one_hot * weights.unsqueeze_dim::<3>(2))
        .sum_dim(1)
        .reshape([tokens, experts + 1])
        .narrow(1, 0, experts);
    let xs = x.unsqueeze_dim::<3>(0).repeat_dim(0, experts); // [E, T, H]
    let gu = xs.matmul(gate_up.swap_dims(1, 2)); // [E, T, 2I]
    let h = silu(gu.clone().narrow(2, 0, inter)) * gu.narrow(2, inter, inter);
    let y = h.matmul(down.swap_dims(1, 2)); // [E, T, H]
    (y * coefficient.transpose().unsqueeze_dim::<3>(2))
        .sum_dim(0)
        .reshape([tokens, hidden])
}

/// Expert `e`'s slice of a stacked `[E, R, C]` weight, as `[R, C]`.
fn expert_weights<B: Backend>(stacked: Tensor<B, 3>, expert: usize) -> Tensor<B, 2> {
    let [_, rows, cols] = stacked.dims();
    stacked.narrow(0, expert, 1).reshape([rows, cols])
}

/// `out[t] = Σ_k w[t, k] · down[e] · (silu(gate[e] · x[t]) ⊙ up[e] · x[t])` over kept slots
/// (`e = ids[t, k] < E`), accumulated in `f64`, row-major buffers.
///
/// # Shapes
/// - `x`: `[T, H]`, `expert_ids`, `weights`: `[T, K]`
/// - `gate_up`: `[E, 2I, H]` (gate rows first), `down`: `[E, H, I]`; output `[T, H]`
pub fn masked_moe_f64(
    x: &[f32],
    expert_ids: &[i64],
    weights: &[f32],
    gate_up: &[f32],
    down: &[f32],
    dims: MoeDims,
) -> Vec<f64> {
    let MoeDims {
        tokens,
        top_k,
        experts,
        hidden,
        intermediate,
    } = dims;
    dims.assert_lengths([
        x.len(),
        expert_ids.len(),
        weights.len(),
        gate_up.len(),
        down.len(),
    ]);
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum() };
    fn weight_row(m: &[f32], r: usize, len: usize) -> &[f32] {
        &m[r * len..(r + 1) * len]
    }
    let mut out = vec![0.0f64; tokens * hidden];
    for t in 0..tokens {
        let row = &x[t * hidden..(t + 1) * hidden];
        for k in 0..top_k {
            let Some(e) = usize::try_from(expert_ids[t * top_k + k])
                .ok()
                .filter(|&e| e < experts)
            else {
                continue;
            };
            let w = weights[t * top_k + k] as f64;
            let h: Vec<f64> = (0..intermediate)
                .map(|i| {
                    let g = dot(weight_row(gate_up, e * 2 * intermediate + i, hidden), row);
                    let u = dot(
                        weight_row(gate_up, e * 2 * intermediate + intermediate + i, hidden),
                        row,
                    );
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            for j in 0..hidden {
                let d = weight_row(down, e * hidden + j, intermediate);
                let y: f64 = d.iter().zip(&h).map(|(&d, &h)| d as f64 * h).sum();
                out[t * hidden + j] += w * y;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f64_reference_matches_a_hand_computed_expert() {
        // T = 1, K = 2, E = 2, H = 2, I = 1; slot 0 is masked (sentinel 2), slot 1 runs expert 0.
        let gate_up = [
            0.5f32, 0.25, 1.0, 1.0, /* expert 1 */ 9.0, 9.0, 9.0, 9.0,
        ];
        let down = [2.0f32, -1.0, /* expert 1 */ 7.0, 7.0];
        let out = masked_moe_f64(
            &[2.0, 0.0],
            &[2, 0],
            &[0.3, 0.5],
            &gate_up,
            &down,
            MoeDims {
                tokens: 1,
                top_k: 2,
                experts: 2,
                hidden: 2,
                intermediate: 1,
            },
        );
        let g = 1.0f64; // 0.5 · 2
        let u = 2.0f64; // 1 · 2
        let h = g / (1.0 + (-g).exp()) * u;
        assert!((out[0] - 0.5 * 2.0 * h).abs() < 1e-12);
        assert!((out[1] + 0.5 * h).abs() < 1e-12);
    }
}
