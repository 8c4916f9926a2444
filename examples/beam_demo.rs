//! BEAM on a real (small) MoE language model, on the CPU, with shipped assets only.
//!
//! Loads the Qwen3-MoE model trained on the King James Bible (`assets/models/kjv-moe`, 16 experts,
//! top-4) and its trained BEAM adapter, evaluates both on the held-out chapters, prints a table
//! and a sample continuation from each, and optionally trains a fresh adapter for a few steps.
//!
//! ```text
//! cargo run --release --example beam_demo [-- --max-tokens N --train-steps 0 --report out.json]
//!     [--check docs/eval/kjv-moe.json]
//! ```
//! `--report FILE` writes JSON with `k, topk_eval_loss, beam_eval_loss, topk_next_token_accuracy,
//! beam_next_token_accuracy, moe_flops_reduction, mean_active_experts, eval_tokens,
//! topk_choice_accuracy, beam_choice_accuracy, choice_items` (BEAM's
//! numbers are those of the shipped adapter). `--check FILE` compares top-K's and the shipped
//! adapter's numbers with a `beam eval --json` report (entries `top-k` and `--check-label`) and
//! fails if any is off by more than [`TOLERANCES`]: CI runs it against `docs/eval/kjv-moe.json`,
//! so a change that costs quality fails CI.

use std::path::PathBuf;
use std::time::Instant;

use beam_model::model::generate::{generate, GenerateConfig};
use beam_model::model::load::load_model;
use beam_model::model::{MaskMode, MoeLm};
use beam_train::choice::{choice_items, evaluate_choice, ChoiceOptions};
use beam_train::eval::{evaluate, EvalOptions, EvalReport};
use beam_train::{TokenData, TrainConfig};
use burn::backend::{Autodiff, NdArray};
use clap::Parser;

type B = NdArray<f32>;

#[derive(Parser)]
#[command(about = "Evaluate the shipped KJV MoE model with and without its BEAM adapter")]
struct Args {
    /// Base model folder.
    #[arg(long, default_value = "assets/models/kjv-moe")]
    model: PathBuf,
    /// BEAM adapter.
    #[arg(long, default_value = "assets/models/kjv-moe/beam-adapter.safetensors")]
    adapter: PathBuf,
    /// Held-out text.
    #[arg(long, default_value = "assets/corpus/kjv-valid.txt.gz")]
    data: PathBuf,
    /// Evaluate at most this many validation tokens (default: the whole split, 66 560 tokens).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Also train a fresh adapter for this many steps on the training split and evaluate it.
    #[arg(long, default_value_t = 0)]
    train_steps: usize,
    /// λ of that training run.
    #[arg(long, default_value_t = 0.3)]
    lambda: f64,
    /// Multiple-choice items to score each variant on (0: skip the task metric).
    #[arg(long, default_value_t = 1000)]
    choice_items: usize,
    /// Write the headline numbers as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Compare with a `beam eval --json` report (whole split): exit 1 if a number is off.
    #[arg(long)]
    check: Option<PathBuf>,
    /// The entry of `--check`'s report that the shipped adapter must reproduce.
    #[arg(long, default_value = "beam lambda=0.3")]
    check_label: String,
}

/// Largest differences `--check` accepts, per number: evaluation is deterministic, so only
/// floating-point summation order (other CPUs, other thread counts) may move them, by far less
/// than these; a change in quality moves them by more.
const TOLERANCES: [(&str, f64); 4] = [
    ("loss", 2e-3),
    ("next_token_accuracy", 1e-3),
    ("mean_active_experts", 1e-2),
    ("moe_flops_reduction", 2e-3),
];

/// Differences of `got` from the entry `label` of the report at `path`, beyond [`TOLERANCES`].
fn check(path: &std::path::Path, label: &str, got: &EvalReport) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let want = entries
        .iter()
        .find(|e| e["label"] == label)
        .ok_or_else(|| format!("{}: no entry labelled {label:?}", path.display()))?;
    let got = serde_json::to_value(got).map_err(|e| e.to_string())?;
    let mut off = Vec::new();
    if got["tokens"] != want["tokens"] {
        off.push(format!(
            "{label}: evaluated {} tokens, the report {} (run on the whole split)",
            got["tokens"], want["tokens"]
        ));
    }
    for (key, tolerance) in TOLERANCES {
        let (g, w) = (got[key].as_f64(), want[key].as_f64());
        match (g, w) {
            (Some(g), Some(w)) if (g - w).abs() <= tolerance => {}
            _ => off.push(format!(
                "{label}: {key} {g:?}, the report says {w:?} (tolerance {tolerance})"
            )),
        }
    }
    Ok(off)
}

fn main() {
    if let Err(err) = run(Args::parse()) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let device = Default::default();
    let base: MoeLm<B> = load_model(&args.model, &device).map_err(|e| e.to_string())?;
    let k = base.config().moe.top_k;
    let beam = base
        .clone()
        .load_beam_adapter(&args.adapter, &device)
        .map_err(|e| e.to_string())?;
    let vocab = base.config().vocab_size;
    let tokenizer = args.model.join("tokenizer.json");
    let data = TokenData::from_file(&args.data, &tokenizer, vocab).map_err(|e| e.to_string())?;
    let options = EvalOptions {
        seq_len: 256,
        batch_size: 8,
        max_tokens: args.max_tokens,
    };
    // The multiple-choice task (beam_train::choice): held-out verses, true ending vs 3 others.
    let items = if args.choice_items > 0 {
        let text = beam_train::data::read_text(&args.data).map_err(|e| e.to_string())?;
        let tok = beam_train::data::load_tokenizer(&tokenizer).map_err(|e| e.to_string())?;
        let options = ChoiceOptions {
            max_items: Some(args.choice_items),
            max_len: base.config().max_position_embeddings,
            ..ChoiceOptions::default()
        };
        choice_items(&text, &tok, &options).map_err(|e| e.to_string())?
    } else {
        Vec::new()
    };
    let timed = |model: &MoeLm<B>, mode, label: &str| -> Result<(EvalReport, f64), String> {
        let start = Instant::now();
        let mut report =
            evaluate(model, &data, mode, &options, label).map_err(|e| e.to_string())?;
        if !items.is_empty() {
            let choice = evaluate_choice(model, &items, mode, ChoiceOptions::default().batch_size)
                .map_err(|e| e.to_string())?;
            report.choice_accuracy = Some(choice.accuracy);
        }
        Ok((report, start.elapsed().as_secs_f64()))
    };
    let mut rows = vec![
        timed(&base, MaskMode::TopK, "top-K")?,
        timed(&beam, MaskMode::Learned, "BEAM (shipped adapter)")?,
    ];
    if args.train_steps > 0 {
        let train_data = TokenData::from_file(
            &PathBuf::from("assets/corpus/kjv-train.txt.gz"),
            &tokenizer,
            vocab,
        )
        .map_err(|e| e.to_string())?;
        let out = std::env::temp_dir().join(format!("beam-demo-{}", std::process::id()));
        std::fs::remove_dir_all(&out).ok();
        let config = TrainConfig::new()
            .with_steps(args.train_steps)
            .with_lambda(args.lambda)
            .with_checkpoint_every(args.train_steps);
        println!(
            "training a fresh adapter: {} steps, λ = {}",
            args.train_steps, args.lambda
        );
        let summary = beam_train::train::<Autodiff<B>>(
            &args.model,
            &train_data,
            &config,
            &out,
            &device,
            &mut |m, c| {
                if (m.step + 1).is_multiple_of(10) || m.step + 1 == c.steps {
                    println!(
                        "  step {:>4}/{}  loss {:.4}  experts/token {:.2}  MoE FLOPs cut {:.1}%",
                        m.step + 1,
                        c.steps,
                        m.loss,
                        m.mean_active_experts,
                        100.0 * m.moe_flops_reduction
                    );
                }
            },
        )
        .map_err(|e| e.to_string())?;
        let fresh = base
            .clone()
            .load_beam_adapter(
                summary
                    .adapter
                    .as_ref()
                    .expect("a BEAM run writes an adapter"),
                &device,
            )
            .map_err(|e| e.to_string())?;
        let label = format!("BEAM ({} steps here)", args.train_steps);
        rows.push(timed(&fresh, MaskMode::Learned, &label)?);
        std::fs::remove_dir_all(&out).ok();
    }

    let top_k = rows[0].0.clone();
    // The tokens actually evaluated (whole windows of 256).
    println!(
        "model {} ({} layers, {} experts, top-{k}); {} validation tokens",
        args.model.display(),
        base.config().num_layers,
        base.config().moe.num_experts,
        top_k.tokens
    );
    println!();
    println!(
        "{:<24} {:>9} {:>10} {:>9} {:>10} {:>8} {:>10} {:>14} {:>14} {:>8}",
        "variant",
        "loss",
        "perplexity",
        "accuracy",
        "acc. kept",
        "choice",
        "ch. kept",
        "experts/token",
        "MoE FLOPs cut",
        "eval s"
    );
    let choice = |r: &EvalReport| match (r.choice_accuracy, top_k.choice_accuracy) {
        (Some(a), Some(base)) => (format!("{a:.4}"), format!("{:.1}%", 100.0 * a / base)),
        _ => ("-".to_string(), "-".to_string()),
    };
    for (r, secs) in &rows {
        let (accuracy, kept) = choice(r);
        println!(
            "{:<24} {:>9.4} {:>10.2} {:>9.4} {:>9.1}% {:>8} {:>10} {:>9.2} / {k} {:>13.1}% {:>8.1}",
            r.label,
            r.loss,
            r.perplexity,
            r.next_token_accuracy,
            100.0 * r.next_token_accuracy / top_k.next_token_accuracy,
            accuracy,
            kept,
            r.mean_active_experts,
            100.0 * r.moe_flops_reduction,
            secs
        );
    }
    if !items.is_empty() {
        println!(
            "choice: multiple-choice continuation of held-out verses, {} items, 4 endings each \
             (chance 0.25)",
            items.len()
        );
    }
    let shipped = &rows[1].0;
    println!(
        "per-layer experts/token with BEAM: {}",
        shipped
            .per_layer_active_experts
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // One greedy continuation from each, same prompt.
    let tok = tokenizers::Tokenizer::from_file(&tokenizer).map_err(|e| e.to_string())?;
    let prompt = "And God said unto Moses,";
    let ids = tok
        .encode(prompt, false)
        .map_err(|e| e.to_string())?
        .get_ids()
        .to_vec();
    println!();
    for (name, model) in [("top-K", &base), ("BEAM ", &beam)] {
        let settings = GenerateConfig {
            max_new_tokens: 24,
            eos_token_ids: base.config().eos_token_ids.clone(),
            ..GenerateConfig::default()
        };
        let g = generate(model, &ids, &settings);
        let text = tok.decode(&g.ids, true).map_err(|e| e.to_string())?;
        println!(
            "{name} | {prompt}{} [{:.2} experts/token]",
            text.replace('\n', " / "),
            g.mean_active_experts()
        );
    }

    if let Some(path) = &args.report {
        let json = serde_json::json!({
            "k": k,
            "topk_eval_loss": top_k.loss,
            "beam_eval_loss": shipped.loss,
            "topk_next_token_accuracy": top_k.next_token_accuracy,
            "beam_next_token_accuracy": shipped.next_token_accuracy,
            "moe_flops_reduction": shipped.moe_flops_reduction,
            "mean_active_experts": shipped.mean_active_experts,
            "eval_tokens": shipped.tokens,
            "per_layer_active_experts": shipped.per_layer_active_experts,
            "topk_choice_accuracy": top_k.choice_accuracy,
            "beam_choice_accuracy": shipped.choice_accuracy,
            "choice_items": items.len(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json).unwrap())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("\nreport written to {}", path.display());
    }
    if let Some(path) = &args.check {
        let mut off = check(path, "top-k", &top_k)?;
        off.extend(check(path, &args.check_label, shipped)?);
        if !off.is_empty() {
            return Err(format!(
                "the numbers differ from {}: {}",
                path.display(),
                off.join("; ")
            ));
        }
        println!(
            "numbers match {} (top-k and {:?}) within {TOLERANCES:?}",
            path.display(),
            args.check_label
        );
    }
    Ok(())
}
