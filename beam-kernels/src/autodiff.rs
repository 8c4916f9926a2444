//! burn's `Autodiff<B>`: both operations run the tensor-ops reference on `Autodiff<B>`, so autodiff
//! derives their gradients exactly (the grouped-experts reference gathers, runs each expert on its
//! rows and scatter-adds back, all differentiable burn ops). Sentinel slots are dropped here as on
//! every backend; it is the layer that keeps masked slots' ids while training a learned mask,
//! because the straight-through gradient needs those experts' outputs (see `BeamMoe`).

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;

use crate::{GroupedExpertsBackend, KvCacheBackend, LinearBackend};

impl<B: Backend, C: CheckpointStrategy> GroupedExpertsBackend for Autodiff<B, C> {}

impl<B: Backend, C: CheckpointStrategy> LinearBackend for Autodiff<B, C> {}

impl<B: Backend, C: CheckpointStrategy> KvCacheBackend for Autodiff<B, C> {}
