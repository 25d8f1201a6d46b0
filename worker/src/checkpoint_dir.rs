//! A run's checkpoint directory: `step-00001234.safetensors` files, one directory per
//! pipeline stage (`checkpoints/stage-S/`). Names and listing only; what a checkpoint
//! holds is `train_state`'s.

use crate::{Result, WorkerError};
use std::path::{Path, PathBuf};

pub(crate) fn file_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

/// Where the checkpoint of `step` lives in `dir`.
pub fn checkpoint_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(file_name(step))
}

/// A pipeline stage's checkpoint of the same step as `stage0_file` (which is in
/// `checkpoints/stage-0/`): the same file name in `checkpoints/stage-<stage>/`.
pub fn stage_checkpoint(stage0_file: &Path, stage: usize) -> Result<PathBuf> {
    let bad = || WorkerError::BadFile {
        path: stage0_file.into(),
        reason: "not a file in a checkpoints/stage-0 directory".into(),
    };
    let name = stage0_file.file_name().ok_or_else(bad)?;
    let stage_dir = stage0_file.parent().filter(|d| d.ends_with("stage-0")).ok_or_else(bad)?;
    let checkpoints = stage_dir.parent().ok_or_else(bad)?;
    Ok(checkpoints.join(format!("stage-{stage}")).join(name))
}

/// Checkpoints in `dir`, oldest first, with their step.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(WorkerError::Io { what: "reading the checkpoint directory", path: dir.into(), source })
        }
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}
