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

/// `rope_parameters` (transformers 5) or `rope_scaling` (transformers 4 and DeepSeek's own
/// configs, which spell the type `type`).
#[derive(Debug, Clone, Default, Deserialize)]
#[allow(missing_docs)]
pub struct RopeParameters {
    /// Base θ.
    pub rope_theta: Option<f64>,
    /// `default` or `yarn`.
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: Option<bool>,
}

/// `quantization_config` of an FP8 checkpoint (DeepSeek-V3's `fp8` with block scales).
#[derive(Debug, Clone, Default, Deserialize)]
#[allow(missing_docs)]
pub struct QuantizationConfig {
    pub quant_method: Option<String>,
    pub fmt: Option<String>,
    pub weight_block_size: Option<Vec<usize>>,
    pub activation_scheme: Option<String>,
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
    pub rope_scaling: Option<RopeParameters>,
    pub tie_word_embeddings: Option<bool>,
    pub qkv_bias: Option<bool>,
    pub attention_bias: Option<bool>,
    pub clip_qkv: Option<f64>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub eos_token_id: Option<TokenIds>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<usize>,
    // DeepSeek-V2/V3. `q_lora_rank`: absent (`None`) vs `null` (`Some(None)`: a plain `q_proj`).
    #[serde(default, deserialize_with = "present")]
    pub q_lora_rank: Option<Option<usize>>,
    pub kv_lora_rank: Option<usize>,
    pub qk_nope_head_dim: Option<usize>,
    pub qk_rope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    pub rope_interleave: Option<bool>,
    pub first_k_dense_replace: Option<usize>,
    pub moe_layer_freq: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub routed_scaling_factor: Option<f64>,
    pub topk_method: Option<String>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub scoring_func: Option<String>,
    pub num_nextn_predict_layers: Option<usize>,
    pub num_mtp_layers: Option<usize>,
    pub mlp_bias: Option<bool>,
    pub quantization_config: Option<QuantizationConfig>,
}

/// A field that is present (possibly `null`): `Some(value)`; absent fields default to `None`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
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

    /// The RoPE parameters under either spelling (`rope_parameters`, else `rope_scaling`).
    pub fn rope(&self) -> Option<&RopeParameters> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }
}

/// How RoPE frequencies are computed (transformers' `rope_type`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeScaling {
    /// `default`: `inv_freq_i = θ^(−2i/d)`.
    #[default]
    Default,
    /// `yarn`: frequencies blended between interpolated (÷ `factor`) and original ones over the
    /// dimensions whose wavelengths fall between `beta_fast` and `beta_slow` rotations of the
    /// original context; cos and sin scaled by `attention_factor`.
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// The context the model was pretrained for.
        original_max_position_embeddings: usize,
        /// Rotations at which extrapolation stops (default 32).
        beta_fast: f64,
        /// Rotations at which interpolation starts (default 1).
        beta_slow: f64,
        /// Scale of cos and sin (`attention_factor`, or from `mscale` / `mscale_all_dim`).
        attention_factor: f64,
        /// Round the correction range to whole dimensions (default true).
        truncate: bool,
        /// DeepSeek's `mscale_all_dim` (0 when absent): the softmax scale is multiplied by
        /// `yarn_mscale(factor, mscale_all_dim)²`.
        mscale_all_dim: f64,
    },
}

/// YaRN's magnitude correction `0.1 · m · ln(s) + 1` (1 for `s ≤ 1`).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// Multi-head Latent Attention sizes (DeepSeek-V2/V3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlaConfig {
    /// Rank of the query LoRA (`q_a_proj` → `q_a_layernorm` → `q_b_proj`); `None`: one `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rank of the compressed KV latent (what the cache stores per token, with the rotary key).
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without RoPE.
    pub qk_nope_head_dim: usize,
    /// Rotary query/key dimensions (the rotary key is shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value size.
    pub v_head_dim: usize,
    /// RoPE on interleaved pairs `(2i, 2i+1)` (DeepSeek-V3 `rope_interleave`, and V2's complex
    /// rotary form) instead of halves `(i, i + d/2)`.
    pub rope_interleave: bool,
    /// q/kv down-projections and `o_proj` have biases (`attention_bias`).
    pub attention_bias: bool,
}

impl MlaConfig {
    /// Query/key head size: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
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
    /// `deepseek_v2`
    DeepseekV2,
    /// `deepseek_v3`
    DeepseekV3,
}

impl Family {
    /// The family of a `model_type`, if supported.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "qwen2_moe" => Self::Qwen2Moe,
            "qwen3_moe" => Self::Qwen3Moe,
            "olmoe" => Self::Olmoe,
            "mixtral" => Self::Mixtral,
            "deepseek_v2" => Self::DeepseekV2,
            "deepseek_v3" => Self::DeepseekV3,
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
            Self::DeepseekV2 => "deepseek_v2",
            Self::DeepseekV3 => "deepseek_v3",
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
    /// How RoPE frequencies are computed.
    #[serde(default)]
    pub rope_scaling: RopeScaling,
    /// Multi-head Latent Attention (DeepSeek) instead of grouped-query attention; `head_dim` is
    /// then the query/key head size and `num_kv_heads = num_heads`.
    #[serde(default)]
    pub mla: Option<MlaConfig>,
    /// Extra decoder layers stored after the last one that the model does not run (DeepSeek-V3's
    /// multi-token-prediction layers, `num_nextn_predict_layers`): their tensors are skipped.
    #[serde(default)]
    pub skipped_layers: usize,
    /// FP8 block size `[rows, cols]` of `weight_scale_inv` (`quantization_config`), when the
    /// checkpoint stores FP8 weights.
    #[serde(default)]
    pub fp8_block: Option<[usize; 2]>,
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
        if let Some(mla) = &self.mla {
            for (field, value) in [
                ("kv_lora_rank", mla.kv_lora_rank),
                ("qk_nope_head_dim", mla.qk_nope_head_dim),
                ("qk_rope_head_dim", mla.qk_rope_head_dim),
                ("v_head_dim", mla.v_head_dim),
                ("q_lora_rank", mla.q_lora_rank.unwrap_or(1)),
            ] {
                if value == 0 {
                    return Err(format!("`{field}` must be greater than 0"));
                }
            }
            if !mla.qk_rope_head_dim.is_multiple_of(2) {
                return Err(format!(
                    "qk_rope_head_dim = {} must be even (RoPE rotates pairs of dimensions)",
                    mla.qk_rope_head_dim
                ));
            }
            if self.head_dim != mla.qk_head_dim() || self.num_kv_heads != self.num_heads {
                return Err("internal: MLA head sizes".into());
            }
        } else if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim = {} must be even (RoPE rotates pairs of dimensions)",
                self.head_dim
            ));
        }
        if let Some([rows, cols]) = self.fp8_block {
            if rows == 0 || cols == 0 {
                return Err("FP8 weight_block_size must be > 0".into());
            }
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

    /// The number of dimensions RoPE rotates per head: `qk_rope_head_dim` with MLA, else
    /// `head_dim`.
    pub fn rope_dim(&self) -> usize {
        self.mla
            .as_ref()
            .map_or(self.head_dim, |mla| mla.qk_rope_head_dim)
    }

    /// The softmax scale of attention: `1/√head_dim`; with MLA and YaRN's `mscale_all_dim`,
    /// times `yarn_mscale(factor, mscale_all_dim)²` (DeepSeek).
    pub fn attention_scale(&self) -> f64 {
        let base = (self.head_dim as f64).powf(-0.5);
        match (&self.mla, self.rope_scaling) {
            (
                Some(_),
                RopeScaling::Yarn {
                    factor,
                    mscale_all_dim,
                    ..
                },
            ) if mscale_all_dim != 0.0 => {
                let m = yarn_mscale(factor, mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }

    /// Values the KV cache holds per token and layer: with MLA the compressed latent and the
    /// shared rotary key (`kv_lora_rank + qk_rope_head_dim`), else keys and values
    /// (`2 · kv_heads · head_dim`).
    pub fn kv_cache_values_per_token(&self) -> usize {
        match &self.mla {
            Some(mla) => mla.kv_lora_rank + mla.qk_rope_head_dim,
            None => 2 * self.num_kv_heads * self.head_dim,
        }
    }

    /// What full per-head keys and values would take per token and layer
    /// (`heads · (qk_head_dim + v_head_dim)` with MLA; the same as
    /// [`Self::kv_cache_values_per_token`] otherwise).
    pub fn full_kv_values_per_token(&self) -> usize {
        match &self.mla {
            Some(mla) => self.num_heads * (mla.qk_head_dim() + mla.v_head_dim),
            None => self.kv_cache_values_per_token(),
        }
    }

    /// Bytes the KV cache takes per token over all layers, holding values of `value_bytes` bytes
    /// (4 for `f32`, 2 for a 16-bit cache: [`KvCache`](super::cache::KvCache)).
    pub fn kv_cache_bytes_per_token(&self, value_bytes: usize) -> usize {
        self.num_layers * self.kv_cache_values_per_token() * value_bytes
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
        let attention = match &self.mla {
            None => h * q + 2 * h * kv + q * h + bias + qk_norm,
            Some(mla) => {
                let heads = n(self.num_heads);
                let (r, rope) = (n(mla.kv_lora_rank), n(mla.qk_rope_head_dim));
                let bias = |size: u128| if mla.attention_bias { size } else { 0 };
                let query = match mla.q_lora_rank {
                    None => h * q,
                    // q_a_proj (+ bias), q_a_layernorm, q_b_proj.
                    Some(rank) => h * n(rank) + bias(n(rank)) + n(rank) + n(rank) * q,
                };
                let kv_a = h * (r + rope) + bias(r + rope) + r;
                let kv_b = r * heads * n(mla.qk_nope_head_dim + mla.v_head_dim);
                let o = heads * n(mla.v_head_dim) * h + bias(h);
                query + kv_a + kv_b + o
            }
        };
        let moe = &self.moe;
        ParameterParts {
            hidden: h,
            embedding: v * h,
            attention: attention + 2 * h,
            expert: 3 * h * n(moe.intermediate_size),
            experts: n(moe.num_experts),
            // Router (and DeepSeek-V3's correction bias) and shared expert.
            moe_shared: n(moe.num_experts) * h
                + if matches!(moe.routing, crate::config::RoutingRule::DeepSeekV3 { .. }) {
                    n(moe.num_experts)
                } else {
                    0
                }
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
