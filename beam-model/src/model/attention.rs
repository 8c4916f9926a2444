//! Grouped-query self-attention with rotary embeddings and the families' variations
//! (q/k/v bias, per-head or whole-projection q/k norm, `clip_qkv`, sliding window).

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::cache::KvCache;
use super::config::{AttentionOptions, ModelConfig, QkNorm};
use super::mla::MlaAttention;
use super::norm::RmsNorm;
use super::rope::apply_rope_tokens_first;
use beam_kernels::{KvCacheBackend, LinearBackend};

pub use super::projection::Projection;

/// Self-attention of one decoder layer.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `q_proj`: `[heads·head_dim, H]`.
    pub q_proj: Projection<B>,
    /// `k_proj`: `[kv_heads·head_dim, H]`.
    pub k_proj: Projection<B>,
    /// `v_proj`: `[kv_heads·head_dim, H]`.
    pub v_proj: Projection<B>,
    /// `o_proj`: `[H, heads·head_dim]`.
    pub o_proj: Projection<B>,
    /// q norm (Qwen3: `[head_dim]`, OLMoE: `[heads·head_dim]`).
    pub q_norm: Option<RmsNorm<B>>,
    /// k norm (Qwen3: `[head_dim]`, OLMoE: `[kv_heads·head_dim]`).
    pub k_norm: Option<RmsNorm<B>>,
    #[module(skip)]
    options: AttentionOptions,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
    /// Softmax scale ([`ModelConfig::attention_scale`]: `1/√head_dim`).
    #[module(skip)]
    scale: f64,
}

impl<B: Backend> Attention<B> {
    /// Assembles an attention layer from its parts.
    pub fn new(
        config: &ModelConfig,
        [q_proj, k_proj, v_proj, o_proj]: [Projection<B>; 4],
        q_norm: Option<RmsNorm<B>>,
        k_norm: Option<RmsNorm<B>>,
    ) -> Self {
        Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_norm,
            k_norm,
            options: config.attention.clone(),
            heads: config.num_heads,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            scale: config.attention_scale(),
        }
    }
}

impl<B: LinearBackend + KvCacheBackend> Attention<B> {
    /// `[B, T, H]` → `[B, T, H]`. `rope`: cos/sin tables for the T new positions; `mask`: from
    /// [`attention_mask`] for the same positions; `cache` holds the previous positions of this
    /// layer (`layer`), if any.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: (Tensor<B, 2>, Tensor<B, 2>),
        mask: Tensor<B, 4>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let [batch, tokens, _] = x.dims();
        let (mut q, mut k, mut v) = (
            self.q_proj.forward(x.clone()),
            self.k_proj.forward(x.clone()),
            self.v_proj.forward(x),
        );
        if self.options.qk_norm == QkNorm::Whole {
            q = self.q_norm.as_ref().expect("q_norm").forward(q);
            k = self.k_norm.as_ref().expect("k_norm").forward(k);
        }
        if let Some(c) = self.options.clip_qkv {
            q = q.clamp(-c, c);
            k = k.clamp(-c, c);
            v = v.clamp(-c, c);
        }
        // `[B, T, heads, d]`: per-head norms and RoPE on the projections' contiguous output,
        // then the heads swapped in front (`[B, heads, T, d]`) for attention.
        let split = |t: Tensor<B, 3>, n: usize| t.reshape([batch, tokens, n, self.head_dim]);
        let (mut q, mut k) = (split(q, self.heads), split(k, self.kv_heads));
        if self.options.qk_norm == QkNorm::PerHead {
            q = self.q_norm.as_ref().expect("q_norm").forward(q);
            k = self.k_norm.as_ref().expect("k_norm").forward(k);
        }
        let (cos, sin) = rope;
        // Keys and values in the cache's precision while still contiguous (a cast of the
        // swapped view walks it element by element); the cache's own cast is then a no-op.
        let held = |t: Tensor<B, 4>| match &cache {
            Some((cache, _)) => cache.held(t),
            None => t,
        };
        let q = apply_rope_tokens_first(q, cos.clone(), sin.clone()).swap_dims(1, 2);
        let k = held(apply_rope_tokens_first(k, cos, sin)).swap_dims(1, 2);
        let v = held(split(v, self.kv_heads)).swap_dims(1, 2);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let out = beam_kernels::kv_attention(q, k, v, mask, self.scale);
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, tokens, self.heads * self.head_dim]);
        self.o_proj.forward(out)
    }
}

/// The self-attention of a decoder layer: grouped-query ([`Attention`]) or DeepSeek's
/// Multi-head Latent Attention ([`MlaAttention`]).
// One per decoder layer: as for `FeedForward`, a `Box` would put an indirection into burn's
// module and record types for a few KB per model.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum SelfAttention<B: Backend> {
    /// Grouped-query attention (Qwen, OLMoE, Mixtral).
    Gqa(Attention<B>),
    /// Multi-head Latent Attention (DeepSeek-V2/V3).
    Mla(MlaAttention<B>),
}

impl<B: Backend> SelfAttention<B> {
    /// The output projection's weight (every kind has one).
    pub fn o_proj(&self) -> &Projection<B> {
        match self {
            Self::Gqa(a) => &a.o_proj,
            Self::Mla(a) => &a.o_proj,
        }
    }
}

impl<B: LinearBackend + KvCacheBackend> SelfAttention<B> {
    /// `[B, T, H]` → `[B, T, H]` (see [`Attention::forward`], [`MlaAttention::forward`]).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: (Tensor<B, 2>, Tensor<B, 2>),
        mask: Tensor<B, 4>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        match self {
            Self::Gqa(a) => a.forward(x, rope, mask, cache),
            Self::Mla(a) => a.forward(x, rope, mask, cache),
        }
    }
}

/// Additive attention mask `[1, 1, T, past + T]` shared by every layer of one forward: query
/// `past + t` sees key `j` iff `j <= past + t` and, with a sliding window `w`, `j > past + t − w`.
pub fn attention_mask<B: Backend>(
    past: usize,
    tokens: usize,
    sliding_window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let keys = past + tokens;
    let values: Vec<f32> = (0..tokens)
        .flat_map(|t| {
            let query = past + t;
            (0..keys).map(move |j| {
                let visible = j <= query && sliding_window.is_none_or(|w| j + w > query);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, tokens, keys]), device)
}
