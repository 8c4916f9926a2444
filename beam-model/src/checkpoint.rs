//! Reading Hugging Face safetensors files ([`TensorStore`]), with typed errors that name the file,
//! the tensor and what was expected. Which tensor goes where in a model is
//! [`crate::model::load`]'s job.
//!
//! Only safetensors is read (never pickles). Files are memory-mapped, never read whole into memory;
//! headers can be read alone ([`TensorStore::open_dir_headers`]). Tensors stored as f32, f16, bf16
//! or f64 are read straight into the buffer that becomes the backend tensor, in the precision the
//! caller asks for ([`WeightDtype`]: a plain copy when it is the stored one, a conversion
//! otherwise; never an `f32` intermediate), and the mapped pages are released from the process
//! after each tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::weight::Weight;
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;

/// The precision weights are held in, in memory: what `--dtype` chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WeightDtype {
    /// 32-bit float.
    F32,
    /// IEEE half (`f16`).
    F16,
    /// bfloat16.
    BF16,
}

impl WeightDtype {
    /// The burn dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// The lower-case name (`f32`, `f16`, `bf16`), as `--dtype` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }

    /// The precision that holds a stored float dtype without loss where one exists (`F64` → `F32`,
    /// the widest kept); `None` for non-float dtypes.
    pub fn of_stored(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 | Dtype::F64 => Some(Self::F32),
            Dtype::F16 => Some(Self::F16),
            Dtype::BF16 => Some(Self::BF16),
            _ => None,
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(format!(
                "unknown weight dtype `{other}` (expected f32, f16 or bf16)"
            )),
        }
    }
}

/// A quantized format the large `[out, in]` weights can be held in: what `--quantize` chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantization {
    /// Block-wise symmetric int8 ([`beam_kernels::quant::quantize_q8`]): blocks of 32 values
    /// along the input dimension (fewer where a row is not a multiple of 32), one `f16` scale
    /// each.
    Q8,
    /// Block-wise 4-bit ([`beam_kernels::quant::quantize_q4`], llama.cpp's `Q4_0`): blocks of 32
    /// values (an even divisor from 8 where a row is not a multiple of 32), one `f16` scale each.
    Q4,
}

impl Quantization {
    /// The lower-case name (`q8`, `q4`), as `--quantize` spells it.
    pub fn name(self) -> &'static str {
        self.format().name()
    }

    /// The packing the weights are held in.
    pub fn format(self) -> beam_kernels::quant::QuantFormat {
        match self {
            Self::Q8 => beam_kernels::quant::QuantFormat::Q8,
            Self::Q4 => beam_kernels::quant::QuantFormat::Q4,
        }
    }

    /// The quantization holding `format`.
    pub fn from_format(format: beam_kernels::quant::QuantFormat) -> Self {
        match format {
            beam_kernels::quant::QuantFormat::Q8 => Self::Q8,
            beam_kernels::quant::QuantFormat::Q4 => Self::Q4,
        }
    }

    /// Bytes per weight at the default block (packed value + its share of the scale): 1.0625
    /// for q8, 0.5625 for q4.
    pub fn bytes_per_weight(self) -> f64 {
        self.format()
            .bytes_per_weight(beam_kernels::quant::Q8_BLOCK)
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8" | "int8" | "q8_0" => Ok(Self::Q8),
            "q4" | "int4" | "q4_0" => Ok(Self::Q4),
            other => Err(format!(
                "unknown quantization `{other}` (expected q8 or q4)"
            )),
        }
    }
}

/// How a large weight is held: its precision and, for the `[out, in]` linear weights and the
/// experts, an optional quantization (embeddings are never quantized).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightFormat {
    /// Precision of the weights (of those not quantized, and what quantized weights dequantize
    /// to on backends that do not run them in place).
    pub dtype: WeightDtype,
    /// The quantization of the linear weights, if any.
    pub quantize: Option<Quantization>,
}

impl From<WeightDtype> for WeightFormat {
    fn from(dtype: WeightDtype) -> Self {
        Self {
            dtype,
            quantize: None,
        }
    }
}

/// `data` (in `format.dtype`, rows along its last dimension) as a weight on `device`: as [`held`]
/// when `format` quantizes nothing; quantized (q8: [`beam_kernels::quant::quantize_q8`], q4:
/// [`beam_kernels::quant::quantize_q4`]) otherwise — packed values and scales where the backend
/// runs them in place (`quant_in_place`, see [`beam_kernels::LinearBackend::quant_in_place`]),
/// else dequantized back into `format.dtype` once (the quantized model's values; rounded to it
/// when it is 16-bit). `path` and `name` name the tensor in the error for rows no block length of
/// the format tiles ([`beam_kernels::quant::QuantFormat::block_len`]).
pub fn held_as<B: Backend, const D: usize>(
    data: TensorData,
    format: WeightFormat,
    quant_in_place: bool,
    device: &B::Device,
    (path, name): (&Path, &str),
) -> Result<Weight<B, D>, LoadError> {
    use beam_kernels::quant::QuantTensor;
    let Some(quantization) = format.quantize else {
        return Ok(held(data, format.dtype, device).into());
    };
    let packing = quantization.format();
    let shape = data.shape.clone();
    let block = quant_block(quantization, &shape, (path, name))?;
    let dtype_error = |actual: DType| LoadError::Dtype {
        path: path.to_path_buf(),
        name: name.to_string(),
        expected: "F32, F16 or BF16 to quantize",
        actual: format!("{actual:?}"),
    };
    // Huge-page-backed buffers (see `weight_buffer`): decode streams these values.
    let n = data.num_elements();
    let (q, scales) = (
        weight_buffer::<i8>(n / packing.values_per_byte()),
        weight_buffer::<half::f16>(n / block),
    );
    let q = match data.dtype {
        DType::F32 => packing.quantize_into(
            data.as_slice::<f32>()
                .map_err(|_| dtype_error(data.dtype))?,
            block,
            q,
            scales,
        ),
        DType::BF16 => packing.quantize_into(
            data.as_slice::<half::bf16>()
                .map_err(|_| dtype_error(data.dtype))?,
            block,
            q,
            scales,
        ),
        DType::F16 => packing.quantize_into(
            data.as_slice::<half::f16>()
                .map_err(|_| dtype_error(data.dtype))?,
            block,
            q,
            scales,
        ),
        other => return Err(dtype_error(other)),
    };
    drop(data);
    if quant_in_place {
        let shape: [usize; D] = shape.as_slice().try_into().expect("a rank-D tensor");
        return Ok(Weight::quantized(QuantTensor::new(q, shape, device)));
    }
    let dequantized = TensorData::new(q.dequantize(), shape);
    let dequantized = match format.dtype {
        WeightDtype::F32 => dequantized,
        other => dequantized.convert_dtype(other.dtype()),
    };
    Ok(held(dequantized, format.dtype, device).into())
}

/// The block length of `quantization` for a weight of `shape`
/// ([`beam_kernels::quant::QuantFormat::block_len`] of its rows), or the [`LoadError::Quantize`]
/// naming the tensor.
fn quant_block(
    quantization: Quantization,
    shape: &[usize],
    (path, name): (&Path, &str),
) -> Result<usize, LoadError> {
    let row_len = shape.last().copied().unwrap_or(0);
    let need = match quantization {
        Quantization::Q8 => "a block of 8 to 32 values",
        Quantization::Q4 => "an even block of 8 to 32 values",
    };
    quantization
        .format()
        .block_len(row_len)
        .ok_or_else(|| LoadError::Quantize {
            path: path.to_path_buf(),
            name: name.to_string(),
            shape: shape.to_vec(),
            reason: format!(
                "rows of {row_len} values: {quantization} needs {need} that divides the row"
            ),
        })
}

/// Per-expert tensors ([`TensorStore::stacked_data`]) held as [`held_as`] holds them: when the
/// backend runs quantized weights in place, quantized expert by expert as they are read
/// ([`TensorStore::stacked_quant`]: the same packed values and scales, without the stacked buffer in
/// `format.dtype` that quantizing it whole needs); otherwise [`held_as`] of the stacked data.
/// `(path, name)` name the weight in errors, as for [`held_as`].
#[allow(clippy::too_many_arguments)]
pub fn stacked_held_as<B: Backend>(
    file: &TensorStore,
    parts: &[&(dyn Fn(usize) -> String + Sync)],
    experts: usize,
    [rows, cols]: [usize; 2],
    format: WeightFormat,
    quant_in_place: bool,
    device: &B::Device,
    (path, name): (&Path, &str),
) -> Result<Weight<B, 3>, LoadError> {
    if let (Some(quantization), true) = (format.quantize, quant_in_place) {
        let shape = [experts, parts.len() * rows, cols];
        let block = quant_block(quantization, &shape, (path, name))?;
        let q = file.stacked_quant(
            parts,
            experts,
            [rows, cols],
            format.dtype,
            (quantization.format(), block),
        )?;
        return Ok(Weight::quantized(beam_kernels::quant::QuantTensor::new(
            q, shape, device,
        )));
    }
    let data = file.stacked_data(parts, experts, [rows, cols], format.dtype)?;
    held_as(data, format, quant_in_place, device, (path, name))
}

/// `read(state, e, item)` for expert `e`'s `item` of `experts`, on rayon's pool (`state` from
/// `init`, one per rayon job): each copy first touches fresh pages of its buffer (zeroed by the
/// kernel) and of the mapping (read from the page cache or the disk), so cores that fault in
/// parallel load faster than one. Every expert is read; the error returned is the first
/// expert's in order, as a sequential loop would report it.
fn each_expert<I: Send, S>(
    experts: impl rayon::iter::IndexedParallelIterator<Item = I>,
    init: impl Fn() -> S + Sync + Send,
    read: impl Fn(&mut S, usize, I) -> Result<(), LoadError> + Sync + Send,
) -> Result<(), LoadError> {
    use rayon::prelude::*;
    let results: Vec<Result<(), LoadError>> = experts
        .enumerate()
        .map_init(init, |state, (e, item)| read(state, e, item))
        .collect();
    results.into_iter().collect()
}

/// Element types a tensor can be read into ([`TensorStore::read_into`]).
pub trait StoredFloat: bytemuck::Pod + burn::tensor::Element {
    /// The safetensors dtype whose bytes are this type's (copied, not converted).
    const STORED: Dtype;
    /// Rounds an `f32` to this type (round to nearest even).
    fn from_f32(value: f32) -> Self;
    /// Rounds an `f64` to this type.
    fn from_f64(value: f64) -> Self;
}

impl StoredFloat for f32 {
    const STORED: Dtype = Dtype::F32;
    fn from_f32(value: f32) -> Self {
        value
    }
    fn from_f64(value: f64) -> Self {
        value as f32
    }
}

impl StoredFloat for half::f16 {
    const STORED: Dtype = Dtype::F16;
    fn from_f32(value: f32) -> Self {
        half::f16::from_f32(value)
    }
    fn from_f64(value: f64) -> Self {
        half::f16::from_f64(value)
    }
}

impl StoredFloat for half::bf16 {
    const STORED: Dtype = Dtype::BF16;
    fn from_f32(value: f32) -> Self {
        half::bf16::from_f32(value)
    }
    fn from_f64(value: f64) -> Self {
        half::bf16::from_f64(value)
    }
}

/// What a checkpoint's headers describe ([`TensorStore::summary`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSummary {
    /// Safetensors files.
    pub files: usize,
    /// Their total size on disk.
    pub file_bytes: u64,
    /// Per dtype (`"BF16"`, `"F32"`, …).
    pub by_dtype: BTreeMap<String, DtypeSummary>,
    /// Files whose size does not match their header.
    pub bad_length: Vec<PathBuf>,
}

/// Tensors of one dtype in a [`StoreSummary`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DtypeSummary {
    /// Number of tensors.
    pub tensors: usize,
    /// Elements in them.
    pub elements: u64,
    /// Bytes they take.
    pub bytes: u64,
}

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
    /// A weight cannot be held in the requested quantized format.
    #[error("{}: tensor `{name}` (shape {shape:?}) cannot be quantized: {reason}", path.display())]
    Quantize {
        /// The file.
        path: PathBuf,
        /// The tensor name (a pattern such as `…experts.*.down_proj.weight` for stacked experts).
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Why.
        reason: String,
    },
}

/// The page size the mapping's `madvise` ranges are rounded to (whole pages inside a range to
/// release, from the page holding its start to prefetch).
const PAGE: usize = 4096;

/// The bytes of a shard's tensors: the file mapped into memory (pages are read from disk when a
/// tensor is first touched, and shared with the page cache), or a buffer already in memory.
enum ShardData {
    /// Shared with the tensors borrowed from it ([`TensorStore::borrowed`]), which keep it
    /// mapped after the store is gone.
    Mapped(Arc<memmap2::Mmap>),
    Owned(Vec<u8>),
}

/// A tensor's bytes inside a shard's mapping: what a borrowed tensor's storage is (the mapping
/// stays alive as long as one of them does).
struct MappedRange {
    map: Arc<memmap2::Mmap>,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for MappedRange {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

impl ShardData {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned(bytes) => bytes,
        }
    }
}

impl std::fmt::Debug for ShardData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Self::Mapped(_) => "mapped",
            Self::Owned(_) => "owned",
        };
        write!(f, "{kind} ({} bytes)", self.bytes().len())
    }
}

/// One safetensors file: its parsed header, and its bytes unless the store was opened for
/// headers only.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    /// Offset of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
    /// Bytes the header says the data section holds.
    data_len: usize,
    /// Size of the file (or buffer).
    file_len: u64,
    tensors: Vec<(String, TensorInfo)>,
    metadata: Option<std::collections::HashMap<String, String>>,
    data: Option<ShardData>,
}

/// A zeroed buffer of `len` floats for a weight about to be written. On Linux, buffers of several
/// MB are marked for transparent huge pages (`MADV_HUGEPAGE`, effective where the system's THP mode
/// is `madvise` or `always`): filling a multi-GB weight then takes thousands of page faults instead
/// of millions, which was most of the load time.
fn weight_buffer<T: bytemuck::Zeroable + Clone>(len: usize) -> Vec<T> {
    // Zeroed by the allocator (fresh pages from the OS are zero already, so nothing is written
    // twice: the pages are first touched when the tensor is copied in).
    let values: Vec<T> = bytemuck::allocation::zeroed_vec(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (start, bytes) = (values.as_ptr() as usize, len * std::mem::size_of::<T>());
        let aligned = start.next_multiple_of(HUGE);
        let end = (start + bytes) / HUGE * HUGE;
        if end > aligned {
            // SAFETY: the range lies inside `values`' allocation; MADV_HUGEPAGE only changes how
            // the kernel backs the pages, never their contents.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    values
}

/// `data` (in `dtype`) as a tensor on `device`: in `dtype` for 16-bit weights, in the backend's
/// default float for `F32` (so an `f64` backend gets `f64` weights).
pub fn held<B: Backend, const D: usize>(
    data: TensorData,
    dtype: WeightDtype,
    device: &B::Device,
) -> Tensor<B, D> {
    match dtype {
        WeightDtype::F32 => Tensor::from_data(data, device),
        WeightDtype::F16 | WeightDtype::BF16 => Tensor::from_data(data, (device, dtype.dtype())),
    }
}

/// [`LoadError::Shape`] unless the header gives `name` the shape `expected`.
fn shape_matches(
    path: &Path,
    name: &str,
    info: &TensorInfo,
    expected: &[usize],
) -> Result<(), LoadError> {
    if info.shape == expected {
        return Ok(());
    }
    Err(LoadError::Shape {
        path: path.to_path_buf(),
        name: name.to_string(),
        expected: expected.to_vec(),
        actual: info.shape.clone(),
    })
}

/// The 256 values of `float8_e4m3fn` (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
/// infinities, `S.1111.111` is NaN), by bit pattern.
fn fp8_e4m3_table() -> [f32; 256] {
    std::array::from_fn(|bits| {
        let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        let exponent = ((bits >> 3) & 0xF) as i32;
        let mantissa = (bits & 0x7) as f32;
        let magnitude = match (exponent, mantissa as u32) {
            (15, 7) => f32::NAN,
            (0, _) => mantissa / 8.0 * 2f32.powi(-6),
            _ => (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7),
        };
        sign * magnitude
    })
}

/// Header size limit (as the safetensors crate's): a corrupted length field cannot make the
/// reader allocate more.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The header length stored in a file's first 8 bytes, checked against the limit and the file.
fn header_len(path: &Path, len: [u8; 8], file_len: u64) -> Result<usize, LoadError> {
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(LoadError::Format {
            path: path.to_path_buf(),
            reason: format!("header length {header_len} does not fit the file ({file_len} bytes)"),
        });
    }
    Ok(header_len as usize)
}

impl Shard {
    /// Reads the header of `path`; with `map`, also maps the file and checks that its size is what
    /// the header says.
    fn open(path: &Path, map: bool) -> Result<Self, LoadError> {
        use std::io::Read;
        let io = |source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let format = |reason: String| LoadError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| format(format!("{file_len} bytes: too short for a header")))?;
        let header_len = header_len(path, len, file_len)?;
        let mut header = vec![0u8; header_len];
        file.read_exact(&mut header).map_err(io)?;
        let mut shard = Self::from_header(path, &header, file_len)?;
        if map {
            shard.check_length()?;
            // SAFETY: the mapping is read-only and private. Like every reader that maps model
            // files (safetensors, llama.cpp), this assumes nobody truncates or rewrites the file
            // while it is loaded; the header was checked against the file's size above.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            // Transparent huge pages for the page cache's copy of the file where the kernel and
            // file system give them (Linux 6.x, ext4/xfs large folios): weights read in place
            // then take one TLB entry and one fault per 2 MB instead of per 4 KB (16-layer
            // OLMoE-shaped bf16 decode: the copied weights' speed instead of 10-15 % below it,
            // docs/BENCHMARKS.md session 18).
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            shard.data = Some(ShardData::Mapped(Arc::new(map)));
        }
        Ok(shard)
    }

    /// A shard whose bytes are already in memory: the same checks as [`open`](Self::open).
    fn from_bytes(path: PathBuf, bytes: Vec<u8>) -> Result<Self, LoadError> {
        let file_len = bytes.len() as u64;
        let len = bytes.get(..8).ok_or_else(|| LoadError::Format {
            path: path.clone(),
            reason: format!("{file_len} bytes: too short for a header"),
        })?;
        let header_len = header_len(&path, len.try_into().expect("8 bytes"), file_len)?;
        let mut shard = Self::from_header(&path, &bytes[8..8 + header_len], file_len)?;
        shard.check_length()?;
        shard.data = Some(ShardData::Owned(bytes));
        Ok(shard)
    }

    /// Parses and validates the JSON header (offsets contiguous and sized by dtype and shape).
    fn from_header(path: &Path, header: &[u8], file_len: u64) -> Result<Self, LoadError> {
        let format = |reason: String| LoadError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::str::from_utf8(header).map_err(|e| format(format!("header: {e}")))?;
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_str(text).map_err(|e| format(format!("header: {e}")))?;
        let tensors: Vec<(String, TensorInfo)> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        let data_len = tensors
            .iter()
            .map(|(_, info)| info.data_offsets.1)
            .max()
            .unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            data_start: 8 + header.len(),
            data_len,
            file_len,
            tensors,
            metadata: metadata.metadata().clone(),
            data: None,
        })
    }

    /// The file must be exactly header + data long (a truncated download fails here).
    fn check_length(&self) -> Result<(), LoadError> {
        let needed = (self.data_start + self.data_len) as u64;
        if needed == self.file_len {
            return Ok(());
        }
        Err(LoadError::Format {
            path: self.path.clone(),
            reason: format!(
                "the header describes {needed} bytes, the file has {} (truncated or padded)",
                self.file_len
            ),
        })
    }

    /// The bytes of a tensor described by this shard's header.
    fn data(&self, name: &str, info: &TensorInfo) -> Result<&[u8], LoadError> {
        let data = self.data.as_ref().ok_or_else(|| LoadError::Format {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: the store was opened for headers only"),
        })?;
        let (start, end) = info.data_offsets;
        Ok(&data.bytes()[self.data_start + start..self.data_start + end])
    }

    /// Drops the process's mapping of `bytes` (a range of this shard's mapping) once a tensor has
    /// been converted, so the mapped pages stop counting towards the resident set; the kernel keeps
    /// them in its page cache.
    #[cfg(unix)]
    fn release(&self, bytes: &[u8]) {
        let Some(ShardData::Mapped(map)) = &self.data else {
            return;
        };
        let offset = bytes.as_ptr() as usize - map.as_ptr() as usize;
        // Whole pages inside the range only.
        let start = offset.div_ceil(PAGE) * PAGE;
        let end = (offset + bytes.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: nothing borrows these bytes any more (the caller has finished converting
            // them); a read-only private file mapping re-reads dropped pages from the file on the
            // next access, so later reads still see the file's contents.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }

    #[cfg(not(unix))]
    fn release(&self, _bytes: &[u8]) {}

    /// `MADV_WILLNEED` over a tensor's bytes (see [`TensorStore::prefetch`]).
    #[cfg(unix)]
    fn prefetch(&self, info: &TensorInfo) {
        let Some(ShardData::Mapped(map)) = &self.data else {
            return;
        };
        let (start, end) = info.data_offsets;
        let start = (self.data_start + start) / PAGE * PAGE;
        let end = (self.data_start + end).min(map.len());
        if end > start {
            let _ = map.advise_range(memmap2::Advice::WillNeed, start, end - start);
        }
    }

    #[cfg(not(unix))]
    fn prefetch(&self, _info: &TensorInfo) {}
}

/// The tensors of a checkpoint: one safetensors file, or the shards listed by
/// `model.safetensors.index.json`. Remembers which tensors were read, so a loader can report the
/// ones it did not expect.
#[derive(Debug)]
pub struct TensorStore {
    shards: Vec<Shard>,
    /// Tensor name → (shard, header entry); each header is parsed once, when the store is built.
    index: BTreeMap<String, (usize, TensorInfo)>,
    used: Mutex<BTreeSet<String>>,
    /// Block size of FP8 weights' `weight_scale_inv` ([`Self::set_fp8_block`]).
    fp8_block: Option<[usize; 2]>,
}

impl TensorStore {
    /// A single safetensors file, memory-mapped: tensor bytes are read from disk when they are
    /// first used, never copied whole into memory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        Self::from_shards(vec![Shard::open(path.as_ref(), true)?])
    }

    /// A single safetensors file's header only: names, dtypes, shapes and metadata, without
    /// reading (or even checking the presence of) tensor data. Reading a tensor from such a store
    /// is a [`LoadError::Format`].
    pub fn open_header(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        Self::from_shards(vec![Shard::open(path.as_ref(), false)?])
    }

    /// A safetensors file already in memory; `path` names it in errors.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, LoadError> {
        Self::from_shards(vec![Shard::from_bytes(path.into(), bytes)?])
    }

    /// The checkpoint in a Hugging Face folder: `model.safetensors.index.json` and its shards if
    /// present, else `model.safetensors`; every file memory-mapped.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self, LoadError> {
        Self::open_dir_with(dir.as_ref(), true)
    }

    /// The headers of the checkpoint in a Hugging Face folder (see [`open_header`](Self::open_header)):
    /// what `beam info` reads, whatever the size of the weights.
    pub fn open_dir_headers(dir: impl AsRef<Path>) -> Result<Self, LoadError> {
        Self::open_dir_with(dir.as_ref(), false)
    }

    fn open_dir_with(dir: &Path, map_data: bool) -> Result<Self, LoadError> {
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.exists() {
            return Self::from_shards(vec![Shard::open(&dir.join("model.safetensors"), map_data)?]);
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
            .map(|file| Shard::open(&dir.join(file), map_data))
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

    fn from_shards(shards: Vec<Shard>) -> Result<Self, LoadError> {
        let mut index = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for (name, info) in &shard.tensors {
                index.insert(name.clone(), (i, info.clone()));
            }
        }
        Ok(Self {
            shards,
            index,
            used: Mutex::new(BTreeSet::new()),
            fp8_block: None,
        })
    }

    /// The `__metadata__` map of the (first) file's header.
    pub fn metadata(&self) -> Option<&std::collections::HashMap<String, String>> {
        self.shards.first().and_then(|s| s.metadata.as_ref())
    }

    /// What the headers say, without reading tensor data: tensors, elements and bytes per dtype,
    /// and the files whose size does not match their header (truncated or padded).
    pub fn summary(&self) -> StoreSummary {
        let mut by_dtype: BTreeMap<String, DtypeSummary> = BTreeMap::new();
        for (_, info) in self.index.values() {
            let entry = by_dtype.entry(format!("{:?}", info.dtype)).or_default();
            entry.tensors += 1;
            entry.elements += info.shape.iter().product::<usize>() as u64;
            entry.bytes += (info.data_offsets.1 - info.data_offsets.0) as u64;
        }
        StoreSummary {
            files: self.shards.len(),
            file_bytes: self.shards.iter().map(|s| s.file_len).sum(),
            by_dtype,
            bad_length: self
                .shards
                .iter()
                .filter(|s| s.check_length().is_err())
                .map(|s| s.path.clone())
                .collect(),
        }
    }

    /// The files the store reads (the shards, in index order, or the single file) with their
    /// sizes in bytes.
    pub fn files(&self) -> Vec<(PathBuf, u64)> {
        self.shards
            .iter()
            .map(|s| (s.path.clone(), s.file_len))
            .collect()
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    /// Accepts FP8 (`F8_E4M3`) weights, each dequantized on read with its `{name}_scale_inv`
    /// block scales (`[⌈rows / block[0]⌉, ⌈cols / block[1]⌉]`, f32): `w = q · scale_inv[block]`,
    /// as DeepSeek-V3 ships them (`quantization_config.weight_block_size`). Without it an FP8
    /// tensor is a dtype error.
    pub fn set_fp8_block(&mut self, block: Option<[usize; 2]>) {
        self.fp8_block = block;
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

    /// Asks the kernel to start reading every mapped tensor whose name starts with `prefix` into
    /// its page cache (`MADV_WILLNEED`), and returns once the reads are queued, not done. A loader
    /// calls it for the next layer from another thread while it copies this one, so the disk and
    /// the copies overlap instead of taking turns at each page fault. Reads nothing for a store
    /// opened for headers only or held in memory; a hint, never an error.
    pub fn prefetch(&self, prefix: &str) {
        for (_, (shard, info)) in self.with_prefix(prefix) {
            self.shards[*shard].prefetch(info);
        }
    }

    /// The names starting with `prefix`, sorted (`model.layers.1.` is not `model.layers.10.`'s
    /// prefix).
    pub fn names_with_prefix<'a>(&'a self, prefix: &'a str) -> Vec<&'a str> {
        self.with_prefix(prefix)
            .map(|(name, _)| name.as_str())
            .collect()
    }

    fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a (usize, TensorInfo))> + 'a {
        use std::ops::Bound;
        self.index
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(name, _)| name.starts_with(prefix))
    }

    /// Tensors never read so far, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().expect("the used-tensor set");
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

    fn entry(&self, name: &str) -> Result<(&Shard, &TensorInfo), LoadError> {
        let (shard, info) = self.index.get(name).ok_or_else(|| LoadError::Missing {
            path: self.path_of(name).to_path_buf(),
            name: name.to_string(),
        })?;
        Ok((&self.shards[*shard], info))
    }

    /// Records that `name` was read (see [`Self::unused`]).
    fn mark_used(&self, name: &str) {
        self.used
            .lock()
            .expect("the used-tensor set")
            .insert(name.to_string());
    }

    fn view<T>(
        &self,
        name: &str,
        read: impl FnOnce(&Path, &TensorInfo, &[u8]) -> Result<T, LoadError>,
    ) -> Result<T, LoadError> {
        let (shard, info) = self.entry(name)?;
        let bytes = shard.data(name, info)?;
        self.mark_used(name);
        let out = read(&shard.path, info, bytes);
        shard.release(bytes);
        out
    }

    /// Checks a tensor's shape against `expected` from the header alone (no data is read; the
    /// tensor counts as used): the [`LoadError::Shape`] every read reports.
    pub fn check_shape(&self, name: &str, expected: &[usize]) -> Result<(), LoadError> {
        let (shard, info) = self.entry(name)?;
        self.mark_used(name);
        shape_matches(&shard.path, name, info, expected)
    }

    /// Shape of a tensor (from the header; no data is read).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        let (_, info) = self.entry(name)?;
        self.mark_used(name);
        Ok(info.shape.clone())
    }

    /// A float tensor as f32 values, checked against `expected` shape.
    pub fn f32_values(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        let mut values = weight_buffer(expected.iter().product());
        self.read_f32_into(name, expected, &mut values)?;
        Ok(values)
    }

    /// Converts a float tensor of shape `expected` straight into `out` (`expected`'s element
    /// count long): no intermediate buffer, the mapped pages released afterwards.
    ///
    /// # Panics
    /// If `out` is not `expected`'s element count long (a caller bug).
    pub fn read_f32_into(
        &self,
        name: &str,
        expected: &[usize],
        out: &mut [f32],
    ) -> Result<(), LoadError> {
        self.read_into(name, expected, out)
    }

    /// Reads a float tensor of shape `expected` straight into `out` in `T`'s precision: a copy of
    /// the stored bytes when they are `T`'s, else each value rounded to `T` (from f32, f16, bf16
    /// or f64). No intermediate buffer; the mapped pages are released afterwards.
    ///
    /// # Panics
    /// If `out` is not `expected`'s element count long (a caller bug).
    pub fn read_into<T: StoredFloat>(
        &self,
        name: &str,
        expected: &[usize],
        out: &mut [T],
    ) -> Result<(), LoadError> {
        assert_eq!(
            out.len(),
            expected.iter().product::<usize>(),
            "{name}: buffer size"
        );
        if self.entry(name)?.1.dtype == Dtype::F8_E4M3 {
            return self.read_fp8_into(name, expected, out);
        }
        self.view(name, |path, info, bytes| {
            shape_matches(path, name, info, expected)?;
            macro_rules! convert {
                ($width:literal, $f:expr) => {
                    for (o, b) in out.iter_mut().zip(bytes.chunks_exact($width)) {
                        *o = $f(b.try_into().expect("chunk width"));
                    }
                };
            }
            match info.dtype {
                // safetensors is little-endian: the stored bytes are `T`'s on such hosts.
                stored if stored == T::STORED && cfg!(target_endian = "little") => {
                    bytemuck::cast_slice_mut::<T, u8>(out).copy_from_slice(bytes)
                }
                Dtype::F32 => convert!(4, |b| T::from_f32(f32::from_le_bytes(b))),
                Dtype::F16 => convert!(2, |b| T::from_f32(half::f16::from_le_bytes(b).to_f32())),
                Dtype::BF16 => convert!(2, |b| T::from_f32(half::bf16::from_le_bytes(b).to_f32())),
                Dtype::F64 => convert!(8, |b| T::from_f64(f64::from_le_bytes(b))),
                other => {
                    return Err(LoadError::Dtype {
                        path: path.to_path_buf(),
                        name: name.to_string(),
                        expected: "F32, F16, BF16 or F64",
                        actual: format!("{other:?}"),
                    })
                }
            }
            Ok(())
        })
    }

    /// [`Self::read_into`] for an `F8_E4M3` tensor: each value times its block's scale from
    /// `{name}_scale_inv`, rounded once to `T`.
    fn read_fp8_into<T: StoredFloat>(
        &self,
        name: &str,
        expected: &[usize],
        out: &mut [T],
    ) -> Result<(), LoadError> {
        let (shard, info) = self.entry(name)?;
        let (Some([block_rows, block_cols]), &[rows, cols]) = (self.fp8_block, expected) else {
            return Err(LoadError::Dtype {
                path: shard.path.clone(),
                name: name.to_string(),
                expected: if self.fp8_block.is_none() {
                    "F32, F16, BF16 or F64 (F8_E4M3 needs an fp8 quantization_config)"
                } else {
                    "F32, F16, BF16 or F64 (F8_E4M3 only for 2-D weights)"
                },
                actual: format!("{:?}", info.dtype),
            });
        };
        shape_matches(&shard.path, name, info, expected)?;
        let scale_name = format!("{name}_scale_inv");
        let scale_shape = [rows.div_ceil(block_rows), cols.div_ceil(block_cols)];
        let scales = self.f32_values(&scale_name, &scale_shape)?;
        let table = fp8_e4m3_table();
        self.view(name, |_, _, bytes| {
            for (row, (out, bytes)) in out
                .chunks_exact_mut(cols.max(1))
                .zip(bytes.chunks_exact(cols.max(1)))
                .enumerate()
            {
                let scale_row = &scales[(row / block_rows) * scale_shape[1]..];
                for (col, (o, &b)) in out.iter_mut().zip(bytes).enumerate() {
                    *o = T::from_f32(table[b as usize] * scale_row[col / block_cols]);
                }
            }
            Ok(())
        })
    }

    /// A float tensor of shape `expected` as [`TensorData`] in precision `dtype`.
    pub fn data(
        &self,
        name: &str,
        expected: &[usize],
        dtype: WeightDtype,
    ) -> Result<TensorData, LoadError> {
        fn read<T: StoredFloat>(
            store: &TensorStore,
            name: &str,
            expected: &[usize],
        ) -> Result<TensorData, LoadError> {
            let mut values = weight_buffer::<T>(expected.iter().product());
            store.read_into(name, expected, &mut values)?;
            Ok(TensorData::new(values, expected.to_vec()))
        }
        match dtype {
            WeightDtype::F32 => read::<f32>(self, name, expected),
            WeightDtype::F16 => read::<half::f16>(self, name, expected),
            WeightDtype::BF16 => read::<half::bf16>(self, name, expected),
        }
    }

    /// A float tensor of shape `expected` in precision `dtype`, borrowed from the mapped file
    /// instead of copied: `Ok(Some(data))` whose bytes are the file's (burn's
    /// [`Bytes::from_shared`](burn::tensor::Bytes::from_shared); a backend that keeps such
    /// bytes, burn's Flex, then reads the page cache in place, and writes to them copy first).
    /// `Ok(None)` when they cannot be borrowed — stored in another dtype, the store not mapped,
    /// a big-endian host, or bytes not aligned for the element type — and [`Self::data`] must
    /// read them. A missing tensor or a shape other than `expected` is the error `data` gives.
    pub fn borrowed(
        &self,
        name: &str,
        expected: &[usize],
        dtype: WeightDtype,
    ) -> Result<Option<TensorData>, LoadError> {
        let (shard, info) = self.entry(name)?;
        shape_matches(&shard.path, name, info, expected)?;
        let Some(ShardData::Mapped(map)) = &shard.data else {
            return Ok(None);
        };
        let stored = match dtype {
            WeightDtype::F32 => Dtype::F32,
            WeightDtype::F16 => Dtype::F16,
            WeightDtype::BF16 => Dtype::BF16,
        };
        let (start, end) = info.data_offsets;
        let range = shard.data_start + start..shard.data_start + end;
        let aligned = (map.as_ptr() as usize + range.start).is_multiple_of(dtype.bytes());
        if info.dtype != stored || !aligned || cfg!(target_endian = "big") {
            return Ok(None);
        }
        self.mark_used(name);
        let owner = MappedRange {
            map: Arc::clone(map),
            range,
        };
        let bytes = burn::tensor::Bytes::from_shared(
            bytes::Bytes::from_owner(owner),
            burn::tensor::AllocationProperty::File,
        );
        Ok(Some(TensorData::from_bytes(
            bytes,
            expected.to_vec(),
            dtype.dtype(),
        )))
    }

    /// [`Self::borrowed`] when `borrow` and the tensor can be, else [`Self::data`].
    pub fn data_or_borrowed(
        &self,
        name: &str,
        expected: &[usize],
        dtype: WeightDtype,
        borrow: bool,
    ) -> Result<TensorData, LoadError> {
        if borrow {
            if let Some(data) = self.borrowed(name, expected, dtype)? {
                return Ok(data);
            }
        }
        self.data(name, expected, dtype)
    }

    /// Whether `bytes` lie inside one of the store's mapped files (a borrowed tensor's storage
    /// does; a copy does not).
    pub fn maps(&self, bytes: &[u8]) -> bool {
        let (start, end) = (
            bytes.as_ptr() as usize,
            bytes.as_ptr() as usize + bytes.len(),
        );
        self.shards.iter().any(|shard| match &shard.data {
            Some(ShardData::Mapped(map)) => {
                let base = map.as_ptr() as usize;
                start >= base && end <= base + map.len()
            }
            _ => false,
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

    /// A float tensor of shape `expected` on `device`, in `f32`.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, LoadError> {
        self.tensor_as(name, expected, WeightDtype::F32, device)
    }

    /// A float tensor of shape `expected` on `device`, held in `dtype` (the backend must support
    /// it: [`Backend::supports_dtype`]). `F32` means the backend's default float: `f32`, or `f64`
    /// on an `f64` backend such as `NdArray<f64>` (widened exactly).
    pub fn tensor_as<B: Backend, const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        dtype: WeightDtype,
        device: &B::Device,
    ) -> Result<Tensor<B, D>, LoadError> {
        let data = self.data(name, &expected, dtype)?;
        Ok(held(data, dtype, device))
    }

    /// A float parameter of shape `expected` on `device`, in `f32`.
    pub fn param<B: Backend, const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Param<Tensor<B, D>>, LoadError> {
        self.tensor(name, expected, device).map(Param::from_tensor)
    }

    /// A float parameter of shape `expected` on `device`, held in `dtype`.
    pub fn param_as<B: Backend, const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        dtype: WeightDtype,
        device: &B::Device,
    ) -> Result<Param<Tensor<B, D>>, LoadError> {
        self.tensor_as(name, expected, dtype, device)
            .map(Param::from_tensor)
    }

    /// Per-expert tensors stacked into one `[E, parts · rows, cols]` buffer of `f32`: expert
    /// `e`'s block holds `parts[0](e)`, then `parts[1](e)`, … (each `[rows, cols]`), converted
    /// straight into place. `[gate, up]` gives transformers' fused `gate_up_proj` layout.
    pub fn stacked(
        &self,
        parts: &[&(dyn Fn(usize) -> String + Sync)],
        experts: usize,
        [rows, cols]: [usize; 2],
    ) -> Result<Vec<f32>, LoadError> {
        self.stacked_into::<f32>(parts, experts, [rows, cols])
    }

    /// [`Self::stacked`] in precision `dtype`, as `[E, parts · rows, cols]` [`TensorData`]: each
    /// per-expert tensor copied (or converted) once, straight into its place.
    pub fn stacked_data(
        &self,
        parts: &[&(dyn Fn(usize) -> String + Sync)],
        experts: usize,
        [rows, cols]: [usize; 2],
        dtype: WeightDtype,
    ) -> Result<TensorData, LoadError> {
        let shape = vec![experts, parts.len() * rows, cols];
        Ok(match dtype {
            WeightDtype::F32 => TensorData::new(
                self.stacked_into::<f32>(parts, experts, [rows, cols])?,
                shape,
            ),
            WeightDtype::F16 => TensorData::new(
                self.stacked_into::<half::f16>(parts, experts, [rows, cols])?,
                shape,
            ),
            WeightDtype::BF16 => TensorData::new(
                self.stacked_into::<half::bf16>(parts, experts, [rows, cols])?,
                shape,
            ),
        })
    }

    /// [`Self::stacked_data`] quantized (`format`, blocks of `block`, which must suit the format
    /// and divide `cols`) as it is read: each expert's parts read into a buffer in `dtype` (the
    /// values `stacked_data` holds) and quantized straight into their place, experts on rayon's
    /// pool. The same packed values and scales as quantizing `stacked_data`'s buffer whole,
    /// without that buffer (the whole weight in `dtype`).
    ///
    /// # Panics
    /// If `block` does not suit `format` or does not divide `cols` (callers take it from
    /// [`beam_kernels::quant::QuantFormat::block_len`]).
    pub fn stacked_quant(
        &self,
        parts: &[&(dyn Fn(usize) -> String + Sync)],
        experts: usize,
        [rows, cols]: [usize; 2],
        dtype: WeightDtype,
        (format, block): (beam_kernels::quant::QuantFormat, usize),
    ) -> Result<beam_kernels::quant::QuantWeights, LoadError> {
        assert!(
            block > 0
                && block.is_multiple_of(format.values_per_byte())
                && cols.is_multiple_of(block),
            "{format} blocks tile the rows"
        );
        let shape = [rows, cols];
        match dtype {
            WeightDtype::F32 => self.stacked_quant_as::<f32>(parts, experts, shape, format, block),
            WeightDtype::F16 => {
                self.stacked_quant_as::<half::f16>(parts, experts, shape, format, block)
            }
            WeightDtype::BF16 => {
                self.stacked_quant_as::<half::bf16>(parts, experts, shape, format, block)
            }
        }
    }

    fn stacked_quant_as<T: StoredFloat + Into<f32>>(
        &self,
        parts: &[&(dyn Fn(usize) -> String + Sync)],
        experts: usize,
        [rows, cols]: [usize; 2],
        format: beam_kernels::quant::QuantFormat,
        block: usize,
    ) -> Result<beam_kernels::quant::QuantWeights, LoadError> {
        use rayon::prelude::*;
        let part = rows * cols;
        let per_expert = parts.len() * part;
        let per_byte = format.values_per_byte();
        let mut values = weight_buffer::<i8>(experts * per_expert / per_byte);
        let mut scales = weight_buffer::<half::f16>(experts * per_expert / block);
        if part > 0 {
            let (blocks, bytes) = (part / block, part / per_byte);
            let experts = values
                .par_chunks_exact_mut(per_expert / per_byte)
                .zip(scales.par_chunks_exact_mut(per_expert / block));
            // One buffer of an expert part's values in `T` per rayon job, reused across experts.
            each_expert(
                experts,
                || vec![T::zeroed(); part],
                |held, e, (q, s)| {
                    for (p, name) in parts.iter().enumerate() {
                        self.read_into(&name(e), &[rows, cols], held)?;
                        format.quantize_slice(
                            held,
                            block,
                            &mut q[p * bytes..(p + 1) * bytes],
                            &mut s[p * blocks..(p + 1) * blocks],
                        );
                    }
                    Ok(())
                },
            )?;
        }
        Ok(beam_kernels::quant::QuantWeights {
            format,
            values,
            scales,
            block,
        })
    }

    fn stacked_into<T: StoredFloat>(
        &self,
        parts: &[&(dyn Fn(usize) -> String + Sync)],
        experts: usize,
        [rows, cols]: [usize; 2],
    ) -> Result<Vec<T>, LoadError> {
        use rayon::prelude::*;
        let part = rows * cols;
        let mut values = weight_buffer::<T>(experts * parts.len() * part);
        if part == 0 {
            return Ok(values);
        }
        each_expert(
            values.par_chunks_exact_mut(parts.len() * part),
            || (),
            |_, e, block| {
                for (name, out) in parts.iter().zip(block.chunks_exact_mut(part)) {
                    self.read_into(&name(e), &[rows, cols], out)?;
                }
                Ok(())
            },
        )?;
        Ok(values)
    }

    /// The precision most of the checkpoint's float bytes are stored in (what loading keeps by
    /// default); `None` when it holds no float tensor.
    pub fn stored_weight_dtype(&self) -> Option<WeightDtype> {
        let mut bytes: BTreeMap<WeightDtype, u64> = BTreeMap::new();
        for shard in &self.shards {
            for (_, info) in &shard.tensors {
                if let Some(dtype) = WeightDtype::of_stored(info.dtype) {
                    *bytes.entry(dtype).or_default() +=
                        (info.data_offsets.1 - info.data_offsets.0) as u64;
                }
            }
        }
        bytes
            .into_iter()
            // Ties go to the wider precision.
            .max_by_key(|&(dtype, size)| (size, std::cmp::Reverse(dtype)))
            .map(|(dtype, _)| dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn fp8_e4m3fn_values_are_the_formats() {
        let t = fp8_e4m3_table();
        // 1.0, the largest normal (448), the smallest normal (2^-6) and subnormal (2^-9), signs.
        assert_eq!(t[0x38], 1.0);
        assert_eq!(t[0xB8], -1.0);
        assert_eq!(t[0x7E], 448.0);
        assert_eq!(t[0x08], 2f32.powi(-6));
        assert_eq!(t[0x01], 2f32.powi(-9));
        assert_eq!(t[0x00], 0.0);
        assert!(t[0x7F].is_nan() && t[0xFF].is_nan());
        // Every other pattern is finite, and the positive ones increase with their bits.
        assert_eq!(t.iter().filter(|v| v.is_nan()).count(), 2);
        assert!(t[..0x7F].windows(2).all(|w| w[0] < w[1]));
    }

    fn q8() -> WeightFormat {
        quantized(Quantization::Q8)
    }

    fn quantized(quantization: Quantization) -> WeightFormat {
        WeightFormat {
            dtype: WeightDtype::F32,
            quantize: Some(quantization),
        }
    }

    fn data(shape: [usize; 2]) -> TensorData {
        let n = shape[0] * shape[1];
        TensorData::new(
            (0..n).map(|i| (i as f32 * 0.3).sin()).collect::<Vec<f32>>(),
            shape,
        )
    }

    #[test]
    fn rows_no_q8_block_tiles_are_a_typed_error_naming_the_tensor() {
        let err = held_as::<Flex, 2>(
            data([3, 37]),
            q8(),
            true,
            &Default::default(),
            (Path::new("model.safetensors"), "lm_head.weight"),
        )
        .map(|_| ())
        .unwrap_err();
        assert!(
            matches!(&err, LoadError::Quantize { name, shape, .. } if name == "lm_head.weight" && shape == &[3, 37]),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("model.safetensors") && message.contains("37"),
            "{message}"
        );
        // Rows of 27: a q8 block (27) but no even q4 one.
        let place = (
            Path::new("model.safetensors"),
            "model.layers.0.mlp.down_proj.weight",
        );
        let device = Default::default();
        assert!(held_as::<Flex, 2>(data([2, 27]), q8(), true, &device, place).is_ok());
        let err = held_as::<Flex, 2>(
            data([2, 27]),
            quantized(Quantization::Q4),
            true,
            &device,
            place,
        )
        .map(|_| ())
        .unwrap_err();
        assert!(
            matches!(&err, LoadError::Quantize { name, shape, .. } if name == place.1 && shape == &[2, 27]),
            "{err}"
        );
        assert!(err.to_string().contains("q4 needs an even block"), "{err}");
    }

    #[test]
    fn a_non_float_weight_is_a_typed_dtype_error() {
        let ints = TensorData::new(vec![1i32; 64], [2, 32]);
        let err = held_as::<Flex, 2>(
            ints,
            q8(),
            true,
            &Default::default(),
            (Path::new("model.safetensors"), "w"),
        )
        .map(|_| ())
        .unwrap_err();
        assert!(matches!(err, LoadError::Dtype { .. }), "{err}");
    }

    /// `borrowed` hands out the mapped file's own bytes where their dtype and alignment allow,
    /// and says `None` (never a misaligned slice) where they do not.
    #[test]
    fn borrowed_tensors_are_the_mapped_bytes_where_dtype_and_alignment_allow() {
        let b: Vec<u8> = [1.5f32, -2.25, 3.0, 0.375]
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let c: Vec<u8> = [0.5f32, -7.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        // `c` (F32) starts 10 bytes into the data section: aligned for 2-byte values only.
        let mut header = String::from(
            r#"{"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"BF16","shape":[2,2],"data_offsets":[2,10]},"c":{"dtype":"F32","shape":[2],"data_offsets":[10,18]}}"#,
        );
        while (8 + header.len()) % 8 != 0 {
            header.push(' ');
        }
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(&half::bf16::from_f32(9.0).to_le_bytes());
        file.extend_from_slice(&b);
        file.extend_from_slice(&c);
        let path =
            std::env::temp_dir().join(format!("beam-borrow-{}.safetensors", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        let store = TensorStore::open(&path).unwrap();

        let held = store
            .borrowed("b", &[2, 2], WeightDtype::BF16)
            .unwrap()
            .expect("bf16, aligned");
        assert!(store.maps(&held.bytes), "the file's bytes, not a copy");
        assert_eq!(held.dtype, DType::BF16);
        let read = store.data("b", &[2, 2], WeightDtype::BF16).unwrap();
        assert!(!store.maps(&read.bytes));
        assert_eq!(
            held.as_slice::<half::bf16>().unwrap(),
            read.as_slice::<half::bf16>().unwrap()
        );
        // Another dtype, or bytes misaligned for the element: not borrowed; read instead.
        assert!(store
            .borrowed("b", &[2, 2], WeightDtype::F32)
            .unwrap()
            .is_none());
        assert!(store
            .borrowed("c", &[2], WeightDtype::F32)
            .unwrap()
            .is_none());
        let c_read = store
            .data_or_borrowed("c", &[2], WeightDtype::F32, true)
            .unwrap();
        assert_eq!(c_read.as_slice::<f32>().unwrap(), &[0.5, -7.0]);
        let b_wide = store
            .data_or_borrowed("b", &[2, 2], WeightDtype::F32, true)
            .unwrap();
        assert_eq!(b_wide.as_slice::<f32>().unwrap(), &[1.5, -2.25, 3.0, 0.375]);
        // The errors a read gives.
        assert!(matches!(
            store.borrowed("b", &[4], WeightDtype::BF16),
            Err(LoadError::Shape { .. })
        ));
        assert!(matches!(
            store.borrowed("missing", &[1], WeightDtype::BF16),
            Err(LoadError::Missing { .. })
        ));
        // A store in memory (not mapped) never lends.
        let owned = TensorStore::from_bytes(&path, file).unwrap();
        assert!(owned
            .borrowed("b", &[2, 2], WeightDtype::BF16)
            .unwrap()
            .is_none());
        // The borrowed tensor keeps the mapping alive after the store is gone.
        drop(store);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            held.as_slice::<half::bf16>().unwrap(),
            [1.5f32, -2.25, 3.0, 0.375].map(half::bf16::from_f32)
        );
    }

    /// A safetensors file of `experts` experts' `gate`/`up` (`[rows, cols]`) in `stored`, with
    /// varied values (not zeros, different per expert and part).
    fn per_expert_file(stored: Dtype, experts: usize, [rows, cols]: [usize; 2]) -> Vec<u8> {
        let mut tensors = Vec::new();
        for e in 0..experts {
            for (p, part) in ["gate", "up"].iter().enumerate() {
                let values = (0..rows * cols)
                    .map(|i| ((i * 7 + e * 131 + p * 17) as f32 * 0.37).sin() * (1.0 + e as f32));
                let bytes: Vec<u8> = match stored {
                    Dtype::BF16 => values
                        .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                        .collect(),
                    _ => values.flat_map(f32::to_le_bytes).collect(),
                };
                tensors.push((format!("experts.{e}.{part}.weight"), bytes));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, bytes)| {
                let view = safetensors::tensor::TensorView::new(stored, vec![rows, cols], bytes)
                    .expect("a valid view");
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize(views, None).expect("serialized")
    }

    #[test]
    fn prefetch_selects_a_prefix_and_leaves_every_store_readable() {
        let bytes = per_expert_file(Dtype::BF16, 12, [4, 8]);
        let path =
            std::env::temp_dir().join(format!("beam-prefetch-{}.safetensors", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let mapped = TensorStore::open(&path).unwrap();
        assert_eq!(
            mapped.names_with_prefix("experts.1."),
            ["experts.1.gate.weight", "experts.1.up.weight"]
        );
        assert_eq!(mapped.names_with_prefix("experts.").len(), 24);
        assert!(mapped.names_with_prefix("experts.12.").is_empty());
        let in_memory = TensorStore::from_bytes(&path, bytes).unwrap();
        let headers = TensorStore::open_header(&path).unwrap();
        for store in [&mapped, &in_memory, &headers] {
            store.prefetch("experts.1");
            store.prefetch("");
        }
        // A hint only: nothing counts as read, and every value reads back as it was written.
        assert_eq!(mapped.unused().len(), 24);
        for e in [0, 1, 10, 11] {
            let name = format!("experts.{e}.up.weight");
            assert_eq!(
                mapped.f32_values(&name, &[4, 8]).unwrap(),
                in_memory.f32_values(&name, &[4, 8]).unwrap()
            );
        }
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn stacked_quant_equals_quantizing_the_stacked_weight_whole() {
        use beam_kernels::quant::QuantFormat;
        let gate = |e: usize| format!("experts.{e}.gate.weight");
        let up = |e: usize| format!("experts.{e}.up.weight");
        let parts: [&(dyn Fn(usize) -> String + Sync); 2] = [&gate, &up];
        for (stored, dtype) in [
            (Dtype::BF16, WeightDtype::BF16),
            (Dtype::F32, WeightDtype::BF16),
            (Dtype::F32, WeightDtype::F32),
            (Dtype::BF16, WeightDtype::F16),
        ] {
            for (shape, format) in [
                ([6, 64], QuantFormat::Q8),
                ([5, 40], QuantFormat::Q8),
                ([6, 64], QuantFormat::Q4),
                ([5, 40], QuantFormat::Q4),
            ] {
                let file =
                    TensorStore::from_bytes("model.safetensors", per_expert_file(stored, 3, shape))
                        .unwrap();
                let block = format.block_len(shape[1]).unwrap();
                let direct = file
                    .stacked_quant(&parts, 3, shape, dtype, (format, block))
                    .unwrap();
                let data = file.stacked_data(&parts, 3, shape, dtype).unwrap();
                let whole = match dtype {
                    WeightDtype::F32 => format.quantize(data.as_slice::<f32>().unwrap(), block),
                    WeightDtype::F16 => {
                        format.quantize(data.as_slice::<half::f16>().unwrap(), block)
                    }
                    WeightDtype::BF16 => {
                        format.quantize(data.as_slice::<half::bf16>().unwrap(), block)
                    }
                };
                assert_eq!(direct.format, format);
                assert!(direct.values.iter().any(|&v| v != 0), "not a test on zeros");
                assert_eq!(direct.block, whole.block);
                assert_eq!(
                    direct.values, whole.values,
                    "{stored:?} as {dtype:?} {shape:?}"
                );
                assert_eq!(
                    direct.scales, whole.scales,
                    "{stored:?} as {dtype:?} {shape:?}"
                );
            }
        }
        // A missing expert is the typed error a sequential read meets first.
        let bytes = per_expert_file(Dtype::BF16, 3, [6, 64]);
        let file = TensorStore::from_bytes("model.safetensors", bytes).unwrap();
        let missing = |e: usize| format!("experts.{}.gate.weight", e + 1);
        let parts: [&(dyn Fn(usize) -> String + Sync); 2] = [&up, &missing];
        match file.stacked_quant(
            &parts,
            3,
            [6, 64],
            WeightDtype::BF16,
            (beam_kernels::quant::QuantFormat::Q4, 32),
        ) {
            Err(LoadError::Missing { name, .. }) => assert_eq!(name, "experts.3.gate.weight"),
            other => panic!("expected Missing, got {other:?}"),
        }
    }

    #[test]
    fn quantized_weights_are_held_in_place_or_dequantized_into_the_requested_precision() {
        let device = Default::default();
        let place = ("model.safetensors".as_ref(), "w");
        for quantization in [Quantization::Q8, Quantization::Q4] {
            let format = quantized(quantization);
            let in_place = held_as::<Flex, 2>(data([4, 64]), format, true, &device, place).unwrap();
            assert_eq!(in_place.quant_format(), Some(quantization.format()));
            let dequantized =
                held_as::<Flex, 2>(data([4, 64]), format, false, &device, place).unwrap();
            assert!(!dequantized.is_quantized());
            // The same values either way, and not the source's.
            let got = in_place.val().into_data().to_vec::<f32>().unwrap();
            assert_eq!(got, dequantized.val().into_data().to_vec::<f32>().unwrap());
            assert_ne!(got, data([4, 64]).to_vec::<f32>().unwrap());
        }
        // No quantization: the float tensor as read.
        let plain =
            held_as::<Flex, 2>(data([4, 64]), WeightDtype::F32.into(), true, &device, place);
        assert_eq!(
            plain.unwrap().val().into_data().to_vec::<f32>().unwrap(),
            data([4, 64]).to_vec::<f32>().unwrap()
        );
    }
}
