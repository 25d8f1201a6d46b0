//! A trained model on disk: the weights as safetensors, with the resolved job and (for
//! language models) the vocabulary in the header, so one file is enough to rebuild the
//! model and sample from it.

use crate::{build, Result, Trainer, WorkerError};
use lockstep_kernels::Backend;
use lockstep_nn::checkpoint::{load_into, load_metadata, load_tensors, save_weights};
use lockstep_nn::data::text::CharTokenizer;
use lockstep_nn::Sequential;
use lockstep_proto::JobSpec;
use std::collections::HashMap;
use std::path::Path;

const JOB_KEY: &str = "lockstep.job";
const VOCAB_KEY: &str = "lockstep.vocab";

/// Writes `trainer`'s weights, job and vocabulary to `path` (atomically).
pub fn save_model<B: Backend>(trainer: &Trainer<B>, path: &Path) -> Result<()> {
    let mut metadata = HashMap::from([(JOB_KEY.to_string(), trainer.spec.to_toml())]);
    if let Some(vocab) = &trainer.vocab {
        metadata.insert(VOCAB_KEY.to_string(), vocab.to_vocab_file());
    }
    save_weights(&trainer.be, &trainer.model.params(), Some(metadata), path)?;
    Ok(())
}

/// A model read back by [`load_model`].
pub struct LoadedModel<B: Backend> {
    pub spec: JobSpec,
    pub model: Sequential<B>,
    pub vocab: Option<CharTokenizer>,
}

/// Rebuilds the model saved at `path` and loads its weights.
pub fn load_model<B: Backend>(be: &B, path: &Path) -> Result<LoadedModel<B>> {
    let metadata = load_metadata(path)?;
    let missing = |what: &str| {
        WorkerError::Config(format!("{}: no {what} in the header: not written by lockstep train", path.display()))
    };
    let job = metadata.get(JOB_KEY).ok_or_else(|| missing(JOB_KEY))?;
    let spec = JobSpec::parse(job, path, &[]).map_err(|e| WorkerError::Config(e.to_string()))?;
    let vocab = match metadata.get(VOCAB_KEY) {
        Some(text) => Some(CharTokenizer::from_vocab_file(text, path)?),
        None => None,
    };
    let classes = match &vocab {
        Some(v) => v.vocab_size(),
        None => return Err(WorkerError::Config(format!("{}: not a language model (no vocabulary)", path.display()))),
    };
    let (mut model, _) = build::build_model(be, &spec, spec.model.context, classes)?;
    let tensors = load_tensors(path)?;
    load_into(be, &mut model.params_mut(), &tensors, path)?;
    Ok(LoadedModel { spec, model, vocab })
}
