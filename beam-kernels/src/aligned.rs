//! Rows that start on a cache line: where the host kernels keep the activations they read.
//!
//! The host GEMVs load an input row in 64-byte registers once per 32 weights while they stream
//! the weights from memory. An input that starts 16 bytes into a cache line (what `malloc`
//! gives a `Vec<f32>`) makes every such load span two lines, and on a Zen 4 core that cut the
//! streamed `bf16` GEMV from 32 to 23–25 GB/s of weights on one core (docs/BENCHMARKS.md,
//! session 19). Copying a row costs a few hundred nanoseconds per token; reading its weights,
//! milliseconds.

/// Bytes every row of an [`AlignedRows`] is aligned to: one x86-64 cache line, one AVX-512
/// register.
pub const ROW_ALIGN: usize = 64;

/// `rows` rows of `row_len` values, row-major, each row starting on a [`ROW_ALIGN`]-byte
/// boundary (rows are padded to a whole number of cache lines; the padding is never read).
///
/// # Shapes
/// - [`Self::from_rows`]: `values` `[rows, row_len]`
#[derive(Debug, Clone)]
pub struct AlignedRows<T> {
    /// The storage: `start` elements of lead-in, then `rows · stride` elements.
    buffer: Vec<T>,
    /// First element of row 0 (the first one on a [`ROW_ALIGN`] boundary).
    start: usize,
    /// Elements from one row's start to the next's.
    stride: usize,
    row_len: usize,
    rows: usize,
}

impl<T: Copy + Default> AlignedRows<T> {
    /// `rows` rows of `row_len` default values (zeros for numbers).
    ///
    /// # Panics
    /// If `T`'s size does not divide [`ROW_ALIGN`] (every number type the kernels read does).
    pub fn zeroed(rows: usize, row_len: usize) -> Self {
        let size = core::mem::size_of::<T>().max(1);
        assert_eq!(ROW_ALIGN % size, 0, "element size divides the alignment");
        let per_line = ROW_ALIGN / size;
        let stride = row_len.div_ceil(per_line) * per_line;
        // One line of slack for the lead-in; `buffer` never grows, so its address is stable.
        let buffer = vec![T::default(); rows * stride + per_line];
        let start = buffer.as_ptr().align_offset(ROW_ALIGN).min(per_line);
        Self {
            buffer,
            start,
            stride,
            row_len,
            rows,
        }
    }

    /// A copy of the row-major `values` (`[rows, row_len]`) with every row aligned.
    ///
    /// # Panics
    /// If `values` is not a whole number of `row_len` rows, or as [`Self::zeroed`].
    pub fn from_rows(values: &[T], row_len: usize) -> Self {
        let rows = if row_len == 0 {
            assert!(values.is_empty(), "values are [rows, row_len]");
            0
        } else {
            assert_eq!(values.len() % row_len, 0, "values are [rows, row_len]");
            values.len() / row_len
        };
        let mut aligned = Self::zeroed(rows, row_len);
        for (r, row) in values.chunks_exact(row_len.max(1)).enumerate() {
            aligned.row_mut(r).copy_from_slice(row);
        }
        aligned
    }

    /// Row `r`.
    ///
    /// # Panics
    /// If `r` is not below [`Self::rows`].
    pub fn row(&self, r: usize) -> &[T] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let at = self.start + r * self.stride;
        &self.buffer[at..at + self.row_len]
    }

    /// Row `r`, to write.
    ///
    /// # Panics
    /// If `r` is not below [`Self::rows`].
    pub fn row_mut(&mut self, r: usize) -> &mut [T] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let at = self.start + r * self.stride;
        &mut self.buffer[at..at + self.row_len]
    }

    /// Every row, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[T]> {
        (0..self.rows).map(|r| self.row(r))
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// The rows, concatenated (without the padding).
    pub fn to_vec(&self) -> Vec<T> {
        self.iter().flatten().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_start_on_cache_lines_and_keep_their_values() {
        // Row lengths below, at and between whole lines, for 1-, 2-, 4- and 8-byte elements.
        for row_len in [0usize, 1, 3, 15, 16, 17, 37, 64, 2048] {
            for rows in [0usize, 1, 2, 5] {
                let values: Vec<f32> = (0..rows * row_len).map(|i| i as f32 * 0.5 - 3.0).collect();
                let aligned = AlignedRows::from_rows(&values, row_len);
                // Empty rows of no values: `from_rows` cannot tell how many (it says 0).
                let want_rows = if row_len == 0 { 0 } else { rows };
                assert_eq!((aligned.rows(), aligned.row_len()), (want_rows, row_len));
                for (r, row) in aligned.iter().enumerate() {
                    assert_eq!(row.as_ptr() as usize % ROW_ALIGN, 0, "row {r} of {row_len}");
                    assert_eq!(row, &values[r * row_len..(r + 1) * row_len]);
                }
                assert_eq!(aligned.to_vec(), values);
                check_alignment::<i8>(rows, row_len);
                check_alignment::<half::bf16>(rows, row_len);
                check_alignment::<f64>(rows, row_len);
            }
        }
    }

    fn check_alignment<T: Copy + Default>(rows: usize, row_len: usize) {
        let mut aligned = AlignedRows::<T>::zeroed(rows, row_len);
        for r in 0..rows {
            assert_eq!(aligned.row_mut(r).as_ptr() as usize % ROW_ALIGN, 0);
            assert_eq!(aligned.row(r).len(), row_len);
        }
    }

    #[test]
    fn writing_a_row_leaves_its_neighbours() {
        let mut aligned = AlignedRows::<f32>::zeroed(3, 5);
        aligned
            .row_mut(1)
            .copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(
            aligned.to_vec(),
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    #[should_panic(expected = "values are [rows, row_len]")]
    fn a_ragged_input_is_refused() {
        AlignedRows::from_rows(&[1.0f32; 7], 2);
    }
}
