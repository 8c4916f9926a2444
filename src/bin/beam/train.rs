//! `beam train` and `beam eval`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use beam_model::checkpoint::WeightDtype;
use beam_model::model::config::ModelConfig;
use beam_model::model::load::{load_model_with, LoadOptions};
use beam_model::model::{MaskMode, MoeLm};
use beam_model::{BeamMaskConfig, MaskRouterShape, MaskRule, MoeBackend, SparsityLossConfig};
use beam_train::choice::{choice_items, evaluate_choice, ChoiceOptions};
use beam_train::eval::{interpolate_accuracy, EvalOptions, EvalReport};
use beam_train::{
    evaluate, plot, SparsityScope, StepMetrics, TaskLoss, TokenData, TrainConfig, Trainable,
};
use burn::tensor::backend::AutodiffBackend;
use clap::{Args, ValueEnum};

use crate::BackendChoice;

#[derive(Clone, Copy, ValueEnum)]
pub enum LossChoice {
    /// KL to the frozen top-K model's next-token distribution.
    Distill,
    /// Next-token cross-entropy on the corpus.
    CrossEntropy,
    /// Both summed.
    Both,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TrainableChoice {
    /// Only the mask routers (base model frozen).
    MaskRouters,
    /// Mask routers and the base top-K routers.
    Routers,
    /// Every parameter.
    All,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ScopeChoice {
    /// The whole model's kept fraction goes to the target; the layers share it as training finds best.
    Model,
    /// Each MoE layer's own kept fraction goes to the target.
    Layer,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ShapeChoice {
    /// Linear(H → E) gathered at the chosen experts.
    PerExpert,
    /// Linear(H → K), one logit per rank slot.
    PerSlot,
}

/// The model, backend and text every train / eval run needs.
#[derive(Args)]
pub struct ModelAndText {
    /// Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Backend (training runs under burn's autodiff on it).
    #[arg(long, value_enum, default_value = "ndarray")]
    backend: BackendChoice,
    /// Text, plain or .gz, tokenised with MODEL/tokenizer.json (train: training text; eval:
    /// held-out text).
    #[arg(long)]
    data: PathBuf,
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    input: ModelAndText,
    /// Output folder: adapter.safetensors, checkpoints, train_config.json. A run resumes from the
    /// checkpoint it finds here.
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Windows per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    /// Learning rate of the mask routers alone, when base parameters train too (`--train
    /// routers|all`); default: `--lr` for everything.
    #[arg(long)]
    mask_lr: Option<f64>,
    /// λ, the weight of the sparsity term.
    #[arg(long, default_value_t = 0.1)]
    lambda: f64,
    /// Steer the kept fraction of the K slots to this value instead of pushing it down.
    #[arg(long)]
    target_active_fraction: Option<f64>,
    /// Ramp the sparsity pressure up over the first N steps: the target active fraction moves
    /// down from 1 to `--target-active-fraction`, or λ grows from 0 (end-to-end runs: keeps the
    /// mask from collapsing before the model adapts).
    #[arg(long, value_name = "N", default_value_t = 0)]
    sparsity_warmup: usize,
    /// What `--target-active-fraction` steers: the whole model's kept fraction (the expert
    /// budget shared among the layers as training finds best), or each MoE layer's.
    #[arg(long, value_enum, default_value = "model")]
    sparsity_scope: ScopeChoice,
    /// Task loss.
    #[arg(long, value_enum, default_value = "distill")]
    loss: LossChoice,
    /// Which parameters train.
    #[arg(long = "train", value_enum, default_value = "mask-routers")]
    trainable: TrainableChoice,
    /// Mask router shape.
    #[arg(long, value_enum, default_value = "per-expert")]
    mask_shape: ShapeChoice,
    /// Mask threshold τ.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// Initial mask-router bias (positive: every mask starts at 1).
    #[arg(long, default_value_t = 2.0)]
    init_bias: f64,
    /// Renormalise the kept routing weights to their top-K sum.
    #[arg(long)]
    renormalize: bool,
    /// Train a fixed smaller K instead of BEAM masks: every token keeps its K' highest-weight
    /// experts, no mask routers, λ unused (the retrained-at-smaller-K baseline; needs
    /// `--train routers` or `--train all`).
    #[arg(long, value_name = "K'")]
    fixed_k: Option<usize>,
    /// Start the mask routers from this adapter (its shape and threshold apply; the sparsity
    /// settings are this run's) instead of fresh:
    /// with `--train all` and a lower `--lr`, the second stage of end-to-end training.
    #[arg(long, value_name = "FILE")]
    init_adapter: Option<PathBuf>,
    /// Seed of batches and initialisation.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Checkpoint interval in steps.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Print a metrics line every this many steps (when the output is not a terminal).
    #[arg(long, default_value_t = 10)]
    log_every: usize,
}

impl TrainArgs {
    pub fn backend(&self) -> BackendChoice {
        self.input.backend
    }

    fn config(&self) -> TrainConfig {
        let beam = BeamMaskConfig::new()
            .with_shape(match self.mask_shape {
                ShapeChoice::PerExpert => MaskRouterShape::PerExpert,
                ShapeChoice::PerSlot => MaskRouterShape::PerSlot,
            })
            .with_threshold(self.threshold)
            .with_init_bias(self.init_bias)
            .with_renormalize(self.renormalize)
            .with_sparsity(
                SparsityLossConfig::new().with_target_active_fraction(self.target_active_fraction),
            );
        TrainConfig::new()
            .with_beam(beam)
            .with_steps(self.steps)
            .with_batch_size(self.batch_size)
            .with_seq_len(self.seq_len)
            .with_learning_rate(self.lr)
            .with_mask_learning_rate(self.mask_lr)
            .with_lambda(self.lambda)
            .with_sparsity_warmup_steps(self.sparsity_warmup)
            .with_sparsity_scope(match self.sparsity_scope {
                ScopeChoice::Layer => SparsityScope::Layer,
                ScopeChoice::Model => SparsityScope::Model,
            })
            .with_task_loss(match self.loss {
                LossChoice::Distill => TaskLoss::Distill,
                LossChoice::CrossEntropy => TaskLoss::CrossEntropy,
                LossChoice::Both => TaskLoss::Both,
            })
            .with_trainable(match self.trainable {
                TrainableChoice::MaskRouters => Trainable::MaskRouters,
                TrainableChoice::Routers => Trainable::MaskAndBaseRouters,
                TrainableChoice::All => Trainable::All,
            })
            .with_fixed_k(self.fixed_k)
            .with_init_adapter(
                self.init_adapter
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
            )
            .with_seed(self.seed)
            .with_checkpoint_every(self.checkpoint_every)
    }
}

fn corpus(input: &ModelAndText) -> Result<TokenData, String> {
    let (model, data) = (&input.model, &input.data);
    let config = ModelConfig::from_dir(model).map_err(|e| e.to_string())?;
    TokenData::from_file(data, &model.join("tokenizer.json"), config.vocab_size)
        .map_err(|e| e.to_string())
}

fn progress_line(m: &StepMetrics, steps: usize) -> String {
    format!(
        "step {:>5}/{steps}  loss {:.4}  ce {:.4}  ppl {:.2}  sparsity {:.3}  experts/token {:.2}  MoE FLOPs cut {:.1}%",
        m.step + 1,
        m.loss,
        m.cross_entropy,
        m.perplexity,
        m.sparsity,
        m.mean_active_experts,
        100.0 * m.moe_flops_reduction
    )
}

pub fn train<B>(args: &TrainArgs, device: &B::Device) -> Result<(), String>
where
    B: AutodiffBackend + MoeBackend,
    B::InnerBackend: MoeBackend,
{
    let config = args.config();
    config.validate().map_err(|e| e.to_string())?;
    let model_config = ModelConfig::from_dir(&args.input.model).map_err(|e| e.to_string())?;
    beam_train::eval::check_context(config.seq_len, model_config.max_position_embeddings)
        .map_err(|e| e.to_string())?;
    let data = corpus(&args.input)?;
    eprintln!(
        "[beam train] {} tokens from {}, {} steps of {}×{} tokens, λ = {}",
        data.tokens.len(),
        args.input.data.display(),
        config.steps,
        config.batch_size,
        config.seq_len,
        config.lambda
    );
    let tty = std::io::stderr().is_terminal();
    let log_every = args.log_every.max(1);
    let mut on_step = |m: &StepMetrics, c: &TrainConfig| {
        let line = progress_line(m, c.steps);
        if tty {
            let width = 24;
            let filled = (m.step + 1) * width / c.steps.max(1);
            eprint!(
                "\r[{}{}] {line}",
                "#".repeat(filled),
                "-".repeat(width - filled)
            );
            if m.step + 1 == c.steps {
                eprintln!();
            }
        } else if (m.step + 1).is_multiple_of(log_every) || m.step + 1 == c.steps || m.step == 0 {
            eprintln!("{line}");
        }
    };
    let summary = beam_train::train::<B>(
        &args.input.model,
        &data,
        &config,
        &args.out,
        device,
        &mut on_step,
    )
    .map_err(|e| e.to_string())?;
    if let (Some(record), None) = (&summary.trained_model, &summary.adapter) {
        eprintln!(
            "[beam train] trained at a fixed K' = {}: evaluate {} with `beam eval --trained {}`",
            config.fixed_k.unwrap_or_default(),
            record.display(),
            args.out.display()
        );
    } else if let Some(record) = &summary.trained_model {
        eprintln!(
            "[beam train] base parameters trained too: the adapter only fits the trained model saved in {} \
             (a burn record), not the original checkpoint; evaluate it with `beam eval --trained {}`",
            record.display(),
            args.out.display()
        );
    }
    if summary.resumed_from > 0 {
        eprintln!("[beam train] resumed from step {}", summary.resumed_from);
    }
    let last = summary.history.last();
    let written = match (&summary.adapter, &summary.trained_model) {
        (Some(adapter), _) => format!("adapter: {}", adapter.display()),
        (None, Some(model)) => format!("trained model: {}", model.display()),
        (None, None) => "nothing written".to_string(),
    };
    println!(
        "{written} ({:.1} s{})",
        summary.seconds,
        last.map_or(String::new(), |m| format!(
            "; last step: {:.2} experts/token, {:.1}% MoE FLOPs cut",
            m.mean_active_experts,
            100.0 * m.moe_flops_reduction
        ))
    );
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    input: ModelAndText,
    /// BEAM adapters to evaluate, as FILE or LABEL=FILE (repeatable; the last `=` splits).
    #[arg(long = "adapter")]
    adapters: Vec<String>,
    /// Runs of `beam train` that trained base parameters (`--train routers|all`, or
    /// `--fixed-k`), as RUN_DIR or LABEL=RUN_DIR (repeatable): each run's whole trained model
    /// is evaluated with its learned masks, or at the K' it trained.
    #[arg(long = "trained")]
    trained: Vec<String>,
    /// Also sweep the training-free peers (dynamic skipping, top-p, entropy-adaptive K, and the
    /// fixed smaller K' = 1 .. K-1 without training).
    #[arg(long)]
    peers: bool,
    /// Evaluate at most this many tokens (default: all).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Windows per forward.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Write all reports as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw next-token accuracy kept vs MoE FLOPs cut (PNG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Draw multiple-choice accuracy kept vs MoE FLOPs cut (PNG) here (needs --choice-items).
    #[arg(long)]
    choice_plot: Option<PathBuf>,
    /// Write held-out text coloured by the experts each token kept (HTML; per layer on hover)
    /// for the first adapter or trained run (else top-K), on the first 512 evaluated tokens.
    #[arg(long)]
    token_map: Option<PathBuf>,
    /// The adapter or trained run (its LABEL) the token map shows, instead of the first.
    #[arg(long, value_name = "LABEL")]
    token_map_of: Option<String>,
    /// Draw experts per token in each layer (PNG) here.
    #[arg(long)]
    layer_plot: Option<PathBuf>,
    /// Also score this many multiple-choice items (each held-out verse cut at 1/3 and 2/3, the
    /// true ending against 3 endings of other verses, by mean log-likelihood per token) and
    /// report the accuracy (chance: 0.25).
    #[arg(long)]
    choice_items: Option<usize>,
    /// Quantize the model's linear weights at load (q8: block-wise int8, q4: 4-bit); the adapters' mask
    /// routers stay f32.
    #[arg(long)]
    quantize: Option<beam_model::checkpoint::Quantization>,
}

impl EvalArgs {
    pub fn backend(&self) -> BackendChoice {
        self.input.backend
    }
}

/// Parameter grids of the peers: from keeping almost all K to keeping about one expert, then
/// the fixed smaller K' = K-1 .. 1 of a model whose router picks `top_k`.
pub fn peer_rules(top_k: usize) -> Vec<MaskRule> {
    let mut rules = Vec::new();
    for beta in [0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 0.95] {
        rules.push(MaskRule::DynamicSkip { beta });
    }
    for p in [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3] {
        rules.push(MaskRule::TopP { p });
    }
    for alpha in [1.2, 1.0, 0.8, 0.6, 0.45, 0.3, 0.15] {
        rules.push(MaskRule::EntropyK { alpha });
    }
    for k in (1..top_k).rev() {
        rules.push(MaskRule::FixedK { k });
    }
    rules
}

/// `LABEL=PATH` (the last `=` splits) or `PATH`, labelled by its file stem.
fn label_and_path(spec: &str) -> (String, PathBuf) {
    match spec.rsplit_once('=') {
        Some((label, file)) => (label.to_string(), PathBuf::from(file)),
        None => (
            Path::new(spec)
                .file_stem()
                .map_or(spec.to_string(), |s| s.to_string_lossy().into_owned()),
            PathBuf::from(spec),
        ),
    }
}

pub fn eval<B: MoeBackend>(args: &EvalArgs, device: &B::Device) -> Result<(), String> {
    let data = corpus(&args.input)?;
    let choice_items = match args.choice_items {
        Some(n) => {
            let config = ModelConfig::from_dir(&args.input.model).map_err(|e| e.to_string())?;
            let options = ChoiceOptions {
                max_items: Some(n),
                max_len: config.max_position_embeddings,
                ..ChoiceOptions::default()
            };
            let text = beam_train::data::read_text(&args.input.data).map_err(|e| e.to_string())?;
            let tokenizer =
                beam_train::data::load_tokenizer(&args.input.model.join("tokenizer.json"))
                    .map_err(|e| e.to_string())?;
            Some(choice_items(&text, &tokenizer, &options).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let options = EvalOptions {
        seq_len: args.seq_len,
        batch_size: args.batch_size,
        max_tokens: args.max_tokens,
    };
    let load = LoadOptions {
        dtype: Some(WeightDtype::F32),
        quantize: args.quantize,
        ..LoadOptions::default()
    };
    let base = load_model_with::<B>(&args.input.model, device, &load).map_err(|e| e.to_string())?;
    // Every adapter is loaded (and checked against the model) before anything is evaluated.
    let mut adapters = Vec::new();
    for spec in &args.adapters {
        let (label, file) = label_and_path(spec);
        let model = base
            .clone()
            .load_beam_adapter(&file, device)
            .map_err(|e| e.to_string())?;
        adapters.push((label, model, MaskMode::Learned, "beam"));
    }
    for spec in &args.trained {
        let (label, dir) = label_and_path(spec);
        let config = beam_train::read_train_config(&dir).map_err(|e| e.to_string())?;
        let model = beam_train::load_trained_model::<B>(&args.input.model, &dir, device)
            .map_err(|e| e.to_string())?;
        let method = if config.fixed_k.is_some() {
            "fixed-k-trained"
        } else {
            "beam-e2e"
        };
        adapters.push((label, model, beam_train::trained_mask_mode(&config), method));
    }
    if let Some(wanted) = &args.token_map_of {
        if !adapters.iter().any(|(label, ..)| label == wanted) {
            return Err(format!(
                "--token-map-of {wanted}: no --adapter or --trained has that label"
            ));
        }
    }
    beam_train::eval::check_context(args.seq_len, base.config().max_position_embeddings)
        .map_err(|e| e.to_string())?;
    let mut reports = Vec::new();
    let mut run = |model: &MoeLm<B>,
                   mode: MaskMode,
                   label: &str,
                   method: Option<&str>|
     -> Result<(), String> {
        let mut report =
            evaluate(model, &data, mode, &options, label).map_err(|e| e.to_string())?;
        if let Some(method) = method {
            report.method = method.to_string();
        }
        if let Some(items) = &choice_items {
            let choice = evaluate_choice(model, items, mode, ChoiceOptions::default().batch_size)
                .map_err(|e| e.to_string())?;
            report.choice_accuracy = Some(choice.accuracy);
        }
        eprintln!(
            "[beam eval] {:<22} loss {:.4}  accuracy {:.4}{}  experts/token {:.2}  MoE FLOPs cut {:.1}%",
            report.label,
            report.loss,
            report.next_token_accuracy,
            report
                .choice_accuracy
                .map_or(String::new(), |a| format!("  choice accuracy {a:.4}")),
            report.mean_active_experts,
            100.0 * report.moe_flops_reduction
        );
        reports.push(report);
        Ok(())
    };
    run(&base, MaskMode::TopK, "top-k", None)?;
    for (label, model, mode, method) in &adapters {
        let label = match *method {
            "beam" => format!("beam {label}"),
            _ => label.clone(),
        };
        run(model, *mode, &label, Some(method))?;
    }
    if args.peers {
        for rule in peer_rules(base.top_k()) {
            let label = format!("{} {}", rule.name(), rule.parameter());
            run(&base, MaskMode::Rule(rule), &label, None)?;
        }
    }
    if let Some(path) = &args.token_map {
        let chosen = match &args.token_map_of {
            // Checked before anything was evaluated.
            Some(wanted) => adapters.iter().find(|(label, ..)| label == wanted),
            None => adapters.first(),
        };
        let (model, mode, label) = match chosen {
            Some((label, model, mode, _)) => (model, *mode, label.as_str()),
            None => (&base, MaskMode::TopK, "top-k"),
        };
        let tokenizer = beam_train::data::load_tokenizer(&args.input.model.join("tokenizer.json"))
            .map_err(|e| e.to_string())?;
        beam_train::token_map::write_token_map(
            path,
            model,
            mode,
            &data,
            &tokenizer,
            &beam_train::token_map::TokenMapOptions {
                label: label.to_string(),
                seq_len: args.seq_len,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
        eprintln!("[beam eval] token map of {label}: {}", path.display());
    }
    print_table(&reports);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&reports).expect("reports serialise");
        beam_model::model::adapter::write_atomically(path, json.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    if let Some(path) = &args.plot {
        plot::quality_vs_flops(
            path,
            &reports,
            plot::Quality::NextTokenAccuracy,
            "Next-token accuracy kept vs MoE FLOPs cut",
        )
        .map_err(|e| e.to_string())?;
    }
    if let Some(path) = &args.choice_plot {
        plot::quality_vs_flops(
            path,
            &reports,
            plot::Quality::ChoiceAccuracy,
            "Multiple-choice accuracy kept vs MoE FLOPs cut",
        )
        .map_err(|e| e.to_string())?;
    }
    if let Some(path) = &args.layer_plot {
        let chosen = reports
            .iter()
            .filter(|r| r.method == "top-k" || r.method.starts_with("beam"))
            .cloned()
            .collect::<Vec<_>>();
        plot::experts_per_layer(path, &chosen, "Experts run per token, by layer")
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn print_table(reports: &[EvalReport]) {
    let Some(base) = reports.iter().find(|r| r.method == "top-k") else {
        return;
    };
    let choice = base.choice_accuracy.is_some();
    println!(
        "| variant | loss | perplexity | next-token acc. | acc. kept |{} experts/token | MoE FLOPs cut |",
        if choice { " choice acc. |" } else { "" }
    );
    println!(
        "|---|---|---|---|---|{}---|---|",
        if choice { "---|" } else { "" }
    );
    for r in reports {
        println!(
            "| {} | {:.4} | {:.2} | {:.4} | {:.1}% |{} {:.2} / {} | {:.1}% |",
            r.label,
            r.loss,
            r.perplexity,
            r.next_token_accuracy,
            100.0 * r.next_token_accuracy / base.next_token_accuracy,
            r.choice_accuracy
                .map_or(String::new(), |a| format!(" {a:.4} |")),
            r.mean_active_experts,
            r.top_k,
            100.0 * r.moe_flops_reduction
        );
    }
    let beams = reports
        .iter()
        .filter(|r| r.method.starts_with("beam"))
        .collect::<Vec<_>>();
    let peers = [
        "dynamic-skip",
        "top-p",
        "entropy-k",
        "fixed-k",
        "fixed-k-trained",
    ]
    .into_iter()
    .filter(|p| reports.iter().any(|r| r.method == *p))
    .collect::<Vec<_>>();
    if beams.is_empty() || peers.is_empty() {
        return;
    }
    println!();
    print!("| BEAM adapter | MoE FLOPs cut | BEAM acc. kept |");
    for p in &peers {
        print!(" {p} acc. kept |");
    }
    println!();
    println!("|---|---|---|{}", "---|".repeat(peers.len()));
    for b in beams {
        print!(
            "| {} | {:.1}% | {:.1}% |",
            b.label,
            100.0 * b.moe_flops_reduction,
            100.0 * b.next_token_accuracy / base.next_token_accuracy
        );
        for p in &peers {
            match interpolate_accuracy(reports, p, b.moe_flops_reduction) {
                Some(acc) => print!(" {:.1}% |", 100.0 * acc / base.next_token_accuracy),
                None => print!(" out of reach |"),
            }
        }
        println!();
    }
}
