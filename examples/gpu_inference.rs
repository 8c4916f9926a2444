//! Generate with a Hugging Face MoE checkpoint on the GPU, top-K and BEAM side by side.
//!
//! ```text
//! cargo run --release --features cuda --example gpu_inference -- \
//!     [--model assets/models/kjv-moe] [--beam-adapter FILE] [--prompt TEXT] [--max-new-tokens 64] [--backend cuda|wgpu|ndarray]
//! ```
//! Loads the checkpoint folder (config.json + safetensors + tokenizer.json) on burn-cuda (or wgpu
//! with `--features wgpu --backend wgpu`, or ndarray), generates greedily with plain top-K and
//! with the BEAM adapter, and prints tokens/s, time per token, experts kept per token and MoE
//! FLOPs cut for both. Without a usable CUDA device it prints one line and exits with status 1.

use std::path::PathBuf;

use beam_model::model::generate::{generate, GenerateConfig, Generation};
use beam_model::model::load::load_model;
use beam_model::model::{MaskMode, MoeLm};
use beam_model::MoeBackend;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Top-K vs BEAM generation on the GPU")]
struct Args {
    /// Checkpoint folder.
    #[arg(long, default_value = "assets/models/kjv-moe")]
    model: PathBuf,
    /// BEAM adapter (default: the folder's beam-adapter.safetensors if present).
    #[arg(long)]
    beam_adapter: Option<PathBuf>,
    /// Prompt.
    #[arg(long, default_value = "And God said unto Moses,")]
    prompt: String,
    /// New tokens per run.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// cuda (needs --features cuda), wgpu (needs --features wgpu) or ndarray.
    #[arg(long, default_value = "cuda")]
    backend: String,
}

fn main() {
    let args = Args::parse();
    let result = match args.backend.as_str() {
        "ndarray" => run::<burn::backend::NdArray>(&args, &Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => beam::cuda_device().and_then(|d| run::<burn::backend::Cuda>(&args, &d)),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err("this example was built without CUDA: add `--features cuda` (or use --backend wgpu / ndarray)".into()),
        #[cfg(feature = "wgpu")]
        "wgpu" => beam::wgpu_device().and_then(|d| run::<burn::backend::Wgpu>(&args, &d)),
        other => Err(format!("backend {other} is not available in this build")),
    };
    if let Err(err) = result {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn run<B: MoeBackend>(args: &Args, device: &B::Device) -> Result<(), String> {
    let base: MoeLm<B> = load_model(&args.model, device).map_err(|e| e.to_string())?;
    let adapter = args
        .beam_adapter
        .clone()
        .or_else(|| Some(args.model.join("beam-adapter.safetensors")).filter(|p| p.exists()))
        .ok_or("no --beam-adapter given and the model folder has no beam-adapter.safetensors")?;
    let beam = base
        .clone()
        .load_beam_adapter(&adapter, device)
        .map_err(|e| e.to_string())?;
    let tokenizer = tokenizers::Tokenizer::from_file(args.model.join("tokenizer.json"))
        .map_err(|e| format!("{}: {e}", args.model.join("tokenizer.json").display()))?;
    let prompt = tokenizer
        .encode(args.prompt.as_str(), false)
        .map_err(|e| e.to_string())?
        .get_ids()
        .to_vec();
    if prompt.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    let settings = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        eos_token_ids: Vec::new(), // same length for both runs
        ..GenerateConfig::default()
    };
    let moe = beam
        .moe_layers()
        .next()
        .ok_or("the model has no MoE layer")?
        .config()
        .clone();
    // Warm-up (kernel compilation, autotune) so the timed runs measure steady state.
    let warm = GenerateConfig {
        max_new_tokens: 4,
        ..settings.clone()
    };
    generate(&base, &prompt, &warm);
    generate(&beam, &prompt, &warm);

    println!(
        "{} on {}: prompt {} tokens, {} new tokens, greedy",
        args.model.display(),
        args.backend,
        prompt.len(),
        args.max_new_tokens
    );
    println!(
        "{:<6} {:>10} {:>10} {:>10} {:>14} {:>14}",
        "", "tokens/s", "ms/token", "prefill ms", "experts/token", "MoE FLOPs cut"
    );
    let mut texts = Vec::new();
    for (name, model, mode) in [
        ("top-K", &base, MaskMode::TopK),
        ("BEAM", &beam, MaskMode::Learned),
    ] {
        let g: Generation = generate(
            model,
            &prompt,
            &GenerateConfig {
                mask: mode,
                ..settings.clone()
            },
        );
        let flops = beam_model::moe_layer_flops(&moe, g.routed_tokens, g.kept_pairs);
        let cut = if mode == MaskMode::TopK {
            0.0
        } else {
            flops.reduction()
        };
        let tps = g.decode_tokens_per_second();
        println!(
            "{name:<6} {tps:>10.1} {:>10.2} {:>10.1} {:>10.2} / {} {:>13.1}%",
            1000.0 / tps.max(1e-9),
            g.prefill_time.as_secs_f64() * 1e3,
            g.mean_active_experts(),
            moe.top_k,
            100.0 * cut
        );
        texts.push((
            name,
            tokenizer.decode(&g.ids, true).map_err(|e| e.to_string())?,
        ));
    }
    for (name, text) in texts {
        println!("{name:<6}| {}{}", args.prompt, text.replace('\n', " / "));
    }
    Ok(())
}
