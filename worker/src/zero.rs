//! ZeRO stages 1 and 2 (T41, `parallel.zero`) on top of the bucket reducer.
//!
//! Each bucket is reduce-scattered instead of all-reduced, as soon as backward fills it.
//! The communicator's shard of a bucket (`shard_of`) is what this rank owns of it; cut by
//! the bucket's slots, that is one contiguous range of each parameter. The reduce-scatter
//! gives a shard the very bits an all-reduce would, and the update rules are elementwise,
//! so a ZeRO run keeps the weights of the unsharded run of the same world size.
//!
//! The step's scalars (loss, target count, votes) ride at the end of the last bucket as in
//! the all-reduce, so the buckets are cut exactly as there; their owners broadcast them.
//!
//! Stage 1 keeps a full-size buffer per bucket between steps, as the all-reduce does.
//! Stage 2 keeps only the shards: the bucket buffers come from a pool of two, and a bucket
//! that finds both in flight waits for the oldest reduce-scatter to finish.

use crate::reducer::{Bucket, BucketReducer, Direct, Job};
use crate::trainer::ShardedReducer;
use crate::{Result, WorkerError};
use lockstep_collective::{join_f64, Communicator};
use lockstep_kernels::Backend;
use lockstep_nn::optim::Optimizer;
use lockstep_nn::Param;
use std::ops::Range;
use std::sync::mpsc::channel;

/// f64 scalars a ZeRO step stages (loss sum, target count, stop and checkpoint votes); the
/// last bucket's cut depends on their number, so it is fixed.
pub const STEP_SCALARS: usize = 4;
/// Bucket buffers a ZeRO-2 reducer keeps in circulation.
const POOL: usize = 2;

pub struct ZeroState {
    stage: u8,
    /// This rank's range of each parameter (empty: frozen, or owned by other ranks).
    param_shards: Vec<Range<usize>>,
    /// This rank's summed gradient ranges, filled as buckets come back.
    grad_shards: Vec<Vec<f32>>,
    /// The step scalars, once the last bucket is back.
    scalars: Vec<f64>,
    /// Bucket results taken in so far this step.
    received: usize,
    /// ZeRO-2: free bucket buffers, and how many exist.
    pool: Vec<Vec<f32>>,
    allocated: usize,
}

/// The length of bucket `id` on the wire: the last carries the step scalars.
fn wire_len(buckets: &[Bucket], id: usize) -> usize {
    buckets[id].len + if id + 1 == buckets.len() { 2 * STEP_SCALARS } else { 0 }
}

impl ZeroState {
    /// This rank's ranges of every parameter under `comm`'s cut of each bucket.
    pub(crate) fn plan(comm: &dyn Communicator, buckets: &mut [Bucket], params: usize, stage: u8) -> Self {
        let mut param_shards = vec![0..0; params];
        for id in 0..buckets.len() {
            let shard = comm.shard_of(wire_len(buckets, id), comm.rank());
            for slot in &buckets[id].slots {
                let start = shard.start.clamp(slot.offset, slot.offset + slot.len) - slot.offset;
                let end = shard.end.clamp(slot.offset, slot.offset + slot.len) - slot.offset;
                param_shards[slot.param] = start..end.max(start);
            }
        }
        if stage >= 2 {
            for b in buckets.iter_mut() {
                b.data = Vec::new();
            }
        }
        let grad_shards = param_shards.iter().map(|r| Vec::with_capacity(r.len())).collect();
        Self { stage, param_shards, grad_shards, scalars: Vec::new(), received: 0, pool: Vec::new(), allocated: 0 }
    }

    /// Bytes held for summed gradients: stage 1 a buffer per bucket, stage 2 the pool; both
    /// the shards.
    pub(crate) fn buffer_bytes(&self, buckets: &[Bucket]) -> u64 {
        let shards: usize = self.param_shards.iter().map(|r| r.len()).sum();
        let buffers: usize = if self.stage >= 2 {
            POOL.min(buckets.len()) * buckets.iter().map(|b| b.len).max().unwrap_or(0)
        } else {
            buckets.iter().map(|b| b.len).sum()
        };
        (shards + buffers) as u64 * 4
    }
}

/// That a ZeRO step staged exactly `STEP_SCALARS` scalars (as f32 pairs).
pub(crate) fn check_scalars(zero: Option<&ZeroState>, staged_f32: usize) -> Result<()> {
    match zero {
        Some(_) if staged_f32 != 2 * STEP_SCALARS => Err(WorkerError::Internal(format!(
            "a ZeRO step stages {STEP_SCALARS} scalars, this one {}",
            staged_f32 / 2
        ))),
        _ => Ok(()),
    }
}

/// Reduce-scatter of a bucket whose values from `gradient_len` on are step scalars, which
/// every rank needs: each owner of some of them broadcasts its part.
pub(crate) fn reduce_scatter_with_tail(
    comm: &mut dyn Communicator,
    data: &mut [f32],
    gradient_len: usize,
) -> lockstep_collective::Result<()> {
    comm.reduce_scatter_sum(data)?;
    for owner in 0..comm.world() {
        let shard = comm.shard_of(data.len(), owner);
        let part = shard.start.max(gradient_len)..shard.end.max(gradient_len);
        if !part.is_empty() {
            comm.broadcast(&mut data[part], owner)?;
        }
    }
    Ok(())
}

impl BucketReducer {
    /// ZeRO-2: gives bucket `b` a buffer before backward fills it, from the pool or, with
    /// both in flight, from the oldest reduce-scatter once it is done.
    pub(crate) fn ensure_buffer(&mut self, b: usize) -> Result<()> {
        let len = self.buckets[b].len;
        let Some(zero) = &mut self.zero else { return Ok(()) };
        if zero.stage < 2 || self.buckets[b].data.len() == len {
            return Ok(());
        }
        let mut buffer = loop {
            let zero = self.zero.as_mut().expect("checked above");
            if let Some(buffer) = zero.pool.pop() {
                break buffer;
            }
            if zero.allocated < POOL {
                zero.allocated += 1;
                break Vec::new();
            }
            self.take_next_result()?;
        };
        buffer.resize(len, 0.0);
        self.buckets[b].data = buffer;
        Ok(())
    }

    /// Takes in the next reduce-scattered bucket: its shards (and scalars) are kept, its
    /// buffer goes back to the bucket (stage 1) or the pool (stage 2).
    fn take_next_result(&mut self) -> Result<()> {
        let (id, mut data) = self.receive()?;
        let last = id + 1 == self.buckets.len();
        let zero = self.zero.as_mut().ok_or_else(|| WorkerError::Internal("not a ZeRO reducer".into()))?;
        zero.received += 1;
        let bucket = &self.buckets[id];
        for slot in &bucket.slots {
            let range = &zero.param_shards[slot.param];
            let shard = &mut zero.grad_shards[slot.param];
            shard.clear();
            shard.extend_from_slice(&data[slot.offset + range.start..slot.offset + range.end]);
        }
        if last {
            zero.scalars = vec![0.0; STEP_SCALARS];
            join_f64(&data[bucket.len..], &mut zero.scalars);
        }
        data.truncate(bucket.len);
        if zero.stage >= 2 {
            zero.pool.push(data);
        } else {
            self.buckets[id].data = data;
        }
        Ok(())
    }
}

impl ShardedReducer for BucketReducer {
    fn shards(&self) -> &[Range<usize>] {
        self.zero.as_ref().map_or(&[], |z| &z.param_shards)
    }

    fn finish_grad_shards(&mut self, scalars: &mut [f64]) -> Result<Vec<Vec<f32>>> {
        if self.buckets.is_empty() {
            self.reduce_f64(scalars)?;
            return Ok(Vec::new());
        }
        if self.next_launch != self.buckets.len() {
            return Err(WorkerError::Collective(format!(
                "backward left {} of {} gradient buckets incomplete",
                self.buckets.len() - self.next_launch,
                self.buckets.len()
            )));
        }
        while self.zero.as_ref().is_some_and(|z| z.received < self.buckets.len()) {
            self.take_next_result()?;
        }
        let zero = self.zero.as_mut().ok_or_else(|| WorkerError::Internal("not a ZeRO reducer".into()))?;
        if scalars.len() != STEP_SCALARS {
            return Err(WorkerError::Internal(format!(
                "{} step scalars asked for, {STEP_SCALARS} sent",
                scalars.len()
            )));
        }
        scalars.copy_from_slice(&zero.scalars);
        zero.received = 0;
        let fresh = zero.param_shards.iter().map(|r| Vec::with_capacity(r.len())).collect();
        let shards = std::mem::replace(&mut zero.grad_shards, fresh);
        self.reset();
        Ok(shards)
    }

    fn all_gather_shards(&mut self, shards: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let param_shards = self.shards().to_vec();
        if shards.len() != param_shards.len() || shards.iter().zip(&param_shards).any(|(s, r)| s.len() != r.len()) {
            return Err(WorkerError::Internal("all-gather: the shards do not match this rank's ranges".into()));
        }
        let (reply, answers) = channel();
        for id in 0..self.buckets.len() {
            let mut data = vec![0.0; wire_len(&self.buckets, id)];
            for slot in &self.buckets[id].slots {
                let range = &param_shards[slot.param];
                data[slot.offset + range.start..slot.offset + range.end].copy_from_slice(&shards[slot.param]);
            }
            self.jobs
                .send(Job::Direct(Direct::AllGather, data, reply.clone()))
                .map_err(|_| WorkerError::Collective("all-reduce thread has stopped".into()))?;
        }
        let mut whole = vec![Vec::new(); shards.len()];
        for bucket in &self.buckets {
            let data = answers
                .recv()
                .map_err(|_| WorkerError::Collective("all-reduce thread has stopped".into()))?
                .map_err(WorkerError::Collective)?;
            for slot in &bucket.slots {
                whole[slot.param] = data[slot.offset..slot.offset + slot.len].to_vec();
            }
        }
        Ok(whole)
    }

    /// Exact: every rank's values travel bit for bit, as 16-bit integer limbs (exact in
    /// f32) in the rank's own slots of a zeroed buffer, and every rank adds them up in rank
    /// order. (Summing f32 pairs would round the high parts' sum to 24 bits, and the clip
    /// factor would then differ from the unsharded run's.)
    fn sum_f64(&mut self, values: &mut [f64]) -> Result<()> {
        let (rank, world, n) = (self.rank, self.world, values.len());
        let mut limbs = vec![0.0f32; world * n * 4];
        for (i, v) in values.iter().enumerate() {
            let bits = v.to_bits();
            for (l, limb) in limbs[(rank * n + i) * 4..][..4].iter_mut().enumerate() {
                *limb = ((bits >> (16 * l)) & 0xffff) as f32;
            }
        }
        self.reduce_f32(&mut limbs)?;
        let value_of = |limbs: &[f32]| f64::from_bits(limbs.iter().rev().fold(0u64, |acc, &l| (acc << 16) | l as u64));
        for (i, v) in values.iter_mut().enumerate() {
            *v = (0..world).map(|q| value_of(&limbs[(q * n + i) * 4..][..4])).fold(0.0, |acc, x| acc + x);
        }
        Ok(())
    }
}

/// Every rank's updated range of every trainable parameter to every rank.
pub fn all_gather_params<B: Backend>(
    be: &B,
    zero: &mut dyn ShardedReducer,
    params: &mut [&mut Param<B>],
) -> Result<()> {
    let ranges = zero.shards().to_vec();
    // Only this rank's range leaves the device (a 1/W copy, not the whole parameter).
    let shard_of = |p: &Param<B>, range: &Range<usize>| -> Result<Vec<f32>> {
        let mut part = be.zeros(range.len())?;
        be.copy_range(&p.value, range.start, &mut part, 0, range.len())?;
        Ok(be.download(&part)?)
    };
    let shards = params
        .iter()
        .zip(&ranges)
        .map(|(p, range)| if p.trainable { shard_of(p, range) } else { Ok(Vec::new()) })
        .collect::<Result<Vec<_>>>()?;
    let whole = zero.all_gather_shards(&shards)?;
    for (p, values) in params.iter_mut().zip(whole).filter(|(p, _)| p.trainable) {
        p.value = be.upload(&values)?;
    }
    Ok(())
}

/// The whole optimizer state, `[first moment, second moment]` per parameter (empty where
/// the rule keeps none), from every rank's ranges: what a checkpoint holds, so that it
/// resumes on any world size, sharded or not.
pub fn gather_optimizer_state<B: Backend>(
    be: &B,
    optimizer: &Optimizer<B>,
    zero: &mut dyn ShardedReducer,
) -> Result<Vec<[Vec<f32>; 2]>> {
    let mut whole = vec![[Vec::new(), Vec::new()]; optimizer.state.len()];
    for slot in 0..optimizer.slots_used() {
        let shards = optimizer
            .state
            .iter()
            .map(|pair| be.download(if slot == 0 { &pair.0 } else { &pair.1 }).map_err(WorkerError::from))
            .collect::<Result<Vec<_>>>()?;
        for (pair, values) in whole.iter_mut().zip(zero.all_gather_shards(&shards)?) {
            pair[slot] = values;
        }
    }
    Ok(whole)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_collective::thread::thread_group;
    use lockstep_collective::WireFormat;

    #[test]
    fn the_shards_partition_every_parameter_and_f64_sums_are_exact_in_rank_order() {
        let sizes = [Some(10), None, Some(7), Some(300), Some(1)];
        let handles: Vec<_> = thread_group(3)
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
                    let rank = comm.rank;
                    let mut reducer = BucketReducer::new(Box::new(comm), &sizes, 64 * 4, WireFormat::F32, 1);
                    // Values whose f32-pair sum would round: 1 + 2^-40 and friends.
                    let mut values = [1.0 + (rank as f64 + 1.0) * 2f64.powi(-40), 1e-30 * rank as f64];
                    reducer.sum_f64(&mut values).unwrap();
                    (reducer.shards().to_vec(), values)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let want = (0..3).map(|r| 1.0 + (r as f64 + 1.0) * 2f64.powi(-40)).fold(0.0, |a, x| a + x);
        for (_, values) in &results {
            assert_eq!(values[0].to_bits(), want.to_bits());
            assert_eq!(values[1], 1e-30 + 2e-30);
        }
        for (param, size) in sizes.iter().enumerate() {
            let mut covered: Vec<usize> = results.iter().flat_map(|(shards, _)| shards[param].clone()).collect();
            covered.sort_unstable();
            assert_eq!(covered, (0..size.unwrap_or(0)).collect::<Vec<_>>(), "parameter {param}");
        }
    }
}
