//! `beam bench`: the whole model, top-K then BEAM, on one checkpoint: load time, peak RSS,
//! prefill and decode tokens/s, experts per token and the weight bytes each decoded token reads.

use std::time::Instant;

use beam_model::checkpoint::WeightDtype;
use beam_model::model::config::ModelConfig;
use beam_model::model::generate::{try_generate, GenerateConfig, Generation};
use beam_model::model::MaskMode;
use beam_model::{MaskRule, MoeBackend};
use clap::Args;

use crate::{load, Common};

/// Options of `beam bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub common: Common,
    /// BEAM without an adapter: every token keeps its K' highest-weight experts (row `keep-K'`).
    /// Default without `--beam-adapter`: K / 4, at least 1.
    #[arg(long, conflicts_with = "beam_adapter")]
    keep: Option<usize>,
    /// Prompt length (seeded random token ids).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded after the prompt.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
    /// Precision of the KV cache (f32, f16, bf16); default as `beam generate`'s.
    #[arg(long)]
    kv_cache: Option<WeightDtype>,
}

/// One variant's measurements.
struct Row {
    variant: String,
    generation: Generation,
    peak_rss_bytes: Option<u64>,
    weight_bytes_per_token: f64,
}

pub fn bench<B: MoeBackend>(args: &BenchArgs, device: &B::Device) -> Result<(), String> {
    if args.prompt_tokens == 0 || args.new_tokens < 2 {
        return Err("--prompt-tokens must be positive and --new-tokens at least 2".into());
    }
    // Every option is checked against the config before the weights are loaded.
    let config = ModelConfig::from_dir(&args.common.model).map_err(|e| e.to_string())?;
    let top_k = config.moe.top_k;
    let beam = match (&args.common.beam_adapter, args.keep) {
        (Some(path), _) => (
            format!(
                "beam ({})",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
            MaskMode::Learned,
        ),
        (None, keep) => {
            let k = keep.unwrap_or((top_k / 4).max(1));
            if k == 0 || k > top_k {
                return Err(format!(
                    "--keep {k} must lie in 1..={top_k} (the model's K)"
                ));
            }
            (format!("keep-{k}"), MaskMode::Rule(MaskRule::FixedK { k }))
        }
    };
    if let Some(context) = config.max_position_embeddings {
        let positions = args.prompt_tokens.saturating_add(args.new_tokens);
        if positions > context {
            return Err(format!(
                "--prompt-tokens + --new-tokens = {positions} exceeds the model's context of \
                 {context} positions"
            ));
        }
    }
    let start = Instant::now();
    let model = load::<B>(&args.common, device)?;
    let load_s = start.elapsed().as_secs_f64();
    let mask_outputs = model
        .moe_layers()
        .next()
        .map_or(0, |moe| moe.config().mask_router_outputs());
    // Quantized weights count their packed bytes and scale (1 + 2/32 for q8, 1/2 + 2/32 for
    // q4; the routers and norms, f32, are a fraction of a percent of the weights read);
    // otherwise the held precision's bytes.
    let (dtype, bytes_per_weight) = match model.quantization() {
        Some(q) => (q.name(), q.bytes_per_weight()),
        None => (
            model.weight_dtype().name(),
            model.weight_dtype().bytes() as f64,
        ),
    };
    let kv_dtype = args.kv_cache.unwrap_or(model.default_kv_dtype());
    let prompt = prompt_ids(args.prompt_tokens, config.vocab_size);
    let mut rows = Vec::new();
    for (variant, mask) in [("top-K".to_string(), MaskMode::TopK), beam] {
        let settings = GenerateConfig {
            max_new_tokens: args.new_tokens,
            eos_token_ids: Vec::new(),
            mask,
            kv_dtype: Some(kv_dtype),
            ..Default::default()
        };
        // Warm-up: first-call costs (allocations, kernel compilation on GPUs) are not measured.
        try_generate(
            &model,
            &prompt[..prompt.len().min(8)],
            &GenerateConfig {
                max_new_tokens: 2,
                ..settings.clone()
            },
        )
        .map_err(|e| e.to_string())?;
        let generation = try_generate(&model, &prompt, &settings).map_err(|e| e.to_string())?;
        let mask_outputs = if matches!(mask, MaskMode::Learned) {
            mask_outputs
        } else {
            0
        };
        let weights =
            config.weights_read_per_token(generation.decode_active_experts(), mask_outputs);
        rows.push(Row {
            variant,
            generation,
            peak_rss_bytes: peak_rss_bytes(),
            weight_bytes_per_token: weights * bytes_per_weight,
        });
    }
    let backend = args.common.backend.name();
    // What the cache holds after the last decoded token: the bytes each decode step's attention
    // reads at the end (beside the weights).
    let kv_cache_bytes =
        (args.prompt_tokens + args.new_tokens) * config.kv_cache_bytes_per_token(kv_dtype.bytes());
    if !args.json {
        println!(
            "model {} ({} layers, {} experts, top-{top_k}), {backend}, weights {dtype} in memory, \
             KV cache {kv_dtype} ({:.1} MB at the last token); load {load_s:.2} s; prompt {} \
             tokens, {} new",
            args.common.model.display(),
            config.num_layers,
            config.moe.num_experts,
            kv_cache_bytes as f64 / 1e6,
            args.prompt_tokens,
            args.new_tokens
        );
        println!(
            "{:<28} {:>10} {:>10} {:>13} {:>14} {:>12} {:>12}",
            "variant", "prefill/s", "decode/s", "experts/tok", "GB read/tok", "GB/s", "peak RSS GB"
        );
    }
    for row in &rows {
        let g = &row.generation;
        let prefill = args.prompt_tokens as f64 / g.prefill_time.as_secs_f64().max(1e-9);
        let decode = g.decode_tokens_per_second();
        let gbps = row.weight_bytes_per_token * decode / 1e9;
        if args.json {
            let json = serde_json::json!({
                "variant": row.variant,
                "dtype": dtype,
                "kv_dtype": kv_dtype.name(),
                "kv_cache_bytes": kv_cache_bytes,
                "backend": backend,
                "load_s": load_s,
                "peak_rss_bytes": row.peak_rss_bytes,
                "prefill_tokens": args.prompt_tokens,
                "decode_tokens": g.ids.len().saturating_sub(1),
                "prefill_tokens_per_s": prefill,
                "decode_tokens_per_s": decode,
                "experts_per_token": g.decode_active_experts(),
                "top_k": top_k,
                "weight_bytes_per_token": row.weight_bytes_per_token,
                "weight_gb_per_s": gbps,
            });
            println!("{json}");
        } else {
            println!(
                "{:<28} {:>10.1} {:>10.2} {:>8.2} / {top_k} {:>14.3} {:>12.1} {:>12}",
                row.variant,
                prefill,
                decode,
                g.decode_active_experts(),
                row.weight_bytes_per_token / 1e9,
                gbps,
                row.peak_rss_bytes
                    .map_or("n/a".to_string(), |b| format!("{:.2}", b as f64 / 1e9))
            );
        }
    }
    Ok(())
}

/// `n` token ids in `0..vocab` from a fixed-seed generator (the same prompt every run).
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x5EED_u64;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// The process's peak resident set (`VmHWM` in `/proc/self/status`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
