//! Qwen3-MoE: decoupled `head_dim`, RMSNorm on each query/key head before RoPE, softmax top-K
//! (renormalised if `norm_topk_prob`), no shared expert.

use super::{common, plain_attention, qwen_moe_layers, required, Family};
use crate::config::RoutingRule;
use crate::model::config::{HfConfig, ModelConfig, QkNorm};

pub(super) fn config(hf: &HfConfig) -> Result<ModelConfig, String> {
    let mut attention = plain_attention(hf.attention_bias.unwrap_or(false), QkNorm::PerHead);
    if hf.use_sliding_window == Some(true) {
        attention.sliding_window = hf.sliding_window.filter(|w| *w > 0);
    }
    common(
        Family::Qwen3Moe,
        hf,
        attention,
        RoutingRule::softmax(hf.norm_topk_prob.unwrap_or(false)),
        required(hf.moe_intermediate_size, "moe_intermediate_size")?,
        None,
        qwen_moe_layers(hf)?,
    )
}
