//! A trained model on disk: the weights as safetensors, with the resolved job and (for
//! language models) the vocabulary in the header, so one file is enough to rebuild the
//! model and sample from it.

use crate::{build, Result, Trainer, WorkerError};
use lockstep_kernels::Backend;
use lockstep_nn::checkpoint::{load_all, load_into, load_metadata, serialize, write_atomic};
use lockstep_nn::data::text::Tokenizer;
use lockstep_nn::Sequential;
use lockstep_proto::JobSpec;
use std::collections::HashMap;
use std::path::Path;

pub(crate) const JOB_KEY: &str = "lockstep.job";

/// Writes the weights `trainer` evaluates with (the EMA's when `train.eval_ema`), its
/// buffers (BatchNorm statistics, f64), job and vocabulary to `path` (atomically).
pub fn save_model<B: Backend>(trainer: &Trainer<B>, path: &Path) -> Result<()> {
    let be = &trainer.be;
    let mut metadata = HashMap::from([(JOB_KEY.to_string(), trainer.spec.to_toml())]);
    if let Some(vocab) = &trainer.vocab {
        let (key, text) = vocab.to_metadata()?;
        metadata.insert(key.to_string(), text);
    }
    let params = trainer.model.params();
    let values: Vec<Vec<f32>> = match (&trainer.ema, trainer.spec.train.eval_ema) {
        (Some(ema), true) => {
            ema.corrected(be)?.iter().map(|v| be.download(v)).collect::<std::result::Result<_, _>>()?
        }
        _ => params.iter().map(|p| be.download(&p.value)).collect::<std::result::Result<_, _>>()?,
    };
    let tensors: Vec<_> = params
        .iter()
        .zip(values)
        .map(|(p, v)| {
            let (shape, values) = p.to_file(&v);
            (p.name.clone(), shape, values)
        })
        .collect();
    let buffers: Vec<_> = trainer.model.buffers().into_iter().map(|(name, v)| (name, vec![v.len()], v)).collect();
    write_atomic(path, &serialize(&tensors, &buffers, Some(metadata))?)?;
    Ok(())
}

/// Loads the weights and buffers of the model file `path` into `trainer`'s model; a
/// missing tensor or a shape that differs is an error naming it.
pub fn load_weights<B: Backend>(trainer: &mut Trainer<B>, path: &Path) -> Result<()> {
    let (tensors, buffers) = load_all(path)?;
    load_into(&trainer.be, &mut trainer.model.params_mut(), &tensors, path)?;
    for (name, values) in trainer.model.buffers() {
        let stored = buffers.get(&name).filter(|(_, v)| v.len() == values.len());
        let Some((_, stored)) = stored else {
            let reason = format!("no buffer {name} of {} values", values.len());
            return Err(WorkerError::BadFile { path: path.into(), reason });
        };
        trainer.model.load_buffer(&name, stored);
    }
    Ok(())
}

/// Whether the model file `path` holds a GAN (read from its header alone).
pub fn is_gan(path: &Path) -> Result<bool> {
    let metadata = load_metadata(path)?;
    let Some(job) = metadata.get(JOB_KEY) else { return Ok(false) };
    Ok(JobSpec::parse(job, path, &[])?.model.kind == lockstep_proto::job::ModelKind::Gan)
}

/// A model read back by [`load_model`].
pub struct LoadedModel<B: Backend> {
    pub spec: JobSpec,
    pub model: Sequential<B>,
    pub vocab: Option<Tokenizer>,
}

/// Rebuilds the language model saved at `path` and loads its weights.
pub fn load_model<B: Backend>(be: &B, path: &Path) -> Result<LoadedModel<B>> {
    load_model_for(be, path, None)
}

/// Rebuilds the model saved at `path` and loads its weights; a classifier (whose file has
/// no vocabulary to size it) is built for `data`'s (features, classes).
pub fn load_model_for<B: Backend>(be: &B, path: &Path, data: Option<(usize, usize)>) -> Result<LoadedModel<B>> {
    let metadata = load_metadata(path)?;
    let missing = |what: &str| WorkerError::BadFile {
        path: path.into(),
        reason: format!("no {what} in the header: not written by lockstep train"),
    };
    let job = metadata.get(JOB_KEY).ok_or_else(|| missing(JOB_KEY))?;
    let spec = JobSpec::parse(job, path, &[])?;
    let vocab = Tokenizer::from_metadata(&metadata, path)?;
    let gan = spec.model.kind == lockstep_proto::job::ModelKind::Gan;
    let (features, classes) = match (&vocab, data) {
        (Some(v), _) => (spec.model.context, v.vocab_size()),
        // A GAN is sized by its image shape; its discriminator has 2 outputs.
        (None, _) if gan => (spec.model.input_shape.iter().product(), 2),
        (None, Some(sizes)) => sizes,
        (None, None) => {
            return Err(WorkerError::BadFile {
                path: path.into(),
                reason: "not a language model (no vocabulary)".into(),
            })
        }
    };
    let (mut model, _) = build::build_model(be, &spec, features, classes)?;
    let (tensors, buffers) = load_all(path)?;
    load_into(be, &mut model.params_mut(), &tensors, path)?;
    for (name, (_, values)) in &buffers {
        model.load_buffer(name, values);
    }
    Ok(LoadedModel { spec, model, vocab })
}
