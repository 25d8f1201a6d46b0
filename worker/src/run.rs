//! The epoch/step loop shared by `lockstep train` and the worker daemon. It reports what
//! happens through `RunEvent`s; the caller writes them (metrics.jsonl, progress bar) or
//! sends them to the coordinator.

use crate::cost;
use crate::early_stop::{early_stopping, EarlyStop};
use crate::evaluation::Evaluation;
use crate::grad_health;
use crate::guards::Alarm;
use crate::pipeline::PipelineStage;
use crate::trainer::{GradReducer, Skip, StepStats, Trainer};
use crate::{build, train_state, Result};
use lockstep_kernels::Backend;
use lockstep_nn::data::{rank_slice, EpochSampler, Examples, Remainder};
use lockstep_nn::data::{BalancedOrder, Rebalance};
use lockstep_nn::optim::sparsity;
use lockstep_proto::job::{Remainder as SpecRemainder, Reproducible};
use lockstep_proto::toolbox::{BlowupAction, Dtype, Resample};
use lockstep_proto::trace::SpanKind;
use lockstep_proto::{EvalRecord, Histogram, JobSpec, NamedValue, Summary, TrainRecord};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub enum RunEvent {
    /// Training is about to start: total steps, parameter count, forward FLOPs/example and
    /// the hash of the initial weights (compared across ranks before step 0).
    Start {
        total_steps: u64,
        params: usize,
        flops_per_example: u64,
        init_weight_hash: u64,
    },
    /// After every step (cheap); every `log_every` steps `report` is set.
    Step {
        step: u64,
        loss: f64,
        /// Examples in the global batch, the step's wall time and its exposed communication.
        examples: usize,
        step_s: f64,
        comm_wait_s: f64,
        report: Option<StepReport>,
    },
    Eval(EvalRecord),
}

/// What a logged step reports: the metrics line, the weight hash (compared across ranks)
/// and, on rank 0, per-layer gradient histograms.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub record: TrainRecord,
    pub weight_hash: u64,
    pub grad_histograms: Vec<(String, Histogram)>,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub rank: usize,
    pub world: usize,
    /// Rank 0 writes training checkpoints here every `train.checkpoint_every` steps, when
    /// stopped early and at the end.
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from this checkpoint (see `train_state`).
    pub resume: Option<PathBuf>,
    /// Stop after this many steps as if preempted (the schedule still spans the whole run).
    pub stop_after: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { rank: 0, world: 1, checkpoint_dir: None, resume: None, stop_after: None }
    }
}

/// Makes the gradient reducer once the model exists: it gets each parameter's element count
/// (`None` for frozen parameters).
pub type ReducerFactory<'a, B> = Box<dyn FnOnce(&[Option<usize>]) -> Result<Box<dyn GradReducer<B>>> + 'a>;

/// Trains `spec` as rank `opts.rank` of `opts.world` and returns the run summary. An error
/// from `on_event` stops the run (the coordinator aborted it).
pub fn run_training<B: Backend>(
    be: B,
    spec: &JobSpec,
    opts: RunOptions,
    make_reducer: ReducerFactory<'_, B>,
    on_event: &mut dyn FnMut(RunEvent) -> Result<()>,
) -> Result<(Summary, Trainer<B>)> {
    run_training_stage(be, spec, opts, None, make_reducer, on_event)
}

/// `run_training` for one stage of a pipeline (T42) when `stage` is set: rank r is stage
/// r mod P of data-parallel replica r div P; the reducer sums over the stage's replicas.
/// Four phases: prepare (data, trainer, stage, reducer, resume), start, the epochs of
/// steps with their hooks (guards, logging, checkpoints, evaluation), finish (summary).
pub fn run_training_stage<B: Backend>(
    be: B,
    spec: &JobSpec,
    opts: RunOptions,
    stage: Option<PipelineStage>,
    make_reducer: ReducerFactory<'_, B>,
    on_event: &mut dyn FnMut(RunEvent) -> Result<()>,
) -> Result<(Summary, Trainer<B>)> {
    let setup = prepare(be, spec, &opts, stage, make_reducer)?;
    let mut run = Run::start(spec, opts, setup, on_event)?;
    run.train_epochs()?;
    run.finish()
}

/// What `prepare` sets up once.
struct Setup<B: Backend> {
    trainer: Trainer<B>,
    reducer: Box<dyn GradReducer<B>>,
    train: Box<dyn Examples>,
    test: Box<dyn Examples>,
    sampler: EpochSampler,
    steps_per_epoch: u64,
    total_steps: u64,
    /// The step the run resumed at (0 for a fresh run).
    resumed_at: u64,
    data_rank: usize,
    data_world: usize,
    /// This pipeline stage's layers (empty without a pipeline).
    stage_layers: Vec<String>,
    init_weight_hash: u64,
}

/// Loads the data, builds the trainer (every rank the whole model, so every rank checks the
/// same initial hash), keeps this stage's layers, makes the reducer and restores `resume`.
fn prepare<B: Backend>(
    be: B,
    spec: &JobSpec,
    opts: &RunOptions,
    stage: Option<PipelineStage>,
    make_reducer: ReducerFactory<'_, B>,
) -> Result<Setup<B>> {
    let build::LoadedData { train, test, vocab } = build::load_data(spec)?;
    let sampler = epoch_sampler(spec, train.as_ref())?;
    let steps_per_epoch = sampler.steps_per_epoch() as u64;
    if steps_per_epoch == 0 {
        return Err(crate::WorkerError::Config(format!(
            "train.batch_size {} is larger than the {} training examples (remainder = drop leaves no step)",
            spec.train.batch_size,
            train.len()
        )));
    }
    let mut total_steps = steps_per_epoch * spec.train.epochs as u64;
    if spec.train.max_steps > 0 {
        total_steps = total_steps.min(spec.train.max_steps as u64);
    }
    let mut trainer = Trainer::for_data(be, spec, train.as_ref(), vocab, total_steps)?;
    let init_weight_hash = trainer.model.weight_hash(&trainer.be)?;
    if stages_of(spec) > 1 && (stage.is_none() || !opts.world.is_multiple_of(stages_of(spec))) {
        return Err(crate::WorkerError::Config(format!(
            "parallel.pipeline_stages = {} needs a multiple of that many workers (got {}): run it with \
             `lockstep local --workers N` or a coordinator",
            stages_of(spec),
            opts.world
        )));
    }
    let (stage_layers, resume) = keep_stage(&mut trainer, spec, stage, opts.resume.clone())?;
    let mut sizes: Vec<Option<usize>> = trainer.model.params().iter().map(|p| p.trainable.then(|| p.numel())).collect();
    // A GAN's generator is reduced by the run's reducer, its discriminator by a sibling.
    let gan_split = trainer.gan.as_ref().map(|gan| gan.split_sizes(&sizes));
    if let Some((g, _)) = &gan_split {
        sizes = g.clone();
    }
    let mut reducer = make_reducer(&sizes)?;
    if let (Some(gan), Some((_, d))) = (trainer.gan.as_mut(), gan_split) {
        gan.d_reducer = reducer.sibling(&d)?;
    }
    if let Some(path) = &resume {
        let step = train_state::restore_checkpoint(&mut trainer, path)?;
        tracing::info!("resumed from {} at step {step}", path.display());
    }
    if let Some(zero) = reducer.zero() {
        // The whole state exists (fresh or restored); this rank keeps its ranges of it.
        trainer.optimizer.shard(&trainer.be, zero.shards().to_vec())?;
    }
    let at = lockstep_proto::topology::Topology::new(opts.rank, opts.world, stages_of(spec))
        .map_err(crate::WorkerError::Config)?;
    let (data_rank, data_world) = (at.replica(), at.replicas());
    if spec.train.reproducible == Reproducible::AnyWorldSize {
        crate::reproducible::check_world(data_world)?;
    }
    let resumed_at = trainer.global_step;
    Ok(Setup {
        trainer,
        reducer,
        train,
        test,
        sampler,
        steps_per_epoch,
        total_steps,
        resumed_at,
        data_rank,
        data_world,
        stage_layers,
        init_weight_hash,
    })
}

/// The sampler of the training split: the global batches of each epoch, in order.
fn epoch_sampler(spec: &JobSpec, train: &dyn Examples) -> Result<EpochSampler> {
    let balance = match (spec.data.resample, train.labels()) {
        (Resample::None, _) => None,
        (Resample::Oversample, Some(labels)) => {
            Some(BalancedOrder::new(Rebalance::Oversample, labels, train.classes()))
        }
        (Resample::Undersample, Some(labels)) => {
            Some(BalancedOrder::new(Rebalance::Undersample, labels, train.classes()))
        }
        (_, None) => {
            return Err(crate::WorkerError::Config("data.resample needs labelled (idx) data".into()));
        }
    };
    Ok(EpochSampler {
        len: train.len(),
        global_batch: spec.train.batch_size,
        seed: spec.seed,
        remainder: match spec.data.remainder {
            SpecRemainder::Drop => Remainder::Drop,
            SpecRemainder::Pad => Remainder::Pad,
        },
        balance,
    })
}

/// A pipeline stage keeps its own layers (and resumes from its own checkpoint directory,
/// at the same step as every stage). Returns the stage's layer names and the checkpoint
/// to resume from.
fn keep_stage<B: Backend>(
    trainer: &mut Trainer<B>,
    spec: &JobSpec,
    stage: Option<PipelineStage>,
    resume: Option<PathBuf>,
) -> Result<(Vec<String>, Option<PathBuf>)> {
    let Some(stage) = stage else { return Ok((Vec::new(), resume)) };
    let resume = resume.map(|path| train_state::stage_checkpoint(&path, stage.stage)).transpose()?;
    crate::pipeline::check_supported(&trainer.model)?;
    let (placement, costs) = crate::placement::place(&trainer.model, spec)?;
    let range = placement.stages[stage.stage].clone();
    let layers = costs[range.clone()].iter().map(|c| c.name.clone()).collect();
    trainer.keep_stage(range, stage)?;
    Ok((layers, resume))
}

/// Whether the step loop goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

/// What changes as the run goes.
struct Progress {
    epoch: u64,
    started: Instant,
    skips_in_row: usize,
    skipped_steps: u64,
    /// Examples since the last logged step, and when that was.
    window_examples: usize,
    window_start: Instant,
    examples_total: usize,
    last_checkpoint: Instant,
    last_eval: Option<Evaluation>,
    evaluated_at: Option<u64>,
}

/// A run between `prepare` and its summary.
struct Run<'a, B: Backend> {
    spec: &'a JobSpec,
    opts: RunOptions,
    s: Setup<B>,
    cost: cost::CostModel,
    early_stop: Option<EarlyStop>,
    best_dir: Option<PathBuf>,
    /// Wall-clock checkpoints: rank 0's clock asks, every rank takes part at the same step.
    checkpoint_period: std::time::Duration,
    p: Progress,
    on_event: &'a mut dyn FnMut(RunEvent) -> Result<()>,
}

impl<'a, B: Backend> Run<'a, B> {
    /// Logs the cost model (rank 0) and reports `RunEvent::Start`.
    fn start(
        spec: &'a JobSpec,
        opts: RunOptions,
        s: Setup<B>,
        on_event: &'a mut dyn FnMut(RunEvent) -> Result<()>,
    ) -> Result<Self> {
        let trainer = &s.trainer;
        let cost = cost::CostModel::new(trainer, spec.train.peak_gflops, opts.rank == 0)?;
        if opts.rank == 0 {
            cost.log_start(trainable_params(trainer));
            cost::warn_on_data_per_param(s.train.distinct_targets(), trainer.model.param_count(), vocab_kind(trainer));
        }
        let best_dir = opts.checkpoint_dir.as_ref().and_then(|d| d.parent()).map(|d| d.join("best"));
        let best_dir = if trainer.pipeline.is_some() { None } else { best_dir };
        on_event(RunEvent::Start {
            total_steps: s.total_steps,
            params: trainer.model.param_count(),
            flops_per_example: trainer.model.flops_per_example(),
            init_weight_hash: s.init_weight_hash,
        })?;
        let now = Instant::now();
        let p = Progress {
            epoch: 0,
            started: now,
            skips_in_row: 0,
            skipped_steps: 0,
            window_examples: 0,
            window_start: now,
            examples_total: 0,
            last_checkpoint: now,
            last_eval: None,
            evaluated_at: None,
        };
        Ok(Self {
            spec,
            opts,
            s,
            cost,
            early_stop: spec.train.early_stop.clone().map(EarlyStop::new),
            best_dir,
            checkpoint_period: std::time::Duration::from_secs_f64(spec.train.checkpoint_minutes * 60.0),
            p,
            on_event,
        })
    }

    /// The epochs, skipping the global batches done before a resume (the same batches in
    /// the same order whatever the world size); evaluates at the end of each epoch.
    fn train_epochs(&mut self) -> Result<()> {
        let (steps_per_epoch, resumed_at) = (self.s.steps_per_epoch, self.s.resumed_at);
        'epochs: for epoch in 0..self.spec.train.epochs as u64 {
            if (epoch + 1) * steps_per_epoch <= resumed_at {
                continue; // finished before the checkpoint
            }
            self.p.epoch = epoch;
            let order = self.s.sampler.epoch_order(epoch);
            for s in 0..steps_per_epoch as usize {
                if epoch * steps_per_epoch + (s as u64) < resumed_at {
                    continue;
                }
                if self.s.trainer.global_step >= self.s.total_steps || self.step(&order, s)? == Flow::Stop {
                    break 'epochs;
                }
            }
            if self.p.evaluated_at != Some(self.s.trainer.global_step) && self.evaluate()? == Flow::Stop {
                break 'epochs;
            }
        }
        Ok(())
    }

    /// One step on batch `s` of the epoch `order`, then its hooks.
    fn step(&mut self, order: &[u32], s: usize) -> Result<Flow> {
        let batch = self.s.sampler.global_batch(order, s);
        let local = rank_slice(&batch, self.s.data_rank, self.s.data_world);
        let step_index = self.s.trainer.global_step;
        let step_started = Instant::now();
        let trainer = &mut self.s.trainer;
        trainer.checkpoint_wanted = self.opts.rank == 0
            && !self.checkpoint_period.is_zero()
            && self.p.last_checkpoint.elapsed() >= self.checkpoint_period;
        let (data, reducer) = (self.s.train.as_ref(), self.s.reducer.as_mut());
        let stepped = match self.spec.train.reproducible {
            Reproducible::SameWorldSize => trainer.step(data, local, reducer),
            Reproducible::AnyWorldSize => {
                let total = self.spec.train.micro_shards;
                let shards = crate::reproducible::my_shards(&batch, total, self.s.data_rank, self.s.data_world);
                trainer.step_shards(data, &shards, total, reducer)
            }
        };
        let stats = stepped.map_err(|e| match e {
            // Say where: which step a collective failed in (the bucket is in the message).
            crate::WorkerError::Collective(m) => crate::WorkerError::Collective(format!("step {step_index}: {m}")),
            crate::WorkerError::Comm(source) => crate::WorkerError::CommAtStep { step: step_index, source },
            other => other,
        })?;
        self.on_skip(&stats, step_index)?;
        self.p.window_examples += batch.len();
        self.p.examples_total += batch.len();
        let report = self.report(&stats)?;
        (self.on_event)(RunEvent::Step {
            step: self.s.trainer.global_step,
            loss: stats.loss,
            examples: batch.len(),
            step_s: step_started.elapsed().as_secs_f64(),
            comm_wait_s: stats.comm_wait_s,
            report,
        })?;
        self.after_step(&stats)
    }

    /// A skipped update: counted, logged, and past the blow-up guard's limits the run stops
    /// with the weights from before the bad step checkpointed.
    fn on_skip(&mut self, stats: &StepStats, step_index: u64) -> Result<()> {
        match &stats.skipped {
            None => self.p.skips_in_row = 0,
            Some(Skip::Overflow) => {
                self.p.skipped_steps += 1;
                tracing::info!(
                    "step {step_index}: fp16 gradients overflowed; update skipped, loss scale now {}",
                    self.s.trainer.loss_scaler.as_ref().map_or(1.0, |s| s.scale)
                );
            }
            Some(Skip::Blowup(alarm)) => {
                self.p.skipped_steps += 1;
                self.p.skips_in_row += 1;
                let (b, in_row) = (&self.spec.train.blowup, self.p.skips_in_row);
                let diverged = matches!(alarm, Alarm::Divergence(_)) && b.action == BlowupAction::Stop;
                if diverged || in_row > b.max_skips {
                    self.checkpoint()?;
                    let why = if in_row > b.max_skips {
                        format!(" ({in_row} steps skipped in a row)")
                    } else {
                        String::new()
                    };
                    return Err(crate::WorkerError::Stopped(format!(
                        "loss blow-up at step {step_index}: {}{why}",
                        alarm.why()
                    )));
                }
                tracing::warn!("step {step_index}: update skipped: {}", alarm.why());
            }
        }
        Ok(())
    }

    /// Every `log_every` steps (and the last): the metrics line, weight hash and gradient
    /// statistics of this step.
    fn report(&mut self, stats: &StepStats) -> Result<Option<StepReport>> {
        let (trainer, step) = (&self.s.trainer, self.s.trainer.global_step);
        if step % self.spec.train.log_every as u64 != 0 && step != self.s.total_steps {
            return Ok(None);
        }
        let rate = self.p.window_examples as f64 / self.p.window_start.elapsed().as_secs_f64().max(1e-9);
        self.p.window_start = Instant::now();
        self.p.window_examples = 0;
        let (layer_grad_norms, grad_histograms) =
            grad_health::layer_grad_stats(trainer, stats.targets, self.opts.rank == 0)?;
        grad_health::warn_on_gradient_health(step, &layer_grad_norms);
        let record = TrainRecord {
            step,
            epoch: self.p.epoch,
            loss: stats.loss,
            lr: stats.lr as f64,
            grad_norm: stats.grad_norm,
            examples_per_s: rate,
            layer_grad_norms,
            parts: stats.parts.iter().map(|&(name, value)| NamedValue { name: name.into(), value }).collect(),
        };
        Ok(Some(StepReport { record, weight_hash: trainer.model.weight_hash(&trainer.be)?, grad_histograms }))
    }

    /// The hooks after a step: preemption, scheduled and requested checkpoints,
    /// `--stop-after`, periodic evaluation (and early stopping).
    fn after_step(&mut self, stats: &StepStats) -> Result<Flow> {
        let (step, total_steps) = (self.s.trainer.global_step, self.s.total_steps);
        if stats.stop_requested {
            // Every rank saw the same vote: all stop after this step.
            let written = self.checkpoint()?;
            let signal = lockstep_proto::preempt::requested().unwrap_or(lockstep_proto::preempt::SIGTERM);
            if signal == lockstep_proto::preempt::RESCALE {
                tracing::info!("stopping after step {step}: the group re-forms larger from this checkpoint");
            } else {
                tracing::warn!("stopping after step {step}: preempted (signal {signal})");
            }
            let checkpoint = written.map(|p| p.display().to_string());
            return Err(crate::WorkerError::Preempted { step, signal, checkpoint });
        }
        let every = self.spec.train.checkpoint_every as u64;
        let on_schedule = every > 0 && step % every == 0;
        if (on_schedule || stats.checkpoint_requested) && step < total_steps {
            self.checkpoint()?;
            self.p.last_checkpoint = Instant::now();
        }
        if self.opts.stop_after.is_some_and(|stop| step >= stop) {
            self.checkpoint()?;
            tracing::info!("stopping after step {step} (--stop-after)");
            return Ok(Flow::Stop);
        }
        let eval_every = self.spec.train.eval_every as u64;
        if eval_every > 0 && step % eval_every == 0 && step < total_steps {
            return self.evaluate();
        }
        Ok(Flow::Go)
    }

    /// Evaluates on the test split, reports it, and asks early stopping whether to go on.
    fn evaluate(&mut self) -> Result<Flow> {
        let eval = evaluate_and_report(&mut self.s.trainer, self.s.test.as_ref(), self.p.epoch, self.on_event)?;
        self.p.last_eval = Some(eval);
        self.p.evaluated_at = Some(self.s.trainer.global_step);
        let stop = early_stopping(
            &self.s.trainer,
            &mut self.early_stop,
            self.p.last_eval.as_ref(),
            self.opts.rank,
            &self.best_dir,
        )?;
        Ok(if stop { Flow::Stop } else { Flow::Go })
    }

    /// The checkpoint written, if this rank writes one: each stage's first replica writes
    /// its stage's (together they hold the model).
    /// A ZeRO run gathers the whole optimizer state first, on every rank.
    fn checkpoint(&mut self) -> Result<Option<PathBuf>> {
        let _span = crate::trace::span(SpanKind::Checkpoint);
        let Setup { trainer, reducer, .. } = &mut self.s;
        let gathered = match reducer.zero() {
            Some(zero) => Some(crate::zero::gather_optimizer_state(&trainer.be, &trainer.optimizer, zero)?),
            None => None,
        };
        let (0, Some(dir)) = (self.s.data_rank, &self.opts.checkpoint_dir) else { return Ok(None) };
        let trainer = &self.s.trainer;
        let state = match gathered {
            Some(state) => state,
            None => train_state::optimizer_state(trainer)?,
        };
        let dir = match &trainer.pipeline {
            Some(p) => dir.join(format!("stage-{}", p.index())),
            None => dir.clone(),
        };
        let path = train_state::save_checkpoint_with_state(trainer, &state, &dir, self.spec.train.keep_checkpoints)?;
        tracing::info!("checkpoint {}", path.display());
        Ok(Some(path))
    }

    /// The last evaluation (if `max_steps` ended the run inside an epoch), the final
    /// checkpoint and the summary.
    fn finish(mut self) -> Result<(Summary, Trainer<B>)> {
        if self.p.evaluated_at != Some(self.s.trainer.global_step) {
            let eval = evaluate_and_report(&mut self.s.trainer, self.s.test.as_ref(), self.p.epoch, self.on_event)?;
            self.p.last_eval = Some(eval);
        }
        if self.s.trainer.global_step == self.s.total_steps || self.early_stop.as_ref().is_some_and(|e| e.stopped) {
            self.checkpoint()?;
        }
        let summary = self.summary()?;
        if self.opts.rank == 0 {
            tracing::info!(
                "{:.0} examples/s, {:.1} GFLOP/s achieved, MFU {:.1}% of {:.1} GFLOP/s ({})",
                summary.examples_per_s,
                summary.examples_per_s * self.cost.train_flops_per_example as f64 / 1e9,
                summary.mfu * 100.0,
                self.cost.peak_gflops,
                self.cost.peak_source
            );
        }
        Ok((summary, self.s.trainer))
    }

    fn summary(&mut self) -> Result<Summary> {
        let (trainer, opts, cost) = (&self.s.trainer, &self.opts, &self.cost);
        let last_eval = self.p.last_eval.take();
        let (test_loss, test_accuracy) = last_eval.as_ref().map_or((f64::NAN, f64::NAN), |e| (e.loss, e.accuracy));
        let wall_s = self.p.started.elapsed().as_secs_f64();
        let examples_per_s = self.p.examples_total as f64 / wall_s.max(1e-9);
        let trainable_params = trainable_params(trainer);
        let wire_bytes = match self.spec.precision.allreduce {
            Dtype::Fp32 => 4,
            Dtype::Bf16 | Dtype::Fp16 => 2,
        };
        let stage_layers = std::mem::take(&mut self.s.stage_layers);
        Ok(Summary {
            name: self.spec.name.clone(),
            world_size: opts.world,
            steps: trainer.global_step,
            wall_s,
            examples_per_s,
            params: trainer.model.param_count(),
            flops_per_example: trainer.model.flops_per_example(),
            test_loss,
            test_accuracy,
            weight_hash: format!("{:016x}", trainer.model.weight_hash(&trainer.be)?),
            sparsity: sparsity(&trainer.be, &trainer.model.params())?,
            rank_weight_hashes: Vec::new(),
            allreduce_bytes_per_step: if self.s.data_world > 1 { trainable_params as u64 * wire_bytes } else { 0 },
            trainable_params,
            train_flops_per_example: cost.train_flops_per_example,
            peak_gflops: cost.peak_gflops,
            peak_source: cost.peak_source.clone(),
            mfu: cost.mfu(examples_per_s, opts.world),
            skipped_steps: self.p.skipped_steps,
            loss_scale: trainer.loss_scaler.as_ref().map_or(1.0, |s| s.scale as f64),
            test_metrics: last_eval.and_then(|e| e.classes),
            best: self.early_stop.take().and_then(|e| e.best_record()),
            pipeline: trainer
                .pipeline
                .as_ref()
                .map(|p| p.report(opts.rank, self.s.data_rank, stage_layers, trainer.model.param_count())),
            pipeline_stages: Vec::new(),
            collective: String::new(),
            optimizer_state_bytes: trainer.optimizer.state_bytes(&trainer.be),
            gradient_buffer_bytes: self.s.reducer.gradient_buffer_bytes(),
        })
    }
}

/// Parameters that train (frozen and LoRA-base parameters excluded).
fn trainable_params<B: Backend>(trainer: &Trainer<B>) -> usize {
    trainer.model.params().iter().filter(|p| p.trainable).map(|p| p.numel()).sum()
}

fn evaluate_and_report<B: Backend>(
    trainer: &mut Trainer<B>,
    test: &dyn lockstep_nn::data::Examples,
    epoch: u64,
    on_event: &mut dyn FnMut(RunEvent) -> Result<()>,
) -> Result<Evaluation> {
    let span = crate::trace::span(SpanKind::Eval);
    let ema = trainer.spec.train.eval_ema;
    let eval = if ema { trainer.evaluate_ema(test)? } else { trainer.evaluate(test)? };
    drop(span);
    on_event(RunEvent::Eval(EvalRecord {
        step: trainer.global_step,
        epoch,
        split: "test".into(),
        loss: eval.loss,
        accuracy: eval.accuracy,
        classes: eval.classes.clone(),
        ema,
    }))?;
    Ok(eval)
}

fn vocab_kind<B: Backend>(trainer: &Trainer<B>) -> &'static str {
    if trainer.vocab.is_some() {
        "tokens"
    } else {
        "examples"
    }
}

/// Pipeline stages of a job (1 without a pipeline).
fn stages_of(spec: &JobSpec) -> usize {
    spec.parallel.pipeline_stages.max(1)
}
