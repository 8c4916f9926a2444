//! The supported model families: how each maps its `config.json` onto [`ModelConfig`] and names
//! its MoE block's tensors on disk ([`MoeTensorNames`]). A new family adds a file here.

mod deepseek;
mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;

use std::path::Path;

pub use super::config::Family;
use super::config::{
    yarn_mscale, AttentionOptions, HfConfig, ModelConfig, QkNorm, RopeScaling, TokenIds,
};
use super::ModelError;
use crate::config::{BeamMoeConfig, RoutingRule, SharedExpertConfig};

impl Family {
    /// Name of the MoE block inside a decoder layer (`mlp` or Mixtral's `block_sparse_moe`).
    pub fn moe_block_name(self) -> &'static str {
        match self {
            Self::Mixtral => "block_sparse_moe",
            _ => "mlp",
        }
    }

    /// How this family spells its MoE block's tensors.
    pub fn moe_names(self) -> MoeTensorNames {
        match self {
            Self::Mixtral => MoeTensorNames::MIXTRAL,
            Self::Qwen2Moe | Self::Qwen3Moe | Self::Olmoe => MoeTensorNames::QWEN,
            Self::DeepseekV2 | Self::DeepseekV3 => MoeTensorNames::DEEPSEEK,
        }
    }

    pub(crate) fn config(self, hf: &HfConfig) -> Result<ModelConfig, String> {
        check_sizes(hf)?;
        match self {
            Self::Qwen2Moe => qwen2_moe::config(hf),
            Self::Qwen3Moe => qwen3_moe::config(hf),
            Self::Olmoe => olmoe::config(hf),
            Self::Mixtral => mixtral::config(hf),
            Self::DeepseekV2 | Self::DeepseekV3 => deepseek::config(self, hf),
        }
    }
}

/// Reading a checkpoint's `config.json`: the family named by `model_type` maps it onto a
/// [`ModelConfig`], which is then validated.
impl ModelConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = dir.as_ref().join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_hf(&HfConfig::parse(&text, &path)?, &path)
    }

    /// Normalises and validates a parsed `config.json` (`path` for errors).
    pub fn from_hf(hf: &HfConfig, path: &Path) -> Result<Self, ModelError> {
        let family = Family::from_model_type(&hf.model_type).ok_or_else(|| {
            ModelError::UnknownModelType {
                path: path.to_path_buf(),
                model_type: hf.model_type.clone(),
            }
        })?;
        let bad = |reason: String| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let config = family.config(hf).map_err(&bad)?;
        config.validate().map_err(bad)?;
        Ok(config)
    }
}

/// A family's names for the tensors of its MoE block, after the block prefix
/// (`model.layers.{l}.mlp.`). The fused layout newer transformers write for every family
/// (`experts.gate_up_proj`, `experts.down_proj`) needs no names and is always accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeTensorNames {
    /// Per-expert gate, up and down projections: `experts.{e}.{name}.weight`.
    pub expert_projections: [&'static str; 3],
    /// The shared expert's module: `{name}.{gate_proj,up_proj,down_proj}.weight`.
    pub shared_expert: &'static str,
    /// The shared expert's `[1, H]` sigmoid gate, `{name}.weight` (read for a gated shared expert).
    pub shared_expert_gate: &'static str,
}

impl MoeTensorNames {
    /// Qwen2-MoE, Qwen3-MoE, OLMoE: `gate_proj`/`up_proj`/`down_proj`, Qwen2-MoE's
    /// `shared_expert` with `shared_expert_gate`.
    pub const QWEN: Self = Self {
        expert_projections: ["gate_proj", "up_proj", "down_proj"],
        shared_expert: "shared_expert",
        shared_expert_gate: "shared_expert_gate",
    };
    /// Mixtral: `w1` (gate), `w3` (up), `w2` (down); no shared expert.
    pub const MIXTRAL: Self = Self {
        expert_projections: ["w1", "w3", "w2"],
        ..Self::QWEN
    };
    /// DeepSeek-V2/V3: `gate_proj`/`up_proj`/`down_proj` and ungated `shared_experts`.
    pub const DEEPSEEK: Self = Self {
        shared_expert: "shared_experts",
        ..Self::QWEN
    };
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
        ("q_lora_rank", hf.q_lora_rank.flatten()),
        ("kv_lora_rank", hf.kv_lora_rank),
        ("qk_nope_head_dim", hf.qk_nope_head_dim),
        ("qk_rope_head_dim", hf.qk_rope_head_dim),
        ("v_head_dim", hf.v_head_dim),
        ("n_shared_experts", hf.n_shared_experts),
        ("n_group", hf.n_group),
        ("num_nextn_predict_layers", hf.num_nextn_predict_layers),
        ("num_mtp_layers", hf.num_mtp_layers),
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
    let rope_scaling = rope_scaling(hf)?;
    let fp8_block = fp8_block(hf)?;
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
        .with_beam(None);
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
        max_position_embeddings: hf.max_position_embeddings.filter(|&n| n > 0),
        rope_scaling,
        mla: None,
        skipped_layers: 0,
        fp8_block,
    })
}

/// RoPE frequencies as transformers computes them (`rope_parameters` or `rope_scaling`):
/// `default` or `yarn`; any other type is an error.
fn rope_scaling(hf: &HfConfig) -> Result<RopeScaling, String> {
    let Some(rope) = hf.rope() else {
        return Ok(RopeScaling::Default);
    };
    match rope.rope_type.as_deref().unwrap_or("default") {
        "default" => Ok(RopeScaling::Default),
        "yarn" => {
            let original = rope
                .original_max_position_embeddings
                .or(hf.max_position_embeddings)
                .filter(|&n| n > 0)
                .ok_or("yarn RoPE needs `original_max_position_embeddings`")?;
            // transformers: without `factor`, the ratio of the two contexts.
            let factor = match (rope.factor, hf.max_position_embeddings) {
                (Some(f), _) => f,
                (None, Some(max)) => max as f64 / original as f64,
                (None, None) => return Err("yarn RoPE needs `factor`".into()),
            };
            if !(factor.is_finite() && factor > 0.0) {
                return Err(format!("yarn RoPE factor = {factor} must be > 0"));
            }
            // Python's `x or default`: 0 and null both take the default.
            let nonzero = |v: Option<f64>| v.filter(|v| *v != 0.0);
            let (mscale, mscale_all_dim) = (nonzero(rope.mscale), nonzero(rope.mscale_all_dim));
            let attention_factor =
                rope.attention_factor
                    .unwrap_or(match (mscale, mscale_all_dim) {
                        (Some(m), Some(all)) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
                        _ => yarn_mscale(factor, 1.0),
                    });
            let beta_fast = nonzero(rope.beta_fast).unwrap_or(32.0);
            let beta_slow = nonzero(rope.beta_slow).unwrap_or(1.0);
            for (name, v) in [
                ("attention_factor", attention_factor),
                ("beta_fast", beta_fast),
                ("beta_slow", beta_slow),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(format!("yarn RoPE {name} = {v} must be > 0"));
                }
            }
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate: rope.truncate.unwrap_or(true),
                mscale_all_dim: mscale_all_dim.unwrap_or(0.0),
            })
        }
        other => Err(format!(
            "rope_type `{other}` is not supported (supported: default, yarn)"
        )),
    }
}

/// The FP8 block size of a `quantization_config` (`fp8`, `e4m3`, default 128 × 128); other
/// quantization methods are an error.
fn fp8_block(hf: &HfConfig) -> Result<Option<[usize; 2]>, String> {
    let Some(q) = &hf.quantization_config else {
        return Ok(None);
    };
    match q.quant_method.as_deref() {
        Some("fp8") => {}
        other => {
            return Err(format!(
                "quantization_config.quant_method {other:?} is not supported (only \"fp8\")"
            ))
        }
    }
    if let Some(fmt) = q.fmt.as_deref().filter(|f| *f != "e4m3") {
        return Err(format!(
            "quantization_config.fmt `{fmt}` is not supported (only `e4m3`)"
        ));
    }
    match q.weight_block_size.as_deref() {
        None => Ok(Some([128, 128])),
        Some(&[rows, cols]) if rows > 0 && cols > 0 => Ok(Some([rows, cols])),
        Some(other) => Err(format!(
            "quantization_config.weight_block_size {other:?} must be two sizes > 0"
        )),
    }
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
