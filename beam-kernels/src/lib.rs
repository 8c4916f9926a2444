//! # beam-kernels
//!
//! BEAM's backend extension for [burn](https://burn.dev): the two hot operations of a BEAM
//! Mixture-of-Experts model as backend traits, in the shape of burn's `custom-cubecl-kernel`
//! example, with a reference from plain tensor ops beside every fast path.
//!
//! | op | trait | what it computes |
//! |---|---|---|
//! | grouped experts (quantized q8/q4 weights: `grouped_experts_quant`; per-expert tensors: `grouped_experts_parts`) | [`GroupedExpertsBackend`] | `out[t] = Σ_k w[t, k] · Expert_{ids[t, k]}(x[t])`, masked slots (sentinel id `E`) skipped: no FLOPs, no weight reads |
//! | `[out, in]` linear | [`LinearBackend`] | `x · Wᵀ` for PyTorch-layout weights: router, attention projections, shared expert, LM head |
//! | key/value cache append, attention, rotary embedding | [`KvCacheBackend`] | `cat([cache, new], 2)`, in place where the backend can (Flex); `softmax(q · kᵀ · scale + mask) · v` over the cache (grouped-query), on an `f32`, `f16` or `bf16` cache (`reads_16_bit_kv_in_place`: Flex reads 16 bits in place, the reference widens); `x · cos + rotate_half(x) · sin` (`kv_rope`: Flex in one pass) |
//!
//! [`MoeBackend`] is all three together (implemented for every backend that has them); the
//! tensor-level wrappers [`grouped_experts`], [`linear_out_in`], [`kv_append`], [`kv_attention`] and [`kv_rope`]
//! call them.
//!
//! | file | job |
//! |---|---|
//! | `lib.rs` | the traits, the tensor-level wrappers, the kernels' options |
//! | [`reference`] | the burn-tensor-ops reference every backend can run (the traits' defaults; exact gradients under autodiff), a dense check and a host `f64` reference |
//! | [`quant`] | quantized weights (block-wise int8 q8 and 4-bit q4): quantizers, block choice, [`quant::QuantTensor`] (packed values + `f16` scales as plain burn tensors) and the borrowed [`quant::Q8Matrix`] / [`quant::Q4Matrix`] the host kernels read |
//! | [`plan`] | [`DispatchPlan`] (kept pairs grouped by expert: what every path computes first) and [`MoeDims`] |
//! | `ndarray.rs` (feature `ndarray`) | burn's `NdArray`: the host kernels on borrowed storage when few pairs per expert are kept, the reference otherwise |
//! | [`flex`] (feature `flex`) | burn's `Flex`: the host kernels on `f32`, `bf16` or `f16` weights in place (activations `f32`), the reference otherwise |
//! | `cubecl.rs` (feature `cubecl`) | burn's `CubeBackend` (`Cuda`, `Wgpu`): launches of the cubecl kernels ([`masked_moe`], [`compact_routes`]) |
//! | `fusion.rs` (feature `fusion`) | burn's `Fusion<B>`: the grouped experts as one custom fusion operation running `B`'s implementation |
//! | `autodiff.rs` (feature `autodiff`) | burn's `Autodiff<B>`: the reference, differentiated by autodiff |
//! | `kernel.rs` (feature `cubecl`) | the `#[cube]` kernels |
//! | [`host`] | the CPU kernels (GEMVs on slices, AVX2+FMA when the CPU has them, row blocks on [`pool`]'s threads) |
//! | [`pool`] | the host kernels' threads: work items on the caller and helpers that spin between products |
//! | [`aligned`] | rows on cache-line boundaries: the activations the host kernels read |
//!
//! ## The kernels' pipeline
//!
//! Both the cubecl kernels and the host kernels run the same four steps:
//!
//! 1. **routing compaction** ([`compact_routes`] on the device, [`DispatchPlan`] on the host):
//!    per-expert counts, prefix sum and the kept (token, slot) list sorted by expert, with masked
//!    slots dropped; on the device no read-back to the host;
//! 2. **gate+up GEMM** over each expert's pairs with `silu(g) ⊙ u` in the epilogue;
//! 3. **down GEMM** with the routing weight in the epilogue, one output row per kept slot;
//! 4. **combine**: each token sums its K slot rows in a fixed order (deterministic, no atomics).
//!
//! On the device, steps 2–3 have two regimes chosen from the shape ([`Regime::from_shape`]):
//! **decode** (few tokens per expert: GEMV, vectorised loads, weight-bandwidth bound) and
//! **prefill** (many tokens per expert: shared-memory tiled GEMM).
//!
//! A custom backend opts in to the references with three empty impls,
//! `impl GroupedExpertsBackend for MyBackend {}`, `impl LinearBackend for MyBackend {}` and
//! `impl KvCacheBackend for MyBackend {}`, and is then a [`MoeBackend`].

pub mod activation;
pub mod aligned;
pub mod host;
pub mod plan;
pub mod pool;
pub mod quant;
pub mod reference;

#[cfg(feature = "autodiff")]
mod autodiff;
#[cfg(feature = "cubecl")]
mod cubecl;
#[cfg(feature = "flex")]
pub mod flex;
#[cfg(feature = "fusion")]
mod fusion;
#[cfg(feature = "cubecl")]
pub mod kernel;
#[cfg(feature = "ndarray")]
pub mod ndarray;

#[cfg(feature = "cubecl")]
pub use cubecl::{compact_routes, masked_moe, CompactRoutes};
pub use plan::{DispatchPlan, MoeDims};

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorPrimitive};

/// Backend extension for the routed experts on grouped (token, expert) pairs.
///
/// | backend | implementation |
/// |---|---|
/// | `NdArray` (feature `ndarray`) | few kept pairs per expert (decode, or a heavily masked prefill): the host GEMVs ([`host`], AVX2+FMA where the CPU has them) on the weight storage in place; many: the reference |
/// | `Flex` (feature `flex`) | the host GEMVs on `f32`, `bf16` or `f16` weights in place with `f32` activations (always for 16-bit weights; for `f32` while few pairs per expert are kept), else the reference; q8 and q4 (`grouped_experts_quant`) always on the host, packed blocks in place |
/// | burn's `CubeBackend` — `Cuda`, `Wgpu` (feature `cubecl`) | the cubecl kernels ([`masked_moe`]): routing compaction on the device, grouped SwiGLU GEMMs, deterministic combine |
/// | `Fusion<B>` — `Cuda`/`Wgpu` with burn's `fusion` feature (feature `fusion`) | `B`'s implementation, registered as a custom fusion operation |
/// | `Autodiff<B>` (feature `autodiff`) | the reference, built from burn tensor ops on `Autodiff<B>`: exact gradients for training |
///
/// A custom backend opts in to the reference with an empty `impl GroupedExpertsBackend for MyBackend {}`.
pub trait GroupedExpertsBackend: Backend {
    /// `out[t] = Σ_k weights[t, k] · Expert_{ids[t, k]}(x[t])`, skipping every slot whose id is
    /// the sentinel (`>= E`): a skipped slot reads no weights and costs no FLOPs.
    ///
    /// `Expert_e(x) = down[e] · (silu(gate[e] · x) ⊙ up[e] · x)` with `gate_up[e] = [gate; up]`.
    /// The default is [`reference::grouped_experts_reference`].
    ///
    /// # Shapes
    /// - `x`: `[T, H]`, `expert_ids`: `[T, K]` (int), `weights`: `[T, K]`
    /// - `gate_up`: `[E, 2I, H]` (gate rows first), `down`: `[E, H, I]`
    /// - output: `[T, H]`
    fn grouped_experts(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: FloatTensor<Self>,
        down: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::grouped_experts_primitive::<Self>(x, expert_ids, weights, gate_up, down)
    }

    /// [`Self::grouped_experts`] with the routed experts' weights quantized (q8 or q4,
    /// [`quant`]): the same result as `grouped_experts` on the dequantized weights, up to
    /// summation order. Skipped slots read none of their expert's packed values or scales.
    ///
    /// The default is [`reference::grouped_experts_quant_reference`] (each routed expert
    /// dequantized with tensor ops).
    ///
    /// # Shapes
    /// - as [`Self::grouped_experts`], with `v` weights per byte of the values (1 for q8, 2 for
    ///   q4); `gate_up.values` `[E, 2I, H / v]`, `gate_up.scales` `[E, 2I, H / block]`,
    ///   `down.values` `[E, H, I / v]`, `down.scales` `[E, H, I / block']`
    fn grouped_experts_quant(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        gate_up: QuantPrimitive<Self>,
        down: QuantPrimitive<Self>,
    ) -> FloatTensor<Self> {
        reference::grouped_experts_quant_primitive::<Self>(x, expert_ids, weights, gate_up, down)
    }

    /// [`Self::grouped_experts`] with each expert's projections as separate tensors
    /// ([`ExpertParts`]: how Hugging Face checkpoints store them, so a backend that reads host
    /// memory in place can run on the checkpoint's mapped bytes without stacking them). The same
    /// result as `grouped_experts` on the stacked weights.
    ///
    /// The default stacks the parts with tensor ops (a copy of every expert per call) and runs
    /// [`Self::grouped_experts`]: correct everywhere, fast nowhere; model loaders hand parts only
    /// to backends whose [`Self::expert_parts_in_place`] is `true`.
    ///
    /// # Shapes
    /// - `x`, `expert_ids`, `weights`: as [`Self::grouped_experts`]
    /// - `experts.gate[e]`, `experts.up[e]`: `[I, H]`; `experts.down[e]`: `[H, I]`
    fn grouped_experts_parts(
        x: FloatTensor<Self>,
        expert_ids: IntTensor<Self>,
        weights: FloatTensor<Self>,
        experts: ExpertParts<Self>,
    ) -> FloatTensor<Self> {
        let (gate_up, down) = experts.stacked();
        Self::grouped_experts(x, expert_ids, weights, gate_up, down)
    }

    /// Whether [`Self::grouped_experts_parts`] reads the parts in place (burn's `Flex`: the
    /// host kernels take one matrix per expert and projection). `false` by default.
    fn expert_parts_in_place() -> bool {
        false
    }
}

/// The routed experts' weights one tensor per expert and projection, as checkpoints store them.
///
/// # Shapes
/// - `gate[e]`, `up[e]`: `[I, H]`; `down[e]`: `[H, I]` (E of each)
#[derive(Debug, Clone)]
pub struct ExpertParts<B: Backend> {
    /// Gate projections.
    pub gate: Vec<FloatTensor<B>>,
    /// Up projections.
    pub up: Vec<FloatTensor<B>>,
    /// Down projections.
    pub down: Vec<FloatTensor<B>>,
}

impl<B: Backend> ExpertParts<B> {
    /// The stacked `gate_up` `[E, 2I, H]` (gate rows first) and `down` `[E, H, I]` the grouped
    /// experts op takes: a copy of every part.
    ///
    /// # Panics
    /// If there are no experts, or the lists' lengths differ.
    pub fn stacked(self) -> (FloatTensor<B>, FloatTensor<B>) {
        assert!(
            !self.gate.is_empty()
                && self.gate.len() == self.up.len()
                && self.up.len() == self.down.len(),
            "one gate, up and down tensor per expert, at least one expert"
        );
        let gate_up: Vec<Tensor<B, 2>> = self
            .gate
            .into_iter()
            .zip(self.up)
            .map(|(g, u)| Tensor::cat(vec![float::<B, 2>(g), float(u)], 0))
            .collect();
        let down: Vec<Tensor<B, 2>> = self.down.into_iter().map(float).collect();
        (
            primitive(Tensor::stack::<3>(gate_up, 0)),
            primitive(Tensor::stack::<3>(down, 0)),
        )
    }
}

/// Backend extension for linear layers whose weight is stored `[out, in]` (the PyTorch / Hugging
/// Face layout): a model's router, attention projections, shared expert and LM head.
///
/// | backend | implementation |
/// |---|---|
/// | `NdArray` (feature `ndarray`) | host GEMV up to 32 rows ([`host::linear`]), else `W · xᵀ` (ndarray's `matmul` would copy a transposed weight) |
/// | `Flex` (feature `flex`) | host GEMV for 16-bit weights (`bf16`, `f16`; `f32` activations) and for `f32` up to 32 rows, else Flex's `matmul` on the transposed view; q8 and q4 (`linear_out_in_quant`) always on the host |
/// | every other backend | the reference, `x.matmul(weight.transpose())` (a 16-bit weight widened to `x`'s dtype first) |
pub trait LinearBackend: Backend {
    /// `x · Wᵀ`. The default is [`reference::linear_out_in_reference`].
    ///
    /// # Shapes
    /// - `x`: `[T, in]`, `weight`: `[out, in]`; output `[T, out]`
    fn linear_out_in(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        primitive(reference::linear_out_in_reference::<Self>(
            float(x),
            float(weight),
        ))
    }

    /// [`Self::linear_out_in`] with a quantized weight ([`quant`]): `x · dequantize(W)ᵀ`. The
    /// default dequantizes the weight with tensor ops, then runs the reference.
    ///
    /// # Shapes
    /// - `x`: `[T, in]`, `weight.values`: `[out, in / v]` (`v` weights per byte),
    ///   `weight.scales`: `[out, in / block]`; output `[T, out]`
    fn linear_out_in_quant(
        x: FloatTensor<Self>,
        weight: QuantPrimitive<Self>,
    ) -> FloatTensor<Self> {
        reference::linear_out_in_quant_primitive::<Self>(x, weight)
    }

    /// Whether this backend runs quantized weights ([`quant`]) in place, reading their packed
    /// blocks (burn's `Flex`); `false` (the default) makes the model loader dequantize them once
    /// at load to the precision it would otherwise hold (the same values, full-size bytes), so
    /// the fast paths of those backends serve them.
    fn quant_in_place() -> bool {
        false
    }

    /// Whether a tensor made from borrowed host bytes (burn's `Bytes::from_shared`, e.g. a
    /// memory-mapped checkpoint's) keeps reading them in place (burn's `Flex`), so a loader
    /// hands it the mapping's bytes instead of copies. `false` (the default) for backends that
    /// copy such bytes anyway (onto a device, or into their own arrays): the loader then copies
    /// once itself and releases the mapped pages as it goes.
    fn borrows_host_weights() -> bool {
        false
    }
}

/// Backend extension for the key/value cache of incremental decoding: appending the new
/// positions' keys (or values) to those cached, attending over them, and the rotary position
/// embedding of the new queries and keys.
///
/// | backend | `kv_append` | `kv_attention` | `kv_rope` |
/// |---|---|---|---|
/// | `Flex` (feature `flex`) | in place: the cache is a view of a buffer with room for more positions, the new ones are written after it (amortized: the buffer doubles when full), no copy of what is cached | [`host::attention`] on the cache's buffer in place (`f32`, `f16` or `bf16`; decode and prefill, each key and value row loaded once for up to 4 query rows, only the positions their masks let through), key/value heads on [`pool`]'s threads; the reference otherwise | [`host::rope`] in one pass over `f32` rows (the same operations as the reference, so the same values), rows on [`pool`]'s threads for a prefill; the reference otherwise |
/// | every other backend | the reference, `cat([cache, new], 2)` (a copy of the whole cache per step) | the reference | the reference |
///
/// A custom backend opts in to the reference with an empty `impl KvCacheBackend for MyBackend {}`.
pub trait KvCacheBackend: Backend {
    /// `cat([cache, new], 2)`. The default is [`reference::kv_append_reference`]. Whatever the
    /// implementation, the result holds the same values; an implementation may reuse `cache`'s
    /// storage (it is consumed).
    ///
    /// # Shapes
    /// - `cache`: `[B, H, S, D]`, `new`: `[B, H, T, D]`; output `[B, H, S + T, D]`
    fn kv_append(cache: FloatTensor<Self>, new: FloatTensor<Self>) -> FloatTensor<Self> {
        primitive(reference::kv_append_reference::<Self>(
            float(cache),
            float(new),
        ))
    }

    /// Grouped-query scaled dot-product attention, `softmax(q · kᵀ · scale + mask) · v`, query
    /// head `h` reading key/value head `h / (H / H_kv)`. The default is
    /// [`reference::attention_reference`] ([`reference::attention_primitive`]).
    ///
    /// # Shapes
    /// - `q`: `[B, H, T, D]`, `k`: `[B, H_kv, S, D]`, `v`: `[B, H_kv, S, D_v]`
    /// - `mask`: additive, broadcast to `[B, H, T, S]` (e.g. `[1, 1, T, S]`)
    /// - output `[B, H, T, D_v]`
    fn kv_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        reference::attention_primitive::<Self>([q, k, v, mask], scale)
    }

    /// Rotary position embedding of the queries or keys of `T` new positions, laid out tokens
    /// first (a projection's output with its heads split off): `x · cos + rotate_half(x) · sin`
    /// along `D`, the tables of position `t` applied to every batch row and head. The default
    /// is [`reference::rope_reference`] (tensor ops: a narrow, a negation, a concatenation and
    /// three broadcast element-wise ops).
    ///
    /// # Shapes
    /// - `x`: `[B, T, H, D]`, `cos`, `sin`: `[T, D]`; output `[B, T, H, D]`
    fn kv_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        primitive(reference::rope_reference::<Self>(
            float(x),
            float(cos),
            float(sin),
        ))
    }

    /// Whether [`Self::kv_attention`] reads `f16` and `bf16` keys and values where they are (a
    /// 16-bit cache then halves the bytes a decode step reads). The default, `false`: the
    /// reference widens the cache into an `f32` copy on every call, so a 16-bit cache saves
    /// memory but costs time; models then cache `f32` unless asked otherwise.
    fn reads_16_bit_kv_in_place() -> bool {
        false
    }
}

/// Calls [`KvCacheBackend::kv_append`] on tensors. Shapes as documented there.
pub fn kv_append<B: KvCacheBackend>(cache: Tensor<B, 4>, new: Tensor<B, 4>) -> Tensor<B, 4> {
    float(B::kv_append(
        cache.into_primitive().tensor(),
        new.into_primitive().tensor(),
    ))
}

/// Calls [`KvCacheBackend::kv_rope`] on tensors. Shapes as documented there.
pub fn kv_rope<B: KvCacheBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    float(B::kv_rope(primitive(x), primitive(cos), primitive(sin)))
}

/// Calls [`KvCacheBackend::kv_attention`] on tensors. Shapes as documented there.
pub fn kv_attention<B: KvCacheBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    float(B::kv_attention(
        primitive(q),
        primitive(k),
        primitive(v),
        primitive(mask),
        scale,
    ))
}

/// A backend that runs BEAM's operations and its model's cache: what a BEAM model needs.
/// Implemented for every backend implementing [`GroupedExpertsBackend`], [`LinearBackend`] and
/// [`KvCacheBackend`].
pub trait MoeBackend: GroupedExpertsBackend + LinearBackend + KvCacheBackend {}

impl<B: GroupedExpertsBackend + LinearBackend + KvCacheBackend> MoeBackend for B {}

/// Calls [`GroupedExpertsBackend::grouped_experts`] on tensors. Shapes as documented there.
pub fn grouped_experts<B: GroupedExpertsBackend>(
    x: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    gate_up: Tensor<B, 3>,
    down: Tensor<B, 3>,
) -> Tensor<B, 2> {
    float(B::grouped_experts(
        x.into_primitive().tensor(),
        expert_ids.into_primitive(),
        weights.into_primitive().tensor(),
        gate_up.into_primitive().tensor(),
        down.into_primitive().tensor(),
    ))
}

/// Calls [`GroupedExpertsBackend::grouped_experts_parts`] on tensors. Shapes as documented
/// there.
pub fn grouped_experts_parts<B: GroupedExpertsBackend>(
    x: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    [gate, up, down]: [Vec<Tensor<B, 2>>; 3],
) -> Tensor<B, 2> {
    let primitives = |tensors: Vec<Tensor<B, 2>>| tensors.into_iter().map(primitive).collect();
    float(B::grouped_experts_parts(
        x.into_primitive().tensor(),
        expert_ids.into_primitive(),
        weights.into_primitive().tensor(),
        ExpertParts {
            gate: primitives(gate),
            up: primitives(up),
            down: primitives(down),
        },
    ))
}

/// Calls [`GroupedExpertsBackend::grouped_experts_quant`] on tensors. Shapes as documented there.
pub fn grouped_experts_quant<B: GroupedExpertsBackend>(
    x: Tensor<B, 2>,
    expert_ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    gate_up: quant::QuantTensor<B, 3>,
    down: quant::QuantTensor<B, 3>,
) -> Tensor<B, 2> {
    float(B::grouped_experts_quant(
        x.into_primitive().tensor(),
        expert_ids.into_primitive(),
        weights.into_primitive().tensor(),
        gate_up.into_primitive(),
        down.into_primitive(),
    ))
}

/// The primitives of a quantized weight ([`quant::QuantTensor`]): packed `values` (an `I8` int
/// tensor: int8 values for q8, two 4-bit values per byte for q4) and `scales` (`f16`, or `f32`
/// where the backend holds no `f16`), one per block of consecutive values along the last
/// dimension.
#[derive(Debug)]
pub struct QuantPrimitive<B: Backend> {
    /// How the values are packed.
    pub format: quant::QuantFormat,
    /// `[.., C / v]` packed values, `v` weights per byte
    /// ([`quant::QuantFormat::values_per_byte`]).
    pub values: IntTensor<B>,
    /// `[.., C / block]` scales.
    pub scales: FloatTensor<B>,
}

/// `x · Wᵀ` for a weight stored `[out, in]`, through [`LinearBackend::linear_out_in`].
///
/// # Shapes
/// - `x`: `[T, in]`, `weight`: `[out, in]`; output `[T, out]`
pub fn linear_out_in<B: LinearBackend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    float(B::linear_out_in(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
    ))
}

/// `x · dequantize(W)ᵀ` for a quantized weight stored `[out, in]`, through
/// [`LinearBackend::linear_out_in_quant`]. Shapes as documented there.
pub fn linear_out_in_quant<B: LinearBackend>(
    x: Tensor<B, 2>,
    weight: quant::QuantTensor<B, 2>,
) -> Tensor<B, 2> {
    float(B::linear_out_in_quant(
        x.into_primitive().tensor(),
        weight.into_primitive(),
    ))
}

/// A float primitive as a tensor.
pub(crate) fn float<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// A float tensor's primitive.
pub(crate) fn primitive<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FloatTensor<B> {
    tensor.into_primitive().tensor()
}

/// Which expert-GEMM kernels [`masked_moe`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regime {
    /// Few tokens per expert: one GEMV per (weight row block, expert), weight-bandwidth bound.
    Decode,
    /// Many tokens per expert: a tiled GEMM per expert that reads each weight tile once per
    /// 64-token row tile.
    Prefill,
}

impl Regime {
    /// Decode while an expert would get at most [`DECODE_MAX_PAIRS_PER_EXPERT`] pairs on average
    /// (`T · K / E`, the unmasked load), prefill above. Chosen from shapes only, never from the
    /// device-side routing, so no read-back is needed.
    pub fn from_shape(tokens: usize, top_k: usize, experts: usize) -> Self {
        if tokens * top_k <= DECODE_MAX_PAIRS_PER_EXPERT * experts.max(1) {
            Regime::Decode
        } else {
            Regime::Prefill
        }
    }
}

/// Mean pairs per expert up to which [`Regime::from_shape`] picks the GEMV kernels: a GEMV re-reads
/// an expert's weights (from cache) for each of its tokens, a 64-row tile wastes most of its work
/// on a handful of tokens.
pub const DECODE_MAX_PAIRS_PER_EXPERT: usize = 4;

/// Options of [`masked_moe`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskedMoeOptions {
    /// Force a regime; `None` picks it with [`Regime::from_shape`].
    pub regime: Option<Regime>,
    /// Fill every scratch and output buffer with NaN (`u32::MAX` for indices) before the kernels
    /// run, so an element a kernel fails to write shows up. For tests; costs extra fills.
    pub poison: bool,
}

/// Test data shared by the backends' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// Deterministic O(1) values, none zero.
    #[allow(dead_code)] // unused when no backend feature with unit tests is on
    pub fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 0.5 + 0.01)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regime_follows_tokens_per_expert() {
        // OLMoE-like E = 64, K = 8: decode up to T = 32, prefill from there.
        assert_eq!(Regime::from_shape(1, 8, 64), Regime::Decode);
        assert_eq!(Regime::from_shape(16, 8, 64), Regime::Decode);
        assert_eq!(Regime::from_shape(32, 8, 64), Regime::Decode);
        assert_eq!(Regime::from_shape(33, 8, 64), Regime::Prefill);
        assert_eq!(Regime::from_shape(512, 8, 64), Regime::Prefill);
        assert_eq!(Regime::from_shape(0, 8, 64), Regime::Decode);
    }
}
