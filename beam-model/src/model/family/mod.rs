//! The supported model families: how each maps its `config.json` onto [`ModelConfig`] and names
//! its MoE block on disk. A new family (e.g. DeepSeek with MLA attention) adds a file here.

mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;

use serde::{Deserialize, Serialize};

use super::config::{AttentionOptions, HfConfig, ModelConfig, QkNorm, TokenIds};
use crate::config::{BeamMaskConfig, BeamMoeConfig, RoutingRule, SharedExpertConfig};

/// A supported `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// `qwen2_moe`
    Qwen2Moe,
    /// `qwen3_moe`
    Qwen3Moe,
    /// `olmoe`
    Olmoe,
    /// `mixtral`
    Mixtral,
}

impl Family {
    /// The family of a `model_type`, if supported.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "qwen2_moe" => Self::Qwen2Moe,
            "qwen3_moe" => Self::Qwen3Moe,
            "olmoe" => Self::Olmoe,
            "mixtral" => Self::Mixtral,
            _ => return None,
        })
    }

    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Qwen2Moe => "qwen2_moe",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Olmoe => "olmoe",
            Self::Mixtral => "mixtral",
        }
    }

    /// Name of the MoE block inside a decoder layer (`mlp` or Mixtral's `block_sparse_moe`).
    pub fn moe_block_name(self) -> &'static str {
        match self {
            Self::Mixtral => "block_sparse_moe",
            _ => "mlp",
        }
    }

    pub(crate) fn config(self, hf: &HfConfig) -> Result<ModelConfig, String> {
        check_sizes(hf)?;
        match self {
            Self::Qwen2Moe => qwen2_moe::config(hf),
            Self::Qwen3Moe => qwen3_moe::config(hf),
            Self::Olmoe => olmoe::config(hf),
            Self::Mixtral => mixtral::config(hf),
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

fn required(value: Option<usize>, field: &str) -> Result<usize, String> {
    value.ok_or_else(|| format!("missing `{field}`"))
}

/// Upper bounds that no real checkpoint reaches; they stop a corrupted `config.json` from making
/// the loader allocate absurd amounts before any tensor is read.
const MAX_LAYERS: usize = 4096;
const MAX_SIZE: usize = 1 << 24;

/// Rejects implausibly large sizes (checked before anything is allocated from them).
fn check_sizes(hf: &HfConfig) -> Result<(), String> {
    if hf.num_hidden_layers > MAX_LAYERS {
        return Err(format!(
            "num_hidden_layers = {} exceeds the limit of {MAX_LAYERS}",
            hf.num_hidden_layers
        ));
    }
    let sizes = [
        ("vocab_size", Some(hf.vocab_size)),
        ("hidden_size", Some(hf.hidden_size)),
        ("num_attention_heads", Some(hf.num_attention_heads)),
        ("num_key_value_heads", hf.num_key_value_heads),
        ("head_dim", hf.head_dim),
        ("intermediate_size", hf.intermediate_size),
        ("moe_intermediate_size", hf.moe_intermediate_size),
        (
            "shared_expert_intermediate_size",
            hf.shared_expert_intermediate_size,
        ),
        ("num_experts", hf.experts()),
        ("num_experts_per_tok", hf.num_experts_per_tok),
        ("sliding_window", hf.sliding_window),
    ];
    match sizes.iter().find(|(_, v)| v.is_some_and(|v| v > MAX_SIZE)) {
        Some((field, Some(value))) => {
            Err(format!("{field} = {value} exceeds the limit of {MAX_SIZE}"))
        }
        _ => Ok(()),
    }
}

/// The parts every family shares; `moe_intermediate` and `routing` differ per family.
fn common(
    family: Family,
    hf: &HfConfig,
    attention: AttentionOptions,
    routing: RoutingRule,
    moe_intermediate: usize,
    shared_expert: Option<SharedExpertConfig>,
    moe_layers: Vec<bool>,
) -> Result<ModelConfig, String> {
    if let Some(act) = &hf.hidden_act {
        if act != "silu" {
            return Err(format!("hidden_act `{act}` is not supported (only `silu`)"));
        }
    }
    if let Some(kind) = hf
        .rope_parameters
        .as_ref()
        .and_then(|r| r.rope_type.as_deref())
    {
        if kind != "default" {
            return Err(format!(
                "rope_type `{kind}` is not supported (only `default`)"
            ));
        }
    }
    let heads = hf.num_attention_heads;
    let head_dim = match hf.head_dim {
        Some(d) => d,
        None if heads > 0 && hf.hidden_size.is_multiple_of(heads) => hf.hidden_size / heads,
        None => {
            return Err(format!(
                "hidden_size = {} is not a multiple of num_attention_heads = {heads}",
                hf.hidden_size
            ))
        }
    };
    let experts = required(hf.experts(), "num_experts")?;
    let top_k = required(hf.num_experts_per_tok, "num_experts_per_tok")?;
    let moe = BeamMoeConfig::new(hf.hidden_size, moe_intermediate, experts, top_k)
        .with_routing(routing)
        .with_shared_expert(shared_expert)
        .with_beam(BeamMaskConfig::new().with_enabled(false));
    Ok(ModelConfig {
        family,
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        num_layers: hf.num_hidden_layers,
        num_heads: heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(heads),
        head_dim,
        rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        rope_theta: hf.rope_theta(),
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        attention,
        dense_intermediate_size: hf.intermediate_size.unwrap_or(0),
        moe,
        moe_layers,
        eos_token_ids: match &hf.eos_token_id {
            Some(TokenIds::One(id)) => vec![*id],
            Some(TokenIds::Many(ids)) => ids.clone(),
            None => Vec::new(),
        },
    })
}

/// Qwen's rule: layer `l` is MoE unless listed in `mlp_only_layers`, every `decoder_sparse_step`.
fn qwen_moe_layers(hf: &HfConfig) -> Result<Vec<bool>, String> {
    let step = hf.decoder_sparse_step.unwrap_or(1);
    if step == 0 {
        return Err("decoder_sparse_step must be > 0".into());
    }
    let dense = hf.mlp_only_layers.clone().unwrap_or_default();
    if let Some(l) = dense.iter().find(|&&l| l >= hf.num_hidden_layers) {
        return Err(format!(
            "mlp_only_layers names layer {l} of {}",
            hf.num_hidden_layers
        ));
    }
    let experts = hf.experts().unwrap_or(0);
    Ok((0..hf.num_hidden_layers)
        .map(|l| !dense.contains(&l) && experts > 0 && (l + 1) % step == 0)
        .collect())
}

fn plain_attention(qkv_bias: bool, qk_norm: QkNorm) -> AttentionOptions {
    AttentionOptions {
        qkv_bias,
        qk_norm,
        clip_qkv: None,
        sliding_window: None,
    }
}
