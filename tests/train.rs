//! BEAM training and evaluation (`beam-train`) on the shipped tiny Qwen3-MoE checkpoint and the
//! shipped King James Bible validation text.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use beam_model::checkpoint::TensorStore;
use beam_model::model::load::load_model;
use beam_model::model::{HiddenStates, MaskMode, MoeLm};
use beam_model::{BeamMaskConfig, MaskRule};
use beam_train::checkpoint;
use beam_train::eval::{evaluate, interpolate_accuracy, EvalOptions};
use beam_train::trainer::select_trainable;
use beam_train::{train, SparsityScope, TaskLoss, TokenData, TrainConfig, TrainError, Trainable};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Int, Tensor, TensorData};
use common::repo_root;

type B = NdArray<f32>;
type AB = Autodiff<B>;

fn tiny_model() -> PathBuf {
    repo_root().join("assets/models/tiny-qwen3_moe")
}

fn corpus() -> TokenData {
    let dir = tiny_model();
    TokenData::from_file(
        &repo_root().join("assets/corpus/kjv-valid.txt.gz"),
        &dir.join("tokenizer.json"),
        300,
    )
    .unwrap()
}

fn small_config(steps: usize) -> TrainConfig {
    TrainConfig::new()
        .with_steps(steps)
        .with_batch_size(4)
        .with_seq_len(32)
        .with_learning_rate(0.05)
        .with_lambda(1.0)
        .with_checkpoint_every(5)
}

/// Trains on the tiny model and the KJV validation text, without progress output.
fn train_tiny(config: &TrainConfig, out: &Path) -> Result<beam_train::TrainSummary, TrainError> {
    train::<AB>(
        &tiny_model(),
        &corpus(),
        config,
        out,
        &Default::default(),
        &mut |_, _| {},
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("beam-train-test-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

fn adapter_tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let store = TensorStore::open(path).unwrap();
    let mut names = store.names();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let shape = store.shape(&n).unwrap();
            let v = store.f32_values(&n, &shape).unwrap();
            (n, v)
        })
        .collect()
}

#[test]
fn a_short_run_cuts_active_experts_and_the_sparsity_term_with_finite_loss() {
    let out = temp_dir("short");
    let summary = train_tiny(&small_config(30), &out).unwrap();
    let h = &summary.history;
    assert_eq!(h.len(), 30);
    assert!(summary.trained_model.is_none());
    assert!(h
        .iter()
        .all(|m| m.loss.is_finite() && m.cross_entropy.is_finite()));
    // The mask starts fully open (bias 2 → p = 0.88): all K = 2 experts run.
    assert_eq!(h[0].mean_active_experts, 2.0);
    let (first, last) = (&h[0], h.last().unwrap());
    assert!(
        last.mean_active_experts < 0.5 * first.mean_active_experts,
        "experts/token {} → {}",
        first.mean_active_experts,
        last.mean_active_experts
    );
    assert!(
        last.sparsity < 0.5 * first.sparsity,
        "{} → {}",
        first.sparsity,
        last.sparsity
    );
    assert!(last.moe_flops_reduction > 0.3);
    // The adapter loads back and the evaluated model runs fewer experts than top-K.
    let device = Default::default();
    let model = load_model::<B>(tiny_model(), &device)
        .unwrap()
        .load_beam_adapter(
            summary
                .adapter
                .as_ref()
                .expect("a BEAM run writes an adapter"),
            &device,
        )
        .unwrap();
    let options = EvalOptions {
        seq_len: 32,
        batch_size: 4,
        max_tokens: Some(256),
    };
    let beam = evaluate(&model, &corpus(), MaskMode::Learned, &options, "beam").unwrap();
    let top_k = evaluate(&model, &corpus(), MaskMode::TopK, &options, "top-k").unwrap();
    assert_eq!(top_k.mean_active_experts, 2.0);
    assert!(
        beam.mean_active_experts < 1.0,
        "{}",
        beam.mean_active_experts
    );
    assert_eq!(beam.method, "beam");
    std::fs::remove_dir_all(out).ok();
}

fn mask_router_only_gradients(trainable: Trainable) -> (bool, bool, bool, bool) {
    let device = Default::default();
    let model: MoeLm<AB> = load_model::<AB>(tiny_model(), &device)
        .unwrap()
        .enable_beam(BeamMaskConfig::new(), &device)
        .unwrap();
    let model = select_trainable(model, trainable);
    let batch = corpus().train_batch(1, 0, 2, 16).unwrap();
    let (inputs, targets) = batch.tensors::<AB>(&device);
    // Task loss only: the mask router can get a gradient only through the straight-through mask.
    let out = model.forward(inputs, None, MaskMode::Learned, HiddenStates::Skip);
    let (nll, _) = beam_train::eval::token_losses(out.logits, targets);
    let grads = nll.mean().backward();
    let moe = model.layers[0].feed_forward.moe().unwrap();
    let mask_grad = moe
        .mask_router
        .as_ref()
        .unwrap()
        .proj
        .weight
        .grad(&grads)
        .map(|g| g.abs().sum().into_scalar());
    let mask_flows = mask_grad.is_some_and(|g| g > 0.0);
    (
        mask_flows,
        moe.router.weight.grad(&grads).is_some(),
        moe.experts.gate_up.val().grad(&grads).is_some(),
        model.embed.weight.grad(&grads).is_some(),
    )
}

#[test]
fn straight_through_gradients_reach_the_mask_router_and_only_the_configured_parameters() {
    assert_eq!(
        mask_router_only_gradients(Trainable::MaskRouters),
        (true, false, false, false)
    );
    assert_eq!(
        mask_router_only_gradients(Trainable::MaskAndBaseRouters),
        (true, true, false, false)
    );
    assert_eq!(
        mask_router_only_gradients(Trainable::All),
        (true, true, true, true)
    );
}

#[test]
fn training_base_parameters_also_writes_the_whole_trained_model() {
    let out = temp_dir("all");
    let config = small_config(2).with_trainable(Trainable::All);
    let summary = train_tiny(&config, &out).unwrap();
    let record = summary.trained_model.expect("a trained-model record");
    assert!(std::fs::metadata(&record).unwrap().len() > 10_000);

    // The record reloads to the model training ended with: its cross-entropy on the batch of
    // step 2 is what a 3-step run (deterministic, same settings) measured at its step 2, with
    // the model after two updates.
    let longer = temp_dir("all-longer");
    let three = train_tiny(&config.clone().with_steps(3), &longer).unwrap();
    assert_eq!(three.history[..2], summary.history[..]);
    let reloaded =
        beam_train::load_trained_model::<B>(&tiny_model(), &out, &Default::default()).unwrap();
    let batch = corpus()
        .train_batch(config.seed, 2, config.batch_size, config.seq_len)
        .unwrap();
    let (inputs, targets) = batch.tensors::<B>(&Default::default());
    let out_logits = reloaded.forward(inputs.clone(), None, MaskMode::Learned, HiddenStates::Skip);
    let kept: usize = out_logits.routing.iter().map(|f| f.kept_pairs()).sum();
    let (nll, _) = beam_train::eval::token_losses(out_logits.logits, targets.clone());
    let ce = nll.mean().into_scalar() as f64;
    let step2 = &three.history[2];
    assert!(
        (ce - step2.cross_entropy).abs() < 1e-5,
        "reloaded {ce} vs trained {}",
        step2.cross_entropy
    );
    let layers = reloaded.moe_layers().count() as f64;
    let tokens = (batch.batch_size * batch.seq_len) as f64;
    assert!((kept as f64 / (tokens * layers) - step2.mean_active_experts).abs() < 1e-9);
    // …and it is not the original checkpoint (base parameters did train).
    let base = load_model::<B>(tiny_model(), &Default::default()).unwrap();
    let base_out = base.forward(inputs, None, MaskMode::TopK, HiddenStates::Skip);
    let (base_nll, _) = beam_train::eval::token_losses(base_out.logits, targets);
    let base_ce = base_nll.mean().into_scalar() as f64;
    assert!((ce - base_ce).abs() > 1e-4, "{ce} vs base {base_ce}");
    std::fs::remove_dir_all(out).ok();
    std::fs::remove_dir_all(longer).ok();
}

/// Largest absolute difference of two parameters' values.
fn max_change<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    (a - b).abs().max().into_scalar() as f64
}

#[test]
fn the_mask_routers_step_at_their_own_learning_rate_when_everything_trains() {
    // Adam's first step moves every parameter with a non-zero gradient by about its learning
    // rate (m/sqrt(v) = ±1), so one step shows which rate each parameter took.
    let (lr, mask_lr) = (1e-3, 0.04);
    let base = load_model::<B>(tiny_model(), &Default::default()).unwrap();
    for mask_rate in [Some(mask_lr), None] {
        let out = temp_dir(&format!("mask-lr-{}", mask_rate.is_some()));
        let config = small_config(1)
            .with_learning_rate(lr)
            .with_mask_learning_rate(mask_rate)
            .with_trainable(Trainable::All);
        train_tiny(&config, &out).unwrap();
        let trained =
            beam_train::load_trained_model::<B>(&tiny_model(), &out, &Default::default()).unwrap();
        let expected_mask_step = mask_rate.unwrap_or(lr);
        for (old, new) in base.moe_layers().zip(trained.moe_layers()) {
            let router = max_change(old.router.weight.val(), new.router.weight.val());
            assert!(
                router > 0.9 * lr && router < 1.001 * lr,
                "router moved {router}"
            );
            let mask = new.mask_router.as_ref().expect("a mask router");
            // Fresh mask routers start with zero weights and bias init_bias.
            let weight = mask.proj.weight.val().abs().max().into_scalar() as f64;
            let bias = mask.proj.bias.as_ref().unwrap().val();
            let bias = max_change(
                bias.clone(),
                bias.ones_like().mul_scalar(config.beam.init_bias),
            );
            for moved in [weight, bias] {
                assert!(
                    moved > 0.9 * expected_mask_step && moved < 1.001 * expected_mask_step,
                    "mask router moved {moved}, expected about {expected_mask_step}"
                );
            }
        }
        std::fs::remove_dir_all(out).ok();
    }
    // A fixed-K run has no mask router to give a rate to.
    let err = small_config(1)
        .with_trainable(Trainable::All)
        .with_fixed_k(Some(1))
        .with_mask_learning_rate(Some(0.1))
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("mask_learning_rate"), "{err}");
}

#[test]
fn a_fixed_k_run_trains_the_base_model_at_k_prime_and_improves_on_it_untrained() {
    let data = corpus();
    // Settings that cannot work are refused before anything is written.
    let out = temp_dir("fixed-k-bad");
    for (config, expect) in [
        (
            small_config(2).with_fixed_k(Some(1)),
            "trains no mask routers",
        ),
        (
            small_config(2)
                .with_fixed_k(Some(0))
                .with_trainable(Trainable::All),
            "at least 1",
        ),
        (
            small_config(2)
                .with_fixed_k(Some(3))
                .with_trainable(Trainable::All),
            "exceeds the model's top-k of 2",
        ),
    ] {
        match train::<AB>(
            &tiny_model(),
            &data,
            &config,
            &out,
            &Default::default(),
            &mut |_, _| {},
        ) {
            Err(TrainError::Config(m)) => assert!(m.contains(expect), "{m}"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }
    std::fs::remove_dir_all(&out).ok();

    // Distilled to the top-2 teacher at K' = 1 for 30 steps, on the held-out text itself.
    let out = temp_dir("fixed-k");
    let config = small_config(30)
        .with_fixed_k(Some(1))
        .with_trainable(Trainable::All)
        .with_learning_rate(0.01)
        .with_task_loss(TaskLoss::CrossEntropy)
        // Not today's default: what a run written before the setting existed ran with (below).
        .with_sparsity_scope(SparsityScope::Layer);
    let summary = train::<AB>(
        &tiny_model(),
        &data,
        &config,
        &out,
        &Default::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert!(
        summary.adapter.is_none(),
        "a fixed-K run has no mask routers"
    );
    assert!(!out.join(beam_train::ADAPTER_FILE).exists());
    assert!(summary
        .history
        .iter()
        .all(|m| m.mean_active_experts == 1.0 && m.sparsity == 0.0));
    let read = beam_train::read_train_config(&out).unwrap();
    assert_eq!(read, config);
    // A run written before a setting existed lacks its key and reads as what it ran with: the
    // default, or for the sparsity scope (whose default changed) the per-layer behaviour.
    let path = out.join("train_config.json");
    let mut written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for key in [
        "sparsity_warmup_steps",
        "mask_learning_rate",
        "sparsity_scope",
    ] {
        assert!(
            written.as_object_mut().unwrap().remove(key).is_some(),
            "{key}"
        );
    }
    std::fs::write(&path, serde_json::to_string(&written).unwrap()).unwrap();
    assert_eq!(beam_train::read_train_config(&out).unwrap(), config);
    // …and its checkpoint resumes under the same settings.
    let mut state = checkpoint::load_latest(&out).unwrap().unwrap().state;
    for key in [
        "sparsity_warmup_steps",
        "mask_learning_rate",
        "sparsity_scope",
    ] {
        state.config.as_object_mut().unwrap().remove(key);
    }
    let fingerprint = checkpoint::RunFingerprint::new(&tiny_model(), &data.tokens).unwrap();
    checkpoint::check_config(&out, &state, &config, &fingerprint).unwrap();
    let other = config.clone().with_sparsity_warmup_steps(10);
    assert!(checkpoint::check_config(&out, &state, &other, &fingerprint).is_err());
    let today = config.clone().with_sparsity_scope(SparsityScope::Model);
    assert_eq!(TrainConfig::new().sparsity_scope, SparsityScope::Model);
    assert!(checkpoint::check_config(&out, &state, &today, &fingerprint).is_err());
    let mode = beam_train::trained_mask_mode(&read);
    assert_eq!(mode, MaskMode::Rule(MaskRule::FixedK { k: 1 }));
    let trained =
        beam_train::load_trained_model::<B>(&tiny_model(), &out, &Default::default()).unwrap();
    assert!(!trained.has_beam());
    let base = load_model::<B>(tiny_model(), &Default::default()).unwrap();
    let options = EvalOptions {
        seq_len: 32,
        batch_size: 4,
        max_tokens: Some(512),
    };
    let after = evaluate(&trained, &data, mode, &options, "trained").unwrap();
    let before = evaluate(&base, &data, mode, &options, "untrained").unwrap();
    assert_eq!(after.mean_active_experts, 1.0);
    assert_eq!(after.moe_flops_reduction, before.moe_flops_reduction);
    assert!(
        after.loss < before.loss - 0.05,
        "trained at K' = 1: {} vs untrained {}",
        after.loss,
        before.loss
    );
    std::fs::remove_dir_all(out).ok();
}

#[test]
fn end_to_end_training_can_start_from_a_trained_adapter() {
    let data = corpus();
    let first = temp_dir("stage1");
    let stage1 = train::<AB>(
        &tiny_model(),
        &data,
        &small_config(10),
        &first,
        &Default::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let adapter = stage1.adapter.unwrap();
    // Stage 2 starts where stage 1 ended: its first step keeps what the adapter keeps on that
    // batch, not everything (a fresh mask starts at init_bias 2: every expert kept).
    let second = temp_dir("stage2");
    let config = small_config(1)
        .with_trainable(Trainable::All)
        .with_learning_rate(1e-3)
        .with_init_adapter(Some(adapter.to_string_lossy().into_owned()));
    let stage2 = train::<AB>(
        &tiny_model(),
        &data,
        &config,
        &second,
        &Default::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let model = load_model::<B>(tiny_model(), &Default::default())
        .unwrap()
        .load_beam_adapter(&adapter, &Default::default())
        .unwrap();
    let batch = data
        .train_batch(config.seed, 0, config.batch_size, config.seq_len)
        .unwrap();
    let (inputs, _) = batch.tensors::<B>(&Default::default());
    let out = model.forward(inputs, None, MaskMode::Learned, HiddenStates::Skip);
    let kept: usize = out.routing.iter().map(|f| f.kept_pairs()).sum();
    let expected = kept as f64 / (batch.batch_size * batch.seq_len * out.routing.len()) as f64;
    assert!(
        expected < 2.0,
        "the stage-1 adapter masks some experts ({expected})"
    );
    assert!((stage2.history[0].mean_active_experts - expected).abs() < 1e-12);
    // The run's sparsity settings apply to the loaded mask (adapters do not store them): with a
    // target active fraction of 0.25 the first step's term is (a − 0.25)² of the plain mean a.
    let quarter = config
        .clone()
        .with_beam(BeamMaskConfig::new().with_sparsity(
            beam_model::SparsityLossConfig::new().with_target_active_fraction(Some(0.25)),
        ));
    let targeted = temp_dir("stage2-target");
    let with_target = train::<AB>(
        &tiny_model(),
        &data,
        &quarter.clone().with_sparsity_scope(SparsityScope::Layer),
        &targeted,
        &Default::default(),
        &mut |_, _| {},
    )
    .unwrap();
    // Per layer: a_l = mean mask probability on the first batch; the term is mean_l (a_l − 0.25)².
    let per_layer: Vec<f64> = out
        .routing
        .iter()
        .map(|f| f.mask_probs.clone().unwrap().mean().into_scalar() as f64)
        .collect();
    let plain = per_layer.iter().sum::<f64>() / per_layer.len() as f64;
    let want = per_layer.iter().map(|a| (a - 0.25).powi(2)).sum::<f64>() / per_layer.len() as f64;
    assert!((stage2.history[0].sparsity - plain).abs() < 1e-6);
    let got = with_target.history[0].sparsity;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    std::fs::remove_dir_all(targeted).ok();
    // Steering the whole model instead: the term is (mean_l a_l − 0.25)², not the mean of the
    // layers' squares (they differ: the layers' fractions differ).
    let spread = per_layer
        .iter()
        .map(|a| (a - plain).abs())
        .fold(0.0, f64::max);
    assert!(
        spread > 1e-3,
        "the layers keep different fractions: {per_layer:?}"
    );
    let model_scope = temp_dir("stage2-model-scope");
    let with_model_target = train_tiny(
        &quarter.clone().with_sparsity_scope(SparsityScope::Model),
        &model_scope,
    )
    .unwrap();
    let got = with_model_target.history[0].sparsity;
    let want_model = (plain - 0.25).powi(2);
    assert!((got - want_model).abs() < 1e-6, "{got} vs {want_model}");
    assert!((want_model - want).abs() > 1e-6);
    std::fs::remove_dir_all(model_scope).ok();
    // With a warmup of 4 steps the first step's target is 1 − 0.75 · 1/4 = 0.8125 (the default
    // scope: the whole model's fraction).
    let ramped = temp_dir("stage2-ramp");
    let with_ramp = train_tiny(
        &quarter.clone().with_steps(1).with_sparsity_warmup_steps(4),
        &ramped,
    )
    .unwrap();
    let want = (plain - 0.8125).powi(2);
    let got = with_ramp.history[0].sparsity;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    std::fs::remove_dir_all(ramped).ok();
    // The whole model it leaves reloads (through the same adapter) and evaluates.
    let reloaded =
        beam_train::load_trained_model::<B>(&tiny_model(), &second, &Default::default()).unwrap();
    assert!(reloaded.has_beam());
    // A fixed-K run cannot start from an adapter.
    let bad = config.clone().with_fixed_k(Some(1));
    assert!(matches!(bad.validate(), Err(TrainError::Config(m)) if m.contains("init_adapter")));
    std::fs::remove_dir_all(first).ok();
    std::fs::remove_dir_all(second).ok();
}

#[test]
fn the_token_map_counts_each_tokens_kept_experts_and_shows_every_token() {
    use beam_train::token_map::{token_map, token_map_html, write_token_map, TokenMapOptions};
    let device = Default::default();
    let model = load_model::<B>(tiny_model(), &device).unwrap();
    let data = corpus();
    let tokenizer = beam_train::data::load_tokenizer(&tiny_model().join("tokenizer.json")).unwrap();
    let options = TokenMapOptions {
        tokens: 70,
        seq_len: 32,
        label: "test".into(),
    };
    let (top, k) = token_map(&model, MaskMode::TopK, &data, &options).unwrap();
    assert_eq!((top.len(), k), (70, 2));
    assert!(top.iter().all(|t| t.kept == vec![2, 2]));
    assert_eq!(
        top.iter().map(|t| t.id).collect::<Vec<_>>(),
        data.tokens[..70].to_vec()
    );
    // A rule that drops experts by weight: the per-token counts sum to what evaluation counts
    // on the same windows (70 tokens = windows of 32, 32 and 6).
    let rule = MaskMode::Rule(MaskRule::DynamicSkip { beta: 0.6 });
    let (skip, _) = token_map(&model, rule, &data, &options).unwrap();
    assert!(skip
        .iter()
        .all(|t| t.kept.iter().all(|&k| (1..=2).contains(&k))));
    let ones = skip
        .iter()
        .flat_map(|t| &t.kept)
        .filter(|&&k| k == 1)
        .count();
    assert!(
        ones > 0 && ones < 140,
        "{ones} of 140 (token, layer) pairs keep one expert"
    );
    let mut expected = 0;
    for window in data.tokens[..70].chunks(32) {
        let inputs = beam_model::model::generate::ids_tensor::<B>(window, &device);
        let out = model.forward(inputs, None, rule, HiddenStates::Skip);
        expected += out.routing.iter().map(|f| f.kept_pairs()).sum::<usize>();
    }
    assert_eq!(skip.iter().flat_map(|t| &t.kept).sum::<usize>(), expected);

    // The page has one span per token, and its token texts put together are the decoded text.
    let html = token_map_html(&skip, 2, &tokenizer, "a <title>");
    assert_eq!(html.matches("<span class=\"t\"").count(), 70);
    assert!(html.contains("a &lt;title&gt;") && !html.contains("<title>a <title>"));
    assert!(html.contains("layer 0: ") && html.contains("layer 1: "));
    let shown: String = html
        .split("<span class=\"t\"")
        .skip(1)
        .map(|s| {
            let text = &s[s.find('>').unwrap() + 1..s.find("</span>").unwrap()];
            text.replace("↵<br>", "\n")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&amp;", "&")
        })
        .collect();
    assert_eq!(shown, tokenizer.decode(&data.tokens[..70], false).unwrap());
    let path = temp_dir("token-map.html");
    write_token_map(&path, &model, rule, &data, &tokenizer, &options).unwrap();
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .starts_with("<!DOCTYPE html>"));
    std::fs::remove_file(path).ok();
    // Zero tokens is a typed error.
    let zero = TokenMapOptions {
        tokens: 0,
        ..options
    };
    assert!(matches!(
        token_map(&model, rule, &data, &zero),
        Err(TrainError::Config(_))
    ));
}

#[test]
fn resuming_gives_the_same_adapter_and_metrics_as_an_uninterrupted_run() {
    let config = small_config(20).with_task_loss(TaskLoss::Both);
    let whole = temp_dir("whole");
    let run = |dir: &Path, config: &TrainConfig| train_tiny(config, dir).unwrap();
    let uninterrupted = run(&whole, &config);
    let split = temp_dir("split");
    run(&split, &config.clone().with_steps(10));
    let resumed = run(&split, &config);
    assert_eq!(resumed.resumed_from, 10);
    assert_eq!(resumed.history, uninterrupted.history);
    assert_eq!(
        adapter_tensors(resumed.adapter.as_ref().unwrap()),
        adapter_tensors(uninterrupted.adapter.as_ref().unwrap())
    );
    // Other settings in the same folder are refused, naming the checkpoint.
    let err = train_tiny(&config.clone().with_lambda(0.5), &split).unwrap_err();
    assert!(matches!(err, TrainError::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("other settings"), "{err}");
    refuses_other_inputs(&split, &config);
    std::fs::remove_dir_all(whole).ok();
    std::fs::remove_dir_all(split).ok();
}

/// A checkpoint folder is refused for another model or other text (with the same settings),
/// naming what differs, and nothing in it is touched.
fn refuses_other_inputs(dir: &Path, config: &TrainConfig) {
    let before = std::fs::read(dir.join("train_config.json")).unwrap();
    let attempt = |model: &Path, data: &TokenData| {
        train::<AB>(
            model,
            data,
            &config.clone().with_steps(30),
            dir,
            &Default::default(),
            &mut |_, _| {},
        )
        .unwrap_err()
    };
    // Other text: the first half of the corpus.
    let mut half = corpus();
    half.tokens.truncate(half.tokens.len() / 2);
    let err = attempt(&tiny_model(), &half);
    assert!(matches!(err, TrainError::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("training data differs"), "{err}");
    assert!(
        !err.to_string().contains("model's"),
        "only the data differs: {err}"
    );
    // Another model: the same folder with one config value changed.
    let other = temp_dir("other-model");
    std::fs::create_dir_all(&other).unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), other.join(entry.file_name())).unwrap();
    }
    let config_json = std::fs::read_to_string(other.join("config.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&config_json).unwrap();
    value["rms_norm_eps"] = serde_json::json!(1e-3);
    std::fs::write(other.join("config.json"), value.to_string()).unwrap();
    let err = attempt(&other, &corpus());
    assert!(err.to_string().contains("config.json differs"), "{err}");
    assert!(!err.to_string().contains("data differs"), "{err}");
    assert_eq!(
        std::fs::read(dir.join("train_config.json")).unwrap(),
        before,
        "a refused run leaves the folder as it was"
    );
    // The same model elsewhere, with an adapter saved into its folder: the same inputs, resumed.
    std::fs::write(other.join("config.json"), config_json).unwrap();
    std::fs::copy(
        dir.join("adapter.safetensors"),
        other.join("beam-adapter.safetensors"),
    )
    .unwrap();
    let resumed = train::<AB>(
        &other,
        &corpus(),
        &config.clone().with_steps(22),
        dir,
        &Default::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(resumed.resumed_from, 20);
    std::fs::remove_dir_all(other).ok();
}

fn train_args(out: &Path) -> Vec<String> {
    let root = repo_root();
    [
        "train",
        "--model",
        tiny_model().to_str().unwrap(),
        "--data",
        root.join("assets/corpus/kjv-valid.txt.gz")
            .to_str()
            .unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "60",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--lr",
        "0.05",
        "--lambda",
        "1",
        "--checkpoint-every",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn a_cli_run_killed_at_random_moments_resumes_to_the_uninterrupted_result() {
    let beam = env!("CARGO_BIN_EXE_beam");
    let whole = temp_dir("cli-whole");
    let start = Instant::now();
    let status = Command::new(beam)
        .args(train_args(&whole))
        .output()
        .unwrap();
    assert!(status.status.success());
    let duration = start.elapsed();

    // SIGKILL (no chance to clean up) at random moments of a run that checkpoints every step:
    // before the first checkpoint, inside a save (temporary folder, rename, `latest`), between
    // saves. Each kill is followed by a restart of the same command, which resumes from whatever
    // the kill left behind, and is killed again in turn.
    let killed = temp_dir("cli-killed");
    let latest_state = |dir: &Path| {
        checkpoint::load_latest(dir)
            .unwrap()
            .map_or(0, |files| files.state.step)
    };
    let mut rng = common::Rng::new(4);
    let mut kills = Vec::new();
    for kill in 0..6 {
        let mut child = Command::new(beam)
            .args(train_args(&killed))
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // The first kill lands during start-up, the others each a few steps further on.
        let at = if kill == 0 {
            0.005
        } else {
            0.03 + 0.2 * rng.uniform()
        };
        std::thread::sleep(duration.mul_f64(at));
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever the moment, the folder holds a readable checkpoint or none.
        kills.push(latest_state(&killed));
    }
    eprintln!("checkpoint step after each kill: {kills:?}");
    assert!(
        kills.iter().any(|&step| step > 0 && step < 60),
        "kills landed mid-run: {kills:?}"
    );
    let out = Command::new(beam)
        .args(train_args(&killed))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resumed from step"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        adapter_tensors(&killed.join("adapter.safetensors")),
        adapter_tensors(&whole.join("adapter.safetensors"))
    );
    let history = |dir: &Path| {
        checkpoint::load_latest(dir)
            .unwrap()
            .expect("a checkpoint")
            .state
            .history
    };
    assert_eq!(history(&killed), history(&whole));
    // The trained adapter drives `beam generate`, which reports fewer than K experts per token.
    let gen = Command::new(beam)
        .args([
            "generate",
            "--model",
            tiny_model().to_str().unwrap(),
            "--beam-adapter",
            killed.join("adapter.safetensors").to_str().unwrap(),
            "--prompt",
            "And God said",
            "--max-new-tokens",
            "4",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&gen.stderr);
    assert!(gen.status.success(), "{stderr}");
    assert!(stderr.contains("(BEAM)"), "{stderr}");
    std::fs::remove_dir_all(whole).ok();
    std::fs::remove_dir_all(killed).ok();
}

#[test]
fn evaluation_matches_a_float64_computation_from_the_logits() {
    let device = Default::default();
    let model = load_model::<B>(tiny_model(), &device).unwrap();
    let data = corpus();
    let options = EvalOptions {
        seq_len: 24,
        batch_size: 2,
        max_tokens: Some(96),
    };
    let report = evaluate(&model, &data, MaskMode::TopK, &options, "top-k").unwrap();
    assert_eq!(report.tokens, 96);
    let (mut nll, mut hits) = (0.0f64, 0usize);
    for window in 0..4 {
        let ids: Vec<i64> = data.tokens[window * 24..window * 24 + 25]
            .iter()
            .map(|&t| t as i64)
            .collect();
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids[..24].to_vec(), [1, 24]), &device);
        let logits = common::values(
            model
                .forward(input, None, MaskMode::TopK, HiddenStates::Skip)
                .logits,
        );
        for (t, row) in logits.chunks(300).enumerate() {
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
            let target = ids[t + 1] as usize;
            nll += log_sum - row[target];
            let argmax = (0..300).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            hits += usize::from(argmax == target);
        }
    }
    let expected_loss = nll / 96.0;
    assert!(
        (report.loss - expected_loss).abs() < 1e-5,
        "loss {} vs {expected_loss}",
        report.loss
    );
    assert!((report.perplexity - expected_loss.exp()).abs() < 1e-3);
    assert_eq!(report.next_token_accuracy, hits as f64 / 96.0);
    assert_eq!(report.moe_flops_reduction, 0.0);
    assert_eq!(report.per_layer_active_experts, vec![2.0, 2.0]);
}

#[test]
fn peers_reduce_experts_monotonically_and_never_below_one() {
    let device = Default::default();
    let model = load_model::<B>(tiny_model(), &device).unwrap();
    let data = corpus();
    let options = EvalOptions {
        seq_len: 32,
        batch_size: 4,
        max_tokens: Some(128),
    };
    let mut reports = vec![evaluate(&model, &data, MaskMode::TopK, &options, "top-k").unwrap()];
    let mut last = f64::INFINITY;
    for beta in [0.0, 0.5, 0.9, 1.0] {
        let r = evaluate(
            &model,
            &data,
            MaskMode::Rule(MaskRule::DynamicSkip { beta }),
            &options,
            "skip",
        )
        .unwrap();
        assert!(r.mean_active_experts <= last && r.mean_active_experts >= 1.0);
        last = r.mean_active_experts;
        reports.push(r);
    }
    assert_eq!(reports[1].mean_active_experts, 2.0);
    assert!(reports[4].mean_active_experts < 1.1);
    // Interpolation stays within the evaluated range of the method.
    let mid = 0.5 * (reports[2].moe_flops_reduction + reports[3].moe_flops_reduction);
    let acc = interpolate_accuracy(&reports, "dynamic-skip", mid).unwrap();
    let (lo, hi) = (
        reports[2]
            .next_token_accuracy
            .min(reports[3].next_token_accuracy),
        reports[2]
            .next_token_accuracy
            .max(reports[3].next_token_accuracy),
    );
    assert!(acc >= lo - 1e-12 && acc <= hi + 1e-12);
    assert_eq!(interpolate_accuracy(&reports, "dynamic-skip", 0.99), None);

    // The charts are written as PNG files.
    let dir = temp_dir("plots");
    std::fs::create_dir_all(&dir).unwrap();
    beam_train::plot::quality_vs_flops(
        &dir.join("q.png"),
        &reports,
        beam_train::plot::Quality::NextTokenAccuracy,
        "test",
    )
    .unwrap();
    // Without choice accuracies there is nothing to plot: a typed error, not an empty chart.
    assert!(matches!(
        beam_train::plot::quality_vs_flops(
            &dir.join("c.png"),
            &reports,
            beam_train::plot::Quality::ChoiceAccuracy,
            "test",
        ),
        Err(beam_train::TrainError::Plot { .. })
    ));
    beam_train::plot::experts_per_layer(&dir.join("l.png"), &reports[..2], "test").unwrap();
    for f in ["q.png", "l.png"] {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        assert!(bytes.len() > 1000 && bytes.starts_with(b"\x89PNG"), "{f}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// The multiple-choice task metric on the shipped KJV model: items are deterministic and well
/// formed, batched (right-padded) scores equal an f64 computation on each sequence alone, and the
/// trained model is far above chance (0.25) with top-K and with its BEAM adapter (200 items in
/// a release build: top-K 0.71, BEAM 0.665).
#[test]
fn multiple_choice_items_scores_and_accuracy() {
    use beam_train::choice::{choice_items, ending_scores, evaluate_choice, ChoiceOptions};
    let dir = repo_root().join("assets/models/kjv-moe");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text =
        beam_train::data::read_text(&repo_root().join("assets/corpus/kjv-valid.txt.gz")).unwrap();
    // 32 items keep the debug-build test short; the selection is fixed (seeded), so the
    // accuracies below are deterministic regression guards, not samples.
    let options = ChoiceOptions {
        max_items: Some(32),
        ..ChoiceOptions::default()
    };
    let items = choice_items(&text, &tokenizer, &options).unwrap();
    assert_eq!(items, choice_items(&text, &tokenizer, &options).unwrap());
    let all = choice_items(
        &text,
        &tokenizer,
        &ChoiceOptions {
            max_items: None,
            ..options
        },
    )
    .unwrap();
    assert!(
        all.len() >= 2000,
        "{} items in the held-out split",
        all.len()
    );
    assert_eq!(items.len(), 32);
    let mut positions = [0usize; 4];
    for item in &items {
        assert_eq!(item.endings.len(), 4);
        positions[item.answer] += 1;
        for (i, a) in item.endings.iter().enumerate() {
            assert!(
                item.endings[i + 1..].iter().all(|b| b != a),
                "distinct endings"
            );
        }
    }
    assert!(
        positions.iter().all(|&n| n >= 3),
        "answer positions {positions:?}"
    );

    let base = load_model::<B>(&dir, &Default::default()).unwrap();
    // Batched, padded scores against each sequence alone, in f64 from its logits.
    let sequences: Vec<(&[u32], &[u32])> = items[..3]
        .iter()
        .flat_map(|i| i.endings.iter().map(move |e| (&i.context[..], &e[..])))
        .collect();
    let batched = ending_scores(&base, &sequences, MaskMode::TopK, 5);
    for ((context, ending), got) in sequences.iter().zip(&batched) {
        let tokens: Vec<i64> = context
            .iter()
            .chain(ending.iter())
            .map(|&t| t as i64)
            .collect();
        let n = tokens.len() - 1;
        let input = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens[..n].to_vec(), [1, n]),
            &Default::default(),
        );
        let logits = base
            .forward(input, None, MaskMode::TopK, HiddenStates::Skip)
            .logits;
        let v = logits.dims()[2];
        let values = common::values(logits);
        let mut sum = 0.0;
        for t in context.len() - 1..n {
            let row = &values[t * v..(t + 1) * v];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_z = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            sum += row[tokens[t + 1] as usize] - log_z;
        }
        let want = sum / ending.len() as f64;
        assert!((got - want).abs() < 1e-4, "batched {got} vs alone {want}");
    }

    let top_k = evaluate_choice(&base, &items, MaskMode::TopK, 32).unwrap();
    let beam = base
        .clone()
        .load_beam_adapter(dir.join("beam-adapter.safetensors"), &Default::default())
        .unwrap();
    let masked = evaluate_choice(&beam, &items, MaskMode::Learned, 32).unwrap();
    eprintln!(
        "choice accuracy on 32 items: top-K {}, BEAM {}",
        top_k.accuracy, masked.accuracy
    );
    assert!(top_k.accuracy > 0.5, "top-K {}", top_k.accuracy);
    assert!(masked.accuracy > 0.5, "BEAM {}", masked.accuracy);
}

/// BEAM on DeepSeek through the CLI: `beam train` on the tiny DeepSeek-V3 (MLA, a dense first
/// layer, an ungated shared expert, 16 routed experts top-4 in groups) learns to drop routed
/// experts; `beam eval` and `beam generate --beam-adapter` use the adapter. Only routed slots are
/// masked: the shared expert's FLOPs stay, so the MoE FLOPs cut is below the routed-expert cut.
#[test]
fn beam_trains_evaluates_and_generates_on_deepseek() {
    let beam = env!("CARGO_BIN_EXE_beam");
    let model = repo_root().join("assets/models/tiny-deepseek_v3");
    let data = repo_root().join("assets/corpus/kjv-valid.txt.gz");
    let out = temp_dir("deepseek");
    let run = |args: &[&str]| {
        let output = Command::new(beam).args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    };
    let (model, data, out_str) = (
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    run(&[
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out_str,
        "--steps",
        "30",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--lr",
        "0.05",
        "--lambda",
        "1",
    ]);
    let adapter = out.join("adapter.safetensors");
    assert!(adapter.exists());
    let json = out.join("eval.json");
    run(&[
        "eval",
        "--model",
        model,
        "--data",
        data,
        "--adapter",
        adapter.to_str().unwrap(),
        "--seq-len",
        "32",
        "--max-tokens",
        "256",
        "--json",
        json.to_str().unwrap(),
    ]);
    let reports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let by_method = |name: &str| {
        reports
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["method"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {reports}"))
            .clone()
    };
    let (top_k, learned) = (by_method("top-k"), by_method("beam"));
    assert_eq!(top_k["mean_active_experts"].as_f64(), Some(4.0));
    let active = learned["mean_active_experts"].as_f64().unwrap();
    assert!(active < 3.0, "experts per token {active}");
    let cut = learned["moe_flops_reduction"].as_f64().unwrap();
    let routed_cut = 1.0 - active / 4.0;
    assert!(
        cut > 0.0 && cut < routed_cut,
        "MoE FLOPs cut {cut}, routed {routed_cut}"
    );
    let generated = run(&[
        "generate",
        "--model",
        model,
        "--beam-adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "And God said",
        "--max-new-tokens",
        "6",
    ]);
    let summary = String::from_utf8_lossy(&generated.stderr);
    assert!(
        summary.contains("(BEAM)") && summary.contains("compressed latent"),
        "{summary}"
    );
    std::fs::remove_dir_all(out).ok();
}
