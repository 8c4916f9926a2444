#![doc = include_str!("../README.md")]
//!
//! This facade re-exports [`beam_model`] so the workspace's top-level `examples/` and `tests/`
//! build as one package.

pub use beam_model::*;

/// The default CUDA device, checked by running one small operation on it.
///
/// Without a usable GPU or driver, burn 0.21's CUDA backend panics on a device thread
/// ("Unable to dynamically load the cuda shared library"); this catches that (silencing the panic
/// message) and returns one clear error instead.
#[cfg(feature = "cuda")]
pub fn cuda_device() -> Result<burn::backend::cuda::CudaDevice, String> {
    use burn::backend::Cuda;
    use burn::tensor::Tensor;
    let device = burn::backend::cuda::CudaDevice::default();
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        let t = Tensor::<Cuda, 1>::from_floats([1.0, 2.0], &device);
        t.sum().into_scalar()
    });
    std::panic::set_hook(previous_hook);
    match probe {
        Ok(3.0) => Ok(device),
        Ok(sum) => Err(format!(
            "CUDA device returned a wrong result ({sum} for 1 + 2)"
        )),
        Err(_) => Err(
            "no usable CUDA device (no NVIDIA GPU or driver found); use --backend ndarray or wgpu"
                .into(),
        ),
    }
}
