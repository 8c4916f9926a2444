//! Whole models against Hugging Face transformers: the tiny random checkpoints in
//! `assets/models/tiny-*` (made by `scripts/gen_tiny_models.py` and
//! `scripts/gen_deepseek_models.py`, transformers 5.24, f32, eager attention) with reference
//! outputs in `assets/fixtures/models/`.
//! Tolerances: logits and hidden states 1e-4 absolute; greedy ids equal; cached decoding equals
//! the uncached forward to 1e-5.

mod common;

use beam_model::checkpoint::TensorStore;
use beam_model::model::generate::{generate, GenerateConfig};
use beam_model::model::load::load_model;
use beam_model::model::{HiddenStates, MaskMode, MoeLm};
use beam_model::MoeBackend;
use burn::backend::{Flex, NdArray};
use burn::tensor::{Int, Tensor, TensorData};
use common::{assert_close, repo_root, values};

type B = NdArray<f32>;

use common::MODELS as FAMILIES;

struct Reference {
    ids: Vec<u32>,
    logits: Vec<f64>,
    hidden: Vec<f64>,
    hidden_shape: Vec<usize>,
    generated: Vec<u32>,
}

fn reference(family: &str) -> Reference {
    let store =
        TensorStore::open(repo_root().join(format!("assets/fixtures/models/{family}.safetensors")))
            .unwrap();
    let ints = |name| {
        store
            .i64_values(name)
            .unwrap()
            .0
            .into_iter()
            .map(|v| v as u32)
            .collect()
    };
    let floats = |name: &str| {
        let shape = store.shape(name).unwrap();
        (
            store
                .f32_values(name, &shape)
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect(),
            shape,
        )
    };
    let (logits, _) = floats("logits");
    let (hidden, hidden_shape) = floats("hidden_states");
    Reference {
        ids: ints("input_ids"),
        logits,
        hidden,
        hidden_shape,
        generated: ints("generated"),
    }
}

fn model(family: &str) -> MoeLm<B> {
    load_model::<B>(
        repo_root().join(format!("assets/models/tiny-{family}")),
        &Default::default(),
    )
    .unwrap_or_else(|err| panic!("{family}: {err}"))
}

fn ids(tokens: &[u32]) -> Tensor<B, 2, Int> {
    let values: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    Tensor::from_data(
        TensorData::new(values, [1, tokens.len()]),
        &Default::default(),
    )
}

#[test]
fn logits_and_hidden_states_match_transformers() {
    for family in FAMILIES {
        let model = model(family);
        let reference = reference(family);
        let out = model.forward(
            ids(&reference.ids),
            None,
            MaskMode::TopK,
            HiddenStates::Collect,
        );
        assert_close(
            &values(out.logits),
            &reference.logits,
            1e-4,
            &format!("{family}: logits"),
        );
        let layers = reference.hidden_shape[0];
        assert_eq!(
            out.hidden_states.len(),
            layers,
            "{family}: L + 1 hidden states"
        );
        let per_layer = reference.hidden.len() / layers;
        for (l, h) in out.hidden_states.into_iter().enumerate() {
            assert_close(
                &values(h),
                &reference.hidden[l * per_layer..(l + 1) * per_layer],
                1e-4,
                &format!("{family}: hidden state {l}"),
            );
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for family in FAMILIES {
        let model = model(family);
        let reference = reference(family);
        let config = GenerateConfig {
            max_new_tokens: 12,
            eos_token_ids: model.config().eos_token_ids.clone(),
            ..GenerateConfig::default()
        };
        let generation = generate(&model, &reference.ids, &config);
        assert_eq!(generation.ids, reference.generated, "{family}: greedy ids");
        // No adapter: every token runs all K experts in every MoE layer.
        assert_eq!(
            generation.mean_active_experts(),
            model.config().moe.top_k as f64
        );
    }
}

#[test]
fn cached_decoding_equals_uncached_forward() {
    for family in FAMILIES {
        // Prefill 3 tokens, then one at a time (Mixtral's window of 5 is crossed on the way).
        cached_equals_uncached(&model(family), &reference(family).ids, family);
    }
}

#[test]
fn cached_decoding_on_flex_equals_uncached_forward_across_cache_buffers() {
    // Flex appends keys and values in place (`KvCacheBackend`: a buffer with room for 64
    // positions, doubled when full): 75 positions cross both buffers.
    for family in FAMILIES {
        let model = load_model::<Flex>(
            repo_root().join(format!("assets/models/tiny-{family}")),
            &Default::default(),
        )
        .unwrap_or_else(|err| panic!("{family}: {err}"));
        let tokens: Vec<u32> = reference(family).ids.into_iter().cycle().take(75).collect();
        cached_equals_uncached(&model, &tokens, &format!("{family} on Flex"));
    }
}

/// Decoding `tokens` with the cache (3 at once, then one at a time) gives the logits of one
/// uncached forward over all of them, to 1e-5.
fn cached_equals_uncached<M: MoeBackend>(model: &MoeLm<M>, tokens: &[u32], label: &str) {
    let ids = |tokens: &[u32]| {
        let values: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        Tensor::<M, 2, Int>::from_data(
            TensorData::new(values, [1, tokens.len()]),
            &Default::default(),
        )
    };
    let full = values(
        model
            .forward(ids(tokens), None, MaskMode::TopK, HiddenStates::Skip)
            .logits,
    );
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache();
    let mut incremental = values(
        model
            .forward(
                ids(&tokens[..3]),
                Some(&mut cache),
                MaskMode::TopK,
                HiddenStates::Skip,
            )
            .logits,
    );
    for (i, &t) in tokens.iter().enumerate().skip(3) {
        assert_eq!(cache.len(), i);
        incremental.extend(values(
            model
                .forward(
                    ids(&[t]),
                    Some(&mut cache),
                    MaskMode::TopK,
                    HiddenStates::Skip,
                )
                .logits,
        ));
    }
    assert_eq!(incremental.len(), tokens.len() * vocab);
    assert_close(
        &incremental,
        &full,
        1e-5,
        &format!("{label}: cached vs uncached"),
    );
}

#[test]
fn sampling_is_seeded_and_respects_max_tokens() {
    let model = model("qwen3_moe");
    let prompt = reference("qwen3_moe").ids;
    let config = |seed| GenerateConfig {
        max_new_tokens: 10,
        temperature: 1.0,
        top_p: 0.9,
        seed,
        ..GenerateConfig::default()
    };
    let a = generate(&model, &prompt, &config(1));
    let b = generate(&model, &prompt, &config(1));
    let c = generate(&model, &prompt, &config(2));
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.ids.len(), 10);
    assert_ne!(
        a.ids, c.ids,
        "different seeds should differ on a random model"
    );
    assert!(a
        .ids
        .iter()
        .all(|&t| (t as usize) < model.config().vocab_size));
    // Near-zero temperature is greedy (transformers' greedy ids); a hot one leaves them.
    let greedy = generate(
        &model,
        &prompt,
        &GenerateConfig {
            max_new_tokens: 10,
            ..GenerateConfig::default()
        },
    );
    let cold = generate(
        &model,
        &prompt,
        &GenerateConfig {
            temperature: 1e-4,
            ..config(1)
        },
    );
    assert_eq!(cold.ids, greedy.ids);
    let hot = generate(
        &model,
        &prompt,
        &GenerateConfig {
            temperature: 3.0,
            top_p: 1.0,
            ..config(1)
        },
    );
    assert_ne!(hot.ids, greedy.ids);
}

/// The trained KJV models shipped for the demo and training (`scripts/train_base_model.py`):
/// the coarse one (16 experts, top-4, f32) and the fine-grained one (64 experts, top-8, stored
/// in bf16, computed here in f32 as transformers computed its reference from the same bf16
/// values) load and compute transformers' logits on a validation snippet. Tolerance 1e-4
/// absolute.
#[test]
fn the_shipped_trained_models_match_transformers() {
    for name in ["kjv-moe", "kjv-moe-fine"] {
        shipped_model_matches_transformers(name);
    }
}

fn shipped_model_matches_transformers(name: &str) {
    let model = load_model::<B>(
        repo_root().join(format!("assets/models/{name}")),
        &Default::default(),
    )
    .unwrap();
    let store =
        TensorStore::open(repo_root().join(format!("assets/fixtures/models/{name}.safetensors")))
            .unwrap();
    let tokens: Vec<u32> = store
        .i64_values("input_ids")
        .unwrap()
        .0
        .iter()
        .map(|&t| t as u32)
        .collect();
    let shape = store.shape("logits").unwrap();
    let expected: Vec<f64> = store
        .f32_values("logits", &shape)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let out = model.forward(ids(&tokens), None, MaskMode::TopK, HiddenStates::Skip);
    assert_close(
        &values(out.logits),
        &expected,
        1e-4,
        &format!("{name} logits"),
    );
}

#[test]
fn weights_read_per_decoded_token_count_only_the_experts_that_run() {
    use beam_model::model::config::ModelConfig;
    for family in ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral"] {
        let config =
            ModelConfig::from_dir(repo_root().join(format!("assets/models/tiny-{family}")))
                .unwrap();
        let (h, v, e) = (
            config.hidden_size as f64,
            config.vocab_size as f64,
            config.moe.num_experts as f64,
        );
        let all = config.weights_read_per_token(e, 0);
        // Every parameter but the embedding rows of other tokens (untied), or exactly the LM head
        // counted once more for the one embedding row (tied).
        let expected = if config.tie_word_embeddings {
            config.parameters() as f64 + h
        } else {
            config.parameters() as f64 - (v - 1.0) * h
        };
        assert_eq!(all, expected, "{family}");
        // One expert fewer per MoE layer reads one expert's 3·H·I weights fewer per MoE layer.
        let expert = 3.0 * h * config.moe.intermediate_size as f64;
        let fewer = config.weights_read_per_token(e - 1.0, 0);
        let moe_layers = config.num_moe_layers() as f64;
        assert!((all - fewer - moe_layers * expert).abs() < 1e-6, "{family}");
        // A BEAM mask router of E outputs per MoE layer adds E·(H + 2) per MoE layer.
        let with_mask = config.weights_read_per_token(e, config.moe.num_experts);
        assert_eq!(with_mask - all, moe_layers * e * (h + 2.0), "{family}");
    }
}

#[test]
fn generation_stops_where_the_next_step_would_pass_the_context() {
    for family in ["olmoe", "mixtral"] {
        let model = model(family);
        let context = model
            .config()
            .max_position_embeddings
            .expect("tiny configs set it");
        let generation = generate(
            &model,
            &[1, 2, 3],
            &GenerateConfig {
                max_new_tokens: 10 * context,
                eos_token_ids: Vec::new(),
                ..Default::default()
            },
        );
        assert!(generation.context_limit_reached, "{family}");
        assert_eq!(generation.ids.len(), context - 3 + 1, "{family}");
        // With room to spare the limit is not reported.
        let short = generate(
            &model,
            &[1, 2, 3],
            &GenerateConfig {
                max_new_tokens: 4,
                eos_token_ids: Vec::new(),
                ..Default::default()
            },
        );
        assert!(!short.context_limit_reached);
        assert_eq!(short.ids.len(), 4);
    }
}

#[test]
fn forward_last_gives_the_last_row_of_forward_and_the_same_cache() {
    for family in ["olmoe", "qwen2_moe"] {
        let m = model(family);
        let prompt = ids(&[3, 14, 15, 92, 65]);
        let (mut full_cache, mut last_cache) = (m.new_cache(), m.new_cache());
        let full = m.forward(
            prompt.clone(),
            Some(&mut full_cache),
            MaskMode::TopK,
            HiddenStates::Skip,
        );
        let last = m.forward_last(
            prompt,
            Some(&mut last_cache),
            MaskMode::TopK,
            HiddenStates::Skip,
        );
        let [b, t, v] = full.logits.dims();
        assert_eq!(last.logits.dims(), [b, 1, v]);
        let want = values(full.logits.clone().narrow(1, t - 1, 1));
        assert!(want.iter().any(|x| x.abs() > 1e-3), "not a test on zeros");
        assert_eq!(values(last.logits.clone()), want, "{family}");
        assert_eq!(full.kept_pairs(), last.kept_pairs());
        // The next step sees the same cache either way.
        let next = |cache: &mut beam_model::model::cache::KvCache<B>| {
            values(
                m.forward(ids(&[7]), Some(cache), MaskMode::TopK, HiddenStates::Skip)
                    .logits,
            )
        };
        assert_eq!(next(&mut full_cache), next(&mut last_cache), "{family}");
    }
}

/// The parameter count the config gives (what `beam info` prints and the weights-read limit is
/// built from) is the loaded model's, for every family: MLA's projections and norms, shared and
/// dense layers, V3's correction bias included.
#[test]
fn parameter_count_is_the_loaded_models() {
    use burn::module::Module;
    for family in FAMILIES {
        let model = model(family);
        assert_eq!(
            model.config().parameters() as usize,
            model.num_params(),
            "{family}"
        );
    }
}

/// DeepSeek's own config spelling (`rope_scaling` with `type`, a top-level `rope_theta`, as the
/// original DeepSeek-V2 checkpoints and transformers 4 write it) loads the same YaRN model.
#[test]
fn yarn_under_the_rope_scaling_spelling_is_the_same_model() {
    let source = repo_root().join("assets/models/tiny-deepseek_v2_yarn");
    let dir = std::env::temp_dir().join(format!("beam-rope-scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    let mut rope = config["rope_parameters"].take();
    let object = config.as_object_mut().unwrap();
    object.remove("rope_parameters");
    object.insert("rope_theta".into(), rope["rope_theta"].take());
    let rope = rope.as_object_mut().unwrap();
    rope.remove("rope_theta");
    let kind = rope.remove("rope_type").unwrap();
    rope.insert("type".into(), kind);
    object.insert(
        "rope_scaling".into(),
        serde_json::Value::Object(rope.clone()),
    );
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let model = load_model::<B>(&dir, &Default::default()).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(matches!(
        model.config().rope_scaling,
        beam_model::model::config::RopeScaling::Yarn { .. }
    ));
    let reference = reference("deepseek_v2_yarn");
    let out = model.forward(
        ids(&reference.ids),
        None,
        MaskMode::TopK,
        HiddenStates::Skip,
    );
    assert_close(
        &values(out.logits),
        &reference.logits,
        1e-4,
        "rope_scaling spelling",
    );
}

/// The published DeepSeek configs (their `config.json` fields as on the Hub, weights not needed):
/// the parameter counts DeepSeek states (V3: 671 B in the main model, 37 B activated per token;
/// V2-Lite: 15.7 B, 2.4 B activated) come out of MLA's, the dense layers' and the shared experts'
/// sizes, and the KV cache keeps 576 values per token and layer.
#[test]
fn published_deepseek_configs_give_the_stated_sizes() {
    use beam_model::model::config::{HfConfig, ModelConfig, RopeScaling};
    let v3 = r#"{"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
        "norm_topk_prob": true, "scoring_func": "sigmoid", "hidden_act": "silu",
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": false, "attention_bias": false, "bos_token_id": 0, "eos_token_id": 1,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
            "quant_method": "fp8", "weight_block_size": [128, 128]}}"#;
    let v2_lite = r#"{"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
        "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2,
        "n_routed_experts": 64, "routed_scaling_factor": 1.0, "kv_lora_rank": 512,
        "q_lora_rank": null, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
        "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": false,
        "scoring_func": "softmax", "hidden_act": "silu", "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06, "rope_theta": 10000, "rope_scaling": {"beta_fast": 32,
            "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": false, "attention_bias": false}"#;
    let parse = |text: &str| {
        let path = std::path::Path::new("config.json");
        ModelConfig::from_hf(&HfConfig::parse(text, path).unwrap(), path).unwrap()
    };
    for (text, total, active, layers) in [(v3, 671e9, 37e9, 61), (v2_lite, 15.7e9, 2.4e9, 27)] {
        let config = parse(text);
        let k = config.moe.top_k as f64;
        let (params, read) = (
            config.parameters() as f64,
            config.weights_read_per_token(k, 0),
        );
        assert!(
            (params / total - 1.0).abs() < 0.01,
            "{params:e} vs {total:e}"
        );
        eprintln!(
            "{}: {params:.4e} parameters, {read:.4e} read per token",
            config.family
        );
        // Activated: what one token reads (one embedding row, the LM head, top-K experts).
        assert!((read / active - 1.0).abs() < 0.03, "{read:e} vs {active:e}");
        assert_eq!(config.kv_cache_values_per_token(), 576);
        assert_eq!(config.kv_cache_bytes_per_token(4), layers * 576 * 4);
        assert_eq!(config.kv_cache_bytes_per_token(2), layers * 576 * 2);
        assert!(matches!(config.rope_scaling, RopeScaling::Yarn { factor, .. } if factor == 40.0));
    }
    let v3 = parse(v3);
    assert_eq!(v3.skipped_layers, 1);
    assert_eq!(v3.fp8_block, Some([128, 128]));
    assert_eq!(v3.num_moe_layers(), 58);
    // YaRN's softmax scale: (0.1 · ln 40 + 1)² / √192.
    let m = 0.1 * 40f64.ln() + 1.0;
    assert!((v3.attention_scale() - m * m / 192f64.sqrt()).abs() < 1e-12);
    assert_eq!(v3.full_kv_values_per_token(), 128 * (192 + 128));
}
