//! What training reports per step, shared by the loop (which computes it) and the checkpoints
//! (which keep the history).

use serde::{Deserialize, Serialize};

/// Metrics of one optimiser step (on its training batch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Step index (0-based).
    pub step: usize,
    /// Total loss: task + λ · sparsity (+ load balance).
    pub loss: f64,
    /// The task part (cross-entropy and/or distillation KL).
    pub task_loss: f64,
    /// Next-token cross-entropy of the masked model (nats).
    pub cross_entropy: f64,
    /// `exp(cross_entropy)`.
    pub perplexity: f64,
    /// The sparsity term, averaged over MoE layers.
    pub sparsity: f64,
    /// Experts kept per token (hard mask), averaged over MoE layers.
    pub mean_active_experts: f64,
    /// MoE FLOPs cut of the hard mask vs top-K.
    pub moe_flops_reduction: f64,
}
