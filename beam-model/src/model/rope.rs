//! Rotary position embedding: transformers' `default` and `yarn` frequencies, applied in the
//! `rotate_half` layout (pairs `(i, i + d/2)`) or, for DeepSeek, on interleaved pairs `(2i, 2i+1)`.

use beam_kernels::reference::rotate_half;
use beam_kernels::KvCacheBackend;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::config::RopeScaling;

impl RopeScaling {
    /// The `dim / 2` inverse frequencies for RoPE base `theta` over `dim` rotated dimensions, as
    /// transformers' `_compute_default_rope_parameters` / `_compute_yarn_parameters` compute them.
    pub fn inv_freq(&self, theta: f64, dim: usize) -> Vec<f64> {
        let half = dim / 2;
        let original: Vec<f64> = (0..half)
            .map(|i| theta.powf(-((2 * i) as f64) / dim as f64))
            .collect();
        let RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } = *self
        else {
            return original;
        };
        // The dimension whose wavelength makes `rotations` turns over the original context.
        let correction_dim = |rotations: f64| {
            dim as f64
                * (original_max_position_embeddings as f64
                    / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
        if truncate {
            low = low.floor();
            high = high.ceil();
        }
        let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
        if low == high {
            high += 0.001;
        }
        original
            .iter()
            .enumerate()
            .map(|(i, &extrapolated)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                extrapolated / factor * (1.0 - keep) + extrapolated * keep
            })
            .collect()
    }

    /// The scale of cos and sin (`attention_factor`; 1 for `default`).
    pub fn attention_factor(&self) -> f64 {
        match *self {
            RopeScaling::Default => 1.0,
            RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor,
        }
    }
}

/// `cos` and `sin` tables `[T, dim]` for positions `start..start + len`: angles
/// `pos · inv_freq_i` (from `scaling`, base `theta`) duplicated across both halves, scaled by the
/// rope type's attention factor.
pub fn rope_tables<B: Backend>(
    theta: f64,
    scaling: &RopeScaling,
    dim: usize,
    start: usize,
    len: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let inv_freq = scaling.inv_freq(theta, dim);
    let scale = scaling.attention_factor();
    let mut cos = Vec::with_capacity(len * dim);
    let mut sin = Vec::with_capacity(len * dim);
    for pos in start..start + len {
        for _ in 0..2 {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push((angle.cos() * scale) as f32);
                sin.push((angle.sin() * scale) as f32);
            }
        }
    }
    let table = |v| Tensor::from_data(TensorData::new(v, [len, dim]), device);
    (table(cos), table(sin))
}

/// Applies RoPE to `x` (`[B, heads, T, d]`) with tables `[T, d]`, rotating pairs `(i, i + d/2)`.
pub fn apply_rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    rotate_half(x, cos.unsqueeze::<4>(), sin.unsqueeze::<4>())
}

/// [`apply_rope`] on `x` laid out tokens first (`[B, T, heads, d]`, as a projection's output
/// reshaped, before its heads are swapped in front): the same values, computed on a contiguous
/// tensor instead of a strided view of one, by the backend's
/// [`KvCacheBackend::kv_rope`](beam_kernels::KvCacheBackend::kv_rope) (one pass on Flex).
pub fn apply_rope_tokens_first<B: KvCacheBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    beam_kernels::kv_rope(x, cos, sin)
}

/// RoPE on interleaved pairs `(2i, 2i+1)` of `x` (`[B, heads, T, d]`), each rotated by frequency
/// `i` (DeepSeek). The result is laid out de-interleaved (`[rotated evens, rotated odds]`), as
/// transformers' `apply_rotary_pos_emb_interleave` returns it: queries and keys get the same
/// layout, so their dot products are those of the interleaved rotation.
pub fn apply_rope_interleaved<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let deinterleaved = x
        .reshape([b * h * t, d / 2, 2])
        .swap_dims(1, 2)
        .reshape([b, h, t, d]);
    apply_rope(deinterleaved, cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::NdArray<f64>;

    fn yarn(factor: f64, original: usize, truncate: bool) -> RopeScaling {
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.0,
            truncate,
            mscale_all_dim: 0.0,
        }
    }

    #[test]
    fn yarn_keeps_fast_dimensions_and_interpolates_slow_ones() {
        let (theta, dim) = (10_000.0, 64);
        let plain = RopeScaling::Default.inv_freq(theta, dim);
        let scaled = yarn(8.0, 64, true).inv_freq(theta, dim);
        // High frequencies (many turns over the original context) are kept, the lowest divided
        // by `factor`, and the ones between blended monotonically.
        assert_eq!(scaled[0], plain[0]);
        let last = dim / 2 - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
        let ratio: Vec<f64> = plain.iter().zip(&scaled).map(|(p, s)| s / p).collect();
        assert!(ratio.windows(2).all(|w| w[1] <= w[0] + 1e-15), "{ratio:?}");
        assert!(ratio
            .iter()
            .any(|r| *r < 1.0 - 1e-3 && *r > 1.0 / 8.0 + 1e-3));
        // Untruncated boundaries move the ramp (a different, still monotone, blend).
        assert_ne!(yarn(8.0, 64, false).inv_freq(theta, dim), scaled);
    }

    #[test]
    fn interleaved_rope_equals_halves_rope_on_deinterleaved_input() {
        let device = Default::default();
        let d = 8;
        let values: Vec<f64> = (0..2 * d).map(|i| (i as f64 * 0.37).sin() + 0.1).collect();
        let x = Tensor::<B, 4>::from_data(TensorData::new(values.clone(), [1, 1, 2, d]), &device);
        let (cos, sin) = rope_tables::<B>(100.0, &RopeScaling::Default, d, 3, 2, &device);
        let out: Vec<f64> = apply_rope_interleaved(x, cos, sin)
            .into_data()
            .convert::<f64>()
            .to_vec()
            .unwrap();
        // Reference: rotate each interleaved pair (x_{2i}, x_{2i+1}) by pos · θ^(−2i/d).
        for t in 0..2 {
            let pos = (3 + t) as f64;
            for i in 0..d / 2 {
                let a = pos * 100f64.powf(-((2 * i) as f64) / d as f64);
                let (x0, x1) = (values[t * d + 2 * i], values[t * d + 2 * i + 1]);
                let (r0, r1) = (x0 * a.cos() - x1 * a.sin(), x1 * a.cos() + x0 * a.sin());
                assert!((out[t * d + i] - r0).abs() < 1e-6, "t {t} i {i}");
                assert!((out[t * d + d / 2 + i] - r1).abs() < 1e-6, "t {t} i {i}");
            }
        }
    }

    #[test]
    fn tokens_first_rope_equals_rope_on_the_heads_first_layout() {
        let device = Default::default();
        let [b, t, h, d] = [2, 3, 4, 8];
        let values: Vec<f64> = (0..b * t * h * d)
            .map(|i| (i as f64 * 0.37).sin() + 0.1)
            .collect();
        let x = Tensor::<B, 4>::from_data(TensorData::new(values, [b, t, h, d]), &device);
        let (cos, sin) = rope_tables::<B>(100.0, &RopeScaling::Default, d, 5, t, &device);
        let want = apply_rope(x.clone().swap_dims(1, 2), cos.clone(), sin.clone());
        let got = apply_rope_tokens_first(x.clone(), cos, sin).swap_dims(1, 2);
        // The same operations on the same values: equal, and a rotation (not the input).
        assert_eq!(got.to_data(), want.to_data());
        let moved = (got - x.swap_dims(1, 2)).abs().max().into_scalar();
        assert!(moved > 0.1, "rotated: {moved}");
    }
}
