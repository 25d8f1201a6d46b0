//! Early stopping (T24): watch an evaluation metric, keep the best model (weights plus a
//! small metadata file) and stop after `patience` evaluations without improvement.

use crate::evaluation::Evaluation;
use crate::trainer::Trainer;
use crate::{model_file, Result, WorkerError};
use lockstep_kernels::Backend;
use lockstep_proto::metrics::BestRecord;
use lockstep_proto::toolbox::{EarlyStopSpec, StopMetric};
use std::path::{Path, PathBuf};

pub struct EarlyStop {
    spec: EarlyStopSpec,
    /// The best evaluation so far: (step, metric value).
    best: Option<(u64, f64)>,
    bad_evals: usize,
    pub stopped: bool,
}

impl EarlyStop {
    pub fn new(spec: EarlyStopSpec) -> Self {
        Self { spec, best: None, bad_evals: 0, stopped: false }
    }

    /// The watched value of an evaluation; NaN if it has none (F1 of a language model).
    pub fn value(&self, eval: &Evaluation) -> f64 {
        match self.spec.metric {
            StopMetric::Loss => eval.loss,
            StopMetric::Accuracy => eval.accuracy,
            StopMetric::F1 => eval.classes.as_ref().map_or(f64::NAN, |c| c.macro_f1),
        }
    }

    fn better(&self, value: f64, than: f64) -> bool {
        match self.spec.metric {
            StopMetric::Loss => value < than - self.spec.min_delta,
            StopMetric::Accuracy | StopMetric::F1 => value > than + self.spec.min_delta,
        }
    }

    /// Records the evaluation at `step`; returns whether it is the new best.
    pub fn observe(&mut self, step: u64, eval: &Evaluation) -> bool {
        let value = self.value(eval);
        let improved = value.is_finite() && self.best.is_none_or(|(_, best)| self.better(value, best));
        if improved {
            self.best = Some((step, value));
            self.bad_evals = 0;
        } else {
            self.bad_evals += 1;
            self.stopped = self.bad_evals >= self.spec.patience;
        }
        improved
    }

    pub fn best_record(&self) -> Option<BestRecord> {
        self.best.map(|(step, value)| BestRecord {
            step,
            metric: format!("{:?}", self.spec.metric).to_lowercase(),
            value,
            stopped_early: self.stopped,
        })
    }
}

/// After an evaluation: updates `early_stop`; rank 0 writes a new best model to
/// `best_dir/model.safetensors` and `best_dir/best.json`. True means stop training now.
pub fn early_stopping<B: Backend>(
    trainer: &Trainer<B>,
    early_stop: &mut Option<EarlyStop>,
    eval: Option<&Evaluation>,
    rank: usize,
    best_dir: &Option<PathBuf>,
) -> Result<bool> {
    let (Some(es), Some(eval)) = (early_stop.as_mut(), eval) else { return Ok(false) };
    let step = trainer.global_step;
    if es.observe(step, eval) {
        if let (0, Some(dir)) = (rank, best_dir) {
            save_best(trainer, dir, es.best_record())?;
        }
    } else if es.stopped {
        let best = es.best_record();
        tracing::info!(
            "early stopping at step {step}: no improvement of {} for {} evaluations; best {:?}",
            es.value(eval),
            es.spec.patience,
            best
        );
    }
    Ok(es.stopped)
}

fn save_best<B: Backend>(trainer: &Trainer<B>, dir: &Path, record: Option<BestRecord>) -> Result<()> {
    let io = |source| WorkerError::Io { what: "best-model directory", path: dir.into(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    model_file::save_model(trainer, &dir.join("model.safetensors"))?;
    let json = serde_json::to_string_pretty(&record)
        .map_err(|e| WorkerError::Internal(format!("best.json does not serialise: {e}")))?;
    lockstep_nn::checkpoint::write_atomic(&dir.join("best.json"), json.as_bytes())?;
    tracing::info!("new best model at step {}: {}", trainer.global_step, dir.display());
    Ok(())
}
