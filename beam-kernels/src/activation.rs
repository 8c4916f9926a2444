//! Activations computed in the backend's own float precision.
//!
//! burn 0.21's default `sigmoid` (and `silu`, built on it) casts to f32 internally, so on an f64
//! backend the result has f32 precision and f64 reference or finite-difference checks of the layer
//! would be meaningless. `sigmoid(x) = (1 + tanh(x / 2)) / 2` keeps the input's precision, never
//! overflows (unlike `1 / (1 + exp(−x))`) and has the stable gradient `(1 − tanh²) / 4`.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Logistic sigmoid in the tensor's precision.
pub fn sigmoid<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.mul_scalar(0.5).tanh().add_scalar(1.0).mul_scalar(0.5)
}

/// `x · sigmoid(x)` in the tensor's precision.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() * sigmoid(x)
}

// Checked in f64 against the closed form in `tests/gradients.rs` (f64 tests live in their own
// test binary: burn 0.21 shares one device-settings entry between NdArray<f32> and NdArray<f64>,
// so the first backend used in a process fixes the float dtype for both).
