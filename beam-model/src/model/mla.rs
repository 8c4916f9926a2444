//! Multi-head Latent Attention (DeepSeek-V2/V3): keys and values expanded per head from a
//! compressed latent that is all the KV cache keeps.
//!
//! For `x` `[B, T, H]`, with `n` = `qk_nope_head_dim`, `r` = `qk_rope_head_dim`, `c` =
//! `kv_lora_rank`, `v` = `v_head_dim`:
//! - queries: `q_proj(x)`, or `q_b_proj(q_a_layernorm(q_a_proj(x)))` with a q LoRA, split per head
//!   into `q_nope` `[n]` and `q_rot` `[r]`;
//! - `kv_a_proj_with_mqa(x)` splits into the latent `kv_a_layernorm(·)` `[c]` and one rotary key
//!   `k_rot` `[r]` shared by every head; RoPE rotates `q_rot` and `k_rot` only;
//! - the cache appends `(latent, k_rot)`: `c + r` values per token and layer;
//! - `kv_b_proj(latent)` gives each head's `k_nope` `[n]` and value `[v]`;
//! - `softmax((q_nope·k_nopeᵀ + q_rot·k_rotᵀ) · scale + mask) · V` → `o_proj`, with
//!   `scale = 1/√(n + r)` (× YaRN's `mscale²`, [`ModelConfig::attention_scale`]).

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::cache::KvCache;
use super::config::{MlaConfig, ModelConfig};
use super::norm::RmsNorm;
use super::projection::Projection;
use super::rope::{apply_rope, apply_rope_interleaved};
use beam_kernels::{KvCacheBackend, LinearBackend};

/// ε of `q_a_layernorm` and `kv_a_layernorm` (transformers builds them with the default, not
/// `rms_norm_eps`).
pub const MLA_NORM_EPS: f64 = 1e-6;

/// How queries are projected.
#[allow(clippy::large_enum_variant)] // one per layer
#[derive(Module, Debug)]
pub enum MlaQuery<B: Backend> {
    /// `q_proj` `[heads·(n + r), H]`.
    Plain(Projection<B>),
    /// `q_a_proj` `[q_lora_rank, H]` → `q_a_layernorm` → `q_b_proj` `[heads·(n + r), q_lora_rank]`.
    LoRa(MlaQueryLoRa<B>),
}

/// The q LoRA of [`MlaQuery::LoRa`].
#[derive(Module, Debug)]
pub struct MlaQueryLoRa<B: Backend> {
    /// `q_a_proj`.
    pub a: Projection<B>,
    /// `q_a_layernorm` `[q_lora_rank]`.
    pub norm: RmsNorm<B>,
    /// `q_b_proj`.
    pub b: Projection<B>,
}

/// Multi-head Latent Attention of one decoder layer.
///
/// # Shapes
/// - input `[B, T, H]` → output `[B, T, H]`
/// - cache per layer: latent `[B, 1, S, kv_lora_rank]`, rotary key `[B, 1, S, qk_rope_head_dim]`
#[derive(Module, Debug)]
pub struct MlaAttention<B: Backend> {
    /// Query projection.
    pub query: MlaQuery<B>,
    /// `kv_a_proj_with_mqa` `[kv_lora_rank + qk_rope_head_dim, H]`.
    pub kv_a_proj: Projection<B>,
    /// `kv_a_layernorm` `[kv_lora_rank]`.
    pub kv_a_norm: RmsNorm<B>,
    /// `kv_b_proj` `[heads·(qk_nope_head_dim + v_head_dim), kv_lora_rank]`.
    pub kv_b_proj: Projection<B>,
    /// `o_proj` `[H, heads·v_head_dim]`.
    pub o_proj: Projection<B>,
    #[module(skip)]
    mla: MlaConfig,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    scale: f64,
}

impl<B: Backend> MlaAttention<B> {
    /// Assembles the attention of a model whose config has [`ModelConfig::mla`].
    ///
    /// # Panics
    /// If `config.mla` is `None` (a caller bug: the loader builds this only for MLA configs).
    pub fn new(
        config: &ModelConfig,
        query: MlaQuery<B>,
        [kv_a_proj, kv_b_proj, o_proj]: [Projection<B>; 3],
        kv_a_norm: RmsNorm<B>,
    ) -> Self {
        Self {
            query,
            kv_a_proj,
            kv_a_norm,
            kv_b_proj,
            o_proj,
            mla: config.mla.clone().expect("an MLA config"),
            heads: config.num_heads,
            scale: config.attention_scale(),
        }
    }
}

impl<B: LinearBackend + KvCacheBackend> MlaAttention<B> {
    /// `[B, T, H]` → `[B, T, H]`; `rope`, `mask` and `cache` as for
    /// `Attention::forward` (rope tables of
    /// `qk_rope_head_dim`).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: (Tensor<B, 2>, Tensor<B, 2>),
        mask: Tensor<B, 4>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let [batch, tokens, _] = x.dims();
        let MlaConfig {
            kv_lora_rank: c,
            qk_nope_head_dim: n,
            qk_rope_head_dim: r,
            v_head_dim: v,
            ..
        } = self.mla;
        let heads = self.heads;
        let q = match &self.query {
            MlaQuery::Plain(q_proj) => q_proj.forward(x.clone()),
            MlaQuery::LoRa(lora) => lora.b.forward(lora.norm.forward(lora.a.forward(x.clone()))),
        };
        let q = q.reshape([batch, tokens, heads, n + r]).swap_dims(1, 2);
        let (q_nope, q_rot) = (q.clone().narrow(3, 0, n), q.narrow(3, n, r));
        let compressed = self.kv_a_proj.forward(x);
        let latent = self
            .kv_a_norm
            .forward(compressed.clone().narrow(2, 0, c))
            .reshape([batch, 1, tokens, c]);
        let k_rot = compressed.narrow(2, c, r).reshape([batch, 1, tokens, r]);
        let (cos, sin) = rope;
        let rotate = if self.mla.rope_interleave {
            apply_rope_interleaved
        } else {
            apply_rope
        };
        let q_rot = rotate(q_rot, cos.clone(), sin.clone());
        let k_rot = rotate(k_rot, cos, sin);
        let activations = latent.dtype();
        let (latent, k_rot) = match cache {
            Some((cache, layer)) => cache.append(layer, latent, k_rot),
            None => (latent, k_rot),
        };
        // A 16-bit cache: keys and values are expanded from the latent at the activations'
        // precision (`cast` returns a tensor of the same dtype as it is).
        let (latent, k_rot) = (latent.cast(activations), k_rot.cast(activations));
        let keys = latent.dims()[2];
        let kv = self
            .kv_b_proj
            .forward(latent.reshape([batch, keys, c]))
            .reshape([batch, keys, heads, n + v])
            .swap_dims(1, 2);
        let (k_nope, values) = (kv.clone().narrow(3, 0, n), kv.narrow(3, n, v));
        let k_rot = k_rot.repeat_dim(1, heads);
        let scores = (q_nope.matmul(k_nope.swap_dims(2, 3)) + q_rot.matmul(k_rot.swap_dims(2, 3)))
            * self.scale;
        let probs = softmax(scores + mask, 3);
        let out = probs
            .matmul(values)
            .swap_dims(1, 2)
            .reshape([batch, tokens, heads * v]);
        self.o_proj.forward(out)
    }
}
