//! The epoch/step loop shared by `lockstep train` and the worker daemon. It reports what
//! happens through `RunEvent`s; the caller writes them (metrics.jsonl, progress bar) or
//! sends them to the coordinator.

use crate::trainer::{GradReducer, Trainer};
use crate::{build, Result};
use lockstep_kernels::Backend;
use lockstep_nn::data::{rank_slice, EpochSampler, Remainder};
use lockstep_nn::optim::sparsity;
use lockstep_proto::job::Remainder as SpecRemainder;
use lockstep_proto::{EvalRecord, JobSpec, Summary, TrainRecord};
use std::time::Instant;

#[derive(Debug, Clone)]
pub enum RunEvent {
    /// Training is about to start: total steps, parameter count, forward FLOPs/example.
    Start {
        total_steps: u64,
        params: usize,
        flops_per_example: u64,
    },
    /// After every step (cheap); `record` is set every `log_every` steps.
    Step {
        step: u64,
        loss: f64,
        record: Option<TrainRecord>,
    },
    Eval(EvalRecord),
}

#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub rank: usize,
    pub world: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { rank: 0, world: 1 }
    }
}

/// Trains `spec` as rank `opts.rank` of `opts.world` and returns the run summary.
pub fn run_training<B: Backend>(
    be: B,
    spec: &JobSpec,
    opts: RunOptions,
    reducer: &mut dyn GradReducer<B>,
    on_event: &mut dyn FnMut(RunEvent),
) -> Result<(Summary, Trainer<B>)> {
    let (train, test) = build::load_data(spec)?;
    let sampler = EpochSampler {
        len: train.len(),
        global_batch: spec.train.batch_size,
        seed: spec.seed,
        remainder: match spec.data.remainder {
            SpecRemainder::Drop => Remainder::Drop,
            SpecRemainder::Pad => Remainder::Pad,
        },
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
    let mut trainer = Trainer::new(be, spec, train.features, train.classes, total_steps);
    on_event(RunEvent::Start {
        total_steps,
        params: trainer.model.param_count(),
        flops_per_example: trainer.model.flops_per_example(),
    });

    let started = Instant::now();
    let mut window_start = Instant::now();
    let mut window_examples = 0usize;
    let mut examples_total = 0usize;
    let (mut test_loss, mut test_accuracy) = (f64::NAN, f64::NAN);
    let mut evaluated_at = None;
    let mut epoch = 0;
    'epochs: for e in 0..spec.train.epochs as u64 {
        epoch = e;
        let order = sampler.epoch_order(epoch);
        for s in 0..steps_per_epoch as usize {
            if trainer.global_step >= total_steps {
                break 'epochs;
            }
            let batch = sampler.global_batch(&order, s);
            let local = rank_slice(&batch, opts.rank, opts.world);
            let stats = trainer.step(&train, local, batch.len(), reducer)?;
            if !stats.loss.is_finite() {
                return Err(crate::WorkerError::Stopped(format!(
                    "loss is {} at step {}: the learning rate ({}) is likely too high or gradients exploded (grad norm {:.3e}); lower optim.lr or set optim.clip_norm",
                    stats.loss, trainer.global_step - 1, stats.lr, stats.grad_norm
                )));
            }
            window_examples += batch.len();
            examples_total += batch.len();
            let step = trainer.global_step;
            let record = (step % spec.train.log_every as u64 == 0 || step == total_steps).then(|| {
                let rate = window_examples as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
                window_start = Instant::now();
                window_examples = 0;
                TrainRecord {
                    step,
                    epoch,
                    loss: stats.loss,
                    lr: stats.lr as f64,
                    grad_norm: stats.grad_norm,
                    examples_per_s: rate,
                }
            });
            on_event(RunEvent::Step { step, loss: stats.loss, record });
        }
        (test_loss, test_accuracy) = evaluate_and_report(&mut trainer, &test, epoch, on_event)?;
        evaluated_at = Some(trainer.global_step);
    }
    if evaluated_at != Some(trainer.global_step) {
        // max_steps ended the run inside an epoch.
        (test_loss, test_accuracy) = evaluate_and_report(&mut trainer, &test, epoch, on_event)?;
    }
    let wall_s = started.elapsed().as_secs_f64();
    let summary = Summary {
        name: spec.name.clone(),
        world_size: opts.world,
        steps: trainer.global_step,
        wall_s,
        examples_per_s: examples_total as f64 / wall_s.max(1e-9),
        params: trainer.model.param_count(),
        flops_per_example: trainer.model.flops_per_example(),
        test_loss,
        test_accuracy,
        weight_hash: format!("{:016x}", trainer.model.weight_hash(&trainer.be)),
        sparsity: sparsity(&trainer.be, &trainer.model.params()),
    };
    Ok((summary, trainer))
}

fn evaluate_and_report<B: Backend>(
    trainer: &mut Trainer<B>,
    test: &lockstep_nn::data::Dataset,
    epoch: u64,
    on_event: &mut dyn FnMut(RunEvent),
) -> Result<(f64, f64)> {
    let (loss, accuracy) = trainer.evaluate(test)?;
    on_event(RunEvent::Eval(EvalRecord { step: trainer.global_step, epoch, split: "test".into(), loss, accuracy }));
    Ok((loss, accuracy))
}
