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

/// Backend extension running the routed experts on grouped (token, expert) pairs.
///
/// | backend | implementation |
/// |---|---|
/// | `NdArray` (feature `ndarray`) | the reference ([`grouped_experts_reference`]) |
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
        grouped_experts_reference::<Self>(
            float(x),
            Tensor::from_primitive(expert_ids),
            float(weights),
            float(gate_up),
            float(down),
        )
        .into_primitive()
        .tensor()
    }
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
