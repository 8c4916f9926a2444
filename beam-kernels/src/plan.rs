//! The dispatch plan: kept (token, expert) pairs grouped by expert, the one description of
//! routing compaction that every path is tested against (the cubecl compaction kernel writes
//! exactly this order), and the sizes of one masked-MoE call.

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
    /// The sizes from the shapes of `x` (`[T, H]`), `expert_ids` (`[T, K]`) and `gate_up`
    /// (`[E, 2I, H]`).
    pub fn from_shapes(
        [tokens, hidden]: [usize; 2],
        [_, top_k]: [usize; 2],
        [experts, two_i, _]: [usize; 3],
    ) -> Self {
        Self {
            tokens,
            top_k,
            experts,
            hidden,
            intermediate: two_i / 2,
        }
    }

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
}
