//! burn's cubecl backends (`CubeBackend`: `Cuda`, `Wgpu`): the extension's implementation and the
//! launch code of its kernels (`kernel.rs`): routing compaction → expert GEMMs (decode or prefill
//! regime) → combine. Nothing here reads device memory back to the host; grids are sized from
//! shapes only and cubes whose expert has no kept pairs exit at once.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, full_device_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeCount, CubeDim};

use crate::kernel::{
    combine_kernel, compact_routes_kernel, expert_gemv_kernel, expert_tile_kernel, GEMV_LANES,
    GEMV_ROWS, TILE_M, TILE_N, TILE_THREADS,
};
use crate::{
    float, primitive, GroupedExpertsBackend, KvCacheBackend, LinearBackend, MaskedMoeOptions,
    Regime,
};

/// The grouped experts run [`masked_moe`]: compaction, grouped SwiGLU GEMMs and the
/// deterministic combine, all on the device.
impl<R, F, I, BT> GroupedExpertsBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    R::Server: burn_cubecl::cubecl::server::ComputeServer,
    R::Device: burn::tensor::backend::DeviceOps,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn grouped_experts(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: FloatTensor<Self>,
        down: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // 16-bit weights with f32 activations (weights kept in the checkpoint's precision): the
        // kernels take one storage dtype, so the activations and routing weights go in at the
        // weights' precision and the output comes back at the activations' (products are
        // accumulated in f32 inside the kernels either way).
        let (activations, stored) = (x.dtype, gate_up.dtype);
        if activations != stored && down.dtype == stored {
            let to =
                |t: FloatTensor<Self>, dtype: DType| primitive(float::<Self, 2>(t).cast(dtype));
            let out = masked_moe(
                to(x, stored),
                expert_ids,
                to(weights, stored),
                gate_up,
                down,
                Default::default(),
            );
            return to(out, activations);
        }
        masked_moe(x, expert_ids, weights, gate_up, down, Default::default())
    }
}

/// `[out, in]` linear layers: the reference (burn's matmul on a transposed view; no copy on
/// these backends).
impl<R, F, I, BT> LinearBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    R::Server: burn_cubecl::cubecl::server::ComputeServer,
    R::Device: burn::tensor::backend::DeviceOps,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
}

/// The key/value cache: the reference (a concatenation on the device).
impl<R, F, I, BT> KvCacheBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    R::Server: burn_cubecl::cubecl::server::ComputeServer,
    R::Device: burn::tensor::backend::DeviceOps,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
}

/// The device-side routing table made by [`compact_routes`].
#[derive(Debug, Clone)]
pub struct CompactRoutes<R: CubeRuntime> {
    /// `u32` `[E + 1]`: expert `e`'s pairs are `pairs[offsets[e]..offsets[e + 1]]`.
    pub offsets: CubeTensor<R>,
    /// `u32` `[T · K]`: flat slots `t · K + k` of kept pairs grouped by expert (tokens ascending),
    /// then the sentinel `T · K` up to the end.
    pub pairs: CubeTensor<R>,
}

/// Routing compaction on the device (one cube): counts per expert, prefix sum, sorted pair list.
/// Slots whose id is not in `0..num_experts` (the sentinel `E`) are dropped. Same result as
/// [`crate::plan::DispatchPlan::from_ids`].
///
/// `poison` pre-fills both outputs with `u32::MAX` (see [`MaskedMoeOptions::poison`]).
///
/// # Shapes
/// - `expert_ids`: `[T, K]`, any integer dtype
/// - output: `offsets` `[E + 1]`, `pairs` `[T · K]` (`u32`)
pub fn compact_routes<R: CubeRuntime>(
    expert_ids: CubeTensor<R>,
    num_experts: usize,
    poison: bool,
) -> CompactRoutes<R> {
    let expert_ids = into_contiguous(expert_ids);
    let slots = expert_ids.meta.shape().num_elements();
    assert!(
        slots < u32::MAX as usize && num_experts < u32::MAX as usize,
        "compact_routes: {slots} slots / {num_experts} experts exceed u32 indexing"
    );
    let offsets = scratch(&expert_ids, [num_experts + 1], DType::U32, poison);
    let pairs = scratch(&expert_ids, [slots], DType::U32, poison);
    // Split each expert's scan into `parts` chunks so about 256 threads share the work.
    let parts = (256 / num_experts.max(1)).clamp(1, slots.max(1));
    let items = num_experts * parts;
    let threads = items.clamp(1, 256) as u32;
    compact_routes_kernel::launch::<R>(
        &expert_ids.client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(threads),
        expert_ids.clone().into_tensor_arg(),
        offsets.clone().into_tensor_arg(),
        pairs.clone().into_tensor_arg(),
        slots as u32,
        num_experts as u32,
        parts,
        items,
        expert_ids.dtype.into(),
    );
    CompactRoutes { offsets, pairs }
}

/// BEAM's masked MoE on the device: `out[t] = Σ_k w[t, k] · Expert_{ids[t, k]}(x[t])`, where
/// `Expert_e(x) = down[e] · (silu(gate[e] · x) ⊙ up[e] · x)` and slots with an id outside `0..E`
/// (the sentinel `E` marks masked slots) cost nothing: no FLOPs, no weight reads.
///
/// Routing compaction, gate+up GEMM with SiLU·mul in its epilogue, down GEMM with the routing
/// weight in its epilogue, then a deterministic per-token sum over the K slot rows. The regime
/// (GEMV for decode, tiled for prefill) comes from [`Regime::from_shape`] unless
/// `options.regime` forces one. Float inputs share one dtype (f32, f16 or bf16 where the backend
/// supports it); products are accumulated in f32.
///
/// # Shapes
/// - `x`: `[T, H]`, `expert_ids`: `[T, K]` (integer), `weights`: `[T, K]`
/// - `gate_up`: `[E, 2I, H]` (gate rows first), `down`: `[E, H, I]`
/// - output: `[T, H]`
///
/// # Panics
/// On inconsistent shapes or mixed float dtypes (a programming error, like a shape mismatch in
/// any burn op), naming the tensors and their shapes.
pub fn masked_moe<R: CubeRuntime>(
    x: CubeTensor<R>,
    expert_ids: CubeTensor<R>,
    weights: CubeTensor<R>,
    gate_up: CubeTensor<R>,
    down: CubeTensor<R>,
    options: MaskedMoeOptions,
) -> CubeTensor<R> {
    let dims = |t: &CubeTensor<R>| t.meta.shape().to_vec();
    let (xs, ids, ws, gus, ds) = (
        dims(&x),
        dims(&expert_ids),
        dims(&weights),
        dims(&gate_up),
        dims(&down),
    );
    let shapes = format!(
        "x {xs:?}, expert_ids {ids:?}, weights {ws:?}, gate_up {gus:?}, down {ds:?} \
         (expected [T, H], [T, K], [T, K], [E, 2I, H], [E, H, I])"
    );
    assert!(
        xs.len() == 2 && ids.len() == 2 && gus.len() == 3 && ds.len() == 3,
        "masked_moe: wrong ranks: {shapes}"
    );
    let (tokens, hidden, top_k) = (xs[0], xs[1], ids[1]);
    let (experts, intermediate) = (gus[0], gus[1] / 2);
    assert!(
        ids[0] == tokens
            && ws == ids
            && gus[1] % 2 == 0
            && gus[2] == hidden
            && ds == [experts, hidden, intermediate],
        "masked_moe: inconsistent shapes: {shapes}"
    );
    let dtype = x.dtype;
    assert!(
        weights.dtype == dtype && gate_up.dtype == dtype && down.dtype == dtype,
        "masked_moe: x, weights, gate_up and down must share one float dtype, got {:?}, {:?}, {:?}, {:?}",
        x.dtype,
        weights.dtype,
        gate_up.dtype,
        down.dtype
    );
    if tokens == 0 || top_k == 0 || hidden == 0 || experts == 0 || intermediate == 0 {
        return zeros_client(
            x.client.clone(),
            x.device.clone(),
            [tokens, hidden].into(),
            dtype,
        );
    }

    let (x, expert_ids, weights, gate_up, down) = (
        into_contiguous(x),
        into_contiguous(expert_ids),
        into_contiguous(weights),
        into_contiguous(gate_up),
        into_contiguous(down),
    );
    let routes = compact_routes(expert_ids.clone(), experts, options.poison);
    let slots = tokens * top_k;
    let hidden_acts = scratch(&x, [slots, intermediate], dtype, options.poison);
    let slot_outputs = scratch(&x, [slots, hidden], dtype, options.poison);

    let regime = options
        .regime
        .unwrap_or_else(|| Regime::from_shape(tokens, top_k, experts));
    let gate_up_phase = Phase {
        input: &x,
        weight: &gate_up,
        output: &hidden_acts,
        inner: hidden,
        out_features: intermediate,
        gated: true,
    };
    let down_phase = Phase {
        input: &hidden_acts,
        weight: &down,
        output: &slot_outputs,
        inner: intermediate,
        out_features: hidden,
        gated: false,
    };
    for phase in [gate_up_phase, down_phase] {
        match regime {
            Regime::Decode => phase.launch_gemv(&weights, &routes, experts, top_k),
            Regime::Prefill => phase.launch_tiled(&weights, &routes, experts, tokens, top_k),
        }
    }

    let output = scratch(&x, [tokens, hidden], dtype, options.poison);
    let client = &x.client;
    let cube_dim = CubeDim::new(client, tokens * hidden);
    combine_kernel::launch::<R>(
        client,
        calculate_cube_count_elemwise(client, tokens * hidden, cube_dim),
        cube_dim,
        expert_ids.clone().into_tensor_arg(),
        slot_outputs.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        hidden as u32,
        top_k as u32,
        experts as u32,
        [dtype.into(), expert_ids.dtype.into()],
    );
    output
}

/// One expert GEMM: gate+up (`gated`) or down.
struct Phase<'a, R: CubeRuntime> {
    input: &'a CubeTensor<R>,
    weight: &'a CubeTensor<R>,
    output: &'a CubeTensor<R>,
    inner: usize,
    out_features: usize,
    gated: bool,
}

impl<R: CubeRuntime> Phase<'_, R> {
    fn launch_gemv(
        &self,
        weights: &CubeTensor<R>,
        routes: &CompactRoutes<R>,
        experts: usize,
        top_k: usize,
    ) {
        let client = &self.input.client;
        // Widest vector load the backend likes that divides the reduction length.
        let vector_size = client
            .io_optimized_vector_sizes(self.input.dtype.size())
            .filter(|&size| self.inner.is_multiple_of(size))
            .max()
            .unwrap_or(1);
        expert_gemv_kernel::launch::<R>(
            client,
            CubeCount::Static(
                self.out_features.div_ceil(GEMV_ROWS as usize) as u32,
                experts as u32,
                1,
            ),
            CubeDim::new_2d(GEMV_LANES, GEMV_ROWS),
            vector_size,
            self.input.clone().into_tensor_arg(),
            self.weight.clone().into_tensor_arg(),
            weights.clone().into_tensor_arg(),
            routes.offsets.clone().into_tensor_arg(),
            routes.pairs.clone().into_tensor_arg(),
            self.output.clone().into_tensor_arg(),
            (self.inner / vector_size) as u32,
            self.out_features as u32,
            top_k as u32,
            self.gated,
            self.input.dtype.into(),
        );
    }

    fn launch_tiled(
        &self,
        weights: &CubeTensor<R>,
        routes: &CompactRoutes<R>,
        experts: usize,
        tokens: usize,
        top_k: usize,
    ) {
        let client = &self.input.client;
        // Top-K ids are distinct per token, so an expert has at most T pairs; the kernel loops
        // over further row tiles if a caller repeats an id within a token.
        expert_tile_kernel::launch::<R>(
            client,
            CubeCount::Static(
                self.out_features.div_ceil(TILE_N) as u32,
                tokens.div_ceil(TILE_M) as u32,
                experts as u32,
            ),
            CubeDim::new_2d(TILE_THREADS, TILE_THREADS),
            self.input.clone().into_tensor_arg(),
            self.weight.clone().into_tensor_arg(),
            weights.clone().into_tensor_arg(),
            routes.offsets.clone().into_tensor_arg(),
            routes.pairs.clone().into_tensor_arg(),
            self.output.clone().into_tensor_arg(),
            self.inner as u32,
            self.out_features as u32,
            top_k as u32,
            self.gated,
            self.input.dtype.into(),
        );
    }
}

/// A contiguous buffer on `like`'s device; with `poison`, filled with NaN (floats) or `u32::MAX`
/// so that any element a kernel forgets to write shows up in tests.
fn scratch<R: CubeRuntime, const D: usize>(
    like: &CubeTensor<R>,
    shape: [usize; D],
    dtype: DType,
    poison: bool,
) -> CubeTensor<R> {
    let (client, device) = (like.client.clone(), like.device.clone());
    let shape = Shape::from(shape);
    if !poison {
        return empty_device_contiguous_dtype(client, device, shape, dtype);
    }
    let value = match dtype {
        DType::U32 => InputScalar::new(u32::MAX, dtype),
        _ => InputScalar::new(f32::NAN, dtype),
    };
    full_device_dtype(client, shape, device, value, dtype)
}
