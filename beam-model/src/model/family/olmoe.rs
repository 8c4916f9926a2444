//! OLMoE: RMSNorm over the whole q and k projections before the split into heads, optional
//! `clip_qkv`, softmax top-K (renormalised if `norm_topk_prob`), every layer MoE with experts of
//! size `intermediate_size`.

use super::{common, plain_attention, required, Family};
use crate::config::RoutingRule;
use crate::model::config::{HfConfig, ModelConfig, QkNorm};

pub(super) fn config(hf: &HfConfig) -> Result<ModelConfig, String> {
    let mut attention = plain_attention(hf.attention_bias.unwrap_or(false), QkNorm::Whole);
    attention.clip_qkv = hf.clip_qkv;
    let mut config = common(
        Family::Olmoe,
        hf,
        attention,
        RoutingRule::softmax(hf.norm_topk_prob.unwrap_or(false)),
        required(hf.intermediate_size, "intermediate_size")?,
        None,
        vec![true; hf.num_hidden_layers],
    )?;
    // OLMoE's k_norm is sized from hidden_size / heads, whatever head_dim says.
    if hf
        .head_dim
        .is_some_and(|d| d * hf.num_attention_heads != hf.hidden_size)
    {
        return Err("OLMoE needs head_dim × num_attention_heads = hidden_size".into());
    }
    config.dense_intermediate_size = 0;
    Ok(config)
}
