//! Quantized weights: block-wise int8 (q8) and 4-bit (q4).
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
//! q4 ([`quantize_q4`], llama.cpp's `Q4_0`: same block of 32, same `f16` scale, same nibble
//! layout) keeps 4 bits per weight: `w ≈ (q - 8) · s` with `q` in `[0, 15]`, the scale's sign
//! and magnitude chosen so the block's largest-magnitude value maps to `-8` exactly; 0.5625
//! bytes per weight at block 32, half of q8's, at about 16 times q8's error per weight.
//!
//! Activations are quantized the same way per call ([`quantize_q8_activation`]) but keep an `f32`
//! scale: they are not streamed, and the int8 dot then stays exact on the quantized values.
//!
//! In a model a quantized weight is a [`QuantTensor`]: two plain burn tensors, the packed values
//! (an `I8` int tensor) and the scales (`[.., C / block]`, `f16` where the backend holds `f16`,
//! else `f32`). Not burn's own quantized tensors: burn-flex 0.21 keeps a quantized tensor's
//! block scales in a `Vec` that every clone copies, and a module's parameter is cloned on each
//! forward (`Param::val`), which cost more than the product (an OLMoE-shaped 4-layer model
//! decoded at 7.3 tokens/s that way, against 20 in bf16); plain tensors share their storage
//! between clones, and every backend can hold them, slice them (the reference dequantizes only
//! routed experts) and move them.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use half::f16;
use rayon::prelude::*;

use crate::aligned::AlignedRows;
use crate::QuantPrimitive;

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
    largest_block(row_len, 1)
}

/// The largest multiple of `step` from [`Q8_MIN_BLOCK`] to [`Q8_BLOCK`] that divides `row_len`
/// (`None` for an empty row or when there is none).
fn largest_block(row_len: usize, step: usize) -> Option<usize> {
    if row_len == 0 {
        return None;
    }
    (Q8_MIN_BLOCK..=Q8_BLOCK)
        .rev()
        .filter(|block| block.is_multiple_of(step))
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

/// The packing of a quantized weight's values: what a [`QuantWeights`] or [`QuantTensor`] holds
/// in its `i8` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// One int8 value per weight in `[-127, 127]` ([`quantize_q8`]): `w ≈ q · s`.
    Q8,
    /// Two 4-bit values per byte ([`quantize_q4`]): `w ≈ (q - 8) · s` with `q` in `[0, 15]`;
    /// byte `j` of a block of `n` values holds value `j` in its low nibble and value
    /// `j + n / 2` in its high one (llama.cpp's `Q4_0` layout).
    Q4,
}

impl QuantFormat {
    /// The lower-case name (`q8`, `q4`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }

    /// Weights per stored byte (1 for q8, 2 for q4).
    pub fn values_per_byte(self) -> usize {
        match self {
            Self::Q8 => 1,
            Self::Q4 => 2,
        }
    }

    /// The block length for rows of `row_len` values ([`q8_block_len`], [`q4_block_len`]).
    pub fn block_len(self, row_len: usize) -> Option<usize> {
        match self {
            Self::Q8 => q8_block_len(row_len),
            Self::Q4 => q4_block_len(row_len),
        }
    }

    /// Bytes per weight with blocks of `block` values and an `f16` scale each.
    pub fn bytes_per_weight(self, block: usize) -> f64 {
        1.0 / self.values_per_byte() as f64 + 2.0 / block as f64
    }

    /// Quantizes `values` with blocks of `block`: [`quantize_q8`] or [`quantize_q4`].
    ///
    /// # Panics
    /// If `block` does not suit the format or does not divide `values.len()`.
    pub fn quantize<W: Copy + Send + Sync + Into<f32>>(
        self,
        values: &[W],
        block: usize,
    ) -> QuantWeights {
        let blocks = values.len() / block.max(1);
        self.quantize_into(
            values,
            block,
            vec![0i8; values.len() / self.values_per_byte()],
            vec![f16::ZERO; blocks],
        )
    }

    /// [`Self::quantize`] into buffers the caller allocated (`q` holding the packed values, as
    /// long as `values` over [`Self::values_per_byte`]; `scales` one per block), e.g. backed by
    /// huge pages: the packed values are what decode streams. Blocks on rayon's pool.
    ///
    /// # Panics
    /// If `block` does not suit the format or does not divide `values.len()`, or a buffer has
    /// the wrong length.
    pub fn quantize_into<W: Copy + Send + Sync + Into<f32>>(
        self,
        values: &[W],
        block: usize,
        mut q: Vec<i8>,
        mut scales: Vec<f16>,
    ) -> QuantWeights {
        self.check_block(values.len(), block);
        assert!(
            q.len() == values.len() / self.values_per_byte()
                && scales.len() == values.len() / block,
            "buffer lengths"
        );
        let chunk = QUANTIZE_CHUNK_BLOCKS * block;
        q.par_chunks_mut(chunk / self.values_per_byte())
            .zip(scales.par_chunks_mut(QUANTIZE_CHUNK_BLOCKS))
            .zip(values.par_chunks(chunk))
            .for_each(|((q, scales), values)| self.quantize_slice(values, block, q, scales));
        QuantWeights {
            format: self,
            values: q,
            scales,
            block,
        }
    }

    /// [`Self::quantize_into`] on borrowed slices, on the calling thread: the same values and
    /// scales block for block. For a caller that already runs one task per part of a weight (one
    /// expert per task while loading).
    ///
    /// # Panics
    /// As [`Self::quantize_into`].
    pub fn quantize_slice<W: Copy + Into<f32>>(
        self,
        values: &[W],
        block: usize,
        q: &mut [i8],
        scales: &mut [f16],
    ) {
        self.check_block(values.len(), block);
        let packed = block / self.values_per_byte();
        assert!(
            q.len() == values.len() / self.values_per_byte()
                && scales.len() == values.len() / block,
            "{} values into whole {} blocks of {block}",
            values.len(),
            self.name()
        );
        let mut wide = vec![0.0f32; block];
        let mut nibbles = vec![0u8; block];
        for ((q, scale), values) in q
            .chunks_exact_mut(packed)
            .zip(scales.iter_mut())
            .zip(values.chunks_exact(block))
        {
            for (wide, &w) in wide.iter_mut().zip(values) {
                *wide = w.into();
            }
            *scale = match self {
                Self::Q8 => quantize_block(&wide, q),
                Self::Q4 => quantize_block_q4(&wide, q, &mut nibbles),
            };
        }
    }

    fn check_block(self, len: usize, block: usize) {
        assert!(
            block > 0 && block.is_multiple_of(self.values_per_byte()) && len.is_multiple_of(block),
            "{len} values are not whole {} blocks of {block}",
            self.name()
        );
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A borrowed quantized matrix of either format, for callers that dispatch on it.
#[derive(Debug, Clone, Copy)]
pub enum QuantMatrix<'a> {
    /// int8 values.
    Q8(Q8Matrix<'a>),
    /// Packed 4-bit values.
    Q4(Q4Matrix<'a>),
}

impl<'a> QuantMatrix<'a> {
    /// `values` packed as `format` says, with one scale per `block` weights: `None` where the
    /// format's matrix refuses them ([`Q8Matrix::new`], [`Q4Matrix::new`]).
    pub fn new(
        format: QuantFormat,
        values: &'a [i8],
        scales: &'a [f16],
        block: usize,
    ) -> Option<Self> {
        Some(match format {
            QuantFormat::Q8 => Self::Q8(Q8Matrix::new(values, scales, block)?),
            QuantFormat::Q4 => Self::Q4(Q4Matrix::new(values, scales, block)?),
        })
    }
}

/// Owned quantized weights: what [`quantize_q8`] and [`quantize_q4`] make and a
/// [`QuantTensor`] is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantWeights {
    /// How [`Self::values`] are packed.
    pub format: QuantFormat,
    /// The packed values, row-major like the source: one byte per weight (q8) or two weights per
    /// byte (q4).
    pub values: Vec<i8>,
    /// One scale per block of [`Self::block`] values.
    pub scales: Vec<f16>,
    /// Values per block.
    pub block: usize,
}

impl QuantWeights {
    /// The weights as a borrowed matrix.
    pub fn matrix(&self) -> QuantMatrix<'_> {
        QuantMatrix::new(self.format, &self.values, &self.scales, self.block)
            .expect("built whole blocks")
    }

    /// The weights as a q8 matrix, if they are q8.
    pub fn as_q8(&self) -> Option<Q8Matrix<'_>> {
        match self.matrix() {
            QuantMatrix::Q8(m) => Some(m),
            QuantMatrix::Q4(_) => None,
        }
    }

    /// The weights as a q4 matrix, if they are q4.
    pub fn as_q4(&self) -> Option<Q4Matrix<'_>> {
        match self.matrix() {
            QuantMatrix::Q4(m) => Some(m),
            QuantMatrix::Q8(_) => None,
        }
    }

    /// Weights held (packed values times [`QuantFormat::values_per_byte`]).
    pub fn len(&self) -> usize {
        self.values.len() * self.format.values_per_byte()
    }

    /// Whether no weight is held.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Every value dequantized: `q · s` (q8) or `(q - 8) · s` (q4), what the kernels compute
    /// with.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        match self.matrix() {
            QuantMatrix::Q8(m) => m.dequantize_into(0..out.len(), &mut out),
            QuantMatrix::Q4(m) => m.dequantize_into(0..out.len(), &mut out),
        }
        out
    }
}

/// The q4 block length for rows of `row_len` values: 32 where it divides the row, else the
/// largest *even* divisor of `row_len` from [`Q8_MIN_BLOCK`] to 32 (a block packs its first and
/// second halves into one byte each pair); `None` when there is none.
pub fn q4_block_len(row_len: usize) -> Option<usize> {
    largest_block(row_len, 2)
}

/// A borrowed q4 matrix: `values` the packed bytes (llama.cpp's `Q4_0` layout within a block,
/// see [`QuantFormat::Q4`]), one `f16` scale per `block` consecutive weights. Weights are
/// addressed by their index in the unpacked row-major matrix.
#[derive(Debug, Clone, Copy)]
pub struct Q4Matrix<'a> {
    values: &'a [i8],
    scales: &'a [f16],
    block: usize,
}

impl<'a> Q4Matrix<'a> {
    /// `None` unless `block` is positive and even, `values` packs whole blocks (`block / 2`
    /// bytes each) and `scales` has one per block.
    pub fn new(values: &'a [i8], scales: &'a [f16], block: usize) -> Option<Self> {
        (block > 0
            && block.is_multiple_of(2)
            && values.len().is_multiple_of(block / 2)
            && scales.len() == values.len() / (block / 2))
            .then_some(Self {
                values,
                scales,
                block,
            })
    }

    /// The packed bytes.
    pub fn values(&self) -> &'a [i8] {
        self.values
    }

    /// One scale per block.
    pub fn scales(&self) -> &'a [f16] {
        self.scales
    }

    /// Weights per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Weights held (twice the bytes).
    pub fn len(&self) -> usize {
        self.values.len() * 2
    }

    /// Whether no weight is held.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The 4-bit value `q` (0 to 15) of weight `index`.
    pub fn nibble(&self, index: usize) -> u8 {
        let (b, j) = (index / self.block, index % self.block);
        let half = self.block / 2;
        let byte = self.values[b * half + j % half] as u8;
        if j < half {
            byte & 0x0F
        } else {
            byte >> 4
        }
    }

    /// Writes `(q - 8) · s` for the weights `range` into `out` (as long as `range`): whole
    /// blocks a block at a time (the portable kernels' tiles), any others weight by weight.
    pub fn dequantize_into(&self, range: core::ops::Range<usize>, out: &mut [f32]) {
        assert_eq!(out.len(), range.len(), "output as long as the range");
        let (block, half) = (self.block, self.block / 2);
        let mut done = 0;
        while done < out.len() {
            let i = range.start + done;
            let scale = self.scales[i / block].to_f32();
            if i.is_multiple_of(block) && out.len() - done >= block {
                let bytes = &self.values[i / 2..i / 2 + half];
                let (low, high) = out[done..done + block].split_at_mut(half);
                for ((l, h), &byte) in low.iter_mut().zip(high).zip(bytes) {
                    let byte = byte as u8;
                    *l = (f32::from(byte & 0x0F) - 8.0) * scale;
                    *h = (f32::from(byte >> 4) - 8.0) * scale;
                }
                done += block;
            } else {
                out[done] = (f32::from(self.nibble(i)) - 8.0) * scale;
                done += 1;
            }
        }
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

/// The largest and smallest value in `wide` (both NaN if any value is NaN), eight running lanes
/// each as in [`block_max`]; `max|w|` is the larger of `high` and `-low`.
fn block_range(wide: &[f32]) -> (f32, f32) {
    const LANES: usize = 8;
    let mut high = [f32::NEG_INFINITY; LANES];
    let mut low = [f32::INFINITY; LANES];
    let mut nan = false;
    let chunks = wide.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for ((h, l), &w) in high.iter_mut().zip(low.iter_mut()).zip(chunk) {
            nan |= w.is_nan();
            *h = if w > *h { w } else { *h };
            *l = if w < *l { w } else { *l };
        }
    }
    for &w in rest {
        nan |= w.is_nan();
        high[0] = if w > high[0] { w } else { high[0] };
        low[0] = if w < low[0] { w } else { low[0] };
    }
    if nan {
        return (f32::NAN, f32::NAN);
    }
    (
        high.iter()
            .fold(f32::NEG_INFINITY, |m, &h| if h > m { h } else { m }),
        low.iter()
            .fold(f32::INFINITY, |m, &l| if l < m { l } else { m }),
    )
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

/// Quantizes one q4 weight block into `packed` (half as long): llama.cpp's `Q4_0` rule. The
/// scale is the block's signed extreme `m` (the first value of largest magnitude) over `-8`,
/// its magnitude rounded *up* to an `f16`, so `m` maps to `-8` exactly and every `w / s` lies in
/// `[-8, 8]`; values are rounded half away from zero and clamped to `[-8, 7]`, then stored
/// plus 8. The error is within `|s| / 2`, except for values beyond `7.5 |s|` on the side
/// opposite `m`, which clamp to `7 |s|` (within `|s|`). An all-zero block has scale 0.
fn quantize_block_q4(wide: &[f32], packed: &mut [i8], nibbles: &mut [u8]) -> f16 {
    let half = wide.len() / 2;
    // One vectorised pass gives the range, hence `max|w|` and the signed extreme; only a tie
    // between `+max` and `-max` needs the first of them, found in order.
    let (high, low) = block_range(wide);
    let max = if high.is_nan() {
        f32::NAN
    } else {
        high.max(-low)
    };
    if max == 0.0 {
        packed.fill(0x88u8 as i8);
        return f16::ZERO;
    }
    let extreme = if max.is_nan() {
        f32::NAN
    } else if high == max && -low == max {
        wide.iter().copied().find(|w| w.abs() == max).unwrap_or(max)
    } else if high == max {
        high
    } else {
        low
    };
    let magnitude = f16_at_least(max / 8.0);
    let scale = if extreme > 0.0 { -magnitude } else { magnitude };
    let inverse = 1.0 / scale.to_f32();
    // Round half away from zero, clamp to [-8, 7] in `f32` (NaN to 0), truncate, plus 8: a
    // loop the compiler vectorises, as `round_block`; then the halves packed into bytes.
    for (q, &w) in nibbles.iter_mut().zip(wide) {
        let v = w * inverse;
        let r = (v + 0.5f32.copysign(v)).clamp(-8.0, 7.0);
        let r = if r.is_nan() { 0.0 } else { r };
        // SAFETY: `r` is finite and within [-8, 7], so it truncates to an i32.
        *q = (unsafe { r.to_int_unchecked::<i32>() } + 8) as u8;
    }
    let (low, high) = nibbles[..wide.len()].split_at(half);
    for ((byte, &l), &h) in packed.iter_mut().zip(low).zip(high) {
        *byte = (l | h << 4) as i8;
    }
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
pub fn quantize_q8<W: Copy + Send + Sync + Into<f32>>(values: &[W], block: usize) -> QuantWeights {
    QuantFormat::Q8.quantize(values, block)
}

/// Quantizes `values` (`f32`, `bf16` or `f16`, row-major) to q4 with blocks of `block` values
/// (llama.cpp's `Q4_0` rule and layout, see [`QuantFormat::Q4`]): per block an `f16` scale
/// `s` with `|s| = max|w| / 8` rounded up and the sign that maps the block's extreme to `-8`,
/// and 4-bit `q = clamp(round(w / s), -8, 7) + 8`; `w ≈ (q - 8) · s` within `|s| / 2` (within
/// `|s|` for values beyond `7.5 |s|` opposite the extreme). 0.5625 bytes per weight at block
/// 32. Non-finite values make their block's scale non-finite, as for q8.
///
/// # Panics
/// If `block` is 0, odd or does not divide `values.len()` (callers pick it with
/// [`q4_block_len`]).
pub fn quantize_q4<W: Copy + Send + Sync + Into<f32>>(values: &[W], block: usize) -> QuantWeights {
    QuantFormat::Q4.quantize(values, block)
}

/// A quantized weight as burn tensors: `values` (an `I8` int tensor) `[.., C / v]` with `v`
/// weights per byte ([`QuantFormat::values_per_byte`]: the int8 values for q8, the packed
/// bytes for q4) and `scales` `[.., C / block]` (one per block of `block` consecutive weights of
/// the last dimension): `f16` as quantized where the backend holds `f16` tensors, else the same
/// values in `f32`.
#[derive(Debug, Clone)]
pub struct QuantTensor<B: Backend, const D: usize> {
    /// The packed values.
    pub values: Tensor<B, D, Int>,
    /// The block scales.
    pub scales: Tensor<B, D>,
    /// How the values are packed.
    pub format: QuantFormat,
}

impl<B: Backend, const D: usize> QuantTensor<B, D> {
    /// `weights` (row-major, of shape `shape`: the weight's, not the packed values') on
    /// `device`.
    ///
    /// # Panics
    /// If `shape` does not hold `weights.len()` elements in rows of whole blocks.
    pub fn new(weights: QuantWeights, shape: [usize; D], device: &B::Device) -> Self {
        let row_len = shape[D - 1];
        assert!(
            row_len.is_multiple_of(weights.block)
                && shape.iter().product::<usize>() == weights.len(),
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
        let mut values_shape = shape;
        values_shape[D - 1] = row_len / weights.format.values_per_byte();
        Self {
            values: Tensor::from_data(
                TensorData::new(weights.values, values_shape),
                (device, DType::I8),
            ),
            scales,
            format: weights.format,
        }
    }

    /// Values per block.
    pub fn block(&self) -> usize {
        let (c, blocks) = (self.dims()[D - 1], self.scales.dims()[D - 1]);
        c.checked_div(blocks).unwrap_or(0)
    }

    /// The shape of the weight.
    pub fn dims(&self) -> [usize; D] {
        let mut dims = self.values.dims();
        dims[D - 1] *= self.format.values_per_byte();
        dims
    }

    /// The weights as an `f32` tensor, with tensor ops: `q · s`, or `(q - 8) · s` for q4 (its
    /// nibbles taken apart with float ops, which every backend has).
    pub fn dequantize(&self) -> Tensor<B, D> {
        let shape = self.dims();
        let block = self.block().max(1);
        let n = shape.iter().product::<usize>() / block;
        let values = self.values.clone().float().cast(DType::F32);
        let values = match self.format {
            QuantFormat::Q8 => values.reshape([n, block]),
            QuantFormat::Q4 => {
                // The byte's bits as 0..=255 (the int8 reads them as two's complement), then its
                // high nibble (exact: floor of a multiple of 1/16) and low one.
                let bytes = values.reshape([n, block / 2]);
                let bytes = bytes.clone() + bytes.lower_elem(0.0).float() * 256.0;
                let high = (bytes.clone() / 16.0).floor();
                let low = bytes - high.clone() * 16.0;
                Tensor::cat(vec![low, high], 1) - 8.0
            }
        };
        let scales = self.scales.clone().cast(DType::F32).reshape([n, 1]);
        (values * scales).reshape(shape)
    }

    /// Slice `index` of the first dimension, as a `D - 1`-dimensional tensor is not expressible
    /// here: the slice keeps a leading 1 (`[1, ..]`).
    pub fn narrow_first(&self, index: usize) -> Self {
        Self {
            values: self.values.clone().narrow(0, index, 1),
            scales: self.scales.clone().narrow(0, index, 1),
            format: self.format,
        }
    }

    /// The primitives, for the backend traits.
    pub fn into_primitive(self) -> QuantPrimitive<B> {
        QuantPrimitive {
            values: self.values.into_primitive(),
            scales: self.scales.into_primitive().tensor(),
            format: self.format,
        }
    }

    /// From the backend traits' primitives.
    pub fn from_primitive(primitive: QuantPrimitive<B>) -> Self {
        Self {
            values: Tensor::from_primitive(primitive.values),
            scales: Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(primitive.scales)),
            format: primitive.format,
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

    #[test]
    fn q4_block_lengths_are_even_divisors() {
        assert_eq!(q4_block_len(2048), Some(32));
        assert_eq!(q4_block_len(48), Some(24));
        assert_eq!(q4_block_len(40), Some(20));
        assert_eq!(
            q4_block_len(136),
            Some(8),
            "17 · 8: no even divisor from 10 to 32"
        );
        assert_eq!(q4_block_len(27), None, "only odd divisors");
        assert_eq!(q4_block_len(12), Some(12));
        assert_eq!(q4_block_len(6), None);
        assert_eq!(q4_block_len(0), None);
        assert_eq!(QuantFormat::Q4.block_len(48), Some(24));
        assert_eq!(QuantFormat::Q8.block_len(27), Some(27));
    }

    /// The q4 rule written value by value in `f64` (the signed extreme over -8, its magnitude
    /// rounded up to an `f16`; round half away from zero, clamp to [-8, 7], plus 8), unpacked.
    fn q4_reference(wide: &[f32]) -> (f16, Vec<u8>) {
        let max = wide.iter().fold(0.0f32, |m, &w| {
            if w.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(w.abs())
            }
        });
        if max == 0.0 {
            return (f16::ZERO, vec![8; wide.len()]);
        }
        let extreme = wide
            .iter()
            .copied()
            .find(|w| w.abs() == max)
            .unwrap_or(f32::NAN);
        let magnitude = f16_at_least(max / 8.0);
        let scale = if extreme > 0.0 { -magnitude } else { magnitude };
        let inverse = 1.0 / scale.to_f32();
        let q = wide
            .iter()
            .map(|&w| {
                let v = w * inverse;
                if v.is_nan() {
                    8
                } else {
                    (((v + 0.5f32.copysign(v)) as i32).clamp(-8, 7) + 8) as u8
                }
            })
            .collect();
        (scale, q)
    }

    #[test]
    fn the_q4_quantizer_follows_the_rule_and_packs_llama_cpp_s_layout() {
        let mut blocks: Vec<Vec<f32>> = (0..100)
            .map(|i| values(32, 0.5 + i as f32))
            .chain((4..=16).map(|n| values(2 * n, 3.0)))
            .collect();
        let mut special = values(32, 1.0);
        special[5] = 40.0; // a positive extreme: the scale is negative
        blocks.push(special.clone());
        special[5] = -40.0;
        blocks.push(special.clone());
        // Ties between +max and -max: the first of them sets the sign.
        special[9] = 40.0;
        blocks.push(special.clone());
        special[2] = 40.0;
        blocks.push(special.clone());
        special[5] = f32::NAN;
        blocks.push(special);
        blocks.push(vec![0.0; 32]);
        blocks.push((0..32).map(|i| (i as f32 - 15.5) * 1e-7).collect());
        for wide in &blocks {
            let mut packed = vec![0i8; wide.len() / 2];
            let scale = quantize_block_q4(wide, &mut packed, &mut vec![0; wide.len()]);
            let (want_scale, want_q) = q4_reference(wide);
            assert_eq!(scale.to_bits(), want_scale.to_bits(), "{wide:?}");
            let half = wide.len() / 2;
            for (j, &byte) in packed.iter().enumerate() {
                let byte = byte as u8;
                assert_eq!(byte & 0x0F, want_q[j], "low nibble {j} of {wide:?}");
                assert_eq!(byte >> 4, want_q[j + half], "high nibble {j} of {wide:?}");
            }
        }
        // The extreme maps to -8 exactly (stored 0), whichever its sign.
        let mut source = values(32, 0.1);
        source[7] = 2.0;
        let q = quantize_q4(&source, 32);
        assert!(q.scales[0].to_f32() < 0.0);
        let m = q.as_q4().unwrap();
        assert_eq!(m.nibble(7), 0);
        assert_eq!(q.dequantize()[7], 2.0);
    }

    #[test]
    fn q4_round_trip_is_within_half_a_step_or_a_step_at_the_clamped_end() {
        for (len, block) in [(96, 32), (48, 24), (36, 12)] {
            let mut source = values(len, 0.3);
            source[block..2 * block].fill(0.0);
            let q = quantize_q4(&source, block);
            assert_eq!(q.format, QuantFormat::Q4);
            assert_eq!(
                (q.values.len(), q.scales.len(), q.len()),
                (len / 2, len / block, len)
            );
            assert_eq!(q.scales[1], f16::ZERO, "an all-zero block");
            let back = q.dequantize();
            for (b, (src, got)) in source.chunks(block).zip(back.chunks(block)).enumerate() {
                let max = src.iter().fold(0.0f32, |m, w| m.max(w.abs()));
                let step = q.scales[b].to_f32().abs();
                assert!(step >= max / 8.0 && step <= max / 8.0 * (1.0 + 1.0 / 1024.0));
                for (&w, &g) in src.iter().zip(got) {
                    // Half a step, except values past 7.5 steps opposite the extreme (clamped
                    // to 7 steps): within a step.
                    let bound = if (w / q.scales[b].to_f32()) > 7.5 {
                        step
                    } else {
                        step / 2.0
                    };
                    assert!(
                        (w - g).abs() <= bound * (1.0 + 1e-5) + 1e-7,
                        "block {b}: {w} -> {g} (scale {})",
                        q.scales[b]
                    );
                }
            }
        }
        // Non-finite values poison their block only.
        let mut source = values(64, 0.1);
        source[40] = f32::NAN;
        let q = quantize_q4(&source, 32);
        assert!(q.scales[0].is_finite() && q.scales[1].is_nan());
        // 16-bit sources quantize their widened values.
        let bf: Vec<half::bf16> = values(64, 0.7)
            .iter()
            .map(|&v| half::bf16::from_f32(v))
            .collect();
        let widened: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
        assert_eq!(quantize_q4(&bf, 32), quantize_q4(&widened, 32));
    }

    #[test]
    fn q4_dequantizes_any_range_as_weight_by_weight() {
        let q = quantize_q4(&values(5 * 24, 0.6), 24);
        let m = q.as_q4().unwrap();
        let each: Vec<f32> = (0..m.len())
            .map(|i| (f32::from(m.nibble(i)) - 8.0) * m.scales()[i / 24].to_f32())
            .collect();
        assert!(each.iter().any(|&v| v != 0.0), "not a test on zeros");
        for range in [0..120, 24..72, 5..100, 30..31, 0..0, 47..120] {
            let mut out = vec![f32::NAN; range.len()];
            m.dequantize_into(range.clone(), &mut out);
            assert_eq!(out, each[range.clone()], "{range:?}");
        }
    }

    #[test]
    fn q4_slices_and_pool_chunks_give_the_whole_quantizer_s_blocks() {
        // Past one pool chunk (4 096 blocks), so the chunks' packed offsets are exercised.
        let source = values(32 * 4096 + 96, 0.4);
        let whole = quantize_q4(&source, 32);
        let mut q = vec![0i8; source.len() / 2];
        let mut scales = vec![f16::ZERO; source.len() / 32];
        QuantFormat::Q4.quantize_slice(&source, 32, &mut q, &mut scales);
        assert_eq!((q, scales), (whole.values.clone(), whole.scales.clone()));
    }

    #[cfg(feature = "flex")]
    #[test]
    fn a_q4_tensor_dequantizes_with_tensor_ops_to_the_quantizer_values() {
        use burn::backend::flex::Flex;
        use burn::backend::NdArray;
        let q = quantize_q4(&values(2 * 3 * 48, 0.2), 24);
        let want = q.dequantize();
        let tensor = QuantTensor::<Flex, 3>::new(q.clone(), [2, 3, 48], &Default::default());
        assert_eq!(tensor.format, QuantFormat::Q4);
        assert_eq!(tensor.values.dims(), [2, 3, 24], "two weights per byte");
        assert_eq!((tensor.dims(), tensor.block()), ([2, 3, 48], 24));
        let got = tensor.dequantize().into_data().to_vec::<f32>().unwrap();
        assert_eq!(got, want);
        let second = tensor
            .narrow_first(1)
            .dequantize()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(second, want[3 * 48..]);
        // A backend without f16 (scales widened to f32), bytes with the high bit set included.
        assert!(q.values.iter().any(|&b| b < 0));
        let ndarray = QuantTensor::<NdArray, 3>::new(q, [2, 3, 48], &Default::default());
        let got = ndarray.dequantize().into_data().to_vec::<f32>().unwrap();
        assert_eq!(got, want);
    }

    #[cfg(feature = "flex")]
    #[test]
    fn a_q8_tensor_dequantizes_with_tensor_ops_to_the_quantizer_values() {
        use burn::backend::flex::Flex;
        let q = quantize_q8(&values(2 * 3 * 48, 0.2), 24);
        let want = q.dequantize();
        let tensor = QuantTensor::<Flex, 3>::new(q, [2, 3, 48], &Default::default());
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
