//! Training checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! One safetensors file per checkpoint, `step-00001234.safetensors`, written atomically
//! (temp file, fsync, rename, directory fsync); the newest `keep` are kept. Tensor names,
//! so PyTorch's `safetensors` reads them:
//! - every parameter under its own name (`h0.attn.qkv.weight`, ...), f32;
//! - optimizer state as `optim.<state>.<parameter>`, with PyTorch's state names:
//!   `exp_avg`, `exp_avg_sq` (Adam/AdamW), `momentum_buffer` (momentum/Nesterov), f32;
//! - non-parameter buffers (BatchNorm `running_mean`/`running_var`), f64 (exact).
//!
//! Header metadata: `lockstep.job` (the resolved job), `lockstep.vocab`, `lockstep.step`
//! (steps taken), `lockstep.optimizer_step`. The data order needs no saved state: the
//! sampler's permutation is a pure function of (seed, epoch), dropout of (seed, layer, step,
//! example), so the step number alone positions every random stream.

use crate::{Result, Trainer, WorkerError};
use lockstep_kernels::Backend;
use lockstep_nn::checkpoint::{load_all, load_metadata, serialize, write_atomic, FileTensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::checkpoint_dir::file_name;
pub use crate::checkpoint_dir::{checkpoint_path, list_checkpoints, stage_checkpoint};

pub(crate) const STEP_KEY: &str = "lockstep.step";
const OPTIMIZER_STEP_KEY: &str = "lockstep.optimizer_step";
const JOB_KEY: &str = "lockstep.job";
const EMA_UPDATES_KEY: &str = "lockstep.ema_updates";
const LOSS_SCALE_KEY: &str = "lockstep.loss_scale";
const LOSS_SCALE_GOOD_STEPS_KEY: &str = "lockstep.loss_scale_good_steps";

/// PyTorch's names for the two optimizer state slots of each rule.
fn state_names<B: Backend>(trainer: &Trainer<B>) -> [&'static str; 2] {
    use lockstep_nn::optim::Rule;
    match trainer.optimizer.config.rule {
        Rule::Adam { .. } | Rule::AdamW { .. } => ["exp_avg", "exp_avg_sq"],
        _ => ["momentum_buffer", "unused"],
    }
}

/// Writes the trainer's state to `dir/step-<global_step>.safetensors` and deletes all but
/// the newest `keep` checkpoints. Returns the file written.
pub fn save_checkpoint<B: Backend>(trainer: &Trainer<B>, dir: &Path, keep: usize) -> Result<PathBuf> {
    save_checkpoint_with_state(trainer, &optimizer_state(trainer)?, dir, keep)
}

/// The trainer's optimizer state on the host, `[first moment, second moment]` per
/// parameter (empty where the rule keeps none).
pub fn optimizer_state<B: Backend>(trainer: &Trainer<B>) -> Result<Vec<[Vec<f32>; 2]>> {
    let be = &trainer.be;
    trainer.optimizer.state.iter().map(|(s1, s2)| Ok([be.download(s1)?, be.download(s2)?])).collect()
}

/// `save_checkpoint` with the whole optimizer `state` given (a ZeRO run gathers it from
/// every rank's shards).
pub fn save_checkpoint_with_state<B: Backend>(
    trainer: &Trainer<B>,
    state: &[[Vec<f32>; 2]],
    dir: &Path,
    keep: usize,
) -> Result<PathBuf> {
    let io = |source| WorkerError::Io { what: "checkpoint directory", path: dir.into(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let be = &trainer.be;
    let params = trainer.model.params();
    // PyTorch's layout (conv weights channels-first), for the optimizer state too.
    let host_tensor = |name: String, p: &lockstep_nn::Param<B>, values: &[f32]| {
        let (shape, values) = p.to_file(values);
        (name, shape, values)
    };
    let file_tensor = |name: String, p: &lockstep_nn::Param<B>, buf: &B::Buf| {
        Ok::<_, WorkerError>(host_tensor(name, p, &be.download(buf)?))
    };
    let mut tensors: Vec<FileTensor> =
        params.iter().map(|p| file_tensor(p.name.clone(), p, &p.value)).collect::<Result<_>>()?;
    let names = state_names(trainer);
    for (p, slots) in params.iter().zip(state) {
        for (slot, values) in names.iter().zip(slots) {
            if values.len() == p.numel() {
                tensors.push(host_tensor(format!("optim.{slot}.{}", p.name), p, values));
            }
        }
    }
    let buffers: Vec<(String, Vec<usize>, Vec<f64>)> =
        trainer.model.buffers().into_iter().map(|(name, v)| (name, vec![v.len()], v)).collect();
    let mut metadata = HashMap::from([
        (JOB_KEY.to_string(), trainer.spec.to_toml()),
        (STEP_KEY.to_string(), trainer.global_step.to_string()),
        (OPTIMIZER_STEP_KEY.to_string(), trainer.optimizer.step.to_string()),
    ]);
    if let Some(vocab) = &trainer.vocab {
        let (key, text) = vocab.to_metadata()?;
        metadata.insert(key.to_string(), text);
    }
    if let Some(ema) = &trainer.ema {
        for (p, v) in params.iter().zip(&ema.shadow) {
            tensors.push(file_tensor(format!("ema.{}", p.name), p, v)?);
        }
        metadata.insert(EMA_UPDATES_KEY.to_string(), ema.updates.to_string());
    }
    if let Some(scaler) = &trainer.loss_scaler {
        metadata.insert(LOSS_SCALE_KEY.to_string(), scaler.scale.to_string());
        metadata.insert(LOSS_SCALE_GOOD_STEPS_KEY.to_string(), scaler.good_steps.to_string());
    }
    let path = dir.join(file_name(trainer.global_step));
    write_atomic(&path, &serialize(&tensors, &buffers, Some(metadata))?)?;
    // A writer killed mid-write leaves its temporary file; the rename never happened, so it
    // is garbage (only rank 0 writes here, one checkpoint at a time).
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".step-") && name.contains(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let all = list_checkpoints(dir)?;
    for (_, old) in all.iter().rev().skip(keep.max(1)) {
        std::fs::remove_file(old).map_err(io)?;
    }
    Ok(path)
}

/// That `tensors` and `buffers` hold every parameter (in its file shape), optimizer state
/// slot and buffer of `trainer`.
fn check_state<B: Backend>(
    trainer: &Trainer<B>,
    tensors: &lockstep_nn::checkpoint::TensorMap,
    buffers: &lockstep_nn::checkpoint::TensorMapF64,
) -> std::result::Result<(), String> {
    let names = state_names(trainer);
    let be = &trainer.be;
    for (p, (s1, s2)) in trainer.model.params().iter().zip(&trainer.optimizer.state) {
        match tensors.get(&p.name) {
            Some((shape, _)) if *shape == p.file_shape() => {}
            Some((shape, _)) => return Err(format!("{} has shape {shape:?}, the model {:?}", p.name, p.file_shape())),
            None => return Err(format!("no tensor {}", p.name)),
        }
        for (slot, buf) in names.iter().zip([s1, s2]).filter(|(_, b)| be.len(b) > 0) {
            let key = format!("optim.{slot}.{}", p.name);
            match tensors.get(&key) {
                Some((_, v)) if v.len() == be.len(buf) => {}
                Some((_, v)) => return Err(format!("{key} has {} values, expected {}", v.len(), be.len(buf))),
                None => return Err(format!("no tensor {key}")),
            }
        }
    }
    for (name, values) in trainer.model.buffers() {
        match buffers.get(&name) {
            Some((_, v)) if v.len() == values.len() => {}
            _ => return Err(format!("no buffer {name} of {} values", values.len())),
        }
    }
    Ok(())
}

/// Restores parameters, optimizer state and buffers from `path` into `trainer` and sets
/// its step. The checkpoint's model and optimizer must be the trainer's: anything else is
/// an error naming what differs, before any state is touched.
pub fn restore_checkpoint<B: Backend>(trainer: &mut Trainer<B>, path: &Path) -> Result<u64> {
    let bad = |reason: String| WorkerError::BadFile { path: path.into(), reason };
    let metadata = load_metadata(path)?;
    let get = |key: &str| metadata.get(key).ok_or_else(|| bad(format!("no {key} in the header")));
    let step: u64 = get(STEP_KEY)?.parse().map_err(|_| bad(format!("{STEP_KEY} is not a number")))?;
    let optimizer_step: u64 =
        get(OPTIMIZER_STEP_KEY)?.parse().map_err(|_| bad(format!("{OPTIMIZER_STEP_KEY} is not a number")))?;
    let saved = lockstep_proto::JobSpec::parse(get(JOB_KEY)?, path, &[])?;
    if saved.model != trainer.spec.model {
        return Err(bad("its [model] differs from this job's".into()));
    }
    if saved.optim.kind != trainer.spec.optim.kind {
        return Err(bad(format!(
            "it was trained with optim.kind {:?}, this job uses {:?}",
            saved.optim.kind, trainer.spec.optim.kind
        )));
    }
    let (tensors, buffers) = load_all(path)?;
    let names = state_names(trainer);
    let be = &trainer.be;
    // Check everything first, then write: a bad file leaves the trainer untouched.
    check_state(trainer, &tensors, &buffers).map_err(bad)?;
    let number = |key: &str| -> Result<Option<f64>> {
        metadata.get(key).map(|v| v.parse::<f64>().map_err(|_| bad(format!("{key} is not a number")))).transpose()
    };
    let ema_updates = number(EMA_UPDATES_KEY)?;
    if let (Some(_), Some(_)) = (&trainer.ema, ema_updates) {
        for p in trainer.model.params() {
            match tensors.get(&format!("ema.{}", p.name)) {
                Some((shape, _)) if *shape == p.file_shape() => {}
                _ => return Err(bad(format!("no tensor ema.{} of shape {:?}", p.name, p.file_shape()))),
            }
        }
    }
    let (loss_scale, good_steps) = (number(LOSS_SCALE_KEY)?, number(LOSS_SCALE_GOOD_STEPS_KEY)?);
    // Shapes were checked above; from here on only the layout changes.
    let memory = |p: &lockstep_nn::Param<B>, key: &str| p.layout.from_file(&p.shape, &tensors[key].1);
    for (p, (s1, s2)) in trainer.model.params_mut().into_iter().zip(trainer.optimizer.state.iter_mut()) {
        p.value = be.upload(&memory(p, &p.name))?;
        for (slot, buf) in names.iter().zip([s1, s2]) {
            if be.len(buf) > 0 {
                *buf = be.upload(&memory(p, &format!("optim.{slot}.{}", p.name)))?;
            }
        }
    }
    for (name, _) in trainer.model.buffers() {
        trainer.model.load_buffer(&name, &buffers[&name].1);
    }
    match (&mut trainer.ema, ema_updates) {
        (Some(ema), Some(updates)) => {
            for (p, v) in trainer.model.params().iter().zip(ema.shadow.iter_mut()) {
                *v = be.upload(&memory(p, &format!("ema.{}", p.name)))?;
            }
            ema.updates = updates as u64;
        }
        (Some(_), None) => tracing::warn!("{}: no EMA in the checkpoint; the EMA starts afresh", path.display()),
        _ => {}
    }
    if let (Some(scaler), Some(scale)) = (&mut trainer.loss_scaler, loss_scale) {
        scaler.scale = scale as f32;
        scaler.good_steps = good_steps.unwrap_or(0.0) as u64;
    }
    trainer.optimizer.step = optimizer_step;
    trainer.global_step = step;
    Ok(step)
}
