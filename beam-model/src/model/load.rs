//! Building a [`MoeLm`] from a Hugging Face checkpoint folder (`config.json` + safetensors).

use std::path::Path;

use burn::module::Param;
use burn::nn::Embedding;

use super::attention::{Attention, Projection};
use super::config::{ModelConfig, QkNorm};
use super::norm::RmsNorm;
use super::{DecoderLayer, FeedForward, ModelError, MoeLm};
use crate::checkpoint::{load_moe_block, load_swiglu, LoadError, TensorStore};
use crate::dispatch::MoeBackend;

/// Loads the model in `dir`: `config.json` and `model.safetensors` or the shards listed by
/// `model.safetensors.index.json`. Every tensor must be used exactly as the config says:
/// missing, extra, misshaped or non-float tensors are typed errors naming the file and tensor.
pub fn load_model<B: MoeBackend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
) -> Result<MoeLm<B>, ModelError> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(ModelError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model folder"),
        });
    }
    let config = ModelConfig::from_dir(dir)?;
    let store = TensorStore::open_dir(dir)?;
    let model = build(config, &store, device)?;
    let tied = model.config().tie_word_embeddings;
    store.check_all_used(|name| {
        name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight")
    })?;
    Ok(model)
}

fn build<B: MoeBackend>(
    config: ModelConfig,
    store: &TensorStore,
    device: &B::Device,
) -> Result<MoeLm<B>, LoadError> {
    let (h, v) = (config.hidden_size, config.vocab_size);
    let q_out = config.num_heads * config.head_dim;
    let kv_out = config.num_kv_heads * config.head_dim;
    let eps = config.rms_norm_eps;
    let norm = |name: String, size: usize| -> Result<RmsNorm<B>, LoadError> {
        Ok(RmsNorm::new(store.param(&name, [size], device)?, eps))
    };
    let projection =
        |name: String, out: usize, input: usize, bias: bool| -> Result<Projection<B>, LoadError> {
            Ok(Projection {
                weight: store.param(&format!("{name}.weight"), [out, input], device)?,
                bias: bias
                    .then(|| store.param(&format!("{name}.bias"), [out], device))
                    .transpose()?,
            })
        };

    let mut layers = Vec::with_capacity(config.num_layers);
    for (l, &is_moe) in config.moe_layers.iter().enumerate() {
        let p = format!("model.layers.{l}.");
        let bias = config.attention.qkv_bias;
        let (q_norm, k_norm) = match config.attention.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(norm(
                    format!("{p}self_attn.q_norm.weight"),
                    config.head_dim,
                )?),
                Some(norm(
                    format!("{p}self_attn.k_norm.weight"),
                    config.head_dim,
                )?),
            ),
            QkNorm::Whole => (
                Some(norm(format!("{p}self_attn.q_norm.weight"), q_out)?),
                Some(norm(format!("{p}self_attn.k_norm.weight"), kv_out)?),
            ),
        };
        let attention = Attention::new(
            &config,
            [
                projection(format!("{p}self_attn.q_proj"), q_out, h, bias)?,
                projection(format!("{p}self_attn.k_proj"), kv_out, h, bias)?,
                projection(format!("{p}self_attn.v_proj"), kv_out, h, bias)?,
                projection(format!("{p}self_attn.o_proj"), h, q_out, false)?,
            ],
            q_norm,
            k_norm,
        );
        let block = format!("{p}{}.", config.family.moe_block_name());
        let feed_forward = if is_moe {
            // Placeholders: every routed weight is overwritten from the checkpoint right away.
            let moe = config
                .moe
                .init_placeholder::<B>(device)
                .expect("validated with the model config");
            FeedForward {
                moe: Some(load_moe_block(moe, store, &block)?),
                dense: None,
            }
        } else {
            FeedForward {
                moe: None,
                dense: Some(load_swiglu(
                    store,
                    &format!("{p}mlp."),
                    h,
                    config.dense_intermediate_size,
                    None,
                    device,
                )?),
            }
        };
        layers.push(DecoderLayer {
            input_norm: norm(format!("{p}input_layernorm.weight"), h)?,
            attention,
            post_attention_norm: norm(format!("{p}post_attention_layernorm.weight"), h)?,
            feed_forward,
        });
    }
    let embed = Embedding {
        weight: store.param("model.embed_tokens.weight", [v, h], device)?,
    };
    let final_norm = norm("model.norm.weight".into(), h)?;
    let lm_head: Option<Param<_>> = if config.tie_word_embeddings {
        None
    } else {
        Some(store.param("lm_head.weight", [v, h], device)?)
    };
    Ok(MoeLm::from_parts(
        config, embed, layers, final_norm, lm_head,
    ))
}
