//! Shared-memory collectives between the ranks of one host.
//!
//! The buffer is cut into P slices, one per member (`chunk_range`); member l owns slice l
//! and forms its sum. A slice is worked through in rounds of `sub_len` floats (the round's
//! *region* of every slice), so the staging buffers stay in cache and several rounds are in
//! flight: in round k each member copies the regions of the other members' slices into its
//! staging slots, then — after one synchronisation — sums its own region across every
//! member's slot (its own input read in place) and publishes the sum, which the others copy
//! out one round later. Staging is double-buffered, so one synchronisation per round
//! suffices (see `write_parity` for the rule that makes it safe). Each value is summed once, in member order,
//! and copied everywhere else: every rank ends with identical bits.
//!
//! A synchronisation is one shared arrival counter in the control area: add one, then wait
//! until every member has. Waiting spins briefly, then sleeps on a futex (an oversubscribed host —
//! 4 ranks on 2 cores — must not spin away the core of the rank it waits for), waking every
//! few milliseconds to check the abort word, whether the awaited process still lives
//! (pidfd) and the timeout.

mod handshake;
pub mod pipe;
mod segment;

use crate::ring::chunk_range;
use crate::{CollectiveError, Communicator, Result};
use segment::{futex_wait, futex_wake_all, has_exited, pidfd_open, Geometry, Segment};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Floats per member per round: 64 Ki (256 KiB) keeps a round's staging in L2/L3.
pub const DEFAULT_SUB_LEN: usize = 64 << 10;
/// Floats a round covers across all members: 1 MiB of the buffer.
const ROUND_FLOATS: usize = 256 << 10;

/// Floats per member per round for a group of `world`: a round covers 1 MiB of the buffer
/// whatever the group's size, so 2 members take 512 KiB each and a 1 MiB all-reduce is one
/// round (two synchronisations, not three: measured +20% busbw at 1 MiB, n = 2), while
/// larger groups keep their staging (world − 1 regions) near L2.
pub fn sub_len_for(world: usize) -> usize {
    (ROUND_FLOATS / world.max(2)).max(16 << 10)
}
/// How long a sleeping waiter sleeps between health checks.
const HEALTH_PERIOD: Duration = Duration::from_millis(5);
/// Every member's heartbeat thread bumps its word this often...
const HEARTBEAT_PERIOD: Duration = Duration::from_millis(500);
/// ...and a member whose heartbeat stood still this long is frozen (SIGSTOP, a hung host):
/// the same 10 s as the QUIC idle timeout of the control plane.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is in a group and how it finds its segment.
#[derive(Debug, Clone)]
pub struct ShmGroupSpec {
    /// The job's secret, from the authenticated control plane.
    pub secret: Vec<u8>,
    /// Names this group among the job's groups (e.g. "host-3"); part of the socket name.
    pub group: String,
    /// This process's index in `ranks`.
    pub member: usize,
    /// The global rank of each member, for messages.
    pub ranks: Vec<usize>,
    /// Setup deadline and the longest a collective waits for a member.
    pub timeout: Duration,
    pub sub_len: usize,
}

pub struct ShmComm {
    seg: Arc<Segment>,
    member: usize,
    ranks: Vec<usize>,
    /// This member's synchronisation count.
    epoch: u32,
    /// A pidfd for every other member (None: our own place, or pidfd unsupported).
    peers: Vec<Option<OwnedFd>>,
    timeout: Duration,
    spin: Duration,
    yield_for: Duration,
    /// What the collective in progress is, for messages.
    op: &'static str,
    /// Dropping it stops this member's heartbeat thread.
    _heartbeat: std::sync::mpsc::Sender<()>,
}

/// Bumps `member`'s heartbeat word until the sender is dropped.
fn start_heartbeat(seg: Arc<Segment>, member: usize) -> std::sync::mpsc::Sender<()> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let beat = move || {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(HEARTBEAT_PERIOD) {
            seg.heartbeat(member).fetch_add(1, Ordering::Relaxed);
        }
    };
    if let Err(e) = std::thread::Builder::new().name("lockstep-shm-heartbeat".into()).spawn(beat) {
        tracing::warn!("shared memory: no heartbeat thread ({e}); a frozen peer is found by the timeout only");
    }
    stop
}

/// Fails a group's collectives from another thread (the coordinator aborted the task).
#[derive(Clone)]
pub struct ShmAbort {
    seg: Arc<Segment>,
    member: usize,
}

impl ShmAbort {
    pub fn abort(&self) {
        mark_aborted(&self.seg, self.member);
    }
}

fn mark_aborted(seg: &Segment, member: usize) {
    let _ = seg.abort_word().compare_exchange(0, 1 + member as u32, Ordering::SeqCst, Ordering::SeqCst);
    futex_wake_all(seg.arrivals());
}

/// How long a waiter spins, then polls with `sched_yield`, before it sleeps. Yielding
/// polls about as fast as spinning when the waiter has its core to itself, and gives the
/// core away when the late rank is queued on it (ranks outnumber cores, or two share one
/// for a while): measured on 2 cores, 4 ranks, 1 MiB, 0.35–0.46 ms with yielding against
/// 0.79–0.81 ms spinning 2 µs before sleeping. `LOCKSTEP_SHM_SPIN_US` /
/// `LOCKSTEP_SHM_YIELD_US` override both. Beside a training step (`beside_compute`) the
/// core is never idle, and a yielding waiter gets it back only when the trainer's time slice
/// ends: there it spins briefly and sleeps (measured, MNIST MLP on 2 workers × 1 core: the
/// first gradient bucket finished 1.5 ms late, after backward, in most steps when yielding;
/// during backward when sleeping).
fn wait_policy(world: usize, beside_compute: bool) -> (Duration, Duration) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (spin, yield_for) = match (beside_compute, world <= cores) {
        (true, _) => (5, 0),
        (false, true) => (5, 200),
        (false, false) => (0, 100),
    };
    let micros = |key: &str, default: u64| {
        Duration::from_micros(std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
    };
    (micros("LOCKSTEP_SHM_SPIN_US", spin), micros("LOCKSTEP_SHM_YIELD_US", yield_for))
}

/// `a` has reached `b` on a wrapping counter.
fn reached(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

impl ShmComm {
    /// Forms the group: member 0 makes the segment and hands it to the others.
    pub fn connect(spec: &ShmGroupSpec) -> Result<Self> {
        let world = spec.ranks.len();
        if spec.member >= world || spec.sub_len == 0 {
            return Err(CollectiveError::Protocol(format!(
                "shared-memory group {}: member {} of {world}, {} floats a round",
                spec.group, spec.member, spec.sub_len
            )));
        }
        let geometry = Geometry { world, sub_len: spec.sub_len };
        let deadline = Instant::now() + spec.timeout;
        let seg = if spec.member == 0 {
            let seg = Segment::create(geometry)?;
            handshake::serve(&spec.secret, &spec.group, world, seg.file(), deadline)?;
            seg
        } else {
            Segment::open(handshake::join(&spec.secret, &spec.group, spec.member, deadline)?, geometry)?
        };
        seg.pid(spec.member).store(std::process::id(), Ordering::SeqCst);
        let (spin, yield_for) = wait_policy(world, false);
        let seg = Arc::new(seg);
        let heartbeat = start_heartbeat(seg.clone(), spec.member);
        let mut comm = Self {
            seg,
            _heartbeat: heartbeat,
            member: spec.member,
            ranks: spec.ranks.clone(),
            epoch: 0,
            peers: (0..world).map(|_| None).collect(),
            timeout: spec.timeout,
            spin,
            yield_for,
            op: "shared-memory setup",
        };
        comm.sync()?; // every pid is written
        for q in (0..world).filter(|&q| q != spec.member) {
            comm.peers[q] = pidfd_open(comm.seg.pid(q).load(Ordering::SeqCst));
        }
        Ok(comm)
    }

    pub fn abort_handle(&self) -> ShmAbort {
        ShmAbort { seg: self.seg.clone(), member: self.member }
    }

    fn world(&self) -> usize {
        self.ranks.len()
    }

    /// Arrive and wait until every member has: one shared arrival counter (after epoch e
    /// it reads e·P), so a waiter sleeps at most once and the last to arrive wakes all.
    /// The per-member progress words say who is missing when something fails.
    fn sync(&mut self) -> Result<()> {
        self.epoch = self.epoch.wrapping_add(1);
        self.seg.progress(self.member).store(self.epoch, Ordering::SeqCst);
        let target = self.epoch.wrapping_mul(self.world() as u32);
        let arrivals = self.seg.arrivals();
        if arrivals.fetch_add(1, Ordering::SeqCst).wrapping_add(1) == target {
            if self.seg.arrival_sleepers().load(Ordering::SeqCst) > 0 {
                futex_wake_all(arrivals);
            }
            return Ok(());
        }
        self.wait_for_all(target)
    }

    fn wait_for_all(&self, target: u32) -> Result<()> {
        let arrivals = self.seg.arrivals();
        let started = Instant::now();
        // (value, when it last changed) of every member's heartbeat.
        let mut beats: Vec<(u32, Instant)> =
            (0..self.world()).map(|q| (self.seg.heartbeat(q).load(Ordering::Relaxed), started)).collect();
        let mut spins = 0u32;
        loop {
            let seen = arrivals.load(Ordering::Acquire);
            if reached(seen, target) {
                return Ok(());
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || started.elapsed() < self.spin {
                std::hint::spin_loop();
                continue;
            }
            if started.elapsed() < self.spin + self.yield_for {
                std::thread::yield_now();
                continue;
            }
            let sleepers = self.seg.arrival_sleepers();
            sleepers.fetch_add(1, Ordering::SeqCst);
            let seen = arrivals.load(Ordering::SeqCst);
            if !reached(seen, target) {
                futex_wait(arrivals, seen, HEALTH_PERIOD);
            }
            sleepers.fetch_sub(1, Ordering::SeqCst);
            self.check_health(started, &mut beats)?;
        }
    }

    /// Fails the collective if it was aborted, or a member that has not arrived is dead,
    /// frozen or past the timeout.
    fn check_health(&self, started: Instant, beats: &mut [(u32, Instant)]) -> Result<()> {
        let missing: Vec<usize> =
            (0..self.world()).filter(|&q| !reached(self.seg.progress(q).load(Ordering::SeqCst), self.epoch)).collect();
        for (q, beat) in beats.iter_mut().enumerate() {
            let now = self.seg.heartbeat(q).load(Ordering::Relaxed);
            if now != beat.0 {
                *beat = (now, Instant::now());
            }
        }
        let pid = |q: usize| self.seg.pid(q).load(Ordering::Relaxed);
        let failure = match self.seg.abort_word().load(Ordering::SeqCst) {
            0 => None,
            m => Some(format!("aborted by rank {}", self.ranks.get(m as usize - 1).copied().unwrap_or(usize::MAX))),
        };
        let failure = failure.or_else(|| {
            let dead = missing.iter().find(|&&q| self.peers[q].as_ref().is_some_and(has_exited))?;
            Some(format!("rank {} (pid {}) exited", self.ranks[*dead], pid(*dead)))
        });
        let failure = failure.or_else(|| {
            let frozen = missing.iter().find(|&&q| beats[q].1.elapsed() > HEARTBEAT_TIMEOUT)?;
            Some(format!(
                "rank {} (pid {}) stopped responding: no heartbeat for {:?}",
                self.ranks[*frozen],
                pid(*frozen),
                beats[*frozen].1.elapsed()
            ))
        });
        let failure = failure.or_else(|| {
            let late: Vec<usize> = missing.iter().map(|&q| self.ranks[q]).collect();
            (started.elapsed() > self.timeout)
                .then(|| format!("timed out after {:?} waiting for ranks {late:?}", self.timeout))
        });
        match failure {
            None => Ok(()),
            Some(why) => {
                mark_aborted(&self.seg, self.member);
                Err(CollectiveError::Link(format!("shared-memory {} failed: {why}", self.op)))
            }
        }
    }

    /// Staging parity of data read now (written before the last synchronisation)...
    fn read_parity(&self) -> usize {
        (self.epoch % 2) as usize
    }

    /// ...and of data written now, to be read after the next one. Every collective keeps
    /// to this rule (written before S_r, read between S_r and S_r+1, buffer r mod 2), so
    /// a buffer is never rewritten while a member may still read it, across collectives
    /// too: none needs a closing synchronisation.
    fn write_parity(&self) -> usize {
        (self.epoch.wrapping_add(1) % 2) as usize
    }

    fn longest_slice(&self, len: usize) -> usize {
        (0..self.world()).map(|l| chunk_range(len, self.world(), l).len()).max().unwrap_or(0)
    }

    /// Floats per member in each round of a `len`-float collective: the whole slice in one
    /// round when it fits the staging (fewest synchronisations for small buffers), else
    /// rounds of at most `DEFAULT_SUB_LEN`, whose working set stays in L2 (measured at
    /// n = 2, 4 MiB: up to 20 GB/s busbw in 256 KiB rounds, 8–9 in 512 KiB ones).
    fn round_len(&self, len: usize) -> usize {
        let staging = self.seg.geometry.sub_len;
        if self.longest_slice(len) <= staging {
            staging
        } else {
            staging.min(DEFAULT_SUB_LEN)
        }
    }

    /// Rounds needed for a buffer of `len` floats.
    fn rounds(&self, len: usize) -> usize {
        self.longest_slice(len).div_ceil(self.round_len(len))
    }

    /// Round `k`'s region of member `l`'s slice.
    fn region(&self, len: usize, l: usize, k: usize) -> Range<usize> {
        let slice = chunk_range(len, self.world(), l);
        let sub = self.round_len(len);
        let start = (slice.start + k * sub).min(slice.end);
        start..(start + sub).min(slice.end)
    }

    /// Stage round `k`'s regions of the other members' slices.
    fn stage_inputs(&self, buf: &[f32], k: usize) {
        let b = self.write_parity();
        for l in (0..self.world()).filter(|&l| l != self.member) {
            let r = self.region(buf.len(), l, k);
            self.seg.slot_mut(self.member, b, l, r.len()).copy_from_slice(&buf[r]);
        }
    }

    /// Sum round `k`'s region of our slice over every member, in member order (our own
    /// input read in place), into `buf` and, if `publish`, into the shared result. Blocks
    /// of `BLOCK` floats keep the running sum in L1.
    fn reduce_region(&self, buf: &mut [f32], k: usize, publish: bool) {
        const BLOCK: usize = 1024;
        let me = self.member;
        let r = self.region(buf.len(), me, k);
        let n = r.len();
        let region = &mut buf[r];
        let b = self.read_parity();
        let inputs: Vec<Option<&[f32]>> =
            (0..self.world()).map(|q| (q != me).then(|| self.seg.slot(q, b, me, n))).collect();
        let mut acc = [0.0f32; BLOCK];
        for start in (0..n).step_by(BLOCK) {
            let end = (start + BLOCK).min(n);
            let acc = &mut acc[..end - start];
            for (q, input) in inputs.iter().enumerate() {
                let values = input.map_or(&region[start..end], |s| &s[start..end]);
                if q == 0 {
                    acc.copy_from_slice(values);
                } else {
                    acc.iter_mut().zip(values).for_each(|(a, v)| *a += v);
                }
            }
            region[start..end].copy_from_slice(acc);
        }
        if publish {
            self.seg.result_mut(self.write_parity(), me, n).copy_from_slice(region);
        }
    }

    /// Copy round `k`'s published regions of the other members' slices into `buf`.
    fn gather_results(&self, buf: &mut [f32], k: usize) {
        let b = self.read_parity();
        for l in (0..self.world()).filter(|&l| l != self.member) {
            let r = self.region(buf.len(), l, k);
            let n = r.len();
            buf[r].copy_from_slice(self.seg.result(b, l, n));
        }
    }

    /// Publish round `k`'s region of our slice of `buf` (all-gather).
    fn publish_region(&self, buf: &[f32], k: usize) {
        let r = self.region(buf.len(), self.member, k);
        self.seg.result_mut(self.write_parity(), self.member, r.len()).copy_from_slice(&buf[r]);
    }

    fn run<T>(&mut self, op: &'static str, body: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.op = op;
        body(self)
    }

    /// All-reduce (sum) in place, R rounds and R+1 synchronisations: after S_k, copy out
    /// round k−1's sums, sum round k's region, stage round k+1's inputs.
    fn all_reduce_in_place(&mut self, buf: &mut [f32]) -> Result<()> {
        let rounds = self.rounds(buf.len());
        self.run("all-reduce", |c| {
            if rounds == 0 {
                return Ok(());
            }
            c.stage_inputs(buf, 0);
            for k in 0..rounds {
                c.sync()?;
                if k > 0 {
                    c.gather_results(buf, k - 1);
                }
                c.reduce_region(buf, k, true);
                if k + 1 < rounds {
                    c.stage_inputs(buf, k + 1);
                }
            }
            c.sync()?;
            c.gather_results(buf, rounds - 1);
            Ok(())
        })
    }

    /// Reduce-scatter in place: afterwards this member's slice
    /// (`chunk_range(len, world, member)`) of `buf` holds the group's sum; the rest of `buf`
    /// is left as it was.
    pub fn reduce_scatter(&mut self, buf: &mut [f32]) -> Result<()> {
        let rounds = self.rounds(buf.len());
        self.run("reduce-scatter", |c| {
            if rounds == 0 {
                return Ok(());
            }
            c.stage_inputs(buf, 0);
            for k in 0..rounds {
                c.sync()?;
                c.reduce_region(buf, k, false);
                if k + 1 < rounds {
                    c.stage_inputs(buf, k + 1);
                }
            }
            Ok(())
        })
    }

    /// All-gather in place: every member's slice of `buf` goes to every member.
    pub fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        let rounds = self.rounds(buf.len());
        self.run("all-gather", |c| {
            for k in 0..rounds {
                c.publish_region(buf, k);
                c.sync()?;
                c.gather_results(buf, k);
            }
            Ok(())
        })
    }

    /// The member's slice of a buffer of `len` floats after `reduce_scatter`.
    pub fn slice(&self, len: usize) -> Range<usize> {
        chunk_range(len, self.world(), self.member)
    }

    /// Broadcast from `root`: per round, root publishes a chunk of all P regions' room and
    /// the others copy it.
    fn broadcast_in_place(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let world = self.world();
        let chunk = world * self.seg.geometry.sub_len;
        self.run("broadcast", |c| {
            for values in buf.chunks_mut(chunk) {
                // The result regions of one buffer are contiguous: they hold one chunk.
                if c.member == root {
                    c.seg.result_mut_span(c.write_parity(), values.len()).copy_from_slice(values);
                }
                c.sync()?;
                if c.member != root {
                    values.copy_from_slice(c.seg.result_span(c.read_parity(), values.len()));
                }
            }
            Ok(())
        })
    }
}

impl Communicator for ShmComm {
    fn rank(&self) -> usize {
        self.member
    }
    fn world(&self) -> usize {
        self.ranks.len()
    }
    fn on_one_host(&self) -> bool {
        true
    }
    fn set_beside_compute(&mut self, beside: bool) {
        (self.spin, self.yield_for) = wait_policy(self.ranks.len(), beside);
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.ranks.len() <= 1 {
            return Ok(());
        }
        self.all_reduce_in_place(buf)
    }
    fn shard_of(&self, len: usize, rank: usize) -> Range<usize> {
        chunk_range(len, self.world(), rank)
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.ranks.len() <= 1 {
            return Ok(());
        }
        self.reduce_scatter(buf)
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.ranks.len() <= 1 {
            return Ok(());
        }
        ShmComm::all_gather(self, buf)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.ranks.len() {
            return Err(CollectiveError::Protocol(format!("broadcast root {root} of {} ranks", self.ranks.len())));
        }
        if self.ranks.len() <= 1 {
            return Ok(());
        }
        self.broadcast_in_place(buf, root)
    }
    fn barrier(&mut self) -> Result<()> {
        self.run("barrier", |c| c.sync())
    }
}

#[cfg(test)]
mod tests;
