//! Mixture-of-Experts language models (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V2/V3)
//! built on the BEAM layer, loadable from Hugging Face checkpoint folders.
//!
//! Shared parts ([`attention`], [`mla`], [`projection`], [`norm`], [`rope`], [`cache`], the
//! decoder here) serve every family; what differs per family lives in [`family`].

pub mod adapter;
pub mod attention;
pub mod cache;
pub mod config;
pub mod family;
pub mod generate;
pub mod load;
pub mod mla;
pub mod norm;
pub mod projection;
pub mod rope;

use std::path::PathBuf;

use burn::module::Module;
use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

use crate::checkpoint::LoadError;
use crate::experts::SharedExpert;
use crate::layer::{BeamMoe, MaskSource, RoutingFacts};
use crate::peers::MaskRule;
use crate::weight::Weight;
use crate::{linear_out_in, MoeBackend};
use attention::{attention_mask, SelfAttention};
use cache::KvCache;
use config::ModelConfig;
use norm::RmsNorm;
use rope::rope_tables;

/// Why a model could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `config.json` is malformed or inconsistent.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `model_type` names a family this crate does not support.
    #[error("{}: unsupported model_type `{model_type}` (supported: qwen2_moe, qwen3_moe, olmoe, mixtral, deepseek_v2, deepseek_v3)", path.display())]
    UnknownModelType {
        /// The config file.
        path: PathBuf,
        /// The model type found.
        model_type: String,
    },
    /// A tensor file problem.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The requested weight precision cannot be held by the backend (burn's ndarray holds
    /// `f32`/`f64` only).
    #[error("{}: the {backend} backend cannot hold {dtype} weights (use --backend flex, or --dtype f32)", path.display())]
    UnsupportedDtype {
        /// The model folder.
        path: PathBuf,
        /// The requested precision.
        dtype: crate::checkpoint::WeightDtype,
        /// The backend's name.
        backend: String,
    },
    /// The requested key/value cache precision cannot be held by the backend.
    #[error("the {backend} backend cannot hold a {dtype} KV cache (use --backend flex, or --kv-cache f32)")]
    UnsupportedKvDtype {
        /// The requested precision.
        dtype: crate::checkpoint::WeightDtype,
        /// The backend's name.
        backend: String,
    },
    /// A BEAM adapter does not fit the model.
    #[error("{}: {reason}", path.display())]
    Adapter {
        /// The adapter file.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
}

/// The feed-forward part of a decoder layer: a BEAM MoE block or a dense SwiGLU MLP.
// One per decoder layer, in a `Vec`: the size difference costs a few KB per model, while a
// `Box` would put an indirection into burn's module and record types.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    /// MoE block (MoE layers).
    Moe(BeamMoe<B>),
    /// Dense SwiGLU MLP (dense layers), stored like one expert.
    Dense(SharedExpert<B>),
}

impl<B: Backend> FeedForward<B> {
    /// The MoE block, if this is an MoE layer.
    pub fn moe(&self) -> Option<&BeamMoe<B>> {
        match self {
            Self::Moe(moe) => Some(moe),
            Self::Dense(_) => None,
        }
    }

    /// The MoE block, mutably, if this is an MoE layer.
    pub fn moe_mut(&mut self) -> Option<&mut BeamMoe<B>> {
        match self {
            Self::Moe(moe) => Some(moe),
            Self::Dense(_) => None,
        }
    }

    /// Applies `f` to the MoE block (dense layers are returned unchanged).
    pub fn try_map_moe<E>(
        self,
        f: impl FnOnce(BeamMoe<B>) -> Result<BeamMoe<B>, E>,
    ) -> Result<Self, E> {
        Ok(match self {
            Self::Moe(moe) => Self::Moe(f(moe)?),
            dense => dense,
        })
    }
}

/// One pre-norm decoder layer: `h += attn(norm(h)); h += ffn(norm(h))`.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// `input_layernorm`.
    pub input_norm: RmsNorm<B>,
    /// `self_attn`.
    pub attention: SelfAttention<B>,
    /// `post_attention_layernorm`.
    pub post_attention_norm: RmsNorm<B>,
    /// `mlp` / `block_sparse_moe`.
    pub feed_forward: FeedForward<B>,
}

/// Which mask the MoE layers use.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum MaskMode {
    /// The BEAM adapter's learned masks where loaded, plain top-K elsewhere.
    #[default]
    Learned,
    /// Plain top-K everywhere (the base model).
    TopK,
    /// A training-free peer rule on every MoE layer (any adapter is ignored).
    Rule(MaskRule),
}

/// Whether [`MoeLm::forward`] also returns the hidden states of every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiddenStates {
    /// Logits and routing facts only.
    #[default]
    Skip,
    /// Also the hidden states ([`LmOutput::hidden_states`]).
    Collect,
}

/// What [`MoeLm::forward`] returns.
#[derive(Debug, Clone)]
pub struct LmOutput<B: Backend> {
    /// Logits `[B, T, V]`.
    pub logits: Tensor<B, 3>,
    /// With [`HiddenStates::Collect`]: the embeddings, then each layer's output, the last after the final
    /// norm (transformers' `output_hidden_states` convention), `L + 1` tensors `[B, T, H]`.
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// Routing facts of every MoE layer, in layer order.
    pub routing: Vec<RoutingFacts<B>>,
}

impl<B: Backend> LmOutput<B> {
    /// Kept (token, expert) pairs summed over MoE layers (reads back to the host).
    pub fn kept_pairs(&self) -> usize {
        // Summed on the device: one read-back for all layers, not one per layer.
        let per_layer: Vec<Tensor<B, 1>> =
            self.routing.iter().map(|f| f.mask.clone().sum()).collect();
        if per_layer.is_empty() {
            return 0;
        }
        burn::tensor::ElementConversion::elem::<f64>(Tensor::cat(per_layer, 0).sum().into_scalar())
            .round() as usize
    }
}

/// A decoder-only MoE language model.
///
/// # Shapes
/// - input ids `[B, T]` → logits `[B, T, V]`
#[derive(Module, Debug)]
pub struct MoeLm<B: Backend> {
    /// `model.embed_tokens`: `[V, H]`.
    pub embed: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// `model.norm`.
    pub norm: RmsNorm<B>,
    /// `lm_head.weight` `[V, H]`; `None` when tied to the embeddings.
    pub lm_head: Option<Weight<B, 2>>,
    #[module(skip)]
    config: ModelConfig,
}

impl<B: Backend> MoeLm<B> {
    pub(crate) fn from_parts(
        config: ModelConfig,
        embed: Embedding<B>,
        layers: Vec<DecoderLayer<B>>,
        norm: RmsNorm<B>,
        lm_head: Option<Weight<B, 2>>,
    ) -> Self {
        Self {
            embed,
            layers,
            norm,
            lm_head,
            config,
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// K of the base routers (the largest over MoE layers; 0 without MoE layers).
    pub fn top_k(&self) -> usize {
        self.moe_layers()
            .map(|moe| moe.config().top_k)
            .max()
            .unwrap_or(0)
    }

    /// Whether any MoE layer has a BEAM mask router.
    pub fn has_beam(&self) -> bool {
        self.moe_layers().any(|moe| moe.mask_router.is_some())
    }

    /// The MoE blocks, in layer order.
    pub fn moe_layers(&self) -> impl Iterator<Item = &BeamMoe<B>> {
        self.layers.iter().filter_map(|l| l.feed_forward.moe())
    }

    /// The precision the large weights are held in: that of the token embeddings (the loader
    /// holds embeddings, projections, experts and LM head in one precision). `f64` weights
    /// (burn's `NdArray<f64>`) count as `F32`.
    pub fn weight_dtype(&self) -> crate::checkpoint::WeightDtype {
        use crate::checkpoint::WeightDtype;
        match self.embed.weight.val().dtype() {
            DType::BF16 => WeightDtype::BF16,
            DType::F16 => WeightDtype::F16,
            _ => WeightDtype::F32,
        }
    }
}

impl<B: beam_kernels::KvCacheBackend> MoeLm<B> {
    /// An empty KV cache for this model, in its default precision
    /// ([`Self::default_kv_dtype`]).
    pub fn new_cache(&self) -> KvCache<B> {
        self.new_cache_with(self.default_kv_dtype())
            .expect("the default KV cache precision is one the backend holds")
    }

    /// An empty KV cache holding keys and values in `dtype` (`F32`: as computed, the backend's
    /// default float), or [`ModelError::UnsupportedKvDtype`] where the backend cannot hold it.
    pub fn new_cache_with(
        &self,
        dtype: crate::checkpoint::WeightDtype,
    ) -> Result<KvCache<B>, ModelError> {
        use crate::checkpoint::WeightDtype;
        let layers = self.layers.len();
        if dtype == WeightDtype::F32 {
            return Ok(KvCache::new(layers));
        }
        let device = self.embed.weight.device();
        if !B::supports_dtype(&device, dtype.dtype()) {
            return Err(ModelError::UnsupportedKvDtype {
                dtype,
                backend: B::name(&device),
            });
        }
        Ok(KvCache::with_dtype(layers, dtype.dtype()))
    }

    /// The KV cache precision [`Self::new_cache`] uses. On a backend whose attention reads a
    /// 16-bit cache in place ([`KvCacheBackend::reads_16_bit_kv_in_place`]: Flex): `f16` when
    /// the linear weights are quantized in place (llama.cpp's default cache type), else the
    /// weights' precision when they are 16-bit (as transformers caches a `bf16` model in
    /// `bf16`). Otherwise, and for `f32` weights, `F32` (as computed: what `f32` models have
    /// always cached, so their generations stay those of an `f32` reference).
    ///
    /// [`KvCacheBackend::reads_16_bit_kv_in_place`]: beam_kernels::KvCacheBackend::reads_16_bit_kv_in_place
    pub fn default_kv_dtype(&self) -> crate::checkpoint::WeightDtype {
        use crate::checkpoint::WeightDtype;
        if !B::reads_16_bit_kv_in_place() {
            return WeightDtype::F32;
        }
        let device = self.embed.weight.device();
        if self.quantization().is_some() && B::supports_dtype(&device, WeightDtype::F16.dtype()) {
            // Whatever the embeddings are kept in.
            return WeightDtype::F16;
        }
        self.weight_dtype()
    }
}

impl<B: Backend> MoeLm<B> {
    /// The quantization the linear weights are held in (`Some(Q8)` or `Some(Q4)` after such a
    /// load on a backend that runs quantized weights in place; a load dequantized at load on
    /// another backend holds floats and gives `None`).
    pub fn quantization(&self) -> Option<crate::checkpoint::Quantization> {
        let weight = &self.layers.first()?.attention.o_proj().weight;
        weight
            .quant_format()
            .map(crate::checkpoint::Quantization::from_format)
    }
}

impl<B: MoeBackend> MoeLm<B> {
    /// Runs `ids` (`[B, T]`) after the tokens already in `cache` (if any), appending to it, with
    /// the MoE layers' masks from `mask`.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
        mask: MaskMode,
        hidden_states: HiddenStates,
    ) -> LmOutput<B> {
        self.run(ids, cache, mask, hidden_states, false)
    }

    /// [`Self::forward`] with the logits of the last position only (`[B, 1, V]`): what generation
    /// needs after a prompt. The LM head (`V × H` weights, the largest single matrix) runs on one
    /// row per sequence instead of `T`; hidden states and routing facts are those of `forward`.
    pub fn forward_last(
        &self,
        ids: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
        mask: MaskMode,
        hidden_states: HiddenStates,
    ) -> LmOutput<B> {
        self.run(ids, cache, mask, hidden_states, true)
    }

    fn run(
        &self,
        ids: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
        mask: MaskMode,
        hidden_states: HiddenStates,
        last_only: bool,
    ) -> LmOutput<B> {
        let hidden_states = hidden_states == HiddenStates::Collect;
        let [_, tokens] = ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());
        // 16-bit embeddings (weights kept in the checkpoint's precision) give f32 activations.
        let mut h = self.embed.forward(ids);
        if self.weight_dtype() != crate::checkpoint::WeightDtype::F32 {
            h = h.cast(DType::F32);
        }
        let device = h.device();
        let rope = rope_tables::<B>(
            self.config.rope_theta,
            &self.config.rope_scaling,
            self.config.rope_dim(),
            past,
            tokens,
            &device,
        );
        // Positions are the same for every layer: build the tables and the mask once.
        let causal_mask =
            attention_mask::<B>(past, tokens, self.config.attention.sliding_window, &device);
        let mut states = Vec::new();
        let mut routing = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            if hidden_states {
                states.push(h.clone());
            }
            let attn = layer.attention.forward(
                layer.input_norm.forward(h.clone()),
                rope.clone(),
                causal_mask.clone(),
                cache.as_deref_mut().map(|c| (c, index)),
            );
            h = h + attn;
            let x = layer.post_attention_norm.forward(h.clone());
            let ff = match &layer.feed_forward {
                FeedForward::Moe(moe) => {
                    let source = match mask {
                        MaskMode::Learned => MaskSource::Learned,
                        MaskMode::TopK => MaskSource::TopK,
                        MaskMode::Rule(rule) => MaskSource::Rule(rule),
                    };
                    let out = moe.forward_with(x, source);
                    routing.push(out.facts);
                    out.output
                }
                FeedForward::Dense(dense) => {
                    let [b, t, hidden] = x.dims();
                    dense
                        .forward(x.reshape([b * t, hidden]))
                        .reshape([b, t, hidden])
                }
            };
            h = h + ff;
        }
        if let Some(cache) = cache {
            cache.advance(tokens);
        }
        let h = self.norm.forward(h);
        if hidden_states {
            states.push(h.clone());
        }
        let [b, t, hidden] = h.dims();
        let (h, t) = if last_only && t > 1 {
            (h.narrow(1, t - 1, 1), 1)
        } else {
            (h, t)
        };
        let h = h.reshape([b * t, hidden]);
        let logits = match &self.lm_head {
            Some(head) => head.linear(h),
            None => linear_out_in(h, self.embed.weight.val()),
        }
        .reshape([b, t, self.config.vocab_size]);
        LmOutput {
            logits,
            hidden_states: states,
            routing,
        }
    }
}
