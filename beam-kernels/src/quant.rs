//! q8 weights: block-wise symmetric int8, in burn's quantization scheme.
//!
//! A weight matrix `[rows, row_len]` (row-major, the `[out, in]` layout) is cut along each row
//! into blocks of `block` consecutive values (32 where it divides the row, see
//! [`q8_block_len`]); each block keeps one `f32` scale `s = max|w| / 127` and the values
//! `q = round(w / s)` in `[-127, 127]`, so `w ≈ q · s` within `s / 2` (an all-zero block has
//! scale 0). That is llama.cpp's `Q8_0` with an `f32` instead of an `f16` scale, and burn's
//! [`QuantScheme`] `Q8S` at block level, stored natively as `i8` ([`q8_scheme`]): a q8 tensor is a
//! burn quantized tensor, made with [`TensorData::quantized`](burn::tensor::TensorData::quantized)
//! from a [`Q8Weights`].
//!
//! Bytes per weight: `1 + 4 / block` (1.125 at block 32, against 2 for `bf16` and 4 for `f32`).

use burn::tensor::quantization::{
    QuantLevel, QuantMode, QuantParam, QuantScheme, QuantStore, QuantValue,
};
use rayon::prelude::*;

use crate::host::HostWeight;

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
        .find(|block| row_len % block == 0)
}

/// burn's scheme for q8 with blocks of `block` values: `Q8S` (symmetric, `[-127, 127]`), block
/// level, values stored as native `i8`, `f32` scales.
///
/// # Panics
/// If `block` is 0 or over 255 (burn's block sizes are `u8`).
pub fn q8_scheme(block: usize) -> QuantScheme {
    assert!((1..=255).contains(&block), "q8 block of 1 to 255 values");
    QuantScheme::default()
        .with_value(QuantValue::Q8S)
        .with_level(QuantLevel::block([block as u8]))
        .with_mode(QuantMode::Symmetric)
        .with_store(QuantStore::Native)
        .with_param(QuantParam::F32)
}

/// The block length of `scheme` when it is a q8 scheme the host kernels read ([`q8_scheme`]'s:
/// `Q8S`, native `i8`, `f32` scales, one-dimensional blocks), else `None`.
pub fn q8_block_of(scheme: &QuantScheme) -> Option<usize> {
    let QuantLevel::Block(size) = scheme.level else {
        return None;
    };
    let dims: Vec<u8> = size
        .as_slice()
        .iter()
        .copied()
        .skip_while(|&d| d == 1)
        .collect();
    let block = match dims.as_slice() {
        [] => 1,
        [block] => *block as usize,
        _ => return None,
    };
    (scheme.value == QuantValue::Q8S
        && scheme.store == QuantStore::Native
        && scheme.param == QuantParam::F32)
        .then_some(block)
}

/// A borrowed q8 matrix: `values` row-major, one scale per `block` consecutive values (blocks
/// never straddle rows when rows are whole blocks, which [`q8_block_len`] guarantees).
#[derive(Debug, Clone, Copy)]
pub struct Q8Matrix<'a> {
    values: &'a [i8],
    scales: &'a [f32],
    block: usize,
}

impl<'a> Q8Matrix<'a> {
    /// `None` unless `block > 0`, `values` is whole blocks and `scales` has one per block.
    pub fn new(values: &'a [i8], scales: &'a [f32], block: usize) -> Option<Self> {
        (block > 0 && values.len() % block == 0 && scales.len() == values.len() / block).then_some(
            Self {
                values,
                scales,
                block,
            },
        )
    }

    /// The int8 values.
    pub fn values(&self) -> &'a [i8] {
        self.values
    }

    /// One scale per block.
    pub fn scales(&self) -> &'a [f32] {
        self.scales
    }

    /// Values per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Writes `q · s` for the values `range` into `out` (as long as `range`).
    pub fn dequantize_into(&self, range: core::ops::Range<usize>, out: &mut [f32]) {
        assert_eq!(out.len(), range.len(), "output as long as the range");
        for (o, i) in out.iter_mut().zip(range) {
            *o = self.values[i] as f32 * self.scales[i / self.block];
        }
    }
}

/// Owned q8 weights: what [`quantize_q8`] makes and a burn quantized tensor is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Weights {
    /// The int8 values, row-major like the source.
    pub values: Vec<i8>,
    /// One scale per block of [`Self::block`] values.
    pub scales: Vec<f32>,
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

/// Values quantized per block on rayon's pool (a chunk of blocks per task).
const QUANTIZE_CHUNK_BLOCKS: usize = 4096;

/// Quantizes `values` (`f32`, `bf16` or `f16`, row-major) to q8 with blocks of `block` values:
/// `s = max|w| / 127`, `q = round(w / s)` (0 and scale 0 for an all-zero block; a non-finite
/// value makes its block's scale non-finite, so it shows up rather than being clamped away).
///
/// # Panics
/// If `block` is 0 or does not divide `values.len()` (callers pick it with [`q8_block_len`]).
pub fn quantize_q8<W: HostWeight<f32>>(values: &[W], block: usize) -> Q8Weights {
    assert!(
        block > 0 && values.len() % block == 0,
        "{} values are not whole q8 blocks of {block}",
        values.len()
    );
    let mut q = vec![0i8; values.len()];
    let mut scales = vec![0.0f32; values.len() / block];
    let chunk = QUANTIZE_CHUNK_BLOCKS * block;
    q.par_chunks_mut(chunk)
        .zip(scales.par_chunks_mut(QUANTIZE_CHUNK_BLOCKS))
        .zip(values.par_chunks(chunk))
        .for_each(|((q, scales), values)| {
            let mut wide = vec![0.0f32; block];
            for ((q, scale), values) in q
                .chunks_exact_mut(block)
                .zip(scales.iter_mut())
                .zip(values.chunks_exact(block))
            {
                W::widen_into(values, &mut wide);
                let max = wide.iter().fold(0.0f32, |m, &w| {
                    if w.is_nan() || m.is_nan() {
                        f32::NAN
                    } else {
                        m.max(w.abs())
                    }
                });
                if max == 0.0 {
                    *scale = 0.0;
                    continue;
                }
                *scale = max / Q8_MAX;
                let inverse = 1.0 / *scale;
                for (q, &w) in q.iter_mut().zip(&wide) {
                    *q = (w * inverse).round().clamp(-Q8_MAX, Q8_MAX) as i8;
                }
            }
        });
    Q8Weights {
        values: q,
        scales,
        block,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;
    use burn::tensor::TensorData;

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
            assert_eq!(q.scales[1], 0.0, "an all-zero block");
            let back = q.dequantize();
            for (b, (src, got)) in source.chunks(block).zip(back.chunks(block)).enumerate() {
                let max = src.iter().fold(0.0f32, |m, w| m.max(w.abs()));
                assert!((q.scales[b] - max / 127.0).abs() <= 1e-6 * max);
                for (&w, &g) in src.iter().zip(got) {
                    // Half a quantization step, plus f32 rounding of q · s.
                    assert!(
                        (w - g).abs() <= q.scales[b] / 2.0 * (1.0 + 1e-5) + 1e-7,
                        "block {b}: {w} -> {g} (scale {})",
                        q.scales[b]
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

    #[cfg(feature = "flex")]
    #[test]
    fn the_scheme_round_trips_through_a_burn_quantized_tensor() {
        use burn::backend::flex::Flex;
        use burn::tensor::Tensor;
        let q = quantize_q8(&values(2 * 48, 0.2), 24);
        let data = TensorData::quantized(q.values.clone(), [2, 48], q8_scheme(24), &q.scales);
        let burn::tensor::DType::QFloat(scheme) = data.dtype else {
            panic!("a quantized dtype")
        };
        assert_eq!(q8_block_of(&scheme), Some(24));
        let tensor = Tensor::<Flex, 2>::from_data(data, &Default::default());
        let dequantized = tensor.dequantize().into_data().to_vec::<f32>().unwrap();
        assert_eq!(dequantized, q.dequantize());
        assert_eq!(q8_block_of(&QuantScheme::default()), None);
    }
}
