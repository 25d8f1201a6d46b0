//! Evaluation (eval mode: no dropout, no caches): mean loss and accuracy per target, and
//! for classifiers the confusion matrix with precision/recall/F1 (T32). One path for plain
//! and pipelined models: under a pipeline the last stage tallies and every stage returns
//! its numbers.

use crate::{Result, Trainer};
use lockstep_kernels::{Backend, IGNORE_TARGET};
use lockstep_nn::data::{Batch, Examples};
use lockstep_nn::loss::softmax_cross_entropy;
use lockstep_nn::{ForwardCtx, Tensor};
use lockstep_proto::classification::{BinaryMetrics, ClassMetrics};

pub use crate::trainer::Evaluation;

impl<B: Backend> Trainer<B> {
    /// Evaluates the model on all of `data`.
    pub fn evaluate(&mut self, data: &dyn Examples) -> Result<Evaluation> {
        if let Some(gan) = self.gan.take() {
            let eval = self.evaluate_gan(&gan, data);
            self.gan = Some(gan);
            return eval;
        }
        let classes = self.vocab.is_none().then(|| data.classes());
        let mut tally = Tally::new(classes);
        let indices: Vec<u32> = (0..data.len() as u32).collect();
        for chunk in indices.chunks(eval_chunk_len(data)) {
            let batch = data.gather(chunk);
            if let Some(logits) = self.eval_forward(chunk, &batch)? {
                tally.add(&self.be, &logits, &batch.y)?;
            }
        }
        let eval = tally.finish(self.prior_threshold);
        match self.pipeline.as_mut() {
            Some(pipe) => pipe.share_evaluation(eval, classes),
            None => Ok(eval),
        }
    }

    /// `evaluate` with the bias-corrected EMA weights swapped in (T23); the training
    /// weights are put back afterwards.
    pub fn evaluate_ema(&mut self, data: &dyn Examples) -> Result<Evaluation> {
        let Some(ema) = &self.ema else { return self.evaluate(data) };
        let averaged = ema.corrected(&self.be)?;
        let mut saved = Vec::new();
        for (p, avg) in self.model.params_mut().into_iter().zip(averaged) {
            saved.push(std::mem::replace(&mut p.value, avg));
        }
        let result = self.evaluate(data);
        for (p, value) in self.model.params_mut().into_iter().zip(saved) {
            p.value = value;
        }
        result
    }

    /// The logits of the examples `ids` (gathered in `batch`); None on a pipeline stage
    /// that is not the last (it passed its output on).
    fn eval_forward(&mut self, ids: &[u32], batch: &Batch) -> Result<Option<Tensor<B>>> {
        let ctx = ForwardCtx {
            train: false,
            seed: self.spec.seed,
            step: self.global_step,
            example_ids: ids.iter().map(|&i| i as u64).collect(),
            seq_lens: batch.seq_lens.clone(),
            ..Default::default()
        };
        let Some(mut pipe) = self.pipeline.take() else {
            let input = self.input(ids.len(), &batch.x)?;
            return Ok(Some(self.model.forward(&self.be, input, &ctx)?));
        };
        let result = pipe.eval_forward(self, ids.len(), batch, &ctx);
        self.pipeline = Some(pipe);
        result
    }
}

/// Examples per evaluation chunk: about 64k input values, so memory stays bounded for
/// images and sequences alike.
pub(crate) fn eval_chunk_len(data: &dyn Examples) -> usize {
    (65_536 / data.features().max(1)).clamp(1, 1000)
}

/// Loss, correct predictions and targets summed over chunks, and the class statistics.
struct Tally {
    loss: f64,
    correct: usize,
    targets: usize,
    classes: Option<ClassCollector>,
}

impl Tally {
    fn new(classes: Option<usize>) -> Self {
        Self { loss: 0.0, correct: 0, targets: 0, classes: classes.map(ClassCollector::new) }
    }

    fn add<B: Backend>(&mut self, be: &B, logits: &Tensor<B>, targets: &[u32]) -> Result<()> {
        let out = softmax_cross_entropy(be, logits, targets, None, 1.0)?;
        if let Some(collector) = self.classes.as_mut() {
            collector.add(&be.download(&logits.buf)?, targets);
        }
        self.loss += out.loss_sum;
        self.correct += out.correct;
        self.targets += targets.iter().filter(|&&y| y != IGNORE_TARGET).count();
        Ok(())
    }

    fn finish(self, prior_threshold: Option<f64>) -> Evaluation {
        let n = self.targets.max(1) as f64;
        let classes = self.classes.map(|c| c.finish(prior_threshold));
        Evaluation { loss: self.loss / n, accuracy: self.correct as f64 / n, targets: self.targets, classes }
    }
}

/// An evaluation as f64s of a length every pipeline stage knows from the class count:
/// loss, accuracy, targets, then (classifiers) the confusion matrix and the binary
/// metrics (a presence flag and six values). Counts stay exact below 2^53.
pub(crate) fn evaluation_to_f64s(eval: &Evaluation, classes: Option<usize>) -> Vec<f64> {
    let mut out = vec![eval.loss, eval.accuracy, eval.targets as f64];
    let Some(k) = classes else { return out };
    let metrics = eval.classes.as_ref();
    for t in 0..k {
        for p in 0..k {
            out.push(metrics.map_or(0.0, |m| m.confusion[t][p] as f64));
        }
    }
    match metrics.and_then(|m| m.binary.as_ref()) {
        Some(b) => out.extend([
            1.0,
            b.f1_at_half,
            b.prior_threshold,
            b.f1_at_prior,
            b.best_threshold,
            b.best_f1,
            b.average_precision,
        ]),
        None => out.extend([0.0; 7]),
    }
    out
}

/// The inverse of [`evaluation_to_f64s`].
pub(crate) fn evaluation_from_f64s(values: &[f64], classes: Option<usize>) -> Evaluation {
    let mut eval = Evaluation { loss: values[0], accuracy: values[1], targets: values[2] as usize, classes: None };
    let Some(k) = classes else { return eval };
    let confusion = (0..k).map(|t| (0..k).map(|p| values[3 + t * k + p] as u64).collect()).collect();
    let mut metrics = ClassMetrics::from_confusion(confusion);
    let b = &values[3 + k * k..];
    if b[0] > 0.5 {
        metrics.binary = Some(BinaryMetrics {
            f1_at_half: b[1],
            prior_threshold: b[2],
            f1_at_prior: b[3],
            best_threshold: b[4],
            best_f1: b[5],
            average_precision: b[6],
        });
    }
    eval.classes = Some(metrics);
    eval
}

/// Gathers argmax predictions (and p(class 1) for binary tasks) over an evaluation.
struct ClassCollector {
    confusion: Vec<Vec<u64>>,
    positive_scores: Vec<f32>,
    positive: Vec<bool>,
}

impl ClassCollector {
    fn new(classes: usize) -> Self {
        Self { confusion: vec![vec![0; classes]; classes], positive_scores: Vec::new(), positive: Vec::new() }
    }

    /// `logits` (rows, classes) row-major.
    fn add(&mut self, logits: &[f32], targets: &[u32]) {
        let k = self.confusion.len();
        for (row, &t) in logits.chunks_exact(k).zip(targets) {
            if t == IGNORE_TARGET {
                continue;
            }
            let predicted = row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
            self.confusion[t as usize][predicted] += 1;
            if k == 2 {
                // p(1) = σ(z1 − z0)
                self.positive_scores.push(1.0 / (1.0 + (row[0] - row[1]).exp()));
                self.positive.push(t == 1);
            }
        }
    }

    fn finish(self, prior_threshold: Option<f64>) -> ClassMetrics {
        let mut metrics = ClassMetrics::from_confusion(self.confusion);
        if !self.positive.is_empty() {
            let prior = prior_threshold.unwrap_or(0.5);
            metrics.binary = Some(BinaryMetrics::of(&self.positive_scores, &self.positive, prior));
        }
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evaluation_survives_its_f64_form() {
        let mut classes = ClassMetrics::from_confusion(vec![vec![5, 1], vec![2, 7]]);
        classes.binary = Some(BinaryMetrics {
            f1_at_half: 0.8,
            prior_threshold: 0.4,
            f1_at_prior: 0.81,
            best_threshold: 0.45,
            best_f1: 0.83,
            average_precision: 0.9,
        });
        let eval = Evaluation { loss: 0.25, accuracy: 12.0 / 15.0, targets: 15, classes: Some(classes) };
        assert_eq!(evaluation_from_f64s(&evaluation_to_f64s(&eval, Some(2)), Some(2)), eval);
        let lm = Evaluation { loss: 1.5, accuracy: 0.4, targets: 640, classes: None };
        assert_eq!(evaluation_from_f64s(&evaluation_to_f64s(&lm, None), None), lm);
    }
}
