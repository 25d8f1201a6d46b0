//! Pipeline model parallelism (T42): this trainer holds a contiguous run of the model's
//! layers (a stage); activations go forward to the next stage and gradients back to the
//! previous one, micro-batch by micro-batch, in a GPipe or 1F1B order.
//!
//! Memory: a stage keeps only the *input* of each micro-batch in flight (re-materialisation,
//! as in the GPipe paper) and recomputes the forward pass right before that micro-batch's
//! backward when its layer caches have been overwritten. The forward is deterministic (dropout
//! is keyed by step and example), so the recomputed caches are the ones the first forward
//! made. GPipe holds all M inputs at its peak, 1F1B at most P − s: that is the difference the
//! schedule makes, and `PipeReport::peak_stash_bytes` measures it.

use crate::trainer::{Evaluation, GradReducer, Stage, StepStats, Trainer};
use crate::{trace, Result, WorkerError};
use lockstep_collective::pipe::{Neighbour, PipeLink};
use lockstep_collective::{join_f64, ring_all_reduce, ring_broadcast, split_f64};
use lockstep_kernels::{Backend, IGNORE_TARGET};
use lockstep_nn::data::{rank_slice, Batch, Examples};
use lockstep_nn::loss::{softmax_cross_entropy, LossOutput};
use lockstep_nn::{ForwardCtx, Tensor};
use lockstep_proto::metrics::StageReport;
use lockstep_proto::toolbox::PipeSchedule;
use lockstep_proto::trace::SpanKind;
use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

/// Whether `model` can be split into stages: a stage recomputes each micro-batch's forward
/// before its backward, so layers with running statistics (BatchNorm) would count it twice.
pub fn check_supported<B: Backend>(model: &lockstep_nn::Sequential<B>) -> Result<()> {
    match model.buffers().first() {
        Some((name, _)) => Err(WorkerError::Config(format!(
            "pipeline stages do not support BatchNorm ({name}: its running statistics would also be updated by the \
             recomputed forward); use layer_norm"
        ))),
        None => Ok(()),
    }
}

/// One unit of pipeline work on a micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Forward(usize),
    Backward(usize),
}

/// The order stage `stage` of `stages` runs the forwards and backwards of `m` micro-batches.
/// Every stage runs forwards in order 0..m and backwards in order 0..m, so what one stage
/// sends is what its neighbour expects next.
pub fn schedule_ops(schedule: PipeSchedule, stage: usize, stages: usize, m: usize) -> Vec<Op> {
    match schedule {
        PipeSchedule::Gpipe => (0..m).map(Op::Forward).chain((0..m).map(Op::Backward)).collect(),
        PipeSchedule::OneFOneB => {
            // Warm-up: enough forwards to fill the pipeline below this stage; then one
            // forward, one backward; then drain the backwards.
            let warmup = (stages - 1 - stage).min(m);
            let mut ops: Vec<Op> = (0..warmup).map(Op::Forward).collect();
            for i in 0..m - warmup {
                ops.push(Op::Forward(warmup + i));
                ops.push(Op::Backward(i));
            }
            ops.extend((m - warmup..m).map(Op::Backward));
            ops
        }
    }
}

/// Per-stage measurements over a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PipeReport {
    /// Seconds spent computing forwards and backwards (not waiting for neighbours).
    pub busy_s: f64,
    /// Seconds of the pipelined part of all steps (first op to last).
    pub pipeline_s: f64,
    /// Largest number of bytes of stashed micro-batch inputs held at once.
    pub peak_stash_bytes: usize,
    /// Largest number of micro-batches in flight (forward done, backward pending).
    pub peak_in_flight: usize,
}

/// This rank's place in the pipeline and its links to the neighbouring stages.
pub struct PipelineStage {
    pub stage: usize,
    pub stages: usize,
    pub micro_batches: usize,
    pub schedule: PipeSchedule,
    pub link: Box<dyn PipeLink>,
    pub report: PipeReport,
}

impl PipelineStage {
    fn first(&self) -> bool {
        self.stage == 0
    }
    fn last(&self) -> bool {
        self.stage + 1 == self.stages
    }
}

impl<B: Backend> Stage<B> for PipelineStage {
    fn index(&self) -> usize {
        self.stage
    }

    fn stages(&self) -> usize {
        self.stages
    }

    /// One training step of this stage: the micro-batches of `local` through the schedule,
    /// then the data-parallel reduction among this stage's replicas, the global gradient
    /// norm over all stages, and the update.
    fn step(
        &mut self,
        trainer: &mut Trainer<B>,
        data: &dyn Examples,
        local: &[u32],
        reducer: &mut dyn GradReducer<B>,
    ) -> Result<StepStats> {
        let outcome = trainer.run_schedule(self, data, local, reducer)?;
        let ScheduleOutcome { scalars, squared_norm, comm_wait_s, loss_scale, votes } = outcome;
        let mut stats = trainer.apply_update(scalars, squared_norm, comm_wait_s, loss_scale)?;
        stats.stop_requested = votes.stop;
        stats.checkpoint_requested = votes.checkpoint;
        Ok(stats)
    }

    /// This stage's eval-mode forward of `rows` examples: the input from the batch (first
    /// stage) or the previous stage, the output to the next stage or (last stage) returned.
    fn eval_forward(
        &mut self,
        trainer: &mut Trainer<B>,
        rows: usize,
        batch: &Batch,
        ctx: &ForwardCtx,
    ) -> Result<Option<Tensor<B>>> {
        let x = if self.first() {
            trainer.input(rows, &batch.x)?
        } else {
            let (shape, values) = self.link.recv_tensor(Neighbour::Prev).map_err(link_err)?;
            Tensor::from_slice(&trainer.be, &shape, &values)?
        };
        let y = trainer.model.forward(&trainer.be, x, ctx)?;
        if self.last() {
            return Ok(Some(y));
        }
        let values = y.to_vec(&trainer.be)?;
        self.link.send_tensor(Neighbour::Next, &y.shape, &values).map_err(link_err)?;
        Ok(None)
    }

    /// The last stage's evaluation, sent around the stage ring: every stage returns it.
    fn share_evaluation(&mut self, eval: Evaluation, classes: Option<usize>) -> Result<Evaluation> {
        let mut shared = split_f64(&crate::evaluation::evaluation_to_f64s(&eval, classes));
        ring_broadcast(self.link.as_mut(), self.stage, self.stages, &mut shared, self.stages - 1).map_err(link_err)?;
        let mut values = vec![0.0; shared.len() / 2];
        join_f64(&shared, &mut values);
        Ok(crate::evaluation::evaluation_from_f64s(&values, classes))
    }

    fn report(&self, rank: usize, replica: usize, layers: Vec<String>, params: usize) -> StageReport {
        let r = &self.report;
        StageReport {
            rank,
            stage: self.stage,
            replica,
            layers,
            params,
            schedule: format!("{:?}", self.schedule),
            micro_batches: self.micro_batches,
            busy_s: r.busy_s,
            pipeline_s: r.pipeline_s,
            bubble_fraction: if r.pipeline_s > 0.0 { 1.0 - r.busy_s / r.pipeline_s } else { 0.0 },
            peak_stash_bytes: r.peak_stash_bytes,
            peak_in_flight: r.peak_in_flight,
            peak_rss_bytes: peak_rss_bytes(),
        }
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

fn link_err(e: lockstep_collective::CollectiveError) -> WorkerError {
    WorkerError::Comm(e)
}

/// The step's stop and checkpoint votes, summed over every rank of the pipeline.
pub(crate) struct Votes {
    stop: bool,
    checkpoint: bool,
}

/// A step's reduced scalars (loss sum, targets), ‖g‖², exposed communication, loss scale
/// and votes.
struct ScheduleOutcome {
    scalars: [f64; 2],
    squared_norm: f64,
    comm_wait_s: f64,
    loss_scale: f32,
    votes: Votes,
}

/// The micro-batches of one step in flight.
struct InFlight<B: Backend> {
    /// Stage inputs of micro-batches in flight, for the recompute before their backward.
    stash: HashMap<usize, Tensor<B>>,
    /// The micro-batch whose forward the layer caches hold, and (last stage) its dlogits.
    caches_hold: Option<usize>,
    last_dlogits: Option<(usize, Tensor<B>)>,
    micro_loss: Vec<f64>,
    targets: usize,
    /// Seconds computing, not waiting.
    busy: f64,
    loss_scale: f32,
}

impl<B: Backend> InFlight<B> {
    fn new(micro_batches: usize, loss_scale: f32) -> Self {
        let micro_loss = vec![0.0; micro_batches];
        Self {
            stash: HashMap::new(),
            caches_hold: None,
            last_dlogits: None,
            micro_loss,
            targets: 0,
            busy: 0.0,
            loss_scale,
        }
    }
}

impl<B: Backend> Trainer<B> {
    /// Keeps only the layers `layers` of the full model: this trainer becomes one stage.
    /// The optimizer and EMA state are rebuilt for the remaining parameters.
    pub fn keep_stage(&mut self, layers: Range<usize>, stage: PipelineStage) -> Result<()> {
        let offset = self.param_offset(layers.start);
        let all = std::mem::take(&mut self.model.layers);
        self.model.layers = all.into_iter().skip(layers.start).take(layers.len()).collect();
        // The stage's first layer computes its input gradient unless it is the model's first.
        if let Some(first) = self.model.layers.first_mut() {
            first.set_input_grad(stage.stage > 0);
        }
        let lr_scale = std::mem::take(&mut self.optimizer.lr_scale);
        let kept: Vec<f32> = lr_scale.into_iter().skip(offset).collect();
        self.optimizer = lockstep_nn::optim::Optimizer::new(&self.be, self.optimizer.config, &self.model.params())?;
        self.optimizer.lr_scale = kept;
        if let Some(ema) = &self.ema {
            self.ema = Some(crate::guards::Ema::new(&self.be, ema.decay, &self.model.params())?);
        }
        self.pipeline = Some(Box::new(stage));
        Ok(())
    }

    /// Parameters before layer `layer` of the full model (before `keep_stage`).
    fn param_offset(&self, layer: usize) -> usize {
        self.model.layers[..layer].iter().map(|l| l.params().len()).sum()
    }

    fn micro_ctx(&self, train: bool, ids: &[u32], seq_lens: Vec<usize>) -> ForwardCtx {
        ForwardCtx {
            train,
            seed: self.spec.seed,
            step: self.global_step,
            example_ids: ids.iter().map(|&i| i as u64).collect(),
            seq_lens,
            stat_sync: None,
            // A stage interleaves micro-batches' forwards and backwards: no deferral.
            micro_batch: None,
            decode_from: None,
        }
    }

    /// The training forward of micro-batch `ids` from its stage input `x`: the stage output
    /// and, on the last stage, the loss (its sum and dL/dlogits times `loss_scale`).
    fn micro_forward(
        &mut self,
        batch: &Batch,
        ids: &[u32],
        x: Tensor<B>,
        last: bool,
        loss_scale: f32,
    ) -> Result<(Tensor<B>, Option<LossOutput<B>>)> {
        let ctx = self.micro_ctx(true, ids, batch.seq_lens.clone());
        let y = self.model.forward(&self.be, x, &ctx)?;
        let loss = if last {
            Some(softmax_cross_entropy(&self.be, &y, &batch.y, self.class_weights.as_deref(), loss_scale)?)
        } else {
            None
        };
        Ok((y, loss))
    }

    /// The step's micro-batches through the schedule, then the stage's reduction.
    fn run_schedule(
        &mut self,
        pipe: &mut PipelineStage,
        data: &dyn Examples,
        local: &[u32],
        reducer: &mut dyn GradReducer<B>,
    ) -> Result<ScheduleOutcome> {
        crate::trace::set_step(self.global_step);
        self.model.zero_grad(&self.be)?;
        let loss_scale = self.loss_scaler.as_ref().map_or(1.0, |s| s.scale);
        let m = pipe.micro_batches;
        let micro: Vec<&[u32]> = (0..m).map(|i| rank_slice(local, i, m)).collect();
        let started = Instant::now();
        let mut st = InFlight::new(m, loss_scale);
        for op in schedule_ops(pipe.schedule, pipe.stage, pipe.stages, m) {
            match op {
                Op::Forward(i) => self.forward_op(pipe, data, micro[i], i, &mut st)?,
                Op::Backward(i) => self.backward_op(pipe, data, micro[i], i, &mut st)?,
            }
        }
        pipe.report.busy_s += st.busy;
        pipe.report.pipeline_s += started.elapsed().as_secs_f64();
        self.reduce_stage(pipe, reducer, st.micro_loss.iter().sum(), st.targets, loss_scale)
    }

    /// Forward of micro-batch `i` (`ids`): its input from the data (first stage) or the
    /// previous stage, stashed for the backward; its output to the next stage, or (last
    /// stage) its loss and dlogits kept.
    fn forward_op(
        &mut self,
        pipe: &mut PipelineStage,
        data: &dyn Examples,
        ids: &[u32],
        i: usize,
        st: &mut InFlight<B>,
    ) -> Result<()> {
        let batch = self.gather(data, ids);
        st.targets += batch.y.iter().filter(|&&y| y != IGNORE_TARGET).count();
        let x = if pipe.first() {
            self.input(ids.len(), &batch.x)?
        } else {
            let (shape, values) = pipe.link.recv_tensor(Neighbour::Prev).map_err(link_err)?;
            Tensor::from_slice(&self.be, &shape, &values)?
        };
        let t0 = Instant::now();
        let _span = trace::span_detail(SpanKind::Forward, i as u32);
        st.stash.insert(i, x.duplicate(&self.be)?);
        let (y, loss) = self.micro_forward(&batch, ids, x, pipe.last(), st.loss_scale)?;
        st.caches_hold = Some(i);
        if let Some(out) = loss {
            st.micro_loss[i] = out.loss_sum;
            st.last_dlogits = Some((i, out.grad));
            st.busy += t0.elapsed().as_secs_f64();
        } else {
            let values = y.to_vec(&self.be)?;
            st.busy += t0.elapsed().as_secs_f64();
            pipe.link.send_tensor(Neighbour::Next, &y.shape, &values).map_err(link_err)?;
        }
        let held: usize = st.stash.values().map(|t| t.numel() * 4).sum();
        pipe.report.peak_stash_bytes = pipe.report.peak_stash_bytes.max(held);
        pipe.report.peak_in_flight = pipe.report.peak_in_flight.max(st.stash.len());
        Ok(())
    }

    /// Backward of micro-batch `i`: dL/dy from the next stage (with its loss) or the kept
    /// dlogits, the forward recomputed first if the layer caches hold another micro-batch;
    /// dL/dx and the loss to the previous stage.
    fn backward_op(
        &mut self,
        pipe: &mut PipelineStage,
        data: &dyn Examples,
        ids: &[u32],
        i: usize,
        st: &mut InFlight<B>,
    ) -> Result<()> {
        let received = if pipe.last() {
            None
        } else {
            let (shape, values) = pipe.link.recv_tensor(Neighbour::Next).map_err(link_err)?;
            let (_, loss) = pipe.link.recv_tensor(Neighbour::Next).map_err(link_err)?;
            join_f64(&loss, &mut st.micro_loss[i..=i]);
            Some(Tensor::from_slice(&self.be, &shape, &values)?)
        };
        let t0 = Instant::now();
        let _span = trace::span_detail(SpanKind::Backward, i as u32);
        let x = st.stash.remove(&i).ok_or_else(|| WorkerError::Internal(format!("micro-batch {i} not stashed")))?;
        let kept_dlogits = st.last_dlogits.take().filter(|(j, _)| *j == i && st.caches_hold == Some(i));
        let dy = match (received, kept_dlogits) {
            (Some(dy), _) if st.caches_hold == Some(i) => dy,
            (_, Some((_, dlogits))) => dlogits,
            (received, None) => {
                // The layer caches hold another micro-batch: recompute this one's.
                let batch = self.gather(data, ids);
                let (_, loss) = self.micro_forward(&batch, ids, x, pipe.last(), st.loss_scale)?;
                match (received, loss) {
                    (Some(dy), _) => dy,
                    (None, Some(out)) => out.grad,
                    (None, None) => {
                        return Err(WorkerError::Internal(format!("micro-batch {i}: no gradient to propagate")))
                    }
                }
            }
        };
        let dx = self.model.backward(&self.be, dy)?;
        st.caches_hold = None;
        st.busy += t0.elapsed().as_secs_f64();
        if !pipe.first() {
            let values = dx.to_vec(&self.be)?;
            pipe.link.send_tensor(Neighbour::Prev, &dx.shape, &values).map_err(link_err)?;
            pipe.link.send_tensor(Neighbour::Prev, &[2], &split_f64(&[st.micro_loss[i]])).map_err(link_err)?;
        }
        Ok(())
    }

    /// Data parallelism among this stage's replicas (the usual bucketed reducer, with the
    /// loss, target count and votes), then ‖g‖² and the votes summed around the stage ring.
    fn reduce_stage(
        &mut self,
        pipe: &mut PipelineStage,
        reducer: &mut dyn GradReducer<B>,
        loss_sum: f64,
        targets: usize,
        loss_scale: f32,
    ) -> Result<ScheduleOutcome> {
        // This rank's vote to stop after this step (preemption) and to checkpoint.
        let stop_vote = if lockstep_proto::preempt::requested().is_some() { 1.0 } else { 0.0 };
        let checkpoint_vote = if self.checkpoint_wanted { 1.0 } else { 0.0 };
        reducer.stage_scalars(&[loss_sum, targets as f64, stop_vote, checkpoint_vote]);
        {
            let params = self.model.params();
            reducer.grads_ready(&self.be, 0, &params)?;
        }
        let mut params = self.model.params_mut();
        let mut scalars = [loss_sum, targets as f64, stop_vote, checkpoint_vote];
        let waiting = (Instant::now(), trace::span(SpanKind::AllReduceWait));
        reducer.finish_grads(&self.be, &mut params, &mut scalars)?;
        let comm_wait_s = waiting.0.elapsed().as_secs_f64();
        drop(waiting);
        // ‖g‖² of the whole model: this stage's share summed around the stage ring.
        let local_squares = lockstep_nn::optim::grad_sum_squares(&self.be, &params)?;
        let mut squares = split_f64(&[local_squares, scalars[2], scalars[3]]);
        ring_all_reduce(pipe.link.as_mut(), pipe.stage, pipe.stages, &mut squares).map_err(link_err)?;
        let mut totals = [0.0; 3];
        join_f64(&squares, &mut totals);
        let [squared_norm, stop_votes, checkpoint_votes] = totals;
        let votes = Votes { stop: stop_votes > 0.5, checkpoint: checkpoint_votes > 0.5 };
        Ok(ScheduleOutcome { scalars: [scalars[0], scalars[1]], squared_norm, comm_wait_s, loss_scale, votes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight_peak(ops: &[Op]) -> usize {
        let (mut now, mut peak) = (0usize, 0usize);
        for op in ops {
            match op {
                Op::Forward(_) => now += 1,
                Op::Backward(_) => now -= 1,
            }
            peak = peak.max(now);
        }
        peak
    }

    #[test]
    fn schedules_cover_every_micro_batch_in_order_and_1f1b_bounds_what_is_in_flight() {
        for (stages, m) in [(2, 4), (4, 8), (4, 2), (3, 3)] {
            for stage in 0..stages {
                for schedule in [PipeSchedule::Gpipe, PipeSchedule::OneFOneB] {
                    let ops = schedule_ops(schedule, stage, stages, m);
                    let fwd: Vec<usize> =
                        ops.iter().filter_map(|o| if let Op::Forward(i) = o { Some(*i) } else { None }).collect();
                    let bwd: Vec<usize> =
                        ops.iter().filter_map(|o| if let Op::Backward(i) = o { Some(*i) } else { None }).collect();
                    assert_eq!(fwd, (0..m).collect::<Vec<_>>());
                    assert_eq!(bwd, (0..m).collect::<Vec<_>>());
                    for (k, op) in ops.iter().enumerate() {
                        if let Op::Backward(i) = op {
                            assert!(ops[..k].contains(&Op::Forward(*i)), "backward {i} before its forward");
                        }
                    }
                    let peak = in_flight_peak(&ops);
                    match schedule {
                        PipeSchedule::Gpipe => assert_eq!(peak, m),
                        PipeSchedule::OneFOneB => assert_eq!(peak, (stages - stage).min(m)),
                    }
                }
            }
        }
    }
}
