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
//! read once per expert however many of its tokens there are); `gbps` / `topk_gbps` (decode rows,
//! T ≤ 16) are the expert weight bytes of the distinct experts touched, per second. Shapes: `small` = H 128, I 64, E 16, K 4 (the shipped
//! KJV model); `olmoe` = H 2048, I 1024, E 64, K 8 (OLMoE-1B-7B). Timing: median of `--reps`
//! runs after one warm-up, each ending with a read-back of the output so asynchronous backends
//! are measured to completion.

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

fn median_ms<B: MoeBackend>(
    layer: &BeamMoe<B>,
    x: &Tensor<B, 3>,
    source: &MaskSource<B>,
    reps: usize,
) -> f64 {
    let run = || {
        let out = layer.forward_with(x.clone(), source.clone());
        // Read back one value: asynchronous backends finish the whole forward first.
        let _ = out.output.slice([0..1, 0..1, 0..1]).into_data();
    };
    run();
    let mut times = (0..reps)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect::<Vec<_>>();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn bench<B: MoeBackend>(args: &Args, device: &B::Device) -> Result<(), String> {
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
            let topk_ms = median_ms(&layer, &x, &MaskSource::TopK, args.reps);
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
                let beam_ms = median_ms(&layer, &x, &MaskSource::External(m), args.reps);
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
                });
                if args.json {
                    println!("{row}");
                } else {
                    println!(
                        "{:<6} {:<6} T={:<5} sparsity {:.2}: top-K {:>9.3} ms  BEAM {:>9.3} ms  speed-up {:>5.2}x  (FLOP limit {:>5.2}x, weight limit {:>5.2}x){}",
                        args.backend, name, tokens, sparsity, topk_ms, beam_ms, topk_ms / beam_ms, flop_limit, weight_limit,
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
        "wgpu" => bench::<burn::backend::Wgpu>(&args, &Default::default()),
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
