//! Bad checkpoints give typed errors naming the file, the tensor and expected vs actual — never a
//! panic. Each test copies the tiny Qwen3-MoE (or sharded Mixtral) checkpoint into a temporary
//! folder and breaks one thing. Also: f16 / bf16 weights on disk load to the same model as their
//! f32 values.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use beam_model::checkpoint::{LoadError, TensorStore};
use beam_model::model::load::{load_model, load_model_with, LoadOptions};
use beam_model::model::{HiddenStates, MaskMode, ModelError, MoeLm};
use burn::backend::{Flex, NdArray};
use burn::tensor::{Tensor, TensorData};
use common::{repo_root, values};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

type B = NdArray<f32>;

/// A scratch copy of a shipped tiny model, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(family: &str, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("beam-errors-{tag}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        let source = repo_root().join(format!("assets/models/tiny-{family}"));
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        Self(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = self.path("config.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut json);
        std::fs::write(path, serde_json::to_string(&json).unwrap()).unwrap();
    }

    /// Rewrites `model.safetensors` after `edit` changes its (dtype, shape, bytes) map.
    fn edit_tensors(&self, edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
        let path = self.path("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                (
                    name,
                    (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
                )
            })
            .collect();
        edit(&mut tensors);
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, (dtype, shape, data))| {
                (
                    name.clone(),
                    TensorView::new(*dtype, shape.clone(), data).unwrap(),
                )
            })
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    /// The checkpoint loaded on ndarray (every tensor copied), after checking that burn's Flex,
    /// which reads what it can where the file is mapped (borrowed tensors, per-expert parts),
    /// meets the same error, or none.
    fn load(&self) -> Result<MoeLm<B>, ModelError> {
        let result = load_model::<B>(&self.0, &Default::default());
        let flex = load_model_with::<Flex>(&self.0, &Default::default(), &LoadOptions::default());
        assert_eq!(
            flex.as_ref().err().map(ToString::to_string),
            result.as_ref().err().map(ToString::to_string),
            "flex (in place) and ndarray (copied) disagree"
        );
        result
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn load_error(err: Result<MoeLm<B>, ModelError>) -> ModelError {
    match err {
        Ok(_) => panic!("loading should fail"),
        Err(err) => err,
    }
}

/// The tensor a [`LoadError::Missing`] names (any other result fails the test).
fn missing_tensor(result: Result<MoeLm<B>, ModelError>) -> String {
    match load_error(result) {
        ModelError::Load(LoadError::Missing { name, .. }) => name,
        other => panic!("expected Missing, got {other}"),
    }
}

/// The tensor a [`LoadError::Unexpected`] names (any other result fails the test).
fn unexpected_tensor(result: Result<MoeLm<B>, ModelError>) -> String {
    match load_error(result) {
        ModelError::Load(LoadError::Unexpected { name, .. }) => name,
        other => panic!("expected Unexpected, got {other}"),
    }
}

/// The tensor, expected and actual shape of a [`LoadError::Shape`] (any other result fails).
fn shape_error(result: Result<MoeLm<B>, ModelError>) -> (String, Vec<usize>, Vec<usize>) {
    match load_error(result) {
        ModelError::Load(LoadError::Shape {
            name,
            expected,
            actual,
            ..
        }) => (name, expected, actual),
        other => panic!("expected Shape, got {other}"),
    }
}

const ROUTER: &str = "model.layers.1.mlp.gate.weight";

#[test]
fn missing_folder_and_config() {
    let err = load_error(load_model::<B>(
        Path::new("/nonexistent/beam-model"),
        &Default::default(),
    ));
    assert!(matches!(err, ModelError::Io { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/beam-model"));

    let scratch = Scratch::copy_of("qwen3_moe", "noconfig");
    std::fs::remove_file(scratch.path("config.json")).unwrap();
    let err = load_error(scratch.load());
    assert!(
        matches!(&err, ModelError::Io { path, .. } if path.ends_with("config.json")),
        "{err}"
    );
}

#[test]
fn unknown_model_type_and_malformed_config() {
    let scratch = Scratch::copy_of("qwen3_moe", "type");
    scratch.edit_config(|c| c["model_type"] = "beam_unknown".into());
    let err = load_error(scratch.load());
    assert!(
        matches!(&err, ModelError::UnknownModelType { model_type, .. } if model_type == "beam_unknown"),
        "{err}"
    );

    std::fs::write(scratch.path("config.json"), "{ not json").unwrap();
    let err = load_error(scratch.load());
    assert!(matches!(err, ModelError::Config { .. }), "{err}");

    let scratch = Scratch::copy_of("qwen3_moe", "missingfield");
    scratch.edit_config(|c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    let err = load_error(scratch.load());
    assert!(err.to_string().contains("hidden_size"), "{err}");
}

#[test]
fn inconsistent_config_fields() {
    for (tag, field, value, needle) in [
        (
            "heads",
            "num_key_value_heads",
            3,
            "multiple of num_key_value_heads",
        ),
        (
            "topk",
            "num_experts_per_tok",
            9,
            "top_k = 9 exceeds num_experts = 8",
        ),
        (
            "dense",
            "mlp_only_layers",
            7,
            "mlp_only_layers names layer 7",
        ),
    ] {
        let scratch = Scratch::copy_of("qwen3_moe", tag);
        scratch.edit_config(|c| {
            c[field] = if field == "mlp_only_layers" {
                serde_json::json!([value])
            } else {
                value.into()
            };
        });
        let err = load_error(scratch.load());
        assert!(matches!(err, ModelError::Config { .. }), "{tag}: {err}");
        assert!(err.to_string().contains(needle), "{tag}: {err}");
    }
    // The config and the checkpoint disagree: a typed shape error, not a panic.
    let scratch = Scratch::copy_of("qwen3_moe", "hidden");
    scratch.edit_config(|c| c["moe_intermediate_size"] = 24.into());
    let err = load_error(scratch.load());
    assert!(
        matches!(err, ModelError::Load(LoadError::Shape { .. })),
        "{err}"
    );
}

#[test]
fn per_expert_errors_name_the_first_expert_in_order() {
    // Per-expert tensors are copied into their stacked buffer on several threads; with two
    // experts broken, the error is still the one a sequential load meets first (expert 1's
    // missing up projection, not expert 3's misshaped one), whichever thread finishes first.
    for run in 0..4 {
        let scratch = Scratch::copy_of("qwen3_moe", &format!("experts{run}"));
        scratch.edit_tensors(|t| {
            t.remove("model.layers.0.mlp.experts.1.up_proj.weight");
            let gate = "model.layers.0.mlp.experts.3.gate_proj.weight".to_string();
            let (dtype, mut shape, bytes) = t.remove(&gate).unwrap();
            shape.reverse();
            t.insert(gate, (dtype, shape, bytes));
        });
        assert_eq!(
            missing_tensor(scratch.load()),
            "model.layers.0.mlp.experts.1.up_proj.weight",
            "run {run}"
        );
    }
}

#[test]
fn missing_extra_misshaped_and_non_float_tensors() {
    let scratch = Scratch::copy_of("qwen3_moe", "missing");
    scratch.edit_tensors(|t| {
        t.remove(ROUTER);
    });
    match load_error(scratch.load()) {
        ModelError::Load(LoadError::Missing { name, path }) => {
            assert_eq!(name, ROUTER);
            assert!(path.ends_with("model.safetensors"));
        }
        other => panic!("expected Missing, got {other}"),
    }

    let scratch = Scratch::copy_of("qwen3_moe", "extra");
    scratch.edit_tensors(|t| {
        t.insert(
            "model.layers.9.mlp.gate.weight".into(),
            (Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    assert_eq!(
        unexpected_tensor(scratch.load()),
        "model.layers.9.mlp.gate.weight"
    );

    let scratch = Scratch::copy_of("qwen3_moe", "shape");
    scratch.edit_tensors(|t| {
        let entry = t.get_mut(ROUTER).unwrap();
        entry.1 = vec![4, 64];
    });
    assert_eq!(
        shape_error(scratch.load()),
        (ROUTER.to_string(), vec![8, 32], vec![4, 64])
    );

    let scratch = Scratch::copy_of("qwen3_moe", "dtype");
    scratch.edit_tensors(|t| {
        t.get_mut(ROUTER).unwrap().0 = Dtype::I32;
    });
    match load_error(scratch.load()) {
        ModelError::Load(LoadError::Dtype { name, actual, .. }) => {
            assert_eq!(name, ROUTER);
            assert_eq!(actual, "I32");
        }
        other => panic!("expected Dtype, got {other}"),
    }
}

#[test]
fn truncated_and_corrupted_files() {
    let scratch = Scratch::copy_of("qwen3_moe", "truncated");
    let path = scratch.path("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(scratch.load());
    assert!(
        matches!(&err, ModelError::Load(LoadError::Format { path, .. }) if path.ends_with("model.safetensors")),
        "{err}"
    );

    let mut corrupted = bytes.clone();
    corrupted[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&path, &corrupted).unwrap();
    assert!(matches!(
        load_error(scratch.load()),
        ModelError::Load(LoadError::Format { .. })
    ));

    std::fs::write(&path, [0u8; 3]).unwrap();
    assert!(matches!(
        load_error(scratch.load()),
        ModelError::Load(LoadError::Format { .. })
    ));
}

#[test]
fn broken_shard_index() {
    let scratch = Scratch::copy_of("mixtral", "shards");
    assert!(scratch.load().is_ok(), "sharded checkpoint loads");
    std::fs::remove_file(scratch.path("model-00003-of-00005.safetensors")).unwrap();
    let err = load_error(scratch.load());
    assert!(
        matches!(&err, ModelError::Load(LoadError::Io { path, .. }) if path.ends_with("model-00003-of-00005.safetensors")),
        "{err}"
    );

    std::fs::write(
        scratch.path("model.safetensors.index.json"),
        r#"{"weight_map": {"x": "../evil.safetensors"}}"#,
    )
    .unwrap();
    assert!(matches!(
        load_error(scratch.load()),
        ModelError::Load(LoadError::Index { .. })
    ));
    std::fs::write(scratch.path("model.safetensors.index.json"), "[]").unwrap();
    assert!(matches!(
        load_error(scratch.load()),
        ModelError::Load(LoadError::Index { .. })
    ));
}

#[test]
fn half_precision_weights_load_to_their_f32_values() {
    // Round every weight to bf16 / f16, store it once as f32 and once in the half type: the two
    // checkpoints must give identical logits. Per-expert (qwen3_moe) and fused (olmoe) experts.
    for (family, tag, dtype) in [
        ("qwen3_moe", "bf16", Dtype::BF16),
        ("qwen3_moe", "f16", Dtype::F16),
        ("olmoe", "bf16", Dtype::BF16),
        ("olmoe", "f16", Dtype::F16),
    ] {
        let rounded = Scratch::copy_of(family, &format!("{family}-{tag}-f32"));
        let half = Scratch::copy_of(family, &format!("{family}-{tag}"));
        let convert = |keep_f32: bool| {
            move |t: &mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>| {
                for (d, _, bytes) in t.values_mut() {
                    let floats = bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()));
                    let (new_dtype, new_bytes): (Dtype, Vec<u8>) = match dtype {
                        Dtype::BF16 => {
                            let h: Vec<half::bf16> = floats.map(half::bf16::from_f32).collect();
                            if keep_f32 {
                                (
                                    Dtype::F32,
                                    h.iter().flat_map(|v| v.to_f32().to_le_bytes()).collect(),
                                )
                            } else {
                                (
                                    Dtype::BF16,
                                    h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                                )
                            }
                        }
                        _ => {
                            let h: Vec<half::f16> = floats.map(half::f16::from_f32).collect();
                            if keep_f32 {
                                (
                                    Dtype::F32,
                                    h.iter().flat_map(|v| v.to_f32().to_le_bytes()).collect(),
                                )
                            } else {
                                (Dtype::F16, h.iter().flat_map(|v| v.to_le_bytes()).collect())
                            }
                        }
                    };
                    *d = new_dtype;
                    *bytes = new_bytes;
                }
            }
        };
        rounded.edit_tensors(convert(true));
        half.edit_tensors(convert(false));
        let ids = Tensor::<B, 2, burn::tensor::Int>::from_data(
            TensorData::new(vec![5i64, 17, 42, 7], [1, 4]),
            &Default::default(),
        );
        let logits = |m: MoeLm<B>| {
            values(
                m.forward(ids.clone(), None, MaskMode::TopK, HiddenStates::Skip)
                    .logits,
            )
        };
        let a = logits(rounded.load().unwrap());
        let b = logits(half.load().unwrap());
        assert!(a.iter().any(|v| *v != 0.0));
        assert_eq!(a, b, "{family} {tag}");
    }
}

#[test]
fn an_odd_head_dim_is_a_config_error_not_a_rope_failure() {
    let scratch = Scratch::copy_of("qwen3_moe", "odd-head-dim");
    scratch.edit_config(|c| c["head_dim"] = 13.into());
    let err = load_error(scratch.load());
    assert!(matches!(err, ModelError::Config { .. }), "{err}");
    assert!(
        err.to_string().contains("head_dim = 13 must be even"),
        "{err}"
    );
}

#[test]
fn implausible_sizes_are_rejected_before_allocating() {
    // Found by the config_json fuzz target: a huge layer count used to abort in an allocation.
    let scratch = Scratch::copy_of("olmoe", "huge");
    scratch.edit_config(|c| c["num_hidden_layers"] = 777_777_777_777_772u64.into());
    let err = load_error(scratch.load());
    assert!(
        err.to_string()
            .contains("num_hidden_layers = 777777777777772 exceeds"),
        "{err}"
    );
    scratch.edit_config(|c| {
        c["num_hidden_layers"] = 2.into();
        c["vocab_size"] = (1u64 << 40).into();
    });
    assert!(load_error(scratch.load())
        .to_string()
        .contains("vocab_size"));
}

#[test]
fn a_store_from_bytes_in_memory_reads_like_the_mapped_file() {
    let path = repo_root().join("assets/models/tiny-olmoe/model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let mapped = TensorStore::open(&path).unwrap();
    let owned = TensorStore::from_bytes(&path, bytes.clone()).unwrap();
    assert_eq!(mapped.names(), owned.names());
    let name = "model.embed_tokens.weight";
    let shape = mapped.shape(name).unwrap();
    let values = mapped.f32_values(name, &shape).unwrap();
    assert!(values.iter().any(|v| *v != 0.0));
    assert_eq!(values, owned.f32_values(name, &shape).unwrap());
    // A truncated buffer is the same typed error as a truncated file.
    let err = TensorStore::from_bytes(&path, bytes[..bytes.len() - 1].to_vec()).unwrap_err();
    assert!(matches!(err, LoadError::Format { .. }), "{err}");
    let err = TensorStore::from_bytes(&path, vec![1, 2, 3]).unwrap_err();
    assert!(matches!(err, LoadError::Format { .. }), "{err}");
}

/// DeepSeek: a missing MLA tensor, MLA sizes that disagree with the tensors, an unknown RoPE type,
/// unsupported routing, and FP8 scales missing, misshaped or without a quantization_config are
/// each one typed error naming the tensor or field.
#[test]
fn deepseek_mla_rope_and_fp8_errors_are_typed() {
    let kv_b = "model.layers.0.self_attn.kv_b_proj.weight";
    let scratch = Scratch::copy_of("deepseek_v3", "mla-missing");
    scratch.edit_tensors(|t| {
        t.remove(kv_b);
    });
    assert_eq!(missing_tensor(scratch.load()), kv_b);
    let scratch = Scratch::copy_of("deepseek_v3", "mla-qlora");
    scratch.edit_tensors(|t| {
        t.remove("model.layers.1.self_attn.q_a_layernorm.weight");
    });
    assert!(load_error(scratch.load())
        .to_string()
        .contains("model.layers.1.self_attn.q_a_layernorm.weight"));

    // kv_lora_rank 12 on disk, 10 in the config: kv_a_proj_with_mqa is [10 + 4, 32] expected.
    let scratch = Scratch::copy_of("deepseek_v3", "mla-dims");
    scratch.edit_config(|c| c["kv_lora_rank"] = 10.into());
    assert_eq!(
        shape_error(scratch.load()),
        (
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight".to_string(),
            vec![14, 32],
            vec![16, 32]
        )
    );
    for (tag, edit, needle) in [
        (
            "rope-type",
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "longrope", "rope_theta": 1e4}),
            ),
            "rope_type `longrope` is not supported (supported: default, yarn)",
        ),
        (
            "rope-old",
            (
                "rope_scaling",
                serde_json::json!({"type": "dynamic", "factor": 2.0}),
            ),
            "rope_type `dynamic` is not supported",
        ),
        (
            "rope-factor",
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "yarn", "factor": -1.0}),
            ),
            "yarn RoPE factor = -1 must be > 0",
        ),
        (
            "odd-rope",
            ("qk_rope_head_dim", serde_json::json!(5)),
            "qk_rope_head_dim = 5 must be even",
        ),
        (
            "no-rank",
            ("kv_lora_rank", serde_json::Value::Null),
            "missing `kv_lora_rank`",
        ),
        (
            "topk-method",
            ("topk_method", serde_json::json!("random")),
            "topk_method `random` is not supported for deepseek_v3",
        ),
        ("groups", ("n_group", serde_json::json!(3)), "3"),
        (
            "quant",
            (
                "quantization_config",
                serde_json::json!({"quant_method": "gptq"}),
            ),
            "quant_method Some(\"gptq\") is not supported",
        ),
    ] {
        let scratch = Scratch::copy_of("deepseek_v3", tag);
        scratch.edit_config(|c| {
            if edit.0 == "rope_scaling" {
                // transformers 4 / DeepSeek's own spelling: no `rope_parameters`.
                c.as_object_mut().unwrap().remove("rope_parameters");
            }
            c[edit.0] = edit.1.clone()
        });
        let err = scratch
            .load()
            .err()
            .unwrap_or_else(|| panic!("{tag}: loading should fail"));
        assert!(matches!(err, ModelError::Config { .. }), "{tag}: {err}");
        assert!(err.to_string().contains(needle), "{tag}: {err}");
        assert!(err.to_string().contains("config.json"), "{tag}: {err}");
    }
    let scratch = Scratch::copy_of("deepseek_v3", "no-q-lora");
    scratch.edit_config(|c| {
        c.as_object_mut().unwrap().remove("q_lora_rank");
    });
    assert!(load_error(scratch.load())
        .to_string()
        .contains("missing `q_lora_rank` (null for a plain q_proj)"));

    let o_proj = "model.layers.1.self_attn.o_proj.weight";
    let scale = format!("{o_proj}_scale_inv");
    let scratch = Scratch::copy_of("deepseek_v3_fp8", "fp8-missing");
    scratch.edit_tensors(|t| {
        t.remove(&scale);
    });
    assert_eq!(missing_tensor(scratch.load()), scale);
    let scratch = Scratch::copy_of("deepseek_v3_fp8", "fp8-shape");
    scratch.edit_tensors(|t| {
        let entry = t.get_mut(&scale).unwrap();
        entry.1 = vec![4, 1];
    });
    // o_proj is [32, 24]: 16 × 16 blocks give a [2, 2] scale.
    assert_eq!(
        shape_error(scratch.load()),
        (scale.clone(), vec![2, 2], vec![4, 1])
    );
    let scratch = Scratch::copy_of("deepseek_v3_fp8", "fp8-noconfig");
    scratch.edit_config(|c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    match load_error(scratch.load()) {
        ModelError::Load(LoadError::Dtype {
            name,
            actual,
            expected,
            ..
        }) => {
            assert_eq!(actual, "F8_E4M3");
            assert!(
                expected.contains("needs an fp8 quantization_config"),
                "{expected}"
            );
            assert!(name.ends_with(".weight"), "{name}");
        }
        other => panic!("expected Dtype, got {other}"),
    }
    // A scale nobody reads (its weight is not FP8) is an unexpected tensor, not ignored.
    let scratch = Scratch::copy_of("deepseek_v3", "fp8-stray");
    scratch.edit_tensors(|t| {
        t.insert(scale.clone(), (Dtype::F32, vec![2, 2], vec![0; 16]));
    });
    assert_eq!(unexpected_tensor(scratch.load()), scale);
}

/// DeepSeek-V3's MTP layers are skipped, but only those: a tensor past them is unexpected.
#[test]
fn deepseek_mtp_layers_are_skipped_and_nothing_else() {
    let scratch = Scratch::copy_of("deepseek_v3", "mtp");
    assert!(scratch.load().is_ok());
    scratch.edit_tensors(|t| {
        t.insert(
            "model.layers.4.enorm.weight".into(),
            (Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    assert_eq!(
        unexpected_tensor(scratch.load()),
        "model.layers.4.enorm.weight"
    );
    let scratch = Scratch::copy_of("deepseek_v3", "mtp-none");
    scratch.edit_config(|c| c["num_nextn_predict_layers"] = 0.into());
    let name = unexpected_tensor(scratch.load());
    assert!(name.starts_with("model.layers.3."), "{name}");
}
