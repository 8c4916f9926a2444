//! burn's `Fusion<B>` (`Cuda`/`Wgpu` with burn's `fusion` feature): the grouped experts become one
//! custom operation in the fusion stream; fusion executes the operations queued before it, then
//! runs the inner backend's implementation (the cubecl kernels). `[out, in]` linear layers use the
//! reference (plain tensor ops that fusion sees and may fuse).

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::Shape;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use crate::{GroupedExpertsBackend, KvCacheBackend, LinearBackend};

impl<B: FusionBackend + GroupedExpertsBackend> GroupedExpertsBackend for Fusion<B> {
    fn grouped_experts(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: FloatTensor<Self>,
        down: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let client = x.client.clone();
        let streams = OperationStreams::with_inputs([&x, &expert_ids, &weights, &gate_up, &down]);
        let out = TensorIr::uninit(
            client.create_empty_handle(),
            Shape::new([x.shape[0], x.shape[1]]),
            x.dtype,
        );
        let desc = CustomOpIr::new(
            "beam_grouped_experts",
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

impl<B: FusionBackend> LinearBackend for Fusion<B> {}

/// The key/value cache: the reference (a concatenation fusion sees).
impl<B: FusionBackend> KvCacheBackend for Fusion<B> {}

/// The queued grouped-experts operation: inputs `[x, expert_ids, weights, gate_up, down]`,
/// output `[T, H]`.
#[derive(Clone, Debug)]
struct GroupedExperts<B> {
    desc: CustomOpIr,
    _backend: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + GroupedExpertsBackend> Operation<B::FusionRuntime> for GroupedExperts<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([x, ids, weights, gate_up, down], [out]) = self.desc.as_fixed();
        let output = B::grouped_experts(
            handles.get_float_tensor::<B>(x),
            handles.get_int_tensor::<B>(ids),
            handles.get_float_tensor::<B>(weights),
            handles.get_float_tensor::<B>(gate_up),
            handles.get_float_tensor::<B>(down),
        );
        handles.register_float_tensor::<B>(&out.id, output);
    }
}
