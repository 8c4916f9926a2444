//! The BEAM Mixture-of-Experts layer, assembled from the method's steps:
//! router → mask → experts → combine.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor};

use crate::combine::combine;
use crate::config::{check_threshold, BeamMaskConfig, BeamMoeConfig, ConfigError};
use crate::experts::{Experts, SharedExpert};
use crate::flops::{moe_layer_flops, FlopsReport};
use crate::init::Init;
use crate::loss::{active_fraction, load_balance_loss, sparsity_penalty};
use crate::mask::{drop_masked_slots, masked_weights, MaskRouter};
use crate::peers::MaskRule;
use crate::router::Router;
use crate::MoeBackend;

/// A Mixture-of-Experts layer with BEAM binary expert activation masking.
///
/// The unchanged base [`Router`] picks K experts per token; the [`MaskRouter`] switches some of
/// them off (`m_k = 1[sigmoid(z_k) > τ]`); only kept (token, expert) pairs are dispatched to the
/// [`Experts`]; their outputs are weighted by `m_k · w_k` and summed, plus the shared expert.
///
/// Outside autodiff (inference) masked slots are dropped before dispatch and cost nothing. Under
/// an autodiff backend the experts of masked slots are still evaluated with weight exactly 0, so
/// the straight-through gradient `∂L/∂m_k` (which needs `Expert_{i_k}(x)`) reaches the mask
/// router; the output value is the same.
///
/// # Shapes
/// - input: `[batch, seq, H]`
/// - output: `[batch, seq, H]` plus [`RoutingFacts`]
///
/// # Example
/// ```
/// use beam_model::{BeamMoeConfig, backend::NdArray};
/// use burn::tensor::{Distribution, Tensor};
///
/// let device = Default::default();
/// let layer = BeamMoeConfig::new(32, 16, 8, 2).init::<NdArray>(&device);
/// let x = Tensor::<NdArray, 3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), &device);
/// let out = layer.forward(x);
/// assert_eq!(out.output.dims(), [2, 5, 32]);
/// assert_eq!(out.facts.kept_pairs(), 2 * 5 * 2); // masks start at 1: top-K exactly
/// ```
#[derive(Module, Debug)]
pub struct BeamMoe<B: Backend> {
    /// Base top-K router.
    pub router: Router<B>,
    /// BEAM mask router: present exactly when the layer's config has BEAM settings
    /// ([`BeamMoeConfig::beam`]), which [`enable_beam`](Self::enable_beam) and
    /// [`disable_beam`](Self::disable_beam) keep in step.
    pub mask_router: Option<MaskRouter<B>>,
    /// The routed experts.
    pub experts: Experts<B>,
    /// The shared expert, if any.
    pub shared_expert: Option<SharedExpert<B>>,
    #[module(skip)]
    config: BeamMoeConfig,
}

/// Where a forward takes its mask from.
#[derive(Debug, Clone)]
pub enum MaskSource<B: Backend> {
    /// The layer's learned mask router (plain top-K if it has none).
    Learned,
    /// No mask: the base top-K layer.
    TopK,
    /// A given 0/1 mask `[batch, seq, K]` aligned with the router's slots (e.g. a training-free
    /// rule). No gradient flows through it.
    External(Tensor<B, 3>),
    /// A training-free peer rule computed from the router's outputs (no gradient).
    Rule(MaskRule),
}

/// Output of [`BeamMoe::forward`].
#[derive(Debug, Clone)]
pub struct BeamMoeOutput<B: Backend> {
    /// Layer output `[batch, seq, H]`.
    pub output: Tensor<B, 3>,
    /// What the routing did.
    pub facts: RoutingFacts<B>,
}

/// Routing facts of one forward. Slot tensors are `[batch, seq, K]`.
#[derive(Debug, Clone)]
pub struct RoutingFacts<B: Backend> {
    /// Experts chosen by the base router.
    pub expert_ids: Tensor<B, 3, Int>,
    /// Their routing weights before the mask.
    pub topk_weights: Tensor<B, 3>,
    /// The binary mask (1.0 kept, 0.0 masked).
    pub mask: Tensor<B, 3>,
    /// Mask probabilities `sigmoid(z)` (learned masks only).
    pub mask_probs: Option<Tensor<B, 3>>,
    /// Routing weights actually applied: masked (and renormalised if configured).
    pub weights: Tensor<B, 3>,
    /// Router logits `[batch, seq, E]`.
    pub router_logits: Tensor<B, 3>,
    /// The mean active fraction `[1]` the sparsity term penalises (mask probability or
    /// straight-through mask, per [`SparsityLossConfig::penalty`](crate::SparsityLossConfig);
    /// the mean of the binary mask, without gradient, for non-learned masks).
    pub active_fraction: Tensor<B, 1>,
    /// The auxiliary sparsity term `[1]`: [`active_fraction`](Self::active_fraction) itself, or
    /// its squared distance to the layer's target active fraction.
    pub sparsity_loss: Tensor<B, 1>,
}

impl<B: Backend> RoutingFacts<B> {
    /// The base router's load-balance term `[1]` (transformers' formula), computed on demand from
    /// [`router_logits`](Self::router_logits) and [`expert_ids`](Self::expert_ids), so inference
    /// does not pay for it; differentiable with respect to the router under autodiff.
    pub fn load_balance_loss(&self) -> Tensor<B, 1> {
        let [batch, seq, experts] = self.router_logits.dims();
        let [_, _, top_k] = self.expert_ids.dims();
        load_balance_loss(
            self.router_logits.clone().reshape([batch * seq, experts]),
            self.expert_ids.clone().reshape([batch * seq, top_k]),
        )
    }

    /// Number of kept (token, expert) pairs. Reads the mask back to the host.
    pub fn kept_pairs(&self) -> usize {
        self.mask.clone().sum().into_scalar().elem::<f64>().round() as usize
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        let [b, s, _] = self.mask.dims();
        b * s
    }

    /// Mean experts run per token.
    pub fn mean_active_experts(&self) -> f64 {
        self.kept_pairs() as f64 / self.tokens() as f64
    }

    /// The kept `(flat token index, expert)` pairs, token-major. Reads back to the host.
    pub fn kept_pair_list(&self) -> Vec<(usize, usize)> {
        let [_, _, k] = self.mask.dims();
        let mask = self
            .mask
            .to_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap();
        let ids = self
            .expert_ids
            .to_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap();
        mask.iter()
            .zip(ids)
            .enumerate()
            .filter(|(_, (m, _))| **m > 0.5)
            .map(|(slot, (_, id))| (slot / k, id as usize))
            .collect()
    }

    /// Top-K vs BEAM FLOPs of this forward for a layer configured by `config`.
    pub fn flops(&self, config: &BeamMoeConfig) -> FlopsReport {
        moe_layer_flops(config, self.tokens(), self.kept_pairs())
    }
}

impl BeamMoeConfig {
    /// Validates the config and builds the layer.
    pub fn try_init<B: Backend>(&self, device: &B::Device) -> Result<BeamMoe<B>, ConfigError> {
        self.validate()?;
        Ok(self.build(Init::Normal(self.init_std), device))
    }

    /// A layer whose router, experts and shared expert are uninitialised placeholders, for a
    /// loader that overwrites them at once (no random draws for billions of expert weights).
    pub(crate) fn init_placeholder<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<BeamMoe<B>, ConfigError> {
        self.validate()?;
        Ok(self.build(Init::Placeholder, device))
    }

    fn build<B: Backend>(&self, init: Init, device: &B::Device) -> BeamMoe<B> {
        BeamMoe {
            router: Router::build(self, init, device),
            mask_router: self
                .beam
                .as_ref()
                .map(|beam| self.mask_router(beam, device)),
            experts: Experts::build(self, init, device),
            shared_expert: self
                .shared_expert
                .as_ref()
                .map(|s| SharedExpert::build(s, self.hidden_size, init, device)),
            config: self.clone(),
        }
    }

    fn mask_router<B: Backend>(&self, beam: &BeamMaskConfig, device: &B::Device) -> MaskRouter<B> {
        MaskRouter::new(beam, self.hidden_size, self.num_experts, self.top_k, device)
    }

    /// Builds the layer.
    ///
    /// # Panics
    /// If the config is invalid; use [`try_init`](Self::try_init) to get the [`ConfigError`].
    pub fn init<B: Backend>(&self, device: &B::Device) -> BeamMoe<B> {
        self.try_init(device)
            .unwrap_or_else(|err| panic!("invalid BeamMoeConfig: {err}"))
    }
}

impl<B: Backend> BeamMoe<B> {
    /// The configuration the layer was built from.
    pub fn config(&self) -> &BeamMoeConfig {
        &self.config
    }

    /// Stops gradients to the base model (router, experts, shared expert), so only the mask router
    /// trains: BEAM's default, cheap and safe setting.
    pub fn freeze_base(mut self) -> Self {
        self.router = self.router.no_grad();
        self.experts = self.experts.no_grad();
        self.shared_expert = self.shared_expert.map(Module::no_grad);
        self
    }

    /// Adds a fresh BEAM mask router (all masks 1: the layer still computes top-K exactly) with
    /// the given settings, replacing any existing one. Use it to put BEAM on a base checkpoint.
    ///
    /// # Errors
    /// If `beam` is invalid for this layer (e.g. threshold outside `(0, 1)`).
    pub fn enable_beam(
        mut self,
        beam: BeamMaskConfig,
        device: &B::Device,
    ) -> Result<Self, ConfigError> {
        beam.validate()?;
        self.mask_router = Some(self.config.mask_router(&beam, device));
        self.config.beam = Some(beam);
        Ok(self)
    }

    /// Removes the mask router: the plain top-K layer.
    pub fn disable_beam(mut self) -> Self {
        self.mask_router = None;
        self.config.beam = None;
        self
    }

    /// Same layer with another mask threshold τ (trades quality for speed at inference; the
    /// router's parameters are unchanged).
    ///
    /// # Errors
    /// [`ConfigError::Threshold`] if `threshold` is not in `(0, 1)`,
    /// [`ConfigError::NoMaskRouter`] if the layer has no mask router.
    pub fn with_threshold(mut self, threshold: f64) -> Result<Self, ConfigError> {
        check_threshold(threshold)?;
        match (&self.mask_router, self.config.beam.as_mut()) {
            (Some(_), Some(beam)) => beam.threshold = threshold,
            _ => return Err(ConfigError::NoMaskRouter("a mask threshold")),
        }
        Ok(self)
    }
}

impl<B: Backend> BeamMoe<B> {
    /// Sets the sparsity term's settings of the layer's mask (a training setting: adapters do
    /// not store it, so a mask loaded from one trains on with these).
    ///
    /// # Errors
    /// [`ConfigError::NoMaskRouter`] if the layer has no mask router; the settings' own range
    /// errors.
    pub fn set_sparsity(
        &mut self,
        sparsity: crate::config::SparsityLossConfig,
    ) -> Result<(), ConfigError> {
        match (&self.mask_router, self.config.beam.as_mut()) {
            (Some(_), Some(beam)) => {
                let updated = beam.clone().with_sparsity(sparsity);
                updated.validate()?;
                *beam = updated;
                Ok(())
            }
            _ => Err(ConfigError::NoMaskRouter("sparsity settings")),
        }
    }
}

impl<B: MoeBackend> BeamMoe<B> {
    /// Runs the layer with its learned mask (or plain top-K if BEAM is disabled).
    pub fn forward(&self, x: Tensor<B, 3>) -> BeamMoeOutput<B> {
        self.forward_with(x, MaskSource::Learned)
    }

    /// Runs the layer with the mask from `source`.
    ///
    /// # Panics
    /// If an external mask is not `[batch, seq, K]`.
    pub fn forward_with(&self, x: Tensor<B, 3>, source: MaskSource<B>) -> BeamMoeOutput<B> {
        let [batch, seq, hidden] = x.dims();
        let tokens = batch * seq;
        let (num_experts, top_k) = (self.config.num_experts, self.config.top_k);
        let device = x.device();
        let x = x.reshape([tokens, hidden]);

        // 1. router
        let routing = self.router.forward(x.clone());

        // 2. mask
        let beam = self.config.beam.as_ref();
        let learned = match (&source, &self.mask_router, beam) {
            (MaskSource::Learned, Some(mask_router), Some(beam)) => Some(mask_router.forward(
                x.clone(),
                routing.expert_ids.clone(),
                routing.weights.clone(),
                beam.threshold,
            )),
            _ => None,
        };
        let (hard, ste, probs) = match (learned, source) {
            (Some(decision), _) => (decision.hard, decision.ste, Some(decision.probs)),
            (None, MaskSource::External(mask)) => {
                assert_eq!(
                    mask.dims(),
                    [batch, seq, top_k],
                    "external mask must be [batch, seq, top_k]"
                );
                let mask = mask.reshape([tokens, top_k]).detach();
                (mask.clone(), mask, None)
            }
            (None, MaskSource::Rule(rule)) => {
                let mask = rule.mask(
                    routing.scores.clone(),
                    routing.expert_ids.clone(),
                    routing.weights.clone().detach(),
                );
                (mask.clone(), mask, None)
            }
            (None, _) => {
                let ones = Tensor::ones([tokens, top_k], &device);
                (ones.clone(), ones, None)
            }
        };
        let renormalize = beam.is_some_and(|beam| beam.renormalize);
        let weights = masked_weights(routing.weights.clone(), ste.clone(), renormalize);
        // Masked slots get the sentinel id, so the experts skip them, unless the straight-through
        // gradient needs their experts' outputs (training a learned mask).
        let needs_masked_experts = probs.is_some() && B::ad_enabled(&device);
        let expert_ids = if needs_masked_experts {
            routing.expert_ids.clone()
        } else {
            drop_masked_slots(routing.expert_ids.clone(), hard.clone(), num_experts)
        };

        // 3. experts (one grouped op; it sums each token's kept slots, weighted)
        let routed = self.experts.forward(x.clone(), expert_ids, weights.clone());

        // 4. combine with the shared expert
        let output = combine(routed, self.shared_expert.as_ref(), x);

        let (active, sparsity) = match (&probs, beam) {
            (Some(p), Some(beam)) => {
                let active = active_fraction(p.clone(), ste, beam.sparsity.penalty);
                let loss = sparsity_penalty(active.clone(), beam.sparsity.target_active_fraction);
                (active, loss)
            }
            _ => {
                let active = hard.clone().mean();
                (active.clone(), active)
            }
        };
        let slots = |t: Tensor<B, 2>| t.reshape([batch, seq, top_k]);
        BeamMoeOutput {
            output: output.reshape([batch, seq, hidden]),
            facts: RoutingFacts {
                expert_ids: routing.expert_ids.reshape([batch, seq, top_k]),
                topk_weights: slots(routing.weights),
                mask: slots(hard),
                mask_probs: probs.map(slots),
                weights: slots(weights),
                router_logits: routing.logits.reshape([batch, seq, num_experts]),
                active_fraction: active,
                sparsity_loss: sparsity,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BeamMaskConfig, SharedExpertConfig};
    use burn::backend::NdArray;
    use burn::module::Param;
    use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
    use burn::tensor::{Distribution, TensorData};

    type B = NdArray<f32>;

    fn config() -> BeamMoeConfig {
        BeamMoeConfig::new(12, 6, 6, 3)
            .with_init_std(0.3)
            .with_shared_expert(Some(SharedExpertConfig::new(4).with_gated(true)))
    }

    /// A layer whose mask router keeps roughly half the slots.
    fn partially_masking(config: &BeamMoeConfig) -> BeamMoe<B> {
        let device = Default::default();
        let mut layer = config.init::<B>(&device);
        let router = layer.mask_router.as_mut().unwrap();
        router.proj.weight = Param::from_tensor(Tensor::random(
            [12, 6],
            Distribution::Normal(0.0, 1.0),
            &device,
        ));
        router.proj.bias = Some(Param::from_tensor(Tensor::zeros([6], &device)));
        layer
    }

    fn input() -> Tensor<B, 3> {
        Tensor::random(
            [2, 8, 12],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        )
    }

    fn to_vec(t: Tensor<B, 3>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn record_round_trip_restores_every_parameter() {
        let config = config();
        let layer = partially_masking(&config);
        let x = input();
        let expected = layer.forward(x.clone());

        let path = std::env::temp_dir().join(format!("beam-layer-record-{}", std::process::id()));
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        layer.clone().save_file(&path, &recorder).unwrap();
        let fresh = config.init::<B>(&Default::default());
        assert_ne!(
            to_vec(fresh.forward(x.clone()).output),
            to_vec(expected.output.clone())
        );
        let loaded = fresh
            .load_file(&path, &recorder, &Default::default())
            .unwrap();
        std::fs::remove_file(path.with_extension("mpk")).ok();

        let got = loaded.forward(x);
        assert_eq!(to_vec(got.output), to_vec(expected.output));
        assert_eq!(got.facts.kept_pairs(), expected.facts.kept_pairs());
    }

    #[test]
    fn a_clone_of_a_fresh_layer_is_an_exact_copy() {
        // burn's lazy parameters would give each clone of an unused layer its own random draw.
        let config = config();
        let layer = config.init::<B>(&Default::default());
        let (a, b) = (layer.clone(), layer.clone());
        let x = input();
        assert_eq!(
            to_vec(a.forward(x.clone()).output),
            to_vec(b.forward(x).output)
        );
    }

    #[test]
    fn higher_threshold_keeps_fewer_experts() {
        let config = config();
        let layer = partially_masking(&config);
        let x = input();
        let mut kept = Vec::new();
        for threshold in [0.1, 0.3, 0.5, 0.7, 0.9] {
            let layer = layer.clone().with_threshold(threshold).unwrap();
            assert_eq!(layer.config().beam.as_ref().unwrap().threshold, threshold);
            kept.push(layer.forward(x.clone()).facts.kept_pairs());
        }
        assert!(kept.windows(2).all(|w| w[0] >= w[1]), "{kept:?}");
        assert!(kept[0] > kept[4], "{kept:?}");
    }

    #[test]
    fn all_masked_tokens_get_the_shared_expert_only_never_nan() {
        for renormalize in [false, true] {
            let config = config().with_beam(Some(
                BeamMaskConfig::new()
                    .with_renormalize(renormalize)
                    .with_init_bias(-5.0),
            ));
            let layer = config.init::<B>(&Default::default());
            let x = input();
            let out = layer.forward(x.clone());
            assert_eq!(out.facts.kept_pairs(), 0);
            let shared = layer
                .shared_expert
                .as_ref()
                .unwrap()
                .forward(x.reshape([16, 12]))
                .reshape([2, 8, 12]);
            assert_eq!(to_vec(out.output), to_vec(shared));
            let weights = out.facts.weights.into_data().to_vec::<f32>().unwrap();
            assert!(weights.iter().all(|w| *w == 0.0));
        }
    }

    #[test]
    fn renormalisation_restores_the_top_k_weight_sum_of_kept_tokens() {
        let config = config().with_beam(Some(BeamMaskConfig::new().with_renormalize(true)));
        let layer = partially_masking(&config);
        let out = layer.forward(input());
        let sum = |t: Tensor<B, 3>| t.sum_dim(2).into_data().to_vec::<f32>().unwrap();
        let kept_per_token = sum(out.facts.mask.clone());
        let before = sum(out.facts.topk_weights.clone());
        let after = sum(out.facts.weights.clone());
        assert!(kept_per_token.iter().any(|k| *k > 0.0 && *k < 3.0));
        for ((k, b), a) in kept_per_token.iter().zip(before).zip(after) {
            let expected = if *k > 0.0 { b } else { 0.0 };
            assert!((a - expected).abs() < 1e-6, "kept {k}: {a} vs {expected}");
        }
    }

    #[test]
    fn per_slot_mask_router_has_k_outputs() {
        let config = config().with_beam(Some(
            BeamMaskConfig::new().with_shape(crate::config::MaskRouterShape::PerSlot),
        ));
        let mut layer = config.init::<B>(&Default::default());
        let router = layer.mask_router.as_mut().unwrap();
        assert_eq!(router.proj.weight.dims(), [12, 3]);
        // Keep slot 0 only: bias (+4, −4, −4).
        router.proj.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![4.0f32, -4.0, -4.0], [3]),
            &Default::default(),
        )));
        let out = layer.forward(input());
        assert_eq!(out.facts.mean_active_experts(), 1.0);
        let mask = out.facts.mask.into_data().to_vec::<f32>().unwrap();
        assert!(mask.chunks(3).all(|m| m == [1.0, 0.0, 0.0]));
    }

    #[test]
    fn sparsity_and_load_balance_terms_are_sane() {
        let config = config();
        let layer = config.init::<B>(&Default::default());
        let out = layer.forward(input());
        // Fresh mask router: p = sigmoid(2) everywhere.
        let sparsity = out.facts.sparsity_loss.clone().into_scalar();
        assert!((sparsity - 1.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
        // E · Σ f_e P_e ≥ K for any routing (equality when perfectly balanced); here K = 3.
        let balance = out.facts.load_balance_loss().into_scalar();
        assert!(balance.is_finite() && balance > 0.0);
        let target = config.with_beam(Some(BeamMaskConfig::new().with_sparsity(
            crate::config::SparsityLossConfig::new().with_target_active_fraction(Some(0.25)),
        )));
        let layer = target.init::<B>(&Default::default());
        let out = layer.forward(input());
        let p = 1.0 / (1.0 + (-2.0f32).exp());
        // The fraction itself stays available (a trainer may steer the model's mean of it).
        assert!((out.facts.active_fraction.into_scalar() - p).abs() < 1e-6);
        assert!((out.facts.sparsity_loss.into_scalar() - (p - 0.25).powi(2)).abs() < 1e-6);
    }
}
