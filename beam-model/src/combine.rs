//! Step 5 — combine: apply the mask to the routing weights, weight each expert's rows and add them
//! back to their tokens.

use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

/// Routing weights after masking: `w'_k = m_k · w_k`, optionally rescaled so the kept weights sum
/// to the original top-K sum. A token with every slot masked gets all-zero weights, never NaN.
///
/// `mask` may be the straight-through mask: gradients then reach the mask router through it.
///
/// # Shapes
/// - `weights`, `mask`: `[T, K]`; output `[T, K]`
pub fn masked_weights<B: Backend>(
    weights: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    renormalize: bool,
) -> Tensor<B, 2> {
    let kept = weights.clone() * mask;
    if !renormalize {
        return kept;
    }
    let kept_sum = kept.clone().sum_dim(1);
    // Fully masked rows divide 0 by 1 instead of by 0.
    let nothing_kept = kept_sum.clone().equal_elem(0.0);
    let safe_sum = kept_sum.mask_fill(nothing_kept, 1.0);
    kept * weights.sum_dim(1) / safe_sum
}

/// `out[token_index[p]] += row_weights[p] · rows[p]` into a zero `[tokens, H]` tensor.
///
/// # Shapes
/// - `rows`: `[P, H]`, `row_weights`: `[P]`, `token_index`: `[P]`; output `[tokens, H]`
pub fn scatter_add_rows<B: Backend>(
    rows: Tensor<B, 2>,
    row_weights: Tensor<B, 1>,
    token_index: Tensor<B, 1, Int>,
    tokens: usize,
) -> Tensor<B, 2> {
    let [_, hidden] = rows.dims();
    let weighted = rows * row_weights.unsqueeze_dim(1);
    Tensor::zeros([tokens, hidden], &weighted.device()).select_assign(
        0,
        token_index,
        weighted,
        IndexingUpdateOp::Add,
    )
}
