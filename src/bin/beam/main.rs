//! `beam`: inspect, run and generate with Hugging Face MoE checkpoints, with or without BEAM.
//!
//! ```text
//! beam info     --model DIR [--beam-adapter FILE]
//! beam logits   --model DIR --ids 72,101,108
//! beam generate --model DIR (--prompt TEXT | --ids 1,2,3) --max-new-tokens N [--temperature T]
//!               [--top-p P] [--seed S] [--json] [--beam-adapter FILE [--threshold τ]]
//! beam train    --model DIR --data FILE --out DIR [--steps N] [--lambda λ] [--loss distill|cross-entropy|both]
//!               [--train mask-routers|routers|all] [--target-active-fraction F] ...
//! beam eval     --model DIR --data FILE [--adapter LABEL=FILE]... [--peers] [--max-tokens N]
//!               [--json FILE] [--plot FILE.png] [--layer-plot FILE.png]
//! beam bench    --model DIR [--dtype D] [--beam-adapter FILE | --keep K'] [--prompt-tokens 128]
//!               [--new-tokens 64] [--json]
//! ```
//! Every command takes `--backend flex|ndarray|wgpu|cuda` (flex, burn's CPU backend, by default;
//! train and eval default to ndarray; wgpu and cuda need the cargo features of the same name).
//! info, logits, generate and bench take `--dtype f32|f16|bf16` (default: the checkpoint's
//! precision where the backend holds it) and `--quantize q8|q4` (int8 or 4-bit linear weights;
//! eval takes it too). Errors print one line and exit with status 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use beam_model::checkpoint::{Quantization, WeightDtype};
use beam_model::model::generate::{ids_tensor, try_generate, GenerateConfig};
use beam_model::model::load::{load_model_with, LoadOptions};
use beam_model::model::{HiddenStates, MaskMode, MoeLm};
use beam_model::MoeBackend;
use clap::{Args, Parser, Subcommand, ValueEnum};

mod bench;
mod train;

#[derive(Parser)]
#[command(
    name = "beam",
    version,
    about = "BEAM Mixture-of-Experts models on burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BackendChoice {
    /// burn's Flex CPU backend: weights in f32, bf16 or f16, activations f32.
    Flex,
    /// burn's ndarray CPU backend: f32 weights.
    Ndarray,
    /// burn's wgpu backend (Vulkan, Metal, DX12; feature `wgpu`).
    Wgpu,
    /// burn's CUDA backend (feature `cuda`).
    Cuda,
}

impl BackendChoice {
    /// The name `--backend` spells.
    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Flex => "flex",
            BackendChoice::Ndarray => "ndarray",
            BackendChoice::Wgpu => "wgpu",
            BackendChoice::Cuda => "cuda",
        }
    }
}

#[derive(Args)]
struct Common {
    /// Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendChoice,
    /// Precision the weights are held in (f32, f16, bf16). Default: the checkpoint's, where the
    /// backend can hold it (flex, cuda), else f32. Activations are f32 either way.
    #[arg(long)]
    dtype: Option<WeightDtype>,
    /// Quantize the linear weights (attention, experts, dense MLPs, LM head) at load: q8 is
    /// block-wise int8, q4 block-wise 4-bit (llama.cpp's Q4_0; both blocks of 32, one f16 scale
    /// each), read in place by flex; other backends dequantize them once at load. Embeddings,
    /// norms and routers keep --dtype / f32.
    #[arg(long)]
    quantize: Option<Quantization>,
    /// Copy every weight into memory beam owns. By default flex reads the weights it keeps in
    /// their stored dtype where the memory-mapped checkpoint has them (no copy, as llama.cpp
    /// does; this flag is its --no-mmap).
    #[arg(long)]
    no_mmap: bool,
    /// BEAM adapter (mask routers, safetensors) to turn BEAM on.
    #[arg(long)]
    beam_adapter: Option<PathBuf>,
    /// Mask threshold τ in (0, 1) (needs --beam-adapter; default: the adapter's).
    #[arg(long)]
    threshold: Option<f64>,
}

#[derive(Subcommand)]
enum Command {
    /// Family, layers, experts, top-K, parameters, BEAM adapter.
    Info {
        #[command(flatten)]
        common: Common,
    },
    /// Logits of one sequence as JSON: {"logits": [[V floats] × T]}.
    Logits {
        #[command(flatten)]
        common: Common,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
    },
    /// Generate text.
    Generate {
        #[command(flatten)]
        common: Common,
        /// Prompt text (tokenised with DIR/tokenizer.json).
        #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
        prompt: Option<String>,
        /// Prompt token ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        ids: Option<Vec<u32>>,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// 0 (default) is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Nucleus sampling mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Sampler seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print {"ids": [...new ids...], "text": "..."} instead of the text.
        #[arg(long)]
        json: bool,
        /// Precision of the KV cache (f32, f16, bf16). Default on flex: the weights' when they
        /// are 16-bit, f16 when they are quantized (llama.cpp's default), else f32; f32 on the
        /// other backends.
        #[arg(long)]
        kv_cache: Option<WeightDtype>,
    },
    /// Train BEAM mask routers on a text corpus; writes OUT/adapter.safetensors.
    Train(train::TrainArgs),
    /// Held-out loss, perplexity, accuracy, experts per token and MoE FLOPs cut of top-K, BEAM
    /// adapters and the training-free peers.
    Eval(train::EvalArgs),
    /// Whole-model speed, top-K then BEAM: load time, peak RSS, prefill and decode tokens/s,
    /// experts per token, weight bytes read per decoded token.
    Bench(bench::BenchArgs),
}

impl Command {
    fn common(&self) -> &Common {
        match self {
            Command::Info { common }
            | Command::Logits { common, .. }
            | Command::Generate { common, .. } => common,
            Command::Bench(args) => &args.common,
            Command::Train(_) | Command::Eval(_) => {
                unreachable!("train and eval have their own options")
            }
        }
    }

    fn backend(&self) -> BackendChoice {
        match self {
            Command::Train(args) => args.backend(),
            Command::Eval(args) => args.backend(),
            _ => self.common().backend,
        }
    }
}

fn main() -> ExitCode {
    // Output piped into a program that stops reading (`beam logits … | head`) ends `beam` quietly,
    // as it does any Unix tool, instead of panicking in `println!` on the broken pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    reuse_freed_memory();
    let cli = Cli::parse();
    // The commands run on the pool's threads (`on_pool` below): give them the main thread's
    // usual stack rather than rayon's 2 MiB. Fails only if the pool already exists.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    let result = match cli.command.backend() {
        // On a thread of the host kernels' pool: see `beam_kernels::host::on_pool`.
        BackendChoice::Flex => beam_kernels::host::on_pool(|| {
            run::<burn::backend::Flex>(&cli.command, &Default::default())
        }),
        BackendChoice::Ndarray => beam_kernels::host::on_pool(|| {
            run::<burn::backend::NdArray>(&cli.command, &Default::default())
        }),
        BackendChoice::Wgpu => run_wgpu(&cli.command),
        BackendChoice::Cuda => run_cuda(&cli.command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's malloc serves every allocation of at least 32 MB (and, on threads other than the main
/// one, of a few MB) with fresh `mmap`ed pages and unmaps them when they are freed, so a prefill's
/// large buffers (a 1 024-token prompt's expert activations: hundreds of MB per layer) are
/// page-faulted and zeroed by the kernel again in every layer (12 % of a 3 000-token prefill's
/// profile). One arena, no `mmap` below 1 GiB and no trimming below 2 GiB keep freed buffers for
/// the next layer instead: prefill +9–17 %, peak RSS +0.3 % (docs/BENCHMARKS.md, session 24).
/// Process-wide, so it belongs to the binary; a program embedding the library can do the same.
fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes malloc's parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(feature = "wgpu")]
fn run_wgpu(command: &Command) -> Result<(), String> {
    beam::wgpu_device().and_then(|device| run::<burn::backend::Wgpu>(command, &device))
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu(_: &Command) -> Result<(), String> {
    Err("this binary was built without wgpu: rebuild with `--features wgpu`".into())
}

#[cfg(feature = "cuda")]
fn run_cuda(command: &Command) -> Result<(), String> {
    beam::cuda_device().and_then(|device| run::<burn::backend::Cuda>(command, &device))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &Command) -> Result<(), String> {
    Err("this binary was built without CUDA: rebuild with `--features cuda`".into())
}

fn load<B: MoeBackend>(common: &Common, device: &B::Device) -> Result<MoeLm<B>, String> {
    let options = LoadOptions {
        dtype: common.dtype,
        quantize: common.quantize,
        copy_weights: common.no_mmap,
    };
    let mut model =
        load_model_with::<B>(&common.model, device, &options).map_err(|e| e.to_string())?;
    if let Some(adapter) = &common.beam_adapter {
        model = model
            .load_beam_adapter(adapter, device)
            .map_err(|e| e.to_string())?;
    }
    // The threshold was checked by `check_options`.
    if let Some(threshold) = common.threshold {
        model = model.with_threshold(threshold).map_err(|e| e.to_string())?;
    }
    Ok(model)
}

/// `beam info`: `config.json` and the safetensors headers only (no tensor data is read, so it costs
/// the same for a tiny model and a 100 GB one, and a checkpoint with damaged tensor data still
/// describes itself), plus the adapter's header when one is given.
fn info(common: &Common) -> Result<(), String> {
    use beam_model::checkpoint::TensorStore;
    use beam_model::model::adapter::read_adapter_header;
    use beam_model::model::config::ModelConfig;

    let config = ModelConfig::from_dir(&common.model).map_err(|e| e.to_string())?;
    let store = TensorStore::open_dir_headers(&common.model).map_err(|e| e.to_string())?;
    let beam = match &common.beam_adapter {
        Some(path) => {
            let mut beam = read_adapter_header(path, &config).map_err(|e| e.to_string())?;
            // Checked by `check_options`.
            if let Some(threshold) = common.threshold {
                beam.threshold = threshold;
            }
            Some(beam)
        }
        None => None,
    };
    let moe = &config.moe;
    println!("family:      {}", config.family);
    println!(
        "layers:      {} ({} MoE)",
        config.num_layers,
        config.num_moe_layers()
    );
    println!(
        "experts:     {} routed, top-{}{}",
        moe.num_experts,
        moe.top_k,
        moe.shared_expert
            .as_ref()
            .map_or(String::new(), |s| format!(
                ", shared expert of size {}",
                s.intermediate_size
            ))
    );
    println!(
        "hidden:      {} (expert intermediate {}), heads {}/{} kv, head_dim {}",
        config.hidden_size,
        moe.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim
    );
    if let Some(mla) = &config.mla {
        println!(
            "attention:   MLA, kv_lora_rank {}, {}, qk_nope {} + qk_rope {}, v {}, RoPE {}",
            mla.kv_lora_rank,
            mla.q_lora_rank
                .map_or("q_proj".to_string(), |r| format!("q LoRA rank {r}")),
            mla.qk_nope_head_dim,
            mla.qk_rope_head_dim,
            mla.v_head_dim,
            if mla.rope_interleave {
                "interleaved"
            } else {
                "halves"
            },
        );
    }
    if let beam_model::model::config::RopeScaling::Yarn {
        factor,
        original_max_position_embeddings,
        ..
    } = config.rope_scaling
    {
        println!(
            "rope:        yarn, factor {factor} of {original_max_position_embeddings} positions"
        );
    }
    // The cache's precision depends on the weights the backend holds (`MoeLm::default_kv_dtype`):
    // both sizes.
    println!(
        "KV cache:    {} per token in 16 bits, {} in f32 ({})",
        kib(config.kv_cache_bytes_per_token(2)),
        kib(config.kv_cache_bytes_per_token(4)),
        kv_cache_kind(&config)
    );
    println!("vocabulary:  {}", config.vocab_size);
    println!("parameters:  {}", config.parameters());
    match (&common.beam_adapter, beam) {
        (Some(path), Some(beam)) => println!(
            "BEAM:        adapter {} (threshold {})",
            path.display(),
            beam.threshold
        ),
        _ => println!("BEAM:        no adapter (plain top-{})", moe.top_k),
    }
    let summary = store.summary();
    let stored: Vec<String> = summary
        .by_dtype
        .iter()
        .map(|(dtype, d)| format!("{dtype} {} params", count(d.elements)))
        .collect();
    println!(
        "stored as:   {} ({:.2} GB in {} file{})",
        stored.join(", "),
        summary.file_bytes as f64 / 1e9,
        summary.files,
        if summary.files == 1 { "" } else { "s" }
    );
    for path in &summary.bad_length {
        eprintln!(
            "warning: {}: file size does not match its header (truncated?): loading it will fail",
            path.display()
        );
    }
    Ok(())
}

/// `bytes` in B, KiB or MiB.
fn kib(bytes: usize) -> String {
    match bytes {
        0..10_240 => format!("{bytes} B"),
        10_240..10_485_760 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1048576.0),
    }
}

/// What the KV cache holds: keys and values, or with MLA the compressed latent and how many
/// times less that takes than full per-head keys and values.
fn kv_cache_kind(config: &beam_model::model::config::ModelConfig) -> String {
    if config.mla.is_some() {
        let full = config.full_kv_values_per_token() as f64;
        format!(
            "compressed latent; full K/V would take {:.1}× more",
            full / config.kv_cache_values_per_token() as f64
        )
    } else {
        "keys and values".to_string()
    }
}

/// Bytes the KV cache takes per token in `dtype`, and what it holds.
fn kv_cache_line(config: &beam_model::model::config::ModelConfig, dtype: WeightDtype) -> String {
    format!(
        "{} per token ({dtype}; {})",
        kib(config.kv_cache_bytes_per_token(dtype.bytes())),
        kv_cache_kind(config)
    )
}

/// Range checks of the options of info, logits, generate and bench, before anything is read.
fn check_options(command: &Command) -> Result<(), String> {
    if let Command::Generate {
        max_new_tokens,
        temperature,
        top_p,
        ..
    } = command
    {
        if *max_new_tokens == 0 {
            return Err("--max-new-tokens must be at least 1".into());
        }
        if !(temperature.is_finite() && *temperature >= 0.0) {
            return Err(format!(
                "--temperature {temperature} must be a finite number ≥ 0 (0 is greedy)"
            ));
        }
        if !(*top_p > 0.0 && *top_p <= 1.0) {
            return Err(format!("--top-p {top_p} must be in (0, 1]"));
        }
    }
    let common = command.common();
    if let Some(threshold) = common.threshold {
        if common.beam_adapter.is_none() {
            return Err("--threshold needs --beam-adapter".into());
        }
        beam_model::config::check_threshold(threshold).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `50688`, `1.88 M`, `6.92 B`.
fn count(n: u64) -> String {
    match n {
        0..=999_999 => n.to_string(),
        1_000_000..=999_999_999 => format!("{:.2} M", n as f64 / 1e6),
        _ => format!("{:.2} B", n as f64 / 1e9),
    }
}

fn tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer, String> {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path).map_err(|e| format!("{}: {e}", path.display()))
}

fn check_ids(ids: &[u32], vocab: usize) -> Result<(), String> {
    if ids.is_empty() {
        return Err("no token ids given".into());
    }
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(format!(
            "token id {id} is outside the vocabulary (size {vocab})"
        )),
        None => Ok(()),
    }
}

fn run<B: MoeBackend>(command: &Command, device: &B::Device) -> Result<(), String> {
    match command {
        Command::Train(args) => return train::train::<burn::backend::Autodiff<B>>(args, device),
        Command::Eval(args) => return train::eval::<B>(args, device),
        _ => {}
    }
    // Info, logits, generate and bench: every option checked before anything is read.
    check_options(command)?;
    let common = command.common();
    match command {
        Command::Info { .. } => return info(common),
        Command::Bench(args) => return bench::bench::<B>(args, device),
        _ => {}
    }
    let model = load::<B>(common, device)?;
    let config = model.config();
    match command {
        Command::Logits { ids, .. } => {
            check_ids(ids, config.vocab_size)?;
            let out = model.forward(
                ids_tensor::<B>(ids, device),
                None,
                MaskMode::Learned,
                HiddenStates::Skip,
            );
            let [_, t, v] = out.logits.dims();
            let values = out
                .logits
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| format!("{e:?}"))?;
            let rows: Vec<&[f32]> = values.chunks(v).take(t).collect();
            println!("{}", serde_json::json!({ "logits": rows }));
        }
        Command::Info { .. } | Command::Train(_) | Command::Eval(_) | Command::Bench(_) => {
            unreachable!("handled above")
        }
        Command::Generate {
            prompt,
            ids,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            json,
            kv_cache,
            ..
        } => {
            let tokenizer = tokenizer(&common.model);
            let prompt_ids = match (prompt, ids) {
                (Some(text), _) => tokenizer
                    .as_ref()
                    .map_err(Clone::clone)?
                    .encode(text.as_str(), false)
                    .map_err(|e| format!("cannot tokenise the prompt: {e}"))?
                    .get_ids()
                    .to_vec(),
                (None, Some(ids)) => ids.clone(),
                (None, None) => unreachable!("clap requires --prompt or --ids"),
            };
            check_ids(&prompt_ids, config.vocab_size)?;
            if let Some(context) = config.max_position_embeddings {
                if prompt_ids.len() > context {
                    return Err(format!(
                        "the prompt has {} tokens, more than the model's context of {context} \
                         positions (max_position_embeddings)",
                        prompt_ids.len()
                    ));
                }
            }
            let settings = GenerateConfig {
                max_new_tokens: *max_new_tokens,
                temperature: *temperature,
                top_p: *top_p,
                seed: *seed,
                eos_token_ids: config.eos_token_ids.clone(),
                mask: MaskMode::Learned,
                kv_dtype: *kv_cache,
            };
            let generation =
                try_generate(&model, &prompt_ids, &settings).map_err(|e| e.to_string())?;
            let text = match &tokenizer {
                Ok(tok) => tok
                    .decode(&generation.ids, true)
                    .map_err(|e| format!("cannot decode: {e}"))?,
                Err(_) if *json || ids.is_some() => String::new(),
                Err(err) => return Err(err.clone()),
            };
            if *json {
                println!(
                    "{}",
                    serde_json::json!({ "ids": generation.ids, "text": text })
                );
            } else {
                println!("{text}");
            }
            // The first new token comes from the prompt's forward; decode speed is timed over
            // the tokens after it, so there is none to report for fewer than two.
            let speed = if generation.ids.len() >= 2 {
                format!(
                    "{:.1} tokens/s decode, {:.2} ms/token",
                    generation.decode_tokens_per_second(),
                    1000.0 / generation.decode_tokens_per_second().max(1e-9),
                )
            } else {
                "no decode step to time".to_string()
            };
            eprintln!(
                "[beam] {} new tokens, prompt {:.1} ms, {speed}, {:.2} of {} experts kept per token per MoE layer{}",
                generation.ids.len(),
                generation.prefill_time.as_secs_f64() * 1000.0,
                generation.mean_active_experts(),
                config.moe.top_k,
                if model.has_beam() { " (BEAM)" } else { " (top-K)" },
            );
            eprintln!(
                "[beam] KV cache: {} tokens, {}",
                prompt_ids.len() + generation.ids.len(),
                kv_cache_line(config, kv_cache.unwrap_or(model.default_kv_dtype()))
            );
            if generation.context_limit_reached {
                eprintln!(
                    "[beam] stopped at the model's context of {} positions (max_position_embeddings)",
                    config.max_position_embeddings.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
