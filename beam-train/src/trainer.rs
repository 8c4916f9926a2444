//! The BEAM training loop: mask routers on a loaded checkpoint, trained through the
//! straight-through estimator with task loss + λ · sparsity, Adam, atomic checkpoints, exact
//! resumption.

use std::path::{Path, PathBuf};
use std::time::Instant;

use beam_model::loss::sparsity_penalty;
use beam_model::model::load::load_model;
use beam_model::model::{HiddenStates, MaskMode, MoeLm};
use beam_model::{MaskRule, MoeBackend, RoutingFacts, SparsityLossConfig};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};

use crate::checkpoint::{self, CheckpointFiles, CheckpointState, RunFingerprint};
use crate::config::{SparsityScope, TaskLoss, TrainConfig, Trainable};
use crate::data::TokenData;
use crate::error::{io_error, TrainError};
use crate::eval::{model_flops_reduction, token_losses};
use crate::metrics::StepMetrics;

/// File name of the trained adapter in the output folder.
pub const ADAPTER_FILE: &str = "adapter.safetensors";

/// File name of the whole trained model (burn record, full precision) in the output folder,
/// written only when base parameters train: the adapter alone then does not reproduce the model.
/// Load it with [`load_trained_model`].
pub const TRAINED_MODEL_FILE: &str = "trained_model.mpk";

/// The model a run that trained base parameters left in `run_dir`: the checkpoint in `model_dir`
/// with the run's mask routers (settings from `run_dir/train_config.json`; none for a fixed-K
/// run), every parameter replaced by [`TRAINED_MODEL_FILE`]'s. Evaluate it with
/// [`trained_mask_mode`] of [`read_train_config`].
pub fn load_trained_model<B: MoeBackend>(
    model_dir: &Path,
    run_dir: &Path,
    device: &B::Device,
) -> Result<MoeLm<B>, TrainError> {
    let config = read_train_config(run_dir)?;
    let record_path = run_dir.join(TRAINED_MODEL_FILE);
    let bytes = std::fs::read(&record_path).map_err(io_error(&record_path))?;
    let model = with_masks(load_model::<B>(model_dir, device)?, &config, device)?;
    let record = recorder()
        .load(bytes, device)
        .map_err(|e| TrainError::Checkpoint {
            path: record_path,
            reason: e.to_string(),
        })?;
    Ok(model.load_record(record))
}

/// The settings of the run in `run_dir` (its `train_config.json`).
pub fn read_train_config(run_dir: &Path) -> Result<TrainConfig, TrainError> {
    let config_path = run_dir.join("train_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io_error(&config_path))?;
    let bad = |e: serde_json::Error| TrainError::Checkpoint {
        path: config_path.clone(),
        reason: e.to_string(),
    };
    let written: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
    serde_json::from_value(TrainConfig::with_defaults(written)).map_err(bad)
}

/// The student a run trains: the base model with BEAM mask routers (fresh, or those of
/// [`TrainConfig::init_adapter`]), or as it is when the run trains a fixed smaller K (no mask
/// routers then).
fn with_masks<B: MoeBackend>(
    model: MoeLm<B>,
    config: &TrainConfig,
    device: &B::Device,
) -> Result<MoeLm<B>, TrainError> {
    if config.fixed_k.is_some() {
        return Ok(model);
    }
    if let Some(adapter) = &config.init_adapter {
        // The mask's shape and threshold are the adapter's; its sparsity term is this run's.
        let mut model = model.load_beam_adapter(adapter, device)?;
        set_sparsity(&mut model, &config.beam.sparsity)?;
        return Ok(model);
    }
    model
        .enable_beam(config.beam.clone(), device)
        .map_err(|e| TrainError::Config(e.to_string()))
}

/// Gives every MoE layer's mask these sparsity-term settings.
fn set_sparsity<B: Backend>(
    model: &mut MoeLm<B>,
    sparsity: &SparsityLossConfig,
) -> Result<(), TrainError> {
    for layer in &mut model.layers {
        if let Some(moe) = layer.feed_forward.moe_mut() {
            moe.set_sparsity(sparsity.clone())
                .map_err(|e| TrainError::Config(e.to_string()))?;
        }
    }
    Ok(())
}

/// The mask mode a run's student trains and is evaluated with: its learned masks, or the fixed
/// smaller K it trained.
pub fn trained_mask_mode(config: &TrainConfig) -> MaskMode {
    match config.fixed_k {
        Some(k) => MaskMode::Rule(MaskRule::FixedK { k }),
        None => MaskMode::Learned,
    }
}

/// What a finished run returns.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The adapter file written (`None` for a fixed-K run, which has no mask routers).
    pub adapter: Option<PathBuf>,
    /// The whole trained model, when base parameters trained ([`TRAINED_MODEL_FILE`]).
    pub trained_model: Option<PathBuf>,
    /// Step at which this invocation started (non-zero after a resume).
    pub resumed_from: usize,
    /// Metrics of every step, including those before a resume.
    pub history: Vec<StepMetrics>,
    /// Wall time of this invocation.
    pub seconds: f64,
}

/// Sets `require_grad` on every float parameter it visits.
struct RequireGrad(bool);

impl<B: Backend> ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(self.0)
    }
}

/// Freezes everything but the parameters `trainable` names. Mask routers always train.
pub fn select_trainable<B: AutodiffBackend>(model: MoeLm<B>, trainable: Trainable) -> MoeLm<B> {
    if trainable == Trainable::All {
        return model.map(&mut RequireGrad(true));
    }
    let mut model = model.no_grad();
    for layer in &mut model.layers {
        if let Some(moe) = layer.feed_forward.moe_mut() {
            moe.mask_router = moe
                .mask_router
                .take()
                .map(|m| m.map(&mut RequireGrad(true)));
            if trainable == Trainable::MaskAndBaseRouters {
                moe.router = moe.router.clone().map(&mut RequireGrad(true));
            }
        }
    }
    model
}

/// Collects the ids of the float parameters it visits.
struct ParamIds(Vec<ParamId>);

impl<B: Backend> ModuleVisitor<B> for ParamIds {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.id);
    }
}

/// The ids of every mask router's parameters (those [`TrainConfig::mask_learning_rate`] steps).
pub fn mask_router_params<B: Backend>(model: &MoeLm<B>) -> Vec<ParamId> {
    let mut ids = ParamIds(Vec::new());
    for mask_router in model
        .moe_layers()
        .filter_map(|moe| moe.mask_router.as_ref())
    {
        mask_router.visit(&mut ids);
    }
    ids.0
}

fn recorder() -> NamedMpkBytesRecorder<FullPrecisionSettings> {
    NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
}

/// Trains BEAM mask routers on the checkpoint in `model_dir` and writes
/// `out_dir/adapter.safetensors`. If `out_dir` holds a checkpoint of the same settings, training
/// resumes from it and ends exactly as an uninterrupted run would.
///
/// `on_step` sees every step's metrics (for progress output).
pub fn train<B>(
    model_dir: &Path,
    data: &TokenData,
    config: &TrainConfig,
    out_dir: &Path,
    device: &B::Device,
    on_step: &mut dyn FnMut(&StepMetrics, &TrainConfig),
) -> Result<TrainSummary, TrainError>
where
    B: AutodiffBackend + MoeBackend,
    B::InnerBackend: MoeBackend,
{
    config.validate()?;
    let model_config = beam_model::model::config::ModelConfig::from_dir(model_dir)?;
    crate::eval::check_context(config.seq_len, model_config.max_position_embeddings)?;
    let start = Instant::now();
    std::fs::create_dir_all(out_dir).map_err(io_error(out_dir))?;
    // A checkpoint already here must be of this run (settings, model, data): checked before the
    // model loads and before anything in the folder is written.
    let fingerprint = RunFingerprint::new(model_dir, &data.tokens)?;
    let resume = checkpoint::load_latest(out_dir)?;
    if let Some(files) = &resume {
        checkpoint::check_config(out_dir, &files.state, config, &fingerprint)?;
    }
    let config_json = serde_json::to_value(config).expect("config serialises");
    beam_model::model::adapter::write_atomically(
        &out_dir.join("train_config.json"),
        serde_json::to_string_pretty(&config_json)
            .expect("json")
            .as_bytes(),
    )?;

    B::seed(device, config.seed);
    let base = load_model::<B>(model_dir, device)?;
    // The frozen top-K teacher is the base model itself, without autodiff.
    let teacher =
        matches!(config.task_loss, TaskLoss::Distill | TaskLoss::Both).then(|| base.valid());
    if let Some(k) = config.fixed_k {
        let top_k = base.top_k();
        if k > top_k {
            return Err(TrainError::Config(format!(
                "fixed_k = {k} exceeds the model's top-k of {top_k}"
            )));
        }
    }
    let mut model = with_masks(base, config, device)?;
    let mode = trained_mask_mode(config);
    let mut optimizer = AdamConfig::new().init::<B, MoeLm<B>>();
    let mut history = Vec::new();
    let mut first_step = 0;
    if let Some(files) = resume {
        let bad = |what: &str, e: burn::record::RecorderError| TrainError::Checkpoint {
            path: out_dir.join(checkpoint::LATEST),
            reason: format!("{what}: {e}"),
        };
        let record = recorder()
            .load(files.model, device)
            .map_err(|e| bad("model.mpk", e))?;
        model = model.load_record(record);
        let record = recorder()
            .load(files.optimizer, device)
            .map_err(|e| bad("optimizer.mpk", e))?;
        optimizer = optimizer.load_record(record);
        first_step = files.state.step;
        history = files.state.history;
    }
    let mut model = select_trainable(model, config.trainable);
    // Parameter ids stay the same across optimiser steps: the mask routers' are taken once.
    let mask_params = config
        .mask_learning_rate
        .map(|lr| (lr, mask_router_params(&model)));

    for step in first_step..config.steps {
        let (sparsity_now, lambda) = config.sparsity_at(step);
        // During the warmup only: from its last step on the layers hold the configured settings
        // (`sparsity_at` returns them exactly), as they do from the start without a warmup.
        if step < config.sparsity_warmup_steps && config.fixed_k.is_none() {
            set_sparsity(&mut model, &sparsity_now)?;
        }
        let batch = data.train_batch(config.seed, step, config.batch_size, config.seq_len)?;
        let (inputs, targets) = batch.tensors::<B>(device);
        let out = model.forward(inputs.clone(), None, mode, HiddenStates::Skip);
        let (nll, _) = token_losses(out.logits.clone(), targets);
        let cross_entropy = nll.mean();
        let distill = teacher.as_ref().map(|teacher| {
            let teacher_logits = teacher
                .forward(inputs.inner(), None, MaskMode::TopK, HiddenStates::Skip)
                .logits;
            distillation_kl(
                out.logits.clone(),
                Tensor::from_inner(teacher_logits),
                config.temperature,
            )
        });
        let task = match (config.task_loss, distill) {
            (TaskLoss::CrossEntropy, _) | (_, None) => cross_entropy.clone(),
            (TaskLoss::Distill, Some(kl)) => kl,
            (TaskLoss::Both, Some(kl)) => cross_entropy.clone() + kl,
        };
        let layers = out.routing.len().max(1) as f64;
        // A fixed-K run has no mask to make sparser (its sparsity term is a constant).
        let mean_over_layers = |term: fn(&RoutingFacts<B>) -> Tensor<B, 1>| {
            out.routing
                .iter()
                .filter(|_| config.fixed_k.is_none())
                .map(term)
                .reduce(|a, b| a + b)
                .map(|s| s.div_scalar(layers))
        };
        let sparsity = match (config.sparsity_scope, sparsity_now.target_active_fraction) {
            (SparsityScope::Model, Some(target)) => mean_over_layers(|f| f.active_fraction.clone())
                .map(|active| sparsity_penalty(active, Some(target))),
            _ => mean_over_layers(|f| f.sparsity_loss.clone()),
        };
        let mut loss = task.clone();
        if let Some(s) = &sparsity {
            loss = loss + s.clone().mul_scalar(lambda);
        }
        if config.trainable != Trainable::MaskRouters && config.load_balance_coef > 0.0 {
            if let Some(lb) = out
                .routing
                .iter()
                .map(|f| f.load_balance_loss())
                .reduce(|a, b| a + b)
            {
                loss = loss + lb.mul_scalar(config.load_balance_coef / layers);
            }
        }

        // Metrics of the hard mask, as inference will run it.
        let tokens = batch.batch_size * batch.seq_len;
        let kept_per_layer = out
            .routing
            .iter()
            .map(|facts| facts.kept_pairs())
            .collect::<Vec<_>>();
        let kept: usize = kept_per_layer.iter().sum();
        let moe_flops_reduction = model_flops_reduction(
            model
                .moe_layers()
                .map(|moe| moe.config())
                .zip(kept_per_layer),
            tokens,
        );
        let scalar = |t: Tensor<B, 1>| t.into_scalar().elem::<f64>();
        let loss_value = scalar(loss.clone());
        if !loss_value.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss: loss_value,
            });
        }
        let ce = scalar(cross_entropy);
        let metrics = StepMetrics {
            step,
            loss: loss_value,
            task_loss: scalar(task),
            cross_entropy: ce,
            perplexity: ce.exp(),
            sparsity: sparsity.map_or(0.0, scalar),
            mean_active_experts: kept as f64 / (tokens as f64 * layers),
            moe_flops_reduction,
        };

        let mut grads = loss.backward();
        if let Some((mask_lr, ids)) = &mask_params {
            // One optimiser, two steps: each moves only the parameters whose gradients it is
            // given, and Adam's state is per parameter, so the record (and resume) is unchanged.
            let mask_grads = GradientsParams::from_params(&mut grads, &model, ids);
            model = optimizer.step(*mask_lr, model, mask_grads);
        }
        let grads = GradientsParams::from_grads(grads, &model);
        model = optimizer.step(config.learning_rate, model, grads);
        on_step(&metrics, config);
        history.push(metrics);

        let done = step + 1;
        if done.is_multiple_of(config.checkpoint_every) || done == config.steps {
            let bytes = |e: burn::record::RecorderError| TrainError::Checkpoint {
                path: out_dir.to_path_buf(),
                reason: e.to_string(),
            };
            let files = CheckpointFiles {
                model: recorder()
                    .record(model.clone().into_record(), ())
                    .map_err(bytes)?,
                optimizer: recorder()
                    .record(optimizer.to_record(), ())
                    .map_err(bytes)?,
                state: CheckpointState {
                    step: done,
                    config: config_json.clone(),
                    history: history.clone(),
                    fingerprint: Some(fingerprint.clone()),
                },
            };
            checkpoint::save(out_dir, &files)?;
            // The adapter is usable at every checkpoint, not only at the end.
            if config.fixed_k.is_none() {
                model
                    .valid()
                    .save_beam_adapter(out_dir.join(ADAPTER_FILE))?;
            }
            if config.trainable != Trainable::MaskRouters {
                beam_model::model::adapter::write_atomically(
                    &out_dir.join(TRAINED_MODEL_FILE),
                    &files.model,
                )?;
            }
        }
    }
    let adapter = config.fixed_k.is_none().then(|| out_dir.join(ADAPTER_FILE));
    if let (Some(adapter), true) = (&adapter, first_step >= config.steps) {
        // Nothing left to train: make sure the adapter of the finished run is there.
        model.valid().save_beam_adapter(adapter)?;
    }
    Ok(TrainSummary {
        adapter,
        trained_model: (config.trainable != Trainable::MaskRouters)
            .then(|| out_dir.join(TRAINED_MODEL_FILE)),
        resumed_from: first_step,
        history,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `T² · KL(teacher ‖ student)` per token, averaged: the distillation term.
///
/// # Shapes
/// - `student`, `teacher`: logits `[B, T, V]`; output `[1]`
pub fn distillation_kl<B: Backend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    temperature: f64,
) -> Tensor<B, 1> {
    let log_teacher = log_softmax(teacher.div_scalar(temperature), 2).detach();
    let log_student = log_softmax(student.div_scalar(temperature), 2);
    (log_teacher.clone().exp() * (log_teacher - log_student))
        .sum_dim(2)
        .mean()
        .mul_scalar(temperature * temperature)
}
