//! beam-kernels' cubecl kernels against their host references on random routing tables:
//! T ∈ {1, 3, 64, 1000}, E ∈ {8, 64}, K ∈ {1, 2, 8}, 0–100% of slots masked, skewed (imbalanced)
//! routing with experts that get no tokens, both regimes (GEMV decode, tiled prefill), every
//! scratch and output buffer poisoned with NaN / `u32::MAX` first so an unwritten element fails,
//! and the weights of idle experts (all slots masked, or never picked) NaN so a read one fails.
//!
//! wgpu (feature `wgpu`; in CI on the CPU through Mesa's lavapipe) and CUDA (feature `cuda`, run
//! on the GPU machine) share the cases.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;

use beam_kernels::reference::masked_moe_f64;
use beam_kernels::{compact_routes, masked_moe, MaskedMoeOptions, Regime};
use beam_kernels::{DispatchPlan, MoeDims};
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{FloatDType, Int, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use common::Rng;

type Cube<R> = CubeBackend<R, f32, i32, u32>;

/// A routing table: K distinct experts per token drawn with probability ∝ 1 / (e + 1)^1.2 from the
/// first three quarters of the experts (so the last quarter never gets a token), then each slot
/// masked (sentinel E) with probability `sparsity`.
fn routing(rng: &mut Rng, tokens: usize, top_k: usize, experts: usize, sparsity: f64) -> Vec<i64> {
    let eligible = (experts * 3 / 4).max(top_k);
    let popularity: Vec<f64> = (0..eligible).map(|e| (e as f64 + 1.0).powf(-1.2)).collect();
    let mut ids = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let mut chosen: Vec<usize> = Vec::with_capacity(top_k);
        while chosen.len() < top_k {
            let total: f64 = (0..eligible)
                .filter(|e| !chosen.contains(e))
                .map(|e| popularity[e])
                .sum();
            let mut draw = rng.uniform() * total;
            let pick = (0..eligible)
                .filter(|e| !chosen.contains(e))
                .find(|&e| {
                    draw -= popularity[e];
                    draw <= 0.0
                })
                .unwrap_or_else(|| (0..eligible).rev().find(|e| !chosen.contains(e)).unwrap());
            chosen.push(pick);
        }
        for e in chosen {
            let masked = rng.uniform() < sparsity;
            ids.push(if masked { experts as i64 } else { e as i64 });
        }
    }
    ids
}

fn uniform(rng: &mut Rng, len: usize, low: f64, high: f64) -> Vec<f32> {
    (0..len)
        .map(|_| (low + (high - low) * rng.uniform()) as f32)
        .collect()
}

fn float<R: CubeRuntime>(values: Vec<f32>, shape: Vec<usize>, device: &R::Device) -> CubeTensor<R> {
    let len = values.len();
    let flat = Tensor::<Cube<R>, 1>::from_data(TensorData::new(values, [len]), device);
    Cube::<R>::float_reshape(flat.into_primitive().tensor(), shape.into())
}

fn float_values<R: CubeRuntime>(tensor: CubeTensor<R>) -> Vec<f32> {
    Tensor::<Cube<R>, 1>::from_primitive(TensorPrimitive::Float(tensor))
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn ints<R: CubeRuntime>(values: Vec<i64>, shape: [usize; 2], device: &R::Device) -> CubeTensor<R> {
    Tensor::<Cube<R>, 2, Int>::from_data(TensorData::new(values, shape), device).into_primitive()
}

fn int_values<R: CubeRuntime>(tensor: CubeTensor<R>) -> Vec<i64> {
    Tensor::<Cube<R>, 1, Int>::from_primitive(tensor)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap()
}

const TOKENS: [usize; 4] = [1, 3, 64, 1000];
const EXPERTS: [usize; 2] = [8, 64];
const TOP_K: [usize; 3] = [1, 2, 8];
const SPARSITY: [f64; 4] = [0.0, 0.5, 0.85, 1.0];

fn compaction_matches_the_plan<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(7);
    let mut checked = 0;
    for tokens in TOKENS {
        for experts in EXPERTS {
            for top_k in TOP_K {
                for sparsity in SPARSITY {
                    let ids = routing(&mut rng, tokens, top_k, experts, sparsity);
                    let plan = DispatchPlan::from_ids(&ids, top_k, experts);
                    let routes =
                        compact_routes::<R>(ints(ids, [tokens, top_k], device), experts, true);
                    let offsets = int_values(routes.offsets);
                    let pairs = int_values(routes.pairs);
                    let case = format!("T {tokens} E {experts} K {top_k} sparsity {sparsity}");
                    let want_offsets: Vec<i64> = plan.offsets.iter().map(|&o| o as i64).collect();
                    assert_eq!(offsets, want_offsets, "offsets, {case}");
                    let mut want_pairs: Vec<i64> = plan.pairs.iter().map(|&p| p as i64).collect();
                    want_pairs.resize(tokens * top_k, (tokens * top_k) as i64);
                    assert_eq!(pairs, want_pairs, "pairs (sentinel tail), {case}");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 96);
}

/// Uploads one problem in the layouts `masked_moe` takes (floats through `storage`, e.g. a cast)
/// and runs the kernels in `regime` with every buffer poisoned first.
#[allow(clippy::too_many_arguments)]
fn run_masked_moe<R: CubeRuntime>(
    ids: &[i64],
    x: &[f32],
    weights: &[f32],
    gate_up: &[f32],
    down: &[f32],
    dims: MoeDims,
    regime: Regime,
    storage: impl Fn(CubeTensor<R>) -> CubeTensor<R>,
    device: &R::Device,
) -> CubeTensor<R> {
    let MoeDims {
        tokens,
        top_k,
        experts,
        hidden,
        intermediate,
    } = dims;
    let upload = |values: &[f32], shape: Vec<usize>| storage(float(values.to_vec(), shape, device));
    masked_moe::<R>(
        upload(x, vec![tokens, hidden]),
        ints(ids.to_vec(), [tokens, top_k], device),
        upload(weights, vec![tokens, top_k]),
        upload(gate_up, vec![experts, 2 * intermediate, hidden]),
        upload(down, vec![experts, hidden, intermediate]),
        MaskedMoeOptions {
            regime: Some(regime),
            poison: true,
        },
    )
}

/// Every output within `1e-4 + 1e-4·|reference|` of the f64 reference.
fn assert_near_reference(actual: &[f32], expected: &[f64], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}");
    for (got, want) in actual.iter().zip(expected) {
        assert!(
            (*got as f64 - want).abs() <= 1e-4 + 1e-4 * want.abs(),
            "{what}: {got} vs {want}"
        );
    }
}

/// Runs the kernels on one random problem and compares with the f64 reference.
fn check_case<R: CubeRuntime>(
    rng: &mut Rng,
    dims: MoeDims,
    sparsity: f64,
    regime: Regime,
    device: &R::Device,
) -> usize {
    let MoeDims {
        tokens,
        top_k,
        experts,
        hidden,
        intermediate,
    } = dims;
    let ids = routing(rng, tokens, top_k, experts, sparsity);
    let x = uniform(rng, tokens * hidden, -1.0, 1.0);
    let weights = uniform(rng, tokens * top_k, 0.05, 1.0);
    let gate_up = uniform(rng, experts * 2 * intermediate * hidden, -0.5, 0.5);
    let down = uniform(rng, experts * hidden * intermediate, -0.5, 0.5);
    let expected = masked_moe_f64(&x, &ids, &weights, &gate_up, &down, dims);
    let kept = ids.iter().filter(|&&id| id < experts as i64).count();

    let out = run_masked_moe::<R>(
        &ids,
        &x,
        &weights,
        &gate_up,
        &down,
        dims,
        regime,
        |t| t,
        device,
    );
    let actual = float_values(out);
    assert_eq!(actual.len(), expected.len());
    for (index, (&got, &want)) in actual.iter().zip(&expected).enumerate() {
        let tolerance = 1e-4 + 1e-4 * want.abs();
        assert!(
            (got as f64 - want).abs() <= tolerance,
            "{regime:?} {dims:?} sparsity {sparsity}: out[{}, {}] = {got}, reference {want}",
            index / hidden,
            index % hidden
        );
    }
    if kept == 0 {
        assert!(actual.iter().all(|&v| v == 0.0), "all masked gives zeros");
    } else {
        assert!(
            expected.iter().any(|&v| v.abs() > 1e-3),
            "a case with signal"
        );
    }
    kept
}

fn kernels_match_the_reference<R: CubeRuntime>(regime: Regime, device: &R::Device) {
    let mut rng = Rng::new(11);
    let mut cases = 0;
    for tokens in TOKENS {
        for experts in EXPERTS {
            for top_k in TOP_K {
                for sparsity in SPARSITY {
                    let dims = MoeDims {
                        tokens,
                        top_k,
                        experts,
                        hidden: 32,
                        intermediate: 16,
                    };
                    check_case::<R>(&mut rng, dims, sparsity, regime, device);
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 96);
}

/// Sizes that are not multiples of the vector width or of the tiles (vector loads fall back to
/// scalars; partial tiles at every edge).
fn odd_sizes_match_the_reference<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(13);
    for regime in [Regime::Decode, Regime::Prefill] {
        for (hidden, intermediate) in [(6, 5), (70, 66), (10, 130)] {
            for (tokens, sparsity) in [(1, 0.0), (70, 0.3), (130, 0.0)] {
                let dims = MoeDims {
                    tokens,
                    top_k: 2,
                    experts: 8,
                    hidden,
                    intermediate,
                };
                check_case::<R>(&mut rng, dims, sparsity, regime, device);
            }
        }
    }
}

/// An expert repeated within a token (not what top-K produces, but legal input): more pairs than
/// tokens for one expert, which the tiled kernel covers by looping over row tiles.
fn repeated_ids_match_the_reference<R: CubeRuntime>(device: &R::Device) {
    let tokens = 100;
    let top_k = 2;
    let dims = MoeDims {
        tokens,
        top_k,
        experts: 4,
        hidden: 8,
        intermediate: 8,
    };
    let mut rng = Rng::new(17);
    let x = uniform(&mut rng, tokens * 8, -1.0, 1.0);
    let weights = uniform(&mut rng, tokens * top_k, 0.1, 1.0);
    let gate_up = uniform(&mut rng, 4 * 16 * 8, -0.5, 0.5);
    let down = uniform(&mut rng, 4 * 8 * 8, -0.5, 0.5);
    let ids = vec![1i64; tokens * top_k];
    let expected = masked_moe_f64(&x, &ids, &weights, &gate_up, &down, dims);
    for regime in [Regime::Decode, Regime::Prefill] {
        let out = run_masked_moe::<R>(
            &ids,
            &x,
            &weights,
            &gate_up,
            &down,
            dims,
            regime,
            |t| t,
            device,
        );
        assert_near_reference(&float_values(out), &expected, &format!("{regime:?}"));
    }
}

/// Experts whose slots are all masked (and experts no token picked) are never read: their
/// weights are NaN here, so a kernel that loaded them, even to multiply by a zero routing
/// weight, would put NaN in the output. Both regimes, from one token to a prefill of 300.
fn idle_experts_weights_are_never_read<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(23);
    let (experts, top_k, hidden, intermediate) = (8, 2, 32, 16);
    for regime in [Regime::Decode, Regime::Prefill] {
        for tokens in [1, 3, 64, 300] {
            let dims = MoeDims {
                tokens,
                top_k,
                experts,
                hidden,
                intermediate,
            };
            // Experts 4 and 5 are picked by the router but every slot of theirs is masked;
            // 6 and 7 are never picked (see `routing`).
            let ids: Vec<i64> = routing(&mut rng, tokens, top_k, experts, 0.2)
                .into_iter()
                .map(|id| if id >= 4 { experts as i64 } else { id })
                .collect();
            let x = uniform(&mut rng, tokens * hidden, -1.0, 1.0);
            let weights = uniform(&mut rng, tokens * top_k, 0.05, 1.0);
            let gate_up = uniform(&mut rng, experts * 2 * intermediate * hidden, -0.5, 0.5);
            let down = uniform(&mut rng, experts * hidden * intermediate, -0.5, 0.5);
            let expected = masked_moe_f64(&x, &ids, &weights, &gate_up, &down, dims);
            let poison = |w: &[f32]| {
                let per_expert = w.len() / experts;
                let mut w = w.to_vec();
                w[4 * per_expert..].fill(f32::NAN);
                w
            };
            let out = run_masked_moe::<R>(
                &ids,
                &x,
                &weights,
                &poison(&gate_up),
                &poison(&down),
                dims,
                regime,
                |t| t,
                device,
            );
            let what = format!("{regime:?} T {tokens} (idle experts' weights read?)");
            assert_near_reference(&float_values(out), &expected, &what);
        }
    }
}

/// f16 / bf16 storage with f32 accumulation: inputs are rounded to the storage type first, so the
/// f64 reference sees the same inputs and only accumulation and the output rounding differ.
fn half_precision_matches_the_reference<R: CubeRuntime>(dtype: FloatDType, device: &R::Device) {
    let round = |v: Vec<f32>| -> Vec<f32> {
        match dtype {
            FloatDType::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
            FloatDType::BF16 => v
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect(),
            _ => v,
        }
    };
    let cast = |t: CubeTensor<R>| Cube::<R>::float_cast(t, dtype);
    let mut rng = Rng::new(19);
    for (tokens, regime) in [(3, Regime::Decode), (64, Regime::Prefill)] {
        let dims = MoeDims {
            tokens,
            top_k: 2,
            experts: 8,
            hidden: 32,
            intermediate: 16,
        };
        let ids = routing(&mut rng, tokens, 2, 8, 0.5);
        let x = round(uniform(&mut rng, tokens * 32, -1.0, 1.0));
        let weights = round(uniform(&mut rng, tokens * 2, 0.05, 1.0));
        let gate_up = round(uniform(&mut rng, 8 * 32 * 32, -0.5, 0.5));
        let down = round(uniform(&mut rng, 8 * 32 * 16, -0.5, 0.5));
        let expected = masked_moe_f64(&x, &ids, &weights, &gate_up, &down, dims);
        let out = run_masked_moe::<R>(
            &ids, &x, &weights, &gate_up, &down, dims, regime, cast, device,
        );
        assert_eq!(out.dtype, dtype.into(), "output keeps the storage type");
        let actual = float_values(Cube::<R>::float_cast(out, FloatDType::F32));
        // The hidden activations and the output are stored in 16 bits: ~3 significant digits.
        let tolerance = |want: f64| 1e-2 + 1e-2 * want.abs();
        for (got, want) in actual.iter().zip(&expected) {
            assert!(
                (*got as f64 - want).abs() <= tolerance(*want),
                "{dtype:?} {regime:?}: {got} vs {want}"
            );
        }
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};

    fn device() -> WgpuDevice {
        let device = WgpuDevice::default();
        let probe = std::panic::catch_unwind(|| {
            Tensor::<Cube<WgpuRuntime>, 1>::from_floats([1.0, 2.0], &device)
                .sum()
                .into_scalar()
        });
        assert!(
            matches!(probe, Ok(3.0)),
            "no working wgpu adapter: install a Vulkan driver (CPU: `apt-get install mesa-vulkan-drivers libvulkan1`)"
        );
        device
    }

    #[test]
    fn compaction() {
        compaction_matches_the_plan::<WgpuRuntime>(&device());
    }

    #[test]
    fn decode_kernels() {
        kernels_match_the_reference::<WgpuRuntime>(Regime::Decode, &device());
    }

    #[test]
    fn prefill_kernels() {
        kernels_match_the_reference::<WgpuRuntime>(Regime::Prefill, &device());
    }

    #[test]
    fn odd_sizes() {
        odd_sizes_match_the_reference::<WgpuRuntime>(&device());
    }

    #[test]
    fn repeated_ids() {
        repeated_ids_match_the_reference::<WgpuRuntime>(&device());
    }

    #[test]
    fn idle_experts_unread() {
        idle_experts_weights_are_never_read::<WgpuRuntime>(&device());
    }

    #[test]
    fn f16_storage() {
        half_precision_matches_the_reference::<WgpuRuntime>(FloatDType::F16, &device());
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use burn::backend::cuda::CudaDevice;
    use burn_cubecl::cubecl::cuda::CudaRuntime;

    #[test]
    fn compaction() {
        compaction_matches_the_plan::<CudaRuntime>(&CudaDevice::default());
    }

    #[test]
    fn decode_kernels() {
        kernels_match_the_reference::<CudaRuntime>(Regime::Decode, &CudaDevice::default());
    }

    #[test]
    fn prefill_kernels() {
        kernels_match_the_reference::<CudaRuntime>(Regime::Prefill, &CudaDevice::default());
    }

    #[test]
    fn odd_sizes() {
        odd_sizes_match_the_reference::<CudaRuntime>(&CudaDevice::default());
    }

    #[test]
    fn repeated_ids() {
        repeated_ids_match_the_reference::<CudaRuntime>(&CudaDevice::default());
    }

    #[test]
    fn idle_experts_unread() {
        idle_experts_weights_are_never_read::<CudaRuntime>(&CudaDevice::default());
    }

    #[test]
    fn f16_and_bf16_storage() {
        for dtype in [FloatDType::F16, FloatDType::BF16] {
            half_precision_matches_the_reference::<CudaRuntime>(dtype, &CudaDevice::default());
        }
    }
}
