//! burn's Flex CPU backend: the host kernels ([`crate::host`]) on the tensors' storage in place,
//! with weights in `f32`, `bf16` or `f16` and activations in `f32` (or everything in `f64`).
//!
//! Flex keeps a tensor's dtype at run time, so a model can hold its weights in the checkpoint's
//! 16-bit precision (half the bytes of `f32`, the bytes decode has to stream) while its
//! activations, norms and accumulators stay `f32`:
//!
//! - grouped experts: the host GEMVs whenever the weights are 16-bit (each weight widened to
//!   `f32` as it is loaded; Flex's `matmul` would need an `f32` copy of every routed expert) and,
//!   for `f32` weights, while the kept pairs per routed expert are few (at most
//!   [`HOST_MAX_PAIRS_PER_EXPERT`] on average); the tensor-ops reference otherwise;
//! - `[out, in]` linear layers: the host GEMV for 16-bit weights and for `f32` weights up to
//!   [`LINEAR_MAX_ROWS`] rows; above, Flex's `matmul` on the transposed view (no copy);
//! - quantized weights ([`crate::quant`]: q8 or q4, `I8` values and `f16` scales) always take
//!   the host kernels ([`masked_moe_quant`], [`linear_quant`]): int8 dots with the activations
//!   quantized once per call (blocks of 32 on AVX2 CPUs, AVX-512 VNNI kernels where present, at
//!   every token count), dequantized tiles and the GEMM for many tokens per row block
//!   otherwise. Flex therefore says `quant_in_place() == true`, and the model loader hands it
//!   the packed blocks.
//!
//! - attention over the key/value cache ([`attention`]): the host kernel for any number of
//!   queries, on the cache's buffer in place (what [`kv_append`] keeps, in `f32`, `f16` or
//!   `bf16`), key/value heads on [`crate::pool`]'s threads with their query rows in tiles of up
//!   to 4, each tile reading only the positions its masks let through.
//!
//! Anything else (activations in a 16-bit dtype, mixed activation dtypes) runs the reference,
//! which widens 16-bit weights to the activations' dtype first.

use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorData, TensorMetadata};
use half::{bf16, f16};

use crate::host::{linear as host_linear, masked_moe_experts, masked_moe_planned, ExpertMatrices};
use crate::plan::{DispatchPlan, MoeDims};
use crate::quant::{Q4Matrix, Q8Matrix, QuantMatrix};
use crate::reference::{
    attention_primitive, grouped_experts_primitive, grouped_experts_quant_primitive,
    kv_append_reference, linear_out_in_quant_primitive, linear_out_in_reference, rope_reference,
};
use crate::{
    float, primitive, ExpertParts, GroupedExpertsBackend, KvCacheBackend, LinearBackend,
    QuantPrimitive,
};

impl GroupedExpertsBackend for Flex {
    fn grouped_experts(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: FloatTensor<Self>,
        down: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match masked_moe(&x, &expert_ids, &weights, &gate_up, &down) {
            Some(out) => out,
            None => grouped_experts_primitive::<Self>(x, expert_ids, weights, gate_up, down),
        }
    }

    fn grouped_experts_quant(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: QuantPrimitive<Self>,
        down: QuantPrimitive<Self>,
    ) -> FloatTensor<Self> {
        match masked_moe_quant(&x, &expert_ids, &weights, &gate_up, &down) {
            Some(out) => out,
            None => grouped_experts_quant_primitive::<Self>(x, expert_ids, weights, gate_up, down),
        }
    }

    fn grouped_experts_parts(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        experts: ExpertParts<Self>,
    ) -> FloatTensor<Self> {
        match masked_moe_parts(&x, &expert_ids, &weights, &experts) {
            Some(out) => out,
            None => {
                let (gate_up, down) = experts.stacked();
                Self::grouped_experts(x, expert_ids, weights, gate_up, down)
            }
        }
    }

    fn expert_parts_in_place() -> bool {
        true
    }
}

impl LinearBackend for Flex {
    fn linear_out_in(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        linear(&x, &weight)
            .unwrap_or_else(|| primitive(linear_out_in_reference::<Self>(float(x), float(weight))))
    }

    fn linear_out_in_quant(
        x: FloatTensor<Self>,
        weight: QuantPrimitive<Self>,
    ) -> FloatTensor<Self> {
        linear_quant(&x, &weight)
            .unwrap_or_else(|| linear_out_in_quant_primitive::<Self>(x, weight))
    }

    fn quant_in_place() -> bool {
        true
    }

    fn borrows_host_weights() -> bool {
        true
    }
}

impl KvCacheBackend for Flex {
    fn kv_append(cache: FloatTensor<Self>, new: FloatTensor<Self>) -> FloatTensor<Self> {
        kv_append(cache, &new).unwrap_or_else(|cache| {
            primitive(kv_append_reference::<Self>(float(cache), float(new)))
        })
    }

    fn kv_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        attention(&q, &k, &v, &mask, scale)
            .unwrap_or_else(|| attention_primitive::<Self>([q, k, v, mask], scale))
    }

    fn kv_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        rope(&x, &cos, &sin)
            .unwrap_or_else(|| primitive(rope_reference::<Self>(float(x), float(cos), float(sin))))
    }

    fn reads_16_bit_kv_in_place() -> bool {
        true
    }
}

/// `Some(output)` when [`host::rope`](crate::host::rope) takes the call: `x`, `cos` and `sin`
/// all `f32`, `x` of 4 dimensions `[B, T, H, D]` and the tables `[T, D]` (read contiguous, a
/// copy only when a view is not). `None` sends the call to the reference.
///
/// # Shapes
/// As [`KvCacheBackend::kv_rope`].
pub fn rope(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor) -> Option<FlexTensor> {
    if [x, cos, sin].iter().any(|t| t.dtype() != DType::F32)
        || x.shape().num_dims() != 4
        || cos.shape().num_dims() != 2
        || sin.shape().num_dims() != 2
    {
        return None;
    }
    let dims: [usize; 4] = x.shape().dims();
    let table = [dims[1], dims[3]];
    if cos.shape().dims::<2>() != table || sin.shape().dims::<2>() != table {
        return None;
    }
    let (x, cos, sin) = (x.to_contiguous(), cos.to_contiguous(), sin.to_contiguous());
    let out = crate::host::rope(x.as_slice()?, dims, cos.as_slice()?, sin.as_slice()?);
    Some(FlexTensor::from_data(TensorData::new(out, dims)))
}

/// `Some(output)` when [`host::attention`](crate::host::attention) takes the call: `q` and the
/// mask `f32`, keys and values both `f32`, both `f16` or both `bf16` (a 16-bit cache: read in
/// its own precision), a `[1, 1, T, S]` mask, and keys and values whose rows are contiguous (a
/// [`kv_append`] buffer or any other such view: read in place; queries too, else copied). Any
/// number of queries: decode, and a prefill, where each query reads only the positions its mask
/// lets through (the reference's batched `matmul`s score every position, then mask half of
/// them; measured in docs/BENCHMARKS.md, session 24). `None` sends the call to the reference.
///
/// # Shapes
/// As [`KvCacheBackend::kv_attention`]. With several queries and heads the output is a view of
/// a `[B, T, H, D_v]` buffer (its heads swapped in front), the layout the output projection
/// reads once the model swaps them back.
pub fn attention(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    mask: &FlexTensor,
    scale: f64,
) -> Option<FlexTensor> {
    if [q, mask].iter().any(|t| t.dtype() != DType::F32)
        || k.dtype() != v.dtype()
        || [q, k, v, mask].iter().any(|t| t.shape().num_dims() != 4)
    {
        return None;
    }
    match k.dtype() {
        DType::F32 => attention_typed::<f32>(q, k, v, mask, scale),
        DType::F16 => attention_typed::<f16>(q, k, v, mask, scale),
        DType::BF16 => attention_typed::<bf16>(q, k, v, mask, scale),
        _ => None,
    }
}

/// What a key/value cache on Flex holds: `f32`, `f16` or `bf16`.
trait CacheElement: crate::host::CacheValue + burn::tensor::Element + bytemuck::Pod {}

impl<E: crate::host::CacheValue + burn::tensor::Element + bytemuck::Pod> CacheElement for E {}

/// A `[B, H, S, D]` tensor's values where they are: rows of `D` contiguous, non-negative strides
/// (`None` otherwise, or for another element type than `E`).
fn heads_of<E: CacheElement>(t: &FlexTensor) -> Option<crate::host::Heads<'_, E>> {
    let layout = t.layout();
    let strides = layout.strides();
    if t.shape().num_dims() != 4 || strides[3] != 1 {
        return None;
    }
    let stride = |i: usize| usize::try_from(strides[i]).ok();
    let values = t.storage::<E>().get(layout.start_offset()..)?;
    crate::host::Heads::new(
        values,
        t.shape().dims(),
        [stride(0)?, stride(1)?, stride(2)?],
    )
}

/// [`heads_of`] `t`, or of a contiguous copy of it (kept in `copy`) when its rows are not
/// contiguous: the rows where they are whenever they can be.
fn heads_or_copy<'a, E: CacheElement>(
    t: &'a FlexTensor,
    copy: &'a mut Option<FlexTensor>,
) -> Option<crate::host::Heads<'a, E>> {
    if let Some(rows) = heads_of::<E>(t) {
        return Some(rows);
    }
    let copy: &'a FlexTensor = copy.insert(t.to_contiguous());
    heads_of::<E>(copy)
}

/// [`attention`] with keys and values of element type `E` (checked by the caller).
fn attention_typed<E: CacheElement>(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    mask: &FlexTensor,
    scale: f64,
) -> Option<FlexTensor> {
    let [batch, heads, queries, dim] = q.shape().dims();
    let (keys, values) = (heads_of::<E>(k)?, heads_of::<E>(v)?);
    let [kb, kv_heads, positions, kd] = keys.dims();
    let [vb, vh, vs, value_dim] = values.dims();
    if mask.shape().dims::<4>() != [1, 1, queries, positions]
        || kb != batch
        || kd != dim
        || (vb, vh, vs) != (batch, kv_heads, positions)
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
    {
        return None;
    }
    // Queries where they are (a projection's output with its heads swapped in front).
    let mut copy = None;
    let query = heads_or_copy::<f32>(q, &mut copy)?;
    let mask = mask.to_contiguous();
    let out = crate::host::attention(query, keys, values, mask.as_slice()?, scale as f32);
    if queries == 1 || heads == 1 {
        return Some(FlexTensor::from_data(TensorData::new(
            out,
            [batch, heads, queries, value_dim],
        )));
    }
    // Several queries and heads: returned as a view of `[B, T, H, D_v]` rows (one copy of whole
    // rows here), so the model's `swap_dims(1, 2)` and `reshape` to `[B, T, H · D_v]` (what the
    // output projection reads) copy nothing more.
    let mut tokens_first = vec![0.0f32; out.len()];
    for (row, values) in out.chunks_exact(value_dim).enumerate() {
        let (b, h, t) = (
            row / (heads * queries),
            (row / queries) % heads,
            row % queries,
        );
        let at = ((b * queries + t) * heads + h) * value_dim;
        tokens_first[at..at + value_dim].copy_from_slice(values);
    }
    let tensor = FlexTensor::from_data(TensorData::new(
        tokens_first,
        [batch, queries, heads, value_dim],
    ));
    Some(tensor.transpose(1, 2))
}

/// Positions a key/value buffer made by [`kv_append`] has room for at least.
pub const KV_MIN_CAPACITY: usize = 64;

/// `Ok(cat([cache, new], 2))` without copying what `cache` holds when it can: `cache` is then a
/// view of the first `S` positions of a uniquely owned buffer `[B, H, C, D]` with `C ≥ S + T`
/// (what this function returns), and `new`'s `T` positions are written after them in place.
/// Otherwise (a first append, a full or shared buffer) the values are copied into a new buffer
/// with room for `max(2 (S + T), KV_MIN_CAPACITY)` positions, so appending `N` positions one at a
/// time copies `O(N)` values in all, not `O(N²)`. Both tensors must have one dtype, `f32`, `f16`
/// or `bf16` (the cache's precision: the model casts new keys and values to it first);
/// `Err(cache)` for the reference otherwise, or when the shapes do not line up.
///
/// # Shapes
/// - `cache`: `[B, H, S, D]`, `new`: `[B, H, T, D]`; output `[B, H, S + T, D]` (a view of its
///   buffer: strides `[H·C·D, C·D, D, 1]`)
pub fn kv_append(cache: FlexTensor, new: &FlexTensor) -> Result<FlexTensor, FlexTensor> {
    if cache.dtype() != new.dtype() {
        return Err(cache);
    }
    match cache.dtype() {
        DType::F32 => kv_append_typed::<f32>(cache, new),
        DType::F16 => kv_append_typed::<f16>(cache, new),
        DType::BF16 => kv_append_typed::<bf16>(cache, new),
        _ => Err(cache),
    }
}

/// [`kv_append`] on tensors of element type `E` (checked by the caller).
fn kv_append_typed<E: CacheElement>(
    mut cache: FlexTensor,
    new: &FlexTensor,
) -> Result<FlexTensor, FlexTensor> {
    let (cache_shape, new_shape) = (cache.shape(), new.shape());
    if cache_shape.num_dims() != 4 || new_shape.num_dims() != 4 {
        return Err(cache);
    }
    let [b, h, s, d] = cache_shape.dims();
    let [nb, nh, t, nd] = new_shape.dims();
    if (nb, nh, nd) != (b, h, d) {
        return Err(cache);
    }
    // New positions and cached ones where they are (a strided view's rows copied one by one).
    let mut new_copy = None;
    let Some(new_rows) = heads_or_copy::<E>(new, &mut new_copy) else {
        return Err(cache);
    };
    // The `len` positions of `rows` written from position `at` of each row (batch, head) of a
    // buffer with room for `capacity` positions per row.
    let write = |buffer: &mut [E], capacity: usize, at: usize, rows: crate::host::Heads<'_, E>| {
        let len = rows.dims()[2];
        for (row, (bi, hi)) in (0..b)
            .flat_map(|bi| (0..h).map(move |hi| (bi, hi)))
            .enumerate()
        {
            let start = (row * capacity + at) * d;
            for (p, out) in buffer[start..start + len * d]
                .chunks_exact_mut(d)
                .enumerate()
            {
                out.copy_from_slice(rows.row(bi, hi, p));
            }
        }
    };
    if let Some(capacity) = buffer_capacity::<E>(&cache, [b, h, s, d]).filter(|&c| c >= s + t) {
        if let Some(buffer) = cache.try_storage_mut::<E>() {
            write(buffer, capacity, s, new_rows);
            return Ok(view(cache, [b, h, capacity, d], s + t));
        }
    }
    let capacity = (2 * (s + t)).max(KV_MIN_CAPACITY);
    let mut cached_copy = None;
    let Some(cached_rows) = heads_or_copy::<E>(&cache, &mut cached_copy) else {
        return Err(cache);
    };
    let mut buffer = vec![E::zeroed(); b * h * capacity * d];
    write(&mut buffer, capacity, 0, cached_rows);
    write(&mut buffer, capacity, s, new_rows);
    let full = FlexTensor::from_data(TensorData::new(buffer, [b, h, capacity, d]));
    Ok(view(full, [b, h, capacity, d], s + t))
}

/// The positions `C` of the buffer `cache` (`[B, H, S, D]`) is the first `S` of, when it is a
/// view [`kv_append`] made: strides `[H·C·D, C·D, D, 1]` from offset 0, over `B·H·C·D` values.
fn buffer_capacity<E>(cache: &FlexTensor, [b, h, s, d]: [usize; 4]) -> Option<usize> {
    let layout = cache.layout();
    let strides = layout.strides();
    if d == 0 || layout.start_offset() != 0 || strides[3] != 1 || strides[2] != d as isize {
        return None;
    }
    let row = usize::try_from(strides[1]).ok()?;
    if !row.is_multiple_of(d) || usize::try_from(strides[0]).ok()? != h * row {
        return None;
    }
    let capacity = row / d;
    let values = cache.bytes().len() / core::mem::size_of::<E>();
    (capacity >= s && values >= b * h * capacity * d).then_some(capacity)
}

/// The first `len` positions of the buffer `full` (`[B, H, C, D]`, contiguous).
fn view(full: FlexTensor, [b, h, capacity, d]: [usize; 4], len: usize) -> FlexTensor {
    let layout = burn::backend::flex::Layout::contiguous([b, h, capacity, d].into());
    full.with_layout(layout).narrow(2, 0, len)
}

/// Mean kept pairs per routed expert up to which [`masked_moe`] runs the host GEMV on `f32`
/// weights (16-bit weights always take it); above, Flex's `matmul` through the reference.
pub const HOST_MAX_PAIRS_PER_EXPERT: usize = 256;

/// Rows of `x` up to which [`linear`] runs the host GEMV on `f32` weights (16-bit weights always
/// take it); above, Flex's `gemm`-backed `matmul` on the transposed view.
pub const LINEAR_MAX_ROWS: usize = 32;

/// Whether the weights are `bf16` or `f16` (always the host kernels: the reference would widen
/// every routed expert first).
fn sixteen_bit(weights: &FlexTensor) -> bool {
    matches!(weights.dtype(), DType::BF16 | DType::F16)
}

/// `Some(output)` when the host kernels take the call (see the module docs): `x` and `weights`
/// `f32` (weights `f32`, `bf16` or `f16`) or all four `f64`, in contiguous row-major storage
/// (`x` and the routing weights are made contiguous if they are views; the expert weights are
/// never copied). `None` sends the call to the reference.
///
/// # Shapes
/// As [`GroupedExpertsBackend::grouped_experts`].
pub fn masked_moe(
    x: &FlexTensor,
    expert_ids: &FlexTensor,
    weights: &FlexTensor,
    gate_up: &FlexTensor,
    down: &FlexTensor,
) -> Option<FlexTensor> {
    let dims = MoeDims::from_shapes(
        x.shape().dims(),
        expert_ids.shape().dims(),
        gate_up.shape().dims(),
    );
    // The dtype checks first: they decide without reading the id table.
    if gate_up.dtype() != down.dtype() || x.dtype() != weights.dtype() {
        return None;
    }
    let ids = int_values(expert_ids)?;
    let plan = DispatchPlan::from_ids(&ids, dims.top_k, dims.experts);
    if !sixteen_bit(gate_up) && plan.kept() > HOST_MAX_PAIRS_PER_EXPERT * plan.groups().count() {
        return None;
    }
    host_experts(
        x,
        &plan,
        weights,
        FlexExperts::Stacked { gate_up, down },
        gate_up.dtype(),
        dims,
    )
}

/// Where a call's expert weights are: stacked, or one tensor per expert and projection.
#[derive(Clone, Copy)]
enum FlexExperts<'a> {
    Stacked {
        gate_up: &'a FlexTensor,
        down: &'a FlexTensor,
    },
    Parts(&'a ExpertParts<Flex>),
}

/// The host kernels on `x` and the routing weights (made contiguous if they are views) with
/// the experts' weights, all of dtype `weight_dtype`, read in place: `None` for a dtype pair
/// they do not take (see [`masked_moe`]) or storage that is not contiguous.
fn host_experts(
    x: &FlexTensor,
    plan: &DispatchPlan,
    weights: &FlexTensor,
    experts: FlexExperts<'_>,
    weight_dtype: DType,
    dims: MoeDims,
) -> Option<FlexTensor> {
    let (x, weights) = (x.to_contiguous(), weights.to_contiguous());
    macro_rules! run {
        ($f:ty, $w:ty) => {
            output(planned::<$f, $w>(&x, plan, &weights, experts, dims)?, dims)
        };
    }
    Some(match (x.dtype(), weight_dtype) {
        (DType::F32, DType::F32) => run!(f32, f32),
        (DType::F32, DType::BF16) => run!(f32, bf16),
        (DType::F32, DType::F16) => run!(f32, f16),
        (DType::F64, DType::F64) => run!(f64, f64),
        _ => return None,
    })
}

fn planned<'a, F, W>(
    x: &FlexTensor,
    plan: &DispatchPlan,
    weights: &FlexTensor,
    experts: FlexExperts<'a>,
    dims: MoeDims,
) -> Option<Vec<F>>
where
    F: crate::host::HostFloat + burn::tensor::Element + bytemuck::Pod,
    W: crate::host::HostWeight<F> + burn::tensor::Element + bytemuck::Pod,
{
    let (x, weights) = (x.as_slice()?, weights.as_slice()?);
    Some(match experts {
        FlexExperts::Stacked { gate_up, down } => masked_moe_planned::<F, &[W]>(
            x,
            plan,
            weights,
            gate_up.as_slice()?,
            down.as_slice()?,
            dims,
        ),
        FlexExperts::Parts(ExpertParts { gate, up, down }) => {
            let slices = |parts: &'a [FlexTensor]| -> Option<Vec<&'a [W]>> {
                parts.iter().map(|p| p.as_slice::<W>()).collect()
            };
            let (gate, up, down) = (slices(gate)?, slices(up)?, slices(down)?);
            masked_moe_experts::<F, &[W]>(
                x,
                plan,
                weights,
                ExpertMatrices::Parts {
                    gate: &gate,
                    up: &up,
                    down: &down,
                },
                dims,
            )
        }
    })
}

/// [`masked_moe`] on one tensor per expert and projection ([`ExpertParts`], e.g. borrowed from
/// a mapped checkpoint): `Some(output)` from the host kernels, reading each kept expert's
/// tensors where they are, whenever `x` and the routing weights are `f32` (or all `f64`) and
/// every part is contiguous, of one dtype (`f32`, `bf16`, `f16`; `f64` with `f64` activations)
/// and of its expert's shape; `None` for the stacked reference. Unlike stacked `f32` weights,
/// `f32` parts always take the host kernels (their widened-tile GEMM for many pairs): the
/// reference would first stack every expert.
///
/// # Shapes
/// As [`GroupedExpertsBackend::grouped_experts_parts`].
pub fn masked_moe_parts(
    x: &FlexTensor,
    expert_ids: &FlexTensor,
    weights: &FlexTensor,
    experts: &ExpertParts<Flex>,
) -> Option<FlexTensor> {
    let ExpertParts { gate, up, down } = experts;
    let first = gate.first()?;
    let [intermediate, hidden] = first.shape().dims();
    let count = gate.len();
    if up.len() != count || down.len() != count {
        return None;
    }
    let dtype = first.dtype();
    let shaped = |parts: &[FlexTensor], shape: [usize; 2]| {
        parts
            .iter()
            .all(|p| p.dtype() == dtype && p.shape().dims::<2>() == shape)
    };
    if !shaped(gate, [intermediate, hidden])
        || !shaped(up, [intermediate, hidden])
        || !shaped(down, [hidden, intermediate])
    {
        return None;
    }
    let dims = MoeDims::from_shapes(
        x.shape().dims(),
        expert_ids.shape().dims(),
        [count, 2 * intermediate, hidden],
    );
    if x.dtype() != weights.dtype() {
        return None;
    }
    let ids = int_values(expert_ids)?;
    let plan = DispatchPlan::from_ids(&ids, dims.top_k, dims.experts);
    host_experts(x, &plan, weights, FlexExperts::Parts(experts), dtype, dims)
}

/// `Some(x · Wᵀ)` from the host GEMV (see the module docs), `None` for the reference.
///
/// # Shapes
/// - `x`: `[T, in]`, `weight`: `[out, in]`; output `[T, out]`
pub fn linear(x: &FlexTensor, weight: &FlexTensor) -> Option<FlexTensor> {
    let [rows, in_features] = x.shape().dims();
    let [out_features, weight_in] = weight.shape().dims();
    if weight_in != in_features {
        return None;
    }
    if !sixteen_bit(weight) && rows > LINEAR_MAX_ROWS {
        return None;
    }
    let x = x.to_contiguous();
    macro_rules! run {
        ($f:ty, $w:ty) => {{
            let out = host_linear::<$f, &[$w]>(
                x.as_slice()?,
                weight.as_slice()?,
                in_features,
                out_features,
            );
            FlexTensor::from_data(TensorData::new(out, [rows, out_features]))
        }};
    }
    Some(match (x.dtype(), weight.dtype()) {
        (DType::F32, DType::F32) => run!(f32, f32),
        (DType::F32, DType::BF16) => run!(f32, bf16),
        (DType::F32, DType::F16) => run!(f32, f16),
        (DType::F64, DType::F64) => run!(f64, f64),
        _ => return None,
    })
}

/// A quantized weight's packed values and block scales in place, when the values are `I8` and
/// the scales `f16` (as [`crate::quant::QuantTensor::new`] puts them on Flex), both contiguous,
/// with as many leading dimensions and whole blocks per row.
fn quant_matrix(q: &QuantPrimitive<Flex>) -> Option<QuantMatrix<'_>> {
    let (shape, scales_shape) = (q.values.shape(), q.scales.shape());
    let (dims, scale_dims) = (shape.as_slice(), scales_shape.as_slice());
    let (&packed_len, &blocks) = (dims.last()?, scale_dims.last()?);
    let row_len = packed_len * q.format.values_per_byte();
    if dims.len() != scale_dims.len()
        || dims[..dims.len() - 1] != scale_dims[..dims.len() - 1]
        || blocks == 0
        || row_len % blocks != 0
    {
        return None;
    }
    QuantMatrix::new(
        q.format,
        q.values.as_slice::<i8>()?,
        q.scales.as_slice::<f16>()?,
        row_len / blocks,
    )
}

/// [`masked_moe`] with quantized expert weights (q8 or q4): `Some(output)` from the host kernels
/// when `x` and the routing weights are `f32` and both weights are contiguous `I8` values with
/// `f16` scales in one format, rows of whole blocks (always, whatever the pairs per expert: int8
/// passes, or dequantized tiles and the GEMM where the rows cannot take int8 inputs); `None` for
/// the reference. Only kept experts' blocks (values and scales) are read.
///
/// # Shapes
/// As [`GroupedExpertsBackend::grouped_experts_quant`].
pub fn masked_moe_quant(
    x: &FlexTensor,
    expert_ids: &FlexTensor,
    weights: &FlexTensor,
    gate_up: &QuantPrimitive<Flex>,
    down: &QuantPrimitive<Flex>,
) -> Option<FlexTensor> {
    let mut gate_up_dims: [usize; 3] = gate_up.values.shape().dims();
    gate_up_dims[2] *= gate_up.format.values_per_byte();
    let dims = MoeDims::from_shapes(x.shape().dims(), expert_ids.shape().dims(), gate_up_dims);
    if x.dtype() != DType::F32 || weights.dtype() != DType::F32 {
        return None;
    }
    let (gate_up, down) = (quant_matrix(gate_up)?, quant_matrix(down)?);
    let ids = int_values(expert_ids)?;
    let plan = DispatchPlan::from_ids(&ids, dims.top_k, dims.experts);
    let (x, weights) = (x.to_contiguous(), weights.to_contiguous());
    let (x, weights) = (x.as_slice()?, weights.as_slice()?);
    let out = match (gate_up, down) {
        (QuantMatrix::Q8(gate_up), QuantMatrix::Q8(down)) => {
            masked_moe_planned::<f32, Q8Matrix<'_>>(x, &plan, weights, gate_up, down, dims)
        }
        (QuantMatrix::Q4(gate_up), QuantMatrix::Q4(down)) => {
            masked_moe_planned::<f32, Q4Matrix<'_>>(x, &plan, weights, gate_up, down, dims)
        }
        _ => return None,
    };
    Some(output(out, dims))
}

/// `Some(x · dequantize(W)ᵀ)` from the host GEMV on a quantized weight (q8 or q4: contiguous
/// `I8` values and `f16` scales) and `f32` `x`, whatever the rows; `None` for the reference.
///
/// # Shapes
/// - `x`: `[T, in]`, `weight`: `[out, in]` (packed `[out, in / v]`); output `[T, out]`
pub fn linear_quant(x: &FlexTensor, weight: &QuantPrimitive<Flex>) -> Option<FlexTensor> {
    let [rows, in_features] = x.shape().dims();
    let [out_features, packed_in] = weight.values.shape().dims();
    if packed_in * weight.format.values_per_byte() != in_features || x.dtype() != DType::F32 {
        return None;
    }
    let matrix = quant_matrix(weight)?;
    let x = x.to_contiguous();
    let x = x.as_slice()?;
    let out = match matrix {
        QuantMatrix::Q8(m) => host_linear::<f32, Q8Matrix<'_>>(x, m, in_features, out_features),
        QuantMatrix::Q4(m) => host_linear::<f32, Q4Matrix<'_>>(x, m, in_features, out_features),
    };
    Some(FlexTensor::from_data(TensorData::new(
        out,
        [rows, out_features],
    )))
}

/// The `[T, K]` id table as `i64` (small: read, not borrowed).
fn int_values(ids: &FlexTensor) -> Option<Vec<i64>> {
    let ids = ids.to_contiguous();
    Some(match ids.dtype() {
        DType::I32 => ids.as_slice::<i32>()?.iter().map(|&v| v as i64).collect(),
        DType::I64 => ids.as_slice::<i64>()?.to_vec(),
        _ => ids.into_data().convert::<i64>().into_vec().ok()?,
    })
}

fn output<F: burn::tensor::Element>(values: Vec<F>, dims: MoeDims) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, [dims.tokens, dims.hidden]))
}

#[cfg(test)]
mod tests {
    use super::{linear, masked_moe, masked_moe_parts, LINEAR_MAX_ROWS};
    use crate::plan::MoeDims;
    use crate::reference::{grouped_experts_reference, masked_moe_f64};
    use crate::{grouped_experts, grouped_experts_parts, linear_out_in, ExpertParts};
    use burn::backend::flex::{Flex, FlexTensor};
    use burn::tensor::{DType, Int, Tensor, TensorData};
    use half::{bf16, f16};

    use crate::testing::values;

    /// `values` stored in `dtype` and the `f32` values that storage holds (what an `f64`
    /// reference from the same stored values starts from).
    fn stored(values: &[f32], shape: Vec<usize>, dtype: DType) -> (FlexTensor, Vec<f32>) {
        let data = TensorData::new(values.to_vec(), shape).convert_dtype(dtype);
        let held = data.clone().convert::<f32>().into_vec::<f32>().unwrap();
        (FlexTensor::from_data(data), held)
    }

    fn to_f64(tensor: FlexTensor) -> Vec<f64> {
        tensor.into_data().convert::<f64>().into_vec().unwrap()
    }

    const DIMS: MoeDims = MoeDims {
        tokens: 5,
        top_k: 2,
        experts: 4,
        hidden: 40,
        intermediate: 19,
    };
    /// Slot (1, 0) masked (sentinel 4); expert 3 never routed.
    const IDS: [i64; 10] = [2, 0, 4, 1, 0, 2, 1, 2, 0, 1];

    /// [`DIMS`] with [`IDS`] (decode-like: dot passes), and 128 tokens with 64 to 96 per routed
    /// expert (prefill-like: at least `GEMM_MIN_TOKENS`, widened tiles and small GEMMs).
    fn decode_and_prefill() -> [(MoeDims, Vec<i64>); 2] {
        let many = MoeDims {
            tokens: 4 * crate::host::GEMM_MIN_TOKENS,
            ..DIMS
        };
        let many_ids = (0..2 * many.tokens)
            .map(|s| [0, 2, 1, 4, 2, 0, 1, 2][s % 8])
            .collect();
        [(DIMS, IDS.to_vec()), (many, many_ids)]
    }

    #[test]
    fn flex_host_experts_on_16_bit_weights_match_an_f64_reference_from_the_stored_values() {
        for (dims, ids) in decode_and_prefill() {
            check_host_experts(dims, &ids);
        }
    }

    fn check_host_experts(dims: MoeDims, ids: &[i64]) {
        let MoeDims {
            tokens: t,
            top_k: k,
            experts: e,
            hidden: h,
            intermediate: i,
        } = dims;
        let (x, w) = (values(t * h, 0.1), values(t * k, 0.7));
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (gate_up, gate_up_held) =
                stored(&values(e * 2 * i * h, 1.3), vec![e, 2 * i, h], dtype);
            let (down, down_held) = stored(&values(e * h * i, 2.9), vec![e, h, i], dtype);
            if dtype != DType::F32 {
                // The stored values really are rounded: the test compares against those.
                assert_ne!(gate_up_held, values(e * 2 * i * h, 1.3));
            }
            let want = masked_moe_f64(&x, ids, &w, &gate_up_held, &down_held, dims);
            assert!(want.iter().any(|v| v.abs() > 1e-2), "not a test on zeros");
            let ids = FlexTensor::from_data(
                TensorData::new(ids.to_vec(), [t, k]).convert_dtype(DType::I32),
            );
            let got = masked_moe(
                &FlexTensor::from_data(TensorData::new(x.clone(), [t, h])),
                &ids,
                &FlexTensor::from_data(TensorData::new(w.clone(), [t, k])),
                &gate_up,
                &down,
            )
            .expect("f32 activations take the host path");
            assert_eq!(got.dtype(), DType::F32);
            // bf16 weights with several tokens take the split-bf16 kernel where the CPU has
            // AVX-512 BF16: activations at 16 significant bits (2⁻¹⁷ relative per product, see
            // `host::SplitBf16`), so a tenfold wider bound there than f32 arithmetic's.
            let bound = if dtype == DType::BF16 { 1e-4 } else { 1e-5 };
            for (g, w) in to_f64(got).iter().zip(&want) {
                assert!(
                    (g - w).abs() <= bound + bound * w.abs(),
                    "{dims:?} {dtype:?}: {g} vs {w}"
                );
            }
        }
    }

    /// Per-expert tensors (as a mapped checkpoint holds them) give the stacked weights' output
    /// bit for bit, in decode and prefill shapes and every weight dtype; and
    /// `ExpertParts::stacked` (the default implementation's first step) rebuilds the stacked
    /// weights exactly.
    #[test]
    fn flex_expert_parts_give_the_stacked_output_bit_for_bit() {
        let device = Default::default();
        for (dims, ids) in decode_and_prefill() {
            let MoeDims {
                tokens: t,
                top_k: k,
                experts: e,
                hidden: h,
                intermediate: i,
            } = dims;
            let x =
                Tensor::<Flex, 2>::from_data(TensorData::new(values(t * h, 0.2), [t, h]), &device);
            let w =
                Tensor::<Flex, 2>::from_data(TensorData::new(values(t * k, 0.8), [t, k]), &device);
            let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [t, k]), &device);
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let gate_up = Tensor::<Flex, 3>::from_data(
                    TensorData::new(values(e * 2 * i * h, 1.1), [e, 2 * i, h]),
                    (&device, dtype),
                );
                let down = Tensor::<Flex, 3>::from_data(
                    TensorData::new(values(e * h * i, 2.3), [e, h, i]),
                    (&device, dtype),
                );
                // Each part its own contiguous tensor, as a checkpoint's tensors are.
                let part = |w: &Tensor<Flex, 3>, expert: usize, rows: core::ops::Range<usize>| {
                    let [_, _, cols] = w.dims();
                    let piece = w
                        .clone()
                        .slice([expert..expert + 1, rows.clone(), 0..cols])
                        .reshape([rows.len(), cols]);
                    Tensor::<Flex, 2>::from_data(piece.into_data(), (&device, dtype))
                };
                let parts = [
                    (0..e).map(|x| part(&gate_up, x, 0..i)).collect::<Vec<_>>(),
                    (0..e).map(|x| part(&gate_up, x, i..2 * i)).collect(),
                    (0..e).map(|x| part(&down, x, 0..h)).collect(),
                ];
                let stacked = grouped_experts(
                    x.clone(),
                    ids.clone(),
                    w.clone(),
                    gate_up.clone(),
                    down.clone(),
                );
                let from_parts =
                    grouped_experts_parts(x.clone(), ids.clone(), w.clone(), parts.clone());
                let bits = |t: Tensor<Flex, 2>| -> Vec<u32> {
                    t.into_data()
                        .into_vec::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                let want = bits(stacked);
                assert!(
                    want.iter().any(|&b| f32::from_bits(b).abs() > 1e-2),
                    "not on zeros"
                );
                assert_eq!(bits(from_parts), want, "{dims:?} {dtype:?}");

                let [gate, up, down_parts] = parts;
                let primitives = |ts: Vec<Tensor<Flex, 2>>| {
                    ts.into_iter()
                        .map(|t| t.into_primitive().tensor())
                        .collect()
                };
                let experts = ExpertParts::<Flex> {
                    gate: primitives(gate),
                    up: primitives(up),
                    down: primitives(down_parts),
                };
                // The host kernels took the parts (not the stacking fallback).
                assert!(masked_moe_parts(
                    &x.clone().into_primitive().tensor(),
                    &ids.clone().into_primitive(),
                    &w.clone().into_primitive().tensor(),
                    &experts,
                )
                .is_some());
                let (gu, d) = experts.stacked();
                let raw = |t: FlexTensor| t.into_data().bytes.to_vec();
                assert_eq!(raw(gu), raw(gate_up.into_primitive().tensor()));
                assert_eq!(raw(d), raw(down.into_primitive().tensor()));
            }
        }
    }

    #[test]
    fn flex_reference_widens_16_bit_weights_and_agrees_with_the_host_path() {
        let device = Default::default();
        let MoeDims {
            tokens: t,
            top_k: k,
            experts: e,
            hidden: h,
            intermediate: i,
        } = DIMS;
        let x = Tensor::<Flex, 2>::from_data(TensorData::new(values(t * h, 0.4), [t, h]), &device);
        let w = Tensor::<Flex, 2>::from_data(TensorData::new(values(t * k, 0.9), [t, k]), &device);
        let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(IDS.to_vec(), [t, k]), &device);
        let gate_up = Tensor::<Flex, 3>::from_data(
            TensorData::new(values(e * 2 * i * h, 1.7), [e, 2 * i, h]),
            (&device, DType::BF16),
        );
        let down = Tensor::<Flex, 3>::from_data(
            TensorData::new(values(e * h * i, 0.3), [e, h, i]),
            (&device, DType::BF16),
        );
        assert_eq!(gate_up.dtype(), DType::BF16, "Flex keeps bf16 storage");
        let host = grouped_experts(
            x.clone(),
            ids.clone(),
            w.clone(),
            gate_up.clone(),
            down.clone(),
        );
        let reference = grouped_experts_reference(x, ids, w, gate_up, down);
        assert_eq!(reference.dtype(), DType::F32);
        let (host, reference): (Vec<f32>, Vec<f32>) = (
            host.into_data().to_vec().unwrap(),
            reference.into_data().to_vec().unwrap(),
        );
        for (a, b) in host.iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn flex_linear_out_in_matches_an_f64_product_in_every_weight_dtype_and_row_count() {
        let device = Default::default();
        let (in_f, out_f) = (50, 70);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for rows in [3, LINEAR_MAX_ROWS + 8] {
                let xs = values(rows * in_f, 0.2);
                let (weight, held) = stored(&values(out_f * in_f, 1.1), vec![out_f, in_f], dtype);
                let host = linear(
                    &FlexTensor::from_data(TensorData::new(xs.clone(), [rows, in_f])),
                    &weight,
                );
                // 16-bit weights always take the host GEMV; f32 up to LINEAR_MAX_ROWS.
                assert_eq!(
                    host.is_some(),
                    dtype != DType::F32 || rows <= LINEAR_MAX_ROWS
                );
                let x = Tensor::<Flex, 2>::from_data(
                    TensorData::new(xs.clone(), [rows, in_f]),
                    &device,
                );
                let w =
                    Tensor::<Flex, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(weight));
                let got: Vec<f32> = linear_out_in(x, w).into_data().to_vec().unwrap();
                for r in 0..rows {
                    for o in 0..out_f {
                        let want: f64 = (0..in_f)
                            .map(|c| xs[r * in_f + c] as f64 * held[o * in_f + c] as f64)
                            .sum();
                        let g = got[r * out_f + o] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{dtype:?} {rows} rows ({r}, {o}): {g} vs {want}"
                        );
                    }
                }
            }
        }
        // bf16 and f16 widen exactly: the values they hold, not the f32 ones.
        assert_eq!(bf16::from_f32(0.1).to_f32(), 0.100_097_656);
        assert_eq!(f16::from_f32(0.1).to_f32(), 0.099_975_586);
    }

    #[test]
    fn kv_append_writes_in_place_and_equals_the_concatenation() {
        use super::{kv_append, KV_MIN_CAPACITY};
        use crate::reference::kv_append_reference;
        // [B, H, S, D] with several heads and batches, and MLA's single-head latent (B = H = 1);
        // an f32 cache and the 16-bit ones.
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for [b, h, d] in [[2, 3, 5], [1, 1, 7]] {
                let tensor = |t: usize, seed: f32| {
                    Tensor::<Flex, 4>::from_data(
                        TensorData::new(values(b * h * t * d, seed), [b, h, t, d]),
                        &Default::default(),
                    )
                    .cast(dtype)
                };
                // Positions as attention makes them: the heads of `[B, T, H, D]` rows swapped in
                // front (a strided view, read in place).
                let tokens_first = |t: usize, seed: f32| {
                    Tensor::<Flex, 4>::from_data(
                        TensorData::new(values(b * h * t * d, seed), [b, t, h, d]),
                        &Default::default(),
                    )
                    .cast(dtype)
                    .swap_dims(1, 2)
                };
                // A prompt of 3 positions, then single positions past the first buffer's
                // capacity.
                let mut cache = tokens_first(3, 0.5);
                if b * h > 1 {
                    assert!(!cache.clone().into_primitive().tensor().is_contiguous());
                }
                let mut reference = cache.clone();
                let mut buffers = Vec::new();
                for step in 0..KV_MIN_CAPACITY + 10 {
                    let new = tensor(1, step as f32);
                    reference = kv_append_reference(reference, new.clone());
                    let next = kv_append(
                        cache.into_primitive().tensor(),
                        &new.into_primitive().tensor(),
                    )
                    .expect("one dtype");
                    assert_eq!(next.dtype(), dtype);
                    let buffer = std::sync::Arc::as_ptr(&next.data_arc()) as usize;
                    if buffers.last() != Some(&buffer) {
                        buffers.push(buffer);
                    }
                    cache = Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(next));
                    assert_eq!(cache.dims(), [b, h, 4 + step, d]);
                    assert_eq!(
                        to_f64(cache.clone().into_primitive().tensor()),
                        to_f64(reference.clone().into_primitive().tensor()),
                        "{dtype:?} [{b}, {h}, {}, {d}]",
                        4 + step
                    );
                }
                // One buffer of KV_MIN_CAPACITY positions (made at the first append), then one
                // of twice the positions when it was full: every other step wrote in place.
                assert_eq!(
                    buffers.len(),
                    2,
                    "{dtype:?} [{b}, {h}, _, {d}]: buffers {buffers:?}"
                );
                // A shared cache (another tensor holds its buffer) is copied, not written over.
                let shared = cache.clone();
                let before = to_f64(shared.clone().into_primitive().tensor());
                let more = tokens_first(2, 9.0);
                let grown = kv_append(
                    cache.clone().into_primitive().tensor(),
                    &more.clone().into_primitive().tensor(),
                )
                .expect("one dtype");
                assert_eq!(
                    burn::tensor::TensorMetadata::shape(&grown).dims::<4>()[2],
                    before.len() / (b * h * d) + 2
                );
                assert_eq!(
                    to_f64(grown),
                    to_f64(kv_append_reference(cache, more).into_primitive().tensor())
                );
                assert_eq!(to_f64(shared.into_primitive().tensor()), before);
            }
        }
        // Appending no positions, to a buffer this function made (written in place) or to
        // another tensor (copied), gives the cache's values back.
        let tensor = |t: usize, seed: f32| {
            Tensor::<Flex, 4>::from_data(
                TensorData::new(values(2 * 3 * t * 5, seed), [2, 3, t, 5]),
                &Default::default(),
            )
            .into_primitive()
            .tensor()
        };
        let want = to_f64(tensor(4, 0.3));
        let made = kv_append(tensor(4, 0.3), &tensor(0, 0.0)).expect("f32 tensors");
        assert_eq!(to_f64(made.clone()), want);
        assert_eq!(to_f64(kv_append(made, &tensor(0, 0.0)).unwrap()), want);
        // Two dtypes, or one the host does not hold (f64), take the reference.
        let (half, _) = stored(&values(8, 1.0), vec![1, 2, 2, 2], DType::F16);
        let (single, _) = stored(&values(8, 1.0), vec![1, 2, 2, 2], DType::F32);
        let (double, _) = stored(&values(8, 1.0), vec![1, 2, 2, 2], DType::F64);
        assert_eq!(half.dtype(), DType::F16);
        assert!(kv_append(half, &single).is_err());
        assert!(kv_append(double.clone(), &double).is_err());
    }

    /// `softmax(q · kᵀ · scale + mask) · v` in `f64` from the same `f32` values, query head `h`
    /// reading key/value head `h / (H / H_kv)`; `mask` `[T, S]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_f64(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        [b, h, t, d]: [usize; 4],
        (kv_heads, s, dv): (usize, usize, usize),
        scale: f64,
    ) -> Vec<f64> {
        let mut out = vec![0.0; b * h * t * dv];
        for bi in 0..b {
            for hi in 0..h {
                let kv = hi / (h / kv_heads);
                for ti in 0..t {
                    let query = &q[((bi * h + hi) * t + ti) * d..][..d];
                    let scores: Vec<f64> = (0..s)
                        .map(|j| {
                            let key = &k[((bi * kv_heads + kv) * s + j) * d..][..d];
                            let dot: f64 = query
                                .iter()
                                .zip(key)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum();
                            dot * scale + mask[ti * s + j] as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    let row = &mut out[((bi * h + hi) * t + ti) * dv..][..dv];
                    for (j, w) in weights.iter().enumerate() {
                        let value = &v[((bi * kv_heads + kv) * s + j) * dv..][..dv];
                        for (o, &x) in row.iter_mut().zip(value) {
                            *o += w / total * x as f64;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn kv_attention_matches_an_f64_reference_on_the_cache_in_place_and_through_the_reference() {
        use super::kv_append;
        use crate::{kv_attention, reference::attention_reference};
        let device = Default::default();
        // Grouped-query (4 heads on 2), a value width other than the key's (as MLA's), two batch
        // rows; decode (1 query), a few queries, and a prefill's 40 (causal, and with a window:
        // each query reads only the positions its mask lets through). Widths of
        // whole 16-lane registers take the AVX-512 rows where the CPU has them (values of 144:
        // a block of 8 registers, then one), others the portable rows.
        let cases = [
            (1, None, 16, 8),
            (1, None, 32, 144),
            (3, Some(20), 48, 16),
            (3, Some(20), 16, 8),
            (40, None, 16, 8),
            (40, Some(20), 32, 32),
        ];
        // Keys and values cached in f32, f16 or bf16 (read in their own precision); the f64
        // reference is computed from the same rounded values.
        // Two query heads per key/value head, and one each (tiles of 1 to 4 query rows: the host
        // kernel scores up to 4 rows against each key it loads).
        let dtypes = [DType::F32, DType::F16, DType::BF16];
        for (((queries, window, d, dv), dtype), kv_heads) in cases
            .into_iter()
            .flat_map(|case| dtypes.map(|dtype| (case, dtype)))
            .flat_map(|case| [2, 4].map(|kv_heads| (case, kv_heads)))
        {
            let [b, h, past] = [2, 4, 37];
            let s = past + queries;
            // Cached values as held: rounded to the cache's dtype.
            let tensor = |dims: [usize; 4], seed: f32| {
                let len = dims.iter().product();
                let t =
                    Tensor::<Flex, 4>::from_data(TensorData::new(values(len, seed), dims), &device)
                        .cast(dtype);
                let held = t.to_data().convert::<f32>().into_vec::<f32>().unwrap();
                (t, held)
            };
            // The cache as decoding holds it: a view of a buffer with room for more positions.
            let cached = |dim: usize, seed: f32| {
                let (old, old_values) = tensor([b, kv_heads, past, dim], seed);
                let (new, new_values) = tensor([b, kv_heads, queries, dim], seed + 0.5);
                let view = kv_append(
                    old.into_primitive().tensor(),
                    &new.into_primitive().tensor(),
                )
                .expect("one dtype");
                let mut all = Vec::new();
                for row in 0..b * kv_heads {
                    all.extend_from_slice(&old_values[row * past * dim..][..past * dim]);
                    all.extend_from_slice(&new_values[row * queries * dim..][..queries * dim]);
                }
                (
                    Tensor::<Flex, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(view)),
                    all,
                )
            };
            let (k, k_values) = cached(d, 1.0);
            let (v, v_values) = cached(dv, 2.0);
            assert!(
                !k.clone().into_primitive().tensor().is_contiguous(),
                "a view of a buffer"
            );
            // Queries large enough that the softmax is far from uniform.
            let q_values: Vec<f32> = values(b * h * queries * d, 3.0)
                .iter()
                .map(|x| 6.0 * x)
                .collect();
            let q = Tensor::<Flex, 4>::from_data(
                TensorData::new(q_values.clone(), [b, h, queries, d]),
                &device,
            );
            // Causal, and with a sliding window where given (some -inf before the first visible).
            let mask_values: Vec<f32> = (0..queries)
                .flat_map(|t| {
                    (0..s).map(move |j| {
                        let query = past + t;
                        let visible = j <= query && window.is_none_or(|w| j + w > query);
                        if visible {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::<Flex, 4>::from_data(
                TensorData::new(mask_values.clone(), [1, 1, queries, s]),
                &device,
            );
            let scale = 1.0 / (d as f64).sqrt();
            let want = attention_f64(
                &q_values,
                &k_values,
                &v_values,
                &mask_values,
                [b, h, queries, d],
                (kv_heads, s, dv),
                scale,
            );
            let largest = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
            assert!(largest > 0.02, "not a test on zeros: largest {largest}");
            // The host kernel takes decode-sized calls (on the cache in place); more queries
            // go to the reference.
            let host = super::attention(
                &q.clone().into_primitive().tensor(),
                &k.clone().into_primitive().tensor(),
                &v.clone().into_primitive().tensor(),
                &mask.clone().into_primitive().tensor(),
                scale,
            );
            assert!(host.is_some(), "the host kernel takes {queries} queries");
            let got = to_f64(
                kv_attention(q.clone(), k.clone(), v.clone(), mask.clone(), scale)
                    .into_primitive()
                    .tensor(),
            );
            // The queries as the model hands them over: the heads of a `[B, T, H, D]` buffer
            // swapped in front (a view, read in place): the same outputs, bit for bit.
            let swapped =
                Tensor::<Flex, 4>::from_data(q.clone().swap_dims(1, 2).into_data(), &device)
                    .swap_dims(1, 2);
            assert!(!swapped.clone().into_primitive().tensor().is_contiguous());
            let from_view = kv_attention(swapped, k.clone(), v.clone(), mask.clone(), scale);
            assert_eq!(from_view.dims(), [b, h, queries, dv]);
            assert_eq!(to_f64(from_view.into_primitive().tensor()), got);
            let reference = to_f64(
                attention_reference(q, k, v, mask, scale)
                    .into_primitive()
                    .tensor(),
            );
            for (label, got) in [("kv_attention", &got), ("reference", &reference)] {
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0.0f64, f64::max);
                // Within 1e-4 of the largest output (f32 sums in another order).
                assert!(
                    worst < 1e-4 * largest,
                    "{label}, {dtype:?}, {kv_heads} kv heads, {queries} queries: off by {worst:e} \
                     (largest {largest})"
                );
            }
        }
    }

    #[test]
    fn kv_rope_equals_the_reference_and_an_f64_rotation() {
        use crate::host::ROPE_PARALLEL_ELEMENTS;
        use crate::kv_rope;
        use crate::reference::rope_reference;
        let device = Default::default();
        // Even and odd head widths (an odd one rotates D − D/2 against D/2 elements), a decode
        // step, and a prefill large enough for the parallel path; x contiguous and as a view
        // (the heads-first layout swapped back: read through a copy).
        let cases = [[2, 5, 3, 8], [1, 1, 4, 7], [1, 64, 16, 64], [2, 3, 2, 128]];
        assert!(cases
            .iter()
            .any(|c| c.iter().product::<usize>() >= ROPE_PARALLEL_ELEMENTS));
        for (case, [b, t, h, d]) in cases.into_iter().enumerate() {
            let xs = values(b * t * h * d, 0.3 + case as f32);
            let (cos_v, sin_v) = (values(t * d, 1.1), values(t * d, 2.7));
            let table = |v: &Vec<f32>| {
                Tensor::<Flex, 2>::from_data(TensorData::new(v.clone(), [t, d]), &device)
            };
            let contiguous =
                Tensor::<Flex, 4>::from_data(TensorData::new(xs.clone(), [b, t, h, d]), &device);
            let heads_first = contiguous.clone().swap_dims(1, 2).into_data();
            let view = Tensor::<Flex, 4>::from_data(heads_first, &device).swap_dims(1, 2);
            let want = rope_reference(contiguous.clone(), table(&cos_v), table(&sin_v));
            for x in [contiguous, view] {
                let got = kv_rope(x, table(&cos_v), table(&sin_v));
                // The same operations in the same order: bit for bit.
                assert_eq!(got.to_data(), want.to_data(), "[{b}, {t}, {h}, {d}]");
            }
            // And the rotation itself, in f64 from the same values.
            let got: Vec<f32> = want.into_data().to_vec().unwrap();
            let first = d - d / 2;
            for (row, (o, x)) in got.chunks(d).zip(xs.chunks(d)).enumerate() {
                let p = (row / h) % t;
                for i in 0..d {
                    let rotated = if i < first {
                        -(x[d / 2 + i] as f64)
                    } else {
                        x[i - first] as f64
                    };
                    let want =
                        x[i] as f64 * cos_v[p * d + i] as f64 + rotated * sin_v[p * d + i] as f64;
                    assert!((o[i] as f64 - want).abs() <= 1e-6, "row {row} element {i}");
                }
            }
        }
        // Another dtype (all three bf16) goes to the reference.
        let x =
            Tensor::<Flex, 4>::from_data(TensorData::new(values(24, 0.1), [1, 2, 3, 4]), &device);
        let (cos, sin) = (
            Tensor::<Flex, 2>::from_data(TensorData::new(values(8, 0.2), [2, 4]), &device),
            Tensor::<Flex, 2>::from_data(TensorData::new(values(8, 0.4), [2, 4]), &device),
        );
        let half = kv_rope(
            x.clone().cast(DType::BF16),
            cos.clone().cast(DType::BF16),
            sin.clone().cast(DType::BF16),
        );
        assert_eq!(half.dtype(), DType::BF16);
        let (half, full): (Vec<f32>, Vec<f32>) = (
            half.cast(DType::F32).into_data().to_vec().unwrap(),
            kv_rope(x, cos, sin).into_data().to_vec().unwrap(),
        );
        for (a, b) in half.iter().zip(&full) {
            assert!((a - b).abs() <= 2e-2, "{a} vs {b}");
        }
    }
}
