//! Weights held in the checkpoint's precision (issue 14): bf16 / f16 checkpoints of every family
//! and layout (sharded per-expert Mixtral, fused OLMoE, Qwen2-MoE with a shared expert, Qwen3-MoE)
//! load onto burn's Flex backend without widening, hold exactly the stored values, and run with
//! `f32` activations to within `f32` rounding of an `f64` computation from the same stored values
//! (the checkpoint loaded onto `NdArray<f64>`, where every 16-bit value widens exactly). bf16
//! weights dotted with several tokens at once on a CPU with AVX-512 BF16 carry the activations as
//! two bf16 halves (16 significant bits, `beam_kernels::host::SplitBf16`): a wider bound there.

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
        for family in common::float_models() {
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
            // f32 activations and accumulation against f64 from the same weights (bf16: split
            // activations where the CPU has AVX-512 BF16).
            let bound = if dtype == Dtype::BF16 { 2e-4 } else { 2e-5 };
            let err = max_rel(&got, &reference);
            assert!(
                err <= bound,
                "{family} {dtype:?}: max relative error {err:e}"
            );
            // Holding the same values widened to f32 gives the same logits bit for bit for f16:
            // the host kernels widen each 16-bit weight exactly and sum in the same order. bf16
            // weights with several tokens take the split-bf16 kernel (on CPUs with AVX-512
            // BF16), f32 weights never do: the same within the bound.
            let widened = logits(&flex(&ck.0, Some(WeightDtype::F32)));
            if dtype == Dtype::BF16 {
                let err = max_rel(&got, &widened);
                assert!(err <= bound, "{family} bf16 held vs widened: {err:e}");
            } else {
                assert_eq!(widened, got, "{family} {dtype:?}: 16-bit held vs widened");
            }
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

/// FP8 (DeepSeek-V3's block-scaled `float8_e4m3fn`) dequantizes on load into the precision asked
/// for: held in bf16, each weight (attention projections, dense MLP, stacked experts) is its
/// dequantized f32 value rounded once to bf16, with no f32 copy kept. (The logits of a random tiny
/// model are no test here: bf16 rounding flips near-tied sigmoid routing choices.)
#[test]
fn fp8_weights_dequantize_into_the_held_precision() {
    let dir = repo_root().join("assets/models/tiny-deepseek_v3_fp8");
    let f32_model = flex(&dir, None);
    // The tiny checkpoint's other tensors are f32, so by default the FP8 weights become f32.
    assert_eq!(f32_model.weight_dtype(), WeightDtype::F32);
    let bf16_model = flex(&dir, Some(WeightDtype::BF16));
    assert_eq!(bf16_model.weight_dtype(), WeightDtype::BF16);
    let weights = |model: &MoeLm<Flex>| -> Vec<Tensor<Flex, 3>> {
        let mut out = Vec::new();
        for layer in &model.layers {
            let beam_model::model::attention::SelfAttention::Mla(mla) = &layer.attention else {
                panic!("an MLA model");
            };
            for p in [&mla.kv_a_proj, &mla.kv_b_proj, &mla.o_proj] {
                out.push(p.weight.val().unsqueeze::<3>());
            }
            match &layer.feed_forward {
                beam_model::model::FeedForward::Moe(moe) => {
                    out.push(moe.experts.gate_up.val());
                    out.push(moe.experts.down.val());
                }
                beam_model::model::FeedForward::Dense(mlp) => {
                    out.push(mlp.gate_up.val().unsqueeze::<3>());
                    out.push(mlp.down.val().unsqueeze::<3>());
                }
            }
        }
        out
    };
    let (full, held) = (weights(&f32_model), weights(&bf16_model));
    assert_eq!(full.len(), 10);
    for (i, (full, held)) in full.into_iter().zip(held).enumerate() {
        assert_eq!(held.dtype(), DType::BF16, "weight {i}");
        let full: Vec<f32> = full.into_data().convert::<f32>().into_vec().unwrap();
        assert!(full.iter().any(|v| v.abs() > 1e-2), "not a test on zeros");
        let rounded: Vec<f32> = full
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let held: Vec<f32> = held.into_data().convert::<f32>().into_vec().unwrap();
        assert_eq!(held, rounded, "weight {i}");
    }
    assert!(logits(&bf16_model).iter().all(|v| v.is_finite()));
}

/// Whether `address` lies in this process's mapping of a file under `dir` (`/proc/self/maps`).
#[cfg(target_os = "linux")]
fn mapped_from(address: usize, dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (lo, hi) = fields[0].split_once('-').unwrap();
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).unwrap(),
            usize::from_str_radix(hi, 16).unwrap(),
        );
        (lo..hi).contains(&address)
            && fields
                .get(5)
                .is_some_and(|p| Path::new(p).starts_with(&dir))
    })
}

/// Where a Flex tensor's bytes are.
#[cfg(target_os = "linux")]
fn address(tensor: Tensor<Flex, 2>) -> usize {
    tensor.into_primitive().tensor().bytes().as_ptr() as usize
}

/// Issue 14: weights Flex keeps in their stored dtype are read where the checkpoint is mapped —
/// the embeddings, the `[out, in]` linears, fused experts as stored, per-expert tensors as
/// `Weight::Parts` — with logits bit for bit those of the load that copies every weight
/// (`copy_weights`, the CLI's `--no-mmap`), whose weights lie in no mapping of the files.
#[cfg(target_os = "linux")]
#[test]
fn flex_reads_the_mapped_checkpoint_in_place_with_the_copied_loads_logits() {
    use beam_model::model::FeedForward;
    use beam_model::weight::Weight;
    let (mut per_expert, mut fused) = (0, 0);
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        for family in common::float_models() {
            let ck = Converted::new(family, dtype);
            let load = |copy_weights| {
                load_model_with::<Flex>(
                    &ck.0,
                    &Default::default(),
                    &LoadOptions {
                        copy_weights,
                        ..Default::default()
                    },
                )
                .unwrap()
            };
            let (mapped, copied) = (load(false), load(true));
            let bits = |model: &MoeLm<Flex>| -> Vec<u64> {
                logits(model).iter().map(|v| v.to_bits()).collect()
            };
            assert_eq!(bits(&mapped), bits(&copied), "{family} {dtype:?}");

            let what = format!("{family} {dtype:?}");
            assert!(
                mapped_from(address(mapped.embed.weight.val()), &ck.0),
                "{what}"
            );
            assert!(
                !mapped_from(address(copied.embed.weight.val()), &ck.0),
                "{what}"
            );
            let moe = |model: &MoeLm<Flex>| {
                model
                    .layers
                    .iter()
                    .find_map(|layer| match &layer.feed_forward {
                        FeedForward::Moe(moe) => Some(moe.experts.gate_up.clone()),
                        FeedForward::Dense(_) => None,
                    })
                    .expect("a MoE layer")
            };
            match (moe(&mapped), moe(&copied)) {
                (Weight::Parts(parts), Weight::Float(_)) => {
                    per_expert += 1;
                    for part in parts.iter().flatten() {
                        assert!(mapped_from(address(part.val()), &ck.0), "{what}");
                    }
                }
                (Weight::Float(mapped), Weight::Float(copied)) => {
                    fused += 1;
                    let at = |w: burn::module::Param<Tensor<Flex, 3>>| {
                        w.val().into_primitive().tensor().bytes().as_ptr() as usize
                    };
                    assert!(mapped_from(at(mapped), &ck.0), "{what}: fused, mapped");
                    assert!(!mapped_from(at(copied), &ck.0), "{what}: fused, copied");
                }
                _ => panic!("{what}: unexpected expert weights"),
            }
        }
    }
    assert!(
        per_expert > 0 && fused > 0,
        "both layouts: {per_expert} / {fused}"
    );
}

/// Every logit of decoding `tokens` on `model` with a KV cache in `dtype`: the first three
/// tokens at once, then one at a time.
fn decoded_logits<B: MoeBackend>(model: &MoeLm<B>, tokens: &[u32], dtype: WeightDtype) -> Vec<f64> {
    let ids = |tokens: &[u32]| {
        let values: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        Tensor::<B, 2, Int>::from_data(
            TensorData::new(values, [1, tokens.len()]),
            &Default::default(),
        )
    };
    let mut cache = model.new_cache_with(dtype).unwrap();
    assert_eq!(
        cache.dtype(),
        (dtype != WeightDtype::F32).then(|| dtype.dtype())
    );
    let mut all = Vec::new();
    let steps = std::iter::once(&tokens[..3]).chain(tokens[3..].chunks(1));
    for step in steps {
        let out = model.forward(
            ids(step),
            Some(&mut cache),
            MaskMode::TopK,
            HiddenStates::Skip,
        );
        all.extend(
            out.logits
                .into_data()
                .convert::<f64>()
                .into_vec::<f64>()
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), tokens.len());
    all
}

/// A 16-bit KV cache (what llama.cpp holds by default: half the bytes a decode step's attention
/// reads) on every family, prefill then decode:
/// - Flex's host kernel reading the cache in place (MLA: the latent widened) gives the logits of
///   the tensor-ops reference on a cache of the same precision (`Autodiff<Flex>`, whose attention
///   widens the cached keys and values and runs burn's matmuls): to 1e-5 with an f32 cache, to
///   5e-4 with a 16-bit one (the two paths' f32 rounding upstream can put a cached value on
///   either side of a 16-bit rounding boundary: one 16-bit step, not a misread; seen: at most
///   1.0e-4, on DeepSeek-V2);
/// - over 70 positions (across a cache buffer), an f16 cache moves the logits from the f32
///   cache's by at most 1e-2 (relative to 1 + |x|; f16 keeps 11 significant bits; seen: at most
///   3.2e-3 over the families). A bf16 cache (8 bits) can flip a top-K choice of these random
///   tiny models, so it is held to the first check only.
///
/// The kernel's own exactness (against f64 from the same rounded values) is `beam-kernels`'
/// `kv_attention_matches_an_f64_reference_on_the_cache_in_place_and_through_the_reference`.
#[test]
fn a_16_bit_kv_cache_reads_the_rounded_values_as_the_reference_does() {
    use burn::backend::Autodiff;
    let prompt = [5u32, 17, 42, 7, 3, 11, 29, 2];
    let tokens: Vec<u32> = prompt.iter().copied().cycle().take(70).collect();
    for family in common::MODELS {
        let dir = repo_root().join(format!("assets/models/tiny-{family}"));
        let model = flex(&dir, Some(WeightDtype::F32));
        let reference = load_model::<Autodiff<Flex>>(&dir, &Default::default()).unwrap();
        let exact = decoded_logits(&model, &tokens, WeightDtype::F32);
        for dtype in [WeightDtype::F32, WeightDtype::F16, WeightDtype::BF16] {
            let got = decoded_logits(&model, &tokens, dtype);
            // 20 positions: the reference's 16-bit concatenations are slow on Autodiff.
            let want = decoded_logits(&reference, &tokens[..20], dtype);
            let off = max_rel(&got[..want.len()], &want);
            let bound = if dtype == WeightDtype::F32 {
                1e-5
            } else {
                5e-4
            };
            assert!(
                off < bound,
                "{family}: {dtype} cache, kernel vs reference {off:e}"
            );
            if dtype != WeightDtype::F32 {
                let moved = max_rel(&got, &exact);
                eprintln!("{family}: {dtype} cache moves the logits by {moved:.2e}");
                assert!(moved > 0.0, "{family}: the {dtype} cache rounds nothing");
                if dtype == WeightDtype::F16 {
                    assert!(
                        moved < 1e-2,
                        "{family}: f16 cache moves the logits by {moved:e}"
                    );
                }
            }
        }
    }
}

/// Which cache [`MoeLm::new_cache`] makes: on Flex (whose attention reads 16-bit caches in
/// place) the weights' precision when they are 16-bit and f16 for weights quantized in place;
/// f32 otherwise (ndarray, which holds f32 only, and backends that would widen the cache on every
/// step); a precision the backend cannot hold is a typed error.
#[test]
fn the_default_kv_cache_follows_the_weights_and_ndarray_refuses_16_bits() {
    use beam_model::checkpoint::Quantization;
    let tiny = repo_root().join("assets/models/tiny-olmoe");
    assert_eq!(
        flex(&tiny, Some(WeightDtype::F32)).default_kv_dtype(),
        WeightDtype::F32
    );
    for (stored, held) in [
        (Dtype::BF16, WeightDtype::BF16),
        (Dtype::F16, WeightDtype::F16),
    ] {
        let ck = Converted::new("olmoe", stored);
        let model = flex(&ck.0, None);
        assert_eq!(model.default_kv_dtype(), held);
        assert_eq!(model.new_cache().dtype(), Some(held.dtype()));
        // A backend whose attention widens a 16-bit cache into a copy on every call (here the
        // reference's, on Autodiff) caches f32 by default, and 16 bits when asked.
        let reference = load_model_with::<burn::backend::Autodiff<Flex>>(
            &ck.0,
            &Default::default(),
            &LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(reference.weight_dtype(), held);
        assert_eq!(reference.default_kv_dtype(), WeightDtype::F32);
        let asked = reference.new_cache_with(held).unwrap();
        assert_eq!(asked.dtype(), Some(held.dtype()));
    }
    let quantized = |quantize| LoadOptions {
        quantize: Some(quantize),
        ..Default::default()
    };
    let bf16 = Converted::new("olmoe", Dtype::BF16);
    for quantize in [Quantization::Q8, Quantization::Q4] {
        // From an f32 or a bf16 checkpoint (whose embeddings stay bf16).
        for dir in [&tiny, &bf16.0] {
            let model =
                load_model_with::<Flex>(dir, &Default::default(), &quantized(quantize)).unwrap();
            assert_eq!(
                model.default_kv_dtype(),
                WeightDtype::F16,
                "{}",
                dir.display()
            );
        }
        // ndarray dequantizes at load: f32 weights, an f32 cache.
        let model =
            load_model_with::<NdArray>(&tiny, &Default::default(), &quantized(quantize)).unwrap();
        assert_eq!(model.default_kv_dtype(), WeightDtype::F32);
        assert_eq!(model.new_cache().dtype(), None);
        let err = model
            .new_cache_with(WeightDtype::F16)
            .expect_err("ndarray cannot hold f16");
        assert!(
            matches!(err, ModelError::UnsupportedKvDtype { .. }),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("f16")
                && message.contains("ndarray")
                && message.contains("--kv-cache"),
            "{message}"
        );
    }
}
