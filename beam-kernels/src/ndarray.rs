//! burn's ndarray backend: the host kernels ([`crate::host`]) on the tensors' storage, borrowed in
//! place (weights are never copied), whenever they beat ndarray's blocked `matmul`; the
//! tensor-ops reference otherwise.
//!
//! - grouped experts: host GEMVs while the kept pairs per routed expert are few (at most
//!   [`HOST_MAX_PAIRS_PER_EXPERT`] on average: decode, or a heavily masked prefill), else the
//!   reference ([`grouped_experts_reference`](crate::reference::grouped_experts_reference));
//! - `[out, in]` linear layers: host GEMV up to [`LINEAR_MAX_ROWS`] rows, else `W · xᵀ`.
//!
//! Only `f32` and `f64` in contiguous row-major storage take the host paths; anything else runs
//! the reference.

use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorData, TensorMetadata};

use crate::host::{linear as host_linear, masked_moe_planned, HostFloat};
use crate::plan::{DispatchPlan, MoeDims};
use crate::reference::grouped_experts_primitive;
use crate::{float, primitive, GroupedExpertsBackend, KvCacheBackend, LinearBackend};

impl<E, I, Q> GroupedExpertsBackend for NdArray<E, I, Q>
where
    E: FloatNdArrayElement,
    I: IntNdArrayElement,
    Q: QuantElement,
    NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>>,
{
    fn grouped_experts(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: FloatTensor<Self>,
        down: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match masked_moe::<Self>(&x, &expert_ids, &weights, &gate_up, &down) {
            Some(out) => out,
            None => grouped_experts_primitive::<Self>(x, expert_ids, weights, gate_up, down),
        }
    }
}

/// The key/value cache: the reference (ndarray's concatenation).
impl<E, I, Q> KvCacheBackend for NdArray<E, I, Q>
where
    E: FloatNdArrayElement,
    I: IntNdArrayElement,
    Q: QuantElement,
    NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>>,
{
}

impl<E, I, Q> LinearBackend for NdArray<E, I, Q>
where
    E: FloatNdArrayElement,
    I: IntNdArrayElement,
    Q: QuantElement,
    NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>>,
{
    fn linear_out_in(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        linear(&x, &weight).unwrap_or_else(|| {
            // ndarray's matmul copies a transposed right operand (the whole weight) first;
            // transposing the activations instead copies the smaller side.
            primitive(
                float::<Self, 2>(weight)
                    .matmul(float::<Self, 2>(x).transpose())
                    .transpose(),
            )
        })
    }
}

/// Mean kept pairs per routed expert up to which [`masked_moe`] runs the host GEMV (each
/// expert's weights read once, its tokens dotted in passes of 4); above, ndarray's blocked
/// `matmul` (the reference). Measured on 2 cores: OLMoE shape at 64 pairs per expert, host
/// 752 ms vs reference 2690 ms; the small shape (weights in cache) at 128–512 within ±15%.
/// On the host the routing table is already in memory, so the choice uses the actual kept
/// pairs rather than the shape (a masked prefill with few tokens left per expert is GEMV work).
pub const HOST_MAX_PAIRS_PER_EXPERT: usize = 256;

/// `Some(output)` when the kept pairs per routed expert are few (at most
/// [`HOST_MAX_PAIRS_PER_EXPERT`] on average) and the four float tensors share an `f32` or
/// `f64` dtype in contiguous row-major storage; `None` sends the call to the reference
/// (many tokens per expert, where ndarray's blocked `matmul` wins, or unusual layouts).
///
/// # Shapes
/// As [`GroupedExpertsBackend::grouped_experts`].
pub fn masked_moe<B>(
    x: &NdArrayTensor,
    expert_ids: &NdArrayTensor,
    weights: &NdArrayTensor,
    gate_up: &NdArrayTensor,
    down: &NdArrayTensor,
) -> Option<NdArrayTensor>
where
    B: Backend<IntTensorPrimitive = NdArrayTensor>,
{
    let dims = MoeDims::from_shapes(
        x.shape().dims(),
        expert_ids.shape().dims(),
        gate_up.shape().dims(),
    );
    let (top_k, experts) = (dims.top_k, dims.experts);
    // The id table is `[T, K]`: small, converted rather than borrowed.
    let ids = Tensor::<B, 2, Int>::from_primitive(expert_ids.clone())
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .ok()?;
    let plan = DispatchPlan::from_ids(&ids, top_k, experts);
    if plan.kept() > HOST_MAX_PAIRS_PER_EXPERT * plan.groups().count() {
        return None;
    }
    macro_rules! decode {
        ($variant:ident) => {
            match (x, weights, gate_up, down) {
                (
                    NdArrayTensor::$variant(x),
                    NdArrayTensor::$variant(weights),
                    NdArrayTensor::$variant(gate_up),
                    NdArrayTensor::$variant(down),
                ) => {
                    let (x, weights) = (x.view(), weights.view());
                    let (gate_up, down) = (gate_up.view(), down.view());
                    Some(output(
                        masked_moe_planned(
                            x.as_slice()?,
                            &plan,
                            weights.as_slice()?,
                            gate_up.as_slice()?,
                            down.as_slice()?,
                            dims,
                        ),
                        dims,
                    ))
                }
                _ => None,
            }
        };
    }
    match x {
        NdArrayTensor::F32(_) => decode!(F32),
        NdArrayTensor::F64(_) => decode!(F64),
        _ => None,
    }
}

/// Rows of `x` up to which [`linear`] runs the host GEMV (each weight row read once for all
/// rows); above, ndarray's blocked `matmul` is faster.
pub const LINEAR_MAX_ROWS: usize = 32;

/// `Some(x · Wᵀ)` for at most [`LINEAR_MAX_ROWS`] rows when `x` and `weight` share an `f32`
/// or `f64` dtype in contiguous row-major storage.
///
/// # Shapes
/// - `x`: `[T, in]`, `weight`: `[out, in]`; output `[T, out]`
pub fn linear(x: &NdArrayTensor, weight: &NdArrayTensor) -> Option<NdArrayTensor> {
    let [rows, in_features] = x.shape().dims();
    let [out_features, weight_in] = weight.shape().dims();
    if rows > LINEAR_MAX_ROWS || weight_in != in_features {
        return None;
    }
    macro_rules! linear {
        ($variant:ident) => {
            match (x, weight) {
                (NdArrayTensor::$variant(x), NdArrayTensor::$variant(weight)) => {
                    let (x, weight) = (x.view(), weight.view());
                    let out = host_linear::<_, &[_]>(
                        x.as_slice()?,
                        weight.as_slice()?,
                        in_features,
                        out_features,
                    );
                    Some(NdArrayTensor::from_data(TensorData::new(
                        out,
                        [rows, out_features],
                    )))
                }
                _ => None,
            }
        };
    }
    match x {
        NdArrayTensor::F32(_) => linear!(F32),
        NdArrayTensor::F64(_) => linear!(F64),
        _ => None,
    }
}

fn output<F: HostFloat + burn::tensor::Element>(values: Vec<F>, dims: MoeDims) -> NdArrayTensor {
    NdArrayTensor::from_data(TensorData::new(values, [dims.tokens, dims.hidden]))
}

#[cfg(test)]
mod tests {
    use super::{linear, masked_moe, LINEAR_MAX_ROWS};
    use crate::plan::MoeDims;
    use crate::reference::masked_moe_f64;
    use burn::backend::ndarray::NdArrayTensor;
    use burn::backend::NdArray;
    use burn::tensor::{Tensor, TensorData};

    use crate::testing::values;

    fn tensor<E: burn::tensor::Element>(values: Vec<E>, shape: Vec<usize>) -> NdArrayTensor {
        // Built from data directly: keeps the element type whatever the device default is.
        NdArrayTensor::from_data(TensorData::new(values, shape))
    }

    fn output_values(out: NdArrayTensor) -> Vec<f64> {
        Tensor::<NdArray<f64>, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(out))
            .into_data()
            .convert::<f64>()
            .to_vec()
            .unwrap()
    }

    /// Runs the ndarray decode path in `f32` and `f64` storage on one problem (`None` if it
    /// declined the shapes).
    fn decode(dims: MoeDims, ids: &[i64]) -> Option<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let MoeDims {
            tokens: t,
            top_k: k,
            experts: e,
            hidden: h,
            intermediate: i,
        } = dims;
        let (x, w) = (values(t * h, 0.1), values(t * k, 0.7));
        let (gate_up, down) = (values(e * 2 * i * h, 1.3), values(e * h * i, 2.9));
        let want = masked_moe_f64(&x, ids, &w, &gate_up, &down, dims);
        let ids_tensor = tensor(ids.to_vec(), vec![t, k]);
        let f32_out = masked_moe::<NdArray<f32>>(
            &tensor(x.clone(), vec![t, h]),
            &ids_tensor,
            &tensor(w.clone(), vec![t, k]),
            &tensor(gate_up.clone(), vec![e, 2 * i, h]),
            &tensor(down.clone(), vec![e, h, i]),
        )?;
        let wide = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let f64_out = masked_moe::<NdArray<f64>>(
            &tensor(wide(&x), vec![t, h]),
            &ids_tensor,
            &tensor(wide(&w), vec![t, k]),
            &tensor(wide(&gate_up), vec![e, 2 * i, h]),
            &tensor(wide(&down), vec![e, h, i]),
        )?;
        Some((output_values(f32_out), output_values(f64_out), want))
    }

    #[test]
    fn ndarray_decode_shapes_run_the_host_gemv_in_both_precisions() {
        // T · K = 6 ≤ 4E: decode. Slot (1, 0) masked (sentinel 4); expert 3 never routed.
        let dims = MoeDims {
            tokens: 3,
            top_k: 2,
            experts: 4,
            hidden: 20,
            intermediate: 9,
        };
        let (f32_out, f64_out, want) =
            decode(dims, &[2, 0, 4, 1, 0, 2]).expect("decode shapes take the host path");
        assert!(want.iter().any(|v| v.abs() > 1e-2), "not a test on zeros");
        for ((a, b), w) in f32_out.iter().zip(&f64_out).zip(&want) {
            assert!((a - w).abs() <= 1e-5 + 1e-5 * w.abs(), "f32 {a} vs {w}");
            assert!((b - w).abs() <= 1e-12 * (1.0 + w.abs()), "f64 {b} vs {w}");
        }
    }

    #[test]
    fn ndarray_picks_the_host_gemv_from_the_kept_pairs_per_expert() {
        let dims = MoeDims {
            tokens: 600,
            top_k: 2,
            experts: 4,
            hidden: 8,
            intermediate: 4,
        };
        // 1200 pairs on 4 experts (300 each > 256): ndarray's blocked matmul (the reference).
        let ids: Vec<i64> = (0..1200).map(|s| s % 4).collect();
        assert!(decode(dims, &ids).is_none());
        // The same prefill with 90% of the slots masked: 30 pairs per expert, host GEMV.
        let masked: Vec<i64> = (0..1200)
            .map(|s| if s % 10 == 0 { (s / 10) % 4 } else { 4 })
            .collect();
        let (f32_out, f64_out, want) = decode(dims, &masked).expect("few kept pairs: host path");
        for ((a, b), w) in f32_out.iter().zip(&f64_out).zip(&want) {
            assert!((a - w).abs() <= 1e-5 + 1e-5 * w.abs(), "f32 {a} vs {w}");
            assert!((b - w).abs() <= 1e-12 * (1.0 + w.abs()), "f64 {b} vs {w}");
        }
    }

    #[test]
    fn ndarray_linear_out_in_equals_the_plain_product_on_both_paths() {
        use crate::linear_out_in;
        let device = Default::default();
        // 3 rows: host GEMV; 40 rows (> LINEAR_MAX_ROWS): W · xᵀ matmul.
        for rows in [3, LINEAR_MAX_ROWS + 8] {
            let x = Tensor::<NdArray, 2>::from_data(
                TensorData::new(values(rows * 50, 0.2), [rows, 50]),
                &device,
            );
            let w = Tensor::<NdArray, 2>::from_data(
                TensorData::new(values(70 * 50, 1.1), [70, 50]),
                &device,
            );
            let want: Vec<f32> = x
                .clone()
                .matmul(w.clone().transpose())
                .into_data()
                .to_vec()
                .unwrap();
            let host = linear(
                &x.clone().into_primitive().tensor(),
                &w.clone().into_primitive().tensor(),
            );
            assert_eq!(host.is_some(), rows <= LINEAR_MAX_ROWS, "{rows} rows");
            let got: Vec<f32> = linear_out_in(x, w).into_data().to_vec().unwrap();
            assert_eq!(got.len(), rows * 70);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{rows} rows: {g} vs {w}"
                );
            }
        }
    }
}

/// The trait's default `grouped_experts_parts` (what every backend without an in-place
/// implementation runs): the parts stacked, then `grouped_experts`, the same values.
#[cfg(test)]
mod parts_tests {
    use crate::plan::MoeDims;
    use crate::testing::values;
    use crate::{grouped_experts, grouped_experts_parts, GroupedExpertsBackend};
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};

    #[test]
    fn ndarray_runs_per_expert_parts_by_stacking_them() {
        assert!(!<NdArray as GroupedExpertsBackend>::expert_parts_in_place());
        let device = Default::default();
        let MoeDims {
            tokens: t,
            top_k: k,
            experts: e,
            hidden: h,
            intermediate: i,
        } = MoeDims {
            tokens: 3,
            top_k: 2,
            experts: 3,
            hidden: 8,
            intermediate: 5,
        };
        let x =
            Tensor::<NdArray, 2>::from_data(TensorData::new(values(t * h, 0.3), [t, h]), &device);
        let w =
            Tensor::<NdArray, 2>::from_data(TensorData::new(values(t * k, 0.6), [t, k]), &device);
        // Slot (0, 1) masked (sentinel 3).
        let ids = Tensor::<NdArray, 2, Int>::from_data(
            TensorData::new(vec![2i64, 3, 0, 1, 1, 2], [t, k]),
            &device,
        );
        let gate_up = Tensor::<NdArray, 3>::from_data(
            TensorData::new(values(e * 2 * i * h, 1.9), [e, 2 * i, h]),
            &device,
        );
        let down = Tensor::<NdArray, 3>::from_data(
            TensorData::new(values(e * h * i, 0.8), [e, h, i]),
            &device,
        );
        let part = |w: &Tensor<NdArray, 3>, expert: usize, rows: core::ops::Range<usize>| {
            let [_, _, cols] = w.dims();
            let len = rows.len();
            w.clone()
                .slice([expert..expert + 1, rows, 0..cols])
                .reshape([len, cols])
        };
        let parts = [
            (0..e).map(|x| part(&gate_up, x, 0..i)).collect(),
            (0..e).map(|x| part(&gate_up, x, i..2 * i)).collect(),
            (0..e).map(|x| part(&down, x, 0..h)).collect(),
        ];
        let want: Vec<f32> = grouped_experts(x.clone(), ids.clone(), w.clone(), gate_up, down)
            .into_data()
            .into_vec()
            .unwrap();
        assert!(want.iter().any(|v| v.abs() > 1e-2), "not on zeros");
        let got: Vec<f32> = grouped_experts_parts(x, ids, w, parts)
            .into_data()
            .into_vec()
            .unwrap();
        assert_eq!(got, want);
    }
}
