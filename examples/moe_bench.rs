//! MoE layer benchmark: top-K vs BEAM (masked slots dropped before dispatch) at fixed sparsities.
//!
//! ```text
//! cargo run --release --example moe_bench -- [--backend ndarray|wgpu|cuda] [--shapes small,olmoe]
//!     [--tokens 1,4,16,512,2048] [--sparsity 0,0.5,0.75,0.85,0.95] [--reps N] [--json]
//! ```
//! Each row times one layer forward (router + mask + dispatch + experts + combine) with the plain
//! top-K mask and with a BEAM mask that keeps exactly `round((1 − sparsity) · T · K)` random
//! (token, expert) pairs. `flop_limit` = top-K pairs / kept pairs is the speed-up bound if expert
//! work were all that counted; `weight_limit` = distinct experts top-K touched / distinct experts
//! BEAM touched is the bound when reading expert weights is all that counts (decode: weights are
//! read once per expert however many of its tokens there are); `floor_ms` is the layer with every
//! slot masked (router, mask and bookkeeping only) and `overhead_limit` = `topk_ms / floor_ms` the
//! speed-up bound those fixed costs leave; `gbps` / `topk_gbps` (decode rows,
//! T ≤ 16) are the expert weight bytes of the distinct experts touched, per second, to compare with
//! the first line's `copy_gbps` (an elementwise pass over 256 MiB: read + write bytes per second). Shapes: `small` = H 128, I 64, E 16, K 4 (the shipped
//! KJV model); `olmoe` = H 2048, I 1024, E 64, K 8 (OLMoE-1B-7B). Timing: median of `--reps`
//! runs after one warm-up, top-K, BEAM and the floor timed in turn within each repetition, each
//! run ending with a read-back of the output so asynchronous backends are measured to completion.

use std::time::Instant;

use beam_model::{BeamMoe, BeamMoeConfig, MaskSource, MoeBackend};
use burn::tensor::{Distribution, Tensor, TensorData};

struct Args {
    backend: String,
    shapes: Vec<String>,
    tokens: Vec<usize>,
    sparsity: Vec<f64>,
    reps: usize,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        backend: "ndarray".into(),
        shapes: vec!["small".into(), "olmoe".into()],
        tokens: vec![1, 4, 16, 512, 2048],
        sparsity: vec![0.0, 0.5, 0.75, 0.85, 0.95],
        reps: 5,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--json" {
            args.json = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let list = |v: &str| v.split(',').map(str::to_string).collect::<Vec<_>>();
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--backend" => args.backend = value.clone(),
            "--shapes" => args.shapes = list(&value),
            "--tokens" => {
                args.tokens = list(&value)
                    .iter()
                    .map(|v| v.parse().map_err(|e| bad(&e)))
                    .collect::<Result<_, _>>()?
            }
            "--sparsity" => {
                args.sparsity = list(&value)
                    .iter()
                    .map(|v| v.parse().map_err(|e| bad(&e)))
                    .collect::<Result<_, _>>()?
            }
            "--reps" => args.reps = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if args.sparsity.iter().any(|s| !(0.0..=1.0).contains(s)) || args.reps == 0 {
        return Err("sparsity must lie in [0, 1] and --reps must be positive".into());
    }
    Ok(args)
}

fn shape(name: &str) -> Result<BeamMoeConfig, String> {
    match name {
        "small" => Ok(BeamMoeConfig::new(128, 64, 16, 4)),
        "olmoe" => Ok(BeamMoeConfig::new(2048, 1024, 64, 8)),
        _ => Err(format!("unknown shape {name} (small, olmoe)")),
    }
}

/// A 0/1 mask `[1, T, K]` keeping exactly `kept` pairs chosen by a fixed-seed shuffle.
fn mask<B: MoeBackend>(
    tokens: usize,
    top_k: usize,
    kept: usize,
    device: &B::Device,
) -> Tensor<B, 3> {
    let mut order: Vec<usize> = (0..tokens * top_k).collect();
    let mut state = 0x5EED_u64 ^ (tokens * 131 + kept) as u64;
    for i in (1..order.len()).rev() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, (state >> 33) as usize % (i + 1));
    }
    let mut values = vec![0.0f32; tokens * top_k];
    for &slot in &order[..kept] {
        values[slot] = 1.0;
    }
    Tensor::from_data(TensorData::new(values, [1, tokens, top_k]), device)
}

/// Experts with at least one kept slot.
fn distinct_experts(ids: &[i64], kept: impl Fn(usize) -> bool, experts: usize) -> usize {
    let mut seen = vec![false; experts];
    for (slot, &id) in ids.iter().enumerate() {
        if kept(slot) {
            seen[id as usize] = true;
        }
    }
    seen.iter().filter(|&&s| s).count()
}

/// Median milliseconds of one layer forward for each mask source, the sources timed in turn
/// within every repetition so that drifts of a shared machine hit them alike.
fn median_ms<B: MoeBackend>(
    layer: &BeamMoe<B>,
    x: &Tensor<B, 3>,
    sources: &[&MaskSource<B>],
    reps: usize,
) -> Vec<f64> {
    let run = |source: &MaskSource<B>| {
        let out = layer.forward_with(x.clone(), source.clone());
        // Read back one value: asynchronous backends finish the whole forward first.
        let _ = out.output.slice([0..1, 0..1, 0..1]).into_data();
    };
    let mut times = vec![Vec::with_capacity(reps); sources.len()];
    for rep in 0..=reps {
        for (source, times) in sources.iter().zip(&mut times) {
            let start = Instant::now();
            run(source);
            if rep > 0 {
                // Repetition 0 is the warm-up.
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

/// Read + write bandwidth (GB/s) of an elementwise pass over a 256 MiB `f32` tensor on the
/// backend (`x · 1`), median of 5: the device copy bandwidth the decode rows' `gbps` compares with.
fn device_copy_gbps<B: MoeBackend>(device: &B::Device) -> f64 {
    let elements = 64 << 20;
    let x = Tensor::<B, 1>::random([elements], Distribution::Default, device);
    let pass = || {
        let y = x.clone().mul_scalar(1.0);
        let _ = y.narrow(0, 0, 1).into_data();
    };
    pass();
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            pass();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    2.0 * (elements * 4) as f64 / times[2] / 1e9
}

/// Read + write bandwidth (GB/s) of `copy_from_slice` from one 128 MiB buffer to another (4× a
/// large L3), split across the machine's cores, median of 5.
fn host_copy_gbps() -> f64 {
    let elements = 32 << 20;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let source = vec![1.0f32; elements];
    let mut target = vec![0.0f32; elements];
    let chunk = elements.div_ceil(threads);
    let mut times: Vec<f64> = (0..6)
        .map(|_| {
            let start = Instant::now();
            std::thread::scope(|scope| {
                for (to, from) in target.chunks_mut(chunk).zip(source.chunks(chunk)) {
                    scope.spawn(move || to.copy_from_slice(from));
                }
            });
            start.elapsed().as_secs_f64()
        })
        .skip(1)
        .collect();
    times.sort_by(f64::total_cmp);
    2.0 * (elements * 4) as f64 / times[2] / 1e9
}

fn bench<B: MoeBackend>(args: &Args, device: &B::Device) -> Result<(), String> {
    // ndarray's weights live in host memory, read by all cores; its elementwise ops run on one.
    let (copy, how) = if args.backend == "ndarray" {
        (host_copy_gbps(), "host memcpy on all cores")
    } else {
        (
            device_copy_gbps::<B>(device),
            "elementwise pass on the device",
        )
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "backend": args.backend, "copy_gbps": copy, "copy": how })
        );
    } else {
        println!(
            "{} copy bandwidth ({how}, read + write): {copy:.1} GB/s",
            args.backend
        );
    }
    for name in &args.shapes {
        let config = shape(name)?;
        let layer = config.init::<B>(device);
        let (h, i, e, k) = (
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.top_k,
        );
        let expert_bytes = (3 * h * i * 4) as f64;
        for &tokens in &args.tokens {
            let x = Tensor::<B, 3>::random([1, tokens, h], Distribution::Normal(0.0, 1.0), device);
            let ids = layer
                .forward_with(x.clone(), MaskSource::TopK)
                .facts
                .expert_ids;
            let ids: Vec<i64> = ids.into_data().convert::<i64>().to_vec().unwrap();
            let topk_distinct = distinct_experts(&ids, |_| true, e);
            for &sparsity in &args.sparsity {
                let kept = ((1.0 - sparsity) * (tokens * k) as f64).round() as usize;
                let m = mask::<B>(tokens, k, kept, device);
                let kept_flags: Vec<f32> = m.clone().into_data().to_vec().unwrap();
                let distinct = distinct_experts(&ids, |slot| kept_flags[slot] > 0.5, e);
                let all_masked = MaskSource::External(Tensor::zeros([1, tokens, k], device));
                let [topk_ms, beam_ms, floor_ms] = median_ms(
                    &layer,
                    &x,
                    &[&MaskSource::TopK, &MaskSource::External(m), &all_masked],
                    args.reps,
                )[..] else {
                    unreachable!("three sources, three times")
                };
                let flop_limit = (tokens * k) as f64 / kept.max(1) as f64;
                let gbps =
                    (tokens <= 16).then(|| distinct as f64 * expert_bytes / (beam_ms * 1e-3) / 1e9);
                let topk_gbps = (tokens <= 16)
                    .then(|| topk_distinct as f64 * expert_bytes / (topk_ms * 1e-3) / 1e9);
                // Weight-bandwidth bound: expert weights read once per distinct expert.
                let weight_limit = topk_distinct as f64 / distinct.max(1) as f64;
                let row = serde_json::json!({
                    "backend": args.backend, "shape": name, "tokens": tokens, "experts": e, "top_k": k,
                    "hidden": h, "intermediate": i, "sparsity": sparsity, "kept_pairs": kept,
                    "distinct_experts": distinct, "topk_distinct_experts": topk_distinct,
                    "topk_ms": topk_ms, "beam_ms": beam_ms,
                    "speedup": topk_ms / beam_ms, "flop_limit": if kept == 0 { f64::INFINITY } else { flop_limit },
                    "weight_limit": if distinct == 0 { f64::INFINITY } else { weight_limit },
                    "gbps": gbps, "topk_gbps": topk_gbps,
                    "floor_ms": floor_ms, "overhead_limit": topk_ms / floor_ms,
                });
                if args.json {
                    println!("{row}");
                } else {
                    println!(
                        "{:<6} {:<6} T={:<5} sparsity {:.2}: top-K {:>9.3} ms  BEAM {:>9.3} ms  speed-up {:>5.2}x  (FLOP limit {:>5.2}x, weight limit {:>5.2}x, all-masked floor {:.3} ms){}",
                        args.backend, name, tokens, sparsity, topk_ms, beam_ms, topk_ms / beam_ms, flop_limit, weight_limit, floor_ms,
                        gbps.map_or(String::new(), |g| format!("  {g:.1} GB/s"))
                    );
                }
            }
        }
    }
    Ok(())
}

fn main() {
    let result = parse().and_then(|args| match args.backend.as_str() {
        "ndarray" => bench::<burn::backend::NdArray>(&args, &Default::default()),
        #[cfg(feature = "wgpu")]
        "wgpu" => beam::wgpu_device().and_then(|d| bench::<burn::backend::Wgpu>(&args, &d)),
        #[cfg(feature = "cuda")]
        "cuda" => beam::cuda_device().and_then(|d| bench::<burn::backend::Cuda>(&args, &d)),
        other => Err(format!(
            "backend {other} is not available in this build (ndarray always; wgpu / cuda need --features wgpu / cuda)"
        )),
    });
    if let Err(err) = result {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
