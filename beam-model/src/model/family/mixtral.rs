//! Mixtral: plain GQA with an optional sliding window, softmax top-K always renormalised, every
//! layer MoE (`block_sparse_moe`, experts `w1`/`w3`/`w2`) of size `intermediate_size`.

use super::{common, plain_attention, required, Family};
use crate::config::RoutingRule;
use crate::model::config::{HfConfig, ModelConfig, QkNorm};

pub(super) fn config(hf: &HfConfig) -> Result<ModelConfig, String> {
    let mut attention = plain_attention(false, QkNorm::None);
    attention.sliding_window = hf.sliding_window.filter(|w| *w > 0);
    let mut config = common(
        Family::Mixtral,
        hf,
        attention,
        RoutingRule::mixtral(),
        required(hf.intermediate_size, "intermediate_size")?,
        None,
        vec![true; hf.num_hidden_layers],
    )?;
    config.dense_intermediate_size = 0;
    Ok(config)
}
