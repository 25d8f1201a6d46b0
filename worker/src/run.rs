//! The epoch/step loop shared by `lockstep train` and the worker daemon. It reports what
//! happens through `RunEvent`s; the caller writes them (metrics.jsonl, progress bar) or
//! sends them to the coordinator.

use crate::early_stop::{early_stopping, EarlyStop};
use crate::guards::Alarm;
use crate::pipeline::PipelineStage;
use crate::trainer::{Evaluation, GradReducer, Skip, Trainer};
use crate::{build, train_state, Result};
use crate::{cost, Result as WResult};
use lockstep_kernels::Backend;
use lockstep_nn::data::{rank_slice, EpochSampler, Remainder};
use lockstep_nn::data::{BalancedOrder, Rebalance};
use lockstep_nn::optim::sparsity;
use lockstep_proto::job::Remainder as SpecRemainder;
use lockstep_proto::metrics::StageReport;
use lockstep_proto::toolbox::{BlowupAction, Dtype, Resample};
use lockstep_proto::trace::SpanKind;
use lockstep_proto::{EvalRecord, Histogram, JobSpec, LayerGradNorm, Summary, TrainRecord};
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

/// T33 bounds on the first/last layer gradient-norm ratio beyond which a warning is logged.
const VANISHING_RATIO: f64 = 1e-3;
const EXPLODING_RATIO: f64 = 1e3;
const HISTOGRAM_BUCKETS: usize = 30;

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
pub fn run_training_stage<B: Backend>(
    be: B,
    spec: &JobSpec,
    opts: RunOptions,
    stage: Option<PipelineStage>,
    make_reducer: ReducerFactory<'_, B>,
    on_event: &mut dyn FnMut(RunEvent) -> Result<()>,
) -> Result<(Summary, Trainer<B>)> {
    let build::LoadedData { train, test, vocab } = build::load_data(spec)?;
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
    let sampler = EpochSampler {
        len: train.len(),
        global_batch: spec.train.batch_size,
        seed: spec.seed,
        remainder: match spec.data.remainder {
            SpecRemainder::Drop => Remainder::Drop,
            SpecRemainder::Pad => Remainder::Pad,
        },
        balance,
    };
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
    let mut trainer = Trainer::new(be, spec, train.features(), train.classes(), total_steps)?;
    trainer.vocab = vocab;
    if let Some(labels) = train.labels() {
        let counts = lockstep_nn::data::class_counts(labels, train.classes());
        trainer.class_weights = class_weights(spec, &counts)?;
    }
    trainer.prior_threshold = build::prior_threshold(train.as_ref());
    // Every rank builds the whole model first (so every rank checks the same initial hash),
    // then a pipeline stage keeps its layers.
    let init_weight_hash = trainer.model.weight_hash(&trainer.be);
    if stages_of(spec) > 1 && (stage.is_none() || !opts.world.is_multiple_of(stages_of(spec))) {
        return Err(crate::WorkerError::Config(format!(
            "parallel.pipeline_stages = {} needs a multiple of that many workers (got {}): run it with \
             `lockstep local --workers N` or a coordinator",
            stages_of(spec),
            opts.world
        )));
    }
    let (data_rank, data_world) = (opts.rank / stages_of(spec), opts.world / stages_of(spec));
    let mut stage_layers = Vec::new();
    let mut resume = opts.resume.clone();
    if let Some(stage) = stage {
        if let Some(path) = &resume {
            // Every stage resumes the same step from its own checkpoint directory.
            resume = Some(train_state::stage_checkpoint(path, stage.stage)?);
        }
        crate::pipeline::check_supported(&trainer.model)?;
        let (placement, costs) =
            crate::placement::place(&trainer.model, spec).map_err(|e| crate::WorkerError::Config(e.to_string()))?;
        let range = placement.stages[stage.stage].clone();
        stage_layers = costs[range.clone()].iter().map(|c| c.name.clone()).collect();
        trainer.keep_stage(range, stage);
    }
    let sizes: Vec<Option<usize>> = trainer.model.params().iter().map(|p| p.trainable.then(|| p.numel())).collect();
    let mut reducer = make_reducer(&sizes)?;
    if let Some(path) = &resume {
        let step = train_state::restore_checkpoint(&mut trainer, path)?;
        tracing::info!("resumed from {} at step {step}", path.display());
    }
    let resumed_at = trainer.global_step;
    // The checkpoint written, if this rank writes one.
    let checkpoint = |trainer: &Trainer<B>| -> Result<Option<PathBuf>> {
        if let (0, Some(dir)) = (data_rank, &opts.checkpoint_dir) {
            let _span = crate::trace::span(SpanKind::Checkpoint);
            // Each stage's first replica checkpoints its stage: together they hold the model.
            let dir = match &trainer.pipeline {
                Some(p) => dir.join(format!("stage-{}", p.stage)),
                None => dir.clone(),
            };
            let path = train_state::save_checkpoint(trainer, &dir, spec.train.keep_checkpoints)?;
            tracing::info!("checkpoint {}", path.display());
            return Ok(Some(path));
        }
        Ok(None)
    };
    let wire_bytes = match spec.precision.allreduce {
        Dtype::Fp32 => 4,
        Dtype::Bf16 | Dtype::Fp16 => 2,
    };
    let trainable_params = sizes.iter().flatten().sum::<usize>();
    let allreduce_bytes_per_step = if data_world > 1 { trainable_params as u64 * wire_bytes } else { 0 };
    let cost = cost::CostModel::new(&trainer, spec.train.peak_gflops, opts.rank == 0);
    if opts.rank == 0 {
        cost.log_start(trainable_params);
        cost::warn_on_data_per_param(train.distinct_targets(), trainer.model.param_count(), vocab_kind(&trainer));
    }
    let mut early_stop = spec.train.early_stop.clone().map(EarlyStop::new);
    let best_dir = opts.checkpoint_dir.as_ref().and_then(|d| d.parent()).map(|d| d.join("best"));
    let best_dir = if trainer.pipeline.is_some() { None } else { best_dir };
    let mut skips_in_row = 0usize;
    // Wall-clock checkpoints: rank 0's clock asks, every rank takes part at the same step.
    let checkpoint_period = std::time::Duration::from_secs_f64(spec.train.checkpoint_minutes * 60.0);
    let mut last_checkpoint = Instant::now();
    let mut skipped_steps = 0u64;
    on_event(RunEvent::Start {
        total_steps,
        params: trainer.model.param_count(),
        flops_per_example: trainer.model.flops_per_example(),
        init_weight_hash,
    })?;

    let started = Instant::now();
    let mut window_start = Instant::now();
    let mut window_examples = 0usize;
    let mut examples_total = 0usize;
    let mut last_eval: Option<Evaluation> = None;
    let mut evaluated_at = None;
    let mut epoch = 0;
    'epochs: for e in 0..spec.train.epochs as u64 {
        if (e + 1) * steps_per_epoch <= resumed_at {
            continue; // finished before the checkpoint
        }
        epoch = e;
        let order = sampler.epoch_order(epoch);
        for s in 0..steps_per_epoch as usize {
            if e * steps_per_epoch + (s as u64) < resumed_at {
                continue; // the same global batches, in the same order, whatever the world size
            }
            if trainer.global_step >= total_steps {
                break 'epochs;
            }
            let batch = sampler.global_batch(&order, s);
            let local = rank_slice(&batch, data_rank, data_world);
            let step_index = trainer.global_step;
            let step_started = Instant::now();
            trainer.checkpoint_wanted =
                opts.rank == 0 && !checkpoint_period.is_zero() && last_checkpoint.elapsed() >= checkpoint_period;
            let stats = trainer.step(train.as_ref(), local, reducer.as_mut()).map_err(|e| match e {
                // Say where: which step a collective failed in (the bucket is in the message).
                crate::WorkerError::Collective(m) => crate::WorkerError::Collective(format!("step {step_index}: {m}")),
                other => other,
            })?;
            match &stats.skipped {
                None => skips_in_row = 0,
                Some(Skip::Overflow) => {
                    skipped_steps += 1;
                    tracing::info!(
                        "step {step_index}: fp16 gradients overflowed; update skipped, loss scale now {}",
                        trainer.loss_scaler.as_ref().map_or(1.0, |s| s.scale)
                    );
                }
                Some(Skip::Blowup(alarm)) => {
                    skipped_steps += 1;
                    skips_in_row += 1;
                    let b = &spec.train.blowup;
                    let diverged = matches!(alarm, Alarm::Divergence(_)) && b.action == BlowupAction::Stop;
                    if diverged || skips_in_row > b.max_skips {
                        // The weights are still those before the bad step: keep them.
                        checkpoint(&trainer)?;
                        let in_row = if skips_in_row > b.max_skips {
                            format!(" ({skips_in_row} steps skipped in a row)")
                        } else {
                            String::new()
                        };
                        return Err(crate::WorkerError::Stopped(format!(
                            "loss blow-up at step {step_index}: {}{in_row}",
                            alarm.why()
                        )));
                    }
                    tracing::warn!("step {step_index}: update skipped: {}", alarm.why());
                }
            }
            window_examples += batch.len();
            examples_total += batch.len();
            let step = trainer.global_step;
            let report = if step % spec.train.log_every as u64 == 0 || step == total_steps {
                let rate = window_examples as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
                window_start = Instant::now();
                window_examples = 0;
                let (layer_grad_norms, grad_histograms) = layer_grad_stats(&trainer, stats.targets, opts.rank == 0);
                warn_on_gradient_health(step, &layer_grad_norms);
                let record = TrainRecord {
                    step,
                    epoch,
                    loss: stats.loss,
                    lr: stats.lr as f64,
                    grad_norm: stats.grad_norm,
                    examples_per_s: rate,
                    layer_grad_norms,
                };
                Some(StepReport { record, weight_hash: trainer.model.weight_hash(&trainer.be), grad_histograms })
            } else {
                None
            };
            on_event(RunEvent::Step {
                step,
                loss: stats.loss,
                examples: batch.len(),
                step_s: step_started.elapsed().as_secs_f64(),
                comm_wait_s: stats.comm_wait_s,
                report,
            })?;
            if stats.stop_requested {
                // Every rank saw the same vote: all stop after this step.
                let written = checkpoint(&trainer)?;
                let signal = lockstep_proto::preempt::requested().unwrap_or(lockstep_proto::preempt::SIGTERM);
                tracing::warn!("stopping after step {step}: preempted (signal {signal})");
                return Err(crate::WorkerError::Preempted {
                    step,
                    signal,
                    checkpoint: written.map(|p| p.display().to_string()),
                });
            }
            let every = spec.train.checkpoint_every as u64;
            let on_schedule = every > 0 && step % every == 0;
            if (on_schedule || stats.checkpoint_requested) && step < total_steps {
                checkpoint(&trainer)?;
                last_checkpoint = Instant::now();
            }
            if opts.stop_after.is_some_and(|stop| step >= stop) {
                checkpoint(&trainer)?;
                tracing::info!("stopping after step {step} (--stop-after)");
                break 'epochs;
            }
            let eval_every = spec.train.eval_every as u64;
            if eval_every > 0 && step % eval_every == 0 && step < total_steps {
                last_eval = Some(evaluate_and_report(&mut trainer, test.as_ref(), epoch, on_event)?);
                evaluated_at = Some(step);
                if early_stopping(&trainer, &mut early_stop, last_eval.as_ref(), opts.rank, &best_dir)? {
                    break 'epochs;
                }
            }
        }
        if evaluated_at != Some(trainer.global_step) {
            last_eval = Some(evaluate_and_report(&mut trainer, test.as_ref(), epoch, on_event)?);
            evaluated_at = Some(trainer.global_step);
            if early_stopping(&trainer, &mut early_stop, last_eval.as_ref(), opts.rank, &best_dir)? {
                break 'epochs;
            }
        }
    }
    if evaluated_at != Some(trainer.global_step) {
        // max_steps ended the run inside an epoch.
        last_eval = Some(evaluate_and_report(&mut trainer, test.as_ref(), epoch, on_event)?);
    }
    let (test_loss, test_accuracy) = last_eval.as_ref().map_or((f64::NAN, f64::NAN), |e| (e.loss, e.accuracy));
    if trainer.global_step == total_steps || early_stop.as_ref().is_some_and(|e| e.stopped) {
        checkpoint(&trainer)?;
    }
    let wall_s = started.elapsed().as_secs_f64();
    let examples_per_s = examples_total as f64 / wall_s.max(1e-9);
    let summary = Summary {
        name: spec.name.clone(),
        world_size: opts.world,
        steps: trainer.global_step,
        wall_s,
        examples_per_s,
        params: trainer.model.param_count(),
        flops_per_example: trainer.model.flops_per_example(),
        test_loss,
        test_accuracy,
        weight_hash: format!("{:016x}", trainer.model.weight_hash(&trainer.be)),
        sparsity: sparsity(&trainer.be, &trainer.model.params()),
        rank_weight_hashes: Vec::new(),
        allreduce_bytes_per_step,
        trainable_params,
        train_flops_per_example: cost.train_flops_per_example,
        peak_gflops: cost.peak_gflops,
        peak_source: cost.peak_source.clone(),
        mfu: cost.mfu(examples_per_s, opts.world),
        skipped_steps,
        loss_scale: trainer.loss_scaler.as_ref().map_or(1.0, |s| s.scale as f64),
        test_metrics: last_eval.and_then(|e| e.classes),
        best: early_stop.and_then(|e| e.best_record()),
        pipeline: trainer.pipeline.as_ref().map(|p| stage_report(p, opts.rank, data_rank, stage_layers, &trainer)),
        pipeline_stages: Vec::new(),
        collective: String::new(),
    };
    if opts.rank == 0 {
        tracing::info!(
            "{:.0} examples/s, {:.1} GFLOP/s achieved, MFU {:.1}% of {:.1} GFLOP/s ({})",
            examples_per_s,
            examples_per_s * cost.train_flops_per_example as f64 / 1e9,
            summary.mfu * 100.0,
            cost.peak_gflops,
            cost.peak_source
        );
    }
    Ok((summary, trainer))
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

/// T33: each layer's gradient L2 norm (its parameters together, named by the parameter
/// name up to the last dot) of the batch-mean gradient, and with `histograms` the
/// distribution of its gradient values. The gradients hold sums over `targets`.
fn layer_grad_stats<B: Backend>(
    trainer: &Trainer<B>,
    targets: f64,
    histograms: bool,
) -> (Vec<LayerGradNorm>, Vec<(String, Histogram)>) {
    let mut layers: Vec<(String, Vec<f32>)> = Vec::new();
    for p in trainer.model.params().into_iter().filter(|p| p.trainable) {
        let layer = p.name.rsplit_once('.').map_or(p.name.as_str(), |(layer, _)| layer);
        let grad: Vec<f32> = trainer.be.download(&p.grad).iter().map(|g| (*g as f64 / targets) as f32).collect();
        match layers.last_mut() {
            Some((name, values)) if name == layer => values.extend(grad),
            _ => layers.push((layer.to_string(), grad)),
        }
    }
    let norms = layers
        .iter()
        .map(|(layer, g)| LayerGradNorm {
            layer: layer.clone(),
            norm: g.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt(),
        })
        .collect();
    let hists = if histograms {
        layers.iter().map(|(layer, g)| (layer.clone(), Histogram::of(g, HISTOGRAM_BUCKETS))).collect()
    } else {
        Vec::new()
    };
    (norms, hists)
}

/// The first layer's gradient norm over the last layer's (T33), if both are non-zero.
pub fn grad_norm_ratio(norms: &[LayerGradNorm]) -> Option<f64> {
    let (first, last) = (norms.first()?.norm, norms.last()?.norm);
    (norms.len() >= 2 && first.is_finite() && last > 0.0).then(|| first / last)
}

fn warn_on_gradient_health(step: u64, norms: &[LayerGradNorm]) {
    let Some(ratio) = grad_norm_ratio(norms) else { return };
    let (first, last) = (&norms[0], &norms[norms.len() - 1]);
    if ratio < VANISHING_RATIO {
        tracing::warn!(
            "step {step}: vanishing gradients: {} has gradient norm {:.3e}, {:.1e} times the {:.3e} of {} \
             (deep sigmoid/tanh stacks, bad init or no normalization are the usual causes)",
            first.layer,
            first.norm,
            ratio,
            last.norm,
            last.layer
        );
    } else if ratio > EXPLODING_RATIO {
        tracing::warn!(
            "step {step}: exploding gradients: {} has gradient norm {:.3e}, {:.1e} times the {:.3e} of {} \
             (lower optim.lr, set optim.clip_norm, or check the init)",
            first.layer,
            first.norm,
            ratio,
            last.norm,
            last.layer
        );
    }
}

/// Loss weights (T28): explicit, balanced from the training split's class counts, or none.
fn class_weights(spec: &JobSpec, counts: &[usize]) -> WResult<Option<Vec<f32>>> {
    let t = &spec.train;
    if !t.class_weights.is_empty() {
        if t.class_weights.len() != counts.len() {
            return Err(crate::WorkerError::Config(format!(
                "train.class_weights has {} entries; the data has {} classes",
                t.class_weights.len(),
                counts.len()
            )));
        }
        return Ok(Some(t.class_weights.clone()));
    }
    if t.balanced_class_weights {
        let weights = lockstep_nn::data::balanced_class_weights(counts);
        tracing::info!("class counts {counts:?}: balanced loss weights {weights:?}");
        return Ok(Some(weights));
    }
    Ok(None)
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

fn stage_report<B: Backend>(
    p: &PipelineStage,
    rank: usize,
    replica: usize,
    layers: Vec<String>,
    trainer: &Trainer<B>,
) -> StageReport {
    let r = &p.report;
    StageReport {
        rank,
        stage: p.stage,
        replica,
        layers,
        params: trainer.model.param_count(),
        schedule: format!("{:?}", p.schedule),
        micro_batches: p.micro_batches,
        busy_s: r.busy_s,
        pipeline_s: r.pipeline_s,
        bubble_fraction: if r.pipeline_s > 0.0 { 1.0 - r.busy_s / r.pipeline_s } else { 0.0 },
        peak_stash_bytes: r.peak_stash_bytes,
        peak_in_flight: r.peak_in_flight,
        peak_rss_bytes: peak_rss_bytes(),
    }
}

/// The process's peak resident set (VmHWM in /proc/self/status), 0 where unavailable.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
