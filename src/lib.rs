#![doc = include_str!("../README.md")]
//!
//! This facade re-exports [`beam_model`] so the workspace's top-level `examples/` and `tests/`
//! build as one package.

pub use beam_model::*;

/// Runs `1 + 2` on `device` with the panic message silenced: burn 0.21's GPU runtimes panic on a
/// device thread when there is no GPU, driver or adapter, and this turns that into `Err(())`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn probe<B: burn::tensor::backend::Backend>(device: &B::Device) -> Result<Result<(), f32>, ()> {
    use burn::tensor::{ElementConversion, Tensor};
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let sum = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Tensor::<B, 1>::from_floats([1.0, 2.0], device)
            .sum()
            .into_scalar()
            .elem::<f32>()
    }));
    std::panic::set_hook(previous_hook);
    sum.map(|sum| if sum == 3.0 { Ok(()) } else { Err(sum) })
        .map_err(|_| ())
}

/// The default wgpu device, checked once by running one small operation on it.
///
/// Without a usable adapter (no Vulkan/Metal/DX12 driver), burn 0.21's wgpu runtime panics on a
/// device thread ("No possible adapter available for backend"); this returns one clear error
/// instead.
#[cfg(feature = "wgpu")]
pub fn wgpu_device() -> Result<burn::backend::wgpu::WgpuDevice, String> {
    let device = burn::backend::wgpu::WgpuDevice::default();
    match probe::<burn::backend::Wgpu>(&device) {
        Ok(Ok(())) => Ok(device),
        Ok(Err(sum)) => Err(format!(
            "the wgpu adapter returned a wrong result ({sum} for 1 + 2)"
        )),
        Err(()) => Err(
            "no usable wgpu adapter (no Vulkan, Metal or DX12 driver found; on a CPU-only Linux \
             machine install mesa-vulkan-drivers); use --backend flex or ndarray"
                .into(),
        ),
    }
}

/// The default CUDA device, checked once by running one small operation on it.
///
/// Without a usable GPU or driver, burn 0.21's CUDA backend panics on a device thread
/// ("Unable to dynamically load the cuda shared library"); this returns one clear error instead.
#[cfg(feature = "cuda")]
pub fn cuda_device() -> Result<burn::backend::cuda::CudaDevice, String> {
    let device = burn::backend::cuda::CudaDevice::default();
    match probe::<burn::backend::Cuda>(&device) {
        Ok(Ok(())) => Ok(device),
        Ok(Err(sum)) => Err(format!(
            "the CUDA device returned a wrong result ({sum} for 1 + 2)"
        )),
        Err(()) => Err(
            "no usable CUDA device (no NVIDIA GPU or driver found); use --backend flex, ndarray or wgpu"
                .into(),
        ),
    }
}
