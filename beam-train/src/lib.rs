//! # beam-train
//!
//! Training BEAM mask routers end-to-end on a text corpus and evaluating quality kept against
//! MoE FLOPs cut. Not implemented yet (tracked by the training issue); the layer-level training
//! path (straight-through estimator, sparsity loss, `BeamMoe::freeze_base`) is in `beam-model`
//! and shown by the workspace example `beam_layer`.
