//! Key/value cache for incremental decoding.

use beam_kernels::{kv_append, KvCacheBackend};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// Keys and values of every attention layer for the tokens seen so far.
///
/// # Shapes
/// - per layer, grouped-query attention: keys and values `[B, kv_heads, S, head_dim]`
/// - per layer, MLA (DeepSeek): the compressed latent `[B, 1, S, kv_lora_rank]` and the shared
///   rotary key `[B, 1, S, qk_rope_head_dim]` (keys and values are expanded from them each step)
///
/// # Precision
/// The cache holds what the attention computed (the activations' precision, `f32`) unless it was
/// made [`with_dtype`](Self::with_dtype): a 16-bit cache (`f16` or `bf16`) halves its memory and
/// the bytes each decode step's attention reads, at the cost of rounding the cached keys and
/// values (scores, softmax and sums stay `f32`). [`MoeLm::new_cache`](super::MoeLm::new_cache)
/// picks the model's default.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
    dtype: Option<DType>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `num_layers` layers, holding keys and values as computed.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            dtype: None,
        }
    }

    /// An empty cache for `num_layers` layers, holding keys and values in `dtype` (cast to it as
    /// they are appended). The backend must hold `dtype`
    /// ([`MoeLm::new_cache_with`](super::MoeLm::new_cache_with) checks it).
    pub fn with_dtype(num_layers: usize, dtype: DType) -> Self {
        Self {
            dtype: Some(dtype),
            ..Self::new(num_layers)
        }
    }

    /// The precision keys and values are held in: `None` as computed.
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// Tokens cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `t` in the precision the cache holds keys and values in (as it is when the cache keeps
    /// them as computed, or `t` has that dtype already: `cast` returns such a tensor as is).
    /// Attention casts its keys and values with it while they are contiguous, which makes
    /// [`Self::append`]'s own cast a no-op.
    pub(crate) fn held(&self, t: Tensor<B, 4>) -> Tensor<B, 4> {
        match self.dtype {
            Some(dtype) => t.cast(dtype),
            None => t,
        }
    }

    /// Appends `k`, `v` (`[B, kv_heads, T, head_dim]`, or MLA's latent and rotary key) to layer
    /// `layer` along the sequence dimension and returns all of that layer's entries (in the
    /// cache's precision), through [`KvCacheBackend::kv_append`] (in place on Flex: what is
    /// cached is not copied again each step).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>)
    where
        B: KvCacheBackend,
    {
        let (k, v) = (self.held(k), self.held(v));
        let merged = match self.layers[layer].take() {
            Some((pk, pv)) => (kv_append(pk, k), kv_append(pv, v)),
            None => (k, v),
        };
        self.layers[layer] = Some(merged.clone());
        merged
    }

    /// Marks `tokens` more tokens as cached (after every layer appended them).
    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}
