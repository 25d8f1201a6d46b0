//! Fine-tuning (T37) and LoRA (T38): adapters wrapped around chosen Linear layers when the
//! model is built, then — for training — weights from an earlier run, frozen layers and
//! per-group learning rates.

use crate::{Result, WorkerError};
use lockstep_kernels::Backend;
use lockstep_nn::checkpoint::{load_tensors, to_safetensors_with_metadata, write_atomic, TensorMap};
use lockstep_nn::init::normal;
use lockstep_nn::layers::LoraLinear;
use lockstep_nn::Sequential;
use lockstep_proto::toolbox::{layer_matches, LoraSpec};
use lockstep_proto::JobSpec;
use std::collections::HashMap;
use std::path::Path;

/// The layer a parameter belongs to: its name up to the last dot.
pub fn layer_of(param: &str) -> &str {
    param.rsplit_once('.').map_or(param, |(layer, _)| layer)
}

/// Wraps every layer named in `lora.layers` in a LoRA adapter. A is N(0, 1/in), B zero.
pub fn add_lora<B: Backend>(be: &B, spec: &JobSpec, lora: &LoraSpec, model: &mut Sequential<B>) -> Result<()> {
    for pattern in &lora.layers {
        let matched: Vec<usize> =
            (0..model.layers.len()).filter(|&i| layer_matches(pattern, model.layers[i].name())).collect();
        if matched.is_empty() {
            let names: Vec<&str> = model.layers.iter().map(|l| l.name()).collect();
            return Err(WorkerError::Config(format!(
                "finetune.lora.layers: no layer named {pattern:?} (the model has {names:?})"
            )));
        }
        for i in matched {
            let base = model.layers.remove(i);
            let name = base.name().to_string();
            let in_features = base.params().iter().find(|p| p.name.ends_with(".weight")).map_or(0, |w| w.shape[1]);
            let a = normal(
                spec.seed,
                &format!("{name}.lora_a"),
                lora.rank * in_features,
                1.0 / (in_features as f32).sqrt(),
            );
            let adapted = LoraLinear::new(be, base, lora.rank, lora.alpha, &a)
                .map_err(|e| WorkerError::Config(format!("finetune.lora.layers: {e}")))?;
            model.layers.insert(i, Box::new(adapted));
        }
    }
    if let Some(first) = model.layers.first_mut() {
        first.set_input_grad(false);
    }
    Ok(())
}

/// The weights to start from: a model file, a checkpoint file, or the newest checkpoint in a
/// directory.
fn read_initial_weights(path: &Path) -> Result<TensorMap> {
    let file = if path.is_dir() {
        let newest = crate::checkpoint_dir::list_checkpoints(path)?.pop();
        newest.map(|(_, p)| p).ok_or_else(|| {
            WorkerError::Config(format!("finetune.init_from: {} holds no step-*.safetensors", path.display()))
        })?
    } else {
        path.to_path_buf()
    };
    Ok(load_tensors(&file)?)
}

/// Applies `[finetune]` to a freshly built model: loads `init_from` (by name and shape; the
/// output layer is left at its fresh init with `replace_head`, and LoRA adapters are new),
/// freezes the `freeze` layers and returns each parameter's learning-rate multiplier.
pub fn prepare<B: Backend>(be: &B, spec: &JobSpec, model: &mut Sequential<B>) -> Result<Vec<f32>> {
    let f = &spec.finetune;
    let head = model.layers.iter().rev().find(|l| !l.params().is_empty()).map(|l| l.name().to_string());
    if let Some(path) = &f.init_from {
        let tensors = read_initial_weights(path)?;
        let (mut loaded, mut fresh) = (0, Vec::new());
        for p in model.params_mut() {
            let in_head = head.as_deref().is_some_and(|h| layer_of(&p.name) == h);
            let adapter = p.name.ends_with(".lora_a") || p.name.ends_with(".lora_b");
            if (f.replace_head && in_head) || adapter {
                fresh.push(p.name.clone());
                continue;
            }
            let Some((shape, values)) = tensors.get(&p.name) else {
                return Err(WorkerError::Config(format!(
                    "finetune.init_from {}: no tensor {} (set finetune.replace_head for a new output layer)",
                    path.display(),
                    p.name
                )));
            };
            if *shape != p.file_shape() {
                return Err(WorkerError::Config(format!(
                    "finetune.init_from {}: {} is {shape:?} there but {:?} here{}",
                    path.display(),
                    p.name,
                    p.file_shape(),
                    if in_head { " (set finetune.replace_head to re-initialise the output layer)" } else { "" }
                )));
            }
            p.value = be.upload(&p.layout.from_file(&p.shape, values))?;
            loaded += 1;
        }
        tracing::info!("fine-tuning from {}: {loaded} tensors loaded, fresh: {fresh:?}", path.display());
    }
    for pattern in &f.freeze {
        let mut matched = false;
        for p in model.params_mut() {
            if layer_matches(pattern, layer_of(&p.name)) {
                p.trainable = false;
                matched = true;
            }
        }
        if !matched {
            return Err(WorkerError::Config(format!("finetune.freeze: no layer named {pattern:?} has parameters")));
        }
    }
    let params = model.params();
    let mut lr_scale = vec![1.0f32; params.len()];
    for group in &f.lr_groups {
        for pattern in &group.layers {
            let mut matched = false;
            for (scale, p) in lr_scale.iter_mut().zip(&params) {
                if layer_matches(pattern, layer_of(&p.name)) {
                    *scale = group.lr_scale;
                    matched = true;
                }
            }
            if !matched {
                return Err(WorkerError::Config(format!("finetune.lr_groups: no layer named {pattern:?}")));
            }
        }
    }
    let trainable: usize = params.iter().filter(|p| p.trainable).map(|p| p.numel()).sum();
    let total: usize = params.iter().map(|p| p.numel()).sum();
    if trainable < total {
        tracing::info!("trainable parameters: {trainable} of {total}");
    }
    Ok(lr_scale)
}

/// `lockstep merge-lora`: folds every adapter into its weight, W ← W + (alpha/r)·B·A, and
/// writes a model without adapters (its job header no longer asks for them). Returns the
/// names of the layers merged.
pub fn merge_lora_file(input: &Path, output: &Path) -> Result<Vec<String>> {
    let metadata = lockstep_nn::checkpoint::load_metadata(input)?;
    let job = metadata.get("lockstep.job").ok_or_else(|| WorkerError::BadFile {
        path: input.into(),
        reason: "no lockstep.job in the header: not a lockstep model".into(),
    })?;
    let mut spec = JobSpec::parse(job, input, &[])?;
    let lora = spec.finetune.lora.take().ok_or_else(|| WorkerError::BadFile {
        path: input.into(),
        reason: "the model has no LoRA adapters (finetune.lora is unset)".into(),
    })?;
    let mut tensors = load_tensors(input)?;
    let adapted: Vec<String> =
        tensors.keys().filter_map(|k| k.strip_suffix(".lora_a")).map(str::to_string).collect::<Vec<_>>();
    let scaling = lora.alpha / lora.rank as f32;
    let bad = |reason: String| WorkerError::BadFile { path: input.into(), reason };
    for layer in &adapted {
        let (a_shape, a) = tensors.remove(&format!("{layer}.lora_a")).ok_or_else(|| bad(format!("{layer}.lora_a")))?;
        let (b_shape, b) =
            tensors.remove(&format!("{layer}.lora_b")).ok_or_else(|| bad(format!("no tensor {layer}.lora_b")))?;
        let (w_shape, w) =
            tensors.get_mut(&format!("{layer}.weight")).ok_or_else(|| bad(format!("no tensor {layer}.weight")))?;
        if a_shape.len() != 2 || b_shape.len() != 2 {
            return Err(bad(format!("{layer}: A {a_shape:?} and B {b_shape:?} must be matrices")));
        }
        let (r, i, o) = (a_shape[0], a_shape[1], b_shape[0]);
        if b_shape != [o, r] || *w_shape != [o, i] {
            return Err(bad(format!("{layer}: A {a_shape:?}, B {b_shape:?} and W {w_shape:?} do not fit")));
        }
        for out in 0..o {
            for inp in 0..i {
                let ba: f32 = (0..r).map(|k| b[out * r + k] * a[k * i + inp]).sum();
                w[out * i + inp] += scaling * ba;
            }
        }
    }
    let mut merged: Vec<(String, Vec<usize>, Vec<f32>)> =
        tensors.into_iter().map(|(name, (shape, values))| (name, shape, values)).collect();
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header: HashMap<String, String> = metadata;
    header.insert("lockstep.job".into(), spec.to_toml());
    write_atomic(output, &to_safetensors_with_metadata(&merged, Some(header))?)?;
    Ok(adapted)
}
