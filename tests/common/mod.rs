//! Helpers shared by the integration tests: deterministic random data and tolerant comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Repository root (the facade package's manifest directory).
/// Every shipped tiny model (`assets/models/tiny-{name}`): the four GQA families and DeepSeek in
/// four variants (`scripts/gen_deepseek_models.py`): V2 group-limited greedy; V2 greedy with
/// q-LoRA, YaRN and attention biases; V3 with q-LoRA, groups, interleaved RoPE and MTP tensors to
/// skip; V3 with FP8 block-scaled weights.
#[allow(dead_code)]
pub const MODELS: [&str; 8] = [
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "mixtral",
    "deepseek_v2",
    "deepseek_v2_yarn",
    "deepseek_v3",
    "deepseek_v3_fp8",
];

/// [`MODELS`] whose weights are stored as floats (all but the FP8 one), for tests that re-encode
/// a checkpoint's float tensors ([`Converted`]) or compare against them.
#[allow(dead_code)]
pub fn float_models() -> impl Iterator<Item = &'static str> {
    MODELS.into_iter().filter(|m| !m.ends_with("_fp8"))
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A small deterministic generator (splitmix64), so every test sees the same data on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-12);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * std).collect()
    }

    /// A normal tensor of the given shape.
    pub fn tensor<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        std: f64,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let n = shape.iter().product();
        Tensor::from_data(TensorData::new(self.normals(n, std), shape), device)
    }
}

/// An int tensor from values.
pub fn ints<B: Backend, const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap()
}

pub fn int_values<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec::<i64>().unwrap()
}

/// Largest absolute difference; panics on length mismatch or any NaN.
pub fn max_abs_diff(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| {
            assert!(
                a.is_finite() && e.is_finite(),
                "non-finite value: {a} vs {e}"
            );
            (a - e).abs()
        })
        .fold(0.0, f64::max)
}

/// Mean `|a - b|` (0 for empty slices).
pub fn mean_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(a, b)| (a - b).abs()).sum::<f64>() / a.len().max(1) as f64
}

/// Root mean square (0 for an empty slice).
pub fn rms(v: &[f64]) -> f64 {
    (v.iter().map(|v| v * v).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// Largest `|a - b| / (1 + |b|)`.
pub fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0, f64::max)
}

/// Asserts `|actual − expected| ≤ tol` elementwise and that the data is not trivially zero.
pub fn assert_close(actual: &[f64], expected: &[f64], tol: f64, what: &str) {
    let diff = max_abs_diff(actual, expected);
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(
        scale > 0.0,
        "{what}: reference is all zeros, the test would prove nothing"
    );
    assert!(
        diff <= tol,
        "{what}: max |diff| = {diff:e} > {tol:e} (max |ref| = {scale})"
    );
    eprintln!("{what}: max |diff| = {diff:.2e} (tol {tol:.0e}, max |ref| = {scale:.3})");
}

/// Puts a BEAM adapter with random mask-router weights (zero bias) on every MoE layer: roughly half
/// of the slots end up masked.
pub fn random_adapter<B: Backend>(
    model: beam_model::model::MoeLm<B>,
    seed: u64,
) -> beam_model::model::MoeLm<B> {
    use burn::module::Param;
    let device = model.embed.weight.device();
    let mut model = model
        .enable_beam(beam_model::BeamMaskConfig::new(), &device)
        .unwrap();
    let mut rng = Rng::new(seed);
    for layer in &mut model.layers {
        if let Some(moe) = layer.feed_forward.moe_mut() {
            let router = moe.mask_router.as_mut().unwrap();
            let dims = router.proj.weight.dims();
            router.proj.weight = Param::from_tensor(rng.tensor(dims, 1.0, &device));
            router.proj.bias = Some(Param::from_tensor(Tensor::zeros([dims[1]], &device)));
            router.weight_scale = Some(Param::from_tensor(rng.tensor([dims[1]], 1.0, &device)));
        }
    }
    model
}

/// A copy of a shipped tiny model with every float tensor rounded to `dtype` (same files, same
/// shards), removed on drop.
pub struct Converted(pub PathBuf);

impl Converted {
    pub fn new(family: &str, dtype: Dtype) -> Self {
        // Tests run in parallel: one folder per copy.
        static COPIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let copy = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "beam-precision-{family}-{dtype:?}-{}-{copy}",
            std::process::id()
        ));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        for entry in
            std::fs::read_dir(repo_root().join(format!("assets/models/tiny-{family}"))).unwrap()
        {
            let path = entry.unwrap().path();
            let target = dir.join(path.file_name().unwrap());
            if path.extension().is_some_and(|e| e == "safetensors") {
                convert_file(&path, &target, dtype);
            } else {
                std::fs::copy(&path, target).unwrap();
            }
        }
        Self(dir)
    }
}

impl Drop for Converted {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn convert_file(from: &Path, to: &Path, dtype: Dtype) {
    let bytes = std::fs::read(from).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "shipped tiny models are f32");
            let floats = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()));
            let data: Vec<u8> = match dtype {
                Dtype::BF16 => floats
                    .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
                Dtype::F16 => floats
                    .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
                Dtype::F32 => view.data().to_vec(),
                other => panic!("no conversion to {other:?}"),
            };
            (name, view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                TensorView::new(dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, to).unwrap();
}
