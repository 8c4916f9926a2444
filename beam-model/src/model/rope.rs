//! Rotary position embedding (transformers' `default` rope type, `rotate_half` layout).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// `cos` and `sin` tables `[T, head_dim]` for positions `start..start + len`:
/// `inv_freq_i = θ^(−2i/d)`, angles duplicated across both halves.
pub fn rope_tables<B: Backend>(
    theta: f64,
    head_dim: usize,
    start: usize,
    len: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for pos in start..start + len {
        let angles: Vec<f64> = (0..half)
            .map(|i| pos as f64 * theta.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos() as f32));
            sin.extend(angles.iter().map(|a| a.sin() as f32));
        }
    }
    let table = |v| Tensor::from_data(TensorData::new(v, [len, head_dim]), device);
    (table(cos), table(sin))
}

/// Applies RoPE to `x` (`[B, heads, T, head_dim]`) with tables `[T, head_dim]`.
pub fn apply_rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    let [_, _, _, d] = x.dims();
    let half = d / 2;
    let rotated = Tensor::cat(
        vec![
            x.clone().narrow(3, half, d - half).neg(),
            x.clone().narrow(3, 0, half),
        ],
        3,
    );
    x * cos.unsqueeze::<4>() + rotated * sin.unsqueeze::<4>()
}
