//! # beam-train
//!
//! Train BEAM mask routers end-to-end on a text corpus and measure the quality kept at each cut
//! of MoE FLOPs.
//!
//! - [`data`]: a corpus encoded with the model's `tokenizer.json`; random training windows drawn
//!   from `(seed, step)` alone, fixed evaluation windows.
//! - [`trainer`]: the loop. Mask routers are added to a loaded checkpoint; the loss is the task
//!   loss (cross-entropy and/or distillation KL to the frozen top-K model) + λ · sparsity, the
//!   mask goes through the straight-through estimator (hard 0/1 forward, sigmoid gradient), and
//!   by default only the mask routers train. Checkpoints are atomic and a killed run resumes to
//!   the same result as an uninterrupted one.
//! - [`metrics`]: what each step reports ([`StepMetrics`]), kept in checkpoints.
//! - [`eval`]: held-out loss, perplexity, next-token accuracy, experts per token (per layer too)
//!   and MoE FLOPs cut, for top-K, BEAM and the training-free peers ([`beam_model::MaskRule`]).
//! - [`choice`]: a benchmark-style task metric, multiple-choice continuation of held-out verses.
//! - [`plot`]: quality-vs-FLOPs (next-token or multiple-choice accuracy) and experts-per-layer
//!   charts (PNG).
//! - [`token_map`]: held-out text coloured by the experts each token kept (HTML).
//!
//! The `beam train` and `beam eval` commands of the `beam` CLI drive this crate.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod choice;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod plot;
pub mod token_map;
pub mod trainer;

pub use config::{SparsityScope, TaskLoss, TrainConfig, Trainable};
pub use data::{Batch, TokenData};
pub use error::TrainError;
pub use eval::{evaluate, EvalOptions, EvalReport};
pub use metrics::StepMetrics;
pub use trainer::{
    load_trained_model, read_train_config, train, trained_mask_mode, TrainSummary, ADAPTER_FILE,
};
