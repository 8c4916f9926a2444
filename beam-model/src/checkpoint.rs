//! Reading Hugging Face safetensors files into the layer, with typed errors that name the file,
//! the tensor and what was expected.
//!
//! Only safetensors is read (never pickles). Tensors stored as f32, f16, bf16 or f64 are converted
//! to the backend's float type.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::experts::SharedExpert;
use crate::layer::BeamMoe;

/// Why a checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid safetensors (truncated, corrupted header, …).
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        reason: String,
    },
    /// A required tensor is absent.
    #[error("{}: tensor `{name}` is missing", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("{}: tensor `{name}` has shape {actual:?}, expected {expected:?}", path.display())]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape on disk.
        actual: Vec<usize>,
    },
    /// A tensor has a dtype that is not a float (or, for integer reads, not an integer).
    #[error("{}: tensor `{name}` has dtype {actual}, expected {expected}", path.display())]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// Accepted dtypes.
        expected: &'static str,
        /// Dtype on disk.
        actual: String,
    },
}

/// A safetensors file held in memory.
#[derive(Debug, Clone)]
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    /// Reads and validates the file's header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        let file = Self { path, bytes };
        file.parse()?;
        Ok(file)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn parse(&self) -> Result<SafeTensors<'_>, LoadError> {
        SafeTensors::deserialize(&self.bytes).map_err(|err| LoadError::Format {
            path: self.path.clone(),
            reason: err.to_string(),
        })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .parse()
            .map(|st| st.names().into_iter().map(str::to_string).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.parse().is_ok_and(|st| st.tensor(name).is_ok())
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        let st = self.parse()?;
        let view = st.tensor(name).map_err(|_| self.missing(name))?;
        Ok(view.shape().to_vec())
    }

    fn missing(&self, name: &str) -> LoadError {
        LoadError::Missing {
            path: self.path.clone(),
            name: name.to_string(),
        }
    }

    fn check_shape(
        &self,
        name: &str,
        actual: &[usize],
        expected: &[usize],
    ) -> Result<(), LoadError> {
        if actual == expected {
            Ok(())
        } else {
            Err(LoadError::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: actual.to_vec(),
            })
        }
    }

    /// A float tensor as f32 values, checked against `expected` shape.
    pub fn f32_values(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        let st = self.parse()?;
        let view = st.tensor(name).map_err(|_| self.missing(name))?;
        self.check_shape(name, view.shape(), expected)?;
        let bytes = view.data();
        let values = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32)
                .collect(),
            other => {
                return Err(LoadError::Dtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    expected: "F32, F16, BF16 or F64",
                    actual: format!("{other:?}"),
                })
            }
        };
        Ok(values)
    }

    /// An integer tensor (I64 or I32) as i64 values, with its shape.
    pub fn i64_values(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>), LoadError> {
        let st = self.parse()?;
        let view = st.tensor(name).map_err(|_| self.missing(name))?;
        let bytes = view.data();
        let values = match view.dtype() {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunk")))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().expect("4-byte chunk")) as i64)
                .collect(),
            other => {
                return Err(LoadError::Dtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    expected: "I64 or I32",
                    actual: format!("{other:?}"),
                })
            }
        };
        Ok((values, view.shape().to_vec()))
    }

    /// A float tensor of shape `expected` on `device`.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, LoadError> {
        let values = self.f32_values(name, &expected)?;
        Ok(Tensor::from_data(TensorData::new(values, expected), device))
    }

    fn param<B: Backend, const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Param<Tensor<B, D>>, LoadError> {
        self.tensor(name, expected, device).map(Param::from_tensor)
    }

    /// Per-expert 2-D tensors `names(e)`, concatenated in expert order (`[E, rows, cols]`).
    fn stacked(
        &self,
        names: impl Fn(usize) -> String,
        experts: usize,
        [rows, cols]: [usize; 2],
    ) -> Result<Vec<f32>, LoadError> {
        let mut values = Vec::with_capacity(experts * rows * cols);
        for e in 0..experts {
            values.extend(self.f32_values(&names(e), &[rows, cols])?);
        }
        Ok(values)
    }
}

/// Loads a transformers MoE block's weights into `layer`, leaving its mask router untouched.
///
/// `prefix` is the block's name prefix, e.g. `model.layers.3.mlp.` (Mixtral:
/// `model.layers.3.block_sparse_moe.`). Accepted layouts, detected from the names present:
/// - router `gate.weight` `[E, H]` (+ DeepSeek-V3 `gate.e_score_correction_bias` `[E]`);
/// - experts fused (`experts.gate_up_proj` `[E, 2I, H]`, `experts.down_proj` `[E, H, I]`) or per
///   expert (`experts.{e}.{gate_proj,up_proj,down_proj}.weight`, Mixtral `w1`, `w3`, `w2`);
/// - shared expert `shared_expert.*` + `shared_expert_gate.weight` (Qwen2-MoE) or
///   `shared_experts.*` (DeepSeek).
pub fn load_moe_block<B: Backend>(
    mut layer: BeamMoe<B>,
    file: &TensorFile,
    prefix: &str,
) -> Result<BeamMoe<B>, LoadError> {
    let config = layer.config().clone();
    let (e, h, i) = (
        config.num_experts,
        config.hidden_size,
        config.intermediate_size,
    );
    let device = layer.router.weight.device();
    layer.router.weight = file.param(&format!("{prefix}gate.weight"), [e, h], &device)?;
    if layer.router.score_correction_bias.is_some() {
        layer.router.score_correction_bias = Some(file.param(
            &format!("{prefix}gate.e_score_correction_bias"),
            [e],
            &device,
        )?);
    }

    let fused = format!("{prefix}experts.gate_up_proj");
    let (gate_up, down) = if file.contains(&fused) {
        (
            file.tensor(&fused, [e, 2 * i, h], &device)?,
            file.tensor(&format!("{prefix}experts.down_proj"), [e, h, i], &device)?,
        )
    } else {
        let [gate, up, down] = if file.contains(&format!("{prefix}experts.0.w1.weight")) {
            ["w1", "w3", "w2"]
        } else {
            ["gate_proj", "up_proj", "down_proj"]
        };
        let name =
            |proj: &'static str| move |e: usize| format!("{prefix}experts.{e}.{proj}.weight");
        let gates = file.stacked(name(gate), e, [i, h])?;
        let ups = file.stacked(name(up), e, [i, h])?;
        let mut gate_up = Vec::with_capacity(2 * gates.len());
        for (g, u) in gates.chunks_exact(i * h).zip(ups.chunks_exact(i * h)) {
            gate_up.extend_from_slice(g);
            gate_up.extend_from_slice(u);
        }
        let downs = file.stacked(name(down), e, [h, i])?;
        (
            Tensor::from_data(TensorData::new(gate_up, [e, 2 * i, h]), &device),
            Tensor::from_data(TensorData::new(downs, [e, h, i]), &device),
        )
    };
    layer.experts.gate_up = Param::from_tensor(gate_up);
    layer.experts.down = Param::from_tensor(down);

    if let (Some(shared), Some(shared_config)) = (layer.shared_expert.take(), &config.shared_expert)
    {
        let base = if file.contains(&format!("{prefix}shared_experts.gate_proj.weight")) {
            format!("{prefix}shared_experts.")
        } else {
            format!("{prefix}shared_expert.")
        };
        let si = shared_config.intermediate_size;
        let gate = file.tensor::<B, 2>(&format!("{base}gate_proj.weight"), [si, h], &device)?;
        let up = file.tensor::<B, 2>(&format!("{base}up_proj.weight"), [si, h], &device)?;
        let gate_weight = match shared.gate {
            Some(_) => Some(file.param(
                &format!("{prefix}shared_expert_gate.weight"),
                [1, h],
                &device,
            )?),
            None => None,
        };
        layer.shared_expert = Some(SharedExpert {
            gate_up: Param::from_tensor(Tensor::cat(vec![gate, up], 0)),
            down: file.param(&format!("{base}down_proj.weight"), [h, si], &device)?,
            gate: gate_weight,
        });
    }
    Ok(layer)
}
