//! Step 3 — dispatch: group the kept (token, expert) pairs by expert so each expert runs only on
//! its own tokens, and masked slots cost nothing.
//!
//! The grouped expert computation is a burn *backend extension* ([`MoeBackend`]): its default
//! method is a reference built from plain tensor ops, valid on every backend (ndarray, and any
//! `Autodiff<B>`, where the plain ops give exact gradients). GPU backends override it with a
//! fused kernel (`beam-kernels`) without any change to the layer.
//!
//! A masked slot is marked by the **sentinel expert id `E`** (any id `>= E`): the grouping step
//! drops it before any expert work, so it reads no weights and costs no FLOPs.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

use crate::combine::scatter_add_rows;
use crate::experts::swiglu;
pub use beam_kernels::reference::DispatchPlan;

/// Backend extension for the layer's hot operations: the routed experts on grouped (token,
/// expert) pairs ([`moe_grouped_experts`](Self::moe_grouped_experts)) and linear layers with
/// `[out, in]` weights ([`linear_out_in`](Self::linear_out_in)).
///
/// | backend | implementation |
/// |---|---|
/// | `NdArray` (feature `ndarray`) | few kept pairs per expert (decode, or a heavily masked prefill): `beam-kernels`' host GEMVs (`beam_kernels::host`, AVX2+FMA where the CPU has them) on the weight storage in place; many: the reference ([`grouped_experts_reference`]); linear layers: host GEMV up to 32 rows, else `W · xᵀ` matmuls |
/// | burn's `CubeBackend` — `Cuda`, `Wgpu` (features `cuda`, `wgpu`) | `beam-kernels`' cubecl kernels: routing compaction on the device, grouped SwiGLU GEMMs, deterministic combine |
/// | `Fusion<B>` — `Cuda`/`Wgpu` with burn's `fusion` feature (feature `fusion`) | `B`'s implementation, registered as a custom fusion operation |
/// | `Autodiff<B>` (feature `autodiff`) | the reference, built from burn tensor ops on `Autodiff<B>`: exact gradients for training |
///
/// A custom backend opts in to the reference with an empty `impl MoeBackend for MyBackend {}`.
pub trait MoeBackend: Backend {
    /// `out[t] = Σ_k weights[t, k] · Expert_{ids[t, k]}(x[t])`, skipping every slot whose id is
    /// the sentinel (`>= E`).
    ///
    /// `Expert_e(x) = down[e] · (silu(gate[e] · x) ⊙ up[e] · x)` with `gate_up[e] = [gate; up]`.
    ///
    /// # Shapes
    /// - `x`: `[T, H]`, `expert_ids`: `[T, K]` (int), `weights`: `[T, K]`
    /// - `gate_up`: `[E, 2I, H]` (gate rows first), `down`: `[E, H, I]`
    /// - output: `[T, H]`
    fn moe_grouped_experts(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: FloatTensor<Self>,
        down: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference_primitive::<Self>(x, expert_ids, weights, gate_up, down)
    }

    /// `x · Wᵀ` for a weight stored `[out, in]` (the PyTorch / Hugging Face layout): the router,
    /// the attention projections, the shared expert and the LM head. The default is
    /// `x.matmul(weight.transpose())`; ndarray overrides it with a host GEMV at decode, where its
    /// `matmul` would first copy the transposed weight.
    ///
    /// # Shapes
    /// - `x`: `[T, in]`, `weight`: `[out, in]`; output `[T, out]`
    fn linear_out_in(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        float::<Self, 2>(x)
            .matmul(float::<Self, 2>(weight).transpose())
            .into_primitive()
            .tensor()
    }
}

/// `x · Wᵀ` for a weight stored `[out, in]`, through [`MoeBackend::linear_out_in`].
///
/// # Shapes
/// - `x`: `[T, in]`, `weight`: `[out, in]`; output `[T, out]`
pub fn linear_out_in<B: MoeBackend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    float(B::linear_out_in(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
    ))
}

/// [`grouped_experts_reference`] on primitives: the default of
/// [`MoeBackend::moe_grouped_experts`] and ndarray's fallback.
fn reference_primitive<B: Backend>(
    x: FloatTensor<B>,
    expert_ids: IntTensor<B>,
    weights: FloatTensor<B>,
    gate_up: FloatTensor<B>,
    down: FloatTensor<B>,
) -> FloatTensor<B> {
    grouped_experts_reference::<B>(
        float(x),
        Tensor::from_primitive(expert_ids),
        float(weights),
        float(gate_up),
        float(down),
    )
    .into_primitive()
    .tensor()
}

fn float<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

#[cfg(feature = "ndarray")]
impl<E, I, Q> MoeBackend for burn::backend::NdArray<E, I, Q>
where
    E: burn::backend::ndarray::FloatNdArrayElement,
    I: burn::backend::ndarray::IntNdArrayElement,
    Q: burn::backend::ndarray::QuantElement,
    burn::backend::ndarray::NdArrayTensor:
        From<burn::backend::ndarray::SharedArray<E>> + From<burn::backend::ndarray::SharedArray<I>>,
{
    fn moe_grouped_experts(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: FloatTensor<Self>,
        down: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match ndarray_host::masked_moe::<Self>(&x, &expert_ids, &weights, &gate_up, &down) {
            Some(out) => out,
            None => reference_primitive::<Self>(x, expert_ids, weights, gate_up, down),
        }
    }

    fn linear_out_in(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        ndarray_host::linear(&x, &weight).unwrap_or_else(|| {
            // ndarray's matmul copies a transposed right operand (the whole weight) first;
            // transposing the activations instead copies the smaller side.
            float::<Self, 2>(weight)
                .matmul(float::<Self, 2>(x).transpose())
                .transpose()
                .into_primitive()
                .tensor()
        })
    }
}

/// Decode-time host paths on burn's ndarray backend: `beam_kernels::host` on the tensors'
/// storage, borrowed in place (weights are never copied).
#[cfg(feature = "ndarray")]
mod ndarray_host {
    use beam_kernels::host::{linear as host_linear, masked_moe_planned, HostFloat};
    use beam_kernels::reference::{DispatchPlan, MoeDims};
    use burn::backend::ndarray::NdArrayTensor;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Int, Tensor, TensorData, TensorMetadata};

    /// Mean kept pairs per routed expert up to which [`masked_moe`] runs the host GEMV (each
    /// expert's weights read once, its tokens dotted in passes of 4); above, ndarray's blocked
    /// `matmul` (the reference). Measured on 2 cores: OLMoE shape at 64 pairs per expert, host
    /// 752 ms vs reference 2690 ms; the small shape (weights in cache) at 128–512 within ±15%.
    /// On the host the routing table is already in memory, so the choice uses the actual kept
    /// pairs rather than the shape (a masked prefill with few tokens left per expert is GEMV work).
    pub(super) const HOST_MAX_PAIRS_PER_EXPERT: usize = 256;

    /// `Some(output)` when the kept pairs per routed expert are few (at most
    /// [`HOST_MAX_PAIRS_PER_EXPERT`] on average) and the four float tensors share an `f32` or
    /// `f64` dtype in contiguous row-major storage; `None` sends the call to the reference
    /// (many tokens per expert, where ndarray's blocked `matmul` wins, or unusual layouts).
    pub(super) fn masked_moe<B>(
        x: &NdArrayTensor,
        expert_ids: &NdArrayTensor,
        weights: &NdArrayTensor,
        gate_up: &NdArrayTensor,
        down: &NdArrayTensor,
    ) -> Option<NdArrayTensor>
    where
        B: Backend<IntTensorPrimitive = NdArrayTensor>,
    {
        let [tokens, hidden] = x.shape().dims();
        let [_, top_k] = expert_ids.shape().dims();
        let [experts, two_i, _] = gate_up.shape().dims();
        let dims = MoeDims {
            tokens,
            top_k,
            experts,
            hidden,
            intermediate: two_i / 2,
        };
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
    pub(super) const LINEAR_MAX_ROWS: usize = 32;

    /// `Some(x · Wᵀ)` for at most [`LINEAR_MAX_ROWS`] rows when `x` and `weight` share an `f32`
    /// or `f64` dtype in contiguous row-major storage.
    pub(super) fn linear(x: &NdArrayTensor, weight: &NdArrayTensor) -> Option<NdArrayTensor> {
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
                        let out = host_linear(
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

    fn output<F: HostFloat + burn::tensor::Element>(
        values: Vec<F>,
        dims: MoeDims,
    ) -> NdArrayTensor {
        NdArrayTensor::from_data(TensorData::new(values, [dims.tokens, dims.hidden]))
    }
}

#[cfg(feature = "cubecl-backends")]
impl<R, F, I, BT> MoeBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    R::Server: burn_cubecl::cubecl::server::ComputeServer,
    R::Device: burn::tensor::backend::DeviceOps,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn moe_grouped_experts(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: FloatTensor<Self>,
        down: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        beam_kernels::masked_moe(x, expert_ids, weights, gate_up, down, Default::default())
    }
}

#[cfg(feature = "fusion")]
mod fusion {
    use super::MoeBackend;
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn::tensor::Shape;
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

    /// The grouped experts as one custom operation in the fusion stream: fusion executes the
    /// operations queued before it, then runs the inner backend's implementation (the kernels).
    impl<B: FusionBackend + MoeBackend> MoeBackend for Fusion<B> {
        fn moe_grouped_experts(
            x: FloatTensor<Self>,
            expert_ids: IntTensor<Self>,
            weights: FloatTensor<Self>,
            gate_up: FloatTensor<Self>,
            down: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            #[derive(Clone, Debug)]
            struct GroupedExperts<B> {
                desc: CustomOpIr,
                _backend: core::marker::PhantomData<B>,
            }

            impl<B1: FusionBackend + MoeBackend> Operation<B1::FusionRuntime> for GroupedExperts<B1> {
                fn execute(
                    &self,
                    handles: &mut HandleContainer<
                        <B1::FusionRuntime as FusionRuntime>::FusionHandle,
                    >,
                ) {
                    let ([x, ids, weights, gate_up, down], [out]) = self.desc.as_fixed();
                    let output = B1::moe_grouped_experts(
                        handles.get_float_tensor::<B1>(x),
                        handles.get_int_tensor::<B1>(ids),
                        handles.get_float_tensor::<B1>(weights),
                        handles.get_float_tensor::<B1>(gate_up),
                        handles.get_float_tensor::<B1>(down),
                    );
                    handles.register_float_tensor::<B1>(&out.id, output);
                }
            }

            let client = x.client.clone();
            let streams =
                OperationStreams::with_inputs([&x, &expert_ids, &weights, &gate_up, &down]);
            let out = TensorIr::uninit(
                client.create_empty_handle(),
                Shape::new([x.shape[0], x.shape[1]]),
                x.dtype,
            );
            let desc = CustomOpIr::new(
                "beam_moe_grouped_experts",
                &[
                    x.into_ir(),
                    expert_ids.into_ir(),
                    weights.into_ir(),
                    gate_up.into_ir(),
                    down.into_ir(),
                ],
                &[out],
            );
            client
                .register(
                    streams,
                    OperationIr::Custom(desc.clone()),
                    GroupedExperts::<B> {
                        desc,
                        _backend: core::marker::PhantomData,
                    },
                )
                .output()
        }
    }
}

#[cfg(feature = "autodiff")]
impl<B: MoeBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> MoeBackend
    for burn::backend::Autodiff<B, C>
{
}

/// Calls [`MoeBackend::moe_grouped_experts`] on tensors. Shapes as documented there.
pub fn grouped_experts<B: MoeBackend>(
    x: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    gate_up: Tensor<B, 3>,
    down: Tensor<B, 3>,
) -> Tensor<B, 2> {
    float(B::moe_grouped_experts(
        x.into_primitive().tensor(),
        expert_ids.into_primitive(),
        weights.into_primitive().tensor(),
        gate_up.into_primitive().tensor(),
        down.into_primitive().tensor(),
    ))
}

/// Replaces the ids of masked slots (`mask == 0`) by the sentinel `num_experts`.
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

/// Reference for [`MoeBackend::moe_grouped_experts`]: reads the id table back to the host, groups
/// kept pairs by expert ([`DispatchPlan`]), runs each expert once on the rows of its tokens
/// (touching only that expert's weights), weights the rows and scatter-adds them back.
pub fn grouped_experts_reference<B: Backend>(
    x: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    gate_up: Tensor<B, 3>,
    down: Tensor<B, 3>,
) -> Tensor<B, 2> {
    let [tokens, hidden] = x.dims();
    let [_, top_k] = expert_ids.dims();
    let [experts, _, _] = gate_up.dims();
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
            swiglu(
                rows.clone().narrow(0, start, len),
                expert_weights(gate_up.clone(), expert),
                expert_weights(down.clone(), expert),
            )
        })
        .collect();
    scatter_add_rows(Tensor::cat(outputs, 0), pair_weights, token_index, tokens)
}

/// An independent dense formulation used to check the grouped paths: every expert runs on every
/// token, then a `[T, E]` coefficient matrix picks and weights the outputs. `O(T · E)` expert work.
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
    let h = crate::activation::silu(gu.clone().narrow(2, 0, inter)) * gu.narrow(2, inter, inter);
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

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::ndarray_host;
    use beam_kernels::reference::{masked_moe_f64, MoeDims};
    use burn::backend::ndarray::NdArrayTensor;
    use burn::backend::NdArray;
    use burn::tensor::{Tensor, TensorData};

    /// Deterministic O(1) values, none zero.
    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 0.5 + 0.01)
            .collect()
    }

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
        let f32_out = ndarray_host::masked_moe::<NdArray<f32>>(
            &tensor(x.clone(), vec![t, h]),
            &ids_tensor,
            &tensor(w.clone(), vec![t, k]),
            &tensor(gate_up.clone(), vec![e, 2 * i, h]),
            &tensor(down.clone(), vec![e, h, i]),
        )?;
        let wide = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let f64_out = ndarray_host::masked_moe::<NdArray<f64>>(
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
        use crate::dispatch::linear_out_in;
        let device = Default::default();
        // 3 rows: host GEMV; 40 rows (> LINEAR_MAX_ROWS): W · xᵀ matmul.
        for rows in [3, ndarray_host::LINEAR_MAX_ROWS + 8] {
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
            let host = ndarray_host::linear(
                &x.clone().into_primitive().tensor(),
                &w.clone().into_primitive().tensor(),
            );
            assert_eq!(
                host.is_some(),
                rows <= ndarray_host::LINEAR_MAX_ROWS,
                "{rows} rows"
            );
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
