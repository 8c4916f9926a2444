//! Throughput of the host GEMV (`host::linear`, one token: decode) on `bf16`, `f32`, q8 and q4
//! weights against the bytes it reads, for a weight that stays in cache and one that streams from
//! memory: the rate a decode step's products can reach on this machine, apart from the model.
//!
//! `cargo run --release -p beam-kernels --example gemv [-- --reps 200 --dtype bf16|f32|q8|q4 --rows 131072]`
//! (default: all four); set `RAYON_NUM_THREADS` to compare one and two cores. The products
//! run on a thread of rayon's pool (`host::on_pool`), as the CLI runs the model, and split
//! over `beam_kernels::pool`'s threads.

use std::time::Instant;

use beam_kernels::host::{linear, on_pool};
use beam_kernels::quant::{quantize_q4, quantize_q8, Q8_BLOCK};

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() {
    let reps: usize = arg("--reps").map_or(200, |v| v.parse().expect("--reps N"));
    let dtypes: Vec<String> = match arg("--dtype") {
        Some(d) => vec![d],
        None => ["bf16", "f32", "q8", "q4"].map(String::from).to_vec(),
    };
    // Tokens per product: 1 is decode (a GEMV); more is prefill (reported in GFLOP/s too).
    let tokens: usize = arg("--tokens").map_or(1, |v| v.parse().expect("--tokens N"));
    let input = 2048;
    // Rows of the streamed weight: enough that it does not fit in the last-level cache.
    let streamed: usize = arg("--rows").map_or(131072, |v| v.parse().expect("--rows N"));
    for dtype in &dtypes {
        for (label, rows) in [("in cache", 256), ("streamed", streamed)] {
            let weights: Vec<f32> = (0..rows * input)
                .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 0.04)
                .collect();
            let x: Vec<f32> = (0..tokens * input)
                .map(|i| (i as f32 * 0.414).fract() - 0.5)
                .collect();
            let inner = (reps * 32768 / rows).max(1);
            let (bytes, best) = match dtype.as_str() {
                "q8" => {
                    let q = quantize_q8(&weights, Q8_BLOCK);
                    let bytes = q.values.len() + 2 * q.scales.len();
                    let m = q.as_q8().expect("q8");
                    (bytes, time(inner, || linear(&x, m, input, rows)))
                }
                "q4" => {
                    let q = quantize_q4(&weights, Q8_BLOCK);
                    let bytes = q.values.len() + 2 * q.scales.len();
                    let m = q.as_q4().expect("q4");
                    (bytes, time(inner, || linear(&x, m, input, rows)))
                }
                "bf16" => {
                    let w: Vec<half::bf16> =
                        weights.iter().map(|&v| half::bf16::from_f32(v)).collect();
                    (2 * w.len(), time(inner, || linear(&x, &w[..], input, rows)))
                }
                "f32" => (
                    4 * weights.len(),
                    time(inner, || linear(&x, &weights[..], input, rows)),
                ),
                other => panic!("--dtype {other}: bf16, f32, q8 or q4"),
            };
            println!(
                "{dtype} {label} ({rows} x {input}, {tokens} token(s)): {:.1} us per product, \
                 {:.1} GB/s of weights, {:.1} GFLOP/s",
                best * 1e6,
                bytes as f64 / best / 1e9,
                2.0 * (tokens * rows * input) as f64 / best / 1e9
            );
        }
    }
}

/// Best time of 5 rounds of `inner` products, seconds per product.
fn time(inner: usize, product: impl Fn() -> Vec<f32> + Sync) -> f64 {
    on_pool(|| {
        let mut best = f64::INFINITY;
        let mut sink = 0.0f32;
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..inner {
                sink += product()[0];
            }
            best = best.min(start.elapsed().as_secs_f64() / inner as f64);
        }
        std::hint::black_box(sink);
        best
    })
}
