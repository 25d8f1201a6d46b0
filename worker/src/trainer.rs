//! One replica's training step. Data parallelism (T41) enters through `GradReducer`: the
//! loss gradient is a per-example **sum**, reduced (summed) across ranks, then divided by
//! the global batch once, so the update does not depend on how the batch was split.

use crate::trace;
use crate::{build, Result};
use lockstep_kernels::Backend;
use lockstep_kernels::IGNORE_TARGET;
use lockstep_nn::data::text::CharTokenizer;
use lockstep_nn::data::Examples;
use lockstep_nn::layers::StatSyncHandle;
use lockstep_nn::loss::softmax_cross_entropy;
use lockstep_nn::optim::{clip_factor, global_grad_norm, Optimizer};
use lockstep_nn::schedule::Schedule;
use lockstep_nn::{ForwardCtx, Param, Sequential, Tensor};
use lockstep_proto::trace::SpanKind;
use lockstep_proto::JobSpec;
use std::time::Instant;

/// Sums gradients and a few scalars across data-parallel ranks. Every rank must end with
/// identical bits.
pub trait GradReducer<B: Backend> {
    /// Called during backward as soon as `params` (starting at `first_index` of
    /// `model.params()`) hold final local gradients; a bucketed reducer starts sending here.
    fn grads_ready(&mut self, _be: &B, _first_index: usize, _params: &[&Param<B>]) -> Result<()> {
        Ok(())
    }
    /// Called once per step before backward with a few values to sum across ranks (the
    /// loss and the target count). A bucketed reducer sends them with the last gradient
    /// bucket, so they cost no extra collective: on a link with latency that halves the
    /// round trips of a step.
    fn stage_scalars(&mut self, values: &[f64]);
    /// After backward: every trainable gradient replaced by its sum over ranks, and
    /// `scalars` (as many as were staged) by their sums.
    fn finish_grads(&mut self, be: &B, params: &mut [&mut Param<B>], scalars: &mut [f64]) -> Result<()>;
    /// Sums statistics across ranks from inside forward/backward (SyncBatchNorm); None
    /// with a single rank.
    fn stat_sync(&self) -> Option<StatSyncHandle> {
        None
    }
}

/// World size 1: nothing to reduce.
pub struct NoReduce;

impl<B: Backend> GradReducer<B> for NoReduce {
    fn stage_scalars(&mut self, _: &[f64]) {}
    fn finish_grads(&mut self, _: &B, _: &mut [&mut Param<B>], _: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Global gradient norm (of the batch-mean gradient) before clipping.
    pub grad_norm: f64,
    pub lr: f32,
    /// Targets in the global batch: the gradients hold sums over them.
    pub targets: f64,
    /// Seconds this step waited for communication after backward (exposed all-reduce time).
    pub comm_wait_s: f64,
}

pub struct Trainer<B: Backend> {
    pub be: B,
    pub spec: JobSpec,
    pub model: Sequential<B>,
    pub optimizer: Optimizer<B>,
    pub schedule: Schedule,
    /// Steps taken so far; the next step is number `global_step`.
    pub global_step: u64,
    /// Shape of one input example ([F], [H, W, C] or [T] token ids).
    pub input_shape: Vec<usize>,
    /// The tokenizer of a language model's text, saved with its weights.
    pub vocab: Option<CharTokenizer>,
}

impl<B: Backend> Trainer<B> {
    pub fn new(be: B, spec: &JobSpec, features: usize, classes: usize, total_steps: u64) -> Result<Self> {
        let (model, input_shape) = build::build_model(&be, spec, features, classes)?;
        let optimizer = Optimizer::new(&be, build::optimizer_config(spec), &model.params());
        let schedule = build::schedule(spec, total_steps);
        Ok(Self { be, spec: spec.clone(), model, optimizer, schedule, global_step: 0, input_shape, vocab: None })
    }

    /// The batch of `rows` examples as a tensor of shape [rows, input_shape...].
    fn input(&self, rows: usize, x: &[f32]) -> Tensor<B> {
        let mut shape = vec![rows];
        shape.extend(&self.input_shape);
        Tensor::from_slice(&self.be, &shape, x)
    }

    /// Forward, backward, reduce, clip, update on this rank's `local` examples of a global
    /// batch. The loss is a mean over the global batch's targets (one per image, one per
    /// unpadded position of a sequence); their count is summed across ranks with the loss.
    pub fn step(&mut self, data: &dyn Examples, local: &[u32], reducer: &mut dyn GradReducer<B>) -> Result<StepStats> {
        let be = &self.be;
        crate::trace::set_step(self.global_step);
        self.model.zero_grad(be);
        let (mut loss_sum, mut targets) = (0.0, 0usize);
        if !local.is_empty() {
            let batch = data.gather(local);
            targets = batch.y.iter().filter(|&&y| y != IGNORE_TARGET).count();
            let ctx = ForwardCtx {
                train: true,
                seed: self.spec.seed,
                step: self.global_step,
                example_ids: local.iter().map(|&i| i as u64).collect(),
                seq_lens: batch.seq_lens,
                stat_sync: reducer.stat_sync(),
            };
            let input = self.input(local.len(), &batch.x); // (B, F), (B, H, W, C) or (B, T)
            let forward = trace::span(SpanKind::Forward);
            let logits = self.model.forward(be, input, &ctx)?; // (B, classes) or (B, T, vocab)
            let out = softmax_cross_entropy(be, &logits, &batch.y, None, 1.0)?;
            drop(forward);
            loss_sum = out.loss_sum;
            reducer.stage_scalars(&[loss_sum, targets as f64]);
            let _backward = trace::span(SpanKind::Backward);
            self.model.backward_with_hook(be, out.grad, &mut |first, params| {
                reducer.grads_ready(be, first, params).map_err(|e| lockstep_nn::NnError::Invalid(e.to_string()))
            })?;
        } else {
            // No local examples this step: still take part in every collective, in order.
            reducer.stage_scalars(&[0.0, 0.0]);
            let params = self.model.params();
            reducer.grads_ready(be, 0, &params)?;
        }
        let mut params = self.model.params_mut();
        let mut scalars = [loss_sum, targets as f64];
        let waiting = (Instant::now(), trace::span(SpanKind::AllReduceWait));
        reducer.finish_grads(be, &mut params, &mut scalars)?;
        let comm_wait_s = waiting.0.elapsed().as_secs_f64();
        drop(waiting);
        let _optimizer = trace::span(SpanKind::Optimizer);
        let global_targets = scalars[1].max(1.0);
        // The gradients hold per-target sums; the mean and the clip factor are applied
        // inside the update (one pass over the parameters instead of three).
        let grad_norm = global_grad_norm(be, &params) / global_targets;
        let scale = clip_factor(grad_norm, self.spec.optim.clip_norm) / global_targets;
        let lr = self.schedule.lr(self.global_step);
        self.optimizer.step_scaled(be, &mut params, lr, scale as f32);
        be.check().map_err(crate::WorkerError::Device)?;
        self.global_step += 1;
        Ok(StepStats { loss: scalars[0] / global_targets, grad_norm, lr, targets: global_targets, comm_wait_s })
    }

    /// Mean loss and accuracy per target over `data` in eval mode (no dropout, no caches).
    pub fn evaluate(&mut self, data: &dyn Examples) -> Result<(f64, f64)> {
        let be = &self.be;
        let (mut loss, mut correct, mut targets) = (0.0, 0usize, 0usize);
        let indices: Vec<u32> = (0..data.len() as u32).collect();
        // About 64k values of input per chunk: bounded memory for images and sequences alike.
        let chunk = (65_536 / data.features().max(1)).clamp(1, 1000);
        for chunk in indices.chunks(chunk) {
            let batch = data.gather(chunk);
            let ctx = ForwardCtx {
                train: false,
                seed: self.spec.seed,
                step: self.global_step,
                seq_lens: batch.seq_lens,
                ..Default::default()
            };
            let input = self.input(chunk.len(), &batch.x);
            let logits = self.model.forward(be, input, &ctx)?;
            let out = softmax_cross_entropy(be, &logits, &batch.y, None, 1.0)?;
            loss += out.loss_sum;
            correct += out.correct;
            targets += batch.y.iter().filter(|&&y| y != IGNORE_TARGET).count();
        }
        let n = targets.max(1) as f64;
        Ok((loss / n, correct as f64 / n))
    }
}
