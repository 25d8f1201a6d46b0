//! One replica's training step. Data parallelism (T41) enters through `GradReducer`: the
//! loss gradient is a per-example **sum**, reduced (summed) across ranks, then divided by
//! the global batch once, so the update does not depend on how the batch was split.

use crate::distill::Teacher;
use crate::guards::{BlowupGuard, Ema, LossScaler};
use crate::trace;
use crate::{build, Result};
use lockstep_kernels::IGNORE_TARGET;
use lockstep_kernels::{Backend, MatmulPrecision};
use lockstep_nn::data::augment::Augment;
use lockstep_nn::data::text::Tokenizer;
use lockstep_nn::data::Examples;
use lockstep_nn::layers::StatSyncHandle;
use lockstep_nn::loss::{distillation_loss, softmax_cross_entropy};
use lockstep_nn::optim::{clip_factor, grad_sum_squares, Optimizer};
use lockstep_nn::schedule::Schedule;
use lockstep_nn::{ForwardCtx, Param, Sequential, Tensor};
use lockstep_proto::metrics::StageReport;
use lockstep_proto::toolbox::Dtype;
use lockstep_proto::trace::SpanKind;
use lockstep_proto::JobSpec;
use std::time::Instant;

/// Sums gradients and a few scalars across data-parallel ranks. Every rank must end with
/// identical bits.
pub trait GradReducer<B: Backend> {
    /// Called during backward as soon as `range` of the gradient of `param` (number `index`
    /// of `model.params()`) holds final local values; a bucketed reducer starts sending
    /// here. A parameter's pieces come in order.
    fn grad_ready(&mut self, _be: &B, _index: usize, _param: &Param<B>, _range: std::ops::Range<usize>) -> Result<()> {
        Ok(())
    }
    /// The size of the gradient pieces this reducer can use (`Layer::backward_in_pieces`):
    /// its bucket size when buckets may split a parameter; `usize::MAX` (whole) otherwise.
    fn grad_piece(&self) -> usize {
        usize::MAX
    }
    /// Every one of `params` (from number `first_index`) final, whole.
    fn grads_ready(&mut self, be: &B, first_index: usize, params: &[&Param<B>]) -> Result<()> {
        for (j, p) in params.iter().enumerate() {
            self.grad_ready(be, first_index + j, p, 0..p.numel())?;
        }
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
    /// Sums `values` over the data-parallel ranks in f32, uncompressed and apart from the
    /// gradient buckets (the exact integer limbs of `reproducible`).
    fn sum_f32(&mut self, values: &mut [f32]) -> Result<()>;
    /// Sums statistics across ranks from inside forward/backward (SyncBatchNorm); None
    /// with a single rank.
    fn stat_sync(&self) -> Option<StatSyncHandle> {
        None
    }
    /// The sharded side of a ZeRO reducer (`parallel.zero` ≥ 1); None otherwise.
    fn zero(&mut self) -> Option<&mut dyn ShardedReducer> {
        None
    }
    /// A reducer of other parameters (`param_sizes` in the same index space, None where it
    /// is not theirs) that shares this one's links: a GAN's discriminator's. Collectives of
    /// the two must not overlap: each finishes its step before the other starts.
    fn sibling(&self, param_sizes: &[Option<usize>]) -> Result<Box<dyn GradReducer<B>>>;
    /// Bytes this reducer holds for summed gradients (the summary's `gradient_buffer_bytes`).
    fn gradient_buffer_bytes(&self) -> u64 {
        0
    }
}

/// Backward of `layers` from `dy`, handing each layer's finished gradients to `reducer`.
/// Returns the gradient of the layers' input.
pub(crate) fn backward_into<B: Backend>(
    be: &B,
    model: &mut Sequential<B>,
    layers: std::ops::Range<usize>,
    dy: Tensor<B>,
    reducer: &mut dyn GradReducer<B>,
) -> Result<Tensor<B>> {
    // The hook's own error (a failed all-reduce) is kept whole, not flattened to text.
    let mut hook_error = None;
    let piece = reducer.grad_piece();
    let backward = model.backward_layers(be, layers, dy, piece, &mut |index, param, range| {
        reducer.grad_ready(be, index, param, range).map_err(|e| {
            hook_error = Some(e);
            lockstep_nn::NnError::HookFailed
        })
    });
    match hook_error {
        Some(e) => Err(e),
        None => Ok(backward?),
    }
}

/// ZeRO (T41, `parallel.zero`): each data-parallel rank owns one range of every parameter
/// (the ranges of all ranks partition it), holds the optimizer state of that range only and
/// updates it; the updated ranges are then all-gathered.
pub trait ShardedReducer {
    /// The range of each parameter (in `model.params()` order) this rank owns; empty for
    /// frozen parameters.
    fn shards(&self) -> &[std::ops::Range<usize>];
    /// After backward: this rank's range of every gradient summed over ranks (one vector
    /// per parameter, as long as its range), and `scalars` (as many as were staged) summed.
    fn finish_grad_shards(&mut self, scalars: &mut [f64]) -> Result<Vec<Vec<f32>>>;
    /// Every parameter whole, from each rank's values of its range: `shards[i]` is this
    /// rank's range of parameter i (the optimizer state for a checkpoint, the updated
    /// weights after a step).
    fn all_gather_shards(&mut self, shards: &[Vec<f32>]) -> Result<Vec<Vec<f32>>>;
    /// Sums a few f64 values over the ranks (the squared gradient norm of the shards).
    fn sum_f64(&mut self, values: &mut [f64]) -> Result<()>;
}

/// One stage of a pipeline (T42), implemented by `pipeline::PipelineStage`: a trainer that
/// holds one runs its steps and evaluation forwards through it, without knowing how.
pub trait Stage<B: Backend>: Send {
    /// This stage's index and the pipeline's number of stages.
    fn index(&self) -> usize;
    fn stages(&self) -> usize;
    /// A training step of this stage on the examples `local` of the global batch.
    fn step(
        &mut self,
        trainer: &mut Trainer<B>,
        data: &dyn Examples,
        local: &[u32],
        reducer: &mut dyn GradReducer<B>,
    ) -> Result<StepStats>;
    /// The eval-mode forward of `rows` examples through this stage: the logits on the last
    /// stage, None on the others (they passed their output on).
    fn eval_forward(
        &mut self,
        trainer: &mut Trainer<B>,
        rows: usize,
        batch: &lockstep_nn::data::Batch,
        ctx: &ForwardCtx,
    ) -> Result<Option<Tensor<B>>>;
    /// The last stage's evaluation, the same on every stage.
    fn share_evaluation(&mut self, eval: Evaluation, classes: Option<usize>) -> Result<Evaluation>;
    /// This stage's report for the summary.
    fn report(&self, rank: usize, replica: usize, layers: Vec<String>, params: usize) -> StageReport;
}

/// One evaluation's results.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    /// Targets evaluated: examples, or predicted tokens of a language model.
    pub targets: usize,
    pub classes: Option<lockstep_proto::classification::ClassMetrics>,
}

/// The reproducible mode's exact sums go through the step's reducer.
impl<B: Backend> crate::reproducible::SumF32 for &mut dyn GradReducer<B> {
    fn sum_f32(&mut self, values: &mut [f32]) -> Result<()> {
        GradReducer::sum_f32(&mut **self, values)
    }
}

/// World size 1: nothing to reduce.
pub struct NoReduce;

impl<B: Backend> GradReducer<B> for NoReduce {
    fn sibling(&self, _: &[Option<usize>]) -> Result<Box<dyn GradReducer<B>>> {
        Ok(Box::new(NoReduce))
    }
    fn stage_scalars(&mut self, _: &[f64]) {}
    fn finish_grads(&mut self, _: &B, _: &mut [&mut Param<B>], _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn sum_f32(&mut self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
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
    /// Why the update was not applied, if it was not: an fp16 overflow (the loss scale was
    /// halved) or a loss blow-up (T36).
    pub skipped: Option<Skip>,
    /// The loss scale this step ran with (1 without dynamic scaling).
    pub loss_scale: f32,
    /// Losses of the step's parts, named (a GAN's d_loss, g_loss, d_accuracy).
    pub parts: Vec<(&'static str, f64)>,
    /// Some rank was asked to stop (SIGTERM/SIGINT): every rank stops after this step.
    pub stop_requested: bool,
    /// Rank 0 asked for a checkpoint after this step (wall-clock period): every rank
    /// takes part at the same step.
    pub checkpoint_requested: bool,
}

/// Where a step's summed gradients are: in every parameter's `grad`, or (ZeRO) as this
/// rank's ranges, with the reducer that all-gathers the updated ranges.
enum Gradients<'a, B: Backend> {
    Whole,
    Shards(Vec<B::Buf>, &'a mut dyn ShardedReducer),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    /// Gradients overflowed under fp16 loss scaling: the scale was halved.
    Overflow,
    /// The blow-up guard's diagnosis: an outlier batch or a divergence.
    Blowup(crate::guards::Alarm),
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
    pub vocab: Option<Tokenizer>,
    /// Per-class loss weights (T28).
    pub class_weights: Option<Vec<f32>>,
    /// Dynamic loss scaling (T25, fp16).
    pub loss_scaler: Option<LossScaler>,
    /// Loss blow-up detection (T36).
    pub blowup: BlowupGuard,
    /// EMA of the weights (T23).
    pub ema: Option<Ema<B>>,
    /// Seeded augmentation of image batches (T27) and the image shape.
    augment: Option<(Augment, (usize, usize, usize))>,
    /// Binary tasks: minority/(minority+majority) of the training split (T28).
    pub prior_threshold: Option<f64>,
    /// This trainer is one stage of a pipeline (T42); the model holds its layers only.
    pub pipeline: Option<Box<dyn Stage<B>>>,
    /// This rank asks for a checkpoint after the next step (set by the step loop).
    pub checkpoint_wanted: bool,
    /// Knowledge distillation's teacher (T39).
    pub teacher: Option<Teacher<B>>,
    /// A GAN's two networks in `model` (T43).
    pub gan: Option<crate::gan::Gan<B>>,
}

impl<B: Backend> Trainer<B> {
    pub fn new(mut be: B, spec: &JobSpec, features: usize, classes: usize, total_steps: u64) -> Result<Self> {
        let precision = match spec.precision.compute {
            Dtype::Fp32 => MatmulPrecision::Fp32,
            Dtype::Bf16 => MatmulPrecision::Bf16,
            Dtype::Fp16 => MatmulPrecision::Fp16,
        };
        be.set_matmul_precision(precision)
            .map_err(|e| crate::WorkerError::Config(format!("precision.compute: {e}")))?;
        let (mut model, input_shape) = build::build_model(&be, spec, features, classes)?;
        let lr_scale = crate::finetune::prepare(&be, spec, &mut model)?;
        let mut optimizer = Optimizer::new(&be, build::optimizer_config(spec), &model.params())?;
        optimizer.lr_scale = lr_scale;
        let schedule = build::schedule(spec, total_steps);
        let p = &spec.precision;
        let loss_scaler = p.scaling().then(|| LossScaler::new(p.loss_scale, p.growth_interval));
        let ema =
            (spec.train.ema_decay > 0.0).then(|| Ema::new(&be, spec.train.ema_decay, &model.params())).transpose()?;
        let a = &spec.data.augment;
        let augment = match (a.enabled(), input_shape.as_slice()) {
            (false, _) => None,
            (true, &[h, w, c]) => Some((Augment { shift: a.shift, flip: a.flip }, (h, w, c))),
            (true, other) => {
                return Err(crate::WorkerError::Config(format!(
                    "data.augment needs image inputs [H, W, C]; this model takes {other:?} (use a sequential model with input_shape)"
                )))
            }
        };
        let teacher = Teacher::load(&be, spec, features, classes)?;
        let gan = crate::gan::Gan::of(spec, &model);
        Ok(Self {
            be,
            spec: spec.clone(),
            model,
            optimizer,
            schedule,
            global_step: 0,
            input_shape,
            vocab: None,
            class_weights: None,
            loss_scaler,
            blowup: BlowupGuard::new(crate::gan::blowup_spec(spec)),
            ema,
            augment,
            prior_threshold: None,
            pipeline: None,
            checkpoint_wanted: false,
            teacher,
            gan,
        })
    }

    /// The trainer of a job's training split: the model sized by its features and classes,
    /// its class weights and prior threshold (T28) from its labels, and the text's `vocab`.
    pub fn for_data(
        be: B,
        spec: &JobSpec,
        train: &dyn Examples,
        vocab: Option<Tokenizer>,
        total_steps: u64,
    ) -> Result<Self> {
        let mut trainer = Self::new(be, spec, train.features(), train.classes(), total_steps)?;
        if let Some(labels) = train.labels() {
            let counts = lockstep_nn::data::class_counts(labels, train.classes());
            trainer.class_weights = build::class_weights(spec, &counts)?;
        }
        trainer.prior_threshold = build::prior_threshold(train);
        trainer.vocab = vocab;
        Ok(trainer)
    }

    /// The batch of `rows` examples as a tensor of shape [rows, input_shape...].
    pub(crate) fn input(&self, rows: usize, x: &[f32]) -> Result<Tensor<B>> {
        let mut shape = vec![rows];
        shape.extend(&self.input_shape);
        Ok(Tensor::from_slice(&self.be, &shape, x)?)
    }

    /// Forward, backward, reduce, clip, update on this rank's `local` examples of a global
    /// batch. The loss is a mean over the global batch's targets (one per image, one per
    /// unpadded position of a sequence); their count is summed across ranks with the loss.
    pub fn step(&mut self, data: &dyn Examples, local: &[u32], reducer: &mut dyn GradReducer<B>) -> Result<StepStats> {
        if let Some(mut stage) = self.pipeline.take() {
            let stats = stage.step(self, data, local, reducer);
            self.pipeline = Some(stage);
            return stats;
        }
        if let Some(mut gan) = self.gan.take() {
            let stats = self.gan_step(&mut gan, data, local, reducer);
            self.gan = Some(gan);
            return stats;
        }
        crate::trace::set_step(self.global_step);
        self.model.zero_grad(&self.be)?;
        let (mut loss_sum, mut targets) = (0.0, 0usize);
        let [stop_vote, checkpoint_vote] = self.votes();
        let loss_scale = self.loss_scaler.as_ref().map_or(1.0, |s| s.scale);
        if !local.is_empty() {
            // Gradient accumulation (T41): the local examples in `accumulate` micro-batches,
            // whose gradients add up in place; only the last backward hands its (complete)
            // gradients to the reducer, so one all-reduce overlaps it.
            let micro = local.len().div_ceil(self.spec.train.accumulate.max(1));
            let micro_batches: Vec<&[u32]> = local.chunks(micro).collect();
            for (j, ids) in micro_batches.iter().enumerate() {
                let last = j + 1 == micro_batches.len();
                let micro = (micro_batches.len() > 1).then_some((j, micro_batches.len()));
                let (dlogits, micro_loss, micro_targets) = self.forward_loss(data, ids, micro, reducer, loss_scale)?;
                (loss_sum, targets) = (loss_sum + micro_loss, targets + micro_targets);
                let _backward = trace::span(SpanKind::Backward);
                if !last {
                    self.model.backward(&self.be, dlogits)?;
                    continue;
                }
                reducer.stage_scalars(&[loss_sum, targets as f64, stop_vote, checkpoint_vote]);
                let layers = 0..self.model.layers.len();
                backward_into(&self.be, &mut self.model, layers, dlogits, reducer)?;
            }
        } else {
            // No local examples this step: still take part in every collective, in order.
            reducer.stage_scalars(&[0.0, 0.0, stop_vote, checkpoint_vote]);
            let params = self.model.params();
            reducer.grads_ready(&self.be, 0, &params)?;
        }
        let mut scalars = [loss_sum, targets as f64, stop_vote, checkpoint_vote];
        let waiting = (Instant::now(), trace::span(SpanKind::AllReduceWait));
        let mut stats = if let Some(zero) = reducer.zero() {
            let grads = zero.finish_grad_shards(&mut scalars)?;
            let comm_wait_s = waiting.0.elapsed().as_secs_f64();
            drop(waiting);
            self.update_shards(zero, grads, [scalars[0], scalars[1]], comm_wait_s, loss_scale)?
        } else {
            let be = &self.be;
            let mut params = self.model.params_mut();
            reducer.finish_grads(be, &mut params, &mut scalars)?;
            let comm_wait_s = waiting.0.elapsed().as_secs_f64();
            drop(waiting);
            let squared_norm = grad_sum_squares(be, &params)?;
            drop(params);
            self.apply_update([scalars[0], scalars[1]], squared_norm, comm_wait_s, loss_scale)?
        };
        // The votes are summed like the loss: all ranks see the same total.
        stats.stop_requested = scalars[2] > 0.5;
        stats.checkpoint_requested = scalars[3] > 0.5;
        Ok(stats)
    }

    /// A step in `train.reproducible = "any-world-size"` mode on this rank's `shards` of the
    /// global batch (`total_shards` of them over all ranks): each shard's gradient alone,
    /// all of them summed exactly (see `reproducible`), then the update as in `step`.
    pub fn step_shards(
        &mut self,
        data: &dyn Examples,
        shards: &[&[u32]],
        total_shards: usize,
        mut reducer: &mut dyn GradReducer<B>,
    ) -> Result<StepStats> {
        crate::trace::set_step(self.global_step);
        let votes = self.votes().map(|v| v as f32);
        let loss_scale = self.loss_scaler.as_ref().map_or(1.0, |s| s.scale);
        // One tensor per parameter (empty if frozen), then the loss sum and the target count.
        let mut lens: Vec<usize> =
            self.model.params().iter().map(|p| if p.trainable { p.numel() } else { 0 }).collect();
        let mut tensors: Vec<Vec<Vec<f32>>> = vec![Vec::new(); lens.len() + 2];
        for ids in shards {
            self.model.zero_grad(&self.be)?;
            let (dlogits, loss, targets) = self.forward_loss(data, ids, None, reducer, loss_scale)?;
            let _backward = trace::span(SpanKind::Backward);
            self.model.backward(&self.be, dlogits)?;
            for (t, p) in self.model.params().iter().enumerate() {
                let grad = if p.trainable { self.be.download(&p.grad)? } else { Vec::new() };
                tensors[t].push(grad);
            }
            // The loss in f32 is for the report and the blow-up guard; the count is exact.
            tensors[lens.len()].push(vec![loss as f32]);
            tensors[lens.len() + 1].push(vec![targets as f32]);
        }
        lens.extend([1, 1]);
        let waiting = (Instant::now(), trace::span(SpanKind::AllReduceWait));
        let sums = crate::reproducible::exact_sum(&tensors, &lens, total_shards, &mut reducer)?;
        let mut summed_votes = votes;
        reducer.sum_f32(&mut summed_votes)?;
        let comm_wait_s = waiting.0.elapsed().as_secs_f64();
        drop(waiting);
        let be = &self.be;
        let mut params = self.model.params_mut();
        for (p, grad) in params.iter_mut().zip(&sums).filter(|(p, _)| p.trainable) {
            p.grad = be.upload(&grad.iter().map(|&g| g as f32).collect::<Vec<_>>())?;
        }
        let squared_norm = grad_sum_squares(be, &params)?;
        drop(params);
        let (loss_sum, targets) = (sums[lens.len() - 2][0], sums[lens.len() - 1][0]);
        let mut stats = self.apply_update([loss_sum, targets], squared_norm, comm_wait_s, loss_scale)?;
        stats.stop_requested = summed_votes[0] > 0.5;
        stats.checkpoint_requested = summed_votes[1] > 0.5;
        Ok(stats)
    }

    /// This rank's votes, summed across ranks with the step's scalars so every rank acts on
    /// the same step: to stop (a preemption or a rescale) and to checkpoint (rank 0's clock).
    pub(crate) fn votes(&self) -> [f64; 2] {
        let stop = lockstep_proto::preempt::requested().is_some();
        [f64::from(u8::from(stop)), f64::from(u8::from(self.checkpoint_wanted))]
    }

    /// The forward pass and loss of the micro-batch `ids`: d(loss)/d(logits) (carrying the
    /// loss scale, T25; the update divides it out), the loss sum and the target count.
    /// `micro_batch` is its (index, count) in the step under gradient accumulation.
    fn forward_loss(
        &mut self,
        data: &dyn Examples,
        ids: &[u32],
        micro_batch: Option<(usize, usize)>,
        reducer: &mut dyn GradReducer<B>,
        loss_scale: f32,
    ) -> Result<(Tensor<B>, f64, usize)> {
        let batch = self.gather(data, ids);
        let targets = batch.y.iter().filter(|&&y| y != IGNORE_TARGET).count();
        let ctx = ForwardCtx {
            train: true,
            seed: self.spec.seed,
            step: self.global_step,
            example_ids: ids.iter().map(|&i| i as u64).collect(),
            seq_lens: batch.seq_lens,
            stat_sync: reducer.stat_sync(),
            micro_batch,
            decode_from: None,
        };
        let input = self.input(ids.len(), &batch.x)?; // (B, F), (B, H, W, C) or (B, T)
        let _forward = trace::span(SpanKind::Forward);
        let soft_targets = self.teacher.as_mut().map(|t| t.logits(&self.be, &input, &ctx)).transpose()?;
        let logits = self.model.forward(&self.be, input, &ctx)?; // (B, classes) or (B, T, vocab)
        let weights = self.class_weights.as_deref();
        let out = match (&self.teacher, soft_targets) {
            (Some(t), Some(teacher)) => {
                distillation_loss(&self.be, &logits, &teacher, &batch.y, weights, t.loss, loss_scale)?
            }
            _ => softmax_cross_entropy(&self.be, &logits, &batch.y, weights, loss_scale)?,
        };
        Ok((out.grad, out.loss_sum, targets))
    }

    /// The batch of examples `indices`, augmented when the job asks for it (T27).
    pub(crate) fn gather(&self, data: &dyn Examples, indices: &[u32]) -> lockstep_nn::data::Batch {
        let mut batch = data.gather(indices);
        if let Some((augment, shape)) = &self.augment {
            let ids: Vec<u64> = indices.iter().map(|&i| i as u64).collect();
            augment.apply(&mut batch.x, &ids, *shape, self.spec.seed, self.global_step);
        }
        batch
    }

    /// The end of a ZeRO step: `grads` holds this rank's summed range of every gradient.
    /// The squared norm is summed over the ranks' ranges; the update moves this rank's
    /// ranges, which are then all-gathered.
    fn update_shards(
        &mut self,
        zero: &mut dyn ShardedReducer,
        grads: Vec<Vec<f32>>,
        scalars: [f64; 2],
        comm_wait_s: f64,
        loss_scale: f32,
    ) -> Result<StepStats> {
        let mut squared_norm = [grads.iter().flatten().map(|&g| g as f64 * g as f64).sum::<f64>()];
        zero.sum_f64(&mut squared_norm)?;
        let grads = grads.iter().map(|g| self.be.upload(g)).collect::<std::result::Result<Vec<_>, _>>()?;
        let all = 0..self.model.params().len();
        self.update_with(scalars, squared_norm[0], comm_wait_s, loss_scale, Gradients::Shards(grads, zero), all)
    }

    /// The end of every step, once the gradients are summed over all ranks: `scalars` =
    /// [loss sum, target count] of the global batch, `squared_norm` = ‖Σ grad‖² over the
    /// whole model. Loss scaling, blow-up check, clip, update and EMA.
    pub(crate) fn apply_update(
        &mut self,
        scalars: [f64; 2],
        squared_norm: f64,
        comm_wait_s: f64,
        loss_scale: f32,
    ) -> Result<StepStats> {
        let all = 0..self.model.params().len();
        self.update_with(scalars, squared_norm, comm_wait_s, loss_scale, Gradients::Whole, all)
    }

    /// `apply_update` of the parameters `range` alone (a GAN's generator).
    pub(crate) fn apply_update_of(
        &mut self,
        range: std::ops::Range<usize>,
        scalars: [f64; 2],
        squared_norm: f64,
        comm_wait_s: f64,
    ) -> Result<StepStats> {
        self.update_with(scalars, squared_norm, comm_wait_s, 1.0, Gradients::Whole, range)
    }

    fn update_with(
        &mut self,
        scalars: [f64; 2],
        squared_norm: f64,
        comm_wait_s: f64,
        loss_scale: f32,
        grads: Gradients<'_, B>,
        range: std::ops::Range<usize>,
    ) -> Result<StepStats> {
        let be = &self.be;
        let mut params = self.model.params_mut();
        let _optimizer = trace::span(SpanKind::Optimizer);
        let global_targets = scalars[1].max(1.0);
        // The gradients hold per-target sums times the loss scale; the mean, the unscaling
        // and the clip factor are applied inside the update (one pass instead of three).
        let unscale = global_targets * loss_scale as f64;
        let grad_norm = squared_norm.sqrt() / unscale;
        let loss = scalars[0] / global_targets;
        let lr = self.schedule.lr(self.global_step);
        let mut stats = StepStats {
            loss,
            grad_norm,
            lr,
            targets: global_targets,
            comm_wait_s,
            skipped: None,
            loss_scale,
            parts: Vec::new(),
            stop_requested: false,
            checkpoint_requested: false,
        };
        self.global_step += 1;
        if let Some(scaler) = &mut self.loss_scaler {
            if !scaler.update(grad_norm.is_finite()) {
                stats.skipped = Some(Skip::Overflow);
                return Ok(stats);
            }
        }
        if let Some(alarm) = self.blowup.check(loss, grad_norm, lr) {
            stats.skipped = Some(Skip::Blowup(alarm));
            return Ok(stats);
        }
        let scale = clip_factor(grad_norm, self.spec.optim.clip_norm) / unscale;
        match grads {
            Gradients::Whole => {
                self.optimizer.update_range(be, &mut params, range, lr, scale as f32)?;
                self.optimizer.step += 1;
            }
            Gradients::Shards(grads, zero) => {
                self.optimizer.step_shards(be, &mut params, grads, lr, scale as f32)?;
                crate::zero::all_gather_params(be, zero, &mut params)?;
            }
        }
        if let Some(ema) = &mut self.ema {
            ema.update(be, &params)?;
        }
        be.check()?;
        Ok(stats)
    }
}
