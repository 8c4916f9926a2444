//! The masked MoE on the host (CPU) for few tokens per expert, for burn's ndarray backend.
//!
//! Same pipeline and contract as the cubecl kernels, on slices that the ndarray backend (`ndarray.rs`) borrows from the
//! backend's storage in place (the `[E, 2I, H]` / `[E, H, I]` weights are never copied):
//!
//! 1. **routing compaction**: [`DispatchPlan`] groups kept (token, slot) pairs by expert; masked
//!    slots (sentinel ids) are dropped here, so their experts' weights are never touched;
//! 2. **gate+up GEMV** per expert: each weight row is read once and dotted with all of the expert's
//!    tokens (up to [`TOKENS_PER_PASS`] at a time), `silu(g) · u` in the epilogue;
//! 3. **down GEMV** per expert the same way, the routing weight in the epilogue, one row per kept
//!    pair;
//! 4. **combine**: each token sums its kept slots' rows in slot order (deterministic, independent
//!    of how the work was split across threads).
//!
//! Steps 2–3 split each expert's weight rows into blocks ([`block_weights`]: a few per thread, of
//! 64 K to 1 M elements) written into one output buffer, and run the blocks of all experts on
//! [`crate::pool`]'s threads above [`PARALLEL_MIN_WEIGHTS`]. This is the regime of
//! few tokens per expert (decode, or a prefill with most slots masked), where reading the weights is
//! the cost; with hundreds of tokens per expert a cache-blocked GEMM (ndarray's `matmul`, used by
//! the tensor-ops reference) is as fast or faster.

use crate::aligned::AlignedRows;
use crate::pool;

use crate::plan::{DispatchPlan, MoeDims};
use crate::quant::{Q4Matrix, Q8Matrix};

/// Element types the host kernels run on: `f32` and `f64`, accumulated in their own precision.
pub trait HostFloat:
    Copy
    + Default
    + Send
    + Sync
    + PartialEq
    + core::fmt::Debug
    + core::ops::Add<Output = Self>
    + core::ops::Mul<Output = Self>
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// `x · sigmoid(x)`.
    fn silu(self) -> Self;
    /// `row · inputs[n]` in element `n` for 1 to [`TOKENS_PER_PASS`] inputs as long as `row`
    /// (the rest are 0), reading `row` once.
    fn dots(row: &[Self], inputs: &[&[Self]]) -> [Self; TOKENS_PER_PASS];
    /// `out[i, r] = Σ_c lhs[i, c] · rows[r, c]` (all row-major; `lhs` `[m, k]`, `rows` `[n, k]`,
    /// `out` `[m, n]`) on one thread, with the `gemm` crate's cache-blocked SIMD kernels.
    fn gemm_nt(m: usize, n: usize, k: usize, lhs: &[Self], rows: &[Self], out: &mut [Self]) {
        assert!(lhs.len() >= m * k && rows.len() >= n * k && out.len() >= m * n);
        // SAFETY: the slices hold the strided extents checked above; `out` does not alias the
        // inputs (it is a `&mut`).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                1,
                k as isize,
                rows.as_ptr(),
                k as isize,
                1,
                Self::ZERO,
                Self::ONE,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }
}

impl HostFloat for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn silu(self) -> Self {
        self / (1.0 + (-self).exp())
    }
    /// AVX-512 F, else AVX2 + FMA on x86-64 CPUs that have them (checked at run time),
    /// portable otherwise.
    fn dots(row: &[Self], inputs: &[&[Self]]) -> [Self; TOKENS_PER_PASS] {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // SAFETY: the CPU has AVX-512 F; `project` checked the lengths.
            return unsafe { avx512::dots(row, inputs) };
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has AVX2 and FMA; `project` checked the lengths.
            return unsafe { avx2::dots(row, inputs) };
        }
        portable_dots(row, inputs)
    }
}

impl HostFloat for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn silu(self) -> Self {
        self / (1.0 + (-self).exp())
    }
    fn dots(row: &[Self], inputs: &[&[Self]]) -> [Self; TOKENS_PER_PASS] {
        portable_dots(row, inputs)
    }
}

/// Weight elements the host kernels read in place, with activations `F`: the same float as the
/// activations (`f32`, `f64`), or — with the `flex` feature — 16-bit `bf16` / `f16` weights and
/// `f32` activations, each weight widened to `f32` as it is loaded and accumulated in `f32` (the
/// bytes read per weight halve; the arithmetic is that of `f32` weights holding the same values).
pub trait HostWeight<F: HostFloat>: Copy + Send + Sync + 'static {
    /// `row · inputs[n]` in element `n` for 1 to [`TOKENS_PER_PASS`] inputs as long as `row`
    /// (the rest are 0), reading `row` once.
    fn dots(row: &[Self], inputs: &[&[F]]) -> [F; TOKENS_PER_PASS];
    /// The weights as `F` in place, when they are `F` already.
    fn as_activation(weights: &[Self]) -> Option<&[F]>;
    /// Writes the weights, widened to `F` (exactly), into `out` (as long as `weights`).
    fn widen_into(weights: &[Self], out: &mut [F]);
    /// An input row in the form [`Self::project`] reads fastest (see [`HostMatrix::Prepared`]).
    type Prepared: Send + Sync;
    /// [`HostMatrix::prepare_inputs`] for a slice of these weights: none by default.
    fn prepare_inputs(data: &[F], row_len: usize) -> Vec<Self::Prepared> {
        let _ = (data, row_len);
        Vec::new()
    }
    /// [`HostMatrix::gemm_min_tokens`] for a slice of these weights.
    fn gemm_min_tokens(row_len: usize) -> usize {
        let _ = row_len;
        GEMM_MIN_TOKENS
    }
    /// [`HostMatrix::project`] for a slice of these weights: [`Self::dots`] passes by default.
    fn project(
        matrix: &[Self],
        base: usize,
        row_len: usize,
        rows: core::ops::Range<usize>,
        inputs: &[&[F]],
        prepared: &[&Self::Prepared],
        emit: impl FnMut(usize, usize, F),
    ) {
        let _ = prepared;
        project_by_dots(matrix, base, row_len, rows, inputs, emit)
    }
}

/// Weights in the activations' own float (`f32`, `f64`): the activations' kernels, in place.
impl<F: HostFloat> HostWeight<F> for F {
    type Prepared = ();
    fn dots(row: &[F], inputs: &[&[F]]) -> [F; TOKENS_PER_PASS] {
        <F as HostFloat>::dots(row, inputs)
    }
    fn as_activation(weights: &[F]) -> Option<&[F]> {
        Some(weights)
    }
    fn widen_into(weights: &[F], out: &mut [F]) {
        out.copy_from_slice(weights)
    }
}

/// `bf16` weights: AVX-512 F, else AVX2 + FMA on x86-64 CPUs that have them (a `bf16` is the
/// top half of an `f32`, so widening is a shift), portable otherwise.
impl HostWeight<f32> for half::bf16 {
    type Prepared = SplitBf16;
    /// On a CPU with AVX-512 BF16 (rows of at least 32): each row of `data` as a
    /// [`SplitBf16`]. Otherwise none (the widening passes).
    fn prepare_inputs(data: &[f32], row_len: usize) -> Vec<SplitBf16> {
        if !split_bf16_applies(row_len) {
            return Vec::new();
        }
        data.chunks_exact(row_len).map(SplitBf16::new).collect()
    }
    /// Never a widened tile and GEMM where the split-`bf16` kernel runs: it reads the weights
    /// in place with no packing, and beats the GEMM at every token count (docs/BENCHMARKS.md,
    /// session 16).
    fn gemm_min_tokens(row_len: usize) -> usize {
        if split_bf16_applies(row_len) {
            usize::MAX
        } else {
            GEMM_MIN_TOKENS
        }
    }
    /// With prepared inputs (see [`Self::prepare_inputs`]): `vdpbf16ps` on the weights as they
    /// are stored ([`SplitBf16`]), four rows by up to four inputs a step, or for one input
    /// (decode; or one expert's single kept pair) one row at a time in two accumulator
    /// chains; else the widening [`Self::dots`] passes.
    fn project(
        matrix: &[Self],
        base: usize,
        row_len: usize,
        rows: core::ops::Range<usize>,
        inputs: &[&[f32]],
        prepared: &[&SplitBf16],
        emit: impl FnMut(usize, usize, f32),
    ) {
        #[cfg(target_arch = "x86_64")]
        if !prepared.is_empty() && split_bf16_applies(row_len) {
            return avx512::project_split_bf16(matrix, base, row_len, rows, inputs, prepared, emit);
        }
        let _ = prepared;
        project_by_dots(matrix, base, row_len, rows, inputs, emit)
    }
    fn dots(row: &[Self], inputs: &[&[f32]]) -> [f32; TOKENS_PER_PASS] {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // SAFETY: the CPU has AVX-512 F; `project` checked the lengths.
            return unsafe { avx512::dots_bf16(row, inputs) };
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has AVX2 and FMA; `project` checked the lengths.
            return unsafe { avx2::dots_bf16(row, inputs) };
        }
        portable_widening_dots(row, inputs)
    }
    fn as_activation(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn widen_into(weights: &[Self], out: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(weights, out)
    }
}

/// `f16` weights: AVX-512 F, else AVX2 + FMA + F16C on x86-64 CPUs that have them, portable
/// otherwise.
impl HostWeight<f32> for half::f16 {
    type Prepared = ();
    fn dots(row: &[Self], inputs: &[&[f32]]) -> [f32; TOKENS_PER_PASS] {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // SAFETY: the CPU has AVX-512 F; `project` checked the lengths.
            return unsafe { avx512::dots_f16(row, inputs) };
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has AVX2, FMA and F16C; `project` checked the lengths.
            return unsafe { avx2::dots_f16(row, inputs) };
        }
        portable_widening_dots(row, inputs)
    }
    fn as_activation(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn widen_into(weights: &[Self], out: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(weights, out)
    }
}

/// An `f32` input row as the sum of two `bf16` rows, `x ≈ hi + lo` with `hi = bf16(x)` and
/// `lo = bf16(x − hi)` (both rounded to nearest even): 16 significant bits, relative error at
/// most 2⁻¹⁷ per element (`f32` has 24; the `bf16` weights it multiplies have 8). `w · x` is
/// then `w · hi + w · lo`, two `vdpbf16ps` (AVX-512 BF16: 32 products of `bf16` pairs summed
/// into 16 `f32` lanes) per 32 weights, with no widening of the weights: what lets `bf16`
/// prefill read the weights in place instead of widening and packing them for a GEMM, and
/// decode stream them with half the loads and no widening.
#[derive(Debug, Clone)]
pub struct SplitBf16 {
    /// Row 0: `bf16(x)`; row 1: `bf16(x − hi)`, each on a cache line (see [`crate::aligned`]).
    parts: AlignedRows<half::bf16>,
}

impl SplitBf16 {
    /// `x` split into `hi + lo`.
    pub fn new(x: &[f32]) -> Self {
        let hi = |v: f32| half::bf16::from_f32(v);
        let mut parts = AlignedRows::zeroed(2, x.len());
        for (h, &v) in parts.row_mut(0).iter_mut().zip(x) {
            *h = hi(v);
        }
        for (l, &v) in parts.row_mut(1).iter_mut().zip(x) {
            *l = half::bf16::from_f32(v - hi(v).to_f32());
        }
        SplitBf16 { parts }
    }

    /// `bf16(x)`.
    pub fn hi(&self) -> &[half::bf16] {
        self.parts.row(0)
    }

    /// `bf16(x − hi)`.
    pub fn lo(&self) -> &[half::bf16] {
        self.parts.row(1)
    }
}

/// Whether `bf16` rows of `row_len` take the split-`bf16` kernel on this CPU: AVX-512 F and
/// BF16, rows of at least one 32-weight step.
fn split_bf16_applies(row_len: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        row_len >= 32 && avx512::bf16_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = row_len;
        false
    }
}

/// [`portable_dots`] for 16-bit weights: each weight widened to `f32` as it is read.
fn portable_widening_dots<W: HostWeight<f32>>(
    row: &[W],
    inputs: &[&[f32]],
) -> [f32; TOKENS_PER_PASS] {
    let mut out = [0.0; TOKENS_PER_PASS];
    let mut wide = [0.0f32; 256];
    let mut done = 0;
    // Widen a chunk at a time into a stack buffer, then the f32 dot on it: the same sums in the
    // same order as `f32` weights holding the widened values would give per chunk.
    while done < row.len() {
        let len = (row.len() - done).min(wide.len());
        W::widen_into(&row[done..done + len], &mut wide[..len]);
        let mut chunk: [&[f32]; TOKENS_PER_PASS] = [&[]; TOKENS_PER_PASS];
        for (c, x) in chunk.iter_mut().zip(inputs) {
            *c = &x[done..done + len];
        }
        let dots = portable_dots(&wide[..len], &chunk[..inputs.len()]);
        for (o, d) in out.iter_mut().zip(dots) {
            *o += d;
        }
        done += len;
    }
    out
}

/// A row-major weight matrix the host kernels read in place: a slice of [`HostWeight`] elements
/// (`&[f32]`, `&[bf16]`, …) or [`Q8Matrix`] (int8 blocks, one scale each). Rows are addressed by
/// their first element; a row never straddles what the matrix cannot split (a q8 block).
pub trait HostMatrix<F: HostFloat>: Copy + Send + Sync {
    /// Elements (rows × row length).
    fn len(&self) -> usize;
    /// Whether the matrix holds no element.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `row · inputs[n]` in element `n` for the row of elements `start..start + len` (`len` the
    /// inputs' common length; 1 to [`TOKENS_PER_PASS`] inputs, the rest of the result 0),
    /// reading the row once.
    fn dots(&self, start: usize, inputs: &[&[F]]) -> [F; TOKENS_PER_PASS];
    /// Elements `range` as `F`: borrowed in place when they are `F` already, else widened (or
    /// dequantized) into `buffer`.
    fn tile<'s>(&'s self, range: core::ops::Range<usize>, buffer: &'s mut Vec<F>) -> &'s [F];
    /// An input row in the form [`Self::project`] reads fastest: int8 blocks for q8 weights,
    /// a pair of `bf16` rows for `bf16` weights on CPUs with AVX-512 BF16, `()` where the `F`
    /// rows themselves are that form.
    type Prepared: Send + Sync;
    /// `emit(n, r - rows.start, row_r · inputs[n])` for the `row_len`-element rows `rows` (row
    /// `r` from element `base + r · row_len`) and every input (each `row_len` long);
    /// `prepared` is empty or holds each input as [`Self::prepare_inputs`] made it. The
    /// default reads each row once per [`TOKENS_PER_PASS`] inputs through [`Self::dots`].
    fn project(
        self,
        base: usize,
        row_len: usize,
        rows: core::ops::Range<usize>,
        inputs: &[&[F]],
        prepared: &[&Self::Prepared],
        emit: impl FnMut(usize, usize, F),
    ) {
        let _ = prepared;
        project_by_dots(self, base, row_len, rows, inputs, emit)
    }
    /// The rows of `data` (`row_len` each) in the form [`Self::project`] reads fastest, made
    /// once per call of a kernel rather than per row block: empty (the default: the `F` rows
    /// themselves), int8 blocks for q8 weights (see `Q8Matrix`'s `project`), split `bf16`
    /// rows for `bf16` weights (see [`SplitBf16`]).
    fn prepare_inputs(&self, data: &[F], row_len: usize) -> Vec<Self::Prepared> {
        let _ = (data, row_len);
        Vec::new()
    }
    /// Inputs per row block from which the block is a GEMM on a widened tile rather than
    /// [`Self::project`]'s passes, for rows of `row_len`: [`GEMM_MIN_TOKENS`] by default; never
    /// for q8 weights with int8 inputs, whose int8 passes beat widening the tile at every token
    /// count (1.2–2.2× the prefill tokens/s: docs/BENCHMARKS.md, session 15).
    fn gemm_min_tokens(&self, row_len: usize) -> usize {
        let _ = row_len;
        GEMM_MIN_TOKENS
    }
}

impl<F: HostFloat, W: HostWeight<F>> HostMatrix<F> for &[W] {
    type Prepared = W::Prepared;
    fn len(&self) -> usize {
        <[W]>::len(self)
    }
    fn dots(&self, start: usize, inputs: &[&[F]]) -> [F; TOKENS_PER_PASS] {
        let len = inputs.first().map_or(0, |x| x.len());
        W::dots(&self[start..start + len], inputs)
    }
    fn tile<'s>(&'s self, range: core::ops::Range<usize>, buffer: &'s mut Vec<F>) -> &'s [F] {
        let weights: &'s [W] = &self[range];
        match W::as_activation(weights) {
            Some(tile) => tile,
            None => {
                buffer.clear();
                buffer.resize(weights.len(), F::ZERO);
                W::widen_into(weights, buffer);
                buffer
            }
        }
    }
    fn project(
        self,
        base: usize,
        row_len: usize,
        rows: core::ops::Range<usize>,
        inputs: &[&[F]],
        prepared: &[&W::Prepared],
        emit: impl FnMut(usize, usize, F),
    ) {
        W::project(self, base, row_len, rows, inputs, prepared, emit)
    }
    fn prepare_inputs(&self, data: &[F], row_len: usize) -> Vec<W::Prepared> {
        W::prepare_inputs(data, row_len)
    }
    fn gemm_min_tokens(&self, row_len: usize) -> usize {
        W::gemm_min_tokens(row_len)
    }
}

/// q8 weights with `f32` activations: each block's int8 values widened to `f32` and multiplied
/// by its scale as they are loaded (AVX2 + FMA where the CPU has them and blocks are a multiple
/// of 8 values, portable otherwise), then the `f32` dot: the arithmetic of `f32` weights holding
/// the dequantized values, at 1 + 4/block bytes per weight.
impl HostMatrix<f32> for Q8Matrix<'_> {
    type Prepared = crate::quant::Q8Activation;
    fn len(&self) -> usize {
        self.values().len()
    }
    fn dots(&self, start: usize, inputs: &[&[f32]]) -> [f32; TOKENS_PER_PASS] {
        let len = inputs.first().map_or(0, |x| x.len());
        let block = self.block();
        assert!(
            start.is_multiple_of(block) && len.is_multiple_of(block),
            "a q8 row is whole blocks"
        );
        let values = &self.values()[start..start + len];
        let scales = &self.scales()[start / block..(start + len) / block];
        #[cfg(target_arch = "x86_64")]
        if block.is_multiple_of(8) && avx2::q8_available() {
            // SAFETY: the CPU has AVX2, FMA and F16C; `project` checked the inputs' lengths, and
            // the scales cover the row's blocks (multiples of 8 values).
            return unsafe { avx2::dots_q8(values, scales, block, inputs) };
        }
        dequantized_dots(block, inputs, |range, out| {
            self.dequantize_into(start + range.start..start + range.end, out)
        })
    }
    fn tile<'s>(&'s self, range: core::ops::Range<usize>, buffer: &'s mut Vec<f32>) -> &'s [f32] {
        buffer.clear();
        buffer.resize(range.len(), 0.0);
        self.dequantize_into(range, buffer);
        buffer
    }
    /// With blocks of [`Q8_BLOCK`](crate::quant::Q8_BLOCK) values on a CPU with AVX2: the
    /// inputs are quantized the same way once (int8 per block of 32, one `f32` scale each) and
    /// every row dotted with them in int8 (`Σ_b s_w · s_x · Σ q_w · q_x`, as llama.cpp's
    /// `Q8_0 × Q8_0`): a third of the instructions of widening each weight to `f32`, at the
    /// cost of rounding the activations to 8 bits per block (within `s_x / 2` each). Otherwise
    /// the `f32` dots on the dequantized weights.
    fn project(
        self,
        base: usize,
        row_len: usize,
        rows: core::ops::Range<usize>,
        inputs: &[&[f32]],
        prepared: &[&crate::quant::Q8Activation],
        mut emit: impl FnMut(usize, usize, f32),
    ) {
        let block = crate::quant::Q8_BLOCK;
        #[cfg(target_arch = "x86_64")]
        if !prepared.is_empty() && self.int8_inputs(row_len) {
            assert_eq!(prepared.len(), inputs.len(), "one quantized row per input");
            let quantized: Vec<(&[i8], &[f32])> = prepared
                .iter()
                .map(|a| (a.values(), a.scales.as_slice()))
                .collect();
            for (x, s) in &quantized {
                assert!(
                    x.len() == row_len && s.len() == row_len / block,
                    "whole blocks"
                );
            }
            assert!(
                base.is_multiple_of(block) && base + rows.end * row_len <= self.len(),
                "rows within the matrix"
            );
            let blocks = row_len / block;
            if quantized.len() == 1 && avx512::q8_available() {
                // One input (decode): every row in one call.
                let (first, count) = (base + rows.start * row_len, rows.len());
                let mut out = vec![0.0f32; count];
                // SAFETY: the CPU has the kernel's features (`q8_available`); the rows lie
                // within the matrix (asserted above) and the input is `blocks` whole blocks.
                unsafe {
                    avx512::rows_q8_q8(
                        &self.values()[first..first + count * row_len],
                        &self.scales()[first / block..(first + count * row_len) / block],
                        row_len,
                        quantized[0],
                        &mut out,
                    );
                }
                for (r, dot) in out.into_iter().enumerate() {
                    emit(0, r, dot);
                }
                return;
            }
            let dots_q8_q8 = avx2::dots_q8_q8();
            for (r, row) in rows.enumerate() {
                let start = base + row * row_len;
                let values = &self.values()[start..start + row_len];
                let scales = &self.scales()[start / block..start / block + blocks];
                for (pass, group) in quantized.chunks(TOKENS_PER_PASS).enumerate() {
                    // SAFETY: the CPU has the kernel's features (`int8_inputs` checked AVX2,
                    // FMA and F16C; `dots_q8_q8` checked VNNI); the row and every input are
                    // `blocks` whole blocks of 32 with one scale each.
                    let dots = unsafe { dots_q8_q8(values, scales, group) };
                    for (n, &dot) in dots[..group.len()].iter().enumerate() {
                        emit(pass * TOKENS_PER_PASS + n, r, dot);
                    }
                }
            }
            return;
        }
        let _ = (prepared, block);
        project_by_dots(self, base, row_len, rows, inputs, emit)
    }
    fn gemm_min_tokens(&self, row_len: usize) -> usize {
        if self.int8_inputs(row_len) {
            usize::MAX
        } else {
            GEMM_MIN_TOKENS
        }
    }
    fn prepare_inputs(&self, data: &[f32], row_len: usize) -> Vec<crate::quant::Q8Activation> {
        if !self.int8_inputs(row_len) {
            return Vec::new();
        }
        data.chunks_exact(row_len)
            .map(|row| crate::quant::quantize_q8_activation(row, crate::quant::Q8_BLOCK))
            .collect()
    }
}

impl Q8Matrix<'_> {
    /// Whether [`HostMatrix::project`] dots rows of `row_len` with int8 inputs
    /// ([`int8_input_rows`]).
    fn int8_inputs(&self, row_len: usize) -> bool {
        int8_input_rows(self.block(), row_len)
    }
}

/// Whether a quantized matrix's `project` (q8 or q4) dots rows of `row_len` with int8 inputs:
/// blocks of 32 on a CPU with AVX2, FMA and F16C (AVX-512 VNNI's kernels where it has them).
fn int8_input_rows(block: usize, row_len: usize) -> bool {
    let int8_block = crate::quant::Q8_BLOCK;
    #[cfg(target_arch = "x86_64")]
    {
        block == int8_block && row_len.is_multiple_of(int8_block) && avx2::q8_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (block, row_len, int8_block);
        false
    }
}

/// An input row prepared for q4 rows ([`Q4Matrix`]'s `project`): the int8 blocks of
/// [`crate::quant::quantize_q8_activation`] in the order the q4 kernel reads them, and, per
/// block, `-8 · s_x · Σ q_x`: the block's share of the 4-bit values' offset (`(q_w - 8) · q_x`
/// summed is `q_w · q_x` summed less `8 Σ q_x`).
///
/// The kernel takes four blocks of packed weights (64 bytes) at a time and splits them into
/// their low nibbles (the four blocks' values 0–15) and high nibbles (values 16–31), so each
/// whole group of four blocks is held here as the four blocks' first halves, then their second
/// halves; blocks past the last whole group keep their order.
#[derive(Debug, Clone)]
pub struct Q4Input {
    /// The int8 blocks and their `f32` scales, in the row's order.
    pub x: crate::quant::Q8Activation,
    /// The same int8 values in the kernel's order (see above).
    grouped: crate::aligned::AlignedRows<i8>,
    /// `-8 · s_x · Σ q_x` per block.
    pub offsets: Vec<f32>,
}

/// Blocks of 32 the q4 kernel reads per step (see [`Q4Input`]).
const Q4_GROUP_BLOCKS: usize = 4;

impl Q4Input {
    /// `row` quantized in blocks of [`Q8_BLOCK`](crate::quant::Q8_BLOCK), with its offsets.
    ///
    /// # Panics
    /// If the row is not whole blocks.
    pub fn new(row: &[f32]) -> Self {
        let block = crate::quant::Q8_BLOCK;
        let x = crate::quant::quantize_q8_activation(row, block);
        let offsets = x
            .values()
            .chunks_exact(block)
            .zip(&x.scales)
            .map(|(q, &s)| -8.0 * s * q.iter().map(|&q| i32::from(q)).sum::<i32>() as f32)
            .collect();
        let mut grouped = crate::aligned::AlignedRows::from_rows(x.values(), row.len().max(1));
        let group = Q4_GROUP_BLOCKS * block;
        let half = block / 2;
        for (out, src) in grouped
            .row_mut(0)
            .chunks_exact_mut(group)
            .zip(x.values().chunks_exact(group))
        {
            for (b, values) in src.chunks_exact(block).enumerate() {
                out[b * half..(b + 1) * half].copy_from_slice(&values[..half]);
                out[group / 2 + b * half..group / 2 + (b + 1) * half]
                    .copy_from_slice(&values[half..]);
            }
        }
        Self {
            x,
            grouped,
            offsets,
        }
    }

    /// The int8 values in the kernel's order.
    pub fn grouped(&self) -> &[i8] {
        &self.grouped.row(0)[..self.x.values().len()]
    }
}

/// q4 weights ([`Q4Matrix`]): with blocks of 32 on a CPU with AVX2 (AVX-512 VNNI's kernels
/// where it has them), int8 dots of the 4-bit values with the inputs quantized once per call
/// ([`Q4Input`]: `Σ_b s_w · (s_x · Σ q_w · q_x - 8 · s_x · Σ q_x)`, llama.cpp's
/// `Q4_0 × Q8_0`), reading 0.5625 bytes per weight; else each block dequantized to `f32`
/// (portable) and the `f32` dots or, for many tokens, the GEMM on dequantized tiles.
impl HostMatrix<f32> for Q4Matrix<'_> {
    type Prepared = Q4Input;
    fn len(&self) -> usize {
        Q4Matrix::len(self)
    }
    fn dots(&self, start: usize, inputs: &[&[f32]]) -> [f32; TOKENS_PER_PASS] {
        let len = inputs.first().map_or(0, |x| x.len());
        assert!(
            start.is_multiple_of(self.block()) && len.is_multiple_of(self.block()),
            "a q4 row is whole blocks"
        );
        dequantized_dots(self.block(), inputs, |range, out| {
            self.dequantize_into(start + range.start..start + range.end, out)
        })
    }
    fn tile<'s>(&'s self, range: core::ops::Range<usize>, buffer: &'s mut Vec<f32>) -> &'s [f32] {
        buffer.clear();
        buffer.resize(range.len(), 0.0);
        self.dequantize_into(range, buffer);
        buffer
    }
    fn project(
        self,
        base: usize,
        row_len: usize,
        rows: core::ops::Range<usize>,
        inputs: &[&[f32]],
        prepared: &[&Q4Input],
        mut emit: impl FnMut(usize, usize, f32),
    ) {
        #[cfg(target_arch = "x86_64")]
        if !prepared.is_empty() && int8_input_rows(self.block(), row_len) {
            let block = crate::quant::Q8_BLOCK;
            assert_eq!(prepared.len(), inputs.len(), "one quantized row per input");
            let quantized: Vec<(&[i8], &[f32], &[f32])> = prepared
                .iter()
                .map(|a| (a.grouped(), a.x.scales.as_slice(), a.offsets.as_slice()))
                .collect();
            for (x, s, o) in &quantized {
                assert!(
                    x.len() == row_len && s.len() == row_len / block && o.len() == s.len(),
                    "whole blocks"
                );
            }
            assert!(
                base.is_multiple_of(block) && base + rows.end * row_len <= self.len(),
                "rows within the matrix"
            );
            let (first, count) = (base + rows.start * row_len, rows.len());
            let values = &self.values()[first / 2..(first + count * row_len) / 2];
            let scales = &self.scales()[first / block..(first + count * row_len) / block];
            let (packed, blocks) = (row_len / 2, row_len / block);
            if quantized.len() == 1 && avx512::q8_available() {
                // One input (decode): every row in one call.
                let mut out = vec![0.0f32; count];
                // SAFETY: the CPU has the kernel's features; the rows lie within the matrix
                // (asserted above) and the input is `blocks` whole blocks.
                unsafe { avx512::rows_q4_q8(values, scales, row_len, quantized[0], &mut out) };
                for (r, dot) in out.into_iter().enumerate() {
                    emit(0, r, dot);
                }
                return;
            }
            type Q4Kernel = unsafe fn(
                &[i8],
                &[half::f16],
                &[(&[i8], &[f32], &[f32])],
            ) -> [f32; TOKENS_PER_PASS];
            let kernel: Q4Kernel = if avx512::q8_available() {
                avx512::dots_q4_q8
            } else {
                avx2::dots_q4_q8
            };
            for r in 0..count {
                let row = &values[r * packed..(r + 1) * packed];
                let row_scales = &scales[r * blocks..(r + 1) * blocks];
                for (pass, group) in quantized.chunks(TOKENS_PER_PASS).enumerate() {
                    // SAFETY: `int8_input_rows` checked the CPU's features (AVX2, FMA, F16C;
                    // `kernel` checked AVX-512 VNNI); the row and every input are `blocks`
                    // whole blocks.
                    let dots = unsafe { kernel(row, row_scales, group) };
                    for (n, &dot) in dots[..group.len()].iter().enumerate() {
                        emit(pass * TOKENS_PER_PASS + n, r, dot);
                    }
                }
            }
            return;
        }
        let _ = prepared;
        project_by_dots(self, base, row_len, rows, inputs, emit)
    }
    fn gemm_min_tokens(&self, row_len: usize) -> usize {
        if int8_input_rows(self.block(), row_len) {
            usize::MAX
        } else {
            GEMM_MIN_TOKENS
        }
    }
    fn prepare_inputs(&self, data: &[f32], row_len: usize) -> Vec<Q4Input> {
        if !int8_input_rows(self.block(), row_len) {
            return Vec::new();
        }
        data.chunks_exact(row_len).map(Q4Input::new).collect()
    }
}

/// The prepared inputs of `index` (empty when the matrix takes the `F` rows themselves).
fn pick<P>(prepared: &[P], index: impl Iterator<Item = usize>) -> Vec<&P> {
    if prepared.is_empty() {
        return Vec::new();
    }
    index.map(|i| &prepared[i]).collect()
}

/// [`portable_dots`] on quantized rows (q8 or q4): `dequantize(range, out)` writes weights
/// `range` of the row (`range` relative to its start) as `f32`; a chunk of whole blocks at a time
/// is dequantized into a stack buffer and dotted with the inputs.
fn dequantized_dots(
    block: usize,
    inputs: &[&[f32]],
    dequantize: impl Fn(core::ops::Range<usize>, &mut [f32]),
) -> [f32; TOKENS_PER_PASS] {
    let total = inputs.first().map_or(0, |x| x.len());
    let mut out = [0.0; TOKENS_PER_PASS];
    let mut wide = [0.0f32; 256];
    let chunk = (wide.len() / block).max(1) * block;
    let mut done = 0;
    while done < total {
        let len = (total - done).min(chunk);
        dequantize(done..done + len, &mut wide[..len]);
        let mut part: [&[f32]; TOKENS_PER_PASS] = [&[]; TOKENS_PER_PASS];
        for (c, x) in part.iter_mut().zip(inputs) {
            *c = &x[done..done + len];
        }
        let dots = portable_dots(&wide[..len], &part[..inputs.len()]);
        for (o, d) in out.iter_mut().zip(dots) {
            *o += d;
        }
        done += len;
    }
    out
}

/// Tokens dotted with one weight row per pass over it: the row is loaded once for all of them.
pub const TOKENS_PER_PASS: usize = 4;

/// Inputs from which a row block is multiplied as a small GEMM (its weight rows widened once into
/// a cache-resident `F` tile, then the `gemm` crate's register-blocked kernel) instead of by
/// [`TOKENS_PER_PASS`]-token dot passes: with many tokens per weight row (prefill), the passes'
/// loads and re-widening cap them far below the FMA rate. Below it, widening the tile and the
/// GEMM's own packing cost more than the passes (each row stays in L1 across them): measured on
/// whole-model prefill (OLMoE shape, 64–256 tokens, bf16 and f32 weights, AVX-512), 32 beat 8 by
/// 9–22 % and 16 and 64 (docs/BENCHMARKS.md, session 15).
pub const GEMM_MIN_TOKENS: usize = 32;

/// `out[n, r] = rows[r] · inputs[n]` for the `row_len`-element weight rows `rows` of `matrix`
/// (row `r` starting at element `base + r · row_len`),
/// `[inputs, rows]` row-major: dot passes for few inputs, a small GEMM from the matrix's
/// [`HostMatrix::gemm_min_tokens`] on, written into `out` (`[inputs, rows]`, zeros).
fn block_product<F: HostFloat, M: HostMatrix<F>>(
    matrix: M,
    base: usize,
    row_len: usize,
    rows: core::ops::Range<usize>,
    inputs: &[&[F]],
    prepared: &[&M::Prepared],
    out: &mut [F],
) {
    let width = rows.len();
    assert_eq!(out.len(), inputs.len() * width, "out is [inputs, rows]");
    if inputs.len() < matrix.gemm_min_tokens(row_len) || row_len == 0 {
        let (chunk, group) = pass_blocks(row_len);
        if inputs.len() <= chunk {
            matrix.project(base, row_len, rows, inputs, prepared, |n, r, dot| {
                out[n * width + r] = dot;
            });
            return;
        }
        // Many inputs: groups of `PASS_ROW_ELEMENTS` rows, each dotted with the inputs `chunk`
        // at a time, so the rows and the inputs being read both stay in L2 (every row dotted
        // with every input in turn streamed all the inputs from L3 once per row or four).
        for first in (rows.start..rows.end).step_by(group) {
            let group_rows = first..(first + group).min(rows.end);
            for start in (0..inputs.len()).step_by(chunk) {
                let end = (start + chunk).min(inputs.len());
                let prepared = if prepared.is_empty() {
                    prepared
                } else {
                    &prepared[start..end]
                };
                let column = first - rows.start;
                matrix.project(
                    base,
                    row_len,
                    group_rows.clone(),
                    &inputs[start..end],
                    prepared,
                    |n, r, dot| out[(start + n) * width + column + r] = dot,
                );
            }
        }
        return;
    }
    let mut buffer = Vec::new();
    let tile = matrix.tile(
        base + rows.start * row_len..base + rows.end * row_len,
        &mut buffer,
    );
    let mut lhs = Vec::with_capacity(inputs.len() * row_len);
    for input in inputs {
        assert_eq!(input.len(), row_len, "dot of unequal lengths");
        lhs.extend_from_slice(input);
    }
    F::gemm_nt(inputs.len(), width, row_len, &lhs, tile, out);
}

/// Most input elements one call of [`HostMatrix::project`] reads (64 inputs of 2 048: 128 KB as
/// int8, 512 KB as split `bf16`): a work item with more inputs takes them this many at a time.
pub const PASS_INPUT_ELEMENTS: usize = 1 << 17;

/// Weight elements (rows × row length) dotted with one group of [`PASS_INPUT_ELEMENTS`] before
/// the next group of rows, where a work item has more inputs than that (32 rows of 2 048: 128 KB
/// of `bf16`, 36 KB of q4): they stay in L2 while every group of inputs passes over them.
pub const PASS_ROW_ELEMENTS: usize = 1 << 16;

/// For rows of `row_len`: the inputs one [`HostMatrix::project`] call takes at most (about
/// [`PASS_INPUT_ELEMENTS`], whole passes of [`TOKENS_PER_PASS`]) and the rows of a group (about
/// [`PASS_ROW_ELEMENTS`], whole 4-row tiles); the dots are the same at any split.
fn pass_blocks(row_len: usize) -> (usize, usize) {
    let row_len = row_len.max(1);
    (
        (PASS_INPUT_ELEMENTS / row_len / TOKENS_PER_PASS).max(1) * TOKENS_PER_PASS,
        (PASS_ROW_ELEMENTS / row_len / 4).max(1) * 4,
    )
}

/// Fewest weight elements per parallel work item of dot passes (256 KiB of `f32`): below this,
/// the per-item cost is no longer noise.
pub const BLOCK_WEIGHTS: usize = 1 << 16;

/// Most weight elements per parallel work item of dot passes (1 MiB of q8, 2 MiB of `bf16`).
///
/// Each work item costs a fixed amount besides its reads (taking it, the call and its set-up,
/// the hardware prefetcher taking up a new stream), so items should be as large as the balance
/// between threads allows: on one core of the Zen 4 VM of docs/BENCHMARKS.md,
/// 1 M-element items decode the q8 OLMoE shape 12 % faster than 64 K-element ones (session 20).
pub const MAX_BLOCK_WEIGHTS: usize = 1 << 20;

/// Work items per thread a product is split into (between [`BLOCK_WEIGHTS`] and
/// [`MAX_BLOCK_WEIGHTS`] each): enough that the threads finish within a small item of each other.
pub const BLOCKS_PER_THREAD: usize = 8;

/// Weight elements per work item of dot passes for a product of `weights` elements in all:
/// [`BLOCKS_PER_THREAD`] items per thread (rayon's thread count, which also sizes
/// [`crate::pool`]), within [`BLOCK_WEIGHTS`] and [`MAX_BLOCK_WEIGHTS`].
pub fn block_weights(weights: usize) -> usize {
    (weights / (BLOCKS_PER_THREAD * rayon::current_num_threads()))
        .clamp(BLOCK_WEIGHTS, MAX_BLOCK_WEIGHTS)
}

/// Weight elements per work item when the item is a GEMM (at least [`GEMM_MIN_TOKENS`] inputs):
/// the GEMM packs its inputs once per block, so larger blocks pack them fewer times (2 MB of
/// widened `f32` tile, in L2/L3).
pub const GEMM_BLOCK_WEIGHTS: usize = 1 << 19;

/// Weight elements a call must read before its blocks go to [`crate::pool`]'s threads: handing
/// work over costs microseconds (tens when a helper has parked), about what reading 1 M `f32`
/// elements from cache costs one core.
pub const PARALLEL_MIN_WEIGHTS: usize = 1 << 20;

/// Runs `f` on a thread of rayon's global pool and returns its result (directly when the
/// caller is one already).
///
/// burn-flex's own parallel ops (and the host kernels when [`crate::pool`]'s helpers are busy
/// with another caller) run on rayon's pool. Called from a thread outside it (a program's main
/// thread), each such op sends its work to the pool and puts the caller to sleep until it is
/// done: a sleep and a wake-up per op, and one thread more than there are cores. Run from a
/// worker, the caller takes part in the work. The CLI runs every command on the host backends
/// this way; a program calling the model in a loop can do the same. (The host kernels' own
/// products take the caller's thread and [`crate::pool`]'s helpers from any thread.)
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // From outside the pool, `scope` runs its closure on one of the pool's threads and blocks
    // the caller until it returns.
    rayon::scope(|_| f())
}

/// Independent accumulators per dot product: lets the compiler keep them in SIMD registers without
/// reassociating floating-point sums (two 8-wide `f32` registers per token, enough independent
/// chains to hide the multiply-add latency with a few tokens per pass).
const LANES: usize = 16;

/// `out[t] = Σ_k weights[t, k] · down[e] · (silu(gate[e] · x[t]) ⊙ up[e] · x[t])` over kept slots
/// (`e = expert_ids[t, k] < E`); slots with any other id (the sentinel `E`) cost nothing.
///
/// Slices are row-major. Same result as [`masked_moe_f64`](crate::reference::masked_moe_f64) up to
/// rounding in `F`.
///
/// # Shapes
/// - `x`: `[T, H]`, `expert_ids`, `weights`: `[T, K]`
/// - `gate_up`: `[E, 2I, H]` (gate rows first), `down`: `[E, H, I]`; output `[T, H]`
///
/// # Panics
/// If a slice's length does not match `dims` (callers pass tensors whose shapes they checked).
pub fn masked_moe_decode<F: HostFloat, M: HostMatrix<F>>(
    x: &[F],
    expert_ids: &[i64],
    weights: &[F],
    gate_up: M,
    down: M,
    dims: MoeDims,
) -> Vec<F> {
    dims.assert_lengths([
        x.len(),
        expert_ids.len(),
        weights.len(),
        gate_up.len(),
        down.len(),
    ]);
    let plan = DispatchPlan::from_ids(expert_ids, dims.top_k, dims.experts);
    masked_moe_planned(x, &plan, weights, gate_up, down, dims)
}

/// [`masked_moe_decode`] for a caller that already grouped the `[T, K]` id table
/// (`plan = DispatchPlan::from_ids(expert_ids, K, E)`, e.g. to choose this path from its counts).
///
/// # Panics
/// If `plan` or a slice's length does not match `dims`.
pub fn masked_moe_planned<F: HostFloat, M: HostMatrix<F>>(
    x: &[F],
    plan: &DispatchPlan,
    weights: &[F],
    gate_up: M,
    down: M,
    dims: MoeDims,
) -> Vec<F> {
    masked_moe_experts(
        x,
        plan,
        weights,
        ExpertMatrices::Stacked { gate_up, down },
        dims,
    )
}

/// Where the routed experts' weights are: two stacked matrices, or one matrix per expert and
/// projection (a checkpoint's own per-expert tensors, read where they are mapped).
#[derive(Debug, Clone, Copy)]
pub enum ExpertMatrices<'a, M> {
    /// `gate_up` `[E, 2I, H]` (gate rows first), `down` `[E, H, I]`.
    Stacked {
        /// Gate and up projections, stacked.
        gate_up: M,
        /// Down projections, stacked.
        down: M,
    },
    /// `gate[e]`, `up[e]` `[I, H]` and `down[e]` `[H, I]`, one matrix each.
    Parts {
        /// Gate projections.
        gate: &'a [M],
        /// Up projections.
        up: &'a [M],
        /// Down projections.
        down: &'a [M],
    },
}

impl<M: Copy> ExpertMatrices<'_, M> {
    /// Expert `e`'s gate projection: its matrix and the element its rows start at.
    fn gate(&self, e: usize, dims: &MoeDims) -> (M, usize) {
        match *self {
            Self::Stacked { gate_up, .. } => (gate_up, e * 2 * dims.intermediate * dims.hidden),
            Self::Parts { gate, .. } => (gate[e], 0),
        }
    }

    /// Expert `e`'s up projection, as [`Self::gate`].
    fn up(&self, e: usize, dims: &MoeDims) -> (M, usize) {
        match *self {
            Self::Stacked { gate_up, .. } => {
                (gate_up, (2 * e + 1) * dims.intermediate * dims.hidden)
            }
            Self::Parts { up, .. } => (up[e], 0),
        }
    }

    /// Expert `e`'s down projection, as [`Self::gate`].
    fn down(&self, e: usize, dims: &MoeDims) -> (M, usize) {
        match *self {
            Self::Stacked { down, .. } => (down, e * dims.hidden * dims.intermediate),
            Self::Parts { down, .. } => (down[e], 0),
        }
    }
}

/// [`masked_moe_planned`] on experts wherever they are ([`ExpertMatrices`]): the same sums in
/// the same order, so stacked and per-expert weights with the same values give the same bits.
///
/// # Panics
/// If `plan`, a slice's length or a matrix's length does not match `dims`.
pub fn masked_moe_experts<F: HostFloat, M: HostMatrix<F>>(
    x: &[F],
    plan: &DispatchPlan,
    weights: &[F],
    experts_at: ExpertMatrices<'_, M>,
    dims: MoeDims,
) -> Vec<F> {
    let MoeDims {
        tokens,
        top_k,
        experts,
        hidden,
        intermediate,
    } = dims;
    assert_eq!(plan.top_k, top_k, "plan is of a [T, K] table");
    assert_eq!(plan.offsets.len(), experts + 1, "plan has E + 1 offsets");
    match experts_at {
        ExpertMatrices::Stacked { gate_up, down } => dims.assert_lengths([
            x.len(),
            tokens * top_k,
            weights.len(),
            gate_up.len(),
            down.len(),
        ]),
        ExpertMatrices::Parts { gate, up, down } => {
            assert_eq!(x.len(), tokens * hidden, "x is [T, H]");
            assert_eq!(weights.len(), tokens * top_k, "weights are [T, K]");
            assert!(
                gate.len() == experts && up.len() == experts && down.len() == experts,
                "one gate, up and down matrix per expert"
            );
            let projection = intermediate * hidden;
            assert!(
                gate.iter()
                    .chain(up)
                    .chain(down)
                    .all(|m| m.len() == projection),
                "every expert matrix is [I, H] (gate, up) or [H, I] (down)"
            );
        }
    }
    let token_of = plan.tokens();
    let mut out = vec![F::ZERO; tokens * hidden];
    if plan.kept() == 0 || hidden == 0 {
        return out;
    }
    // The kernels read rows that start on cache lines (see [`crate::aligned`]).
    let x_rows = AlignedRows::from_rows(x, hidden);

    // Gate+up: `act[p, i] = silu(gate_i · x_p) · (up_i · x_p)` for kept pair `p` (plan order).
    // Inputs are prepared by the first kept expert's matrices (every matrix of a model is one
    // kind: `prepare_inputs` and `gemm_min_tokens` depend on the kind, not the values).
    let first = plan.groups().next().map_or(0, |(e, _, _)| e);
    let (gate_up, _) = experts_at.gate(first, &dims);
    let (down, _) = experts_at.down(first, &dims);
    let x_quantized = gate_up.prepare_inputs(x, hidden);
    let gate_up_blocks = row_blocks(
        plan,
        intermediate,
        2 * hidden,
        gate_up.gemm_min_tokens(hidden),
    );
    let act_blocks = map_blocks(&gate_up_blocks, 2 * hidden, |block, act| {
        let inputs: Vec<&[F]> = token_of[block.pairs.clone()]
            .iter()
            .map(|&t| x_rows.row(t))
            .collect();
        let quantized = pick(&x_quantized, token_of[block.pairs.clone()].iter().copied());
        let ((gate_m, gate_at), (up_m, up_at)) = (
            experts_at.gate(block.expert, &dims),
            experts_at.up(block.expert, &dims),
        );
        block_product(
            gate_m,
            gate_at,
            hidden,
            block.rows.clone(),
            &inputs,
            &quantized,
            act,
        );
        with_scratch(act.len(), |up| {
            block_product(
                up_m,
                up_at,
                hidden,
                block.rows.clone(),
                &inputs,
                &quantized,
                up,
            );
            for (a, &u) in act.iter_mut().zip(up.iter()) {
                *a = a.silu() * u;
            }
        });
    });
    let act = assemble(&gate_up_blocks, &act_blocks, plan.kept(), intermediate);
    // One prepared row (or none) per row: each row prepared where it is.
    let act_quantized: Vec<M::Prepared> = act
        .iter()
        .flat_map(|row| down.prepare_inputs(row, intermediate))
        .collect();

    // Down: `pair_rows[p, j] = weights[slot] · (down_j · act_p)` for kept pair `p` at `slot`.
    let down_blocks = row_blocks(
        plan,
        hidden,
        intermediate,
        down.gemm_min_tokens(intermediate),
    );
    let out_blocks = map_blocks(&down_blocks, intermediate, |block, rows_out| {
        let (down_m, base) = experts_at.down(block.expert, &dims);
        let inputs: Vec<&[F]> = block.pairs.clone().map(|p| act.row(p)).collect();
        let width = block.rows.len();
        let quantized = pick(&act_quantized, block.pairs.clone());
        block_product(
            down_m,
            base,
            intermediate,
            block.rows.clone(),
            &inputs,
            &quantized,
            rows_out,
        );
        for (n, row) in rows_out.chunks_exact_mut(width.max(1)).enumerate() {
            let scale = weights[plan.pairs[block.pairs.start + n]];
            for y in row {
                *y = scale * *y;
            }
        }
    });
    // One row per kept pair (not per slot: a masked prefill keeps few of its T · K slots).
    let pair_rows = assemble(&down_blocks, &out_blocks, plan.kept(), hidden);

    // Combine: each token sums its kept slots' rows in slot order.
    let mut pair_of_slot = vec![None; tokens * top_k];
    for (p, &slot) in plan.pairs.iter().enumerate() {
        pair_of_slot[slot] = Some(p);
    }
    for (t, out_row) in out.chunks_exact_mut(hidden).enumerate() {
        for &p in pair_of_slot[t * top_k..(t + 1) * top_k].iter().flatten() {
            let row = pair_rows.row(p);
            for (o, &v) in out_row.iter_mut().zip(row) {
                *o = *o + v;
            }
        }
    }
    out
}

/// One parallel work item: a block of one expert's weight rows applied to all of its kept pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowBlock {
    expert: usize,
    /// Kept pairs `start..start + len` of the plan.
    pairs: core::ops::Range<usize>,
    /// Output rows (of `rows_per_expert`).
    rows: core::ops::Range<usize>,
}

/// The outputs of a list of [`RowBlock`]s, one after another in one buffer: block `b`'s
/// `[pairs, rows]` at `values[offsets[b]..offsets[b + 1]]`.
struct BlockOutputs<F> {
    values: Vec<F>,
    offsets: Vec<usize>,
}

impl<F> BlockOutputs<F> {
    /// Block `b`'s output.
    fn block(&self, b: usize) -> &[F] {
        &self.values[self.offsets[b]..self.offsets[b + 1]]
    }
}

/// `f(block, out)` over `blocks` (of `row_len`-element weight rows), each writing its
/// `[pairs, rows]` output into `out` (zeros), on [`crate::pool`]'s threads when there is enough
/// work to pay for handing it over ([`PARALLEL_MIN_WEIGHTS`]). One buffer for all blocks: a
/// decode step makes thousands of blocks, and an allocation each (freed on another thread) cost
/// more than the products of the small ones.
fn map_blocks<F: HostFloat>(
    blocks: &[RowBlock],
    row_len: usize,
    f: impl Fn(&RowBlock, &mut [F]) + Sync + Send,
) -> BlockOutputs<F> {
    let mut offsets = Vec::with_capacity(blocks.len() + 1);
    offsets.push(0);
    for block in blocks {
        offsets.push(offsets[offsets.len() - 1] + block.pairs.len() * block.rows.len());
    }
    let mut values = vec![F::ZERO; offsets[blocks.len()]];
    let weights: usize = blocks.iter().map(|b| b.rows.len() * row_len).sum();
    if blocks.len() > 1 && weights >= PARALLEL_MIN_WEIGHTS {
        pool::for_each_part_mut(&mut values, &offsets, |b, out| f(&blocks[b], out));
    } else {
        for (block, bounds) in blocks.iter().zip(offsets.windows(2)) {
            f(block, &mut values[bounds[0]..bounds[1]]);
        }
    }
    BlockOutputs { values, offsets }
}

/// Runs `f` on `len` zeros: on the stack when they are few (a decode block's), else on the
/// heap.
fn with_scratch<F: HostFloat>(len: usize, f: impl FnOnce(&mut [F])) {
    const STACK: usize = 512;
    if len <= STACK {
        let mut stack = [F::ZERO; STACK];
        f(&mut stack[..len]);
    } else {
        f(&mut vec![F::ZERO; len]);
    }
}

/// Places each block's `[pairs, rows]` output into a `[pairs_total, row_len]` matrix at its
/// pairs' rows and its output rows' columns (rows on cache lines: the next product reads them).
fn assemble<F: HostFloat>(
    blocks: &[RowBlock],
    outputs: &BlockOutputs<F>,
    pairs_total: usize,
    row_len: usize,
) -> AlignedRows<F> {
    let mut matrix = AlignedRows::zeroed(pairs_total, row_len);
    place(blocks, outputs, |p, columns, values| {
        matrix.row_mut(p)[columns].copy_from_slice(values)
    });
    matrix
}

/// Hands each block's output rows to `write(pair, output columns, values)`.
fn place<F: HostFloat>(
    blocks: &[RowBlock],
    outputs: &BlockOutputs<F>,
    mut write: impl FnMut(usize, core::ops::Range<usize>, &[F]),
) {
    for (b, block) in blocks.iter().enumerate() {
        let values = outputs.block(b);
        let width = block.rows.len();
        for (n, p) in block.pairs.clone().enumerate() {
            write(p, block.rows.clone(), &values[n * width..(n + 1) * width]);
        }
    }
}

/// Splits every expert that has kept pairs into row blocks (see [`blocks_of`]), dot-pass
/// blocks sized for all kept experts' weights together ([`block_weights`]).
fn row_blocks(
    plan: &DispatchPlan,
    rows_per_expert: usize,
    row_len: usize,
    gemm_min_tokens: usize,
) -> Vec<RowBlock> {
    let weights = plan.groups().count() * rows_per_expert * row_len;
    let block = block_weights(weights);
    plan.groups()
        .flat_map(|(expert, start, len)| {
            blocks_of(
                expert,
                start..start + len,
                rows_per_expert,
                row_len,
                gemm_min_tokens,
                block,
            )
        })
        .collect()
}

/// `rows` output rows of `row_len` weight elements each, every block for `pairs`: blocks of
/// about `block_weights` elements for dot passes (fewer than `gemm_min_tokens` pairs), else
/// up to [`GEMM_BLOCK_WEIGHTS`] (the block will be a GEMM), but at least four blocks where
/// there are rows for them.
fn blocks_of(
    expert: usize,
    pairs: core::ops::Range<usize>,
    rows: usize,
    row_len: usize,
    gemm_min_tokens: usize,
    block_weights: usize,
) -> impl Iterator<Item = RowBlock> {
    let block_rows = if pairs.len() >= gemm_min_tokens {
        (GEMM_BLOCK_WEIGHTS / row_len.max(1))
            .min(rows.div_ceil(4))
            .max(BLOCK_WEIGHTS / row_len.max(1))
    } else {
        block_weights / row_len.max(1)
    }
    .clamp(1, rows.max(1));
    (0..rows).step_by(block_rows).map(move |first| RowBlock {
        expert,
        pairs: pairs.clone(),
        rows: first..(first + block_rows).min(rows),
    })
}

/// Dots rows `rows` of the row-major `matrix` (`row_len` columns, from element `base`) with every input, each row read
/// once per [`TOKENS_PER_PASS`] inputs: `emit(input, row - rows.start, dot)`.
fn project_by_dots<F: HostFloat, M: HostMatrix<F>>(
    matrix: M,
    base: usize,
    row_len: usize,
    rows: core::ops::Range<usize>,
    inputs: &[&[F]],
    mut emit: impl FnMut(usize, usize, F),
) {
    for input in inputs {
        assert_eq!(input.len(), row_len, "dot of unequal lengths");
    }
    assert!(
        base + rows.end * row_len <= matrix.len(),
        "rows within the matrix"
    );
    for (r, row) in rows.enumerate() {
        let start = base + row * row_len;
        for (pass, group) in inputs.chunks(TOKENS_PER_PASS).enumerate() {
            let dots = matrix.dots(start, group);
            for (n, &dot) in dots[..group.len()].iter().enumerate() {
                emit(pass * TOKENS_PER_PASS + n, r, dot);
            }
        }
    }
}

/// `x · Wᵀ` for a weight stored `[out, in]` (PyTorch / Hugging Face layout), reading each weight
/// row once for all rows of `x` (up to [`TOKENS_PER_PASS`] per pass): the decode-time linear layer
/// (router, attention projections, LM head). Row blocks run on [`crate::pool`]'s threads above
/// [`PARALLEL_MIN_WEIGHTS`].
///
/// # Shapes
/// - `x`: `[T, in]`, `weight`: `[out, in]`; output `[T, out]`
///
/// # Panics
/// If `x` is not a whole number of `in_features` rows or `weight` is not `[out, in]`.
pub fn linear<F: HostFloat, M: HostMatrix<F>>(
    x: &[F],
    weight: M,
    in_features: usize,
    out_features: usize,
) -> Vec<F> {
    assert_eq!(
        weight.len(),
        out_features * in_features,
        "weight is [out, in]"
    );
    if in_features == 0 {
        return Vec::new();
    }
    assert_eq!(x.len() % in_features, 0, "x is [T, in]");
    let tokens = x.len() / in_features;
    if tokens == 0 || out_features == 0 {
        return vec![F::ZERO; tokens * out_features];
    }
    // Each row of `x` on a cache line of its own (see [`crate::aligned`]).
    let rows = AlignedRows::from_rows(x, in_features);
    let inputs: Vec<&[F]> = rows.iter().collect();
    // Every block gets all rows of `x`: from the matrix's GEMM threshold on they all take the
    // GEMM, which reads `x` as it is.
    let gemm_min_tokens = weight.gemm_min_tokens(in_features);
    let x_quantized = if tokens < gemm_min_tokens {
        weight.prepare_inputs(x, in_features)
    } else {
        Vec::new()
    };
    let quantized = pick(&x_quantized, 0..tokens);
    let blocks: Vec<RowBlock> = blocks_of(
        0,
        0..tokens,
        out_features,
        in_features,
        gemm_min_tokens,
        block_weights(out_features * in_features),
    )
    .collect();
    let block_outputs = map_blocks(&blocks, in_features, |block, out| {
        block_product(
            weight,
            0,
            in_features,
            block.rows.clone(),
            &inputs,
            &quantized,
            out,
        )
    });
    if tokens == 1 {
        // One input: the blocks' outputs, in row order, are the output row.
        return block_outputs.values;
    }
    // The output goes to the caller's tensor, not to another kernel: row-major as it is.
    let mut out = vec![F::ZERO; tokens * out_features];
    place(&blocks, &block_outputs, |t, columns, values| {
        out[t * out_features..][columns].copy_from_slice(values)
    });
    out
}

/// The element a key/value cache holds: `f32`, or `f16` / `bf16` (half the bytes a decode
/// step's attention reads) widened to `f32` as they are read; scores, softmax and sums stay `f32`.
pub trait CacheValue: Copy + Send + Sync + 'static {
    /// The values of `row` as `f32` in `out` (as long as `row`).
    fn widen_into(row: &[Self], out: &mut [f32]);

    /// Sixteen values from `p`, widened.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and sixteen values are readable from `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl CacheValue for f32 {
    fn widen_into(row: &[Self], out: &mut [f32]) {
        out.copy_from_slice(row)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl CacheValue for half::f16 {
    fn widen_into(row: &[Self], out: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(row, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (16 values of 2 bytes: one 256-bit load).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

impl CacheValue for half::bf16 {
    fn widen_into(row: &[Self], out: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(row, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract. A `bf16` is the top half of an `f32`.
        unsafe {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(p as *const __m256i),
            )))
        }
    }
}

/// A `[B, H, S, D]` tensor's values where they are (a key/value cache's buffer, of `f32`, `f16`
/// or `bf16`: [`CacheValue`]): element `[b, h, s, d]` at
/// `values[b · strides[0] + h · strides[1] + s · strides[2] + d]`, each row of `D` contiguous.
#[derive(Debug)]
pub struct Heads<'a, E = f32> {
    values: &'a [E],
    dims: [usize; 4],
    strides: [usize; 3],
}

// Not derived: the derive would ask `E: Clone`/`E: Copy` of the element, not of the reference.
impl<E> Clone for Heads<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for Heads<'_, E> {}

impl<'a, E> Heads<'a, E> {
    /// `None` unless every element the dims and strides address lies within `values`.
    pub fn new(values: &'a [E], dims: [usize; 4], strides: [usize; 3]) -> Option<Self> {
        if dims.contains(&0) {
            return Some(Self {
                values,
                dims,
                strides,
            });
        }
        let last = (0..3).try_fold(dims[3], |end, i| {
            (dims[i] - 1).checked_mul(strides[i])?.checked_add(end)
        })?;
        (last <= values.len()).then_some(Self {
            values,
            dims,
            strides,
        })
    }

    /// `[B, H, S, D]`.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// Positions `range` of every row (`[B, H, range.len(), D]`), where they are.
    ///
    /// # Panics
    /// If `range` is not within `0..S`.
    fn positions(&self, range: core::ops::Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= self.dims[2]);
        let [b, h, _, d] = self.dims;
        if range.is_empty() {
            return Self {
                values: &self.values[..0],
                dims: [b, h, 0, d],
                strides: self.strides,
            };
        }
        Self {
            values: &self.values[range.start * self.strides[2]..],
            dims: [b, h, range.len(), d],
            strides: self.strides,
        }
    }

    /// Row `[b, h, s, ..]`.
    ///
    /// # Panics
    /// If `[b, h, s]` is outside the dims.
    pub fn row(&self, b: usize, h: usize, s: usize) -> &'a [E] {
        let at = b * self.strides[0] + h * self.strides[1] + s * self.strides[2];
        &self.values[at..at + self.dims[3]]
    }
}

/// Rotary position embedding of `x` laid out tokens first (`[B, T, H, D]`, row-major) with the
/// tables of its `T` positions (`cos`, `sin`: `[T, D]`): `out = x · cos + rotate_half(x) · sin`
/// along `D`, `rotate_half(x)[i] = −x[i + D/2]` for the first `D − D/2` elements and
/// `x[i − (D − D/2)]` after them, as [`crate::reference::rotate_half`]. The same operations in
/// the same order (a product, a negated product, their sum; no fused multiply-add), so the same
/// values as the reference, in one pass instead of six tensor ops. Rows of
/// [`ROPE_PARALLEL_ELEMENTS`] or more elements in all go to [`crate::pool`]'s threads a position
/// at a time.
///
/// # Shapes
/// - `x`: `[B, T, H, D]` as `dims`; `cos`, `sin`: `[T, D]`; output: `[B, T, H, D]`
///
/// # Panics
/// If `x`, `cos` or `sin` is not as long as its shape says.
pub fn rope(x: &[f32], dims: [usize; 4], cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let [batch, tokens, heads, d] = dims;
    assert_eq!(x.len(), batch * tokens * heads * d, "x is [B, T, H, D]");
    assert!(
        cos.len() == tokens * d && sin.len() == tokens * d,
        "cos and sin are [T, D]"
    );
    let mut out = vec![0.0f32; x.len()];
    if out.is_empty() {
        return out;
    }
    let first = d - d / 2;
    // One position of one batch row: `heads` rows of `d`, all with the tables of position `t`.
    let position = |index: usize, out: &mut [f32], x: &[f32]| {
        let t = index % tokens;
        let (c, s) = (&cos[t * d..(t + 1) * d], &sin[t * d..(t + 1) * d]);
        for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let (low, high) = x.split_at(d / 2);
            for i in 0..first {
                o[i] = x[i] * c[i] + -high[i] * s[i];
            }
            for i in first..d {
                o[i] = x[i] * c[i] + low[i - first] * s[i];
            }
        }
    };
    let row = heads * d;
    if x.len() >= ROPE_PARALLEL_ELEMENTS {
        pool::for_each_chunk_mut(&mut out, row, |index, o| {
            position(index, o, &x[index * row..(index + 1) * row])
        });
    } else {
        for (index, (o, x)) in out.chunks_mut(row).zip(x.chunks(row)).enumerate() {
            position(index, o, x);
        }
    }
    out
}

/// Elements of `x` from which [`rope`] spreads its positions over [`crate::pool`]'s threads (a
/// prefill's queries; a decode step's few heads stay on the calling thread).
pub const ROPE_PARALLEL_ELEMENTS: usize = 1 << 16;

/// Grouped-query scaled dot-product attention over cached keys and values (a decode step, or a
/// prefill's many queries): `out[b, h, t] = Σ_s p_s · v[b, h / g, s]` with
/// `p = softmax_s(q[b, h, t] · k[b, h / g, s] · scale + mask[t, s])`, `g = H / H_kv`, reading the
/// queries (any strides: the heads of a projection's output swapped in front) and the keys and
/// values where they are, the keys and values in their own precision ([`CacheValue`]: `f32`, or
/// `f16` / `bf16` widened as they are loaded).
///
/// One work item per batch row and key/value head: its `g · T` query rows (every query head that
/// reads the key/value head, every query position) in tiles of up to [`ATTENTION_TILE`] rows, so
/// each key and value row loaded serves the whole tile (the `g` heads of a grouped-query decode
/// step, or consecutive positions of a prefill). A tile reads only the positions from the first
/// to the last its rows' masks let through (a causal prefill's query `t` sees `past + t + 1`);
/// the rest weigh 0. On AVX-512 CPUs with key and value rows of whole 16-lane registers, four keys
/// scored a step for every row of the tile and the weighted values summed in registers
/// (`avx512::tile_scores`, `avx512::tile_values`); portable rows (widened one at a time)
/// otherwise. Items run on [`crate::pool`]'s threads when the keys and values read are at least
/// [`ATTENTION_PARALLEL_MIN`] elements. Same formula as
/// [`attention_reference`](crate::reference::attention_reference); the sums are `f32` in
/// another order. A row its mask closes entirely gives NaN, as the reference's softmax.
///
/// # Shapes
/// - `q`: `[B, H, T, D]`, `k`: `[B, H_kv, S, D]`, `v`: `[B, H_kv, S, D_v]`
/// - `mask`: `[T, S]` (additive, the same for every batch row and head); output `[B, H, T, D_v]`
///   (row-major)
///
/// # Panics
/// If the shapes do not line up (`H` a multiple of `H_kv`, the same `B` and `S`, `D` for `q` and
/// `k`).
pub fn attention<E: CacheValue>(
    q: Heads<'_, f32>,
    k: Heads<'_, E>,
    v: Heads<'_, E>,
    mask: &[f32],
    scale: f32,
) -> Vec<f32> {
    let [batch, heads, queries, dim] = q.dims();
    let [kb, kv_heads, positions, kd] = k.dims();
    let [vb, vh, vs, value_dim] = v.dims();
    assert!(
        (kb, kd) == (batch, dim)
            && (vb, vh, vs) == (batch, kv_heads, positions)
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && mask.len() == queries * positions,
        "attention: q [B, H, T, D], k [B, H_kv, S, D], v [B, H_kv, S, D_v], mask [T, S]"
    );
    let group = heads / kv_heads;
    let mut out = vec![0.0f32; batch * heads * queries * value_dim];
    if out.is_empty() {
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    let wide = avx512::available() && dim.is_multiple_of(16) && value_dim.is_multiple_of(16);
    // The g · T query rows of one (batch row, key/value head), row r = (head kv · g + r / T,
    // position r % T): their outputs are consecutive in `out` ([B, H, T, D_v]).
    let rows = group * queries;
    let item = |index: usize, out: &mut [f32]| {
        let (b, kv) = (index / kv_heads, index % kv_heads);
        let query = |r: usize| q.row(b, kv * group + r / queries, r % queries);
        let mask_row = |r: usize| &mask[(r % queries) * positions..][..positions];
        // Scores, then weights, of the tile's rows (row-major, `visible.len()` each), and a key
        // or value row widened to `f32` (portable path).
        let mut weights = Vec::new();
        let mut widened = Vec::new();
        let mut first = 0;
        while first < rows {
            let tile = (rows - first).min(ATTENTION_TILE);
            let tile_rows = first..first + tile;
            // From the first to the last position any row of the tile sees; everything when a
            // row sees none (NaN, as the reference).
            let seen = |r: usize| {
                let m = mask_row(r);
                let start = m.iter().position(|x| *x != f32::NEG_INFINITY)?;
                let end = m.iter().rposition(|x| *x != f32::NEG_INFINITY)? + 1;
                Some(start..end)
            };
            let visible = tile_rows
                .clone()
                .map(seen)
                .try_fold(positions..0, |all, r| {
                    r.map(|r| all.start.min(r.start)..all.end.max(r.end))
                })
                .unwrap_or(0..positions);
            let len = visible.len();
            let (keys, values) = (k.positions(visible.clone()), v.positions(visible.clone()));
            weights.clear();
            weights.resize(tile * len, 0.0);
            let out_rows = &mut out[(first * value_dim)..][..tile * value_dim];
            #[cfg(target_arch = "x86_64")]
            if wide {
                // The tile's rows (the array's unused end repeats the last).
                let queries: [&[f32]; ATTENTION_TILE] =
                    core::array::from_fn(|i| query(first + i.min(tile - 1)));
                let masks: [&[f32]; ATTENTION_TILE] =
                    core::array::from_fn(|i| &mask_row(first + i.min(tile - 1))[visible.clone()]);
                // SAFETY: the CPU has AVX-512 F; every query, key and value row is whole
                // registers of 16 (`dim`, `value_dim` multiples of 16); `weights` holds `tile`
                // rows of `len`, `out_rows` `tile` rows of `value_dim`.
                unsafe {
                    avx512::tile(
                        &queries[..tile],
                        &masks[..tile],
                        (keys, values, b, kv),
                        scale,
                        &mut weights,
                        out_rows,
                    );
                }
                first += tile;
                continue;
            }
            for (i, r) in tile_rows.clone().enumerate() {
                let (query, mask) = (query(r), &mask_row(r)[visible.clone()]);
                let scores = &mut weights[i * len..][..len];
                widened.resize(dim.max(value_dim), 0.0);
                for (s, w) in scores.iter_mut().enumerate() {
                    let key = &mut widened[..dim];
                    E::widen_into(keys.row(b, kv, s), key);
                    *w = <f32 as HostFloat>::dots(key, &[query])[0] * scale + mask[s];
                }
                let inverse = softmax_in_place(scores);
                let out_row = &mut out_rows[i * value_dim..][..value_dim];
                for (s, &w) in scores.iter().enumerate() {
                    if w != 0.0 {
                        let value = &mut widened[..value_dim];
                        E::widen_into(values.row(b, kv, s), value);
                        for (o, &x) in out_row.iter_mut().zip(&*value) {
                            *o += w * x;
                        }
                    }
                }
                for o in out_row.iter_mut() {
                    *o *= inverse;
                }
            }
            first += tile;
        }
    };
    let per_item = rows * value_dim;
    let reads = batch * heads * queries * positions * (dim + value_dim) / ATTENTION_TILE.min(rows);
    if reads >= ATTENTION_PARALLEL_MIN && batch * kv_heads > 1 {
        pool::for_each_chunk_mut(&mut out, per_item, item);
    } else {
        out.chunks_mut(per_item)
            .enumerate()
            .for_each(|(index, out)| item(index, out));
    }
    out
}

/// Query rows [`attention`] scores together against each key and value row it loads.
pub const ATTENTION_TILE: usize = 4;

/// Key and value elements a call of [`attention`] reads (for its tiles: once per tile of query
/// rows) before its key/value heads go to [`crate::pool`]'s threads. Lower than
/// [`PARALLEL_MIN_WEIGHTS`]: a decode step's attention is one call per layer between two
/// products, with the helpers still spinning, so at a few hundred positions (16 heads of 128)
/// its heads are worth splitting.
pub const ATTENTION_PARALLEL_MIN: usize = 1 << 17;

/// `scores` (logits, `−∞` where masked) replaced by `exp(score − max)`; returns
/// `1 / Σ exp(score − max)`, what the weighted values are scaled by.
fn softmax_in_place(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    for w in scores.iter_mut() {
        *w = (*w - max).exp();
        total += *w;
    }
    1.0 / total
}

/// `[$zero; TOKENS_PER_PASS]` holding `$call` (a pass over the fixed-size array `$group` of the
/// 1 to [`TOKENS_PER_PASS`] `$inputs`) in its first elements: the dispatch from a slice of inputs
/// to a const-generic pass, shared by every kernel.
macro_rules! by_pass {
    ($inputs:expr, $zero:expr, |$group:ident| $call:expr) => {{
        let mut out = [$zero; TOKENS_PER_PASS];
        match *$inputs {
            [a] => {
                let $group = [a];
                out[..1].copy_from_slice(&$call)
            }
            [a, b] => {
                let $group = [a, b];
                out[..2].copy_from_slice(&$call)
            }
            [a, b, c] => {
                let $group = [a, b, c];
                out[..3].copy_from_slice(&$call)
            }
            [a, b, c, d] => {
                let $group = [a, b, c, d];
                out.copy_from_slice(&$call)
            }
            _ => unreachable!("passes hold 1 to {TOKENS_PER_PASS} inputs"),
        }
        out
    }};
}

/// Portable [`HostFloat::dots`]: [`LANES`] partial sums per dot, combined pairwise at the end.
fn portable_dots<F: HostFloat>(row: &[F], inputs: &[&[F]]) -> [F; TOKENS_PER_PASS] {
    fn pass<F: HostFloat, const N: usize>(row: &[F], inputs: [&[F]; N]) -> [F; N] {
        let len = row.len();
        let body = len - len % LANES;
        let mut acc = [[F::ZERO; LANES]; N];
        for start in (0..body).step_by(LANES) {
            let w: &[F; LANES] = row[start..start + LANES].try_into().unwrap();
            for (sums, input) in acc.iter_mut().zip(&inputs) {
                let v: &[F; LANES] = input[start..start + LANES].try_into().unwrap();
                for lane in 0..LANES {
                    sums[lane] = sums[lane] + w[lane] * v[lane];
                }
            }
        }
        let mut result = [F::ZERO; N];
        for ((out, sums), input) in result.iter_mut().zip(&mut acc).zip(&inputs) {
            let mut width = LANES;
            while width > 1 {
                width /= 2;
                for lane in 0..width {
                    sums[lane] = sums[lane] + sums[lane + width];
                }
            }
            *out = (body..len).fold(sums[0], |total, i| total + row[i] * input[i]);
        }
        result
    }
    by_pass!(inputs, F::ZERO, |group| pass(row, group))
}

#[cfg(target_arch = "x86_64")]
/// The dispatch from a slice of inputs to a fixed-size pass, for one weight type.
macro_rules! dots_fn {
    ($(#[$attr:meta])* $name:ident, $pass:ident, $weight:ty, $features:literal) => {
        $(#[$attr])*
        /// # Safety
        /// The CPU must have the target features; every input is as long as `row`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $name(row: &[$weight], inputs: &[&[f32]]) -> [f32; TOKENS_PER_PASS] {
            // SAFETY: the caller's contract.
            by_pass!(inputs, 0.0, |group| unsafe { $pass(row, group) })
        }
    };
}

/// One pass of `N` dots over `row`: `2 · $lanes` weights a step, loaded as two `$lanes`-wide
/// `f32` registers by `$load(pointer)`, two accumulators per input; the tail widened by
/// `$widen`. `[$zero, $fma, $load_x]` are the register width's zero, FMA and unaligned `f32` load;
/// the two accumulators are summed by the module's `sum_lanes`.
#[cfg(target_arch = "x86_64")]
macro_rules! pass_fn {
    (
        $name:ident, $weight:ty, $features:literal, $lanes:literal,
        [$zero:path, $fma:path, $load_x:path], $load:expr, $widen:expr
    ) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const N: usize>(row: &[$weight], inputs: [&[f32]; N]) -> [f32; N] {
            let len = row.len();
            let step = 2 * $lanes;
            let body = len - len % step;
            let mut low = [$zero(); N];
            let mut high = [$zero(); N];
            let mut start = 0;
            while start < body {
                // SAFETY: start + step <= body <= len, and every input has len elements.
                unsafe {
                    let w = row.as_ptr().add(start);
                    let (w_low, w_high) = ($load(w), $load(w.add($lanes)));
                    for n in 0..N {
                        let x = inputs[n].as_ptr().add(start);
                        low[n] = $fma(w_low, $load_x(x), low[n]);
                        high[n] = $fma(w_high, $load_x(x.add($lanes)), high[n]);
                    }
                }
                start += step;
            }
            let mut result = [0.0; N];
            for n in 0..N {
                let sum = sum_lanes(low[n], high[n]);
                result[n] = (body..len).fold(sum, |total, i| total + $widen(row[i]) * inputs[n][i]);
            }
            result
        }
    };
}

/// `f32` dots with AVX2 + FMA: two 8-wide accumulators per input (enough independent chains to
/// cover the FMA latency with a few inputs), unaligned loads.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::TOKENS_PER_PASS;
    use std::arch::x86_64::*;

    /// Whether this CPU runs [`dots`] (checked once per call; the check is a cached load).
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    /// Whether this CPU runs the q8 kernels ([`dots_q8`], [`dots_q8_q8`]): AVX2 and FMA, and F16C
    /// for the `f16` block scales.
    pub(super) fn q8_available() -> bool {
        available() && std::is_x86_feature_detected!("f16c")
    }

    /// An `f16` scale widened with F16C (one instruction; `half`'s conversion checks the CPU on
    /// every call).
    #[target_feature(enable = "f16c")]
    #[inline]
    pub(super) fn widen(scale: half::f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(scale.to_bits()))))
    }

    /// Dots of one q8 row (blocks of 32) with 1 to [`TOKENS_PER_PASS`] inputs quantized the same
    /// way, in int8 (the kernels [`dots_q8_q8`] picks from).
    ///
    /// # Safety
    /// The CPU must have the kernel's target features; `values` and every input's values are
    /// `scales.len()` blocks of 32, each input with as many scales.
    pub(super) type Q8Q8Kernel =
        unsafe fn(&[i8], &[half::f16], &[(&[i8], &[f32])]) -> [f32; TOKENS_PER_PASS];

    /// The int8 dot kernel for this CPU, chosen once per product rather than per row: per
    /// block, `|w| · sign(x, w)` summed in fours into `i32` lanes (AVX-512 VNNI's `vpdpbusd`
    /// where the CPU has it, else `maddubs` in pairs — no overflow: the values lie in
    /// `[-127, 127]` — then `madd`), converted and scaled by `s_w · s_x`. The scale products are
    /// made eight blocks at a time (F16C widens eight `f16` scales in one instruction) before the
    /// blocks they scale: per block the loop is then the int8 dot, one conversion and one FMA
    /// from a broadcast load, which keeps a core near the bytes it can stream. Callers must have
    /// checked [`q8_available`] (AVX2, FMA, F16C).
    pub(super) fn dots_q8_q8() -> Q8Q8Kernel {
        if super::avx512::q8_available() {
            super::avx512::dots_q8_q8
        } else if vnni_available() {
            dots_q8_q8_vnni
        } else {
            dots_q8_q8_avx2
        }
    }

    /// Whether [`dots_q8_q8`] takes `vpdpbusd` (AVX-512 VNNI on 256-bit registers).
    pub(super) fn vnni_available() -> bool {
        std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512vl")
    }

    /// The dispatch and pass of [`dots_q8_q8`] for one way of taking a block's int8 dot.
    macro_rules! q8_q8_fn {
        ($name:ident, $pass:ident, $features:literal, |$w:ident, $x:ident| $block_sums:expr) => {
            /// # Safety
            /// As [`Q8Q8Kernel`], and the CPU has the target features.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                values: &[i8],
                scales: &[half::f16],
                inputs: &[(&[i8], &[f32])],
            ) -> [f32; TOKENS_PER_PASS] {
                // SAFETY: the caller's contract.
                by_pass!(inputs, 0.0, |group| unsafe { $pass(values, scales, group) })
            }

            #[target_feature(enable = $features)]
            unsafe fn $pass<const N: usize>(
                values: &[i8],
                scales: &[half::f16],
                inputs: [(&[i8], &[f32]); N],
            ) -> [f32; N] {
                let blocks = scales.len();
                assert_eq!(values.len(), blocks * 32);
                for (x, s) in &inputs {
                    assert!(x.len() == blocks * 32 && s.len() == blocks);
                }
                // `|w| · sign(x, w)` of block `b` in eight `i32` lanes.
                let block_sums = |$w: __m256i, $x: __m256i| -> __m256i { $block_sums };
                // Two accumulators per input (even and odd blocks) to hide the FMA latency.
                let mut even = [_mm256_setzero_ps(); N];
                let mut odd = [_mm256_setzero_ps(); N];
                // `s_w · s_x` of the eight blocks from `chunk`, per input.
                let mut products = [[0.0f32; 8]; N];
                let mut chunk = 0;
                while chunk < blocks {
                    let len = (blocks - chunk).min(8);
                    if len == 8 {
                        // SAFETY: eight scales from `chunk` lie within both scale slices.
                        unsafe {
                            let w = _mm256_cvtph_ps(_mm_loadu_si128(
                                scales.as_ptr().add(chunk) as *const __m128i
                            ));
                            for n in 0..N {
                                let x = _mm256_loadu_ps(inputs[n].1.as_ptr().add(chunk));
                                _mm256_storeu_ps(products[n].as_mut_ptr(), _mm256_mul_ps(w, x));
                            }
                        }
                    } else {
                        for j in 0..len {
                            let w = widen(scales[chunk + j]);
                            for n in 0..N {
                                products[n][j] = w * inputs[n].1[chunk + j];
                            }
                        }
                    }
                    let mut j = 0;
                    while j < len {
                        let b = chunk + j;
                        let pair = j + 1 < len;
                        // SAFETY: blocks b (and b + 1 when `pair`) of 32 lie within the row
                        // and every input; `products` holds their scales.
                        unsafe {
                            let w0 =
                                _mm256_loadu_si256(values.as_ptr().add(b * 32) as *const __m256i);
                            let a0 = _mm256_sign_epi8(w0, w0);
                            let (w1, a1) = if pair {
                                let w1 = _mm256_loadu_si256(
                                    values.as_ptr().add((b + 1) * 32) as *const __m256i
                                );
                                (w1, _mm256_sign_epi8(w1, w1))
                            } else {
                                (w0, a0)
                            };
                            for n in 0..N {
                                let x = inputs[n].0.as_ptr();
                                let x0 = _mm256_loadu_si256(x.add(b * 32) as *const __m256i);
                                let sums = block_sums(a0, _mm256_sign_epi8(x0, w0));
                                even[n] = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(sums),
                                    _mm256_broadcast_ss(&products[n][j]),
                                    even[n],
                                );
                                if pair {
                                    let x1 =
                                        _mm256_loadu_si256(x.add((b + 1) * 32) as *const __m256i);
                                    let sums = block_sums(a1, _mm256_sign_epi8(x1, w1));
                                    odd[n] = _mm256_fmadd_ps(
                                        _mm256_cvtepi32_ps(sums),
                                        _mm256_broadcast_ss(&products[n][j + 1]),
                                        odd[n],
                                    );
                                }
                            }
                        }
                        j += 2;
                    }
                    chunk += len;
                }
                let mut result = [0.0; N];
                for n in 0..N {
                    result[n] = sum_lanes(even[n], odd[n]);
                }
                result
            }
        };
    }

    q8_q8_fn!(
        dots_q8_q8_avx2,
        pass_q8_q8_avx2,
        "avx2,fma,f16c",
        |abs_w, signed_x| _mm256_madd_epi16(
            _mm256_maddubs_epi16(abs_w, signed_x),
            _mm256_set1_epi16(1)
        )
    );

    q8_q8_fn!(
        dots_q8_q8_vnni,
        pass_q8_q8_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        |abs_w, signed_x| _mm256_dpbusd_epi32(_mm256_setzero_si256(), abs_w, signed_x)
    );

    /// Dots of one q4 row with 1 to [`TOKENS_PER_PASS`] inputs held as [`super::Q4Input`] holds
    /// them, on AVX2 (the kernel of CPUs without AVX-512 VNNI; same contract and result as
    /// [`super::avx512::dots_q4_q8`] up to the order of the `f32` sums). Two blocks a step: their
    /// 32 packed bytes give the two blocks' low nibbles with a mask and their high ones with a
    /// shift and a mask, which is the grouped inputs' order within a group of four; `maddubs`
    /// (unsigned nibble × signed input, pairs in `i16`: at most 2 · 15 · 127) on both halves,
    /// added in `i16` (at most 7 620), then `madd` by ones leave block `b`'s sum in lanes 0–3 and
    /// block `b + 1`'s in lanes 4–7; scaled by their `s_w · s_x`, plus the offsets. Blocks past
    /// the last group of four take a 128-bit step each.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C ([`q8_available`]); `values` is `scales.len()` blocks of 16
    /// bytes, every input `scales.len()` blocks of 32 values (grouped) with one scale and one
    /// offset each.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots_q4_q8(
        values: &[i8],
        scales: &[half::f16],
        inputs: &[(&[i8], &[f32], &[f32])],
    ) -> [f32; TOKENS_PER_PASS] {
        // SAFETY: the caller's contract.
        by_pass!(inputs, 0.0, |group| unsafe {
            pass_q4_q8(values, scales, group)
        })
    }

    // Tail blocks index each input's products by block, as the groups do.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pass_q4_q8<const N: usize>(
        values: &[i8],
        scales: &[half::f16],
        inputs: [(&[i8], &[f32], &[f32]); N],
    ) -> [f32; N] {
        let blocks = scales.len();
        assert_eq!(values.len(), blocks * 16);
        for (x, s, o) in &inputs {
            assert!(x.len() == blocks * 32 && s.len() == blocks && o.len() == blocks);
        }
        let nibble = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut even = [_mm256_setzero_ps(); N];
        let mut odd = [_mm256_setzero_ps(); N];
        let mut offsets = [_mm256_setzero_ps(); N];
        let mut rest = [0.0f32; N];
        // `s_w · s_x` of the eight blocks from `chunk`, per input (a chunk is two groups).
        let mut products = [[0.0f32; 8]; N];
        let mut chunk = 0;
        while chunk < blocks {
            let len = (blocks - chunk).min(8);
            if len == 8 {
                // SAFETY: eight scales (and offsets) from `chunk` lie within every slice.
                unsafe {
                    let w = _mm256_cvtph_ps(_mm_loadu_si128(
                        scales.as_ptr().add(chunk) as *const __m128i
                    ));
                    for n in 0..N {
                        let x = _mm256_loadu_ps(inputs[n].1.as_ptr().add(chunk));
                        _mm256_storeu_ps(products[n].as_mut_ptr(), _mm256_mul_ps(w, x));
                        let o = _mm256_loadu_ps(inputs[n].2.as_ptr().add(chunk));
                        offsets[n] = _mm256_fmadd_ps(w, o, offsets[n]);
                    }
                }
            } else {
                for j in 0..len {
                    let w = widen(scales[chunk + j]);
                    for n in 0..N {
                        products[n][j] = w * inputs[n].1[chunk + j];
                        rest[n] += w * inputs[n].2[chunk + j];
                    }
                }
            }
            // SAFETY: `products[n]` holds 8 floats.
            let chunk_products: [__m256; N] =
                core::array::from_fn(|n| unsafe { _mm256_loadu_ps(products[n].as_ptr()) });
            let groups = len / 4;
            for g in 0..groups {
                for half in 0..2 {
                    let j = (4 * g + 2 * half) as i32;
                    let b = chunk + 4 * g + 2 * half;
                    // Lanes 0–3 pick product j, lanes 4–7 product j + 1.
                    let lanes = _mm256_set_epi32(j + 1, j + 1, j + 1, j + 1, j, j, j, j);
                    // SAFETY: blocks b and b + 1 lie within the row; the input's group holds
                    // their first halves at 32 · half and second halves 64 bytes on.
                    unsafe {
                        let packed =
                            _mm256_loadu_si256(values.as_ptr().add(b * 16) as *const __m256i);
                        let low = _mm256_and_si256(packed, nibble);
                        let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), nibble);
                        for n in 0..N {
                            let x = inputs[n].0.as_ptr().add((chunk + 4 * g) * 32 + 32 * half);
                            let x_low = _mm256_loadu_si256(x as *const __m256i);
                            let x_high = _mm256_loadu_si256(x.add(64) as *const __m256i);
                            let pairs = _mm256_add_epi16(
                                _mm256_maddubs_epi16(low, x_low),
                                _mm256_maddubs_epi16(high, x_high),
                            );
                            let dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                            let scale = _mm256_permutevar8x32_ps(chunk_products[n], lanes);
                            let acc = if half == 0 { &mut even[n] } else { &mut odd[n] };
                            *acc = _mm256_fmadd_ps(dots, scale, *acc);
                        }
                    }
                }
            }
            for j in 4 * groups..len {
                let b = chunk + j;
                // SAFETY: block b lies within the row and every input (in the row's order:
                // past the last whole group).
                unsafe {
                    let packed = _mm_loadu_si128(values.as_ptr().add(b * 16) as *const __m128i);
                    let low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
                    let high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
                    for n in 0..N {
                        let x = inputs[n].0.as_ptr().add(b * 32);
                        let pairs = _mm_add_epi16(
                            _mm_maddubs_epi16(low, _mm_loadu_si128(x as *const __m128i)),
                            _mm_maddubs_epi16(high, _mm_loadu_si128(x.add(16) as *const __m128i)),
                        );
                        let dots = _mm_madd_epi16(pairs, _mm_set1_epi16(1));
                        let dots = _mm_add_epi32(dots, _mm_shuffle_epi32::<0b01_00_11_10>(dots));
                        let dots = _mm_add_epi32(dots, _mm_shuffle_epi32::<0b10_11_00_01>(dots));
                        rest[n] += _mm_cvtsi128_si32(dots) as f32 * products[n][j];
                    }
                }
            }
            chunk += len;
        }
        let mut result = [0.0; N];
        for n in 0..N {
            let sums = _mm256_add_ps(even[n], offsets[n]);
            result[n] = sum_lanes(sums, odd[n]) + rest[n];
        }
        result
    }

    /// The 16 lanes of two accumulators summed in one fixed order (pairwise across halves), the
    /// reduction every pass ends with.
    #[target_feature(enable = "avx2")]
    fn sum_lanes(a: __m256, b: __m256) -> f32 {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a, b)) };
        let quads = [
            lanes[0] + lanes[4],
            lanes[1] + lanes[5],
            lanes[2] + lanes[6],
            lanes[3] + lanes[7],
        ];
        (quads[0] + quads[2]) + (quads[1] + quads[3])
    }

    dots_fn!(dots, pass, f32, "avx2,fma");
    pass_fn!(
        pass,
        f32,
        "avx2,fma",
        8,
        [_mm256_setzero_ps, _mm256_fmadd_ps, _mm256_loadu_ps],
        |p: *const f32| _mm256_loadu_ps(p),
        |w: f32| w
    );

    dots_fn!(
        /// `bf16` weights, widened by shifting each into the top half of an `f32`.
        dots_bf16, pass_bf16, half::bf16, "avx2,fma"
    );
    pass_fn!(
        pass_bf16,
        half::bf16,
        "avx2,fma",
        8,
        [_mm256_setzero_ps, _mm256_fmadd_ps, _mm256_loadu_ps],
        |p: *const half::bf16| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p as *const __m128i)
        ))),
        |w: half::bf16| w.to_f32()
    );

    dots_fn!(
        /// `f16` weights, widened with F16C.
        dots_f16, pass_f16, half::f16, "avx2,fma,f16c"
    );
    pass_fn!(
        pass_f16,
        half::f16,
        "avx2,fma,f16c",
        8,
        [_mm256_setzero_ps, _mm256_fmadd_ps, _mm256_loadu_ps],
        |p: *const half::f16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        |w: half::f16| w.to_f32()
    );

    /// q8 rows (blocks a multiple of 8 values): each 8 int8 values sign-extended, converted and
    /// multiplied by their block's scale as they are loaded, then the FMAs of [`dots`]' passes.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; every input is as long as `values`, which is whole
    /// blocks of `block` (a multiple of 8) values with one scale each in `scales`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots_q8(
        values: &[i8],
        scales: &[half::f16],
        block: usize,
        inputs: &[&[f32]],
    ) -> [f32; TOKENS_PER_PASS] {
        // SAFETY: the caller's contract.
        by_pass!(inputs, 0.0, |group| unsafe {
            pass_q8(values, scales, block, group)
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pass_q8<const N: usize>(
        values: &[i8],
        scales: &[half::f16],
        block: usize,
        inputs: [&[f32]; N],
    ) -> [f32; N] {
        assert!(block.is_multiple_of(8) && values.len().is_multiple_of(block));
        assert_eq!(scales.len(), values.len() / block);
        let mut low = [_mm256_setzero_ps(); N];
        let mut high = [_mm256_setzero_ps(); N];
        let q = values.as_ptr();
        // Eight int8 values at `q + at`, widened to `f32` and scaled.
        let load = |at: usize, scale: __m256| {
            // SAFETY: callers pass `at + 8 <= len`.
            unsafe {
                let v = _mm_loadl_epi64(q.add(at) as *const __m128i);
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), scale)
            }
        };
        for (b, &s) in scales.iter().enumerate() {
            let scale = _mm256_set1_ps(widen(s));
            let (mut at, end) = (b * block, (b + 1) * block);
            // 16 values a step into two accumulators per input (blocks of 32: two steps).
            while at + 16 <= end {
                let (w_low, w_high) = (load(at, scale), load(at + 8, scale));
                for n in 0..N {
                    // SAFETY: at + 16 <= len, and every input has len elements.
                    unsafe {
                        let x = inputs[n].as_ptr().add(at);
                        low[n] = _mm256_fmadd_ps(w_low, _mm256_loadu_ps(x), low[n]);
                        high[n] = _mm256_fmadd_ps(w_high, _mm256_loadu_ps(x.add(8)), high[n]);
                    }
                }
                at += 16;
            }
            // A block of 8, 24, … values ends with 8 more.
            if at < end {
                let w = load(at, scale);
                for n in 0..N {
                    // SAFETY: at + 8 = end <= len.
                    unsafe {
                        let x = inputs[n].as_ptr().add(at);
                        low[n] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x), low[n]);
                    }
                }
            }
        }
        let mut result = [0.0; N];
        for n in 0..N {
            result[n] = sum_lanes(low[n], high[n]);
        }
        result
    }
}

/// The [`avx2`] kernels on 512-bit registers, chosen at run time on CPUs with AVX-512 (F for the
/// float ones; BW and VNNI for the int8 one): twice the lanes per instruction and half the
/// instructions per byte of weights, which counts most where the passes are compute-bound
/// (several tokens per weight row: prefill) and less in single-token decode, which the bytes
/// streamed bound. Same contracts and results as the [`avx2`] kernels up to the order of the
/// `f32` sums (32 lanes instead of 16).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::TOKENS_PER_PASS;
    use std::arch::x86_64::*;

    /// Whether this CPU runs the float kernels ([`dots`], [`dots_bf16`], [`dots_f16`]).
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx512f")
    }

    /// Whether this CPU runs [`dots_q8_q8`]: AVX-512 F, BW, VL and VNNI, with the AVX2, FMA and
    /// F16C of its odd-block tail.
    pub(super) fn q8_available() -> bool {
        available()
            && super::avx2::q8_available()
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
    }

    /// One tile of [`super::attention`]: the `Q` (1 to 4) query rows `queries` against every
    /// position of `keys` / `values` (already narrowed to what the tile sees), `masks` their
    /// additive masks over those positions. `weights` (`Q` rows of the positions) receives the
    /// scores, then the softmax weights; `out` (`Q` rows of `D_v`) the outputs.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; the query and key rows (`D`) and the value rows (`D_v`) are whole
    /// registers of 16; `weights` and `out` are as long as said.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<E: super::CacheValue>(
        queries: &[&[f32]],
        masks: &[&[f32]],
        (keys, values, b, kv): (super::Heads<'_, E>, super::Heads<'_, E>, usize, usize),
        scale: f32,
        weights: &mut [f32],
        out: &mut [f32],
    ) {
        macro_rules! rows {
            ($q:literal) => {{
                let queries: [&[f32]; $q] = core::array::from_fn(|i| queries[i]);
                let masks: [&[f32]; $q] = core::array::from_fn(|i| masks[i]);
                // SAFETY: the caller's contract.
                unsafe { tile_scores::<E, $q>(queries, masks, keys, (b, kv), scale, weights) };
                let len = keys.dims()[2];
                let inverses: [f32; $q] = core::array::from_fn(|i| {
                    super::softmax_in_place(&mut weights[i * len..][..len])
                });
                // SAFETY: the caller's contract.
                unsafe { tile_values::<E, $q>(weights, values, (b, kv), inverses, out) };
            }};
        }
        match queries.len() {
            1 => rows!(1),
            2 => rows!(2),
            3 => rows!(3),
            _ => rows!(4),
        }
    }

    /// `weights[i · S + s] = queries[i] · keys[b, kv, s] · scale + masks[i][s]`, four keys a step
    /// (each key row loaded once for the `Q` queries; the `4 · Q` sums reduced together).
    ///
    /// # Safety
    /// As [`tile`].
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_scores<E: super::CacheValue, const Q: usize>(
        queries: [&[f32]; Q],
        masks: [&[f32]; Q],
        keys: super::Heads<'_, E>,
        (b, kv): (usize, usize),
        scale: f32,
        weights: &mut [f32],
    ) {
        let dim = queries[0].len();
        let positions = keys.dims()[2];
        debug_assert!(dim.is_multiple_of(16) && keys.dims()[3] == dim);
        debug_assert!(weights.len() == Q * positions);
        let mut s = 0;
        while s < positions {
            let step = (positions - s).min(4);
            let rows: [&[E]; 4] = core::array::from_fn(|i| keys.row(b, kv, s + i.min(step - 1)));
            let mut sums = [[_mm512_setzero_ps(); 4]; Q];
            let mut c = 0;
            while c < dim {
                // SAFETY: c + 16 <= dim, the length of every query and key row.
                unsafe {
                    let k: [__m512; 4] =
                        core::array::from_fn(|i| E::load16(rows[i].as_ptr().add(c)));
                    for (sums, query) in sums.iter_mut().zip(&queries) {
                        let q = _mm512_loadu_ps(query.as_ptr().add(c));
                        for (sum, k) in sums.iter_mut().zip(&k) {
                            *sum = _mm512_fmadd_ps(q, *k, *sum);
                        }
                    }
                }
                c += 16;
            }
            let dots: [[f32; 4]; Q] = if Q == 4 {
                let lanes = reduce_16(core::array::from_fn(|j| sums[j / 4][j % 4]));
                core::array::from_fn(|i| core::array::from_fn(|j| lanes[4 * i + j]))
            } else {
                core::array::from_fn(|i| core::array::from_fn(|j| _mm512_reduce_add_ps(sums[i][j])))
            };
            for (i, (dots, mask)) in dots.iter().zip(&masks).enumerate() {
                for j in 0..step {
                    weights[i * positions + s + j] = dots[j] * scale + mask[s + j];
                }
            }
            s += step;
        }
    }

    /// `out[i] = inverses[i] · Σ_s weights[i · S + s] · values[b, kv, s]` for the `Q` rows, up to
    /// 128 columns (8 registers; 64 for three or four rows) a pass held in registers for every
    /// row across the positions
    /// (each value chunk loaded once for the `Q` rows); a position no row weighs is skipped.
    ///
    /// # Safety
    /// As [`tile`].
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_values<E: super::CacheValue, const Q: usize>(
        weights: &[f32],
        values: super::Heads<'_, E>,
        (b, kv): (usize, usize),
        inverses: [f32; Q],
        out: &mut [f32],
    ) {
        #[target_feature(enable = "avx512f")]
        fn columns<E: super::CacheValue, const Q: usize, const C: usize>(
            weights: &[f32],
            values: super::Heads<'_, E>,
            (b, kv, col): (usize, usize, usize),
            inverses: [f32; Q],
            out: &mut [f32],
        ) {
            let [_, _, positions, width] = values.dims();
            let mut sums = [[_mm512_setzero_ps(); C]; Q];
            for s in 0..positions {
                let w: [f32; Q] = core::array::from_fn(|i| weights[i * positions + s]);
                if w.iter().all(|w| *w == 0.0) {
                    continue;
                }
                let row = &values.row(b, kv, s)[col..col + 16 * C];
                // SAFETY: 16 · (i + 1) <= row.len().
                let v: [__m512; C] =
                    core::array::from_fn(|i| unsafe { E::load16(row.as_ptr().add(16 * i)) });
                for (sums, w) in sums.iter_mut().zip(w) {
                    let w = _mm512_set1_ps(w);
                    for (sum, v) in sums.iter_mut().zip(&v) {
                        *sum = _mm512_fmadd_ps(w, *v, *sum);
                    }
                }
            }
            for (i, (sums, inverse)) in sums.iter().zip(inverses).enumerate() {
                let out = &mut out[i * width + col..][..16 * C];
                let inverse = _mm512_set1_ps(inverse);
                for (j, sum) in sums.iter().enumerate() {
                    // SAFETY: 16 · (j + 1) <= out.len().
                    unsafe {
                        _mm512_storeu_ps(out.as_mut_ptr().add(16 * j), _mm512_mul_ps(*sum, inverse))
                    };
                }
            }
        }
        let width = values.dims()[3];
        debug_assert!(width.is_multiple_of(16) && out.len() == Q * width);
        // Accumulators for `Q` rows of `C` registers, and `C` loaded: at most 32 registers.
        let most = if Q <= 2 { 8 } else { 4 };
        let mut col = 0;
        while col < width {
            let registers = ((width - col) / 16).min(most);
            let at = (b, kv, col);
            match registers {
                8 => columns::<E, Q, 8>(weights, values, at, inverses, out),
                7 => columns::<E, Q, 7>(weights, values, at, inverses, out),
                6 => columns::<E, Q, 6>(weights, values, at, inverses, out),
                5 => columns::<E, Q, 5>(weights, values, at, inverses, out),
                4 => columns::<E, Q, 4>(weights, values, at, inverses, out),
                3 => columns::<E, Q, 3>(weights, values, at, inverses, out),
                2 => columns::<E, Q, 2>(weights, values, at, inverses, out),
                _ => columns::<E, Q, 1>(weights, values, at, inverses, out),
            }
            col += 16 * registers;
        }
    }

    /// The 32 lanes of two accumulators summed (`_mm512_reduce_add_ps`'s fixed tree order).
    #[target_feature(enable = "avx512f")]
    fn sum_lanes(a: __m512, b: __m512) -> f32 {
        _mm512_reduce_add_ps(_mm512_add_ps(a, b))
    }

    dots_fn!(
        /// `f32` weights.
        dots, pass, f32, "avx512f"
    );
    pass_fn!(
        pass,
        f32,
        "avx512f",
        16,
        [_mm512_setzero_ps, _mm512_fmadd_ps, _mm512_loadu_ps],
        |p: *const f32| _mm512_loadu_ps(p),
        |w: f32| w
    );

    dots_fn!(
        /// `bf16` weights, widened by shifting each into the top half of an `f32`.
        dots_bf16, pass_bf16, half::bf16, "avx512f"
    );
    pass_fn!(
        pass_bf16,
        half::bf16,
        "avx512f",
        16,
        [_mm512_setzero_ps, _mm512_fmadd_ps, _mm512_loadu_ps],
        |p: *const half::bf16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p as *const __m256i)
        ))),
        |w: half::bf16| w.to_f32()
    );

    dots_fn!(
        /// `f16` weights, widened by `vcvtph2ps`.
        dots_f16, pass_f16, half::f16, "avx512f"
    );
    pass_fn!(
        pass_f16,
        half::f16,
        "avx512f",
        16,
        [_mm512_setzero_ps, _mm512_fmadd_ps, _mm512_loadu_ps],
        |p: *const half::f16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        |w: half::f16| w.to_f32()
    );

    /// Inputs from which [`project_split_bf16`] takes 8-row × 2-input tiles instead of 4 × 4.
    /// Both hold 16 accumulators and issue 32 `vdpbf16ps` per 32-weight step; the tall tile
    /// loads 8 rows (from L1: the rows are reused by every pass) and 4 input halves (from L2: a
    /// pass's inputs are up to 512 KB) where the square one loads 4 and 8. On the Zen 4 VM of
    /// docs/BENCHMARKS.md (session 26, `gemv --dtype bf16`, 2 threads) it was faster at 24 and
    /// more inputs in every alternating round (+3 to +40 %) and as often slower as faster at
    /// 8 to 16.
    pub(super) const TALL_TILE_MIN_INPUTS: usize = 24;

    /// Whether this CPU runs [`project_split_bf16`]: AVX-512 F and BF16.
    pub(super) fn bf16_available() -> bool {
        available() && std::is_x86_feature_detected!("avx512bf16")
    }

    /// [`HostMatrix::project`](super::HostMatrix::project) for `bf16` rows with split-`bf16`
    /// inputs ([`super::SplitBf16`]): rows four at a time (then one at a time), inputs up to
    /// [`TOKENS_PER_PASS`] at a time, each tile one pass of [`tile_split_bf16`] over the rows,
    /// which stay in L1 across the input groups; from [`TALL_TILE_MIN_INPUTS`] inputs on, rows
    /// eight at a time and inputs two at a time (the same 16 accumulators, half the loads of
    /// inputs from L2 per `vdpbf16ps`). The first pass over a group of rows prefetches
    /// the next group (the rows after them in `matrix`), so a product of a few tokens (a prefill's
    /// experts) streams its weights while it computes instead of after.
    ///
    /// # Panics
    /// If an input or prepared row is not `row_len` long, the rows lie outside `matrix`, or the
    /// CPU lacks [`bf16_available`]'s features.
    pub(super) fn project_split_bf16(
        matrix: &[half::bf16],
        base: usize,
        row_len: usize,
        rows: core::ops::Range<usize>,
        inputs: &[&[f32]],
        prepared: &[&super::SplitBf16],
        mut emit: impl FnMut(usize, usize, f32),
    ) {
        assert!(bf16_available(), "the CPU has AVX-512 F and BF16");
        assert_eq!(prepared.len(), inputs.len(), "one prepared row per input");
        for (x, p) in inputs.iter().zip(prepared) {
            assert!(
                x.len() == row_len && p.hi().len() == row_len && p.lo().len() == row_len,
                "inputs of the rows' length"
            );
        }
        assert!(
            base + rows.end * row_len <= matrix.len(),
            "rows within the matrix"
        );
        let row = |r: usize| &matrix[base + r * row_len..base + (r + 1) * row_len];
        if let ([x], [split]) = (inputs, prepared) {
            for r in rows.clone() {
                // SAFETY: as below.
                let dot = unsafe { dot_split_bf16(row(r), x, split.hi(), split.lo()) };
                emit(0, r - rows.start, dot);
            }
            return;
        }
        // Many inputs: 8-row tiles two inputs at a time, else 4-row tiles four at a time.
        let tall = inputs.len() >= TALL_TILE_MIN_INPUTS;
        let mut r = rows.start;
        while r < rows.end {
            let left = rows.end - r;
            let count = if tall && left >= 8 {
                8
            } else if left >= 4 {
                4
            } else {
                1
            };
            let width = if count == 8 { 2 } else { TOKENS_PER_PASS };
            let tile_rows: [&[half::bf16]; 8] = core::array::from_fn(|i| row(r + i.min(count - 1)));
            for (pass, (group, split)) in
                inputs.chunks(width).zip(prepared.chunks(width)).enumerate()
            {
                // SAFETY: the CPU has AVX-512 F and BF16 (asserted); every row, input and
                // prepared row is `row_len` long (asserted).
                let dots =
                    unsafe { tile_dispatch(count, &tile_rows[..count], group, split, pass == 0) };
                for (i, tile_row) in dots[..count].iter().enumerate() {
                    for (n, &dot) in tile_row[..group.len()].iter().enumerate() {
                        emit(pass * width + n, r + i - rows.start, dot);
                    }
                }
            }
            r += count;
        }
    }

    /// `row · x` from `x = hi + lo` ([`super::SplitBf16`]) for one input: 64 weights a step in
    /// two registers, `w · hi` and `w · lo` of each into accumulators of their own, so four
    /// chains of `vdpbf16ps` overlap (two chains, `w · hi` then `w · lo` into one accumulator,
    /// were bound by the instruction's latency: 12 % slower on a row in L2); a last 32-weight
    /// step into the first pair; the tail past it in `f32`.
    /// Per 64 weights two weight loads and four `vdpbf16ps` (the widening passes: four loads,
    /// four widenings, four FMAs), so more of the row is in flight: decode streams the
    /// weights 5–10 % faster (docs/BENCHMARKS.md, session 19).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; `x`, `hi` and `lo` are as long as `row`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot_split_bf16(
        row: &[half::bf16],
        x: &[f32],
        hi: &[half::bf16],
        lo: &[half::bf16],
    ) -> f32 {
        let len = row.len();
        let pairs = len - len % 64;
        let body = len - len % 32;
        let load = |p: *const half::bf16| {
            // SAFETY: callers load 32 elements below `body`; a bf16 is 16 bits, so 32 of them
            // are one 512-bit register.
            unsafe { core::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _)) }
        };
        let (mut even, mut odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (mut even_lo, mut odd_lo) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut start = 0;
        // SAFETY (pointer offsets): start + 64 <= pairs <= len, the length of every slice.
        while start < pairs {
            let (w0, w1) = unsafe {
                (
                    load(row.as_ptr().add(start)),
                    load(row.as_ptr().add(start + 32)),
                )
            };
            unsafe {
                even = _mm512_dpbf16_ps(even, w0, load(hi.as_ptr().add(start)));
                odd = _mm512_dpbf16_ps(odd, w1, load(hi.as_ptr().add(start + 32)));
                even_lo = _mm512_dpbf16_ps(even_lo, w0, load(lo.as_ptr().add(start)));
                odd_lo = _mm512_dpbf16_ps(odd_lo, w1, load(lo.as_ptr().add(start + 32)));
            }
            start += 64;
        }
        even = _mm512_add_ps(even, even_lo);
        odd = _mm512_add_ps(odd, odd_lo);
        if start < body {
            // SAFETY: start + 32 == body <= len.
            unsafe {
                let w = load(row.as_ptr().add(start));
                even = _mm512_dpbf16_ps(even, w, load(hi.as_ptr().add(start)));
                even = _mm512_dpbf16_ps(even, w, load(lo.as_ptr().add(start)));
            }
        }
        let sum = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
        (body..len).fold(sum, |total, k| total + row[k].to_f32() * x[k])
    }

    /// `out[i][n] = rows[i] · inputs[n]` for 8 rows and 1 or 2 inputs, or 1 or 4 rows and 1 to
    /// [`TOKENS_PER_PASS`] inputs;
    /// with `prefetch`, the rows that follow them are prefetched ([`tile_split_bf16`]).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; rows, inputs and prepared rows are all equally long.
    unsafe fn tile_dispatch(
        count: usize,
        rows: &[&[half::bf16]],
        inputs: &[&[f32]],
        prepared: &[&super::SplitBf16],
        prefetch: bool,
    ) -> [[f32; TOKENS_PER_PASS]; 8] {
        macro_rules! arm {
            ($r:literal, $n:literal) => {{
                let rows: [&[half::bf16]; $r] = core::array::from_fn(|i| rows[i]);
                let x: [&[f32]; $n] = core::array::from_fn(|n| inputs[n]);
                let hi: [&[half::bf16]; $n] = core::array::from_fn(|n| prepared[n].hi());
                let lo: [&[half::bf16]; $n] = core::array::from_fn(|n| prepared[n].lo());
                // SAFETY: the caller's contract.
                let tile = unsafe { tile_split_bf16::<$r, $n>(rows, x, hi, lo, prefetch) };
                let mut out = [[0.0; TOKENS_PER_PASS]; 8];
                for (o, t) in out.iter_mut().zip(tile) {
                    o[..$n].copy_from_slice(&t);
                }
                out
            }};
        }
        match (count, inputs.len()) {
            (8, 1) => arm!(8, 1),
            (8, 2) => arm!(8, 2),
            (4, 1) => arm!(4, 1),
            (4, 2) => arm!(4, 2),
            (4, 3) => arm!(4, 3),
            (4, 4) => arm!(4, 4),
            (1, 1) => arm!(1, 1),
            (1, 2) => arm!(1, 2),
            (1, 3) => arm!(1, 3),
            (1, 4) => arm!(1, 4),
            _ => unreachable!("tiles of 8 rows by 1 or 2 inputs, or of 1 or 4 rows by 1 to 4"),
        }
    }

    /// `R × N` dots of `bf16` rows with split-`bf16` inputs: per 32-weight step, `R` row loads,
    /// `2N` input loads and `2RN` `vdpbf16ps` into `RN` accumulators (`w · hi` then `w · lo`);
    /// the tail past the last whole step in `f32` (each weight widened, times the `f32` input).
    ///
    /// With `prefetch`, each step also prefetches the same 64 bytes of the `R` rows that follow
    /// `rows` in memory (`rows[i]` plus `R` rows: the next tile of a row-major matrix; the
    /// addresses are only prefetched, never read, so past the matrix's end they cost nothing).
    /// Each row is one 4 KB page of a 2 048-wide matrix, and the hardware prefetcher alone
    /// leaves a few-token product short of both its compute and its bandwidth
    /// (`gemv --dtype bf16 --tokens 2|4|8`: 20-54 % more throughput with it, docs/BENCHMARKS.md,
    /// session 25).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_split_bf16<const R: usize, const N: usize>(
        rows: [&[half::bf16]; R],
        inputs: [&[f32]; N],
        hi: [&[half::bf16]; N],
        lo: [&[half::bf16]; N],
        prefetch: bool,
    ) -> [[f32; N]; R] {
        let len = rows[0].len();
        let body = len - len % 32;
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let mut start = 0;
        while start < body {
            if prefetch {
                for row in rows {
                    _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(R * len + start).cast());
                }
            }
            // SAFETY: start + 32 <= body <= len, the length of every row and prepared input;
            // a bf16 is 16 bits, so 32 of them are one 512-bit register.
            unsafe {
                let w: [__m512bh; R] = core::array::from_fn(|i| {
                    core::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        rows[i].as_ptr().add(start) as *const _,
                    ))
                });
                for n in 0..N {
                    let h = core::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        hi[n].as_ptr().add(start) as *const _,
                    ));
                    let l = core::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        lo[n].as_ptr().add(start) as *const _,
                    ));
                    for i in 0..R {
                        acc[i][n] = _mm512_dpbf16_ps(acc[i][n], w[i], h);
                        acc[i][n] = _mm512_dpbf16_ps(acc[i][n], w[i], l);
                    }
                }
            }
            start += 32;
        }
        let mut out = [[0.0; N]; R];
        let full = (R * N == 16).then(|| reduce_16(core::array::from_fn(|j| acc[j / N][j % N])));
        for i in 0..R {
            for n in 0..N {
                let sum = match &full {
                    Some(sums) => sums[i * N + n],
                    None => _mm512_reduce_add_ps(acc[i][n]),
                };
                out[i][n] =
                    (body..len).fold(sum, |total, k| total + rows[i][k].to_f32() * inputs[n][k]);
            }
        }
        out
    }

    /// The lane sums of 16 registers at once (`sums[j]` of `v[j]`): 15 · 3 shuffles and adds in
    /// four levels instead of 16 separate reductions. After level `k` every register holds the
    /// partial sums of 2ᵏ of the inputs (halves, then quarters, pairs, single lanes).
    #[target_feature(enable = "avx512f")]
    pub(super) fn reduce_16(v: [__m512; 16]) -> [f32; 16] {
        // Level 1: [a.q0 + a.q2, a.q1 + a.q3, b.q0 + b.q2, b.q1 + b.q3] (q: 128-bit quarters).
        let s: [__m512; 8] = core::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            )
        });
        // Level 2: quarter q holds 4 partial sums of v[4j + q].
        let u: [__m512; 4] = core::array::from_fn(|j| {
            let (a, b) = (s[2 * j], s[2 * j + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        });
        // Level 3: quarter q holds [v[8m + q], v[8m + 4 + q]] twice (partial sums).
        let x: [__m512; 2] = core::array::from_fn(|m| {
            let (a, b) = (u[2 * m], u[2 * m + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Level 4: lane 4q + e holds the sum of v[q + 4e].
        let (a, b) = (_mm512_castps_pd(x[0]), _mm512_castps_pd(x[1]));
        let total = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        );
        let mut lanes = [0.0f32; 16];
        // SAFETY: `lanes` holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), total) };
        core::array::from_fn(|j| lanes[4 * (j % 4) + j / 4])
    }

    /// [`dots_q8_q8`] of one quantized input with `out.len()` consecutive rows of `row_len`
    /// values (whole blocks of 32) starting at `values[0]` / `scales[0]`, into `out` (one per
    /// row): the decode step's product in one call, without the per-row dispatch through the
    /// kernel pointer.
    ///
    /// # Safety
    /// As [`dots_q8_q8`]; `values` holds `out.len()` rows of `row_len`, `scales` their blocks, and
    /// the input is one row of `row_len` with its block scales.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows_q8_q8(
        values: &[i8],
        scales: &[half::f16],
        row_len: usize,
        input: (&[i8], &[f32]),
        out: &mut [f32],
    ) {
        let blocks = row_len / 32;
        for (r, out) in out.iter_mut().enumerate() {
            let values = &values[r * row_len..][..row_len];
            let scales = &scales[r * blocks..][..blocks];
            // SAFETY: the caller's contract.
            *out = unsafe { pass_q8_q8::<1>(values, scales, [input]) }[0];
        }
    }

    /// [`super::avx2::dots_q8_q8`]'s int8 dots two blocks of 32 at a time: `vpdpbusd` on 64
    /// bytes gives block `b`'s sums in lanes 0–7 and block `b + 1`'s in lanes 8–15, scaled by one
    /// register holding their two `s_w · s_x` (permuted from sixteen made at once); an odd last
    /// block takes the 256-bit VNNI step.
    ///
    /// # Safety
    /// As [`super::avx2::Q8Q8Kernel`], on a CPU with [`q8_available`]'s features.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dots_q8_q8(
        values: &[i8],
        scales: &[half::f16],
        inputs: &[(&[i8], &[f32])],
    ) -> [f32; TOKENS_PER_PASS] {
        // SAFETY: the caller's contract.
        by_pass!(inputs, 0.0, |group| unsafe {
            pass_q8_q8(values, scales, group)
        })
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pass_q8_q8<const N: usize>(
        values: &[i8],
        scales: &[half::f16],
        inputs: [(&[i8], &[f32]); N],
    ) -> [f32; N] {
        let blocks = scales.len();
        assert_eq!(values.len(), blocks * 32);
        for (x, s) in &inputs {
            assert!(x.len() == blocks * 32 && s.len() == blocks);
        }
        let mut pairs = [_mm512_setzero_ps(); N];
        let mut last = [_mm256_setzero_ps(); N];
        // Lanes 0–7 pick product 0, lanes 8–15 product 1 (`set` lists the lanes high first).
        let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut products = [[0.0f32; 16]; N];
        let mut chunk = 0;
        while chunk < blocks {
            let len = (blocks - chunk).min(16);
            if len == 16 {
                // SAFETY: sixteen scales from `chunk` lie within both scale slices.
                unsafe {
                    let w = _mm512_cvtph_ps(_mm256_loadu_si256(
                        scales.as_ptr().add(chunk) as *const __m256i
                    ));
                    for n in 0..N {
                        let x = _mm512_loadu_ps(inputs[n].1.as_ptr().add(chunk));
                        _mm512_storeu_ps(products[n].as_mut_ptr(), _mm512_mul_ps(w, x));
                    }
                }
            } else {
                for j in 0..len {
                    let w = super::avx2::widen(scales[chunk + j]);
                    for n in 0..N {
                        products[n][j] = w * inputs[n].1[chunk + j];
                    }
                }
            }
            // SAFETY: `products[n]` holds 16 floats.
            let chunk_products: [__m512; N] =
                core::array::from_fn(|n| unsafe { _mm512_loadu_ps(products[n].as_ptr()) });
            let mut j = 0;
            while j + 2 <= len {
                let b = chunk + j;
                // SAFETY: blocks b and b + 1 of 32 lie within the row and every input.
                unsafe {
                    let w = _mm512_loadu_si512(values.as_ptr().add(b * 32) as *const _);
                    let abs_w = _mm512_abs_epi8(w);
                    let negative = _mm512_movepi8_mask(w);
                    let lanes = _mm512_add_epi32(halves, _mm512_set1_epi32(j as i32));
                    for n in 0..N {
                        let x = _mm512_loadu_si512(inputs[n].0.as_ptr().add(b * 32) as *const _);
                        // `x · sign(w)`: negated where `w < 0` (the values lie in [-127, 127]).
                        let signed_x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
                        let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), abs_w, signed_x);
                        let scale = _mm512_permutexvar_ps(lanes, chunk_products[n]);
                        pairs[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, pairs[n]);
                    }
                }
                j += 2;
            }
            if j < len {
                let b = chunk + j;
                // SAFETY: block b of 32 lies within the row and every input.
                unsafe {
                    let w = _mm256_loadu_si256(values.as_ptr().add(b * 32) as *const __m256i);
                    let abs_w = _mm256_sign_epi8(w, w);
                    for n in 0..N {
                        let x =
                            _mm256_loadu_si256(inputs[n].0.as_ptr().add(b * 32) as *const __m256i);
                        let sums = _mm256_dpbusd_epi32(
                            _mm256_setzero_si256(),
                            abs_w,
                            _mm256_sign_epi8(x, w),
                        );
                        last[n] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(sums),
                            _mm256_set1_ps(products[n][j]),
                            last[n],
                        );
                    }
                }
            }
            chunk += len;
        }
        let mut result = [0.0; N];
        for n in 0..N {
            result[n] =
                _mm512_reduce_add_ps(_mm512_add_ps(pairs[n], _mm512_zextps256_ps512(last[n])));
        }
        result
    }
    /// [`dots_q4_q8`] for one input over `out.len()` consecutive rows of `row_len` (one dot per
    /// row): the decode step's product in one call.
    ///
    /// # Safety
    /// As [`dots_q4_q8`]; `values` packs `out.len()` rows of `row_len` weights, `scales` holds
    /// their blocks, and the input is one row of `row_len` with its block scales and offsets.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows_q4_q8(
        values: &[i8],
        scales: &[half::f16],
        row_len: usize,
        input: (&[i8], &[f32], &[f32]),
        out: &mut [f32],
    ) {
        let blocks = row_len / 32;
        for (r, out) in out.iter_mut().enumerate() {
            let values = &values[r * row_len / 2..][..row_len / 2];
            let scales = &scales[r * blocks..][..blocks];
            // SAFETY: the caller's contract.
            *out = unsafe { pass_q4_q8::<1>(values, scales, [input]) }[0];
        }
    }

    /// Dots of one q4 row (blocks of 32: 16 packed bytes and an `f16` scale each) with 1 to
    /// [`TOKENS_PER_PASS`] inputs quantized to int8 blocks of 32 and held as [`super::Q4Input`]
    /// holds them (values in the kernel's order, `f32` scales, offsets). Four blocks a step: their
    /// 64 bytes give the low nibbles (every block's values 0–15) with one mask and the high ones
    /// (values 16–31) with a shift and a mask, which the inputs' grouped order matches, so two
    /// `vpdpbusd` (unsigned nibble × signed input) leave block `b + i`'s sum in lanes `4i` to
    /// `4i + 3`; one conversion and one FMA by the four blocks' `s_w · s_x` (permuted from
    /// sixteen made at once) add them up, into two accumulators taken in turn (the FMA's
    /// latency). The offsets add `s_w · (-8 s_x Σ q_x)` sixteen blocks at a time. Blocks past
    /// the last group of four take a 256-bit step each.
    ///
    /// # Safety
    /// The CPU has [`q8_available`]'s features; `values` is `scales.len()` blocks of 16 bytes,
    /// every input `scales.len()` blocks of 32 values (grouped) with one scale and one offset
    /// each.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dots_q4_q8(
        values: &[i8],
        scales: &[half::f16],
        inputs: &[(&[i8], &[f32], &[f32])],
    ) -> [f32; TOKENS_PER_PASS] {
        // SAFETY: the caller's contract.
        by_pass!(inputs, 0.0, |group| unsafe {
            pass_q4_q8(values, scales, group)
        })
    }

    /// How far ahead of its loads [`pass_q4_q8`] asks for the packed weights: 512 bytes (eight
    /// steps), the best of 256, 512, 768 and 1 024 on a streamed GEMV (one and two threads).
    const Q4_PREFETCH_BYTES: usize = 512;

    // Tail blocks index each input's products by block, as the groups do.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pass_q4_q8<const N: usize>(
        values: &[i8],
        scales: &[half::f16],
        inputs: [(&[i8], &[f32], &[f32]); N],
    ) -> [f32; N] {
        let blocks = scales.len();
        assert_eq!(values.len(), blocks * 16);
        for (x, s, o) in &inputs {
            assert!(x.len() == blocks * 32 && s.len() == blocks && o.len() == blocks);
        }
        let mut sums = [[_mm512_setzero_ps(); 2]; N];
        let mut offsets = [_mm512_setzero_ps(); N];
        let mut last = [_mm256_setzero_ps(); N];
        let mut tail = [0.0f32; N];
        let nibble = _mm512_set1_epi8(0x0F);
        // Group `g` of a chunk scales lanes 4i..4i + 3 by product 4g + i (`set` lists the lanes
        // high first).
        let lanes: [__m512i; 4] = core::array::from_fn(|g| {
            let b = 4 * g as i32;
            _mm512_set_epi32(
                b + 3,
                b + 3,
                b + 3,
                b + 3,
                b + 2,
                b + 2,
                b + 2,
                b + 2,
                b + 1,
                b + 1,
                b + 1,
                b + 1,
                b,
                b,
                b,
                b,
            )
        });
        let mut products = [[0.0f32; 16]; N];
        let mut chunk = 0;
        while chunk < blocks {
            let len = (blocks - chunk).min(16);
            if len == 16 {
                // SAFETY: sixteen scales (and offsets) from `chunk` lie within every slice.
                unsafe {
                    let w = _mm512_cvtph_ps(_mm256_loadu_si256(
                        scales.as_ptr().add(chunk) as *const __m256i
                    ));
                    for n in 0..N {
                        let x = _mm512_loadu_ps(inputs[n].1.as_ptr().add(chunk));
                        _mm512_storeu_ps(products[n].as_mut_ptr(), _mm512_mul_ps(w, x));
                        let o = _mm512_loadu_ps(inputs[n].2.as_ptr().add(chunk));
                        offsets[n] = _mm512_fmadd_ps(w, o, offsets[n]);
                    }
                }
            } else {
                for j in 0..len {
                    let w = super::avx2::widen(scales[chunk + j]);
                    for n in 0..N {
                        products[n][j] = w * inputs[n].1[chunk + j];
                        tail[n] += w * inputs[n].2[chunk + j];
                    }
                }
            }
            // SAFETY: `products[n]` holds 16 floats.
            let chunk_products: [__m512; N] =
                core::array::from_fn(|n| unsafe { _mm512_loadu_ps(products[n].as_ptr()) });
            let groups = len / 4;
            for (g, lanes) in lanes.iter().enumerate().take(groups) {
                let b = chunk + 4 * g;
                // SAFETY: blocks b to b + 3 lie within the row (16 bytes each) and every input
                // (32 values each).
                unsafe {
                    // The hardware prefetcher alone leaves the stream short of its bandwidth
                    // at this much work per byte (+5-10 % GEMV throughput streamed).
                    _mm_prefetch::<_MM_HINT_T0>(
                        values.as_ptr().wrapping_add(b * 16 + Q4_PREFETCH_BYTES),
                    );
                    let packed = _mm512_loadu_si512(values.as_ptr().add(b * 16) as *const _);
                    let low = _mm512_and_si512(packed, nibble);
                    let high = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble);
                    for n in 0..N {
                        let x = inputs[n].0.as_ptr().add(b * 32);
                        let x_low = _mm512_loadu_si512(x as *const _);
                        let x_high = _mm512_loadu_si512(x.add(64) as *const _);
                        let dots = _mm512_dpbusd_epi32(
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, x_low),
                            high,
                            x_high,
                        );
                        let scale = _mm512_permutexvar_ps(*lanes, chunk_products[n]);
                        let acc = &mut sums[n][g & 1];
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), scale, *acc);
                    }
                }
            }
            for j in 4 * groups..len {
                let b = chunk + j;
                // SAFETY: block b lies within the row and every input (in the row's order:
                // past the last whole group).
                unsafe {
                    let packed = _mm_loadu_si128(values.as_ptr().add(b * 16) as *const __m128i);
                    let low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
                    let high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
                    let w = _mm256_set_m128i(high, low);
                    for n in 0..N {
                        let x =
                            _mm256_loadu_si256(inputs[n].0.as_ptr().add(b * 32) as *const __m256i);
                        let dots = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
                        last[n] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(dots),
                            _mm256_set1_ps(products[n][j]),
                            last[n],
                        );
                    }
                }
            }
            chunk += len;
        }
        let mut result = [0.0; N];
        for n in 0..N {
            let sum = _mm512_add_ps(sums[n][0], sums[n][1]);
            let sum = _mm512_add_ps(sum, _mm512_zextps256_ps512(last[n]));
            result[n] = _mm512_reduce_add_ps(_mm512_add_ps(sum, offsets[n])) + tail[n];
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Q8_BLOCK;
    use crate::reference::masked_moe_f64;

    /// SplitMix64 in [0, 1).
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn values(&mut self, len: usize, scale: f64) -> Vec<f32> {
            (0..len)
                .map(|_| ((self.uniform() * 2.0 - 1.0) * scale) as f32)
                .collect()
        }
    }

    /// Random routing, skewed to the low experts (the top quarter never routed), each slot masked
    /// with probability `sparsity`; the weights of never-routed experts are NaN.
    fn check(dims: MoeDims, sparsity: f64, rng: &mut Rng) {
        let MoeDims {
            tokens,
            top_k,
            experts,
            hidden,
            intermediate,
        } = dims;
        let eligible = (experts * 3 / 4).max(top_k);
        let mut ids = Vec::with_capacity(tokens * top_k);
        for _ in 0..tokens {
            let mut chosen: Vec<i64> = Vec::new();
            while chosen.len() < top_k {
                let e = ((rng.uniform().powi(2) * eligible as f64) as i64).min(eligible as i64 - 1);
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            for e in chosen {
                ids.push(if rng.uniform() < sparsity {
                    experts as i64
                } else {
                    e
                });
            }
        }
        let x = rng.values(tokens * hidden, 1.0);
        let weights = rng.values(tokens * top_k, 1.0);
        let mut gate_up = rng.values(experts * 2 * intermediate * hidden, 0.2);
        let mut down = rng.values(experts * hidden * intermediate, 0.2);
        // Experts with no kept pair must not be read: poison them.
        let plan = DispatchPlan::from_ids(&ids, top_k, experts);
        for (e, count) in plan.counts().into_iter().enumerate() {
            if count == 0 {
                let gu = 2 * intermediate * hidden;
                gate_up[e * gu..(e + 1) * gu].fill(f32::NAN);
                let d = hidden * intermediate;
                down[e * d..(e + 1) * d].fill(f32::NAN);
            }
        }
        let want = masked_moe_f64(&x, &ids, &weights, &gate_up, &down, dims);
        let got = masked_moe_decode(
            &x,
            &ids,
            &weights,
            gate_up.as_slice(),
            down.as_slice(),
            dims,
        );
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-4 + 1e-4 * w.abs(),
                "{dims:?} sparsity {sparsity}: out[{i}] = {g}, f64 reference {w}"
            );
        }
        // bf16 storage (the split-bf16 kernel on CPUs with AVX-512 BF16, the
        // widening passes otherwise) against the f64 reference on the same bf16 values; the
        // poisoned experts stay NaN in bf16.
        let to_bf16 = |v: &[f32]| {
            v.iter()
                .map(|&v| half::bf16::from_f32(v))
                .collect::<Vec<_>>()
        };
        let (gate_up_bf16, down_bf16) = (to_bf16(&gate_up), to_bf16(&down));
        let held = |v: &[half::bf16]| v.iter().map(|w| w.to_f32()).collect::<Vec<f32>>();
        let want_bf16 = masked_moe_f64(
            &x,
            &ids,
            &weights,
            &held(&gate_up_bf16),
            &held(&down_bf16),
            dims,
        );
        let got_bf16 = masked_moe_decode(
            &x,
            &ids,
            &weights,
            gate_up_bf16.as_slice(),
            down_bf16.as_slice(),
            dims,
        );
        for (i, (&g, &w)) in got_bf16.iter().zip(&want_bf16).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-4 + 1e-4 * w.abs(),
                "bf16 {dims:?} sparsity {sparsity}: out[{i}] = {g}, f64 reference {w}"
            );
        }
        // f64 storage agrees with the f64 reference to f64 rounding.
        let wide = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let got64 = masked_moe_decode(
            &wide(&x),
            &ids,
            &wide(&weights),
            wide(&gate_up).as_slice(),
            wide(&down).as_slice(),
            dims,
        );
        for (i, (&g, &w)) in got64.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-10 * (1.0 + w.abs()),
                "f64 {dims:?}: out[{i}] = {g}, reference {w}"
            );
        }
    }

    #[test]
    fn decode_matches_the_f64_reference_across_shapes_and_sparsity() {
        let mut rng = Rng(11);
        let mut cases = 0;
        for tokens in [1, 3, 64] {
            for experts in [8, 64] {
                for top_k in [1, 2, 8] {
                    for sparsity in [0.0, 0.5, 0.85, 1.0] {
                        // Odd sizes: lane tails (H = 37, I = 19) and several row blocks
                        // (2I · H > BLOCK_WEIGHTS for the larger one).
                        let (hidden, intermediate) =
                            if cases % 2 == 0 { (37, 19) } else { (264, 136) };
                        let dims = MoeDims {
                            tokens,
                            top_k,
                            experts,
                            hidden,
                            intermediate,
                        };
                        check(dims, sparsity, &mut rng);
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 72);
    }

    #[test]
    fn many_tokens_on_one_expert_take_several_passes() {
        // 9 tokens all on expert 1 (passes of 4, 4, 1); blocks split the 300-row gate.
        let dims = MoeDims {
            tokens: 9,
            top_k: 1,
            experts: 2,
            hidden: 256,
            intermediate: 300,
        };
        let mut rng = Rng(5);
        let x = rng.values(9 * 256, 1.0);
        let ids = vec![1i64; 9];
        let weights = rng.values(9, 1.0);
        let gate_up = rng.values(2 * 600 * 256, 0.1);
        let down = rng.values(2 * 256 * 300, 0.1);
        let want = masked_moe_f64(&x, &ids, &weights, &gate_up, &down, dims);
        let got = masked_moe_decode(
            &x,
            &ids,
            &weights,
            gate_up.as_slice(),
            down.as_slice(),
            dims,
        );
        for (&g, &w) in got.iter().zip(&want) {
            assert!((g as f64 - w).abs() <= 1e-4 + 1e-4 * w.abs());
        }
        assert!(want.iter().any(|w| w.abs() > 1e-2), "not a test on zeros");
    }

    #[test]
    fn work_items_grow_with_the_product_within_their_bounds() {
        let threads = rayon::current_num_threads();
        assert_eq!(block_weights(1000), BLOCK_WEIGHTS);
        assert_eq!(block_weights(1 << 40), MAX_BLOCK_WEIGHTS);
        // In between: BLOCKS_PER_THREAD items per thread.
        let weights = 2 * BLOCK_WEIGHTS * BLOCKS_PER_THREAD * threads;
        assert_eq!(
            block_weights(weights),
            (2 * BLOCK_WEIGHTS).min(MAX_BLOCK_WEIGHTS)
        );
        // A dot-pass product splits into blocks of that size (the last one shorter).
        let (rows, row_len) = (1000, 2048);
        let blocks: Vec<_> = blocks_of(
            0,
            0..1,
            rows,
            row_len,
            GEMM_MIN_TOKENS,
            block_weights(rows * row_len),
        )
        .collect();
        let block_rows = block_weights(rows * row_len) / row_len;
        assert_eq!(blocks.len(), rows.div_ceil(block_rows));
        assert!(blocks.iter().all(|b| b.rows.len() <= block_rows));
        assert_eq!(blocks.last().map(|b| b.rows.end), Some(rows));
    }

    #[test]
    fn blocks_cover_each_routed_expert_once() {
        let plan = DispatchPlan::from_ids(&[2, 0, 3, 2], 2, 3);
        let blocks = row_blocks(&plan, 10, BLOCK_WEIGHTS / 4, GEMM_MIN_TOKENS);
        // Experts 0 and 2, rows in blocks of 4: 0..4, 4..8, 8..10.
        let covered: Vec<_> = blocks.iter().map(|b| (b.expert, b.rows.clone())).collect();
        assert_eq!(
            covered,
            vec![
                (0, 0..4),
                (0, 4..8),
                (0, 8..10),
                (2, 0..4),
                (2, 4..8),
                (2, 8..10)
            ]
        );
        assert!(blocks
            .iter()
            .filter(|b| b.expert == 2)
            .all(|b| b.pairs == (1..3)));
    }

    #[test]
    fn linear_matches_an_f64_product() {
        let mut rng = Rng(3);
        // Lane tails (in = 37), several row blocks (out · in > BLOCK_WEIGHTS), 1 row to past
        // the GEMM threshold (widened tile + GEMM).
        for (tokens, in_features, out_features) in [
            (1, 37, 5),
            (3, 64, 40),
            (9, 300, 400),
            (GEMM_MIN_TOKENS + 1, 300, 400),
            (5, 1, 2),
        ] {
            let x = rng.values(tokens * in_features, 1.0);
            let weight = rng.values(out_features * in_features, 0.3);
            let got = linear(&x, weight.as_slice(), in_features, out_features);
            assert_eq!(got.len(), tokens * out_features);
            for t in 0..tokens {
                for o in 0..out_features {
                    let want: f64 = (0..in_features)
                        .map(|i| x[t * in_features + i] as f64 * weight[o * in_features + i] as f64)
                        .sum();
                    let g = got[t * out_features + o] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "[{tokens}, {in_features}] x [{out_features}, {in_features}]ᵀ at ({t}, {o}): {g} vs {want}"
                    );
                }
            }
        }
        assert!(linear::<f32, &[f32]>(&[], &[0.0; 6], 3, 2).is_empty());
    }

    #[test]
    fn portable_widening_dots_match_an_f64_dot_of_the_widened_weights() {
        // The fallback for CPUs without AVX2: several 256-weight chunks and a tail, 1 to 4 inputs.
        let mut rng = Rng(17);
        let len = 600;
        let weights = rng.values(len, 1.0);
        let inputs: Vec<Vec<f32>> = (0..TOKENS_PER_PASS).map(|_| rng.values(len, 1.0)).collect();
        let bf: Vec<half::bf16> = weights.iter().map(|&w| half::bf16::from_f32(w)).collect();
        let hf: Vec<half::f16> = weights.iter().map(|&w| half::f16::from_f32(w)).collect();
        let wide = |w: &dyn Fn(usize) -> f32| (0..len).map(w).collect::<Vec<f32>>();
        for n in 1..=TOKENS_PER_PASS {
            let group: Vec<&[f32]> = inputs[..n].iter().map(|v| v.as_slice()).collect();
            for (got, held) in [
                (
                    portable_widening_dots(&bf, &group),
                    wide(&|i| bf[i].to_f32()),
                ),
                (
                    portable_widening_dots(&hf, &group),
                    wide(&|i| hf[i].to_f32()),
                ),
            ] {
                for (k, input) in group.iter().enumerate() {
                    let want: f64 = held
                        .iter()
                        .zip(*input)
                        .map(|(&w, &x)| w as f64 * x as f64)
                        .sum();
                    assert!(
                        (got[k] as f64 - want).abs() <= 1e-4,
                        "{n} inputs: {} vs {want}",
                        got[k]
                    );
                }
                assert!(got[n..].iter().all(|&v| v == 0.0), "unused outputs are 0");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_float_dots_match_an_f64_dot_of_the_widened_weights() {
        // Every float kernel this CPU runs (AVX2 and AVX-512, f32, bf16 and f16 weights), on
        // lengths with whole 16- and 32-weight steps and scalar tails, 1 to 4 inputs.
        type Kernel<W> = unsafe fn(&[W], &[&[f32]]) -> [f32; TOKENS_PER_PASS];
        let mut f32_kernels: Vec<(&str, Kernel<f32>)> = Vec::new();
        let mut bf16_kernels: Vec<(&str, Kernel<half::bf16>)> = Vec::new();
        let mut f16_kernels: Vec<(&str, Kernel<half::f16>)> = Vec::new();
        if avx2::q8_available() {
            f32_kernels.push(("avx2", avx2::dots));
            bf16_kernels.push(("avx2", avx2::dots_bf16));
            f16_kernels.push(("avx2", avx2::dots_f16));
        }
        if avx512::available() {
            f32_kernels.push(("avx512", avx512::dots));
            bf16_kernels.push(("avx512", avx512::dots_bf16));
            f16_kernels.push(("avx512", avx512::dots_f16));
        }
        let mut rng = Rng(41);
        for len in [1, 15, 16, 31, 32, 33, 47, 64, 100, 2048] {
            let weights = rng.values(len, 1.0);
            let inputs: Vec<Vec<f32>> =
                (0..TOKENS_PER_PASS).map(|_| rng.values(len, 1.0)).collect();
            let bf: Vec<half::bf16> = weights.iter().map(|&w| half::bf16::from_f32(w)).collect();
            let hf: Vec<half::f16> = weights.iter().map(|&w| half::f16::from_f32(w)).collect();
            for n in 1..=TOKENS_PER_PASS {
                let group: Vec<&[f32]> = inputs[..n].iter().map(|v| v.as_slice()).collect();
                let mut results: Vec<(String, [f32; TOKENS_PER_PASS], Vec<f32>)> = Vec::new();
                for (name, kernel) in &f32_kernels {
                    // SAFETY: the CPU features checked above; inputs as long as the row.
                    let got = unsafe { kernel(&weights, &group) };
                    results.push((format!("{name} f32"), got, weights.clone()));
                }
                for (name, kernel) in &bf16_kernels {
                    // SAFETY: as above.
                    let got = unsafe { kernel(&bf, &group) };
                    let held = bf.iter().map(|w| w.to_f32()).collect();
                    results.push((format!("{name} bf16"), got, held));
                }
                for (name, kernel) in &f16_kernels {
                    // SAFETY: as above.
                    let got = unsafe { kernel(&hf, &group) };
                    let held = hf.iter().map(|w| w.to_f32()).collect();
                    results.push((format!("{name} f16"), got, held));
                }
                for (name, got, held) in &results {
                    for (k, input) in group.iter().enumerate() {
                        let want = dot64(input, held);
                        let bound = 1e-6 * len as f64 + 1e-5 * want.abs();
                        assert!(
                            (got[k] as f64 - want).abs() <= bound,
                            "{name}, {len} weights, input {k}: {} vs {want}",
                            got[k]
                        );
                    }
                    assert!(got[n..].iter().all(|&v| v == 0.0), "unused outputs are 0");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reduce_16_sums_each_register() {
        if !avx512::available() {
            return;
        }
        use std::arch::x86_64::*;
        // Distinct powers-of-two-scaled lanes: every (register, lane) pair contributes a value
        // no other does, so a lane routed to the wrong sum shows.
        let values: Vec<[f32; 16]> = (0..16)
            .map(|j| core::array::from_fn(|l| (j * 16 + l) as f32 + 0.25 * l as f32))
            .collect();
        // SAFETY: the CPU has AVX-512 F; each array holds 16 floats.
        let sums = unsafe {
            let regs: [__m512; 16] = core::array::from_fn(|j| _mm512_loadu_ps(values[j].as_ptr()));
            avx512::reduce_16(regs)
        };
        for (j, v) in values.iter().enumerate() {
            assert_eq!(sums[j], v.iter().sum::<f32>(), "register {j}");
        }
    }

    #[test]
    fn split_bf16_keeps_16_significant_bits() {
        let mut rng = Rng(5);
        let mut x = rng.values(4096, 3.0);
        x.extend([0.0, 1.0, -2.5, 1e-30, 3.0e38]);
        let split = SplitBf16::new(&x);
        assert_eq!(split.hi().len(), x.len());
        assert_eq!(split.lo().len(), x.len());
        for part in [split.hi(), split.lo()] {
            assert_eq!(
                part.as_ptr() as usize % crate::aligned::ROW_ALIGN,
                0,
                "on a cache line"
            );
        }
        let q8 = crate::quant::quantize_q8_activation(&x[..4096], 32);
        assert_eq!(q8.values().as_ptr() as usize % crate::aligned::ROW_ALIGN, 0);
        for ((&v, h), l) in x.iter().zip(split.hi()).zip(split.lo()) {
            assert_eq!(*h, half::bf16::from_f32(v), "hi is bf16(x)");
            let sum = h.to_f64() + l.to_f64();
            assert!(
                (sum - v as f64).abs() <= 2f64.powi(-17) * (v as f64).abs(),
                "{v}: {sum}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn split_bf16_tiles_match_an_f64_dot_of_the_bf16_weights() {
        // Tiles of 4 rows and single rows (1 to 9 rows), 1 to 9 inputs (passes of 4, 4, 1);
        // from `TALL_TILE_MIN_INPUTS` inputs on, tiles of 8 rows (then 4, then single rows:
        // 21 rows) with passes of 2 inputs and a last one of 1; lengths of whole 32-weight
        // steps and with f32 tails, rows from an offset `base`.
        if !avx512::bf16_available() {
            eprintln!("no AVX-512 BF16 on this CPU: the split-bf16 kernel does not run here");
            return;
        }
        let mut rng = Rng(43);
        for len in [32, 33, 63, 64, 100, 2048] {
            let tall = avx512::TALL_TILE_MIN_INPUTS;
            for (rows, tokens) in [
                (1, 1),
                (4, 4),
                (5, 2),
                (9, 9),
                (3, 7),
                (8, 5),
                (21, tall + 1),
                (8, tall),
                (3, tall),
            ] {
                let base = 3 * len;
                let weights: Vec<half::bf16> = rng
                    .values(base + rows * len, 1.0)
                    .iter()
                    .map(|&w| half::bf16::from_f32(w))
                    .collect();
                let inputs: Vec<Vec<f32>> = (0..tokens).map(|_| rng.values(len, 2.0)).collect();
                let split: Vec<SplitBf16> = inputs.iter().map(|x| SplitBf16::new(x)).collect();
                let x: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
                let prepared: Vec<&SplitBf16> = split.iter().collect();
                let mut got = vec![f32::NAN; rows * tokens];
                avx512::project_split_bf16(
                    &weights,
                    base,
                    len,
                    0..rows,
                    &x,
                    &prepared,
                    |n, r, d| got[n * rows + r] = d,
                );
                for r in 0..rows {
                    let held: Vec<f32> = weights[base + r * len..base + (r + 1) * len]
                        .iter()
                        .map(|w| w.to_f32())
                        .collect();
                    for n in 0..tokens {
                        let want = dot64(x[n], &held);
                        let magnitude: f64 = x[n]
                            .iter()
                            .zip(&held)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        let bound = 2f64.powi(-16) * magnitude + 1e-6 * len as f64;
                        let g = got[n * rows + r] as f64;
                        assert!(
                            (g - want).abs() <= bound,
                            "{len} weights, row {r} of {rows}, input {n} of {tokens}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn one_token_bf16_moe_matches_the_same_values_held_in_f32() {
        // A decode step: one token, K = 8 kept pairs, each on its own expert, so every
        // projection dots a single input. Where the CPU has AVX-512 BF16 that is the one-input
        // split-bf16 kernel (`dot_split_bf16`; hidden 256 = four 64-weight steps, intermediate
        // 96 = one 64-weight step and one of 32): within the split's bound of the run on the
        // same values widened to f32. Elsewhere it is the widening passes: the same products
        // and sums as those f32 weights, equal bit for bit.
        let mut rng = Rng(53);
        let dims = MoeDims {
            tokens: 1,
            top_k: 8,
            experts: 16,
            hidden: 256,
            intermediate: 96,
        };
        let ids: Vec<i64> = (0..8).map(|k| 2 * k as i64).collect();
        let x = rng.values(dims.hidden, 1.0);
        let weights = rng.values(8, 1.0);
        let mut to_bf16 = |n: usize| -> Vec<half::bf16> {
            rng.values(n, 0.2)
                .iter()
                .map(|&v| half::bf16::from_f32(v))
                .collect()
        };
        let gate_up = to_bf16(dims.experts * 2 * dims.intermediate * dims.hidden);
        let down = to_bf16(dims.experts * dims.hidden * dims.intermediate);
        let widen = |v: &[half::bf16]| v.iter().map(|w| w.to_f32()).collect::<Vec<f32>>();
        let got = masked_moe_decode(&x, &ids, &weights, &gate_up[..], &down[..], dims);
        let (gate_up32, down32) = (widen(&gate_up), widen(&down));
        let want = masked_moe_decode(&x, &ids, &weights, &gate_up32[..], &down32[..], dims);
        assert!(got.iter().any(|&v| v != 0.0), "not a test on zeros");
        if split_bf16_applies(dims.hidden) {
            // 2⁻¹⁷ relative per activation, through gate/up, SwiGLU and down: bounded by
            // 3e-5 of the largest output (measured: 4.6e-6).
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
            assert!(
                worst <= 3e-5 * scale,
                "bf16 decode vs the same values held in f32: {worst} (outputs up to {scale})"
            );
            assert_ne!(got, want, "the split kernel ran (16-bit activations)");
        } else {
            assert_eq!(got, want, "bf16 decode vs the same values held in f32");
        }
    }

    /// `block_product` of `rows` with more inputs than one pass takes, against one `project`
    /// call over them all: bit for bit (the same kernels on the same passes of four inputs).
    fn chunked_equals_one_call<M: HostMatrix<f32>>(
        name: &str,
        matrix: M,
        row_len: usize,
        rows: core::ops::Range<usize>,
        x: &[f32],
    ) {
        let inputs: Vec<&[f32]> = x.chunks(row_len).collect();
        let prepared_rows = matrix.prepare_inputs(x, row_len);
        let prepared: Vec<_> = prepared_rows.iter().collect();
        let width = rows.len();
        let mut got = vec![0.0f32; inputs.len() * width];
        block_product(
            matrix,
            0,
            row_len,
            rows.clone(),
            &inputs,
            &prepared,
            &mut got,
        );
        let mut want = vec![f32::NAN; inputs.len() * width];
        matrix.project(0, row_len, rows, &inputs, &prepared, |n, r, dot| {
            want[n * width + r] = dot
        });
        assert!(
            want.iter().all(|v| v.is_finite()),
            "{name}: every dot emitted"
        );
        assert!(
            got.iter().any(|v| v.abs() > 1e-2),
            "{name}: not a test on zeros"
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name}: input {} row {}: {g} vs {w}",
                i / width,
                i % width
            );
        }
    }

    #[test]
    fn many_inputs_pass_over_groups_of_rows_in_chunks() {
        // Two chunks of inputs (the second partial) over two groups of rows (the second
        // partial), the rows starting past the matrix's first (outputs are relative to them);
        // rows of 3 008 (94 blocks of 32) so that neither split falls on a power of two.
        let mut rng = Rng(91);
        for row_len in [1024, 3008] {
            let (chunk, group) = pass_blocks(row_len);
            assert!(chunk.is_multiple_of(TOKENS_PER_PASS) && group.is_multiple_of(4));
            let (tokens, rows) = (chunk + 9, 3..3 + group + 7);
            let x = rng.values(tokens * row_len, 1.0);
            let w = rng.values(rows.end * row_len, 0.3);
            let bf16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            chunked_equals_one_call("bf16", bf16.as_slice(), row_len, rows.clone(), &x);
            for format in [crate::quant::QuantFormat::Q8, crate::quant::QuantFormat::Q4] {
                let q = format.quantize(&w, format.block_len(row_len).unwrap());
                match q.matrix() {
                    crate::quant::QuantMatrix::Q8(m) => {
                        chunked_equals_one_call("q8", m, row_len, rows.clone(), &x)
                    }
                    crate::quant::QuantMatrix::Q4(m) => {
                        chunked_equals_one_call("q4", m, row_len, rows.clone(), &x)
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_linear_matches_an_f64_product_of_the_bf16_weights() {
        // One token, then several: the split-bf16 kernel (one input, tiles) where the CPU has
        // it, with row tails (37, 300) and several row blocks.
        let mut rng = Rng(47);
        for (tokens, in_features, out_features) in
            [(1, 64, 9), (2, 37, 5), (9, 300, 400), (40, 64, 70)]
        {
            let x = rng.values(tokens * in_features, 1.0);
            let weight: Vec<half::bf16> = rng
                .values(out_features * in_features, 0.3)
                .iter()
                .map(|&w| half::bf16::from_f32(w))
                .collect();
            let got = linear(&x, weight.as_slice(), in_features, out_features);
            for t in 0..tokens {
                for o in 0..out_features {
                    let want: f64 = (0..in_features)
                        .map(|i| {
                            x[t * in_features + i] as f64 * weight[o * in_features + i].to_f64()
                        })
                        .sum();
                    let g = got[t * out_features + o] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "[{tokens}, {in_features}] x [{out_features}, {in_features}]ᵀ at ({t}, {o}): {g} vs {want}"
                    );
                }
            }
        }
    }

    /// `f64` value of `Σ_i x[i] · w[i]`.
    fn dot64(x: &[f32], w: &[f32]) -> f64 {
        x.iter().zip(w).map(|(&x, &w)| x as f64 * w as f64).sum()
    }

    #[test]
    fn q8_linear_matches_an_f64_product_of_the_dequantized_weights() {
        // Blocks of 32, 24 (odd number of 8-value groups per row), 16, 20 and 12 (not multiples
        // of 8: the portable path); several row blocks (out · in > BLOCK_WEIGHTS); 1 to 33 rows
        // (past the GEMM threshold: int8 passes for blocks of 32, a dequantized tile + GEMM for
        // the others).
        quantized_linear_matches_an_f64_product(
            crate::quant::QuantFormat::Q8,
            &[
                (1, 64, 5),
                (3, 48, 40),
                (9, 256, 300),
                (GEMM_MIN_TOKENS + 1, 256, 30),
                (4, 16, 3),
                (2, 40, 7),
                (8, 12, 9),
                (GEMM_MIN_TOKENS + 1, 12, 9),
                (1, 2048, 40),
                // One input over rows of an odd number of blocks of 32, in two row blocks.
                (1, 96, 700),
            ],
            23,
        );
    }

    /// `linear` on `format` weights (`(tokens, in, out)` per case, blocks as the loader picks
    /// them) against an `f64` product of the dequantized weights: exact up to `f32` sums, plus
    /// half an activation step per weight where blocks of 32 take the int8-activation dots (at
    /// every row count on AVX2 CPUs: no GEMM, `gemm_min_tokens`).
    fn quantized_linear_matches_an_f64_product(
        format: crate::quant::QuantFormat,
        cases: &[(usize, usize, usize)],
        seed: u64,
    ) {
        let mut rng = Rng(seed);
        for &(tokens, in_features, out_features) in cases {
            let block = format.block_len(in_features).unwrap();
            let x = rng.values(tokens * in_features, 1.0);
            let q = format.quantize(&rng.values(out_features * in_features, 0.3), block);
            let dequantized = q.dequantize();
            let got = linear_quantized(&x, &q, in_features, out_features);
            assert_eq!(got.len(), tokens * out_features);
            let int8_activations = block == Q8_BLOCK;
            for t in 0..tokens {
                let input = &x[t * in_features..(t + 1) * in_features];
                let steps: Vec<f64> = input
                    .chunks(block)
                    .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64 / 127.0)
                    .collect();
                for o in 0..out_features {
                    let row = &dequantized[o * in_features..(o + 1) * in_features];
                    let want = dot64(input, row);
                    let activation_bound: f64 = if int8_activations {
                        row.iter()
                            .enumerate()
                            .map(|(j, &w)| w.abs() as f64 * steps[j / block] / 2.0)
                            .sum()
                    } else {
                        0.0
                    };
                    let g = got[t * out_features + o] as f64;
                    assert!(
                        (g - want).abs() <= activation_bound + 1e-5 * (1.0 + want.abs()),
                        "{format} [{tokens}, {in_features}] x [{out_features}, {in_features}]ᵀ (block {block}) at ({t}, {o}): {g} vs {want}"
                    );
                }
            }
            assert!(got.iter().any(|g| g.abs() > 1e-2), "not a test on zeros");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn int8_dots_are_exact_products_of_the_quantized_rows_and_inputs() {
        use crate::quant::{quantize_q8, quantize_q8_activation};
        if !avx2::q8_available() {
            return;
        }
        // Both ways of taking a block's dot (`dots_q8_q8` picks one per CPU): each must give
        // the exact product of the quantized values.
        let mut kernels: Vec<(&str, avx2::Q8Q8Kernel)> = vec![("avx2", avx2::dots_q8_q8_avx2)];
        if avx2::vnni_available() {
            kernels.push(("avx512-vnni (256-bit)", avx2::dots_q8_q8_vnni));
        }
        if avx512::q8_available() {
            kernels.push(("avx512-vnni (512-bit)", avx512::dots_q8_q8));
        }
        let mut rng = Rng(37);
        // Scale chunks of eight (sixteen) blocks: whole, partial, odd tails.
        for blocks in [1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 64] {
            let len = blocks * 32;
            let row = quantize_q8(&rng.values(len, 0.5), 32);
            let xs: Vec<_> = (0..TOKENS_PER_PASS)
                .map(|_| quantize_q8_activation(&rng.values(len, 2.0), 32))
                .collect();
            for n in 1..=TOKENS_PER_PASS {
                let group: Vec<(&[i8], &[f32])> = xs[..n]
                    .iter()
                    .map(|q| (q.values(), q.scales.as_slice()))
                    .collect();
                for (name, kernel) in &kernels {
                    // SAFETY: the CPU features checked above; whole blocks of 32 with their
                    // scales.
                    let got = unsafe { kernel(&row.values, &row.scales, &group) };
                    for (k, x) in xs[..n].iter().enumerate() {
                        let want = dot64(&x.dequantize(), &row.dequantize());
                        assert!(
                            (got[k] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{name}: {blocks} blocks, input {k}: {} vs {want}",
                            got[k]
                        );
                    }
                    assert!(got[n..].iter().all(|&v| v == 0.0));
                }
            }
        }
    }

    /// `x · dequantize(W)ᵀ` through [`linear`] on `q`'s own matrix type.
    fn linear_quantized(
        x: &[f32],
        q: &crate::quant::QuantWeights,
        in_features: usize,
        out_features: usize,
    ) -> Vec<f32> {
        match q.matrix() {
            crate::quant::QuantMatrix::Q8(m) => linear(x, m, in_features, out_features),
            crate::quant::QuantMatrix::Q4(m) => linear(x, m, in_features, out_features),
        }
    }

    #[test]
    fn q4_linear_matches_an_f64_product_of_the_dequantized_weights() {
        // Blocks of 32 (int8 inputs on AVX2 CPUs; on AVX-512 VNNI one input through
        // `rows_q4_q8`, several through `dots_q4_q8` in passes of four), rows of 1, 3, 16, 17
        // and 64 blocks (the scale chunks of 16: whole, partial, with an odd last block); blocks
        // of 24, 16, 20 and 12 (the portable dots, and a dequantized tile + GEMM past the GEMM
        // threshold).
        quantized_linear_matches_an_f64_product(
            crate::quant::QuantFormat::Q4,
            &[
                (1, 32, 5),
                (1, 96, 700),
                (1, 512, 40),
                (1, 544, 9),
                (2, 2048, 30),
                (5, 544, 11),
                (GEMM_MIN_TOKENS + 1, 256, 30),
                (3, 48, 40),
                (4, 16, 3),
                (2, 40, 7),
                (GEMM_MIN_TOKENS + 1, 12, 9),
            ],
            61,
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q4_int8_dots_are_exact_products_of_the_quantized_rows_and_inputs() {
        use crate::quant::quantize_q4;
        type Q4Kernel =
            unsafe fn(&[i8], &[half::f16], &[(&[i8], &[f32], &[f32])]) -> [f32; TOKENS_PER_PASS];
        let mut kernels: Vec<(&str, Q4Kernel)> = Vec::new();
        if avx2::q8_available() {
            kernels.push(("avx2", avx2::dots_q4_q8));
        }
        if avx512::q8_available() {
            kernels.push(("avx512-vnni", avx512::dots_q4_q8));
        }
        if kernels.is_empty() {
            eprintln!("no AVX2 on this CPU: the q4 int8 kernels do not run here");
            return;
        }
        let mut rng = Rng(67);
        for blocks in [1, 2, 3, 15, 16, 17, 33, 64] {
            let len = blocks * 32;
            let row = quantize_q4(&rng.values(len, 0.5), 32);
            let weights = row.dequantize();
            let xs: Vec<Q4Input> = (0..TOKENS_PER_PASS + 1)
                .map(|_| Q4Input::new(&rng.values(len, 2.0)))
                .collect();
            for n in 1..=TOKENS_PER_PASS {
                let group: Vec<(&[i8], &[f32], &[f32])> = xs[..n]
                    .iter()
                    .map(|q| (q.grouped(), q.x.scales.as_slice(), q.offsets.as_slice()))
                    .collect();
                for (name, kernel) in &kernels {
                    // SAFETY: the CPU features checked above; whole blocks of 32 with their scales.
                    let got = unsafe { kernel(&row.values, &row.scales, &group) };
                    for (k, x) in xs[..n].iter().enumerate() {
                        let x = x.x.dequantize();
                        let want = dot64(&x, &weights);
                        // The f32 sums of (up to 61 000 · s_w · s_x per block) products and offsets.
                        let magnitude: f64 = x
                            .iter()
                            .zip(&weights)
                            .enumerate()
                            .map(|(i, (&x, &w))| {
                                (x as f64).abs()
                                    * ((w as f64).abs() + 8.0 * row.scales[i / 32].to_f64().abs())
                            })
                            .sum();
                        assert!(
                            (got[k] as f64 - want).abs() <= 1e-6 * (1.0 + magnitude),
                            "{name}: {blocks} blocks, input {k}: {} vs {want}",
                            got[k]
                        );
                    }
                    assert!(got[n..].iter().all(|&v| v == 0.0));
                }
            }
            if !avx512::q8_available() {
                continue;
            }
            // The decode kernel over several rows: each row's dot.
            let rows = 6;
            let many = quantize_q4(&rng.values(rows * len, 0.5), 32);
            let mut out = vec![f32::NAN; rows];
            let x = &xs[TOKENS_PER_PASS];
            // SAFETY: as above; `rows` rows of `len` with their scales.
            unsafe {
                avx512::rows_q4_q8(
                    &many.values,
                    &many.scales,
                    len,
                    (x.grouped(), &x.x.scales, &x.offsets),
                    &mut out,
                )
            };
            let wide = many.dequantize();
            for (r, &got) in out.iter().enumerate() {
                let want = dot64(&x.x.dequantize(), &wide[r * len..(r + 1) * len]);
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "row {r} of {blocks} blocks: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn q4_f32_dots_match_an_f64_dot_of_the_dequantized_row() {
        // The portable path (CPUs without AVX-512 VNNI, and the `dots` of any CPU): chunks of
        // 256 weights and a partial one, 1 to 4 inputs.
        use crate::quant::quantize_q4;
        let mut rng = Rng(71);
        let len = 640;
        let q = quantize_q4(&rng.values(len, 1.0), 32);
        let inputs: Vec<Vec<f32>> = (0..TOKENS_PER_PASS).map(|_| rng.values(len, 1.0)).collect();
        let dequantized = q.dequantize();
        for n in 1..=TOKENS_PER_PASS {
            let group: Vec<&[f32]> = inputs[..n].iter().map(|v| v.as_slice()).collect();
            let got = q.as_q4().unwrap().dots(0, &group);
            for k in 0..n {
                let want = dot64(group[k], &dequantized);
                assert!((got[k] as f64 - want).abs() <= 1e-4, "{} vs {want}", got[k]);
            }
            assert!(got[n..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn on_pool_runs_the_closure_on_a_pool_thread_and_returns_its_result() {
        assert!(
            rayon::current_thread_index().is_none(),
            "tests run outside the pool"
        );
        let (inside, value) = on_pool(|| (rayon::current_thread_index(), 6 * 7));
        assert!(inside.is_some(), "ran on one of the pool's threads");
        assert_eq!(value, 42);
        // Nested: already on the pool, it runs in place.
        let nested = on_pool(|| {
            let outer = rayon::current_thread_index();
            on_pool(|| rayon::current_thread_index() == outer)
        });
        assert!(nested);
    }

    #[test]
    fn dequantized_q8_dots_match_the_simd_ones() {
        use crate::quant::quantize_q8;
        let mut rng = Rng(29);
        let len = 640; // several 256-value chunks and a partial one
        let q = quantize_q8(&rng.values(len, 1.0), 32);
        let inputs: Vec<Vec<f32>> = (0..TOKENS_PER_PASS).map(|_| rng.values(len, 1.0)).collect();
        let dequantized = q.dequantize();
        for n in 1..=TOKENS_PER_PASS {
            let group: Vec<&[f32]> = inputs[..n].iter().map(|v| v.as_slice()).collect();
            let m = q.as_q8().unwrap();
            let portable = dequantized_dots(32, &group, |range, out| m.dequantize_into(range, out));
            let dispatched = m.dots(0, &group);
            for k in 0..n {
                let want = dot64(group[k], &dequantized);
                assert!(
                    (portable[k] as f64 - want).abs() <= 1e-4,
                    "{} vs {want}",
                    portable[k]
                );
                assert!((dispatched[k] as f64 - want).abs() <= 1e-4);
            }
            assert!(portable[n..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn q8_moe_matches_the_f64_reference_and_never_reads_idle_experts() {
        quantized_moe_matches_the_f64_reference(crate::quant::QuantFormat::Q8);
    }

    #[test]
    fn q4_moe_matches_the_f64_reference_and_never_reads_idle_experts() {
        quantized_moe_matches_the_f64_reference(crate::quant::QuantFormat::Q4);
    }

    fn quantized_moe_matches_the_f64_reference(format: crate::quant::QuantFormat) {
        use crate::quant::QuantMatrix;
        let mut rng = Rng(31);
        let mut cases = 0;
        for (hidden, intermediate) in [(64, 32), (48, 24), (40, 20), (256, 136)] {
            for tokens in [1, 5, 64] {
                for (experts, top_k, sparsity) in [(8, 2, 0.0), (8, 2, 0.5), (16, 4, 0.85)] {
                    let dims = MoeDims {
                        tokens,
                        top_k,
                        experts,
                        hidden,
                        intermediate,
                    };
                    // Experts 0..E/2 only, half of the slots masked at random.
                    let ids: Vec<i64> = (0..tokens * top_k)
                        .map(|i| {
                            if rng.uniform() < sparsity {
                                experts as i64
                            } else {
                                ((i % top_k) * (experts / 2) / top_k) as i64
                                    + (rng.uniform() * (experts / (2 * top_k)) as f64) as i64
                            }
                        })
                        .collect();
                    let x = rng.values(tokens * hidden, 1.0);
                    let weights = rng.values(tokens * top_k, 1.0);
                    let (gu_block, d_block) = (
                        format.block_len(hidden).unwrap(),
                        format.block_len(intermediate).unwrap(),
                    );
                    let mut gate_up = format.quantize(
                        &rng.values(experts * 2 * intermediate * hidden, 0.2),
                        gu_block,
                    );
                    let mut down =
                        format.quantize(&rng.values(experts * hidden * intermediate, 0.2), d_block);
                    let want = masked_moe_f64(
                        &x,
                        &ids,
                        &weights,
                        &gate_up.dequantize(),
                        &down.dequantize(),
                        dims,
                    );
                    // Idle experts' blocks must not be read: NaN scales, extreme values.
                    let plan = DispatchPlan::from_ids(&ids, top_k, experts);
                    for (e, count) in plan.counts().into_iter().enumerate() {
                        if count == 0 {
                            for (q, rows_len) in [
                                (&mut gate_up, 2 * intermediate * hidden),
                                (&mut down, hidden * intermediate),
                            ] {
                                let per = rows_len / q.block;
                                q.scales[e * per..(e + 1) * per].fill(half::f16::NAN);
                                let bytes = rows_len / format.values_per_byte();
                                q.values[e * bytes..(e + 1) * bytes].fill(i8::MAX);
                            }
                        }
                    }
                    let got = match (gate_up.matrix(), down.matrix()) {
                        (QuantMatrix::Q8(gate_up), QuantMatrix::Q8(down)) => {
                            masked_moe_decode(&x, &ids, &weights, gate_up, down, dims)
                        }
                        (QuantMatrix::Q4(gate_up), QuantMatrix::Q4(down)) => {
                            masked_moe_decode(&x, &ids, &weights, gate_up, down, dims)
                        }
                        _ => unreachable!("one format"),
                    };
                    // The decode dots round the activations to int8 per block of 32 (the GEMM
                    // path and other blocks do not): within 2% of the output's scale.
                    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
                    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g as f64 - w).abs() <= 1e-4 + 2e-2 * scale,
                            "{format} {dims:?}: out[{i}] = {g}, f64 reference {w}"
                        );
                    }
                    assert!(got.iter().all(|g| g.is_finite()), "idle experts were read");
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 36);
    }

    #[test]
    fn all_masked_is_zero_without_reading_weights() {
        let dims = MoeDims {
            tokens: 2,
            top_k: 2,
            experts: 2,
            hidden: 3,
            intermediate: 2,
        };
        let (gate_up, down) = (vec![f32::NAN; 2 * 4 * 3], vec![f32::NAN; 2 * 3 * 2]);
        let out = masked_moe_decode(
            &[1.0; 6],
            &[2, 2, 5, 2],
            &[0.5; 4],
            gate_up.as_slice(),
            down.as_slice(),
            dims,
        );
        assert_eq!(out, vec![0.0; 6]);
    }
}
