//! `lockstep eval`: a trained model on a dataset's test split, without training. The model
//! is rebuilt from the job in its file's header and evaluated by the same
//! [`Trainer::evaluate`] that training reports with, so the numbers are the summary's.

use crate::model_file::{self, JOB_KEY};
use crate::{build, train_state, Result, Trainer, WorkerError};
use lockstep_kernels::Backend;
use lockstep_nn::checkpoint::load_metadata;
use lockstep_proto::classification::ClassMetrics;
use lockstep_proto::JobSpec;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What to evaluate on instead of the data the model was trained with.
#[derive(Debug, Clone, Default)]
pub struct EvalData {
    /// A job file whose `[data]` section replaces the model's.
    pub config: Option<JobSpec>,
    /// Replaces `data.dir` (after `config`).
    pub dir: Option<PathBuf>,
}

/// One evaluation of a model file.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: PathBuf,
    pub data_dir: PathBuf,
    /// Examples (classifiers) or predicted tokens (language models) evaluated.
    pub examples: usize,
    pub loss: f64,
    pub accuracy: f64,
    /// exp(loss), for language models.
    pub perplexity: Option<f64>,
    /// Confusion matrix and per-class precision/recall/F1, for classifiers.
    pub classes: Option<ClassMetrics>,
    /// "ema" when the checkpoint's EMA weights were evaluated (train.eval_ema).
    pub weights: &'static str,
}

/// The model file `path` names: a file as is; a directory's `model.safetensors` (a run
/// directory or `best/`), else its newest checkpoint (`checkpoints/`).
pub fn resolve_model_file(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return match path.exists() {
            true => Ok(path.to_path_buf()),
            false => Err(WorkerError::BadFile { path: path.into(), reason: "no such model file or directory".into() }),
        };
    }
    let model = path.join("model.safetensors");
    if model.is_file() {
        return Ok(model);
    }
    match train_state::list_checkpoints(path)?.pop() {
        Some((_, newest)) => Ok(newest),
        None => Err(WorkerError::BadFile {
            path: path.into(),
            reason: "no model.safetensors and no step-*.safetensors checkpoint in this directory".into(),
        }),
    }
}

/// The job of the model at `path`, with `data` applied.
fn eval_spec(path: &Path, data: &EvalData) -> Result<JobSpec> {
    let metadata = load_metadata(path)?;
    let job = metadata.get(JOB_KEY).ok_or_else(|| WorkerError::BadFile {
        path: path.into(),
        reason: format!("no {JOB_KEY} in the header: not written by lockstep"),
    })?;
    let mut spec = JobSpec::parse(job, path, &[])?;
    if let Some(config) = &data.config {
        spec.data = config.data.clone();
    }
    if let Some(dir) = &data.dir {
        spec.data.dir = dir.clone();
    }
    // The weights come from the file: the run's initial weights are not needed (or there).
    spec.finetune.init_from = None;
    Ok(spec)
}

/// Evaluates the model at `path` (see [`resolve_model_file`]) on the test split of its data.
pub fn evaluate_model_file<B: Backend>(be: B, path: &Path, data: &EvalData) -> Result<EvalReport> {
    let path = resolve_model_file(path)?;
    let spec = eval_spec(&path, data)?;
    let build::LoadedData { train, test, vocab } = build::load_data(&spec)?;
    let metadata = load_metadata(&path)?;
    if let Some(vocab) = &vocab {
        let (key, text) = vocab.to_metadata()?;
        if metadata.get(key) != Some(&text) {
            return Err(WorkerError::Config(format!(
                "{}: its vocabulary is not the one of {} (the model was trained on other text)",
                path.display(),
                spec.data.dir.display()
            )));
        }
    }
    let mut trainer = Trainer::for_data(be, &spec, train.as_ref(), vocab, 1)?;
    let misfit = |e: WorkerError| {
        WorkerError::Config(format!(
            "{e} (the model built for {} has {} input features and {} classes; a model trained on other data \
             does not fit it)",
            spec.data.dir.display(),
            train.features(),
            train.classes()
        ))
    };
    let is_checkpoint = load_metadata(&path)?.contains_key(train_state::STEP_KEY);
    let use_ema = is_checkpoint && trainer.ema.is_some() && spec.train.eval_ema;
    if is_checkpoint {
        train_state::restore_checkpoint(&mut trainer, &path).map_err(misfit)?;
    } else {
        model_file::load_weights(&mut trainer, &path).map_err(misfit)?;
    }
    let eval = if use_ema { trainer.evaluate_ema(test.as_ref())? } else { trainer.evaluate(test.as_ref())? };
    let language_model = trainer.vocab.is_some();
    Ok(EvalReport {
        model: path,
        data_dir: spec.data.dir.clone(),
        examples: eval.targets,
        loss: eval.loss,
        accuracy: eval.accuracy,
        perplexity: language_model.then(|| eval.loss.exp()),
        classes: eval.classes,
        weights: if use_ema { "ema" } else { "model" },
    })
}

impl EvalReport {
    /// The report as a table for people.
    pub fn to_table(&self) -> String {
        let mut out = format!("model     {}\ndata      {}\n", self.model.display(), self.data_dir.display());
        let what = if self.perplexity.is_some() { "tokens" } else { "examples" };
        out += &format!("{what:<9} {}\nloss      {:.6}\naccuracy  {:.4}\n", self.examples, self.loss, self.accuracy);
        if let Some(ppl) = self.perplexity {
            out += &format!("perplexity {ppl:.4}\n");
        }
        if let Some(classes) = &self.classes {
            out += &class_table(classes);
        }
        out
    }
}

/// Per-class precision/recall/F1, the macro averages and the confusion matrix.
fn class_table(c: &ClassMetrics) -> String {
    let mut out = String::from("\nclass  precision  recall     f1  support\n");
    for (k, row) in c.confusion.iter().enumerate() {
        let support: u64 = row.iter().sum();
        out += &format!("{k:>5}  {:>9.4}  {:>6.4}  {:>5.4}  {support:>7}\n", c.precision[k], c.recall[k], c.f1[k]);
    }
    out += &format!("macro  {:>9.4}  {:>6.4}  {:>5.4}\n", c.macro_precision, c.macro_recall, c.macro_f1);
    if let Some(b) = &c.binary {
        out += &format!(
            "binary F1 at 0.5 {:.4}, at the prior {:.3}: {:.4}, best {:.4} at {:.3}; average precision {:.4}\n",
            b.f1_at_half, b.prior_threshold, b.f1_at_prior, b.best_f1, b.best_threshold, b.average_precision
        );
    }
    out += "\nconfusion (rows: true class, columns: predicted)\n      ";
    for k in 0..c.confusion.len() {
        out += &format!("{k:>6}");
    }
    for (k, row) in c.confusion.iter().enumerate() {
        out += &format!("\n{k:>5} ");
        for count in row {
            out += &format!("{count:>6}");
        }
    }
    out.push('\n');
    out
}
