//! Qwen2-MoE: q/k/v biases, softmax top-K (renormalised if `norm_topk_prob`), a sigmoid-gated
//! shared expert, dense layers from `mlp_only_layers` / `decoder_sparse_step`.

use super::{common, plain_attention, qwen_moe_layers, required, Family};
use crate::config::{RoutingRule, SharedExpertConfig};
use crate::model::config::{HfConfig, ModelConfig, QkNorm};

pub(super) fn config(hf: &HfConfig) -> Result<ModelConfig, String> {
    let shared = match hf.shared_expert_intermediate_size {
        Some(0) | None => None,
        Some(size) => Some(SharedExpertConfig::new(size).with_gated(true)),
    };
    let mut attention = plain_attention(hf.qkv_bias.unwrap_or(true), QkNorm::None);
    if hf.use_sliding_window == Some(true) {
        attention.sliding_window = hf.sliding_window.filter(|w| *w > 0);
    }
    common(
        Family::Qwen2Moe,
        hf,
        attention,
        RoutingRule::softmax(hf.norm_topk_prob.unwrap_or(false)),
        required(hf.moe_intermediate_size, "moe_intermediate_size")?,
        shared,
        qwen_moe_layers(hf)?,
    )
}
