//! Reading Hugging Face safetensors files ([`TensorStore`]), with typed errors that name the file,
//! the tensor and what was expected. Which tensor goes where in a model is
//! [`crate::model::load`]'s job.
//!
//! Only safetensors is read (never pickles). Tensors stored as f32, f16, bf16 or f64 are converted
//! to the backend's float type.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors};

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
    /// A tensor the model does not use (a different architecture or a corrupted index).
    #[error("{}: unexpected tensor `{name}` (not part of this model)", path.display())]
    Unexpected {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// `model.safetensors.index.json` is malformed or names a shard that does not exist.
    #[error("{}: {reason}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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

/// One safetensors file held in memory.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Offset of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
}

impl Shard {
    fn open(path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            data_start: 0,
        })
    }

    /// Parses and validates the header (offsets and sizes are checked against the buffer) and
    /// returns its tensors; sets where the data section starts.
    fn read_header(&mut self) -> Result<Vec<(String, TensorInfo)>, LoadError> {
        let (header_len, metadata) =
            SafeTensors::read_metadata(&self.bytes).map_err(|err| LoadError::Format {
                path: self.path.clone(),
                reason: err.to_string(),
            })?;
        self.data_start = 8 + header_len;
        Ok(metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect())
    }

    /// The bytes of a tensor described by this shard's header.
    fn data(&self, info: &TensorInfo) -> &[u8] {
        let (start, end) = info.data_offsets;
        &self.bytes[self.data_start + start..self.data_start + end]
    }
}

/// The tensors of a checkpoint: one safetensors file, or the shards listed by
/// `model.safetensors.index.json`. Remembers which tensors were read, so a loader can report the
/// ones it did not expect.
#[derive(Debug)]
pub struct TensorStore {
    shards: Vec<Shard>,
    /// Tensor name → (shard, header entry); each header is parsed once, when the store is built.
    index: BTreeMap<String, (usize, TensorInfo)>,
    used: RefCell<BTreeSet<String>>,
}

impl TensorStore {
    /// A single safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        Self::from_shards(vec![Shard::open(path.as_ref())?])
    }

    /// A safetensors file already in memory; `path` names it in errors.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, LoadError> {
        Self::from_shards(vec![Shard {
            path: path.into(),
            bytes,
            data_start: 0,
        }])
    }

    /// The checkpoint in a Hugging Face folder: `model.safetensors.index.json` and its shards if
    /// present, else `model.safetensors`.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self, LoadError> {
        let dir = dir.as_ref();
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.exists() {
            return Self::open(dir.join("model.safetensors"));
        }
        let text = std::fs::read_to_string(&index_path).map_err(|source| LoadError::Io {
            path: index_path.clone(),
            source,
        })?;
        let bad = |reason: String| LoadError::Index {
            path: index_path.clone(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut files: BTreeSet<String> = BTreeSet::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("`{name}` maps to a non-string")))?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(bad(format!(
                    "shard name `{file}` must be a plain file name"
                )));
            }
            files.insert(file.to_string());
        }
        let shards = files
            .iter()
            .map(|file| Shard::open(&dir.join(file)))
            .collect::<Result<Vec<_>, _>>()?;
        let store = Self::from_shards(shards)?;
        // Every tensor the index names must be in the shard it names.
        for (name, file) in map {
            let shard = store.index.get(name).map(|(i, _)| &store.shards[*i].path);
            if shard.and_then(|p| p.file_name()).and_then(|f| f.to_str()) != file.as_str() {
                return Err(bad(format!(
                    "tensor `{name}` is not in shard `{}`",
                    file.as_str().unwrap_or("")
                )));
            }
        }
        Ok(store)
    }

    fn from_shards(mut shards: Vec<Shard>) -> Result<Self, LoadError> {
        let mut index = BTreeMap::new();
        for (i, shard) in shards.iter_mut().enumerate() {
            for (name, info) in shard.read_header()? {
                index.insert(name, (i, info));
            }
        }
        Ok(Self {
            shards,
            index,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file a tensor lives in (the first file if it does not exist).
    pub fn path_of(&self, name: &str) -> &Path {
        let shard = self.index.get(name).map_or(0, |(i, _)| *i);
        &self.shards[shard].path
    }

    /// Tensors never read so far, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.index
            .keys()
            .filter(|name| !used.contains(*name))
            .cloned()
            .collect()
    }

    /// Fails with [`LoadError::Unexpected`] naming the first tensor never read, ignoring names
    /// that match `ignore`.
    pub fn check_all_used(&self, ignore: impl Fn(&str) -> bool) -> Result<(), LoadError> {
        match self.unused().into_iter().find(|name| !ignore(name)) {
            Some(name) => Err(LoadError::Unexpected {
                path: self.path_of(&name).to_path_buf(),
                name,
            }),
            None => Ok(()),
        }
    }

    fn view<T>(
        &self,
        name: &str,
        read: impl FnOnce(&Path, &TensorInfo, &[u8]) -> Result<T, LoadError>,
    ) -> Result<T, LoadError> {
        let (shard, info) = self.index.get(name).ok_or_else(|| LoadError::Missing {
            path: self.path_of(name).to_path_buf(),
            name: name.to_string(),
        })?;
        let shard = &self.shards[*shard];
        self.used.borrow_mut().insert(name.to_string());
        read(&shard.path, info, shard.data(info))
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        self.view(name, |_, info, _| Ok(info.shape.clone()))
    }

    /// A float tensor as f32 values, checked against `expected` shape.
    pub fn f32_values(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        self.view(name, |path, info, bytes| {
            if info.shape != expected {
                return Err(LoadError::Shape {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    expected: expected.to_vec(),
                    actual: info.shape.clone(),
                });
            }
            Ok(match info.dtype {
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
                        path: path.to_path_buf(),
                        name: name.to_string(),
                        expected: "F32, F16, BF16 or F64",
                        actual: format!("{other:?}"),
                    })
                }
            })
        })
    }

    /// An integer tensor (I64 or I32) as i64 values, with its shape.
    pub fn i64_values(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>), LoadError> {
        self.view(name, |path, info, bytes| {
            let values = match info.dtype {
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
                        path: path.to_path_buf(),
                        name: name.to_string(),
                        expected: "I64 or I32",
                        actual: format!("{other:?}"),
                    })
                }
            };
            Ok((values, info.shape.clone()))
        })
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

    /// A float parameter of shape `expected` on `device`.
    pub fn param<B: Backend, const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Param<Tensor<B, D>>, LoadError> {
        self.tensor(name, expected, device).map(Param::from_tensor)
    }

    /// Per-expert 2-D tensors `names(e)`, concatenated in expert order (`[E, rows, cols]`).
    pub fn stacked(
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
