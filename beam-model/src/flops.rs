//! MoE-layer FLOPs accounting, shared by every report in the project.
//!
//! Counts are multiply-adds × 2 of the matrix products; element-wise work (softmax, SiLU, the
//! weighting) is not counted. Per token:
//! - router: `2·H·E`; mask router: `2·H·E` ([`PerExpert`](crate::MaskRouterShape::PerExpert)) or
//!   `2·H·K` (per slot), only when BEAM is enabled;
//! - each kept (token, expert) pair: `6·H·I` (gate, up and down projections);
//! - shared expert: `6·H·I_s` (+ `2·H` for the Qwen2-MoE gate).
//!
//! The *MoE FLOPs reduction* is `1 − beam / top-K` over the whole layer (router, mask router,
//! routed and shared experts), i.e. `1 − (kept pairs + overhead) / (T·K + overhead)` in units of
//! expert pairs.

use crate::config::BeamMoeConfig;

/// FLOPs of one MoE-layer forward, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MoeFlops {
    /// Base router.
    pub router: u64,
    /// BEAM mask router (0 for top-K).
    pub mask_router: u64,
    /// Routed experts.
    pub experts: u64,
    /// Shared expert.
    pub shared: u64,
}

impl MoeFlops {
    /// Sum of all parts.
    pub fn total(&self) -> u64 {
        self.router + self.mask_router + self.experts + self.shared
    }
}

/// Top-K vs BEAM FLOPs for the same tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlopsReport {
    /// Tokens T.
    pub tokens: usize,
    /// Routed pairs the top-K layer runs: T·K.
    pub topk_pairs: usize,
    /// Pairs BEAM kept.
    pub kept_pairs: usize,
    /// The plain top-K layer.
    pub topk: MoeFlops,
    /// The BEAM layer.
    pub beam: MoeFlops,
}

impl FlopsReport {
    /// `1 − beam / top-K` over the whole layer.
    pub fn reduction(&self) -> f64 {
        1.0 - self.beam.total() as f64 / self.topk.total() as f64
    }

    /// `1 − kept / (T·K)`: the routed-expert work skipped.
    pub fn routed_reduction(&self) -> f64 {
        1.0 - self.kept_pairs as f64 / self.topk_pairs as f64
    }

    /// `T·K / kept`: the speed-up bound if expert work were all that counted (∞ if nothing kept).
    pub fn flop_limit(&self) -> f64 {
        self.topk_pairs as f64 / self.kept_pairs as f64
    }

    /// Mean experts run per token.
    pub fn mean_active_experts(&self) -> f64 {
        self.kept_pairs as f64 / self.tokens as f64
    }
}

/// FLOPs of one (token, expert) pair: `6·H·I`.
pub fn expert_pair_flops(config: &BeamMoeConfig) -> u64 {
    6 * config.hidden_size as u64 * config.intermediate_size as u64
}

/// Top-K vs BEAM FLOPs of a forward over `tokens` tokens in which `kept_pairs` (token, expert)
/// pairs survived the mask.
pub fn moe_layer_flops(config: &BeamMoeConfig, tokens: usize, kept_pairs: usize) -> FlopsReport {
    let t = tokens as u64;
    let h = config.hidden_size as u64;
    let router = 2 * t * h * config.num_experts as u64;
    let shared = config.shared_expert.as_ref().map_or(0, |s| {
        let gate = if s.gated { 2 * h } else { 0 };
        t * (6 * h * s.intermediate_size as u64 + gate)
    });
    // 0 outputs without BEAM.
    let mask_router = 2 * t * h * config.mask_router_outputs() as u64;
    let pair = expert_pair_flops(config);
    let topk_pairs = tokens * config.top_k;
    FlopsReport {
        tokens,
        topk_pairs,
        kept_pairs,
        topk: MoeFlops {
            router,
            mask_router: 0,
            experts: topk_pairs as u64 * pair,
            shared,
        },
        beam: MoeFlops {
            router,
            mask_router,
            experts: kept_pairs as u64 * pair,
            shared,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SharedExpertConfig;

    #[test]
    fn counts_match_hand_computation() {
        // H = 4, I = 3, E = 8, K = 2, 10 tokens, 5 pairs kept, shared gated I_s = 5.
        let config = BeamMoeConfig::new(4, 3, 8, 2)
            .with_shared_expert(Some(SharedExpertConfig::new(5).with_gated(true)));
        let report = moe_layer_flops(&config, 10, 5);
        assert_eq!(report.topk.router, 2 * 10 * 4 * 8);
        assert_eq!(report.beam.mask_router, 2 * 10 * 4 * 8);
        assert_eq!(report.topk.experts, 20 * 6 * 4 * 3);
        assert_eq!(report.beam.experts, 5 * 6 * 4 * 3);
        assert_eq!(report.topk.shared, 10 * (6 * 4 * 5 + 2 * 4));
        let expected = 1.0 - (640.0 + 640.0 + 360.0 + 1280.0) / (640.0 + 1440.0 + 1280.0);
        assert!((report.reduction() - expected).abs() < 1e-12);
        assert_eq!(report.routed_reduction(), 0.75);
        assert_eq!(report.flop_limit(), 4.0);
        assert_eq!(report.mean_active_experts(), 0.5);
    }

    #[test]
    fn keeping_everything_costs_only_the_mask_router() {
        let config = BeamMoeConfig::new(64, 32, 8, 2);
        let report = moe_layer_flops(&config, 7, 14);
        assert_eq!(
            report.beam.total() - report.topk.total(),
            report.beam.mask_router
        );
        assert!(report.reduction() < 0.0);
        let top_k_only = config.with_beam(None);
        assert_eq!(moe_layer_flops(&top_k_only, 7, 14).reduction(), 0.0);
    }
}
