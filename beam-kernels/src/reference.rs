//! Host references for every kernel: plain Rust, `f64` accumulation, no device.
//!
//! - [`DispatchPlan`] is what the routing-compaction kernel computes (exactly, same order);
//! - [`masked_moe_f64`] is what the expert GEMM + combine kernels compute.

/// Kept (token, slot) pairs grouped by expert: a counting sort of the routing table.
///
/// The compaction kernel writes the same `offsets` and the same pair order, and fills the unused
/// tail of its pair list with the sentinel `T · K`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    /// `offsets[e]..offsets[e + 1]` is expert `e`'s range in [`pairs`](Self::pairs); length E + 1.
    pub offsets: Vec<usize>,
    /// Flat slot indices `t * K + k` of kept pairs, grouped by expert, tokens ascending.
    pub pairs: Vec<usize>,
    /// K.
    pub top_k: usize,
}

impl DispatchPlan {
    /// Groups a row-major `[T, K]` id table; ids outside `0..num_experts` (the sentinel) are dropped.
    pub fn from_ids(expert_ids: &[i64], top_k: usize, num_experts: usize) -> Self {
        let expert_of = |id: i64| usize::try_from(id).ok().filter(|&e| e < num_experts);
        let mut offsets = vec![0usize; num_experts + 1];
        for e in expert_ids.iter().filter_map(|&id| expert_of(id)) {
            offsets[e + 1] += 1;
        }
        for e in 0..num_experts {
            offsets[e + 1] += offsets[e];
        }
        let mut cursor = offsets.clone();
        let mut pairs = vec![0usize; offsets[num_experts]];
        for (slot, e) in expert_ids
            .iter()
            .enumerate()
            .filter_map(|(slot, &id)| Some((slot, expert_of(id)?)))
        {
            pairs[cursor[e]] = slot;
            cursor[e] += 1;
        }
        Self {
            offsets,
            pairs,
            top_k,
        }
    }

    /// Number of kept (token, expert) pairs.
    pub fn kept(&self) -> usize {
        self.pairs.len()
    }

    /// Tokens per expert.
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// `(expert, start, len)` for every expert with at least one token.
    pub fn groups(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.offsets
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[1] > w[0])
            .map(|(e, w)| (e, w[0], w[1] - w[0]))
    }

    /// The token of each kept pair, in plan order.
    pub fn tokens(&self) -> Vec<usize> {
        self.pairs.iter().map(|slot| slot / self.top_k).collect()
    }
}

/// Sizes of one masked-MoE call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeDims {
    /// T.
    pub tokens: usize,
    /// K, routing slots per token.
    pub top_k: usize,
    /// E.
    pub experts: usize,
    /// H.
    pub hidden: usize,
    /// I, one expert's intermediate size.
    pub intermediate: usize,
}

impl MoeDims {
    /// Panics unless the lengths of `[x, expert_ids, weights, gate_up, down]` are those of
    /// `[T, H]`, `[T, K]`, `[T, K]`, `[E, 2I, H]` and `[E, H, I]` row-major buffers.
    pub fn assert_lengths(&self, [x, expert_ids, weights, gate_up, down]: [usize; 5]) {
        let Self {
            tokens,
            top_k,
            experts,
            hidden,
            intermediate,
        } = *self;
        assert_eq!(x, tokens * hidden, "x is [T, H]");
        assert_eq!(expert_ids, tokens * top_k, "expert_ids is [T, K]");
        assert_eq!(weights, tokens * top_k, "weights is [T, K]");
        assert_eq!(
            gate_up,
            experts * 2 * intermediate * hidden,
            "gate_up is [E, 2I, H]"
        );
        assert_eq!(down, experts * hidden * intermediate, "down is [E, H, I]");
    }
}

/// `out[t] = Σ_k w[t, k] · down[e] · (silu(gate[e] · x[t]) ⊙ up[e] · x[t])` over kept slots
/// (`e = ids[t, k] < E`), accumulated in `f64`, row-major buffers.
///
/// # Shapes
/// - `x`: `[T, H]`, `expert_ids`, `weights`: `[T, K]`
/// - `gate_up`: `[E, 2I, H]` (gate rows first), `down`: `[E, H, I]`; output `[T, H]`
pub fn masked_moe_f64(
    x: &[f32],
    expert_ids: &[i64],
    weights: &[f32],
    gate_up: &[f32],
    down: &[f32],
    dims: MoeDims,
) -> Vec<f64> {
    let MoeDims {
        tokens,
        top_k,
        experts,
        hidden,
        intermediate,
    } = dims;
    dims.assert_lengths([
        x.len(),
        expert_ids.len(),
        weights.len(),
        gate_up.len(),
        down.len(),
    ]);
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum() };
    fn weight_row(m: &[f32], r: usize, len: usize) -> &[f32] {
        &m[r * len..(r + 1) * len]
    }
    let mut out = vec![0.0f64; tokens * hidden];
    for t in 0..tokens {
        let row = &x[t * hidden..(t + 1) * hidden];
        for k in 0..top_k {
            let Some(e) = usize::try_from(expert_ids[t * top_k + k])
                .ok()
                .filter(|&e| e < experts)
            else {
                continue;
            };
            let w = weights[t * top_k + k] as f64;
            let h: Vec<f64> = (0..intermediate)
                .map(|i| {
                    let g = dot(weight_row(gate_up, e * 2 * intermediate + i, hidden), row);
                    let u = dot(
                        weight_row(gate_up, e * 2 * intermediate + intermediate + i, hidden),
                        row,
                    );
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            for j in 0..hidden {
                let d = weight_row(down, e * hidden + j, intermediate);
                let y: f64 = d.iter().zip(&h).map(|(&d, &h)| d as f64 * h).sum();
                out[t * hidden + j] += w * y;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_groups_by_expert_and_drops_sentinels() {
        // T = 3, K = 2, E = 3; sentinel 3 at (1, 0).
        let plan = DispatchPlan::from_ids(&[2, 0, 3, 2, 0, 1], 2, 3);
        assert_eq!(plan.offsets, vec![0, 2, 3, 5]);
        assert_eq!(plan.pairs, vec![1, 4, 5, 0, 3]);
        assert_eq!(plan.tokens(), vec![0, 2, 2, 0, 1]);
        assert_eq!(plan.counts(), vec![2, 1, 2]);
        assert_eq!(plan.kept(), 5);
        let groups: Vec<_> = plan.groups().collect();
        assert_eq!(groups, vec![(0, 0, 2), (1, 2, 1), (2, 3, 2)]);
    }

    #[test]
    fn plan_of_all_masked_is_empty_and_skips_idle_experts() {
        let plan = DispatchPlan::from_ids(&[4, 4, 9, 4], 2, 4);
        assert_eq!(plan.kept(), 0);
        assert_eq!(plan.groups().count(), 0);
        let plan = DispatchPlan::from_ids(&[3, 3], 1, 4);
        assert_eq!(plan.groups().collect::<Vec<_>>(), vec![(3, 0, 2)]);
    }

    #[test]
    fn f64_reference_matches_a_hand_computed_expert() {
        // T = 1, K = 2, E = 2, H = 2, I = 1; slot 0 is masked (sentinel 2), slot 1 runs expert 0.
        let gate_up = [
            0.5f32, 0.25, 1.0, 1.0, /* expert 1 */ 9.0, 9.0, 9.0, 9.0,
        ];
        let down = [2.0f32, -1.0, /* expert 1 */ 7.0, 7.0];
        let out = masked_moe_f64(
            &[2.0, 0.0],
            &[2, 0],
            &[0.3, 0.5],
            &gate_up,
            &down,
            MoeDims {
                tokens: 1,
                top_k: 2,
                experts: 2,
                hidden: 2,
                intermediate: 1,
            },
        );
        let g = 1.0f64; // 0.5 · 2
        let u = 2.0f64; // 1 · 2
        let h = g / (1.0 + (-g).exp()) * u;
        assert!((out[0] - 0.5 * 2.0 * h).abs() < 1e-12);
        assert!((out[1] + 0.5 * h).abs() < 1e-12);
    }
}
