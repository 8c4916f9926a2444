//! Training settings, serialisable (`train_config.json` beside every run).

use beam_model::{BeamMaskConfig, SparsityLossConfig};
use burn::config::Config;

use crate::error::TrainError;

/// The task part of the training loss.
#[derive(Config, Debug, PartialEq, Copy)]
pub enum TaskLoss {
    /// Next-token cross-entropy on the corpus.
    CrossEntropy,
    /// KL divergence from the frozen top-K teacher's next-token distribution (the base model
    /// itself), so the masked model learns to imitate the model it replaces.
    Distill,
    /// The sum of both.
    Both,
}

/// Which parameters the optimiser updates.
#[derive(Config, Debug, PartialEq, Copy)]
pub enum Trainable {
    /// Only the BEAM mask routers; the base model is frozen (default: cheap, and the base model
    /// stays exactly the checkpoint that was loaded).
    MaskRouters,
    /// The mask routers and the base top-K routers.
    MaskAndBaseRouters,
    /// Everything (experts, attention, embeddings too); the load-balance term is added.
    All,
}

/// What a target active fraction steers (`BeamMaskConfig::sparsity.target_active_fraction`).
#[derive(Config, Debug, PartialEq, Copy)]
pub enum SparsityScope {
    /// Every MoE layer's own active fraction: the sparsity term is the mean over layers of
    /// `(a_l − target)²`, so each layer ends near the target (what runs written before this
    /// setting existed did).
    Layer,
    /// The whole model's (default): the term is `(mean_l a_l − target)²`, so the model spends
    /// the same expert budget as with [`Layer`](Self::Layer) but chooses which layers get more
    /// of it. Every layer's experts cost the same, so the FLOPs budget is the same. Measured on
    /// `kjv-moe-fine` (docs/BENCHMARKS.md, session 21): more next-token accuracy kept at fewer
    /// experts per token than `Layer` (89.8 % at 0.72 vs 88.2 % at 0.79 experts).
    Model,
}

/// Settings of a BEAM training run.
#[derive(Config, Debug, PartialEq)]
pub struct TrainConfig {
    /// The mask routers added to every MoE layer (shape, threshold, initial bias, sparsity form).
    #[config(default = "BeamMaskConfig::new()")]
    pub beam: BeamMaskConfig,
    /// Optimiser steps.
    #[config(default = 300)]
    pub steps: usize,
    /// Windows per batch.
    #[config(default = 8)]
    pub batch_size: usize,
    /// Tokens per window.
    #[config(default = 128)]
    pub seq_len: usize,
    /// Adam learning rate (constant).
    #[config(default = 5e-3)]
    pub learning_rate: f64,
    /// Adam learning rate of the mask routers when base parameters train too (`None`: the same
    /// [`learning_rate`](Self::learning_rate) for everything). End-to-end BEAM wants the fresh
    /// mask routers to move fast while the pretrained model only adapts: Adam's steps do not
    /// depend on the gradients' scale, so only a learning rate of their own does that.
    #[config(default = "None")]
    pub mask_learning_rate: Option<f64>,
    /// λ: weight of the sparsity term.
    #[config(default = 0.1)]
    pub lambda: f64,
    /// Steps over which the sparsity pressure ramps up (0: none, the default). With a target
    /// active fraction the target moves linearly from 1 (every slot kept) down to it over these
    /// steps; without one, λ grows linearly from 0. With base parameters training too, a mask
    /// that jumps to its target in a few dozen steps collapses below it (Adam's momentum) and
    /// the model spends much of its budget recovering; a ramp lets both adapt together.
    #[config(default = 0)]
    pub sparsity_warmup_steps: usize,
    /// What the target active fraction (if any) steers: the model as a whole (default) or each
    /// layer.
    #[config(default = "SparsityScope::Model")]
    pub sparsity_scope: SparsityScope,
    /// Task loss.
    #[config(default = "TaskLoss::Distill")]
    pub task_loss: TaskLoss,
    /// Distillation temperature.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Which parameters train.
    #[config(default = "Trainable::MaskRouters")]
    pub trainable: Trainable,
    /// Weight of the base model's load-balance loss when base routers train.
    #[config(default = 0.01)]
    pub load_balance_coef: f64,
    /// Seed of the batch sampler and of the mask-router initialisation.
    #[config(default = 42)]
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at the end).
    #[config(default = 50)]
    pub checkpoint_every: usize,
    /// Train a *fixed smaller K* instead of BEAM masks: every token keeps its `k` highest-weight
    /// experts ([`MaskRule::FixedK`](beam_model::MaskRule::FixedK)), no mask routers are added and
    /// λ is unused; `trainable` must then include base parameters. This is the "retrain at a
    /// smaller K" baseline BEAM is compared with at the same token budget.
    #[config(default = "None")]
    pub fixed_k: Option<usize>,
    /// Start the mask routers from this BEAM adapter (its shape, threshold and routing-weight
    /// input replace `beam`'s; `beam.sparsity` still applies)
    /// instead of from `beam.init_bias`: the second stage of end-to-end training, where a mask
    /// trained alone first is then trained with the whole model at a lower learning rate.
    #[config(default = "None")]
    pub init_adapter: Option<String>,
}

impl TrainConfig {
    /// Settings as a run wrote them (`train_config.json`, a checkpoint's state) with every key a
    /// run written before that setting existed lacks filled in with what it ran with: the
    /// default, or for a setting whose default has changed since it was added
    /// ([`sparsity_scope`](Self::sparsity_scope)), the behaviour before it existed.
    pub fn with_defaults(mut written: serde_json::Value) -> serde_json::Value {
        let mut before_it_existed = TrainConfig::new();
        before_it_existed.sparsity_scope = SparsityScope::Layer;
        if let (Some(map), serde_json::Value::Object(defaults)) = (
            written.as_object_mut(),
            serde_json::to_value(before_it_existed).expect("config serialises"),
        ) {
            for (key, value) in defaults {
                map.entry(key).or_insert(value);
            }
        }
        written
    }

    /// The sparsity settings and λ in force at `step` (0-based): the configured ones, or during
    /// [`sparsity_warmup_steps`](Self::sparsity_warmup_steps) the ramp towards them (at step
    /// `s < N`, a fraction `(s + 1) / N` of the way).
    pub fn sparsity_at(&self, step: usize) -> (SparsityLossConfig, f64) {
        let warmup = self.sparsity_warmup_steps;
        let ramp = if warmup == 0 {
            1.0
        } else {
            ((step + 1) as f64 / warmup as f64).min(1.0)
        };
        let sparsity = self.beam.sparsity.clone();
        if ramp >= 1.0 {
            // Exactly the configured settings (1 − (1 − t) · 1 need not round back to t).
            return (sparsity, self.lambda);
        }
        match sparsity.target_active_fraction {
            Some(target) => (
                sparsity.with_target_active_fraction(Some(1.0 - (1.0 - target) * ramp)),
                self.lambda,
            ),
            None => (sparsity, self.lambda * ramp),
        }
    }

    /// Checks ranges before any work is done.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.steps == 0 || self.batch_size == 0 || self.seq_len == 0 {
            return bad(format!(
                "steps ({}), batch_size ({}) and seq_len ({}) must be positive",
                self.steps, self.batch_size, self.seq_len
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(format!(
                "learning_rate {} must be positive",
                self.learning_rate
            ));
        }
        if let Some(lr) = self.mask_learning_rate {
            if !(lr > 0.0 && lr.is_finite()) {
                return bad(format!("mask_learning_rate {lr} must be positive"));
            }
            if self.fixed_k.is_some() {
                return bad(
                    "mask_learning_rate is set but a fixed_k run has no mask routers".into(),
                );
            }
        }
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return bad(format!("lambda {} must be >= 0", self.lambda));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature {} must be positive", self.temperature));
        }
        if let Some(k) = self.fixed_k {
            if k == 0 {
                return bad("fixed_k must be at least 1".into());
            }
            if self.trainable == Trainable::MaskRouters {
                return bad(format!(
                    "fixed_k = {k} trains no mask routers: choose trainable routers or all"
                ));
            }
            if self.init_adapter.is_some() {
                return bad(format!(
                    "fixed_k = {k} has no mask routers to start from init_adapter"
                ));
            }
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every must be positive".into());
        }
        // The mask settings are checked where they are defined.
        self.beam
            .validate()
            .map_err(|e| TrainError::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sparsity_ramp_reaches_the_configured_settings_at_the_end_of_the_warmup() {
        let targeted =
            TrainConfig::new()
                .with_lambda(30.0)
                .with_sparsity_warmup_steps(4)
                .with_beam(BeamMaskConfig::new().with_sparsity(
                    SparsityLossConfig::new().with_target_active_fraction(Some(0.2)),
                ));
        let targets: Vec<f64> = (0..6)
            .map(|s| {
                let (sparsity, lambda) = targeted.sparsity_at(s);
                assert_eq!(lambda, 30.0);
                sparsity.target_active_fraction.unwrap()
            })
            .collect();
        let want = [0.8, 0.6, 0.4, 0.2, 0.2, 0.2];
        for (got, want) in targets.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{targets:?}");
        }
        // Without a target, λ ramps instead.
        let plain = targeted
            .clone()
            .with_beam(BeamMaskConfig::new())
            .with_sparsity_warmup_steps(2);
        let lambdas: Vec<f64> = (0..3).map(|s| plain.sparsity_at(s).1).collect();
        assert_eq!(lambdas, [15.0, 30.0, 30.0]);
        assert_eq!(plain.sparsity_at(0).0, SparsityLossConfig::new());
        // No warmup: the configured settings from the first step.
        let none = targeted.clone().with_sparsity_warmup_steps(0);
        assert_eq!(none.sparsity_at(0), (targeted.beam.sparsity.clone(), 30.0));
    }
}
