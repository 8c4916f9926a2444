//! Text generation with the KV cache: greedy or sampled (temperature, top-p, seed), stopping on EOS.

use std::time::{Duration, Instant};

use burn::tensor::{Int, Tensor, TensorData};

use super::{HiddenStates, MaskMode, ModelError, MoeLm};
use crate::checkpoint::WeightDtype;
use crate::MoeBackend;

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// 0 = greedy (default); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Nucleus sampling: sample from the fewest tokens whose probabilities sum to ≥ `top_p`.
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop after any of these ids (included in the output).
    pub eos_token_ids: Vec<u32>,
    /// Learned BEAM masks or plain top-K.
    pub mask: MaskMode,
    /// Precision of the KV cache; `None` (default): the model's
    /// ([`MoeLm::default_kv_dtype`]).
    pub kv_dtype: Option<WeightDtype>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
            mask: MaskMode::Learned,
            kv_dtype: None,
        }
    }
}

/// What a generation produced and what it cost.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids only.
    pub ids: Vec<u32>,
    /// Time of the prompt's forward.
    pub prefill_time: Duration,
    /// Time of the token-by-token decode.
    pub decode_time: Duration,
    /// (token, expert) pairs run, over all MoE layers and processed tokens.
    pub kept_pairs: usize,
    /// (token, MoE layer) pairs processed: `kept_pairs / routed_tokens` is the mean experts per
    /// token per MoE layer.
    pub routed_tokens: usize,
    /// The part of [`kept_pairs`](Self::kept_pairs) from the decode steps (one token each).
    pub decode_kept_pairs: usize,
    /// The part of [`routed_tokens`](Self::routed_tokens) from the decode steps.
    pub decode_routed_tokens: usize,
    /// Generation stopped because the next step would have gone past the model's context
    /// (`max_position_embeddings`), before `max_new_tokens` or an end-of-sequence id.
    pub context_limit_reached: bool,
}

impl Generation {
    /// Mean experts run per token and MoE layer.
    pub fn mean_active_experts(&self) -> f64 {
        self.kept_pairs as f64 / self.routed_tokens.max(1) as f64
    }

    /// Mean experts per token per MoE layer over the decode steps only.
    pub fn decode_active_experts(&self) -> f64 {
        self.decode_kept_pairs as f64 / self.decode_routed_tokens.max(1) as f64
    }

    /// Decoded tokens per second (after the first generated token).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let steps = self.ids.len().saturating_sub(1);
        steps as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Token ids as the `[1, T]` input of one sequence.
pub fn ids_tensor<B: burn::tensor::backend::Backend>(
    ids: &[u32],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let values: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(values, [1, ids.len()]), device)
}

/// Generates up to `config.max_new_tokens` tokens after `prompt`, stopping early at an
/// end-of-sequence id or where the next step would pass the model's context
/// (`max_position_embeddings`; see [`Generation::context_limit_reached`]). A prompt longer than the
/// context gives no tokens.
///
/// # Panics
/// If `prompt` is empty, or the backend cannot hold `config.kv_dtype` ([`try_generate`] returns
/// that as an error).
pub fn generate<B: MoeBackend>(
    model: &MoeLm<B>,
    prompt: &[u32],
    config: &GenerateConfig,
) -> Generation {
    try_generate(model, prompt, config).unwrap_or_else(|e| panic!("{e}"))
}

/// [`generate`], or [`ModelError::UnsupportedKvDtype`] when the backend cannot hold
/// `config.kv_dtype`.
///
/// # Panics
/// If `prompt` is empty.
pub fn try_generate<B: MoeBackend>(
    model: &MoeLm<B>,
    prompt: &[u32],
    config: &GenerateConfig,
) -> Result<Generation, ModelError> {
    assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
    let device = model.embed.weight.device();
    let mut cache = model.new_cache_with(config.kv_dtype.unwrap_or(model.default_kv_dtype()))?;
    let mut sampler = Sampler::new(config);
    let moe_layers = model.config().num_moe_layers();
    let ids = |tokens: &[u32]| ids_tensor::<B>(tokens, &device);
    let mut generation = Generation {
        ids: Vec::new(),
        prefill_time: Duration::ZERO,
        decode_time: Duration::ZERO,
        kept_pairs: 0,
        routed_tokens: 0,
        decode_kept_pairs: 0,
        decode_routed_tokens: 0,
        context_limit_reached: false,
    };
    let context = model.config().max_position_embeddings.unwrap_or(usize::MAX);
    let mut input = prompt.to_vec();
    while generation.ids.len() < config.max_new_tokens {
        if cache.len() + input.len() > context {
            generation.context_limit_reached = true;
            break;
        }
        let start = Instant::now();
        let out = model.forward_last(
            ids(&input),
            Some(&mut cache),
            config.mask,
            HiddenStates::Skip,
        );
        let ([_, _, v], t) = (out.logits.dims(), input.len());
        let last = out.logits.clone().reshape([v]);
        let logits = last
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("float logits");
        let next = sampler.next(&logits);
        let kept = out.kept_pairs();
        generation.kept_pairs += kept;
        generation.routed_tokens += t * moe_layers;
        if generation.ids.is_empty() {
            generation.prefill_time += start.elapsed();
        } else {
            generation.decode_time += start.elapsed();
            generation.decode_kept_pairs += kept;
            generation.decode_routed_tokens += t * moe_layers;
        }
        generation.ids.push(next);
        if config.eos_token_ids.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(generation)
}

/// Greedy or temperature / top-p sampling with a seeded generator (splitmix64).
struct Sampler {
    temperature: f64,
    top_p: f64,
    state: u64,
}

impl Sampler {
    fn new(config: &GenerateConfig) -> Self {
        Self {
            temperature: config.temperature,
            top_p: config.top_p,
            state: config.seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn next(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            // First maximum, as torch.argmax.
            let mut best = 0;
            for (i, &l) in logits.iter().enumerate() {
                if l > logits[best] {
                    best = i;
                }
            }
            best as u32
        };
        if self.temperature <= 0.0 {
            return argmax();
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((l as f64 - max) / self.temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1;
            if mass >= self.top_p {
                break;
            }
        }
        let probs = &probs[..kept];
        let mut r = self.uniform() * mass;
        for &(i, p) in probs {
            if r < p {
                return i as u32;
            }
            r -= p;
        }
        probs[kept - 1].0 as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGITS: [f32; 5] = [2.0, 1.0, 0.5, -1.0, 0.0];
    const DRAWS: usize = 40_000;

    fn sampler(temperature: f64, top_p: f64, seed: u64) -> Sampler {
        Sampler::new(&GenerateConfig {
            temperature,
            top_p,
            seed,
            ..GenerateConfig::default()
        })
    }

    /// Relative frequency of each token over [`DRAWS`] draws.
    fn frequencies(sampler: &mut Sampler) -> Vec<f64> {
        let mut counts = vec![0usize; LOGITS.len()];
        for _ in 0..DRAWS {
            counts[sampler.next(&LOGITS) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / DRAWS as f64).collect()
    }

    /// softmax(logits / T) in f64, restricted to `keep` tokens and renormalised.
    fn expected(temperature: f64, keep: &[usize]) -> Vec<f64> {
        let weights: Vec<f64> = (0..LOGITS.len())
            .map(|i| {
                if keep.contains(&i) {
                    (LOGITS[i] as f64 / temperature).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let total: f64 = weights.iter().sum();
        weights.iter().map(|w| w / total).collect()
    }

    /// Each frequency within 4.5 binomial standard deviations of its probability (a false
    /// alarm about once in 10⁵ per token).
    fn assert_distribution(got: &[f64], want: &[f64], what: &str) {
        for (i, (&g, &p)) in got.iter().zip(want).enumerate() {
            let sd = (p * (1.0 - p) / DRAWS as f64).sqrt();
            assert!(
                (g - p).abs() <= 4.5 * sd + 1e-12,
                "{what}: token {i} drawn {g:.4}, probability {p:.4}"
            );
        }
    }

    #[test]
    fn temperature_sampling_follows_the_tempered_softmax() {
        let all = [0, 1, 2, 3, 4];
        for temperature in [0.5, 1.0, 2.0] {
            let got = frequencies(&mut sampler(temperature, 1.0, 3));
            assert_distribution(
                &got,
                &expected(temperature, &all),
                &format!("T {temperature}"),
            );
        }
        // Temperature changes the distribution: colder concentrates on the argmax.
        let cold = frequencies(&mut sampler(0.5, 1.0, 3));
        let hot = frequencies(&mut sampler(2.0, 1.0, 3));
        assert!(cold[0] > 0.7 && hot[0] < 0.5, "cold {cold:?}, hot {hot:?}");
        // Temperature 0 is greedy: always the first maximum.
        let mut greedy = sampler(0.0, 1.0, 3);
        assert!((0..100).all(|_| greedy.next(&[1.0, 3.0, 3.0, 0.0]) == 1));
    }

    #[test]
    fn top_p_samples_from_the_smallest_nucleus() {
        // At T = 1 the probabilities are 0.56, 0.21, 0.13, 0.08, 0.03 (tokens 0, 1, 2, 4, 3):
        // top-p 0.7 keeps {0, 1} (0.77 ≥ 0.7), renormalised; 0.5 keeps token 0 alone.
        let got = frequencies(&mut sampler(1.0, 0.7, 5));
        assert_distribution(&got, &expected(1.0, &[0, 1]), "top-p 0.7");
        let got = frequencies(&mut sampler(1.0, 0.5, 5));
        assert_eq!(got[0], 1.0);
    }

    #[test]
    fn the_seed_reproduces_and_other_seeds_differ() {
        let draws = |seed| {
            let mut s = sampler(1.0, 1.0, seed);
            (0..64).map(|_| s.next(&LOGITS)).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }
}
