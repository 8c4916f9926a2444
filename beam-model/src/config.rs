//! Configuration of a BEAM Mixture-of-Experts layer: sizes, the base router's routing rule,
//! an optional shared expert and the BEAM mask settings.

use burn::config::Config;

/// How the base router turns router logits into K experts and their weights.
///
/// Each rule is exact to the corresponding Hugging Face `transformers` implementation
/// (see `docs/FAMILIES.md` in the repository).
#[derive(Config, Debug, PartialEq)]
pub enum RoutingRule {
    /// `softmax` over all E experts (in f32), then top-K of the probabilities, optionally
    /// renormalised so the K weights sum to 1.
    ///
    /// Qwen2-MoE, Qwen3-MoE and OLMoE (`norm_topk_prob`), Mixtral (always renormalised).
    Softmax {
        /// Renormalise the top-K probabilities to sum to 1 (`norm_topk_prob`).
        normalize_top_k: bool,
    },
    /// DeepSeek-V2: softmax over E, then greedy top-K or, with `group`, group-limited greedy
    /// (a group's score is its best expert's probability; experts outside the best `topk_group`
    /// groups get probability 0). Weights are never renormalised and are multiplied by
    /// `routed_scaling_factor`.
    DeepSeekV2 {
        /// Group-limited greedy selection; `None` is plain greedy top-K.
        group: Option<GroupLimit>,
        /// Multiplier applied to the selected weights.
        routed_scaling_factor: f64,
    },
    /// DeepSeek-V3: `sigmoid` scores; experts are *chosen* by `score + e_score_correction_bias`
    /// within the best `topk_group` of `n_group` groups (a group's score is the sum of its top-2),
    /// but *weighted* by the plain score, optionally renormalised (`s_i / (Σ s + 1e-20)`), then
    /// multiplied by `routed_scaling_factor`. The layer holds the correction bias as a parameter.
    DeepSeekV3 {
        /// Group limit used to choose experts.
        group: GroupLimit,
        /// Renormalise the selected scores (`norm_topk_prob`).
        normalize_top_k: bool,
        /// Multiplier applied to the selected weights.
        routed_scaling_factor: f64,
    },
}

impl RoutingRule {
    /// Qwen2-MoE / Qwen3-MoE / OLMoE rule.
    pub fn softmax(normalize_top_k: bool) -> Self {
        Self::Softmax { normalize_top_k }
    }

    /// Mixtral: softmax, top-K, always renormalised.
    pub fn mixtral() -> Self {
        Self::Softmax {
            normalize_top_k: true,
        }
    }
}

/// Restricts the top-K choice to the best `topk_group` of `n_group` equal groups of experts.
#[derive(Config, Debug, PartialEq, Copy)]
pub struct GroupLimit {
    /// Number of expert groups; must divide the number of experts.
    pub n_group: usize,
    /// Number of groups the K experts may come from.
    pub topk_group: usize,
}

/// An always-active SwiGLU expert added to the routed output; BEAM never masks it.
#[derive(Config, Debug, PartialEq)]
pub struct SharedExpertConfig {
    /// Intermediate size of the shared expert (any size; DeepSeek uses
    /// `moe_intermediate_size * n_shared_experts`).
    pub intermediate_size: usize,
    /// Qwen2-MoE style: the output is scaled by `sigmoid(x · w_gate)` with a `[1, H]` gate.
    /// DeepSeek style (`false`): ungated.
    #[config(default = false)]
    pub gated: bool,
}

/// Shape of the BEAM mask router.
#[derive(Config, Debug, PartialEq, Copy)]
pub enum MaskRouterShape {
    /// `Linear(H → E)`; the logits are gathered at the top-K expert ids, so the mask depends on
    /// *which* expert was picked (default).
    PerExpert,
    /// `Linear(H → K)`: one logit per rank slot.
    PerSlot,
}

/// What the auxiliary sparsity term penalises.
#[derive(Config, Debug, PartialEq, Copy)]
pub enum SparsityPenalty {
    /// Mean over tokens and slots of the mask probability `p_k` (smooth; default).
    Probability,
    /// Mean of the straight-through mask (the hard 0/1 value forward, sigmoid gradient backward).
    SteMask,
}

/// Auxiliary sparsity loss `L_sparse` (weighted by λ in the training objective).
#[derive(Config, Debug, PartialEq)]
pub struct SparsityLossConfig {
    /// Quantity averaged over tokens and slots.
    #[config(default = "SparsityPenalty::Probability")]
    pub penalty: SparsityPenalty,
    /// If set, the loss is `(mean − target)²` instead of `mean`: it steers the active fraction
    /// of the K slots towards this value in `[0, 1]` instead of pushing it to zero.
    pub target_active_fraction: Option<f64>,
}

/// BEAM settings: the learned binary mask over the K experts the base router picked.
///
/// A layer has a mask router exactly when its [`BeamMoeConfig::beam`] is `Some`; these settings,
/// the threshold among them, live only there.
#[derive(Config, Debug, PartialEq)]
pub struct BeamMaskConfig {
    /// Shape of the mask router.
    #[config(default = "MaskRouterShape::PerExpert")]
    pub shape: MaskRouterShape,
    /// A slot is kept when `sigmoid(z_k) > threshold`. Must lie in `(0, 1)`.
    #[config(default = 0.5)]
    pub threshold: f64,
    /// Rescale the kept weights so they sum to the original top-K sum. A token with every slot
    /// masked keeps a routed output of exactly zero either way.
    #[config(default = false)]
    pub renormalize: bool,
    /// Initial mask-router bias. The weights start at zero, so every mask starts at
    /// `sigmoid(init_bias) > threshold` (all ones): training starts from the top-K model.
    #[config(default = 2.0)]
    pub init_bias: f64,
    /// The auxiliary sparsity loss.
    #[config(default = "SparsityLossConfig::new()")]
    pub sparsity: SparsityLossConfig,
    /// Also feed the mask router each slot's relative routing weight: `z_k += a_e · ln(w_k / w_max)`
    /// with a learned scale `a_e` per mask-router output (initialised to 0, so training still
    /// starts from top-K). The linear part alone sees only the hidden state and cannot tell how
    /// confident the base router is *for this token*; this one input gives it that (**choice**;
    /// `false` is the plain linear mask router).
    #[config(default = true)]
    pub weight_feature: bool,
}

/// Configuration of a [`BeamMoe`](crate::BeamMoe) layer.
///
/// ```
/// use beam_model::{BeamMoeConfig, RoutingRule};
///
/// let config = BeamMoeConfig::new(64, 32, 8, 2).with_routing(RoutingRule::mixtral());
/// assert!(config.validate().is_ok());
/// assert!(BeamMoeConfig::new(64, 32, 8, 9).validate().is_err()); // K > E
/// ```
#[derive(Config, Debug)]
pub struct BeamMoeConfig {
    /// Hidden size H.
    pub hidden_size: usize,
    /// Intermediate size I of each routed expert.
    pub intermediate_size: usize,
    /// Number of routed experts E.
    pub num_experts: usize,
    /// Experts per token K picked by the base router.
    pub top_k: usize,
    /// The base router's rule.
    #[config(default = "RoutingRule::Softmax { normalize_top_k: false }")]
    pub routing: RoutingRule,
    /// Optional shared expert.
    pub shared_expert: Option<SharedExpertConfig>,
    /// BEAM mask settings: `Some` gives the layer a mask router (the default, whose masks all
    /// start at 1), `None` is the plain top-K layer.
    #[config(default = "Some(BeamMaskConfig::new())")]
    pub beam: Option<BeamMaskConfig>,
    /// Standard deviation of the normal initialisation of router and expert weights.
    #[config(default = 0.02)]
    pub init_std: f64,
}

/// An invalid [`BeamMoeConfig`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A size that must be positive is zero.
    #[error("`{field}` must be greater than 0")]
    Zero {
        /// The offending field.
        field: &'static str,
    },
    /// K larger than E.
    #[error("top_k = {top_k} exceeds num_experts = {num_experts}")]
    TopKExceedsExperts {
        /// K.
        top_k: usize,
        /// E.
        num_experts: usize,
    },
    /// The mask threshold is not in the open interval (0, 1).
    #[error("beam.threshold = {0} must lie strictly between 0 and 1")]
    Threshold(f64),
    /// `n_group` does not divide E.
    #[error("n_group = {n_group} does not divide num_experts = {num_experts}")]
    GroupsDoNotDivide {
        /// Groups.
        n_group: usize,
        /// E.
        num_experts: usize,
    },
    /// `topk_group` is 0 or larger than `n_group`.
    #[error("topk_group = {topk_group} must be in 1..={n_group}")]
    TopKGroup {
        /// Groups chosen.
        topk_group: usize,
        /// Groups.
        n_group: usize,
    },
    /// The chosen groups hold fewer than K experts.
    #[error("top_k = {top_k} exceeds the {available} experts in the topk_group best groups")]
    TopKExceedsGroups {
        /// K.
        top_k: usize,
        /// Experts in `topk_group` groups.
        available: usize,
    },
    /// DeepSeek-V3 scores a group by the sum of its top-2 experts.
    #[error("DeepSeek-V3 routing needs at least 2 experts per group, got {0}")]
    GroupTooSmall(usize),
    /// A value that must be finite is infinite or NaN.
    #[error("`{field}` = {value} must be finite")]
    NotFinite {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// A BEAM setting was changed on a layer or model without a BEAM mask router.
    #[error(
        "{0} needs a BEAM mask router, and there is none (enable BEAM or load an adapter first)"
    )]
    NoMaskRouter(&'static str),
    /// A factor that must be finite and positive is not.
    #[error("`{field}` = {value} must be finite and > 0")]
    NotPositive {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// The target active fraction is outside `[0, 1]`.
    #[error("beam.sparsity.target_active_fraction = {0} must lie in [0, 1]")]
    TargetFraction(f64),
}

impl BeamMoeConfig {
    /// Checks every field; [`try_init`](Self::try_init) calls this first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_experts", self.num_experts),
            ("top_k", self.top_k),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if self.top_k > self.num_experts {
            return Err(ConfigError::TopKExceedsExperts {
                top_k: self.top_k,
                num_experts: self.num_experts,
            });
        }
        match &self.routing {
            RoutingRule::Softmax { .. } => {}
            RoutingRule::DeepSeekV2 {
                group,
                routed_scaling_factor,
            } => {
                positive("routing.routed_scaling_factor", *routed_scaling_factor)?;
                if let Some(group) = group {
                    self.validate_group(group)?;
                }
            }
            RoutingRule::DeepSeekV3 {
                group,
                routed_scaling_factor,
                ..
            } => {
                positive("routing.routed_scaling_factor", *routed_scaling_factor)?;
                self.validate_group(group)?;
                let per_group = self.num_experts / group.n_group;
                if per_group < 2 {
                    return Err(ConfigError::GroupTooSmall(per_group));
                }
            }
        }
        if let Some(shared) = &self.shared_expert {
            if shared.intermediate_size == 0 {
                return Err(ConfigError::Zero {
                    field: "shared_expert.intermediate_size",
                });
            }
        }
        if let Some(beam) = &self.beam {
            beam.validate()?;
        }
        positive("init_std", self.init_std)
    }

    fn validate_group(&self, group: &GroupLimit) -> Result<(), ConfigError> {
        if group.n_group == 0 || !self.num_experts.is_multiple_of(group.n_group) {
            return Err(ConfigError::GroupsDoNotDivide {
                n_group: group.n_group,
                num_experts: self.num_experts,
            });
        }
        if group.topk_group == 0 || group.topk_group > group.n_group {
            return Err(ConfigError::TopKGroup {
                topk_group: group.topk_group,
                n_group: group.n_group,
            });
        }
        let available = group.topk_group * (self.num_experts / group.n_group);
        if self.top_k > available {
            return Err(ConfigError::TopKExceedsGroups {
                top_k: self.top_k,
                available,
            });
        }
        Ok(())
    }

    /// Number of mask-router outputs: E for [`MaskRouterShape::PerExpert`], K per slot; 0
    /// without BEAM.
    pub fn mask_router_outputs(&self) -> usize {
        self.beam
            .as_ref()
            .map_or(0, |beam| beam.outputs(self.num_experts, self.top_k))
    }
}

/// Checks a mask threshold τ: it must lie in the open interval `(0, 1)`.
pub fn check_threshold(threshold: f64) -> Result<(), ConfigError> {
    if threshold > 0.0 && threshold < 1.0 {
        Ok(())
    } else {
        Err(ConfigError::Threshold(threshold))
    }
}

impl BeamMaskConfig {
    /// Checks the threshold, the initial bias and the sparsity target.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_threshold(self.threshold)?;
        // Any finite bias is valid (a negative one starts with every slot masked).
        if !self.init_bias.is_finite() {
            return Err(ConfigError::NotFinite {
                field: "beam.init_bias",
                value: self.init_bias,
            });
        }
        if let Some(target) = self.sparsity.target_active_fraction {
            if !(0.0..=1.0).contains(&target) {
                return Err(ConfigError::TargetFraction(target));
            }
        }
        Ok(())
    }

    /// Number of mask-router outputs for E experts and K slots: E per expert, K per slot.
    pub fn outputs(&self, num_experts: usize, top_k: usize) -> usize {
        match self.shape {
            MaskRouterShape::PerExpert => num_experts,
            MaskRouterShape::PerSlot => top_k,
        }
    }
}

fn positive(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ConfigError::NotPositive { field, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BeamMoeConfig {
        BeamMoeConfig::new(16, 8, 8, 2)
    }

    #[test]
    fn default_config_is_valid_and_beam_starts_enabled() {
        let config = base();
        assert_eq!(config.validate(), Ok(()));
        let beam = config.beam.as_ref().expect("BEAM starts enabled");
        assert_eq!(beam.threshold, 0.5);
        assert!(!beam.renormalize);
        assert_eq!(config.mask_router_outputs(), 8);
    }

    #[test]
    fn invalid_sizes_are_typed_errors() {
        assert_eq!(
            BeamMoeConfig::new(16, 8, 8, 0).validate(),
            Err(ConfigError::Zero { field: "top_k" })
        );
        assert_eq!(
            BeamMoeConfig::new(0, 8, 8, 2).validate(),
            Err(ConfigError::Zero {
                field: "hidden_size"
            })
        );
        assert_eq!(
            BeamMoeConfig::new(16, 8, 4, 5).validate(),
            Err(ConfigError::TopKExceedsExperts {
                top_k: 5,
                num_experts: 4
            })
        );
        let shared = base().with_shared_expert(Some(SharedExpertConfig::new(0)));
        assert!(matches!(shared.validate(), Err(ConfigError::Zero { .. })));
    }

    #[test]
    fn threshold_must_be_inside_open_unit_interval() {
        for bad in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            let config = base().with_beam(Some(BeamMaskConfig::new().with_threshold(bad)));
            assert!(matches!(config.validate(), Err(ConfigError::Threshold(_))));
        }
        let ok = base().with_beam(Some(BeamMaskConfig::new().with_threshold(0.9)));
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn init_bias_may_be_negative_but_not_non_finite() {
        let with_bias = |bias| base().with_beam(Some(BeamMaskConfig::new().with_init_bias(bias)));
        assert_eq!(with_bias(-3.0).validate(), Ok(()));
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let err = with_bias(bad).validate().unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::NotFinite {
                        field: "beam.init_bias",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(err.to_string().contains("must be finite"), "{err}");
        }
    }

    #[test]
    fn group_settings_are_checked() {
        let v3 = |n_group, topk_group, k| {
            BeamMoeConfig::new(16, 8, 8, k).with_routing(RoutingRule::DeepSeekV3 {
                group: GroupLimit::new(n_group, topk_group),
                normalize_top_k: true,
                routed_scaling_factor: 2.5,
            })
        };
        assert_eq!(v3(4, 2, 2).validate(), Ok(()));
        assert_eq!(
            v3(3, 1, 2).validate(),
            Err(ConfigError::GroupsDoNotDivide {
                n_group: 3,
                num_experts: 8
            })
        );
        assert_eq!(
            v3(4, 5, 2).validate(),
            Err(ConfigError::TopKGroup {
                topk_group: 5,
                n_group: 4
            })
        );
        assert_eq!(
            v3(4, 1, 3).validate(),
            Err(ConfigError::TopKExceedsGroups {
                top_k: 3,
                available: 2
            })
        );
        assert_eq!(v3(8, 4, 2).validate(), Err(ConfigError::GroupTooSmall(1)));
        let v2 = BeamMoeConfig::new(16, 8, 8, 2).with_routing(RoutingRule::DeepSeekV2 {
            group: None,
            routed_scaling_factor: -1.0,
        });
        assert!(matches!(
            v2.validate(),
            Err(ConfigError::NotPositive { .. })
        ));
    }

    #[test]
    fn config_round_trips_through_json() {
        let config = base()
            .with_routing(RoutingRule::DeepSeekV2 {
                group: Some(GroupLimit::new(4, 2)),
                routed_scaling_factor: 1.5,
            })
            .with_shared_expert(Some(SharedExpertConfig::new(24).with_gated(true)))
            .with_beam(Some(
                BeamMaskConfig::new()
                    .with_shape(MaskRouterShape::PerSlot)
                    .with_renormalize(true)
                    .with_sparsity(
                        SparsityLossConfig::new().with_target_active_fraction(Some(0.25)),
                    ),
            ));
        let json = serde_json::to_string(&config).unwrap();
        let back: BeamMoeConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.routing, config.routing);
        assert_eq!(back.shared_expert, config.shared_expert);
        assert_eq!(back.beam, config.beam);
        assert_eq!(back.mask_router_outputs(), 2);
    }
}
