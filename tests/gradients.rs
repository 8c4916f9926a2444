//! Gradients of the BEAM layer under `Autodiff<NdArray<f64>>`:
//! - the straight-through gradient reaching the mask router equals its analytic form
//!   `∂L/∂z_k = w_k · ⟨∂L/∂y, Expert_{i_k}(x)⟩ · p_k (1 − p_k)`, masked slots included;
//! - gradients w.r.t. experts, router, shared expert and input equal central finite differences;
//! - the grouped dispatch's gradients equal the dense formulation's.
//!
//! Everything here runs on `NdArray<f64>`, alone in this test binary: burn 0.21 keeps one
//! device-settings entry for `NdArray<f32>` and `NdArray<f64>` (same device type), so the first
//! backend used in a process fixes the float dtype for both. Do not add f32 tests to this file.

mod common;

use beam_model::grouped_experts;
use beam_model::kernels::reference::{dense_experts_reference, swiglu};
use beam_model::{
    BeamMaskConfig, BeamMoe, BeamMoeConfig, MaskSource, RoutingRule, SharedExpertConfig,
};
use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use common::{assert_close, int_values, ints, values, Rng};

type Inner = NdArray<f64>;
type AD = Autodiff<Inner>;

fn weighted_sum<B: Backend>(y: Tensor<B, 3>, g: Tensor<B, 3>) -> Tensor<B, 1> {
    (y * g).sum()
}

#[test]
fn ste_gradient_reaches_mask_router_in_analytic_form() {
    let device = Default::default();
    let (h, i, e, k) = (8, 5, 6, 3);
    let config = BeamMoeConfig::new(h, i, e, k).with_init_std(0.4);
    let mut layer = config.init::<AD>(&device);
    let mut rng = Rng::new(11);
    let mask_router = layer.mask_router.as_mut().unwrap();
    mask_router.proj.weight = Param::from_tensor(rng.tensor([h, e], 1.0, &device));
    mask_router.proj.bias = Some(Param::from_tensor(rng.tensor([e], 0.5, &device)));
    let x = rng.tensor::<AD, 3>([2, 7, h], 1.0, &device);
    let g = rng.tensor::<AD, 3>([2, 7, h], 1.0, &device);

    let out = layer.forward(x.clone());
    let mask = values(out.facts.mask.clone());
    assert!(
        mask.contains(&0.0) && mask.contains(&1.0),
        "need kept and masked slots"
    );
    let grads = weighted_sum(out.output, g.clone()).backward();
    let mask_router = layer.mask_router.as_ref().unwrap();
    let bias_grad = values(
        mask_router
            .proj
            .bias
            .as_ref()
            .unwrap()
            .val()
            .grad(&grads)
            .unwrap(),
    );
    let weight_grad = values(mask_router.proj.weight.val().grad(&grads).unwrap());

    // Analytic: D[t, e] = ⟨g_t, Expert_e(x_t)⟩ for every expert, then the chain rule by hand.
    let t = 14;
    let (x2, g2) = (x.inner().reshape([t, h]), g.inner().reshape([t, h]));
    let gate_up = layer.experts.gate_up.val().inner();
    let down = layer.experts.down.val().inner();
    let dot: Vec<Vec<f64>> = (0..e)
        .map(|ex| {
            let y = swiglu(
                x2.clone(),
                gate_up.clone().narrow(0, ex, 1).reshape([2 * i, h]),
                down.clone().narrow(0, ex, 1).reshape([h, i]),
            );
            values((y * g2.clone()).sum_dim(1))
        })
        .collect();
    let ids = int_values(out.facts.expert_ids.inner());
    let w = values(out.facts.topk_weights.inner());
    let p = values(out.facts.mask_probs.unwrap().inner());
    let xs = values(x2);
    let mut expected_bias = vec![0.0; e];
    let mut expected_weight = vec![0.0; h * e];
    for slot in 0..t * k {
        let (token, expert) = (slot / k, ids[slot] as usize);
        let dz = w[slot] * dot[expert][token] * p[slot] * (1.0 - p[slot]);
        expected_bias[expert] += dz;
        for d in 0..h {
            expected_weight[d * e + expert] += xs[token * h + d] * dz;
        }
    }
    assert_close(
        &bias_grad,
        &expected_bias,
        1e-10,
        "mask-router bias gradient",
    );
    assert_close(
        &weight_grad,
        &expected_weight,
        1e-10,
        "mask-router weight gradient",
    );
}

#[test]
fn ste_mask_is_exactly_hard_forward_and_sigmoid_backward() {
    let device = Default::default();
    let z = Tensor::<AD, 2>::from_data(
        TensorData::new(vec![-2.0, -0.1, 0.0, 0.3, 1.7, 5.0], [2, 3]),
        &device,
    )
    .require_grad();
    let c = Tensor::<AD, 2>::from_data(
        TensorData::new(vec![1.0, -2.0, 0.5, 3.0, -1.0, 2.0], [2, 3]),
        &device,
    );
    let p = burn::tensor::activation::sigmoid(z.clone());
    let hard = p.clone().detach().greater_elem(0.5).float();
    let ste = beam_model::mask::straight_through(hard, p.clone());
    assert_eq!(
        values(ste.clone().inner()),
        vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    );
    let grads = (ste * c.clone()).sum().backward();
    let pv = values(p.inner());
    let expected: Vec<f64> = values(c.inner())
        .iter()
        .zip(&pv)
        .map(|(c, p)| c * p * (1.0 - p))
        .collect();
    assert_close(&values(z.grad(&grads).unwrap()), &expected, 1e-15, "dm/dz");
}

#[test]
fn ste_gradient_is_absent_when_masks_are_external_or_top_k() {
    let device = Default::default();
    let layer = BeamMoeConfig::new(8, 4, 4, 2).init::<AD>(&device);
    let mut rng = Rng::new(3);
    let x = rng.tensor::<AD, 3>([1, 5, 8], 1.0, &device);
    let out = layer.forward_with(x, MaskSource::TopK);
    let grads = out.output.sum().backward();
    assert!(layer
        .mask_router
        .as_ref()
        .unwrap()
        .proj
        .weight
        .val()
        .grad(&grads)
        .is_none());
    assert!(layer.experts.gate_up.val().grad(&grads).is_some());
}

/// Which tensor a finite-difference probe perturbs.
#[derive(Debug, Clone, Copy)]
enum Target {
    GateUp,
    Down,
    Router,
    SharedGateUp,
    SharedGate,
    Input,
}

fn perturb(
    layer: &BeamMoe<Inner>,
    x: &Tensor<Inner, 3>,
    target: Target,
    index: usize,
    eps: f64,
) -> (BeamMoe<Inner>, Tensor<Inner, 3>) {
    fn bump<const D: usize>(t: Tensor<Inner, D>, index: usize, eps: f64) -> Tensor<Inner, D> {
        let shape = t.shape();
        let mut v = values(t.clone());
        v[index] += eps;
        Tensor::from_data(TensorData::new(v, shape), &t.device())
    }
    let mut layer = layer.clone();
    let mut x = x.clone();
    match target {
        Target::GateUp => {
            layer.experts.gate_up = bump(layer.experts.gate_up.val(), index, eps).into()
        }
        Target::Down => layer.experts.down = bump(layer.experts.down.val(), index, eps).into(),
        Target::Router => {
            layer.router.weight = Param::from_tensor(bump(layer.router.weight.val(), index, eps))
        }
        Target::SharedGateUp => {
            let shared = layer.shared_expert.as_mut().unwrap();
            shared.gate_up = bump(shared.gate_up.val(), index, eps).into();
        }
        Target::SharedGate => {
            let shared = layer.shared_expert.as_mut().unwrap();
            shared.gate = Some(Param::from_tensor(bump(
                shared.gate.as_ref().unwrap().val(),
                index,
                eps,
            )));
        }
        Target::Input => x = bump(x, index, eps),
    }
    (layer, x)
}

#[test]
fn gradients_match_finite_differences() {
    for (renormalize, routing) in [
        (true, RoutingRule::softmax(false)),
        (false, RoutingRule::mixtral()),
        (
            true,
            RoutingRule::DeepSeekV3 {
                group: beam_model::GroupLimit::new(2, 1),
                normalize_top_k: true,
                routed_scaling_factor: 2.0,
            },
        ),
    ] {
        let device = Default::default();
        let (h, i, e, k) = (6, 4, 6, 3);
        let config = BeamMoeConfig::new(h, i, e, k)
            .with_init_std(0.5)
            .with_routing(routing.clone())
            .with_shared_expert(Some(SharedExpertConfig::new(3).with_gated(true)))
            .with_beam(Some(BeamMaskConfig::new().with_renormalize(renormalize)));
        let layer = config.init::<AD>(&device);
        let mut rng = Rng::new(21);
        let x = rng.tensor::<AD, 3>([1, 6, h], 1.0, &device).require_grad();
        let g = rng.tensor::<AD, 3>([1, 6, h], 1.0, &device);
        // A fixed partial mask (one token fully masked): a hard mask has no derivative, so the
        // finite differences see exactly the function autodiff differentiates.
        let mask: Vec<f64> = (0..6 * k)
            .map(|s| {
                if s < k {
                    0.0
                } else {
                    (rng.uniform() < 0.6) as u8 as f64
                }
            })
            .collect();
        let mask = Tensor::<AD, 3>::from_data(TensorData::new(mask, [1, 6, k]), &device);
        let out = layer.forward_with(x.clone(), MaskSource::External(mask.clone()));
        let grads = weighted_sum(out.output, g.clone()).backward();

        let inner = {
            use burn::module::AutodiffModule;
            layer.valid()
        };
        let (x_in, g_in, mask_in) = (x.clone().inner(), g.inner(), mask.inner());
        let loss = |layer: &BeamMoe<Inner>, x: Tensor<Inner, 3>| {
            values(weighted_sum(
                layer
                    .forward_with(x, MaskSource::External(mask_in.clone()))
                    .output,
                g_in.clone(),
            ))[0]
        };
        let shared = layer.shared_expert.as_ref().unwrap();
        for (target, grad) in [
            (
                Target::GateUp,
                values(layer.experts.gate_up.val().grad(&grads).unwrap()),
            ),
            (
                Target::Down,
                values(layer.experts.down.val().grad(&grads).unwrap()),
            ),
            (
                Target::Router,
                values(layer.router.weight.val().grad(&grads).unwrap()),
            ),
            (
                Target::SharedGateUp,
                values(shared.gate_up.val().grad(&grads).unwrap()),
            ),
            (
                Target::SharedGate,
                values(shared.gate.as_ref().unwrap().val().grad(&grads).unwrap()),
            ),
            (Target::Input, values(x.grad(&grads).unwrap())),
        ] {
            assert!(
                grad.iter().any(|v| *v != 0.0),
                "{target:?}: gradient is all zero"
            );
            let eps = 1e-6;
            for _ in 0..8 {
                let index = rng.below(grad.len());
                let (plus_layer, plus_x) = perturb(&inner, &x_in, target, index, eps);
                let (minus_layer, minus_x) = perturb(&inner, &x_in, target, index, -eps);
                let fd = (loss(&plus_layer, plus_x) - loss(&minus_layer, minus_x)) / (2.0 * eps);
                assert!(
                    (fd - grad[index]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "{routing:?} renorm={renormalize} {target:?}[{index}]: autodiff {} vs finite difference {fd}",
                    grad[index]
                );
            }
        }
    }
}

#[test]
fn grouped_dispatch_gradients_equal_dense_formulation() {
    let device = Default::default();
    let (t, k, e, h, i) = (9, 2, 5, 6, 4);
    let mut rng = Rng::new(8);
    let ids: Vec<i64> = (0..t * k)
        .map(|_| {
            if rng.uniform() < 0.3 {
                e as i64
            } else {
                rng.below(e) as i64
            }
        })
        .collect();
    let ids = ints::<AD, 2>(ids, [t, k], &device);
    let x = rng.tensor::<AD, 2>([t, h], 1.0, &device).require_grad();
    let w = rng.tensor::<AD, 2>([t, k], 0.5, &device).require_grad();
    let gate_up = rng
        .tensor::<AD, 3>([e, 2 * i, h], 0.4, &device)
        .require_grad();
    let down = rng.tensor::<AD, 3>([e, h, i], 0.4, &device).require_grad();
    let c = rng.tensor::<AD, 2>([t, h], 1.0, &device);
    let grads_of = |y: Tensor<AD, 2>| {
        let grads = (y * c.clone()).sum().backward();
        [
            values(x.grad(&grads).unwrap()),
            values(w.grad(&grads).unwrap()),
            values(gate_up.grad(&grads).unwrap()),
            values(down.grad(&grads).unwrap()),
        ]
    };
    let grouped = grads_of(grouped_experts(
        x.clone(),
        ids.clone(),
        w.clone(),
        gate_up.clone(),
        down.clone(),
    ));
    let dense = grads_of(dense_experts_reference(
        x.clone(),
        ids,
        w.clone(),
        gate_up.clone(),
        down.clone(),
    ));
    for (name, (a, b)) in ["x", "weights", "gate_up", "down"]
        .iter()
        .zip(grouped.iter().zip(&dense))
    {
        assert_close(a, b, 1e-12, name);
    }
}

#[test]
fn precise_activations_match_the_closed_form_in_f64() {
    use beam_model::activation::{sigmoid, silu};
    let xs: [f64; 7] = [-40.0, -3.0, -0.5, 0.0, 1e-3, 2.5, 40.0];
    let t = Tensor::<Inner, 1>::from_data(
        TensorData::new(xs.to_vec(), [xs.len()]),
        &Default::default(),
    );
    assert_eq!(t.dtype(), burn::tensor::DType::F64);
    let s = values(sigmoid(t.clone()));
    let y = values(silu(t));
    for ((x, s), y) in xs.iter().zip(s).zip(y) {
        let exact = 1.0 / (1.0 + (-x).exp());
        assert!(
            (s - exact).abs() < 1e-15,
            "sigmoid({x}) = {s}, expected {exact}"
        );
        assert!((y - x * exact).abs() < 1e-13, "silu({x})");
    }
}
