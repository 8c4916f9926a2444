//! Held-out evaluation: loss, perplexity, next-token accuracy, experts kept per token (overall
//! and per layer) and the MoE FLOPs cut, for any mask mode (top-K, a BEAM adapter, a peer rule).

use beam_model::model::{HiddenStates, MaskMode, MoeLm};
use beam_model::{BeamMoeConfig, MoeBackend};
use burn::tensor::activation::log_softmax;
use burn::tensor::{ElementConversion, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::{Batch, TokenData};
use crate::error::TrainError;

/// How much held-out text to evaluate and in what pieces.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Tokens per window.
    pub seq_len: usize,
    /// Windows per forward.
    pub batch_size: usize,
    /// Evaluate at most this many predicted tokens (all when `None`).
    pub max_tokens: Option<usize>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            seq_len: 256,
            batch_size: 8,
            max_tokens: None,
        }
    }
}

/// Quality and cost of one model variant on held-out text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// What was evaluated (`top-k`, an adapter's label, a peer rule with its parameter).
    pub label: String,
    /// Method family: `top-k`, `beam`, `dynamic-skip`, `top-p`, `entropy-k`.
    pub method: String,
    /// The peer rule's parameter or BEAM's λ, when known.
    pub parameter: Option<f64>,
    /// Predicted tokens.
    pub tokens: usize,
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Fraction of tokens whose arg-max prediction is the next token.
    pub next_token_accuracy: f64,
    /// Experts run per token, averaged over MoE layers.
    pub mean_active_experts: f64,
    /// Experts run per token in each MoE layer.
    pub per_layer_active_experts: Vec<f64>,
    /// `1 − FLOPs / top-K FLOPs` over all MoE layers (router and mask-router costs included).
    pub moe_flops_reduction: f64,
    /// K of the base router.
    pub top_k: usize,
    /// Multiple-choice continuation accuracy ([`crate::choice`]), when it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choice_accuracy: Option<f64>,
}

/// A typed error when windows of `seq_len` tokens do not fit the model's context
/// (`max_position_embeddings`, when the config states one).
pub fn check_context(seq_len: usize, context: Option<usize>) -> Result<(), TrainError> {
    match context {
        Some(context) if seq_len > context => Err(TrainError::Config(format!(
            "seq_len {seq_len} exceeds the model's context of {context} positions \
             (max_position_embeddings)"
        ))),
        _ => Ok(()),
    }
}

/// Evaluates `model` with mask `mode` on `data`.
pub fn evaluate<B: MoeBackend>(
    model: &MoeLm<B>,
    data: &TokenData,
    mode: MaskMode,
    options: &EvalOptions,
    label: &str,
) -> Result<EvalReport, TrainError> {
    check_context(options.seq_len, model.config().max_position_embeddings)?;
    let batches = data.eval_batches(options.seq_len, options.batch_size, options.max_tokens)?;
    let device = model.embed.weight.device();
    // The mask routers run (and cost FLOPs) only when the learned mask is asked for.
    let learned = matches!(mode, MaskMode::Learned);
    let moe_configs = model
        .moe_layers()
        .map(|m| {
            let mut config = m.config().clone();
            if !learned {
                config.beam = None;
            }
            config
        })
        .collect::<Vec<_>>();
    let mut loss_sum = 0.0;
    let mut correct = 0usize;
    let mut tokens = 0usize;
    let mut kept = vec![0usize; moe_configs.len()];
    for batch in &batches {
        let (inputs, targets) = batch.tensors::<B>(&device);
        let out = model.forward(inputs, None, mode, HiddenStates::Skip);
        let (nll, hits) = token_losses(out.logits, targets);
        loss_sum += nll.sum().into_scalar().elem::<f64>();
        correct += hits.sum().into_scalar().elem::<i64>() as usize;
        tokens += batch_tokens(batch);
        for (k, facts) in kept.iter_mut().zip(&out.routing) {
            *k += facts.kept_pairs();
        }
    }
    let moe_flops_reduction =
        model_flops_reduction(moe_configs.iter().zip(kept.iter().copied()), tokens);
    let per_layer = kept
        .iter()
        .map(|&k| k as f64 / tokens as f64)
        .collect::<Vec<_>>();
    let loss = loss_sum / tokens as f64;
    let (method, parameter) = match mode {
        MaskMode::TopK => ("top-k".to_string(), None),
        MaskMode::Learned if model.has_beam() => ("beam".to_string(), None),
        MaskMode::Learned => ("top-k".to_string(), None),
        MaskMode::Rule(rule) => (rule.name().to_string(), Some(rule.parameter())),
    };
    Ok(EvalReport {
        label: label.to_string(),
        method,
        parameter,
        tokens,
        loss,
        perplexity: loss.exp(),
        next_token_accuracy: correct as f64 / tokens as f64,
        mean_active_experts: per_layer.iter().sum::<f64>() / per_layer.len().max(1) as f64,
        per_layer_active_experts: per_layer,
        moe_flops_reduction,
        top_k: moe_configs.first().map_or(0, |c| c.top_k),
        choice_accuracy: None,
    })
}

/// `1 − FLOPs / top-K FLOPs` summed over MoE layers, each given as (its config, kept pairs) over
/// `tokens` tokens: the one aggregation every report (evaluation and training metrics) uses.
pub fn model_flops_reduction<'a>(
    layers: impl IntoIterator<Item = (&'a BeamMoeConfig, usize)>,
    tokens: usize,
) -> f64 {
    let (mut topk, mut beam) = (0.0, 0.0);
    for (config, kept_pairs) in layers {
        let report = beam_model::moe_layer_flops(config, tokens, kept_pairs);
        topk += report.topk.total() as f64;
        beam += report.beam.total() as f64;
    }
    if topk > 0.0 {
        1.0 - beam / topk
    } else {
        0.0
    }
}

fn batch_tokens(batch: &Batch) -> usize {
    batch.batch_size * batch.seq_len
}

/// Per-token negative log-likelihood `[B·T]` and arg-max hits `[B·T]` (1 = correct).
pub fn token_losses<B: burn::tensor::backend::Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
    let [b, t, v] = logits.dims();
    let logits = logits.reshape([b * t, v]);
    let targets = targets.reshape([b * t, 1]);
    let hits = logits
        .clone()
        .argmax(1)
        .equal(targets.clone())
        .int()
        .reshape([b * t]);
    let nll = log_softmax(logits, 1)
        .gather(1, targets)
        .neg()
        .reshape([b * t]);
    (nll, hits)
}

/// Next-token accuracy of `method` at MoE FLOPs cut `reduction`, linearly interpolated between
/// its evaluated points; `None` when `reduction` lies outside the range the method reached (the
/// training-free peers never drop below one expert per token).
pub fn interpolate_accuracy(reports: &[EvalReport], method: &str, reduction: f64) -> Option<f64> {
    let mut points = reports
        .iter()
        .filter(|r| r.method == method)
        .map(|r| (r.moe_flops_reduction, r.next_token_accuracy))
        .collect::<Vec<_>>();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points.windows(2).find_map(|w| {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        (x0 <= reduction && reduction <= x1).then(|| {
            if x1 > x0 {
                y0 + (y1 - y0) * (reduction - x0) / (x1 - x0)
            } else {
                y0.max(y1)
            }
        })
    })
}
