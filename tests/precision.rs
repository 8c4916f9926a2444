//! Weights held in the checkpoint's precision (issue 14): bf16 / f16 checkpoints of every family
//! and layout (sharded per-expert Mixtral, fused OLMoE, Qwen2-MoE with a shared expert, Qwen3-MoE)
//! load onto burn's Flex backend without widening, hold exactly the stored values, and run with
//! `f32` activations to within `f32` rounding of an `f64` computation from the same stored values
//! (the checkpoint loaded onto `NdArray<f64>`, where every 16-bit value widens exactly).

mod common;

use std::path::Path;

use beam_model::checkpoint::{TensorStore, WeightDtype};
use beam_model::model::load::{load_model, load_model_with, LoadOptions};
use beam_model::model::{HiddenStates, MaskMode, ModelError, MoeLm};
use beam_model::MoeBackend;
use burn::backend::{Flex, NdArray};
use burn::tensor::{DType, Int, Tensor, TensorData};
use common::{max_rel, repo_root, Converted};
use safetensors::Dtype;

const FAMILIES: [&str; 4] = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"];

fn ids<B: MoeBackend>() -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(vec![5i64, 17, 42, 7, 3, 11], [1, 6]),
        &Default::default(),
    )
}

fn logits<B: MoeBackend>(model: &MoeLm<B>) -> Vec<f64> {
    model
        .forward(ids::<B>(), None, MaskMode::TopK, HiddenStates::Skip)
        .logits
        .into_data()
        .convert::<f64>()
        .into_vec()
        .unwrap()
}

fn flex(dir: &Path, dtype: Option<WeightDtype>) -> MoeLm<Flex> {
    load_model_with::<Flex>(
        dir,
        &Default::default(),
        &LoadOptions {
            dtype,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn sixteen_bit_checkpoints_are_held_as_stored_and_match_an_f64_run_of_the_same_values() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let held = WeightDtype::of_stored(dtype).unwrap();
        for family in FAMILIES {
            let ck = Converted::new(family, dtype);
            let model = flex(&ck.0, None);
            assert_eq!(model.weight_dtype(), held, "{family}: kept as stored");
            // The embeddings hold exactly the stored values.
            let store = TensorStore::open_dir(&ck.0).unwrap();
            let embed = model.embed.weight.val();
            assert_eq!(embed.dtype(), held.dtype());
            let stored = store
                .f32_values("model.embed_tokens.weight", &embed.dims())
                .unwrap();
            let in_memory: Vec<f32> = embed.into_data().convert::<f32>().into_vec().unwrap();
            assert_eq!(in_memory, stored, "{family} {dtype:?}");

            let reference =
                logits(&load_model::<NdArray<f64>>(&ck.0, &Default::default()).unwrap());
            assert!(
                reference.iter().any(|v| v.abs() > 1e-2),
                "not a test on zeros"
            );
            let got = logits(&model);
            // f32 activations and accumulation against f64 from the same weights.
            let err = max_rel(&got, &reference);
            assert!(
                err <= 2e-5,
                "{family} {dtype:?}: max relative error {err:e}"
            );
            // Holding the same values widened to f32 gives the same logits bit for bit: the
            // host kernels widen each 16-bit weight exactly and sum in the same order.
            assert_eq!(
                logits(&flex(&ck.0, Some(WeightDtype::F32))),
                got,
                "{family} {dtype:?}: 16-bit held vs widened"
            );
        }
    }
}

/// A model's large weights as f32 values: embeddings and every MoE layer's stacked experts.
fn large_weights(model: &MoeLm<Flex>) -> Vec<Vec<f32>> {
    let mut weights = vec![model
        .embed
        .weight
        .val()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap()];
    for moe in model.moe_layers() {
        for w in [moe.experts.gate_up.val(), moe.experts.down.val()] {
            assert_eq!(w.dtype(), model.embed.weight.val().dtype());
            weights.push(w.into_data().convert::<f32>().into_vec().unwrap());
        }
    }
    weights
}

#[test]
fn an_f32_checkpoint_held_in_bf16_holds_what_a_bf16_file_stores() {
    // --dtype bf16 on an f32 checkpoint rounds each large weight once, to what a bf16 file
    // stores (per-expert tensors converted into their stacked buffer, and fused ones); norms,
    // biases and routers stay f32, so the logits move by bf16 rounding of the weights only.
    for family in ["mixtral", "olmoe"] {
        let original = repo_root().join(format!("assets/models/tiny-{family}"));
        let stored = Converted::new(family, Dtype::BF16);
        let rounded = flex(&original, Some(WeightDtype::BF16));
        let widened = flex(&original, None);
        assert_eq!(rounded.weight_dtype(), WeightDtype::BF16);
        assert_eq!(widened.weight_dtype(), WeightDtype::F32, "kept as stored");
        assert_eq!(
            large_weights(&rounded),
            large_weights(&flex(&stored.0, None)),
            "{family}"
        );
        let moved = max_rel(&logits(&rounded), &logits(&widened));
        assert!(
            moved > 0.0 && moved < 0.05,
            "{family}: bf16 moved the logits by {moved:e}"
        );
    }
}

#[test]
fn a_backend_that_cannot_hold_16_bit_weights_widens_them_or_says_so() {
    let ck = Converted::new("qwen3_moe", Dtype::BF16);
    let device = Default::default();
    // Default: ndarray holds f32 (the stored values, widened exactly).
    let model = load_model_with::<NdArray>(&ck.0, &device, &LoadOptions::default()).unwrap();
    assert_eq!(model.weight_dtype(), WeightDtype::F32);
    assert_eq!(model.embed.weight.val().dtype(), DType::F32);
    // Asked for explicitly: a typed error naming the folder, the precision and the backend.
    let err = load_model_with::<NdArray>(
        &ck.0,
        &device,
        &LoadOptions {
            dtype: Some(WeightDtype::BF16),
            ..Default::default()
        },
    )
    .expect_err("ndarray cannot hold bf16");
    assert!(matches!(err, ModelError::UnsupportedDtype { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("bf16") && message.contains("ndarray"),
        "{message}"
    );
}

#[test]
fn weight_dtype_names_parse_and_print() {
    for (text, dtype) in [
        ("f32", WeightDtype::F32),
        ("BF16", WeightDtype::BF16),
        ("bfloat16", WeightDtype::BF16),
        ("f16", WeightDtype::F16),
    ] {
        assert_eq!(text.parse::<WeightDtype>().unwrap(), dtype);
    }
    assert_eq!(WeightDtype::BF16.to_string(), "bf16");
    let err = "int8".parse::<WeightDtype>().unwrap_err();
    assert!(err.contains("int8") && err.contains("bf16"), "{err}");
}
