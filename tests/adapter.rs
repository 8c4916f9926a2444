//! BEAM adapters on real (tiny) checkpoints: a fresh adapter reproduces top-K exactly, a trained
//! one skips experts; save → load round-trips exactly, atomically, and mismatches are typed errors.

mod common;

use beam_model::model::generate::{generate, GenerateConfig};
use beam_model::model::load::load_model;
use beam_model::model::{HiddenStates, MaskMode, ModelError, MoeLm};
use beam_model::BeamMaskConfig;
use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use common::{random_adapter, repo_root, values};

type B = NdArray<f32>;

fn model(family: &str) -> MoeLm<B> {
    load_model::<B>(
        repo_root().join(format!("assets/models/tiny-{family}")),
        &Default::default(),
    )
    .unwrap()
}

fn ids(tokens: &[i64]) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(tokens.to_vec(), [1, tokens.len()]),
        &Default::default(),
    )
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "beam-adapter-{name}-{}.safetensors",
        std::process::id()
    ))
}

#[test]
fn fresh_adapter_is_exactly_top_k() {
    for family in common::MODELS {
        let base = model(family);
        let x = ids(&[3, 14, 15, 92, 65]);
        let top_k = base.forward(x.clone(), None, MaskMode::TopK, HiddenStates::Skip);
        let beam = base
            .enable_beam(BeamMaskConfig::new(), &Default::default())
            .unwrap();
        assert!(beam.has_beam());
        let out = beam.forward(x, None, MaskMode::Learned, HiddenStates::Skip);
        assert_eq!(out.kept_pairs(), top_k.kept_pairs());
        assert_eq!(values(out.logits), values(top_k.logits), "{family}");
    }
}

#[test]
fn adapter_round_trips_and_skips_experts() {
    let path = temp("roundtrip");
    let beam = random_adapter(model("qwen2_moe"), 3);
    beam.save_beam_adapter(&path).unwrap();
    let dir = path.parent().unwrap();
    let stray: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name().to_string_lossy().contains(&format!(
                "beam-adapter-roundtrip-{}.safetensors.tmp",
                std::process::id()
            ))
        })
        .collect();
    assert!(stray.is_empty(), "no temporary file left behind");

    let loaded = model("qwen2_moe")
        .load_beam_adapter(&path, &Default::default())
        .unwrap();
    let x = ids(&[3, 14, 15, 92, 65, 35, 89, 79]);
    let a = beam.forward(x.clone(), None, MaskMode::Learned, HiddenStates::Skip);
    let b = loaded.forward(x.clone(), None, MaskMode::Learned, HiddenStates::Skip);
    let (kept, top_k_pairs) = (b.kept_pairs(), 8 * 2 * 2);
    assert_eq!(values(a.logits), values(b.logits));
    assert!(
        kept > 0 && kept < top_k_pairs,
        "kept {kept} of {top_k_pairs}"
    );

    // Adapters without the routing-weight input (as written before it existed) load without it.
    let device = Default::default();
    let plain = model("qwen2_moe")
        .enable_beam(BeamMaskConfig::new().with_weight_feature(false), &device)
        .unwrap();
    let plain_path = dir.join(format!(
        "beam-adapter-plain-{}.safetensors",
        std::process::id()
    ));
    plain.save_beam_adapter(&plain_path).unwrap();
    let reloaded = model("qwen2_moe")
        .load_beam_adapter(&plain_path, &device)
        .unwrap();
    let routers: Vec<_> = reloaded
        .moe_layers()
        .map(|m| m.mask_router.as_ref().unwrap().weight_scale.is_none())
        .collect();
    assert_eq!(routers, vec![true, true]);
    std::fs::remove_file(plain_path).ok();

    // A higher threshold keeps fewer; generation reports fewer experts per token than K.
    let strict = loaded.with_threshold(0.8).unwrap();
    assert!(
        strict
            .forward(x, None, MaskMode::Learned, HiddenStates::Skip)
            .kept_pairs()
            < kept
    );
    let generation = generate(
        &strict,
        &[3, 14, 15],
        &GenerateConfig {
            max_new_tokens: 6,
            ..Default::default()
        },
    );
    assert!(generation.mean_active_experts() < 2.0);
    std::fs::remove_file(path).ok();
}

#[test]
fn mismatched_adapters_are_typed_errors() {
    let path = temp("mismatch");
    random_adapter(model("qwen3_moe"), 4)
        .save_beam_adapter(&path)
        .unwrap();
    // Wrong family.
    let err = model("olmoe")
        .load_beam_adapter(&path, &Default::default())
        .unwrap_err();
    assert!(matches!(err, ModelError::Adapter { .. }), "{err}");
    assert!(err.to_string().contains("qwen3_moe"), "{err}");
    // Not an adapter at all (the base checkpoint itself).
    let base = repo_root().join("assets/models/tiny-qwen3_moe/model.safetensors");
    let err = model("qwen3_moe")
        .load_beam_adapter(&base, &Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("not a BEAM adapter"), "{err}");
    // Missing file.
    let err = model("qwen3_moe")
        .load_beam_adapter("/nonexistent/adapter.safetensors", &Default::default())
        .unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }));
    // No adapter to save.
    let err = model("qwen3_moe")
        .save_beam_adapter(temp("none"))
        .unwrap_err();
    assert!(err.to_string().contains("no mask router"), "{err}");
    assert!(model("qwen3_moe").with_threshold(0.7).is_err());
    std::fs::remove_file(path).ok();
}
