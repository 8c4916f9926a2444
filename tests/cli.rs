//! The `beam` binary end to end on the shipped tiny checkpoints.

mod common;

use std::process::{Command, Output};

use beam_model::checkpoint::TensorStore;
use common::{assert_close, repo_root};

fn beam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beam"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run beam")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "beam failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn reference_ids(family: &str, name: &str) -> Vec<i64> {
    let store =
        TensorStore::open(repo_root().join(format!("assets/fixtures/models/{family}.safetensors")))
            .unwrap();
    store.i64_values(name).unwrap().0
}

fn join(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn info_describes_each_family() {
    // (shipped model, model_type, a line it prints, decoder layers if MLA).
    for (name, family, needle, mla_layers) in [
        ("qwen2_moe", "qwen2_moe", "3 (2 MoE)", None),
        ("qwen3_moe", "qwen3_moe", "top-2", None),
        ("olmoe", "olmoe", "top-3", None),
        ("mixtral", "mixtral", "6 routed", None),
        (
            "deepseek_v2",
            "deepseek_v2",
            "MLA, kv_lora_rank 12, q_proj",
            Some(3),
        ),
        (
            "deepseek_v2_yarn",
            "deepseek_v2",
            "yarn, factor 4 of 32 positions",
            Some(2),
        ),
        ("deepseek_v3", "deepseek_v3", "3 (2 MoE)", Some(3)),
        ("deepseek_v3_fp8", "deepseek_v3", "F8_E4M3", Some(2)),
    ] {
        let out = stdout(&beam(&[
            "info",
            "--model",
            &format!("assets/models/tiny-{name}"),
        ]));
        assert!(out.contains(&format!("family:      {family}")), "{out}");
        assert!(out.contains(needle), "{name}: {out}");
        assert!(out.contains("no adapter"), "{out}");
        match mla_layers {
            // MLA caches the latent and the rotary key, 12 + 4 values per token and layer (2 or
            // 4 bytes each), where full keys and values would be 4 heads · (12 + 6): 4.5×.
            Some(layers) => {
                let line = format!(
                    "KV cache:    {} B per token in 16 bits, {} B in f32 (compressed latent; full \
                     K/V would take 4.5× more)",
                    layers * 16 * 2,
                    layers * 16 * 4,
                );
                assert!(out.contains(&line), "{name}: {out}");
            }
            None => assert!(out.contains(" in f32 (keys and values)"), "{out}"),
        }
    }
}

#[test]
fn info_reads_headers_only_so_damaged_tensor_data_still_describes_itself() {
    // A copy of tiny-olmoe whose model.safetensors keeps its header but loses most tensor bytes.
    let dir = std::env::temp_dir().join(format!("beam-cli-truncated-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(repo_root().join("assets/models/tiny-olmoe")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    std::fs::write(&file, &bytes[..header + 16]).unwrap();
    let model = dir.to_str().unwrap();

    let out = beam(&["info", "--model", model]);
    let text = stdout(&out);
    assert!(text.contains("family:      olmoe"), "{text}");
    assert!(text.contains("top-3"), "{text}");
    assert!(text.contains("stored as:   F32"), "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("truncated"), "{stderr}");

    // Loading it is a one-line typed error naming the file.
    let out = beam(&["logits", "--model", model, "--ids", "1,2"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("model.safetensors"), "{stderr}");
    assert!(stderr.contains("not a valid safetensors file"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn logits_json_matches_transformers() {
    let ids = reference_ids("olmoe", "input_ids");
    let out = stdout(&beam(&[
        "logits",
        "--model",
        "assets/models/tiny-olmoe",
        "--ids",
        &join(&ids),
    ]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = json["logits"].as_array().unwrap();
    assert_eq!(rows.len(), ids.len());
    let ours: Vec<f64> = rows
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    let store =
        TensorStore::open(repo_root().join("assets/fixtures/models/olmoe.safetensors")).unwrap();
    let shape = store.shape("logits").unwrap();
    let reference: Vec<f64> = store
        .f32_values("logits", &shape)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    assert_close(&ours, &reference, 1e-4, "beam logits vs transformers");
}

#[test]
fn generate_greedy_json_matches_transformers() {
    let ids = reference_ids("mixtral", "input_ids");
    let out = beam(&[
        "generate",
        "--model",
        "assets/models/tiny-mixtral",
        "--ids",
        &join(&ids),
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let generated: Vec<i64> = json["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(generated, reference_ids("mixtral", "generated"));
    assert!(json["text"].is_string());
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(
        summary.contains("tokens/s") && summary.contains("2.00 of 2 experts kept"),
        "{summary}"
    );
}

#[test]
fn generate_from_a_text_prompt() {
    let out = beam(&[
        "generate",
        "--model",
        "assets/models/tiny-qwen3_moe",
        "--prompt",
        "And God said",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]);
    let text = stdout(&out);
    assert!(!text.trim().is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("(top-K)"));
}

#[test]
fn one_new_token_reports_no_decode_speed() {
    // The generate summary (stderr) for `new` tokens after a 3-token prompt.
    let summary = |new: &str| {
        let out = beam(&[
            "generate",
            "--model",
            "assets/models/tiny-qwen3_moe",
            "--ids",
            "5,17,42",
            "--max-new-tokens",
            new,
        ]);
        stdout(&out);
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // The only new token comes from the prompt's forward: no decode step was timed, so the
    // summary says so instead of a speed computed from nothing.
    let one = summary("1");
    assert!(
        one.contains("1 new tokens") && one.contains("no decode step to time"),
        "{one}"
    );
    assert!(!one.contains("tokens/s"), "{one}");
    // With two or more, the decode speed is reported.
    let three = summary("3");
    assert!(three.contains("tokens/s decode"), "{three}");
}

#[test]
fn errors_are_one_line_and_non_zero() {
    for args in [
        vec!["info", "--model", "/nonexistent/model"],
        vec![
            "logits",
            "--model",
            "assets/models/tiny-olmoe",
            "--ids",
            "1,99999",
        ],
        vec![
            "info",
            "--model",
            "assets/models/tiny-olmoe",
            "--threshold",
            "0.5",
        ],
        vec![
            "info",
            "--model",
            "assets/models/tiny-olmoe",
            "--beam-adapter",
            "/nonexistent.safetensors",
        ],
        vec![
            "generate",
            "--model",
            "assets/models/tiny-olmoe",
            "--ids",
            "1",
            "--top-p",
            "0",
        ],
        #[cfg(not(feature = "cuda"))]
        vec![
            "info",
            "--model",
            "assets/models/tiny-olmoe",
            "--backend",
            "cuda",
        ],
    ] {
        let out = beam(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn generate_with_a_beam_adapter_keeps_fewer_experts() {
    use beam_model::model::load::load_model;
    use burn::backend::NdArray;

    // An adapter with random mask-router weights: about half of the slots are masked.
    let model = load_model::<NdArray>(
        repo_root().join("assets/models/tiny-qwen3_moe"),
        &Default::default(),
    )
    .unwrap();
    let model = common::random_adapter(model, 9);
    let path = std::env::temp_dir().join(format!(
        "beam-cli-adapter-{}.safetensors",
        std::process::id()
    ));
    model.save_beam_adapter(&path).unwrap();
    let adapter = path.to_str().unwrap();

    let info = stdout(&beam(&[
        "info",
        "--model",
        "assets/models/tiny-qwen3_moe",
        "--beam-adapter",
        adapter,
        "--threshold",
        "0.6",
    ]));
    assert!(info.contains("threshold 0.6"), "{info}");
    let out = beam(&[
        "generate",
        "--model",
        "assets/models/tiny-qwen3_moe",
        "--ids",
        "5,17,42",
        "--max-new-tokens",
        "6",
        "--beam-adapter",
        adapter,
    ]);
    stdout(&out);
    let summary = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(summary.contains("(BEAM)"), "{summary}");
    let kept: f64 = summary
        .split(" of 2 experts kept")
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(kept > 0.0 && kept < 2.0, "{summary}");
    std::fs::remove_file(path).ok();
}

#[test]
fn bench_reports_top_k_then_a_smaller_k_as_json() {
    let out = stdout(&beam(&[
        "bench",
        "--model",
        "assets/models/tiny-qwen3_moe",
        "--prompt-tokens",
        "6",
        "--new-tokens",
        "4",
        "--keep",
        "1",
        "--json",
    ]));
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    for (row, variant) in rows.iter().zip(["top-K", "keep-1"]) {
        assert_eq!(row["variant"], variant, "{row}");
        for key in [
            "dtype",
            "backend",
            "load_s",
            "peak_rss_bytes",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "experts_per_token",
            "weight_bytes_per_token",
        ] {
            assert!(!row[key].is_null(), "{key} missing: {row}");
        }
        assert!(row["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["decode_tokens"], 3, "{row}");
    }
    let top_k = rows[0]["top_k"].as_f64().unwrap();
    assert_eq!(rows[0]["experts_per_token"].as_f64().unwrap(), top_k);
    assert_eq!(rows[1]["experts_per_token"].as_f64().unwrap(), 1.0);
    let bytes = |r: &serde_json::Value| r["weight_bytes_per_token"].as_f64().unwrap();
    assert!(bytes(&rows[1]) < bytes(&rows[0]), "{out}");

    // A K' the model does not have is a one-line error.
    let out = beam(&[
        "bench",
        "--model",
        "assets/models/tiny-qwen3_moe",
        "--keep",
        "99",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--keep 99"));
}

#[test]
fn out_of_range_options_are_one_line_errors_before_any_work() {
    let generate = |extra: &[&'static str]| {
        let mut args = vec![
            "generate",
            "--model",
            "assets/models/tiny-olmoe",
            "--ids",
            "1,2",
        ];
        args.extend_from_slice(extra);
        args
    };
    let eval = |extra: &[&'static str]| {
        let mut args = vec![
            "eval",
            "--model",
            "assets/models/kjv-moe",
            "--data",
            "assets/corpus/kjv-valid.txt.gz",
        ];
        args.extend_from_slice(extra);
        args
    };
    let train = |extra: &[&'static str]| {
        let mut args = vec![
            "train",
            "--model",
            "assets/models/kjv-moe",
            "--data",
            "assets/corpus/kjv-valid.txt.gz",
            "--out",
            "/nonexistent/never-written",
        ];
        args.extend_from_slice(extra);
        args
    };
    let bench = |extra: &[&'static str]| {
        let mut args = vec!["bench", "--model", "assets/models/tiny-olmoe"];
        args.extend_from_slice(extra);
        args
    };
    for (args, needle) in [
        (generate(&["--temperature", "NaN"]), "--temperature NaN"),
        (generate(&["--temperature=-1"]), "--temperature -1"),
        (generate(&["--temperature", "inf"]), "--temperature inf"),
        (generate(&["--max-new-tokens", "0"]), "--max-new-tokens"),
        (generate(&["--top-p", "NaN"]), "--top-p NaN"),
        (eval(&["--seq-len", "0"]), "seq_len (0)"),
        (eval(&["--batch-size", "0"]), "batch_size (0)"),
        (eval(&["--max-tokens", "0"]), "max_tokens (0)"),
        (
            eval(&["--seq-len", "513"]),
            "seq_len 513 exceeds the model's context of 512",
        ),
        (
            eval(&["--adapter", "/nonexistent.safetensors"]),
            "/nonexistent.safetensors",
        ),
        (
            train(&["--seq-len", "513"]),
            "seq_len 513 exceeds the model's context of 512",
        ),
        (
            bench(&["--prompt-tokens", "18446744073709551615"]),
            "exceeds the model's context",
        ),
    ] {
        let out = beam(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn generation_stops_at_the_model_context_and_says_so() {
    // tiny-olmoe: max_position_embeddings 128. A 2-token prompt leaves room for 127 new tokens
    // (the last one is never fed back, so it needs no position).
    let out = beam(&[
        "generate",
        "--model",
        "assets/models/tiny-olmoe",
        "--ids",
        "1,2",
        "--max-new-tokens",
        "20000",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["ids"].as_array().unwrap().len(), 127, "{json}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("stopped at the model's context of 128"),
        "{stderr}"
    );

    // A prompt longer than the context, and a bench that would pass it, are refused up front.
    let long = (0..129)
        .map(|i| (i % 200).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = beam(&[
        "generate",
        "--model",
        "assets/models/tiny-olmoe",
        "--ids",
        &long,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("context of 128"));
    let out = beam(&[
        "bench",
        "--model",
        "assets/models/tiny-olmoe",
        "--prompt-tokens",
        "100",
        "--new-tokens",
        "64",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("context of 128"));
}

#[test]
fn quantize_q8_and_q4_run_logits_generate_and_bench_and_refuse_unknown_formats_and_caches() {
    let ids = reference_ids("olmoe", "input_ids");
    let logits = |extra: &[&str]| -> Vec<f64> {
        let mut args = vec!["logits", "--model", "assets/models/tiny-olmoe", "--ids"];
        let joined = join(&ids);
        args.push(&joined);
        args.extend_from_slice(extra);
        let json: serde_json::Value = serde_json::from_str(&stdout(&beam(&args))).unwrap();
        json["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect()
    };
    let full = logits(&[]);
    let q8 = logits(&["--quantize", "q8"]);
    assert_eq!(q8.len(), full.len());
    let mean = q8
        .iter()
        .zip(&full)
        .map(|(a, b)| (a - b).abs())
        .sum::<f64>()
        / full.len() as f64;
    assert!(mean > 0.0 && mean < 0.1, "q8 vs f32 mean |diff| {mean}");
    // ndarray dequantizes q8 at load: the same q8 model (its prefill keeps f32 activations).
    let on_ndarray = logits(&["--quantize", "q8", "--backend", "ndarray"]);
    assert!(on_ndarray.iter().zip(&q8).all(|(a, b)| (a - b).abs() < 0.1));
    // q4: further from f32 than q8 (on this random tiny model: 16 levels per block), the same q4
    // model on ndarray.
    let q4 = logits(&["--quantize", "q4"]);
    let mean_q4 = q4
        .iter()
        .zip(&full)
        .map(|(a, b)| (a - b).abs())
        .sum::<f64>()
        / full.len() as f64;
    assert!(
        mean_q4 > mean && mean_q4 < 1.0,
        "q4 vs f32 mean |diff| {mean_q4}"
    );
    // Flex rounds the activations of its int8 dots, ndarray keeps them f32: on this random model
    // that flips a near-tied top-K choice at one position (measured: max |diff| 0.8 there, < 0.1
    // at every other), so all but one position must agree within 0.1.
    let on_ndarray = logits(&["--quantize", "q4", "--backend", "ndarray"]);
    let vocab = full.len() / ids.len();
    let apart = on_ndarray
        .chunks(vocab)
        .zip(q4.chunks(vocab))
        .filter(|(a, b)| a.iter().zip(*b).any(|(a, b)| (a - b).abs() >= 0.1))
        .count();
    assert!(apart <= 1, "{apart} positions differ by 0.1 or more");

    let out = stdout(&beam(&[
        "generate",
        "--model",
        "assets/models/tiny-olmoe",
        "--ids",
        "5,17,42",
        "--max-new-tokens",
        "4",
        "--quantize",
        "q8",
        "--json",
    ]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["ids"].as_array().unwrap().len(), 4, "{out}");

    // The top-K row of `bench --json` on a quantized tiny model.
    let bench_row = |quantize: &str, extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "bench",
            "--model",
            "assets/models/tiny-qwen3_moe",
            "--prompt-tokens",
            "6",
            "--new-tokens",
            "3",
            "--quantize",
            quantize,
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = stdout(&beam(&args));
        serde_json::from_str(out.lines().next().unwrap()).unwrap()
    };
    let row = bench_row("q8", &[]);
    assert_eq!(row["dtype"], "q8", "{row}");
    // Quantized weights get llama.cpp's default cache type, unless asked otherwise.
    assert_eq!(row["kv_dtype"], "f16", "{row}");
    let f32_cache = bench_row("q8", &["--kv-cache", "f32"]);
    assert_eq!(f32_cache["kv_dtype"], "f32", "{f32_cache}");
    // 9 positions cached at the end, of twice the bytes in f32.
    let cache_bytes = |row: &serde_json::Value| row["kv_cache_bytes"].as_u64().unwrap();
    assert!(cache_bytes(&row) > 0);
    assert_eq!(cache_bytes(&f32_cache), 2 * cache_bytes(&row), "{row}");
    let q4_row = bench_row("q4", &[]);
    assert_eq!(q4_row["dtype"], "q4", "{q4_row}");
    let bytes = |row: &serde_json::Value| row["weight_bytes_per_token"].as_f64().unwrap();
    let ratio = bytes(&q4_row) / bytes(&row);
    assert!(
        (ratio - 0.5625 / 1.0625).abs() < 0.02,
        "q4 reads {ratio} of q8's bytes per token"
    );

    // A 16-bit cache on ndarray (f32 only) is a clear error, not a panic.
    let out = beam(&[
        "generate",
        "--model",
        "assets/models/tiny-olmoe",
        "--ids",
        "5,17,42",
        "--backend",
        "ndarray",
        "--kv-cache",
        "bf16",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot hold a bf16 KV cache") && !stderr.contains("panicked"),
        "{stderr}"
    );

    let out = beam(&[
        "logits",
        "--model",
        "assets/models/tiny-olmoe",
        "--ids",
        "1,2",
        "--quantize",
        "q3",
    ]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("q3") && stderr.contains("q8") && stderr.contains("q4"),
        "{stderr}"
    );
}

/// `--backend wgpu` is probed once before any work: without a Vulkan driver (the loader pointed
/// at a driver list that does not exist) every command says so in one line instead of
/// panicking on wgpu's device thread.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_without_an_adapter_is_one_clear_error() {
    for args in [
        vec!["info", "--model", "assets/models/tiny-olmoe"],
        vec![
            "logits",
            "--model",
            "assets/models/tiny-olmoe",
            "--ids",
            "1,2",
        ],
        vec![
            "eval",
            "--model",
            "assets/models/tiny-olmoe",
            "--data",
            "assets/corpus/kjv-valid.txt.gz",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_beam"))
            .args(&args)
            .args(["--backend", "wgpu"])
            .current_dir(repo_root())
            .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
            .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
            .output()
            .expect("run beam");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: no usable wgpu adapter"),
            "{args:?}: {stderr}"
        );
    }
}

/// `beam eval` end to end: top-K, an adapter and the peers on held-out text, as a table, JSON
/// and two plots; the JSON's numbers are the library's (`beam_train::evaluate`) on the same model.
#[test]
fn eval_reports_what_the_library_computes() {
    use beam_model::model::load::load_model;
    use beam_model::model::MaskMode;
    use beam_train::{evaluate, EvalOptions, TokenData};
    use burn::backend::NdArray;

    let dir = repo_root().join("assets/models/tiny-qwen3_moe");
    let model =
        common::random_adapter(load_model::<NdArray>(&dir, &Default::default()).unwrap(), 9);
    let scratch = std::env::temp_dir().join(format!("beam-cli-eval-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let adapter = scratch.join("random.safetensors");
    model.save_beam_adapter(&adapter).unwrap();
    let json = scratch.join("eval.json");
    let plot = scratch.join("quality.png");
    let layers = scratch.join("layers.png");
    let choice_plot = scratch.join("choice.png");
    let token_map = scratch.join("map.html");
    // A run retrained at K' = 1 (whole model), evaluated with --trained.
    let fixed = scratch.join("fixed1");
    let trained = beam(&[
        "train",
        "--model",
        dir.to_str().unwrap(),
        "--data",
        "assets/corpus/kjv-valid.txt.gz",
        "--out",
        fixed.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--fixed-k",
        "1",
        "--train",
        "all",
    ]);
    assert!(
        stdout(&trained).starts_with("trained model: "),
        "{}",
        stdout(&trained)
    );
    let out = beam(&[
        "eval",
        "--model",
        dir.to_str().unwrap(),
        "--data",
        "assets/corpus/kjv-valid.txt.gz",
        "--adapter",
        &format!("mine={}", adapter.display()),
        "--peers",
        "--max-tokens",
        "1024",
        "--seq-len",
        "64",
        "--choice-items",
        "2",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
        "--layer-plot",
        layers.to_str().unwrap(),
        "--choice-plot",
        choice_plot.to_str().unwrap(),
        "--token-map",
        token_map.to_str().unwrap(),
        "--trained",
        &format!("fixed one={}", fixed.display()),
    ]);
    let table = stdout(&out);
    assert!(
        table.contains("| top-k |") && table.contains("| beam mine |"),
        "{table}"
    );
    let reports: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let labels: Vec<&str> = reports
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(&labels[..3], ["top-k", "beam mine", "fixed one"]);
    assert_eq!(
        labels.len(),
        3 + 23,
        "top-k, the adapter, the trained run, 22 peer settings and the untrained K' = 1"
    );
    assert_eq!(reports[2]["method"], "fixed-k-trained");
    assert_eq!(reports[2]["mean_active_experts"], 1.0);
    assert_eq!(reports.last().unwrap()["method"], "fixed-k");
    assert_eq!(reports.last().unwrap()["mean_active_experts"], 1.0);
    // The token map shows the adapter's masks (the first variant after top-K).
    let html = std::fs::read_to_string(&token_map).unwrap();
    assert!(html.contains("Experts kept per token: mine"), "{html:.300}");
    assert_eq!(html.matches("<span class=\"t\"").count(), 512);
    for png in [&plot, &layers, &choice_plot] {
        let bytes = std::fs::read(png).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 5000,
            "{png:?}"
        );
    }

    let data = TokenData::from_file(
        &repo_root().join("assets/corpus/kjv-valid.txt.gz"),
        &dir.join("tokenizer.json"),
        300,
    )
    .unwrap();
    let options = EvalOptions {
        seq_len: 64,
        batch_size: 8,
        max_tokens: Some(1024),
    };
    for (report, mode) in [
        (&reports[0], MaskMode::TopK),
        (&reports[1], MaskMode::Learned),
    ] {
        let want = evaluate(&model, &data, mode, &options, "library").unwrap();
        assert_eq!(report["tokens"], want.tokens);
        for (key, value) in [
            ("loss", want.loss),
            ("next_token_accuracy", want.next_token_accuracy),
            ("mean_active_experts", want.mean_active_experts),
            ("moe_flops_reduction", want.moe_flops_reduction),
        ] {
            let got = report[key].as_f64().unwrap();
            assert!(
                (got - value).abs() < 1e-9,
                "{key}: CLI {got}, library {value}"
            );
        }
    }
    let beam = &reports[1];
    assert!(
        beam["mean_active_experts"].as_f64().unwrap() < 2.0,
        "BEAM masks: {beam}"
    );
    // --choice-items: every row has the multiple-choice accuracy, top-K's the library's.
    let text =
        beam_train::data::read_text(&repo_root().join("assets/corpus/kjv-valid.txt.gz")).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let choice = beam_train::choice::ChoiceOptions {
        max_items: Some(2),
        max_len: Some(128),
        ..Default::default()
    };
    let items = beam_train::choice::choice_items(&text, &tokenizer, &choice).unwrap();
    let want = beam_train::choice::evaluate_choice(&model, &items, MaskMode::TopK, 32).unwrap();
    assert_eq!(reports[0]["choice_accuracy"].as_f64(), Some(want.accuracy));
    assert!(reports
        .iter()
        .all(|r| r["choice_accuracy"].as_f64().is_some()));
    assert!(table.contains("choice acc."), "{table}");
    std::fs::remove_dir_all(scratch).ok();
}

/// Output piped into a reader that stops early (`beam logits … | head`) ends `beam` like any Unix
/// tool (SIGPIPE), without a panic message.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    use std::io::Read;
    use std::process::Stdio;
    let ids = (0..200)
        .map(|i| (i % 300).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut child = Command::new(env!("CARGO_BIN_EXE_beam"))
        .args([
            "logits",
            "--model",
            "assets/models/tiny-olmoe",
            "--ids",
            &ids,
        ])
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then dropped: closed
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with(b"{\"logits\""));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
