//! DeepSeek-V2 and DeepSeek-V3: Multi-head Latent Attention ([`MlaConfig`]), the first
//! `first_k_dense_replace` layers dense, ungated shared experts of `n_shared_experts ×
//! moe_intermediate_size`, routed weights × `routed_scaling_factor`.
//!
//! - V2: softmax scores, `greedy` or `group_limited_greedy` top-K (`topk_method`), never
//!   renormalised; RoPE always on interleaved pairs (transformers' complex form).
//! - V3: sigmoid scores chosen with `e_score_correction_bias` in the best `topk_group` of
//!   `n_group` groups (`noaux_tc`), renormalised if `norm_topk_prob`; RoPE interleaved if
//!   `rope_interleave`; multi-token-prediction layers (`num_nextn_predict_layers`) skipped.
//!
//! Fields absent from `config.json` take transformers' defaults for the family; the MLA sizes
//! must be present.

use super::{common, plain_attention, required, Family};
use crate::config::{GroupLimit, RoutingRule, SharedExpertConfig};
use crate::model::config::{HfConfig, MlaConfig, ModelConfig, QkNorm};

pub(super) fn config(family: Family, hf: &HfConfig) -> Result<ModelConfig, String> {
    let v3 = family == Family::DeepseekV3;
    if hf.mlp_bias == Some(true) {
        return Err("mlp_bias = true is not supported (DeepSeek checkpoints have none)".into());
    }
    let q_lora_rank = match hf.q_lora_rank {
        Some(rank) => rank,
        None => return Err("missing `q_lora_rank` (null for a plain q_proj)".into()),
    };
    let mla = MlaConfig {
        q_lora_rank,
        kv_lora_rank: required(hf.kv_lora_rank, "kv_lora_rank")?,
        qk_nope_head_dim: required(hf.qk_nope_head_dim, "qk_nope_head_dim")?,
        qk_rope_head_dim: required(hf.qk_rope_head_dim, "qk_rope_head_dim")?,
        v_head_dim: required(hf.v_head_dim, "v_head_dim")?,
        // V2 rotates interleaved pairs as complex numbers, whatever the config says.
        rope_interleave: !v3 || hf.rope_interleave.unwrap_or(true),
        attention_bias: hf.attention_bias.unwrap_or(false),
    };
    let scaling = hf
        .routed_scaling_factor
        .unwrap_or(if v3 { 2.5 } else { 1.0 });
    let routing = if v3 {
        if let Some(method) = hf.topk_method.as_deref().filter(|m| *m != "noaux_tc") {
            return Err(format!(
                "topk_method `{method}` is not supported for deepseek_v3 (only `noaux_tc`)"
            ));
        }
        if let Some(func) = hf.scoring_func.as_deref().filter(|f| *f != "sigmoid") {
            return Err(format!(
                "scoring_func `{func}` is not supported for deepseek_v3 (only `sigmoid`)"
            ));
        }
        RoutingRule::DeepSeekV3 {
            group: GroupLimit::new(hf.n_group.unwrap_or(8), hf.topk_group.unwrap_or(4)),
            normalize_top_k: hf.norm_topk_prob.unwrap_or(true),
            routed_scaling_factor: scaling,
        }
    } else {
        let group = match hf.topk_method.as_deref().unwrap_or("greedy") {
            "greedy" => None,
            "group_limited_greedy" => Some(GroupLimit::new(
                required(hf.n_group, "n_group")?,
                required(hf.topk_group, "topk_group")?,
            )),
            other => {
                return Err(format!(
                    "topk_method `{other}` is not supported for deepseek_v2 \
                     (supported: greedy, group_limited_greedy)"
                ))
            }
        };
        RoutingRule::DeepSeekV2 {
            group,
            routed_scaling_factor: scaling,
        }
    };
    let moe_intermediate = required(hf.moe_intermediate_size, "moe_intermediate_size")?;
    let shared = match hf.n_shared_experts.unwrap_or(if v3 { 1 } else { 2 }) {
        0 => None,
        n => Some(SharedExpertConfig::new(n.saturating_mul(moe_intermediate))),
    };
    let first_dense = hf.first_k_dense_replace.unwrap_or(if v3 { 3 } else { 0 });
    let freq = hf.moe_layer_freq.unwrap_or(1);
    if freq == 0 {
        return Err("moe_layer_freq must be > 0".into());
    }
    let experts = hf.experts().unwrap_or(0);
    let moe_layers = (0..hf.num_hidden_layers)
        .map(|l| experts > 0 && l >= first_dense && l % freq == 0)
        .collect();
    let mut config = common(
        family,
        hf,
        plain_attention(false, QkNorm::None),
        routing,
        moe_intermediate,
        shared,
        moe_layers,
    )?;
    // Every head has its own key and value (expanded from the shared latent).
    config.num_kv_heads = config.num_heads;
    config.head_dim = mla.qk_head_dim();
    config.mla = Some(mla);
    if v3 {
        config.skipped_layers = hf
            .num_nextn_predict_layers
            .or(hf.num_mtp_layers)
            .unwrap_or(0);
    }
    Ok(config)
}
