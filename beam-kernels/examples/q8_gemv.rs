//! Throughput of the host q8 GEMV (`host::linear` on a `Q8Matrix`, one token: decode) against
//! the bytes it reads, for a weight that stays in cache and one that streams from memory.
//!
//! `cargo run --release -p beam-kernels --example q8_gemv [-- --reps 200]`; set
//! `RAYON_NUM_THREADS` to compare one and two cores.

use std::time::Instant;

use beam_kernels::host::linear;
use beam_kernels::quant::{quantize_q8, Q8_BLOCK};

fn main() {
    let reps: usize = std::env::args()
        .skip_while(|a| a != "--reps")
        .nth(1)
        .map_or(200, |v| v.parse().expect("--reps N"));
    let input = 2048;
    for (label, rows) in [
        ("in cache (256 x 2048)", 256),
        ("streamed (32768 x 2048)", 32768),
    ] {
        let weights: Vec<f32> = (0..rows * input)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 0.04)
            .collect();
        let q = quantize_q8(&weights, Q8_BLOCK);
        drop(weights);
        let x: Vec<f32> = (0..input)
            .map(|i| (i as f32 * 0.414).fract() - 0.5)
            .collect();
        let bytes = q.values.len() + 2 * q.scales.len();
        let inner = (reps * 32768 / rows).max(1);
        let mut best = f64::INFINITY;
        let mut sink = 0.0f32;
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..inner {
                sink += linear(&x, q.matrix(), input, rows)[rows / 2];
            }
            best = best.min(start.elapsed().as_secs_f64() / inner as f64);
        }
        println!(
            "{label}: {:.1} us per product, {:.1} GB/s of weights (checksum {sink:.3})",
            best * 1e6,
            bytes as f64 / best / 1e9
        );
    }
}
