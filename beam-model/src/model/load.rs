//! Building a [`MoeLm`] from a Hugging Face checkpoint folder (`config.json` + safetensors).

use std::path::Path;

use burn::module::Param;
use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::TensorData;

use super::attention::{Attention, Projection, SelfAttention};
use super::config::{ModelConfig, QkNorm};
use super::family::MoeTensorNames;
use super::mla::{MlaAttention, MlaQuery, MlaQueryLoRa, MLA_NORM_EPS};
use super::norm::RmsNorm;
use super::{DecoderLayer, FeedForward, ModelError, MoeLm};
use crate::checkpoint::{
    held, held_as, stacked_held_as, LoadError, Quantization, TensorStore, WeightDtype, WeightFormat,
};
use crate::experts::SharedExpert;
use crate::layer::BeamMoe;
use crate::weight::Weight;
use crate::{GroupedExpertsBackend, LinearBackend, MoeBackend};

/// How [`load_model_with`] holds the weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Precision of the large weights (embeddings, attention projections, experts, dense MLPs,
    /// LM head): `None` keeps the checkpoint's where the backend can hold it (burn's Flex, CUDA:
    /// `bf16`/`f16`; ndarray: `f32`). Norms, biases, routers and mask routers stay `f32`, and
    /// activations are `f32` whatever the weights.
    pub dtype: Option<WeightDtype>,
    /// Quantize the `[out, in]` linear weights at load (attention projections, routed and shared
    /// experts, dense MLPs, an untied LM head), from whatever precision they are stored in;
    /// embeddings, norms, routers and mask routers keep `dtype`/`f32`. Backends that run
    /// quantized weights in place ([`LinearBackend::quant_in_place`]: burn's Flex) hold the
    /// packed blocks (int8 for q8, nibbles for q4); the others get the quantized model's values
    /// dequantized once at load into `dtype`.
    pub quantize: Option<Quantization>,
    /// Copy every weight into memory the model owns even where the backend could read the
    /// memory-mapped checkpoint in place (burn's Flex, weights kept in their stored dtype):
    /// the mapping's pages then leave the process as they are copied, and the model no longer
    /// depends on the files once loaded. `false` (the default) borrows what the backend can
    /// ([`LinearBackend::borrows_host_weights`]): no copy, no fresh memory, the page cache's
    /// pages read in place (llama.cpp's default; its `--no-mmap` is this option). A model that
    /// reads its files in place needs them unchanged for as long as it lives, as llama.cpp's
    /// does: replacing a checkpoint by writing a new file and renaming it over the old one is
    /// safe, rewriting or truncating it in place under a running model is not (the model would
    /// see the new bytes, or be killed by `SIGBUS` reading past the new end). Copy when that
    /// cannot be promised.
    pub copy_weights: bool,
}

/// What the backend reads in place, which decides what the loader copies.
#[derive(Debug, Clone, Copy, Default)]
struct InPlace {
    /// Quantized weights as packed blocks ([`LinearBackend::quant_in_place`]).
    quant: bool,
    /// Tensors borrowed from the mapped checkpoint ([`LinearBackend::borrows_host_weights`]).
    borrows: bool,
    /// Routed experts as per-expert tensors
    /// ([`GroupedExpertsBackend::expert_parts_in_place`]).
    expert_parts: bool,
}

impl InPlace {
    fn of<B: LinearBackend + GroupedExpertsBackend>(copy_weights: bool) -> Self {
        let borrows = B::borrows_host_weights() && !copy_weights;
        Self {
            quant: B::quant_in_place(),
            borrows,
            expert_parts: borrows && B::expert_parts_in_place(),
        }
    }

    /// Whether a weight held in `format` is borrowed from the mapping when it can be: where the
    /// backend keeps borrowed bytes and the weight is not quantized (quantizing reads it once
    /// and keeps its own int8 copy, so its pages should leave the process as it goes).
    fn borrow(self, format: WeightFormat) -> bool {
        self.borrows && format.quantize.is_none()
    }
}

impl LoadOptions {
    /// The precision the weights of the checkpoint `store` (in `dir`) are held in on `B`: the
    /// requested one, or the stored one where `B` holds it, else `f32`. A requested precision
    /// `B` cannot hold is [`ModelError::UnsupportedDtype`].
    pub fn resolve<B: Backend>(
        &self,
        dir: &Path,
        store: &TensorStore,
        device: &B::Device,
    ) -> Result<WeightDtype, ModelError> {
        // `F32` is the backend's default float (f32, or f64 on an f64 backend): always held.
        let holds = |dtype: WeightDtype| {
            dtype == WeightDtype::F32 || B::supports_dtype(device, dtype.dtype())
        };
        match self.dtype {
            Some(dtype) if holds(dtype) => Ok(dtype),
            Some(dtype) => Err(ModelError::UnsupportedDtype {
                path: dir.to_path_buf(),
                dtype,
                backend: B::name(device),
            }),
            None => Ok(store
                .stored_weight_dtype()
                .filter(|&dtype| holds(dtype))
                .unwrap_or(WeightDtype::F32)),
        }
    }
}

/// Loads the model in `dir`: `config.json` and `model.safetensors` or the shards listed by
/// `model.safetensors.index.json`, weights in `f32` ([`load_model_with`] keeps the checkpoint's
/// precision or another). Every tensor must be used exactly as the config says: missing, extra,
/// misshaped or non-float tensors are typed errors naming the file and tensor.
pub fn load_model<B: MoeBackend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
) -> Result<MoeLm<B>, ModelError> {
    load_model_with(
        dir,
        device,
        &LoadOptions {
            dtype: Some(WeightDtype::F32),
            ..LoadOptions::default()
        },
    )
}

/// [`load_model`] with the weights held as `options` say (by default in the checkpoint's
/// precision where the backend can hold it). The checkpoint is memory-mapped. On a backend that
/// reads host memory in place (burn's Flex), weights kept in their stored dtype are borrowed
/// from the mapping — the routed experts as their per-expert tensors
/// ([`Weight::Parts`]) — unless `options.copy_weights`; every other tensor is copied (or
/// converted) once, straight into the buffer the backend tensor owns.
pub fn load_model_with<B: MoeBackend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
    options: &LoadOptions,
) -> Result<MoeLm<B>, ModelError> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(ModelError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model folder"),
        });
    }
    let config = ModelConfig::from_dir(dir)?;
    let mut store = TensorStore::open_dir(dir)?;
    store.set_fp8_block(config.fp8_block);
    let format = WeightFormat {
        dtype: options.resolve::<B>(dir, &store, device)?,
        quantize: options.quantize,
    };
    let model = build(
        config,
        &store,
        format,
        InPlace::of::<B>(options.copy_weights),
        device,
    )?;
    let tied = model.config().tie_word_embeddings;
    let config = model.config();
    // DeepSeek-V3's multi-token-prediction layers follow the last decoder layer.
    let skipped: Vec<String> = (config.num_layers..config.num_layers + config.skipped_layers)
        .map(|l| format!("model.layers.{l}."))
        .collect();
    store.check_all_used(|name| {
        name.ends_with("rotary_emb.inv_freq")
            || (tied && name == "lm_head.weight")
            || skipped.iter().any(|prefix| name.starts_with(prefix))
    })?;
    Ok(model)
}

/// A float tensor of shape `expected` held in `format` (quantized when it says so; borrowed
/// from the mapping when `in_place` allows).
fn weight<B: Backend, const D: usize>(
    store: &TensorStore,
    name: &str,
    expected: [usize; D],
    format: WeightFormat,
    in_place: InPlace,
    device: &B::Device,
) -> Result<Weight<B, D>, LoadError> {
    let data = store.data_or_borrowed(name, &expected, format.dtype, in_place.borrow(format))?;
    held_as(
        data,
        format,
        in_place.quant,
        device,
        (store.path_of(name), name),
    )
}

fn build<B: MoeBackend>(
    config: ModelConfig,
    store: &TensorStore,
    format: WeightFormat,
    in_place: InPlace,
    device: &B::Device,
) -> Result<MoeLm<B>, LoadError> {
    let dtype = format.dtype;
    let (h, v) = (config.hidden_size, config.vocab_size);
    let q_out = config.num_heads * config.head_dim;
    let kv_out = config.num_kv_heads * config.head_dim;
    let eps = config.rms_norm_eps;
    let norm_with = |name: String, size: usize, eps: f64| -> Result<RmsNorm<B>, LoadError> {
        Ok(RmsNorm::new(store.param(&name, [size], device)?, eps))
    };
    let norm = |name: String, size: usize| norm_with(name, size, eps);
    let projection =
        |name: String, out: usize, input: usize, bias: bool| -> Result<Projection<B>, LoadError> {
            Ok(Projection {
                weight: weight(
                    store,
                    &format!("{name}.weight"),
                    [out, input],
                    format,
                    in_place,
                    device,
                )?,
                bias: bias
                    .then(|| store.param(&format!("{name}.bias"), [out], device))
                    .transpose()?,
            })
        };

    // One decoder layer from the checkpoint.
    let layer = |l: usize, is_moe: bool| -> Result<DecoderLayer<B>, LoadError> {
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
        let attention = match &config.mla {
            None => SelfAttention::Gqa(Attention::new(
                &config,
                [
                    projection(format!("{p}self_attn.q_proj"), q_out, h, bias)?,
                    projection(format!("{p}self_attn.k_proj"), kv_out, h, bias)?,
                    projection(format!("{p}self_attn.v_proj"), kv_out, h, bias)?,
                    projection(format!("{p}self_attn.o_proj"), h, q_out, false)?,
                ],
                q_norm,
                k_norm,
            )),
            Some(mla) => {
                let a = format!("{p}self_attn.");
                let heads = config.num_heads;
                let bias = mla.attention_bias;
                let (c, r) = (mla.kv_lora_rank, mla.qk_rope_head_dim);
                let mla_norm = |name: String, size: usize| norm_with(name, size, MLA_NORM_EPS);
                let query = match mla.q_lora_rank {
                    None => MlaQuery::Plain(projection(format!("{a}q_proj"), q_out, h, false)?),
                    Some(rank) => MlaQuery::LoRa(MlaQueryLoRa {
                        a: projection(format!("{a}q_a_proj"), rank, h, bias)?,
                        norm: mla_norm(format!("{a}q_a_layernorm.weight"), rank)?,
                        b: projection(format!("{a}q_b_proj"), q_out, rank, false)?,
                    }),
                };
                SelfAttention::Mla(MlaAttention::new(
                    &config,
                    query,
                    [
                        projection(format!("{a}kv_a_proj_with_mqa"), c + r, h, bias)?,
                        projection(
                            format!("{a}kv_b_proj"),
                            heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                            c,
                            false,
                        )?,
                        projection(format!("{a}o_proj"), h, heads * mla.v_head_dim, bias)?,
                    ],
                    mla_norm(format!("{a}kv_a_layernorm.weight"), c)?,
                ))
            }
        };
        let block = format!("{p}{}.", config.family.moe_block_name());
        let feed_forward = if is_moe {
            // Placeholders: every routed weight is overwritten from the checkpoint right away.
            let moe = config
                .moe
                .init_placeholder::<B>(device)
                .expect("validated with the model config");
            FeedForward::Moe(moe_block(
                moe,
                store,
                &block,
                &config.family.moe_names(),
                format,
                in_place,
            )?)
        } else {
            FeedForward::Dense(swiglu(
                store,
                &format!("{p}mlp."),
                h,
                config.dense_intermediate_size,
                None,
                format,
                in_place,
                device,
            )?)
        };
        Ok(DecoderLayer {
            input_norm: norm(format!("{p}input_layernorm.weight"), h)?,
            attention,
            post_attention_norm: norm(format!("{p}post_attention_layernorm.weight"), h)?,
            feed_forward,
        })
    };
    // While a layer is copied, the next one's bytes are read from the disk on another thread.
    let layers = std::thread::scope(|scope| -> Result<_, LoadError> {
        let mut pending: Option<std::thread::ScopedJoinHandle<'_, ()>> = None;
        let mut prefetch = |prefixes: Vec<String>| {
            // One prefetch in flight: the page cache must not fill far ahead of the copies.
            if let Some(previous) = pending.take() {
                let _ = previous.join();
            }
            pending = Some(scope.spawn(move || {
                for prefix in prefixes {
                    store.prefetch(&prefix);
                }
            }));
        };
        prefetch(vec!["model.layers.0.".into()]);
        let mut layers = Vec::with_capacity(config.num_layers);
        for (l, &is_moe) in config.moe_layers.iter().enumerate() {
            prefetch(if l + 1 < config.num_layers {
                vec![format!("model.layers.{}.", l + 1)]
            } else {
                ["model.embed_tokens.", "model.norm.", "lm_head."]
                    .map(String::from)
                    .to_vec()
            });
            layers.push(layer(l, is_moe)?);
        }
        Ok(layers)
    })?;
    let embed_data = store.data_or_borrowed(
        "model.embed_tokens.weight",
        &[v, h],
        dtype,
        in_place.borrows,
    )?;
    let embed = Embedding {
        weight: Param::from_tensor(held(embed_data, dtype, device)),
    };
    let final_norm = norm("model.norm.weight".into(), h)?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(weight(
            store,
            "lm_head.weight",
            [v, h],
            format,
            in_place,
            device,
        )?)
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
///
/// Weights in `f32`; [`load_moe_block_as`] holds the experts in another precision.
pub fn load_moe_block<B: Backend>(
    layer: BeamMoe<B>,
    file: &TensorStore,
    prefix: &str,
    names: &MoeTensorNames,
) -> Result<BeamMoe<B>, LoadError> {
    load_moe_block_as(layer, file, prefix, names, WeightDtype::F32)
}

/// [`load_moe_block`] with the routed and shared experts held in `dtype` (the router stays
/// `f32`). Per-expert tensors are written straight into their stacked buffer in `dtype`.
pub fn load_moe_block_as<B: Backend>(
    layer: BeamMoe<B>,
    file: &TensorStore,
    prefix: &str,
    names: &MoeTensorNames,
    dtype: WeightDtype,
) -> Result<BeamMoe<B>, LoadError> {
    moe_block(layer, file, prefix, names, dtype.into(), InPlace::default())
}

/// [`load_moe_block_as`] with the routed and shared experts held in `format`: quantized (q8, q4)
/// when it says so, as the packed blocks where the backend runs them in place
/// ([`LinearBackend::quant_in_place`]); otherwise borrowed from the mapped checkpoint where the
/// backend reads it in place ([`LinearBackend::borrows_host_weights`], per-expert tensors as
/// [`Weight::Parts`] where [`GroupedExpertsBackend::expert_parts_in_place`]).
pub fn load_moe_block_with<B: LinearBackend + GroupedExpertsBackend>(
    layer: BeamMoe<B>,
    file: &TensorStore,
    prefix: &str,
    names: &MoeTensorNames,
    format: WeightFormat,
) -> Result<BeamMoe<B>, LoadError> {
    moe_block(layer, file, prefix, names, format, InPlace::of::<B>(false))
}

fn moe_block<B: Backend>(
    mut layer: BeamMoe<B>,
    file: &TensorStore,
    prefix: &str,
    names: &MoeTensorNames,
    format: WeightFormat,
    in_place: InPlace,
) -> Result<BeamMoe<B>, LoadError> {
    let dtype = format.dtype;
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
        let fused_down = format!("{prefix}experts.down_proj");
        (
            weight(file, &fused, [e, 2 * i, h], format, in_place, &device)?,
            weight(file, &fused_down, [e, h, i], format, in_place, &device)?,
        )
    } else {
        let [gate, up, down] = names.expert_projections;
        let name =
            |proj: &'static str| move |e: usize| format!("{prefix}experts.{e}.{proj}.weight");
        if in_place.expert_parts && in_place.borrow(format) {
            if let Some(parts) =
                borrowed_parts(file, e, [gate, up, down].map(name), [i, h], dtype, &device)?
            {
                layer.experts.gate_up = parts.0;
                layer.experts.down = parts.1;
                return shared_expert(layer, file, prefix, names, format, in_place, &device);
            }
        }
        let stacked = |parts: &[&(dyn Fn(usize) -> String + Sync)], shape, label: &str| {
            stacked_held_as(
                file,
                parts,
                e,
                shape,
                format,
                in_place.quant,
                &device,
                (file.path_of(&parts[0](0)), label),
            )
        };
        let gate_up = stacked(
            &[&name(gate), &name(up)],
            [i, h],
            &format!("{prefix}experts.*.{{{gate},{up}}}.weight"),
        )?;
        let downs = stacked(
            &[&name(down)],
            [h, i],
            &format!("{prefix}experts.*.{down}.weight"),
        )?;
        (gate_up, downs)
    };
    layer.experts.gate_up = gate_up;
    layer.experts.down = down;
    shared_expert(layer, file, prefix, names, format, in_place, &device)
}

/// A MoE block's routed experts: `gate_up` and `down`.
type GateUpDown<B> = (Weight<B, 3>, Weight<B, 3>);

/// Every routed expert's `[gate, up, down]` tensors borrowed from the mapping (named by
/// `names(e)`; gate and up `[I, H]`, down `[H, I]`) as [`Weight::Parts`] (`[gate, up]` per
/// expert, then `[down]`), or `None` if any cannot be borrowed (see
/// [`TensorStore::borrowed`]): the caller then copies them all into stacked buffers.
fn borrowed_parts<B: Backend>(
    file: &TensorStore,
    experts: usize,
    names: [impl Fn(usize) -> String; 3],
    [i, h]: [usize; 2],
    dtype: WeightDtype,
    device: &B::Device,
) -> Result<Option<GateUpDown<B>>, LoadError> {
    let [gate, up, down] = &names;
    let part = |name: String, shape: [usize; 2]| -> Result<Option<_>, LoadError> {
        Ok(file
            .borrowed(&name, &shape, dtype)?
            .map(|data| Param::from_tensor(held::<B, 2>(data, dtype, device))))
    };
    // In the copying load's order (every expert's gate and up, then the downs), so a broken
    // checkpoint reports the same first error either way.
    let mut gate_up = Vec::with_capacity(experts);
    for e in 0..experts {
        let (Some(g), Some(u)) = (part(gate(e), [i, h])?, part(up(e), [i, h])?) else {
            return Ok(None);
        };
        gate_up.push(vec![g, u]);
    }
    let mut downs = Vec::with_capacity(experts);
    for e in 0..experts {
        let Some(d) = part(down(e), [h, i])? else {
            return Ok(None);
        };
        downs.push(vec![d]);
    }
    Ok(Some((Weight::Parts(gate_up), Weight::Parts(downs))))
}

/// Loads the shared expert of `layer`'s block, if it has one (see [`load_moe_block`]).
fn shared_expert<B: Backend>(
    mut layer: BeamMoe<B>,
    file: &TensorStore,
    prefix: &str,
    names: &MoeTensorNames,
    format: WeightFormat,
    in_place: InPlace,
    device: &B::Device,
) -> Result<BeamMoe<B>, LoadError> {
    let config = layer.config().clone();
    let h = config.hidden_size;
    if let (Some(shared), Some(shared_config)) = (layer.shared_expert.take(), &config.shared_expert)
    {
        let base = format!("{prefix}{}.", names.shared_expert);
        let gate = shared
            .gate
            .is_some()
            .then(|| format!("{prefix}{}.weight", names.shared_expert_gate));
        layer.shared_expert = Some(swiglu(
            file,
            &base,
            h,
            shared_config.intermediate_size,
            gate.as_deref(),
            format,
            in_place,
            device,
        )?);
    }
    Ok(layer)
}

/// Loads a SwiGLU MLP stored as `{base}gate_proj.weight`, `{base}up_proj.weight` (`[I, H]`) and
/// `{base}down_proj.weight` (`[H, I]`), with an optional `[1, H]` sigmoid output gate, in `f32`.
pub fn load_swiglu<B: Backend>(
    file: &TensorStore,
    base: &str,
    hidden: usize,
    intermediate: usize,
    gate: Option<&str>,
    device: &B::Device,
) -> Result<SharedExpert<B>, LoadError> {
    load_swiglu_as(
        file,
        base,
        hidden,
        intermediate,
        gate,
        WeightDtype::F32,
        device,
    )
}

/// [`load_swiglu`] with the gate/up/down weights held in `dtype` (the output gate stays `f32`).
pub fn load_swiglu_as<B: Backend>(
    file: &TensorStore,
    base: &str,
    hidden: usize,
    intermediate: usize,
    gate: Option<&str>,
    dtype: WeightDtype,
    device: &B::Device,
) -> Result<SharedExpert<B>, LoadError> {
    swiglu(
        file,
        base,
        hidden,
        intermediate,
        gate,
        dtype.into(),
        InPlace::default(),
        device,
    )
}

/// [`load_swiglu_as`] with the gate/up/down weights held in `format` (quantized when it says so).
pub fn load_swiglu_with<B: LinearBackend>(
    file: &TensorStore,
    base: &str,
    hidden: usize,
    intermediate: usize,
    gate: Option<&str>,
    format: WeightFormat,
    device: &B::Device,
) -> Result<SharedExpert<B>, LoadError> {
    swiglu(
        file,
        base,
        hidden,
        intermediate,
        gate,
        format,
        InPlace {
            quant: B::quant_in_place(),
            ..InPlace::default()
        },
        device,
    )
}

#[allow(clippy::too_many_arguments)]
fn swiglu<B: Backend>(
    file: &TensorStore,
    base: &str,
    hidden: usize,
    intermediate: usize,
    gate: Option<&str>,
    format: WeightFormat,
    in_place: InPlace,
    device: &B::Device,
) -> Result<SharedExpert<B>, LoadError> {
    let (h, i, dtype) = (hidden, intermediate, format.dtype);
    let (gate_name, up_name) = (
        format!("{base}gate_proj.weight"),
        format!("{base}up_proj.weight"),
    );
    let stacked = file.stacked_data(
        &[&|_| gate_name.clone(), &|_| up_name.clone()],
        1,
        [i, h],
        dtype,
    )?;
    // `[1, 2I, H]` → `[2I, H]` before quantizing (rows stay rows).
    let gate_up = TensorData::from_bytes(stacked.bytes, [2 * i, h], stacked.dtype);
    let down_name = format!("{base}down_proj.weight");
    Ok(SharedExpert {
        gate_up: held_as(
            gate_up,
            format,
            in_place.quant,
            device,
            (
                file.path_of(&gate_name),
                &format!("{base}{{gate,up}}_proj.weight"),
            ),
        )?,
        down: weight(file, &down_name, [h, i], format, in_place, device)?,
        gate: gate
            .map(|name| file.param(name, [1, h], device))
            .transpose()?,
    })
}
