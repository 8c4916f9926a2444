//! The same checkpoints on ndarray and on wgpu give the same logits (1e-4) and the same greedy
//! tokens. In CI wgpu runs on the CPU through Mesa's lavapipe (`.ci/run` installs
//! `mesa-vulkan-drivers`). Without a wgpu adapter these tests fail with a clear message: they never
//! skip.
#![cfg(feature = "wgpu")]

mod common;

use beam_model::model::generate::{generate, GenerateConfig};
use beam_model::model::load::load_model;
use beam_model::model::{MaskMode, MoeLm};
use beam_model::MoeBackend;
use burn::backend::{NdArray, Wgpu};
use burn::tensor::{Int, Tensor, TensorData};
use common::{assert_close, repo_root, values};

fn load<B: MoeBackend>(family: &str, device: &B::Device) -> MoeLm<B> {
    load_model::<B>(
        repo_root().join(format!("assets/models/tiny-{family}")),
        device,
    )
    .unwrap()
}

fn ids<B: MoeBackend>(tokens: &[i64], device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(tokens.to_vec(), [1, tokens.len()]), device)
}

/// The default wgpu device, or a loud failure naming the fix.
fn wgpu_device() -> burn::backend::wgpu::WgpuDevice {
    let device = burn::backend::wgpu::WgpuDevice::default();
    let probe = std::panic::catch_unwind(|| {
        Tensor::<Wgpu, 1>::from_floats([1.0, 2.0], &device)
            .sum()
            .into_scalar()
    });
    match probe {
        Ok(3.0) => device,
        Ok(other) => panic!("wgpu adapter computed 1 + 2 = {other}"),
        Err(_) => panic!(
            "no wgpu adapter: install a Vulkan driver (CPU: `apt-get install mesa-vulkan-drivers libvulkan1`)"
        ),
    }
}

const TOKENS: [i64; 9] = [3, 141, 59, 26, 53, 58, 97, 93, 23];

#[test]
fn logits_agree_with_ndarray() {
    let device = wgpu_device();
    for family in ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral"] {
        let cpu = load::<NdArray>(family, &Default::default());
        let gpu = load::<Wgpu>(family, &device);
        let expected = values(
            cpu.forward(
                ids::<NdArray>(&TOKENS, &Default::default()),
                None,
                MaskMode::TopK,
                false,
            )
            .logits,
        );
        let got = values(
            gpu.forward(ids::<Wgpu>(&TOKENS, &device), None, MaskMode::TopK, false)
                .logits,
        );
        assert_close(
            &got,
            &expected,
            1e-4,
            &format!("{family}: wgpu vs ndarray logits"),
        );
    }
}

#[test]
fn cached_greedy_generation_agrees_with_ndarray() {
    let device = wgpu_device();
    let config = GenerateConfig {
        max_new_tokens: 6,
        ..GenerateConfig::default()
    };
    let cpu = generate(
        &load::<NdArray>("mixtral", &Default::default()),
        &[3, 141, 59, 26],
        &config,
    );
    let gpu = generate(
        &load::<Wgpu>("mixtral", &device),
        &[3, 141, 59, 26],
        &config,
    );
    assert_eq!(gpu.ids, cpu.ids);
    assert_eq!(gpu.kept_pairs, cpu.kept_pairs);
}
