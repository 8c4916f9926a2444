//! q8 weights: block-wise symmetric int8.
//!
//! A weight matrix `[rows, row_len]` (row-major, the `[out, in]` layout) is cut along each row
//! into blocks of `block` consecutive values (32 where it divides the row, see
//! [`q8_block_len`]); each block keeps one `f16` scale `s`, `max|w| / 127` rounded *up* to the
//! next `f16`, and the values `q = round(w / s)` in `[-127, 127]`, so `w ≈ q · s` within `s / 2`
//! (an all-zero block has scale 0): llama.cpp's `Q8_0` (same block, same `f16` scale) and the
//! values of burn's `Q8S` block scheme. Bytes per weight: `1 + 2 / block` (1.0625 at block 32,
//! against 2 for `bf16` and 4 for `f32`); decode streams these bytes, so the scale's width is
//! speed (an `f32` scale made every token read 6% more).
//!
//! Rounding the scale up (not to nearest) keeps `|w / s| <= 127` for every block, so no value is
//! clamped and the bound holds even where the scale is an `f16` subnormal (blocks with
//! `max|w| < 7.8e-3`, whose scale then has less than 11 significant bits but still bounds the
//! error by `s / 2`); blocks with `max|w| > 127 · 65504 ≈ 8.3e6` have no finite `f16` scale and
//! quantize to an infinite one, as a non-finite value does: it shows up rather than being
//! clamped away.
//!
//! Activations are quantized the same way per call ([`quantize_q8_activation`]) but keep an `f32`
//! scale: they are not streamed, and the int8 dot then stays exact on the quantized values.
//!
//! In a model a q8 weight is a [`Q8Tensor`]: two plain burn tensors, the int8 values (an `I8`
//! int tensor) and the scales (`[.., C / block]`, `f16` where the backend holds `f16`, else
//! `f32`). Not burn's own quantized tensors: burn-flex 0.21 keeps a quantized tensor's block scales in a `Vec` that every clone copies, and a module's
//! parameter is cloned on each forward (`Param::val`), which cost more than the product (an
//! OLMoE-shaped 4-layer model decoded at 7.3 tokens/s that way, against 20 in bf16); plain
//! tensors share their storage between clones, and every backend can hold them, slice them
//! (the reference dequantizes only routed experts) and move them.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use half::f16;
use rayon::prelude::*;

use crate::aligned::AlignedRows;
use crate::Q8Primitive;

/// The block length along the input dimension where the row length allows it.
pub const Q8_BLOCK: usize = 32;

/// The shortest block [`q8_block_len`] picks (shorter blocks would cost more in scales than the
/// int8 values save).
pub const Q8_MIN_BLOCK: usize = 8;

/// The largest `int8` magnitude a value is rounded to.
const Q8_MAX: f32 = 127.0;

/// The block length for rows of `row_len` values: [`Q8_BLOCK`] when it divides the row, else
/// the largest divisor of `row_len` from [`Q8_MIN_BLOCK`] to 32 (small models: rows of 16, 24,
/// 48, … values), `None` when there is none (or the row is empty): such a matrix cannot be q8.
pub fn q8_block_len(row_len: usize) -> Option<usize> {
    if row_len == 0 {
        return None;
    }
    (Q8_MIN_BLOCK..=Q8_BLOCK)
        .rev()
        .find(|block| row_len.is_multiple_of(*block))
}

/// A borrowed q8 matrix: `values` row-major, one `f16` scale per `block` consecutive values
/// (blocks never straddle rows when rows are whole blocks, which [`q8_block_len`] guarantees).
#[derive(Debug, Clone, Copy)]
pub struct Q8Matrix<'a> {
    values: &'a [i8],
    scales: &'a [f16],
    block: usize,
}

impl<'a> Q8Matrix<'a> {
    /// `None` unless `block > 0`, `values` is whole blocks and `scales` has one per block.
    pub fn new(values: &'a [i8], scales: &'a [f16], block: usize) -> Option<Self> {
        (block > 0 && values.len().is_multiple_of(block) && scales.len() == values.len() / block)
            .then_some(Self {
                values,
                scales,
                block,
            })
    }

    /// The int8 values.
    pub fn values(&self) -> &'a [i8] {
        self.values
    }

    /// One scale per block.
    pub fn scales(&self) -> &'a [f16] {
        self.scales
    }

    /// Values per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Writes `q · s` for the values `range` into `out` (as long as `range`).
    pub fn dequantize_into(&self, range: core::ops::Range<usize>, out: &mut [f32]) {
        assert_eq!(out.len(), range.len(), "output as long as the range");
        let (mut at, mut written) = (range.start, 0);
        while at < range.end {
            // The rest of `at`'s block (whole blocks when the range starts on one).
            let block_end = ((at / self.block + 1) * self.block).min(range.end);
            let scale = self.scales[at / self.block].to_f32();
            let len = block_end - at;
            for (o, &q) in out[written..written + len]
                .iter_mut()
                .zip(&self.values[at..block_end])
            {
                *o = q as f32 * scale;
            }
            written += len;
            at = block_end;
        }
    }
}

/// Owned q8 weights: what [`quantize_q8`] makes and a burn quantized tensor is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Weights {
    /// The int8 values, row-major like the source.
    pub values: Vec<i8>,
    /// One scale per block of [`Self::block`] values.
    pub scales: Vec<f16>,
    /// Values per block.
    pub block: usize,
}

impl Q8Weights {
    /// The weights as a borrowed matrix.
    pub fn matrix(&self) -> Q8Matrix<'_> {
        Q8Matrix::new(&self.values, &self.scales, self.block).expect("built whole blocks")
    }

    /// Every value dequantized: `q · s`, what the kernels compute with.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.values.len()];
        self.matrix()
            .dequantize_into(0..self.values.len(), &mut out);
        out
    }
}

/// The largest magnitude in `wide` (NaN if any value is NaN).
fn block_max(wide: &[f32]) -> f32 {
    // Eight running maxima (one per lane) instead of one chain: the compiler keeps them in a
    // vector register. A maximum is exact in any order, so the result is the sequential one.
    const LANES: usize = 8;
    let mut lanes = [0.0f32; LANES];
    let mut nan = false;
    let chunks = wide.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &w) in lanes.iter_mut().zip(chunk) {
            let a = w.abs();
            nan |= a.is_nan();
            *lane = if a > *lane { a } else { *lane };
        }
    }
    for &w in rest {
        let a = w.abs();
        nan |= a.is_nan();
        lanes[0] = if a > lanes[0] { a } else { lanes[0] };
    }
    if nan {
        return f32::NAN;
    }
    lanes.iter().fold(0.0f32, |m, &l| if l > m { l } else { m })
}

/// The smallest `f16` at least `value` (`value` positive or NaN; infinite above `f16::MAX`).
fn f16_at_least(value: f32) -> f16 {
    let near = f16::from_f32(value);
    if near.to_f32() >= value || value.is_nan() {
        near
    } else {
        // Positive and finite below: the next f16 up is the next bit pattern.
        f16::from_bits(near.to_bits() + 1)
    }
}

/// Rounds `wide` to int8 in `q` with the given scale (see [`quantize_q8`]); `scale` is the
/// block's, `|w / scale| <= 127` up to rounding.
fn round_block(wide: &[f32], scale: f32, q: &mut [i8]) {
    if scale == 0.0 {
        q.fill(0);
        return;
    }
    let inverse = 1.0 / scale;
    for (q, &w) in q.iter_mut().zip(wide) {
        // Round half away from zero (`f32::round`, without its libm call), clamped to ±127 in
        // `f32` (|w · inverse| <= 127 up to rounding), then truncated: what a saturating cast
        // and an integer clamp give, NaN to 0 included, in a loop the compiler vectorises.
        let v = w * inverse;
        let r = (v + 0.5f32.copysign(v)).clamp(-127.0, 127.0);
        let r = if r.is_nan() { 0.0 } else { r };
        // SAFETY: `r` is finite and within ±127, so it truncates to an i32.
        *q = unsafe { r.to_int_unchecked::<i32>() } as i8;
    }
}

/// Quantizes one weight block: its `f16` scale (`max|w| / 127` rounded up), and its values
/// into `q` (see [`quantize_q8`]).
fn quantize_block(wide: &[f32], q: &mut [i8]) -> f16 {
    let max = block_max(wide);
    if max == 0.0 {
        q.fill(0);
        return f16::ZERO;
    }
    let scale = f16_at_least(max / Q8_MAX);
    round_block(wide, scale.to_f32(), q);
    scale
}

/// An activation row quantized to q8 (see [`quantize_q8_activation`]): `f32` scales.
#[derive(Debug, Clone)]
pub struct Q8Activation {
    /// The int8 values, on a cache line (see [`crate::aligned`]).
    values: AlignedRows<i8>,
    /// One `f32` scale per block of [`Self::block`] values.
    pub scales: Vec<f32>,
    /// Values per block.
    pub block: usize,
}

impl Q8Activation {
    /// The int8 values.
    pub fn values(&self) -> &[i8] {
        self.values.row(0)
    }

    /// Every value dequantized: `q · s`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values()
            .chunks_exact(self.block)
            .zip(&self.scales)
            .flat_map(|(q, &s)| q.iter().map(move |&q| q as f32 * s))
            .collect()
    }
}

/// Quantizes `f32` activations on the calling thread (a vector at a time, for the int8 dots):
/// the weights' scheme with an `f32` scale `max|x| / 127` per block (not streamed, so not
/// narrowed).
///
/// # Panics
/// If `block` is 0 or does not divide `values.len()`.
pub fn quantize_q8_activation(values: &[f32], block: usize) -> Q8Activation {
    assert!(
        block > 0 && values.len().is_multiple_of(block),
        "whole q8 blocks"
    );
    let mut q = AlignedRows::zeroed(1, values.len());
    let scales = values
        .chunks_exact(block)
        .zip(q.row_mut(0).chunks_exact_mut(block))
        .map(|(wide, q)| {
            let scale = block_max(wide) / Q8_MAX;
            round_block(wide, scale, q);
            scale
        })
        .collect();
    Q8Activation {
        values: q,
        scales,
        block,
    }
}

/// Values quantized per block on rayon's pool (a chunk of blocks per task).
const QUANTIZE_CHUNK_BLOCKS: usize = 4096;

/// Quantizes `values` (`f32`, `bf16` or `f16`, row-major) to q8 with blocks of `block` values:
/// `s = max|w| / 127` rounded up to an `f16`, `q = round(w / s)` (0 and scale 0 for an all-zero
/// block; a non-finite value, or a block beyond `f16`'s range, makes its block's scale
/// non-finite, so it shows up rather than being clamped away).
///
/// # Panics
/// If `block` is 0 or does not divide `values.len()` (callers pick it with [`q8_block_len`]).
pub fn quantize_q8<W: Copy + Send + Sync + Into<f32>>(values: &[W], block: usize) -> Q8Weights {
    quantize_q8_into(
        values,
        block,
        vec![0i8; values.len()],
        vec![f16::ZERO; values.len() / block.max(1)],
    )
}

/// [`quantize_q8`] into buffers the caller allocated (`q` as long as `values`, `scales` one per
/// block), e.g. backed by huge pages: the int8 values are what decode streams.
///
/// # Panics
/// If `block` does not divide `values.len()` or a buffer has the wrong length.
pub fn quantize_q8_into<W: Copy + Send + Sync + Into<f32>>(
    values: &[W],
    block: usize,
    mut q: Vec<i8>,
    mut scales: Vec<f16>,
) -> Q8Weights {
    assert!(
        block > 0 && values.len().is_multiple_of(block),
        "{} values are not whole q8 blocks of {block}",
        values.len()
    );
    assert!(
        q.len() == values.len() && scales.len() == values.len() / block,
        "buffer lengths"
    );
    let chunk = QUANTIZE_CHUNK_BLOCKS * block;
    q.par_chunks_mut(chunk)
        .zip(scales.par_chunks_mut(QUANTIZE_CHUNK_BLOCKS))
        .zip(values.par_chunks(chunk))
        .for_each(|((q, scales), values)| quantize_q8_slice(values, block, q, scales));
    Q8Weights {
        values: q,
        scales,
        block,
    }
}

/// [`quantize_q8_into`] on borrowed slices, on the calling thread: `values` into `q` (as long)
/// and `scales` (one per block of `block`), the same values and scales block for block. For a
/// caller that already runs one task per part of a weight (one expert per task while loading).
///
/// # Panics
/// If `block` is 0 or does not divide `values.len()`, or a buffer has the wrong length.
pub fn quantize_q8_slice<W: Copy + Into<f32>>(
    values: &[W],
    block: usize,
    q: &mut [i8],
    scales: &mut [f16],
) {
    assert!(
        block > 0
            && values.len().is_multiple_of(block)
            && q.len() == values.len()
            && scales.len() == values.len() / block,
        "{} values into whole q8 blocks of {block}",
        values.len()
    );
    let mut wide = vec![0.0f32; block];
    for ((q, scale), values) in q
        .chunks_exact_mut(block)
        .zip(scales.iter_mut())
        .zip(values.chunks_exact(block))
    {
        for (wide, &w) in wide.iter_mut().zip(values) {
            *wide = w.into();
        }
        *scale = quantize_block(&wide, q);
    }
}

/// A q8 weight as burn tensors: int8 `values` `[.., C]` (an `I8` int tensor) and `scales`
/// `[.., C / block]` (one per block of `block` consecutive values of the last dimension): `f16`
/// as quantized where the backend holds `f16` tensors, else the same values in `f32`.
#[derive(Debug, Clone)]
pub struct Q8Tensor<B: Backend, const D: usize> {
    /// The int8 values.
    pub values: Tensor<B, D, Int>,
    /// The block scales.
    pub scales: Tensor<B, D>,
}

impl<B: Backend, const D: usize> Q8Tensor<B, D> {
    /// `weights` (row-major, of shape `shape`) on `device`.
    ///
    /// # Panics
    /// If `shape` does not hold `weights.values.len()` elements in rows of whole blocks.
    pub fn new(weights: Q8Weights, shape: [usize; D], device: &B::Device) -> Self {
        let row_len = shape[D - 1];
        assert!(
            row_len.is_multiple_of(weights.block)
                && shape.iter().product::<usize>() == weights.values.len(),
            "{shape:?} is not rows of whole blocks of {}",
            weights.block
        );
        let mut scales_shape = shape;
        scales_shape[D - 1] = row_len / weights.block;
        let scales = TensorData::new(weights.scales, scales_shape);
        let scales = if B::supports_dtype(device, DType::F16) {
            Tensor::from_data(scales, (device, DType::F16))
        } else {
            Tensor::from_data(scales.convert::<f32>(), device)
        };
        Self {
            values: Tensor::from_data(TensorData::new(weights.values, shape), (device, DType::I8)),
            scales,
        }
    }

    /// Values per block.
    pub fn block(&self) -> usize {
        let (c, blocks) = (self.values.dims()[D - 1], self.scales.dims()[D - 1]);
        c.checked_div(blocks).unwrap_or(0)
    }

    /// The shape of the weight.
    pub fn dims(&self) -> [usize; D] {
        self.values.dims()
    }

    /// `q · s` as an `f32` tensor, with tensor ops.
    pub fn dequantize(&self) -> Tensor<B, D> {
        let shape = self.values.dims();
        let block = self.block().max(1);
        let n = shape.iter().product::<usize>() / block;
        let values = self
            .values
            .clone()
            .float()
            .cast(DType::F32)
            .reshape([n, block]);
        let scales = self.scales.clone().cast(DType::F32).reshape([n, 1]);
        (values * scales).reshape(shape)
    }

    /// Slice `index` of the first dimension, as a `D - 1`-dimensional tensor is not expressible
    /// here: the slice keeps a leading 1 (`[1, ..]`).
    pub fn narrow_first(&self, index: usize) -> Self {
        Self {
            values: self.values.clone().narrow(0, index, 1),
            scales: self.scales.clone().narrow(0, index, 1),
        }
    }

    /// The primitives, for the backend traits.
    pub fn into_primitive(self) -> Q8Primitive<B> {
        Q8Primitive {
            values: self.values.into_primitive(),
            scales: self.scales.into_primitive().tensor(),
        }
    }

    /// From the backend traits' primitives.
    pub fn from_primitive(primitive: Q8Primitive<B>) -> Self {
        Self {
            values: Tensor::from_primitive(primitive.values),
            scales: Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(primitive.scales)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    #[test]
    fn the_vectorised_block_quantizer_equals_the_sequential_formula() {
        // The reference: one running maximum (NaN poisons the block), then round half away
        // from zero through a saturating cast and an integer clamp, value by value.
        fn reference(wide: &[f32]) -> (f16, Vec<i8>) {
            let max = wide.iter().fold(0.0f32, |m, &w| {
                if w.is_nan() || m.is_nan() {
                    f32::NAN
                } else {
                    m.max(w.abs())
                }
            });
            if max == 0.0 {
                return (f16::ZERO, vec![0; wide.len()]);
            }
            let scale = f16_at_least(max / Q8_MAX);
            let inverse = 1.0 / scale.to_f32();
            let q = wide
                .iter()
                .map(|&w| {
                    let v = w * inverse;
                    ((v + 0.5f32.copysign(v)) as i32).clamp(-127, 127) as i8
                })
                .collect();
            (scale, q)
        }
        let mut blocks: Vec<Vec<f32>> = (0..200)
            .map(|i| values(32, 0.5 + i as f32))
            .chain((8..=32).map(|n| values(n, 3.0)))
            .collect();
        let mut special = values(32, 1.0);
        special[5] = f32::NAN;
        blocks.push(special.clone());
        special[5] = f32::INFINITY;
        blocks.push(special.clone());
        special[5] = -1e30;
        blocks.push(special);
        blocks.push(vec![0.0; 32]);
        blocks.push(vec![-0.0; 16]);
        blocks.push((0..32).map(|i| (i as f32 - 15.5) * 1e-7).collect());
        for wide in &blocks {
            let mut q = vec![99i8; wide.len()];
            let scale = quantize_block(wide, &mut q);
            let (want_scale, want_q) = reference(wide);
            assert_eq!(scale.to_bits(), want_scale.to_bits(), "{wide:?}");
            assert_eq!(q, want_q, "{wide:?}");
        }
    }

    #[test]
    fn block_lengths_tile_rows() {
        assert_eq!(q8_block_len(2048), Some(32));
        assert_eq!(q8_block_len(64), Some(32));
        assert_eq!(q8_block_len(16), Some(16));
        assert_eq!(q8_block_len(48), Some(24));
        assert_eq!(q8_block_len(12), Some(12));
        assert_eq!(q8_block_len(37), None);
        assert_eq!(q8_block_len(7), None);
        assert_eq!(q8_block_len(0), None);
    }

    #[test]
    fn round_trip_is_within_half_a_step_per_block() {
        for (len, block) in [(96, 32), (48, 24), (36, 12)] {
            let mut source = values(len, 0.3);
            // One block spans a wide range, one is all zero.
            source[1] = 40.0;
            source[block..2 * block].fill(0.0);
            let q = quantize_q8(&source, block);
            assert_eq!((q.values.len(), q.scales.len()), (len, len / block));
            assert_eq!(q.scales[1], f16::ZERO, "an all-zero block");
            let back = q.dequantize();
            for (b, (src, got)) in source.chunks(block).zip(back.chunks(block)).enumerate() {
                let max = src.iter().fold(0.0f32, |m, w| m.max(w.abs()));
                // The f16 at or just above max / 127 (one f16 step: 2^-10 relative).
                let scale = q.scales[b].to_f32();
                assert!(scale >= max / 127.0 && scale <= max / 127.0 * (1.0 + 1.0 / 1024.0));
                for (&w, &g) in src.iter().zip(got) {
                    // Half a quantization step, plus f32 rounding of q · s.
                    assert!(
                        (w - g).abs() <= scale / 2.0 * (1.0 + 1e-5) + 1e-7,
                        "block {b}: {w} -> {g} (scale {scale})"
                    );
                }
            }
            // The block's largest value is exact up to f32 rounding: it maps to ±127.
            assert_eq!(q.values[1], 127);
        }
    }

    #[test]
    fn sixteen_bit_sources_quantize_their_widened_values() {
        let source = values(64, 0.7);
        let bf: Vec<half::bf16> = source.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let widened: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
        assert_eq!(quantize_q8(&bf, 32), quantize_q8(&widened, 32));
    }

    #[test]
    fn non_finite_values_poison_their_block_only() {
        let mut source = values(64, 0.1);
        source[40] = f32::NAN;
        let q = quantize_q8(&source, 32);
        assert!(q.scales[0].is_finite() && q.scales[1].is_nan());
    }

    #[test]
    fn scales_round_up_so_tiny_and_huge_blocks_stay_within_the_bound_or_show() {
        // Blocks whose scale is an f16 subnormal (max / 127 below 6.1e-5) or below the smallest
        // one (6e-8): rounding up keeps every |w / s| <= 127, so nothing is clamped and the
        // error stays within half the stored scale.
        for magnitude in [3e-3f32, 2e-5, 1e-6, 1e-9] {
            let source: Vec<f32> = values(64, 1.0).iter().map(|v| v * magnitude).collect();
            let q = quantize_q8(&source, 32);
            let back = q.dequantize();
            for (b, (src, got)) in source.chunks(32).zip(back.chunks(32)).enumerate() {
                let scale = q.scales[b].to_f32();
                assert!(scale > 0.0, "a non-zero block keeps a non-zero scale");
                for (&w, &g) in src.iter().zip(got) {
                    assert!(
                        (w - g).abs() <= scale / 2.0 * (1.0 + 1e-5),
                        "magnitude {magnitude}: {w} -> {g} (scale {scale})"
                    );
                }
            }
        }
        // Beyond f16's range: the scale is infinite, not clamped.
        let mut source = values(32, 1.0);
        source[3] = 1e7;
        assert!(quantize_q8(&source, 32).scales[0].is_infinite());
    }

    #[test]
    fn activations_keep_f32_scales() {
        let source = values(64, 2.0);
        let q = quantize_q8_activation(&source, 32);
        for (b, src) in source.chunks(32).enumerate() {
            let max = src.iter().fold(0.0f32, |m, w| m.max(w.abs()));
            assert_eq!(q.scales[b], max / 127.0);
            for (&w, &v) in src.iter().zip(&q.values()[b * 32..(b + 1) * 32]) {
                assert!((w - v as f32 * q.scales[b]).abs() <= q.scales[b] / 2.0 * (1.0 + 1e-5));
            }
        }
    }

    #[cfg(feature = "flex")]
    #[test]
    fn a_q8_tensor_dequantizes_with_tensor_ops_to_the_quantizer_values() {
        use burn::backend::flex::Flex;
        let q = quantize_q8(&values(2 * 3 * 48, 0.2), 24);
        let want = q.dequantize();
        let tensor = Q8Tensor::<Flex, 3>::new(q, [2, 3, 48], &Default::default());
        assert_eq!(tensor.block(), 24);
        assert_eq!(tensor.values.dtype(), DType::I8);
        assert_eq!(
            tensor.scales.dtype(),
            DType::F16,
            "Flex holds the f16 scales as they are"
        );
        assert_eq!(tensor.scales.dims(), [2, 3, 2]);
        let got = tensor.dequantize().into_data().to_vec::<f32>().unwrap();
        assert_eq!(got, want);
        let second = tensor
            .narrow_first(1)
            .dequantize()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(second, want[3 * 48..]);
    }
}
