//! Build a BEAM MoE layer, train only its mask router for a few steps, and see experts switch off.
//!
//! ```text
//! cargo run --release --example beam_layer [-- --steps 150 --lambda 0.3 --lr 0.02]
//! ```
//!
//! The base router and experts are frozen; the mask router learns, through the straight-through
//! estimator, to drop the (token, expert) pairs that matter least, under the objective
//! `‖y_beam − y_topk‖² / ‖y_topk‖² + λ · L_sparse` (distillation to the frozen top-K layer plus the
//! sparsity term). Held-out tokens then run on the plain ndarray backend, where masked experts are
//! skipped, and the example prints experts kept per token and MoE FLOPs saved.

use beam_model::{BeamMoe, BeamMoeConfig, MaskSource, RoutingRule};
use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

type Infer = NdArray<f32>;
type Train = Autodiff<Infer>;

/// Relative squared error of `y` against the top-K output.
fn relative_error<B: Backend>(y: Tensor<B, 3>, reference: Tensor<B, 3>) -> Tensor<B, 1> {
    (y - reference.clone()).powi_scalar(2).sum() / reference.powi_scalar(2).sum()
}

fn report(label: &str, layer: &BeamMoe<Infer>, config: &BeamMoeConfig, x: Tensor<Infer, 3>) {
    let beam = layer.forward(x.clone());
    let top_k = layer.forward_with(x, MaskSource::TopK);
    let flops = beam.facts.flops(config);
    let error: f32 = relative_error(beam.output, top_k.output).into_scalar();
    println!(
        "{label:<10} experts/token {:.2} of {}   MoE FLOPs cut {:>5.1}%   (routed {:>5.1}%)   output error vs top-K {:.4}",
        flops.mean_active_experts(),
        config.top_k,
        100.0 * flops.reduction(),
        100.0 * flops.routed_reduction(),
        error,
    );
}

struct Args {
    steps: usize,
    lambda: f64,
    lr: f64,
}

/// `--steps N --lambda λ --lr η` (defaults 150, 0.3, 0.02).
fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        steps: 150,
        lambda: 0.3,
        lr: 0.02,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |err: &dyn std::fmt::Display| format!("{flag}: cannot parse `{value}`: {err}");
        match flag.as_str() {
            "--steps" => args.steps = value.parse().map_err(|e| bad(&e))?,
            "--lambda" => args.lambda = value.parse().map_err(|e| bad(&e))?,
            "--lr" => args.lr = value.parse().map_err(|e| bad(&e))?,
            _ => {
                return Err(format!(
                    "unknown flag {flag} (expected --steps, --lambda, --lr)"
                ))
            }
        }
    }
    Ok(args)
}

fn main() {
    let args = parse_args().unwrap_or_else(|err| {
        eprintln!("error: {err}");
        std::process::exit(2);
    });
    let device = Default::default();
    Train::seed(&device, 7);
    // An OLMoE/Qwen3-like layer, scaled down: H = 64, I = 128, E = 16 experts, top-4.
    let config = BeamMoeConfig::new(64, 128, 16, 4)
        .with_routing(RoutingRule::softmax(true))
        .with_init_std(0.3);
    // Only the mask router trains (BEAM's default).
    let mut layer = config.init::<Train>(&device).freeze_base();

    let train_x = Tensor::<Train, 3>::random([16, 32, 64], Distribution::Normal(0.0, 1.0), &device);
    let held_out = Tensor::<Infer, 3>::random([8, 32, 64], Distribution::Normal(0.0, 1.0), &device);
    report("before", &layer.valid(), &config, held_out.clone());

    let teacher = layer
        .forward_with(train_x.clone(), MaskSource::TopK)
        .output
        .detach();
    let mut optimizer = AdamConfig::new().init();
    for step in 1..=args.steps {
        let out = layer.forward(train_x.clone());
        let distill = relative_error(out.output, teacher.clone());
        let loss = distill.clone() + out.facts.sparsity_loss.clone() * args.lambda;
        if step % 25 == 0 || step == 1 {
            println!(
                "step {step:>3}  loss {:.4}  distill {:.4}  experts/token {:.2}",
                loss.clone().into_scalar(),
                distill.into_scalar(),
                out.facts.mean_active_experts()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        layer = optimizer.step(args.lr, layer, grads);
    }
    report("after", &layer.valid(), &config, held_out);
}
