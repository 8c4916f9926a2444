//! Building a [`MoeLm`] from a Hugging Face checkpoint folder (`config.json` + safetensors).

use std::path::Path;

use burn::module::Param;
use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::attention::{Attention, Projection};
use super::config::{ModelConfig, QkNorm};
use super::family::MoeTensorNames;
use super::norm::RmsNorm;
use super::{DecoderLayer, FeedForward, ModelError, MoeLm};
use crate::checkpoint::{LoadError, TensorStore};
use crate::experts::SharedExpert;
use crate::layer::BeamMoe;
use crate::MoeBackend;

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
            FeedForward::Moe(load_moe_block(
                moe,
                store,
                &block,
                &config.family.moe_names(),
            )?)
        } else {
            FeedForward::Dense(load_swiglu(
                store,
                &format!("{p}mlp."),
                h,
                config.dense_intermediate_size,
                None,
                device,
            )?)
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

/// Loads a transformers MoE block's weights into `layer`, leaving its mask router untouched.
///
/// `prefix` is the block's name prefix, e.g. `model.layers.3.mlp.` (Mixtral:
/// `model.layers.3.block_sparse_moe.`); `names` are the family's spellings
/// ([`Family::moe_names`](super::family::Family::moe_names)). Read:
/// - router `gate.weight` `[E, H]` (+ DeepSeek-V3 `gate.e_score_correction_bias` `[E]`);
/// - experts fused (`experts.gate_up_proj` `[E, 2I, H]`, `experts.down_proj` `[E, H, I]`, as newer
///   transformers write them for every family) if present, else per expert
///   (`experts.{e}.{gate,up,down}.weight` with the family's projection names);
/// - the shared expert, if the layer has one, under the family's names.
pub fn load_moe_block<B: Backend>(
    mut layer: BeamMoe<B>,
    file: &TensorStore,
    prefix: &str,
    names: &MoeTensorNames,
) -> Result<BeamMoe<B>, LoadError> {
    let config = layer.config().clone();
    let (e, h, i) = (
        config.num_experts,
        config.hidden_size,
        config.intermediate_size,
    );
    let device = layer.router.weight.device();
    layer.router.weight = file.param(&format!("{prefix}gate.weight"), [e, h], &device)?;
    if layer.router.score_correction_bias.is_some() {
        layer.router.score_correction_bias = Some(file.param(
            &format!("{prefix}gate.e_score_correction_bias"),
            [e],
            &device,
        )?);
    }

    let fused = format!("{prefix}experts.gate_up_proj");
    let (gate_up, down) = if file.contains(&fused) {
        (
            file.tensor(&fused, [e, 2 * i, h], &device)?,
            file.tensor(&format!("{prefix}experts.down_proj"), [e, h, i], &device)?,
        )
    } else {
        let [gate, up, down] = names.expert_projections;
        let name =
            |proj: &'static str| move |e: usize| format!("{prefix}experts.{e}.{proj}.weight");
        let gate_up = file.stacked(&[&name(gate), &name(up)], e, [i, h])?;
        let downs = file.stacked(&[&name(down)], e, [h, i])?;
        (
            Tensor::from_data(TensorData::new(gate_up, [e, 2 * i, h]), &device),
            Tensor::from_data(TensorData::new(downs, [e, h, i]), &device),
        )
    };
    layer.experts.gate_up = Param::from_tensor(gate_up);
    layer.experts.down = Param::from_tensor(down);

    if let (Some(shared), Some(shared_config)) = (layer.shared_expert.take(), &config.shared_expert)
    {
        let base = format!("{prefix}{}.", names.shared_expert);
        let gate = shared
            .gate
            .is_some()
            .then(|| format!("{prefix}{}.weight", names.shared_expert_gate));
        layer.shared_expert = Some(load_swiglu(
            file,
            &base,
            h,
            shared_config.intermediate_size,
            gate.as_deref(),
            &device,
        )?);
    }
    Ok(layer)
}

/// Loads a SwiGLU MLP stored as `{base}gate_proj.weight`, `{base}up_proj.weight` (`[I, H]`) and
/// `{base}down_proj.weight` (`[H, I]`), with an optional `[1, H]` sigmoid output gate.
pub fn load_swiglu<B: Backend>(
    file: &TensorStore,
    base: &str,
    hidden: usize,
    intermediate: usize,
    gate: Option<&str>,
    device: &B::Device,
) -> Result<SharedExpert<B>, LoadError> {
    let (h, i) = (hidden, intermediate);
    let gate_up = file.stacked(
        &[&|_| format!("{base}gate_proj.weight"), &|_| {
            format!("{base}up_proj.weight")
        }],
        1,
        [i, h],
    )?;
    Ok(SharedExpert {
        gate_up: Param::from_tensor(Tensor::from_data(
            TensorData::new(gate_up, [2 * i, h]),
            device,
        )),
        down: file.param(&format!("{base}down_proj.weight"), [h, i], device)?,
        gate: gate
            .map(|name| file.param(name, [1, h], device))
            .transpose()?,
    })
}
