//! Bucketed gradient all-reduce overlapped with backward (T41).
//!
//! As in PyTorch DDP, parameters are assigned to buckets of about `bucket_bytes` once, in
//! reverse order (the order backward produces them). During backward each parameter's
//! gradient is copied into its bucket as soon as it is final; a full bucket is handed to a
//! communication thread, which all-reduces it while backward goes on. Buckets are launched
//! strictly in plan order, so every rank issues the same collectives in the same order.
//! Frozen parameters are in no bucket: they cost no traffic.

use crate::trainer::{GradReducer, ShardedReducer};
use crate::{Result, WorkerError};
use lockstep_collective::{join_f64, split_f64, Communicator, WireFormat};
use lockstep_kernels::Backend;
use lockstep_nn::layers::{StatSync, StatSyncHandle};
use lockstep_nn::Param;
use lockstep_proto::trace::SpanKind;
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// `len` values of parameter `param`'s gradient, from its value `from`, at `offset` in the
/// bucket.
pub(crate) struct Slot {
    pub(crate) param: usize,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) from: usize,
}

pub(crate) struct Bucket {
    pub(crate) slots: Vec<Slot>,
    /// The bucket's values (empty while a ZeRO-2 bucket waits for a pooled buffer).
    pub(crate) data: Vec<f32>,
    /// Gradient values in the bucket.
    pub(crate) len: usize,
    /// Values of this step's gradients not yet in the bucket.
    pub(crate) pending: usize,
}

impl Bucket {
    fn empty() -> Self {
        Self { slots: Vec::new(), data: Vec::new(), len: 0, pending: 0 }
    }
}

pub(crate) enum Job {
    /// Bucket id, values, how many of them are gradients (sent in the wire format),
    /// whether to reduce-scatter (ZeRO) instead of all-reduce, and where the result goes
    /// (each reducer sharing the thread has its own channel).
    Reduce(usize, Vec<f32>, usize, bool, Sender<BucketResult>),
    /// A collective whose result goes back on the job's own channel, so it never mixes with
    /// gradient buckets still in flight.
    Direct(Direct, Vec<f32>, Sender<std::result::Result<Vec<f32>, String>>),
    Stop,
}

/// The collectives of `Job::Direct`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direct {
    /// One bucket's parameter shards (ZeRO).
    AllGather,
    /// Statistics from inside forward/backward (SyncBatchNorm).
    AllReduce,
}

impl Direct {
    fn what(self) -> &'static str {
        match self {
            Direct::AllGather => "all-gather of parameter shards",
            Direct::AllReduce => "all-reduce of BatchNorm statistics",
        }
    }
}

/// The [`StatSync`] of a bucket reducer: a request to its communication thread.
struct CommStatSync {
    jobs: std::sync::Mutex<Sender<Job>>,
}

impl StatSync for CommStatSync {
    fn sum(&self, values: &mut [f64]) -> lockstep_nn::Result<()> {
        let stopped = || lockstep_nn::NnError::Invalid("collective: all-reduce thread has stopped".into());
        let (reply, answer) = channel();
        self.jobs
            .lock()
            .map_err(|_| stopped())?
            .send(Job::Direct(Direct::AllReduce, split_f64(values), reply))
            .map_err(|_| stopped())?;
        let summed = answer
            .recv()
            .map_err(|_| stopped())?
            .map_err(|e| lockstep_nn::NnError::Invalid(format!("collective: {e}")))?;
        join_f64(&summed, values);
        Ok(())
    }
}

pub struct BucketReducer {
    pub(crate) buckets: Vec<Bucket>,
    /// The (bucket, slot) places of each parameter index (none: frozen).
    places: Vec<Vec<(usize, usize)>>,
    pub(crate) next_launch: usize,
    /// This step's scalars (f64 split into f32 pairs), appended to the last bucket launched.
    staged_scalars: Vec<f32>,
    pub(crate) jobs: Sender<Job>,
    /// Where the communication thread sends this reducer's bucket results.
    results_to: Sender<BucketResult>,
    results: Receiver<BucketResult>,
    /// The thread, on the reducer that started it; a `sibling` shares it and has None.
    comm_thread: Option<JoinHandle<()>>,
    /// All-reduced bytes per step (reported by `lockstep local` and the transfer tests).
    pub bytes_per_step: u64,
    /// The ZeRO state (`parallel.zero` ≥ 1), None for a plain all-reduce.
    pub(crate) zero: Option<crate::zero::ZeroState>,
    /// This rank and the group's size.
    pub(crate) rank: usize,
    pub(crate) world: usize,
    /// Values per bucket at most.
    bucket_cap: usize,
    value_bytes: u64,
    comm: SharedComm,
    wire: WireFormat,
}

/// Parameters into buckets of at most `cap` values, in reverse order, the order backward
/// finishes them; frozen ones (None) into none. With `split` a parameter fills what is
/// left of a bucket and goes on in the next (its gradient is reported in pieces, so its
/// first buckets can go while the rest computes); without, a larger parameter gets a bucket
/// of its own (ZeRO keeps one range of a parameter per rank). Returns the buckets and the
/// (bucket, slot) places of each parameter.
fn plan_buckets(param_sizes: &[Option<usize>], cap: usize, split: bool) -> (Vec<Bucket>, Vec<Vec<(usize, usize)>>) {
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut places = vec![Vec::new(); param_sizes.len()];
    let mut current = Bucket::empty();
    for (i, size) in param_sizes.iter().enumerate().rev() {
        let Some(len) = *size else { continue };
        let mut from = 0;
        loop {
            let full = if split { current.len >= cap } else { current.len + len > cap };
            if current.len > 0 && full {
                buckets.push(std::mem::replace(&mut current, Bucket::empty()));
            }
            // cap ≥ 1 and the bucket is not full: a split slot takes at least one value.
            let take = if split { (len - from).min(cap - current.len) } else { len };
            places[i].push((buckets.len(), current.slots.len()));
            current.slots.push(Slot { param: i, offset: current.len, len: take, from });
            current.len += take;
            from += take;
            if from >= len {
                break;
            }
        }
    }
    let last = buckets.len().wrapping_sub(1);
    match buckets.last_mut() {
        // A sliver left at the end would cost a collective of its own after backward,
        // where nothing hides it: it rides on the bucket before.
        Some(prev) if split && current.len < cap / 8 => {
            for slot in current.slots {
                places[slot.param].retain(|&(b, _)| b != last + 1);
                places[slot.param].push((last, prev.slots.len()));
                prev.slots.push(Slot { offset: prev.len, ..slot });
                prev.len += slot.len;
            }
        }
        _ if current.len > 0 || !current.slots.is_empty() => buckets.push(current),
        _ => {}
    }
    for b in &mut buckets {
        b.data = vec![0.0; b.len];
    }
    (buckets, places)
}

/// The smallest bucket a group on one host is cut into (256 KiB): a collective there costs
/// microseconds, so a model of a few MB still gets four buckets to overlap with backward.
const MIN_LOCAL_BUCKET: usize = 1 << 16;

/// Values per bucket: `bucket_bytes`' worth, or on one host at most a quarter of the model
/// (a network link keeps the buckets it was given: each collective costs round trips).
fn bucket_cap(param_sizes: &[Option<usize>], bucket_bytes: usize, on_one_host: bool) -> usize {
    let asked = (bucket_bytes / 4).max(1);
    if !on_one_host {
        return asked;
    }
    let total: usize = param_sizes.iter().flatten().sum();
    asked.min((total / 4).max(MIN_LOCAL_BUCKET))
}

type BucketResult = std::result::Result<(usize, Vec<f32>), String>;

/// The group's communicator: the communication thread takes it for each job, and the
/// trainer's thread for the last bucket of a step (see `BucketReducer::runs_inline`).
type SharedComm = Arc<std::sync::Mutex<Box<dyn Communicator>>>;

/// The communication thread: runs the jobs in order until `Stop`, a closed channel or the
/// first failure (reported, then the thread ends).
fn comm_loop(comm: SharedComm, wire: WireFormat, jobs: Receiver<Job>) {
    loop {
        let job = jobs.recv();
        let Ok(mut comm) = comm.lock() else { break };
        let failed = match job {
            Ok(Job::Reduce(id, data, gradient_len, scatter, results)) => {
                let outcome = reduce_bucket(comm.as_mut(), wire, id, data, gradient_len, scatter);
                let failed = outcome.is_err();
                results.send(outcome).is_err() || failed
            }
            Ok(Job::Direct(op, mut data, reply)) => {
                let outcome = match op {
                    Direct::AllGather => comm.all_gather(&mut data),
                    Direct::AllReduce => comm.all_reduce_sum(&mut data),
                };
                let outcome = outcome.map(|_| data).map_err(|e| format!("{}: {e}", op.what()));
                let failed = outcome.is_err();
                reply.send(outcome).is_err() || failed
            }
            Ok(Job::Stop) | Err(_) => true,
        };
        if failed {
            break;
        }
    }
}

/// One bucket (`id`, or usize::MAX for scalars alone) all-reduced, or reduce-scattered (ZeRO).
fn reduce_bucket(
    comm: &mut dyn Communicator,
    wire: WireFormat,
    id: usize,
    mut data: Vec<f32>,
    gradient_len: usize,
    scatter: bool,
) -> BucketResult {
    let op = if scatter { "reduce-scatter" } else { "all-reduce" };
    let what = if id == usize::MAX {
        format!("{op} of the loss scalars")
    } else {
        format!("{op} of gradient bucket {id} ({} values)", data.len())
    };
    let _span = crate::trace::span_detail(SpanKind::AllReduce, id.min(u32::MAX as usize) as u32);
    let outcome = if scatter {
        crate::zero::reduce_scatter_with_tail(comm, &mut data, gradient_len)
    } else {
        comm.all_reduce_sum_as(&mut data, wire, gradient_len)
    };
    outcome.map(|_| (id, data)).map_err(|e| format!("{what}: {e}"))
}

impl BucketReducer {
    /// `param_sizes[i]` is the element count of parameter i, `None` if frozen.
    /// Gradients travel in `wire` format (T25: bf16/fp16 halve the bytes); the loss scalars
    /// on the last bucket stay f32.
    pub fn new(
        mut comm: Box<dyn Communicator>,
        param_sizes: &[Option<usize>],
        bucket_bytes: usize,
        wire: WireFormat,
        zero_stage: u8,
    ) -> Self {
        // Its collectives run beside the training step, on the step's cores.
        comm.set_beside_compute(true);
        let bucket_cap = bucket_cap(param_sizes, bucket_bytes, comm.on_one_host());
        let (mut buckets, places) = plan_buckets(param_sizes, bucket_cap, zero_stage == 0);
        let zero = (zero_stage > 0)
            .then(|| crate::zero::ZeroState::plan(comm.as_ref(), &mut buckets, param_sizes.len(), zero_stage));
        let (rank, world) = (comm.rank(), comm.world());
        let value_bytes = if wire == WireFormat::F32 { 4 } else { 2 };
        let bytes_per_step = buckets.iter().map(|b| b.len as u64 * value_bytes).sum();
        let (jobs, job_rx) = channel::<Job>();
        let (results_to, results) = channel();
        let comm: SharedComm = Arc::new(std::sync::Mutex::new(comm));
        let thread_comm = comm.clone();
        let comm_thread = std::thread::Builder::new()
            .name("lockstep-allreduce".into())
            .spawn(move || {
                lockstep_collective::sched::request_prompt_wakeups();
                comm_loop(thread_comm, wire, job_rx)
            })
            .ok();
        let mut reducer = Self {
            buckets,
            places,
            next_launch: 0,
            staged_scalars: Vec::new(),
            jobs,
            results_to,
            results,
            comm_thread,
            bytes_per_step,
            zero,
            rank,
            world,
            bucket_cap,
            value_bytes,
            comm,
            wire,
        };
        reducer.reset();
        reducer
    }

    /// A reducer of other parameters over the same links and communication thread, with
    /// its own buckets (a GAN's second network). Its collectives queue behind this one's
    /// on the thread, so every rank issues them in the same order.
    pub fn sibling(&self, param_sizes: &[Option<usize>]) -> Result<Self> {
        if self.zero.is_some() {
            return Err(WorkerError::Config("a ZeRO reducer has no sibling (parallel.zero = 0 here)".into()));
        }
        let (buckets, places) = plan_buckets(param_sizes, self.bucket_cap, true);
        let (results_to, results) = channel();
        let mut reducer = Self {
            bytes_per_step: buckets.iter().map(|b| b.len as u64 * self.value_bytes).sum(),
            buckets,
            places,
            next_launch: 0,
            staged_scalars: Vec::new(),
            jobs: self.jobs.clone(),
            results_to,
            results,
            comm_thread: None,
            zero: None,
            rank: self.rank,
            world: self.world,
            bucket_cap: self.bucket_cap,
            value_bytes: self.value_bytes,
            comm: self.comm.clone(),
            wire: self.wire,
        };
        reducer.reset();
        Ok(reducer)
    }

    pub(crate) fn reset(&mut self) {
        for b in &mut self.buckets {
            b.pending = b.len;
        }
        self.next_launch = 0;
    }

    /// The last bucket of a plain all-reduce is reduced on the trainer's own thread, in
    /// `finish_grads`: backward is over by then, so there is nothing left to overlap it
    /// with, and handing it to the communication thread and back costs two thread wake-ups
    /// (measured on a loaded 2-core VM: 1–8 ms each, more than the 0.3 ms all-reduce).
    fn runs_inline(&self, id: usize) -> bool {
        self.zero.is_none() && id + 1 == self.buckets.len()
    }

    /// Bucket `id`'s values to reduce: the last one carries the step's scalars.
    fn take_bucket(&mut self, id: usize) -> Result<(Vec<f32>, usize)> {
        let mut data = std::mem::take(&mut self.buckets[id].data);
        let gradient_len = data.len();
        if id + 1 == self.buckets.len() {
            crate::zero::check_scalars(self.zero.as_ref(), self.staged_scalars.len())?;
            data.append(&mut self.staged_scalars);
        }
        Ok((data, gradient_len))
    }

    fn launch_ready(&mut self) -> Result<()> {
        while self.next_launch < self.buckets.len() && self.buckets[self.next_launch].pending == 0 {
            let id = self.next_launch;
            if self.runs_inline(id) {
                return Ok(());
            }
            let (data, gradient_len) = self.take_bucket(id)?;
            self.jobs
                .send(Job::Reduce(id, data, gradient_len, self.zero.is_some(), self.results_to.clone()))
                .map_err(|_| WorkerError::Collective("all-reduce thread has stopped".into()))?;
            self.next_launch += 1;
        }
        Ok(())
    }

    /// All-reduces a few f64 values exactly enough for reporting: each is split into a high
    /// and a low f32 part, summed separately.
    pub(crate) fn reduce_f64(&mut self, values: &mut [f64]) -> Result<()> {
        let mut parts = split_f64(values);
        self.reduce_f32(&mut parts)?;
        join_f64(&parts, values);
        Ok(())
    }

    /// All-reduces `values` in f32 on the comm thread, outside the gradient buckets.
    pub(crate) fn reduce_f32(&mut self, values: &mut [f32]) -> Result<()> {
        self.jobs
            .send(Job::Reduce(usize::MAX, values.to_vec(), 0, false, self.results_to.clone()))
            .map_err(|_| WorkerError::Collective("all-reduce thread has stopped".into()))?;
        let (_, summed) = self.receive()?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    /// Bucket `id`'s reduced values into the parameters' gradients (and the last one's
    /// scalars into `scalars`); the buffer goes back to the bucket.
    fn apply_bucket<B: Backend>(
        &mut self,
        be: &B,
        params: &mut [&mut Param<B>],
        scalars: &mut [f64],
        id: usize,
        mut data: Vec<f32>,
    ) -> Result<()> {
        if id + 1 == self.buckets.len() {
            let grads: usize = self.buckets[id].slots.iter().map(|s| s.len).sum();
            if data.len() != grads + 2 * scalars.len() {
                return Err(WorkerError::Collective(format!(
                    "{} scalars were staged for this step, {} asked for",
                    (data.len().saturating_sub(grads)) / 2,
                    scalars.len()
                )));
            }
            join_f64(&data[grads..], scalars);
            data.truncate(grads);
        }
        for slot in &self.buckets[id].slots {
            be.upload_into(&data[slot.offset..slot.offset + slot.len], &mut params[slot.param].grad, slot.from)?;
        }
        self.buckets[id].data = data;
        Ok(())
    }

    pub(crate) fn receive(&mut self) -> Result<(usize, Vec<f32>)> {
        match self.results.recv() {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(WorkerError::Collective(e)),
            Err(_) => Err(WorkerError::Collective("all-reduce thread has stopped".into())),
        }
    }
}

impl<B: Backend> GradReducer<B> for BucketReducer {
    fn sum_f32(&mut self, values: &mut [f32]) -> Result<()> {
        self.reduce_f32(values)
    }

    fn grad_piece(&self) -> usize {
        // Half a bucket: a bucket then becomes ready at most half a piece after its last
        // value is computed, so the one before the last goes while the final piece
        // computes (measured, MNIST MLP on 2 workers: 4.3–4.8% of the step exposed after
        // backward, against 5.3–7.4% with whole-bucket pieces).
        if self.zero.is_none() {
            (self.bucket_cap / 2).max(1)
        } else {
            usize::MAX
        }
    }

    fn grad_ready(&mut self, be: &B, index: usize, param: &Param<B>, range: Range<usize>) -> Result<()> {
        for p in 0..self.places.get(index).map_or(0, Vec::len) {
            let (b, s) = self.places[index][p];
            let slot = &self.buckets[b].slots[s];
            let (start, end) = (range.start.max(slot.from), range.end.min(slot.from + slot.len));
            if start >= end {
                continue;
            }
            let at = slot.offset + start - slot.from;
            self.ensure_buffer(b)?;
            let bucket = &mut self.buckets[b];
            be.download_into(&param.grad, start, &mut bucket.data[at..at + end - start])?;
            bucket.pending -= end - start;
        }
        self.launch_ready()
    }

    fn stage_scalars(&mut self, values: &[f64]) {
        self.staged_scalars = split_f64(values);
    }

    fn finish_grads(&mut self, be: &B, params: &mut [&mut Param<B>], scalars: &mut [f64]) -> Result<()> {
        if self.zero.is_some() {
            return Err(WorkerError::Internal("a ZeRO reducer hands out gradient shards, not gradients".into()));
        }
        if self.buckets.is_empty() {
            // Everything frozen: the scalars travel alone.
            return self.reduce_f64(scalars);
        }
        let last = self.buckets.len() - 1;
        if self.next_launch != last || self.buckets[last].pending != 0 {
            let left = self.buckets.iter().filter(|b| b.pending != 0).count().max(1);
            return Err(WorkerError::Collective(format!(
                "backward left {left} of {} gradient buckets incomplete",
                self.buckets.len()
            )));
        }
        for _ in 0..last {
            let (id, data) = self.receive()?;
            self.apply_bucket(be, params, scalars, id, data)?;
        }
        // Every earlier bucket is done, so the communication thread is idle: the last one
        // runs here, in the same place in the order of collectives on every rank.
        let (data, gradient_len) = self.take_bucket(last)?;
        let reduced = {
            let mut comm = self.comm.lock().map_err(|_| WorkerError::Collective("all-reduce thread died".into()))?;
            reduce_bucket(comm.as_mut(), self.wire, last, data, gradient_len, false)
        };
        let (id, data) = reduced.map_err(WorkerError::Collective)?;
        self.apply_bucket(be, params, scalars, id, data)?;
        self.reset();
        Ok(())
    }

    fn sibling(&self, param_sizes: &[Option<usize>]) -> Result<Box<dyn GradReducer<B>>> {
        Ok(Box::new(BucketReducer::sibling(self, param_sizes)?))
    }

    fn stat_sync(&self) -> Option<StatSyncHandle> {
        Some(StatSyncHandle(Arc::new(CommStatSync { jobs: std::sync::Mutex::new(self.jobs.clone()) })))
    }

    fn zero(&mut self) -> Option<&mut dyn ShardedReducer> {
        if self.zero.is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn gradient_buffer_bytes(&self) -> u64 {
        match &self.zero {
            Some(zero) => zero.buffer_bytes(&self.buckets),
            None => self.buckets.iter().map(|b| b.len as u64 * 4).sum(),
        }
    }
}

impl Drop for BucketReducer {
    fn drop(&mut self) {
        // Only the thread's owner stops it: a sibling leaves it to the others.
        if let Some(t) = self.comm_thread.take() {
            let _ = self.jobs.send(Job::Stop);
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::{NoReduce, Trainer};
    use lockstep_collective::thread::thread_group;
    use lockstep_kernels::CpuBackend;
    use lockstep_nn::data::{rank_slice, Dataset};
    use lockstep_nn::rng::Stream;
    use lockstep_proto::JobSpec;
    use std::path::Path;

    fn spec(bucket_note: &str) -> JobSpec {
        let text = format!(
            "name = \"t{bucket_note}\"\nseed = 5\n[model]\nkind = \"mlp\"\nhidden = [32, 16]\ndropout = 0.1\n[data]\nkind = \"idx\"\ndir = \"x\"\n[train]\nepochs = 1\nbatch_size = 24\n[optim]\nkind = \"adamw\"\nlr = 0.01\nclip_norm = 1.0\n"
        );
        JobSpec::parse(&text, Path::new("t.toml"), &[]).unwrap()
    }

    fn data() -> Dataset {
        let mut s = Stream::new(9, "data", &[]);
        Dataset {
            features: 20,
            classes: 4,
            x: (0..200 * 20).map(|_| s.normal()).collect(),
            y: (0..200).map(|_| s.below(4) as u32).collect(),
        }
    }

    /// Trains `steps` steps on `world` thread-ranks with buckets of `bucket_bytes`; returns
    /// every rank's final weights.
    fn train(world: usize, bucket_bytes: usize, steps: usize) -> Vec<Vec<f32>> {
        let data = std::sync::Arc::new(data());
        let handles: Vec<_> = thread_group(world)
            .into_iter()
            .map(|comm| {
                let data = data.clone();
                std::thread::spawn(move || {
                    let be = CpuBackend::new(1);
                    let mut trainer = Trainer::new(be, &spec("x"), 20, 4, steps as u64).unwrap();
                    let sizes: Vec<Option<usize>> = trainer.model.params().iter().map(|p| Some(p.numel())).collect();
                    let rank = comm.rank;
                    let mut reducer: Box<dyn GradReducer<CpuBackend>> = if world == 1 {
                        Box::new(NoReduce)
                    } else {
                        Box::new(BucketReducer::new(Box::new(comm), &sizes, bucket_bytes, WireFormat::F32, 0))
                    };
                    for s in 0..steps {
                        let batch: Vec<u32> = ((s * 24) as u32..(s * 24 + 24) as u32).collect();
                        trainer.step(data.as_ref(), rank_slice(&batch, rank, world), reducer.as_mut()).unwrap();
                    }
                    trainer.model.params().iter().flat_map(|p| p.value.clone()).collect::<Vec<f32>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn ranks_agree_bitwise_and_match_single_process() {
        let single = &train(1, 1 << 20, 8)[0];
        for (world, bucket_bytes) in [(2, 1 << 20), (3, 300), (4, 64), (5, 1 << 20)] {
            let ranks = train(world, bucket_bytes, 8);
            for r in &ranks[1..] {
                assert!(
                    r.iter().zip(&ranks[0]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "world {world}: ranks differ"
                );
            }
            let max_rel = ranks[0]
                .iter()
                .zip(single)
                .map(|(a, b)| ((a - b).abs() / b.abs().max(1e-3)) as f64)
                .fold(0.0, f64::max);
            assert!(max_rel < 1e-4, "world {world}: max relative difference to 1 process {max_rel:e}");
        }
    }

    #[test]
    fn bucket_plan_reverse_order_and_frozen_excluded() {
        let comm = thread_group(1).pop().unwrap();
        let r = BucketReducer::new(Box::new(comm), &[Some(10), None, Some(5), Some(8)], 13 * 4, WireFormat::F32, 0);
        // reverse order: 8 then 5 fit in 13; 10 starts a new bucket; index 1 is frozen.
        assert_eq!(r.buckets.len(), 2);
        assert_eq!(r.buckets[0].slots.iter().map(|s| s.param).collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(r.buckets[1].slots.iter().map(|s| s.param).collect::<Vec<_>>(), vec![0]);
        assert!(r.places[1].is_empty());
        assert_eq!(r.bytes_per_step, 23 * 4);
    }

    /// A sliver left over at the end of the plan rides on the bucket before it instead of
    /// costing a collective of its own after backward; its gradients still arrive whole.
    #[test]
    fn a_sliver_at_the_end_joins_the_last_bucket() {
        let comm = thread_group(1).pop().unwrap();
        let mut r = BucketReducer::new(Box::new(comm), &[Some(33)], 16 * 4, WireFormat::F32, 0);
        let plan: Vec<Vec<(usize, usize, usize)>> =
            r.buckets.iter().map(|b| b.slots.iter().map(|s| (s.from, s.offset, s.len)).collect()).collect();
        assert_eq!(plan, vec![vec![(0, 0, 16)], vec![(16, 0, 16), (32, 16, 1)]]);
        assert_eq!(r.places[0], vec![(0, 0), (1, 0), (1, 1)]);
        let be = CpuBackend::new(1);
        let mut p = Param::new(&be, "p".to_string(), &[33], &[0.0; 33], false).unwrap();
        p.grad = (0..33).map(|v| v as f32).collect();
        GradReducer::<CpuBackend>::stage_scalars(&mut r, &[]);
        r.grad_ready(&be, 0, &p, 0..33).unwrap();
        let want = p.grad.clone();
        p.grad.fill(-1.0);
        GradReducer::<CpuBackend>::finish_grads(&mut r, &be, &mut [&mut p], &mut []).unwrap();
        assert_eq!(p.grad, want);
    }

    /// A parameter larger than what is left of a bucket goes on in the next ones, and a
    /// bucket goes out as soon as the pieces that cover it are in, in plan order.
    #[test]
    fn a_split_parameter_fills_buckets_and_its_pieces_launch_them() {
        let comm = thread_group(1).pop().unwrap();
        let mut r = BucketReducer::new(Box::new(comm), &[Some(10), Some(7)], 8 * 4, WireFormat::F32, 0);
        let slots = |b: &Bucket| b.slots.iter().map(|s| (s.param, s.from, s.len)).collect::<Vec<_>>();
        let plan: Vec<_> = r.buckets.iter().map(slots).collect();
        assert_eq!(plan, vec![vec![(1, 0, 7), (0, 0, 1)], vec![(0, 1, 8)], vec![(0, 9, 1)]]);
        let be = CpuBackend::new(1);
        let mut params: Vec<Param<CpuBackend>> = [10usize, 7]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut p = Param::new(&be, format!("p{i}"), &[n], &vec![0.0; n], false).unwrap();
                p.grad = (0..n).map(|v| (10 * i + v) as f32).collect();
                p
            })
            .collect();
        GradReducer::<CpuBackend>::stage_scalars(&mut r, &[1.0]);
        r.grad_ready(&be, 1, &params[1], 0..7).unwrap();
        assert_eq!(r.next_launch, 0, "bucket 0 also holds the first value of parameter 0");
        r.grad_ready(&be, 0, &params[0], 0..4).unwrap();
        assert_eq!(r.next_launch, 1, "bucket 0 complete, bucket 1 still waits for values 4..9");
        r.grad_ready(&be, 0, &params[0], 4..10).unwrap();
        assert_eq!(r.next_launch, 2, "the last bucket runs inline in finish_grads");
        let want: Vec<Vec<f32>> = params.iter().map(|p| p.grad.clone()).collect();
        params.iter_mut().for_each(|p| p.grad.fill(-1.0));
        let mut refs: Vec<&mut Param<CpuBackend>> = params.iter_mut().collect();
        let mut scalars = [0.0];
        GradReducer::<CpuBackend>::finish_grads(&mut r, &be, &mut refs, &mut scalars).unwrap();
        assert_eq!(params.iter().map(|p| p.grad.clone()).collect::<Vec<_>>(), want);
        assert_eq!(scalars, [1.0]);
    }
}
