//! Model configuration: Hugging Face `config.json` as written on disk ([`HfConfig`]) and the
//! normalised form the model is built from ([`ModelConfig`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ModelError;
use crate::config::BeamMoeConfig;

/// `eos_token_id`: one id or a list.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

/// `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParameters {
    /// Base θ.
    pub rope_theta: Option<f64>,
    /// `default` is the only supported type.
    pub rope_type: Option<String>,
}

/// The fields of `config.json` the supported families use. Both spellings of renamed fields are
/// accepted (`rope_theta` / `rope_parameters.rope_theta`, `num_experts` / `num_local_experts` /
/// `n_routed_experts`); unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct HfConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub shared_expert_intermediate_size: Option<usize>,
    pub num_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    pub n_routed_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub decoder_sparse_step: Option<usize>,
    pub mlp_only_layers: Option<Vec<usize>>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<RopeParameters>,
    pub tie_word_embeddings: Option<bool>,
    pub qkv_bias: Option<bool>,
    pub attention_bias: Option<bool>,
    pub clip_qkv: Option<f64>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub eos_token_id: Option<TokenIds>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<usize>,
}

impl HfConfig {
    /// Parses `config.json` text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ModelError> {
        serde_json::from_str(text).map_err(|err| ModelError::Config {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })
    }

    /// Number of routed experts under any of its spellings.
    pub fn experts(&self) -> Option<usize> {
        self.num_experts
            .or(self.num_local_experts)
            .or(self.n_routed_experts)
    }

    /// RoPE base under either spelling (default 10 000).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }
}

/// How q/k are normalised before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QkNorm {
    /// No q/k norm (Qwen2-MoE, Mixtral).
    None,
    /// RMSNorm over each head's `head_dim` (Qwen3-MoE).
    PerHead,
    /// RMSNorm over the whole q (`[heads·head_dim]`) and k (`[kv_heads·head_dim]`) projections
    /// before the split into heads (OLMoE).
    Whole,
}

/// Attention variations across families.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionOptions {
    /// q/k/v projections have biases (Qwen2-MoE).
    pub qkv_bias: bool,
    /// q/k normalisation.
    pub qk_norm: QkNorm,
    /// Clamp q, k, v to `[−c, c]` after projection (and norm) (OLMoE `clip_qkv`).
    pub clip_qkv: Option<f64>,
    /// Each query sees only the last `w` positions (itself included) (Mixtral `sliding_window`).
    pub sliding_window: Option<usize>,
}

/// A supported `model_type`. What each family does (config mapping, tensor names) is in
/// [`super::family`].
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
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// Everything needed to build a model, normalised across families.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The family (`model_type`).
    pub family: Family,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Hidden size H.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Per-head size.
    pub head_dim: usize,
    /// RMSNorm ε.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Attention variations.
    pub attention: AttentionOptions,
    /// Intermediate size of dense (non-MoE) MLP layers.
    pub dense_intermediate_size: usize,
    /// The MoE block of every MoE layer.
    pub moe: BeamMoeConfig,
    /// `moe_layers[l]`: layer `l` is MoE (else dense MLP).
    pub moe_layers: Vec<bool>,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
    /// The context the model was trained for (`max_position_embeddings`), if the config says.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

impl ModelConfig {
    /// Cross-field checks.
    pub fn validate(&self) -> Result<(), String> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if value == 0 {
                return Err(format!("`{field}` must be greater than 0"));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim = {} must be even (RoPE rotates pairs of dimensions)",
                self.head_dim
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err("rms_norm_eps and rope_theta must be > 0".into());
        }
        if self.attention.sliding_window == Some(0) {
            return Err("sliding_window must be > 0".into());
        }
        if let Some(c) = self.attention.clip_qkv {
            if c.is_nan() || c <= 0.0 {
                return Err(format!("clip_qkv = {c} must be > 0"));
            }
        }
        if self.moe_layers.len() != self.num_layers {
            return Err("internal: one MoE flag per layer".into());
        }
        if self.moe_layers.iter().any(|m| !m) && self.dense_intermediate_size == 0 {
            return Err("`intermediate_size` is needed for dense layers".into());
        }
        self.moe
            .validate()
            .map_err(|err| format!("MoE block: {err}"))
    }

    /// Number of MoE layers.
    pub fn num_moe_layers(&self) -> usize {
        self.moe_layers.iter().filter(|m| **m).count()
    }

    /// Parameter count of the base model (no BEAM mask routers).
    pub fn parameters(&self) -> u64 {
        let p = self.parameter_parts();
        let moe_block = p.experts_per_layer() + p.moe_shared;
        let layers: u128 = self
            .moe_layers
            .iter()
            .map(|&m| p.attention + if m { moe_block } else { p.dense })
            .sum();
        u64::try_from(p.embedding + layers + p.final_norm + p.head).unwrap_or(u64::MAX)
    }

    /// Weights read to decode one token (a forward of `T = 1`) when each MoE layer runs
    /// `experts_per_token` routed experts on average: every attention, router, shared-expert,
    /// dense-MLP and LM-head weight, one embedding row, the final norm, the routed experts that
    /// run, and BEAM's mask routers of `mask_router_outputs` outputs each (0 without BEAM).
    /// Decode streams exactly these from memory, so `bytes per weight × this ÷ memory bandwidth`
    /// bounds decode speed.
    pub fn weights_read_per_token(
        &self,
        experts_per_token: f64,
        mask_router_outputs: usize,
    ) -> f64 {
        let p = self.parameter_parts();
        // Weight [H, outputs], bias and routing-weight scale [outputs].
        let mask = mask_router_outputs as u128 * (p.hidden + 2);
        let layers: f64 = self
            .moe_layers
            .iter()
            .map(|&m| {
                let ff = if m {
                    (p.moe_shared + mask) as f64 + experts_per_token * p.expert as f64
                } else {
                    p.dense as f64
                };
                p.attention as f64 + ff
            })
            .sum();
        let head = if self.tie_word_embeddings {
            p.embedding
        } else {
            p.head
        };
        layers + (p.hidden + p.final_norm + head) as f64
    }

    fn parameter_parts(&self) -> ParameterParts {
        // u128: a corrupted config must not overflow (sizes are bounded, products may not be).
        let n = |v: usize| v as u128;
        let (h, v) = (n(self.hidden_size), n(self.vocab_size));
        let q = n(self.num_heads) * n(self.head_dim);
        let kv = n(self.num_kv_heads) * n(self.head_dim);
        let bias = if self.attention.qkv_bias {
            q + 2 * kv
        } else {
            0
        };
        let qk_norm = match self.attention.qk_norm {
            QkNorm::None => 0,
            QkNorm::PerHead => 2 * n(self.head_dim),
            QkNorm::Whole => q + kv,
        };
        let moe = &self.moe;
        ParameterParts {
            hidden: h,
            embedding: v * h,
            attention: h * q + 2 * h * kv + q * h + bias + qk_norm + 2 * h,
            expert: 3 * h * n(moe.intermediate_size),
            experts: n(moe.num_experts),
            moe_shared: n(moe.num_experts) * h
                + moe.shared_expert.as_ref().map_or(0, |s| {
                    3 * h * n(s.intermediate_size) + if s.gated { h } else { 0 }
                }),
            dense: 3 * h * n(self.dense_intermediate_size),
            final_norm: h,
            head: if self.tie_word_embeddings { 0 } else { v * h },
        }
    }
}

/// Parameter counts of a model's parts ([`ModelConfig::parameters`]).
struct ParameterParts {
    hidden: u128,
    embedding: u128,
    /// Per layer: projections, biases, q/k norms, the two RMSNorms.
    attention: u128,
    /// One routed expert.
    expert: u128,
    experts: u128,
    /// Per MoE layer, besides the routed experts: router and shared expert.
    moe_shared: u128,
    /// Per dense layer.
    dense: u128,
    final_norm: u128,
    /// Untied LM head (0 when tied).
    head: u128,
}

impl ParameterParts {
    fn experts_per_layer(&self) -> u128 {
        self.experts * self.expert
    }
}
