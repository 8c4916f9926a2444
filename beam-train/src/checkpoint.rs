//! Training checkpoints, written so that a kill at any moment loses at most the steps since the
//! last one and never leaves a broken checkpoint behind:
//!
//! 1. everything goes into a hidden temporary folder, each file synced;
//! 2. the folder is renamed to `checkpoint-<step>` (atomic on one file system);
//! 3. the `latest` file is replaced atomically with that name;
//! 4. older checkpoints are deleted.
//!
//! A checkpoint holds the whole model record (`model.mpk`), the optimiser state
//! (`optimizer.mpk`) and `state.json` (step, settings, metric history, and a [`RunFingerprint`]
//! of the model and data it was trained on: a resume with other settings, another model or other
//! text is refused, naming what differs).

use std::fs;
use std::path::{Path, PathBuf};

use beam_model::model::adapter::write_atomically;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{io_error, TrainError};
use crate::metrics::StepMetrics;

/// File naming the newest complete checkpoint folder.
pub const LATEST: &str = "latest";

/// The JSON part of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Steps completed.
    pub step: usize,
    /// Settings of the run (a resume must use the same).
    pub config: serde_json::Value,
    /// Metrics of every completed step.
    pub history: Vec<StepMetrics>,
    /// The model and data the run trains on (absent in checkpoints of older versions, which are
    /// then checked on their settings only).
    #[serde(default)]
    pub fingerprint: Option<RunFingerprint>,
}

/// What identifies a run's inputs beyond its settings: the checkpoint folder's `config.json`
/// (hashed) and the names and sizes of its weight files (a content hash would read every
/// byte of a many-gigabyte checkpoint on each start), and the training tokens (count and hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFingerprint {
    /// FNV-1a 64 of `config.json`, hex.
    pub model_config: String,
    /// `name:bytes` of each weight file, sorted by name.
    pub model_files: Vec<String>,
    /// Training tokens.
    pub data_tokens: usize,
    /// FNV-1a 64 of the training token ids (little-endian `u32`s), hex.
    pub data_hash: String,
}

/// 64-bit FNV-1a: a fingerprint of bytes (not a cryptographic hash).
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl RunFingerprint {
    /// The fingerprint of training on the checkpoint folder `model_dir` with `tokens`. Only the
    /// files the loader reads count (`model.safetensors`, or the shards the index names): an
    /// adapter saved into the model's folder does not change it.
    pub fn new(model_dir: &Path, tokens: &[u32]) -> Result<Self, TrainError> {
        let config = model_dir.join("config.json");
        let config_bytes = fs::read(&config).map_err(io_error(&config))?;
        let store = beam_model::checkpoint::TensorStore::open_dir_headers(model_dir)
            .map_err(beam_model::model::ModelError::from)?;
        let mut model_files: Vec<String> = store
            .files()
            .into_iter()
            .map(|(path, len)| {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                format!("{name}:{len}")
            })
            .collect();
        model_files.sort();
        Ok(Self {
            model_config: format!("{:016x}", fnv1a(config_bytes)),
            model_files,
            data_tokens: tokens.len(),
            data_hash: format!(
                "{:016x}",
                fnv1a(tokens.iter().flat_map(|t| t.to_le_bytes()))
            ),
        })
    }

    /// What differs from `now`, in words, or `None` when both describe the same inputs.
    pub fn differences(&self, now: &RunFingerprint) -> Option<String> {
        let mut what = Vec::new();
        if self.model_config != now.model_config {
            what.push("the model's config.json differs".to_string());
        }
        if self.model_files != now.model_files {
            what.push(format!(
                "the model's safetensors files differ (checkpoint: {}; now: {})",
                self.model_files.join(", "),
                now.model_files.join(", ")
            ));
        }
        if self.data_tokens != now.data_tokens || self.data_hash != now.data_hash {
            what.push(format!(
                "the training data differs (checkpoint: {} tokens, hash {}; now: {} tokens, hash {})",
                self.data_tokens, self.data_hash, now.data_tokens, now.data_hash
            ));
        }
        (!what.is_empty()).then(|| what.join("; "))
    }
}

/// The bytes of a checkpoint.
pub struct CheckpointFiles {
    /// `model.mpk`.
    pub model: Vec<u8>,
    /// `optimizer.mpk`.
    pub optimizer: Vec<u8>,
    /// `state.json`.
    pub state: CheckpointState,
}

fn checkpoint_error(path: &Path, reason: impl ToString) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Writes a checkpoint into `dir` as described in the module docs.
pub fn save(dir: &Path, files: &CheckpointFiles) -> Result<PathBuf, TrainError> {
    let name = format!("checkpoint-{:06}", files.state.step);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_error(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_error(&tmp))?;
    let state = serde_json::to_vec_pretty(&files.state).expect("state serialises");
    for (file, bytes) in [
        ("model.mpk", &files.model),
        ("optimizer.mpk", &files.optimizer),
        ("state.json", &state),
    ] {
        write_atomically(&tmp.join(file), bytes)?;
    }
    let target = dir.join(&name);
    if target.exists() {
        fs::remove_dir_all(&target).map_err(io_error(&target))?;
    }
    fs::rename(&tmp, &target).map_err(io_error(&target))?;
    write_atomically(&dir.join(LATEST), name.as_bytes())?;
    // Older checkpoints and leftovers of killed writes go only after `latest` moved on.
    for entry in fs::read_dir(dir).map_err(io_error(dir))?.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let stale = (file_name.starts_with("checkpoint-") && file_name != name)
            || file_name.starts_with(".checkpoint-");
        if stale && entry.path().is_dir() {
            fs::remove_dir_all(entry.path()).ok();
        }
    }
    Ok(target)
}

/// Reads the checkpoint `latest` points to, if there is one.
pub fn load_latest(dir: &Path) -> Result<Option<CheckpointFiles>, TrainError> {
    let latest = dir.join(LATEST);
    if !latest.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&latest).map_err(io_error(&latest))?;
    let name = name.trim();
    if !name.starts_with("checkpoint-") || name.contains(['/', '\\']) {
        return Err(checkpoint_error(
            &latest,
            format!("names {name:?}, not a checkpoint folder"),
        ));
    }
    let folder = dir.join(name);
    let read = |file: &str| {
        let path = folder.join(file);
        fs::read(&path).map_err(|e| checkpoint_error(&path, e))
    };
    let state_path = folder.join("state.json");
    let state: CheckpointState = serde_json::from_slice(&read("state.json")?)
        .map_err(|e| checkpoint_error(&state_path, e))?;
    Ok(Some(CheckpointFiles {
        model: read("model.mpk")?,
        optimizer: read("optimizer.mpk")?,
        state,
    }))
}

/// Checks that a checkpoint was written with `config` (up to the number of steps and the
/// checkpoint interval: a run may be resumed to train longer) and, when it records one, on the
/// inputs `fingerprint` describes.
pub fn check_config(
    dir: &Path,
    state: &CheckpointState,
    config: &TrainConfig,
    fingerprint: &RunFingerprint,
) -> Result<(), TrainError> {
    if let Some(differences) = state
        .fingerprint
        .as_ref()
        .and_then(|saved| saved.differences(fingerprint))
    {
        return Err(checkpoint_error(
            dir,
            format!(
                "was written for other inputs: {differences}; resume with the same --model and \
                 --data or use a new output folder"
            ),
        ));
    }
    let comparable = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(map) = v.as_object_mut() {
            map.remove("steps");
            map.remove("checkpoint_every");
        }
        v
    };
    let current = serde_json::to_value(config).expect("config serialises");
    let written = TrainConfig::with_defaults(state.config.clone());
    if comparable(&current) != comparable(&written) {
        return Err(checkpoint_error(
            dir,
            format!(
                "was written with other settings; resume with the same settings or use a new output folder \
                 (checkpoint: {}, now: {})",
                state.config, current
            ),
        ));
    }
    Ok(())
}
