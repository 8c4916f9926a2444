//! The skipping dispatch (grouped by expert, masked slots dropped) against an independent dense
//! formulation (every expert on every token), on random inputs and random shapes.
//! Tolerance: 1e-5 absolute in f32 (values are O(1)).

mod common;

use beam_model::grouped_experts;
use beam_model::kernels::reference::{dense_experts_reference, grouped_experts_reference};
use beam_model::kernels::{flex, ndarray};
use beam_model::mask::drop_masked_slots;
use beam_model::{BeamMoeConfig, MaskSource};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Int, Tensor, TensorData};
use common::{assert_close, ints, values, Rng};
use proptest::prelude::*;

type B = NdArray<f32>;

struct Problem {
    x: Tensor<B, 2>,
    ids: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    gate_up: Tensor<B, 3>,
    down: Tensor<B, 3>,
}

/// Random problem; `route(rng, t, k)` picks the expert of slot k of token t (E = sentinel).
fn problem(
    seed: u64,
    [t, k, e, h, i]: [usize; 5],
    mut route: impl FnMut(&mut Rng, usize, usize) -> usize,
) -> Problem {
    let device = Default::default();
    let mut rng = Rng::new(seed);
    let ids: Vec<i64> = (0..t * k)
        .map(|s| route(&mut rng, s / k, s % k) as i64)
        .collect();
    Problem {
        x: rng.tensor([t, h], 1.0, &device),
        ids: ints(ids, [t, k], &device),
        weights: rng.tensor([t, k], 0.5, &device),
        gate_up: rng.tensor([e, 2 * i, h], 0.3, &device),
        down: rng.tensor([e, h, i], 0.3, &device),
    }
}

fn check(p: &Problem, what: &str) {
    let grouped = grouped_experts(
        p.x.clone(),
        p.ids.clone(),
        p.weights.clone(),
        p.gate_up.clone(),
        p.down.clone(),
    );
    let dense = dense_experts_reference(
        p.x.clone(),
        p.ids.clone(),
        p.weights.clone(),
        p.gate_up.clone(),
        p.down.clone(),
    );
    let (g, d) = (values(grouped), values(dense));
    if d.iter().all(|v| *v == 0.0) {
        // Everything masked: exactly zero, and no NaN.
        assert!(
            g.iter().all(|v| *v == 0.0),
            "{what}: all-masked output must be 0"
        );
    } else {
        assert_close(&g, &d, 1e-5, what);
    }
}

#[test]
fn grouped_equals_dense_with_masked_slots() {
    // ~40% of slots masked (sentinel E = 8).
    let p = problem(1, [33, 4, 8, 24, 16], |rng, _, _| {
        if rng.uniform() < 0.4 {
            8
        } else {
            rng.below(8)
        }
    });
    check(&p, "random routing with sentinels");
}

#[test]
fn grouped_equals_dense_with_imbalanced_routing_and_idle_experts() {
    // Every token on expert 2 in slot 0, experts 5..8 never used, slot 1 spread over 0..3.
    let p = problem(
        2,
        [40, 2, 8, 16, 8],
        |rng, _, k| if k == 0 { 2 } else { rng.below(3) },
    );
    check(&p, "imbalanced");
    // A single token, a single slot.
    let p = problem(3, [1, 1, 4, 8, 4], |_, _, _| 3);
    check(&p, "one token");
}

#[test]
fn all_masked_gives_exact_zero() {
    let p = problem(4, [5, 3, 6, 8, 4], |_, _, _| 6);
    let out = grouped_experts(p.x, p.ids, p.weights, p.gate_up, p.down);
    assert_eq!(values(out), vec![0.0; 5 * 8]);
}

#[test]
fn masked_experts_read_no_weights() {
    // Up to 256 kept pairs per routed expert: the host GEMVs (decode, a masked prefill); 1000
    // tokens keep ~375 per expert: the reference (ndarray's / Flex's matmul), where masked
    // experts must be skipped too.
    for t in [8, 12, 1000] {
        let kept = masked_experts_read_no_weights_at::<B>(t);
        masked_experts_read_no_weights_at::<burn::backend::Flex>(t);
        // Mean kept pairs per routed expert, against both backends' switch-over points.
        let per_expert = kept / 4;
        let (ndarray_max, flex_max) = (
            ndarray::HOST_MAX_PAIRS_PER_EXPERT,
            flex::HOST_MAX_PAIRS_PER_EXPERT,
        );
        let host = per_expert <= ndarray_max.min(flex_max);
        let reference = per_expert > ndarray_max.max(flex_max);
        assert!(
            if t == 1000 { reference } else { host },
            "T {t}: {per_expert}"
        );
    }
}

/// The kept pairs of a problem of `t` tokens where experts 4..8 are only reached through masked
/// slots and their weights are NaN; panics if the output differs from the dense reference on
/// clean weights. If dispatch touched them (even multiplied by a zero weight), NaN would leak
/// into the output.
fn masked_experts_read_no_weights_at<Bk: beam_model::MoeBackend>(t: usize) -> usize {
    let device = Default::default();
    let (k, e, h, i) = (3, 8, 8, 6);
    let mut rng = Rng::new(5);
    let ids: Vec<i64> = (0..t * k).map(|_| rng.below(e) as i64).collect();
    let kept = ids.iter().filter(|&&id| id < 4).count();
    let mask: Vec<f32> = ids
        .iter()
        .map(|&id| if id < 4 { 1.0 } else { 0.0 })
        .collect();
    let ids = ints::<Bk, 2>(ids, [t, k], &device);
    let mask = Tensor::<Bk, 2>::from_data(TensorData::new(mask, [t, k]), &device);
    let x = rng.tensor::<Bk, 2>([t, h], 1.0, &device);
    let weights = rng.tensor::<Bk, 2>([t, k], 0.5, &device) * mask.clone();
    let clean_gate_up = rng.tensor::<Bk, 3>([e, 2 * i, h], 0.3, &device);
    let clean_down = rng.tensor::<Bk, 3>([e, h, i], 0.3, &device);
    let poison = |w: Tensor<Bk, 3>| {
        let [_, r, c] = w.dims();
        let nan = Tensor::<Bk, 3>::full([e - 4, r, c], f32::NAN, &device);
        Tensor::cat(vec![w.narrow(0, 0, 4), nan], 0)
    };
    let dispatch_ids = drop_masked_slots(ids.clone(), mask, e);
    let expected = values(dense_experts_reference(
        x.clone(),
        ids,
        weights.clone(),
        clean_gate_up.clone(),
        clean_down.clone(),
    ));
    let out = grouped_experts(
        x.clone(),
        dispatch_ids.clone(),
        weights.clone(),
        poison(clean_gate_up.clone()),
        poison(clean_down.clone()),
    );
    let what = format!("T {t}: poisoned masked experts");
    assert_close(&values(out), &expected, 1e-5, &what);
    // The reference itself (what the backends fall back to) skips them as well.
    let reference = grouped_experts_reference(
        x,
        dispatch_ids,
        weights,
        poison(clean_gate_up),
        poison(clean_down),
    );
    assert_close(&values(reference), &expected, 1e-5, &what);
    kept
}

#[test]
fn layer_skip_path_equals_autodiff_evaluate_all_path() {
    // Inference drops masked slots; autodiff evaluates them with weight 0 for the STE. Same value.
    let device = Default::default();
    let config = BeamMoeConfig::new(16, 8, 8, 3);
    let mut layer = config.init::<Autodiff<B>>(&device);
    let mut rng = Rng::new(6);
    // Random mask-router weights so that roughly half the slots are masked.
    layer.mask_router.as_mut().unwrap().proj.weight =
        burn::module::Param::from_tensor(rng.tensor([16, 8], 2.0, &device));
    let x = rng.tensor::<Autodiff<B>, 3>([2, 9, 16], 1.0, &device);
    let trained = layer.forward(x.clone());
    let kept = trained.facts.kept_pairs();
    assert!(kept > 0 && kept < 2 * 9 * 3, "mask is partial: {kept}");

    use burn::module::AutodiffModule;
    let inference = layer.valid().forward(x.clone().inner());
    assert_eq!(inference.facts.kept_pairs(), kept);
    assert_close(
        &values(trained.output.inner()),
        &values(inference.output.clone()),
        1e-6,
        "skip vs evaluate-all",
    );
    let external = layer.valid().forward_with(
        x.inner(),
        MaskSource::External(inference.facts.mask.clone()),
    );
    assert_eq!(values(external.output), values(inference.output));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn grouped_equals_dense_on_random_shapes(
        seed in any::<u64>(),
        t in 1usize..24,
        e in 1usize..10,
        k_frac in 0.0f64..1.0,
        h in 1usize..12,
        i in 1usize..10,
        masked in 0.0f64..1.0,
        hot in proptest::option::of(0usize..10),
    ) {
        let k = 1 + ((e - 1) as f64 * k_frac) as usize;
        // Optional hot expert taking most slots (imbalance); `masked` fraction of sentinels.
        let p = problem(seed, [t, k, e, h, i], |rng, _, _| {
            if rng.uniform() < masked { e }
            else if let Some(hot) = hot.filter(|_| rng.uniform() < 0.7) { hot % e }
            else { rng.below(e) }
        });
        check(&p, &format!("T={t} K={k} E={e} H={h} I={i}"));
        // The public entry point on ndarray (host GEMV for decode shapes, the reference for
        // prefill) equals the reference.
        let a = grouped_experts(p.x.clone(), p.ids.clone(), p.weights.clone(), p.gate_up.clone(), p.down.clone());
        let b = grouped_experts_reference(p.x, p.ids, p.weights, p.gate_up, p.down);
        let (a, b) = (values(a), values(b));
        if b.iter().all(|v| *v == 0.0) {
            prop_assert!(a.iter().all(|v| *v == 0.0), "all masked: exactly 0");
        } else {
            assert_close(&a, &b, 1e-5, "entry point vs reference");
        }
    }
}
