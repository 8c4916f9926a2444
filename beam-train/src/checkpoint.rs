//! Training checkpoints, written so that a kill at any moment loses at most the steps since the
//! last one and never leaves a broken checkpoint behind:
//!
//! 1. everything goes into a hidden temporary folder, each file synced;
//! 2. the folder is renamed to `checkpoint-<step>` (atomic on one file system);
//! 3. the `latest` file is replaced atomically with that name;
//! 4. older checkpoints are deleted.
//!
//! A checkpoint holds the whole model record (`model.mpk`), the optimiser state
//! (`optimizer.mpk`) and `state.json` (step, settings, metric history).

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

/// Checks that a checkpoint was written with `config`, up to the number of steps and the
/// checkpoint interval (a run may be resumed to train longer).
pub fn check_config(
    dir: &Path,
    state: &CheckpointState,
    config: &TrainConfig,
) -> Result<(), TrainError> {
    let comparable = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(map) = v.as_object_mut() {
            map.remove("steps");
            map.remove("checkpoint_every");
        }
        v
    };
    let current = serde_json::to_value(config).expect("config serialises");
    if comparable(&current) != comparable(&state.config) {
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
