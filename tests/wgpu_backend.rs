//! The same checkpoints on ndarray and on wgpu give the same logits (1e-4) and the same greedy
//! tokens. In CI wgpu runs on the CPU through Mesa's lavapipe (`.ci/run` installs
//! `mesa-vulkan-drivers`). Without a wgpu adapter these tests fail with a clear message: they never
//! skip.
#![cfg(feature = "wgpu")]

mod common;

use beam_model::model::generate::{generate, GenerateConfig};
use beam_model::model::load::load_model;
use beam_model::model::{HiddenStates, MaskMode, MoeLm};
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

/// The default wgpu device (the CLI's probe), or a loud failure naming the fix.
fn wgpu_device() -> burn::backend::wgpu::WgpuDevice {
    beam::wgpu_device().unwrap_or_else(|err| panic!("{err}"))
}

const TOKENS: [i64; 9] = [3, 141, 59, 26, 53, 58, 97, 93, 23];

/// The top-K logits of [`TOKENS`].
fn top_k_logits<B: MoeBackend>(model: &MoeLm<B>, device: &B::Device) -> Vec<f64> {
    let out = model.forward(
        ids::<B>(&TOKENS, device),
        None,
        MaskMode::TopK,
        HiddenStates::Skip,
    );
    values(out.logits)
}

#[test]
fn logits_agree_with_ndarray() {
    let device = wgpu_device();
    for family in common::MODELS {
        let cpu = load::<NdArray>(family, &Default::default());
        let gpu = load::<Wgpu>(family, &device);
        let expected = top_k_logits(&cpu, &Default::default());
        let got = top_k_logits(&gpu, &device);
        assert_close(
            &got,
            &expected,
            1e-4,
            &format!("{family}: wgpu vs ndarray logits"),
        );
    }
}

/// A 100-token prompt: T · K = 300 routed pairs on 8 experts, the cubecl kernels' prefill
/// (tiled) regime (above 4 pairs per expert), where [`TOKENS`] is the GEMV regime.
fn long_prompt() -> Vec<i64> {
    let mut rng = common::Rng::new(31);
    (0..100).map(|_| rng.below(300) as i64).collect()
}

#[test]
fn beam_adapters_and_long_prompts_agree_with_ndarray() {
    use beam_kernels::Regime;
    let device = wgpu_device();
    let prompt = long_prompt();
    for family in common::MODELS {
        let cpu = common::random_adapter(load::<NdArray>(family, &Default::default()), 7);
        let gpu = common::random_adapter(load::<Wgpu>(family, &device), 7);
        let (experts, top_k) = (cpu.config().moe.num_experts, cpu.config().moe.top_k);
        assert_eq!(
            Regime::from_shape(prompt.len(), top_k, experts),
            Regime::Prefill,
            "{family}: the long prompt takes the prefill kernels"
        );
        for (tokens, what) in [(&TOKENS[..], "short prompt"), (&prompt[..], "long prompt")] {
            for mode in [MaskMode::Learned, MaskMode::TopK] {
                let (expected, cpu_kept) = forward(&cpu, tokens, mode, &Default::default());
                let (got, gpu_kept) = forward(&gpu, tokens, mode, &device);
                let what = format!("{family}, {what}, {mode:?}");
                assert_eq!(gpu_kept, cpu_kept, "{what}: kept pairs");
                let all = tokens.len() * top_k * cpu.moe_layers().count();
                if matches!(mode, MaskMode::Learned) {
                    assert!(cpu_kept > 0 && cpu_kept < all, "{what}: a partial mask");
                }
                assert_close(&got, &expected, 1e-4, &what);
            }
        }
    }
}

/// Logits and kept (token, expert) pairs over all MoE layers.
fn forward<B: MoeBackend>(
    model: &MoeLm<B>,
    tokens: &[i64],
    mode: MaskMode,
    device: &B::Device,
) -> (Vec<f64>, usize) {
    let out = model.forward(ids::<B>(tokens, device), None, mode, HiddenStates::Skip);
    let kept = out.routing.iter().map(|f| f.kept_pairs()).sum();
    (values(out.logits), kept)
}

/// A shipped tiny model, with a seeded random BEAM adapter when `beam`.
fn model<B: MoeBackend>(family: &str, beam: bool, device: &B::Device) -> MoeLm<B> {
    let model = load::<B>(family, device);
    if beam {
        common::random_adapter(model, 7)
    } else {
        model
    }
}

#[test]
fn cached_generation_agrees_with_ndarray_on_every_family() {
    let device = wgpu_device();
    let config = GenerateConfig {
        max_new_tokens: 6,
        ..GenerateConfig::default()
    };
    let prompt: Vec<u32> = long_prompt().iter().map(|&t| t as u32).collect();
    for family in common::MODELS {
        for beam in [false, true] {
            for prompt in [&[3, 141, 59, 26][..], &prompt[..]] {
                let cpu = generate(
                    &model::<NdArray>(family, beam, &Default::default()),
                    prompt,
                    &config,
                );
                let gpu = generate(&model::<Wgpu>(family, beam, &device), prompt, &config);
                let what = format!("{family}, BEAM {beam}, {} prompt tokens", prompt.len());
                assert_eq!(gpu.ids, cpu.ids, "{what}");
                assert_eq!(gpu.kept_pairs, cpu.kept_pairs, "{what}");
            }
        }
    }
}

/// A BEAM layer with the same seeded weights on any backend.
fn seeded_layer<B: MoeBackend>(device: &B::Device) -> beam_model::BeamMoe<B> {
    use burn::module::Param;
    let (h, i, e, k) = (16, 12, 8, 3);
    let mut layer = beam_model::BeamMoeConfig::new(h, i, e, k).init::<B>(device);
    let mut rng = common::Rng::new(23);
    layer.router.weight = Param::from_tensor(rng.tensor([e, h], 0.5, device));
    layer.experts.gate_up = rng.tensor([e, 2 * i, h], 0.4, device).into();
    layer.experts.down = rng.tensor([e, h, i], 0.4, device).into();
    let mask_router = layer.mask_router.as_mut().unwrap();
    mask_router.proj.weight = Param::from_tensor(rng.tensor([h, e], 1.0, device));
    mask_router.proj.bias = Some(Param::from_tensor(rng.tensor([e], 0.5, device)));
    layer
}

/// Training on wgpu: under `Autodiff` the grouped experts run beam-model's reference path (burn
/// tensor ops; see `MoeBackend`), so every gradient — input, experts, base router and the mask
/// router's straight-through gradient — must equal ndarray's.
#[test]
fn layer_gradients_on_autodiff_wgpu_match_ndarray() {
    use burn::backend::Autodiff;
    fn grads<B: burn::tensor::backend::AutodiffBackend + MoeBackend>(
        device: &B::Device,
    ) -> Vec<(&'static str, Vec<f64>)> {
        let layer = seeded_layer::<B>(device);
        let mut rng = common::Rng::new(29);
        let x = rng.tensor::<B, 3>([2, 9, 16], 1.0, device).require_grad();
        let upstream = rng.tensor::<B, 3>([2, 9, 16], 1.0, device);
        let out = layer.forward(x.clone());
        let mask = values(out.facts.mask.clone());
        assert!(
            mask.contains(&0.0) && mask.contains(&1.0),
            "kept and masked slots"
        );
        let grads = (out.output * upstream).sum().backward();
        let mask_router = layer.mask_router.as_ref().unwrap();
        vec![
            ("x", values(x.grad(&grads).unwrap())),
            (
                "gate_up",
                values(layer.experts.gate_up.val().grad(&grads).unwrap()),
            ),
            (
                "down",
                values(layer.experts.down.val().grad(&grads).unwrap()),
            ),
            (
                "router",
                values(layer.router.weight.val().grad(&grads).unwrap()),
            ),
            (
                "mask_router",
                values(mask_router.proj.weight.val().grad(&grads).unwrap()),
            ),
        ]
    }
    let expected = grads::<Autodiff<NdArray>>(&Default::default());
    let actual = grads::<Autodiff<Wgpu>>(&wgpu_device());
    for ((name, want), (_, got)) in expected.iter().zip(&actual) {
        assert!(
            want.iter().any(|v| v.abs() > 1e-3),
            "{name}: a gradient with signal"
        );
        assert_close(
            got,
            want,
            1e-4,
            &format!("{name} gradient, wgpu vs ndarray"),
        );
    }
}

#[test]
fn sixteen_bit_checkpoints_agree_with_flex() {
    // A bf16 / f16 checkpoint loaded with default options: wgpu holds the stored precision where
    // its adapter has it (its kernels then take activations at that precision), else f32 (the
    // stored values widened exactly); Flex holds the stored precision with f32 activations.
    use beam_model::checkpoint::WeightDtype;
    use beam_model::model::load::{load_model_with, LoadOptions};
    use burn::backend::Flex;
    use safetensors::Dtype;

    let device = wgpu_device();
    for dtype in [Dtype::BF16, Dtype::F16] {
        let ck = common::Converted::new("olmoe", dtype);
        let cpu =
            load_model_with::<Flex>(&ck.0, &Default::default(), &LoadOptions::default()).unwrap();
        let gpu = load_model_with::<Wgpu>(&ck.0, &device, &LoadOptions::default()).unwrap();
        let stored = WeightDtype::of_stored(dtype).unwrap();
        assert_eq!(cpu.weight_dtype(), stored);
        let held = gpu.weight_dtype();
        assert!(held == stored || held == WeightDtype::F32, "{held}");
        let expected = top_k_logits(&cpu, &Default::default());
        let got = top_k_logits(&gpu, &device);
        // f32 on wgpu: f32 rounding only. 16-bit on wgpu: activations rounded to 16 bits in the
        // expert kernels (bf16 keeps 8 mantissa bits).
        let tolerance = match held {
            WeightDtype::F32 => 1e-4,
            WeightDtype::F16 => 1e-2,
            WeightDtype::BF16 => 5e-2,
        };
        eprintln!("{dtype:?} checkpoint: wgpu holds {held}");
        assert_close(
            &got,
            &expected,
            tolerance,
            &format!("{dtype:?}: wgpu ({held}) vs flex"),
        );
    }
}
