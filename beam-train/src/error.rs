//! Typed errors of training and evaluation.

use std::path::PathBuf;

use beam_model::model::ModelError;

/// Why training or evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The tokenizer could not be loaded or could not encode the text.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The corpus is too short for the requested windows.
    #[error("{path}: {tokens} tokens, need at least {needed} (sequence length + 1)")]
    CorpusTooShort {
        /// The corpus file.
        path: PathBuf,
        /// Tokens it has.
        tokens: usize,
        /// Tokens needed.
        needed: usize,
    },
    /// A token id is outside the model's vocabulary.
    #[error("{path}: token id {id} is outside the model's vocabulary of {vocab}")]
    TokenOutOfVocabulary {
        /// The corpus file.
        path: PathBuf,
        /// The offending id.
        id: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// The model or adapter failed to load or save.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A checkpoint is missing, corrupt or was written with other settings.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A loss became NaN or infinite.
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged {
        /// The step.
        step: usize,
        /// The loss value.
        loss: f64,
    },
    /// Drawing a plot failed.
    #[error("plot {path}: {reason}")]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

pub(crate) fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
