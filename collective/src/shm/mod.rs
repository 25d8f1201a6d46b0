//! Shared-memory collectives between the ranks of one host.
//!
//! The buffer is cut into P slices, one per member (`chunk_range`); member l owns slice l
//! and forms its sum. A slice is worked through in rounds of `sub_len` floats (the round's
//! *region* of every slice), so the staging buffers stay in cache and several rounds are in
//! flight: in round k each member copies the regions of the other members' slices into its
//! staging slots, then — after one synchronisation — sums its own region across every
//! member's slot (its own input read in place) and publishes the sum, which the others copy
//! out one round later. Staging is double-buffered, so one synchronisation per round
//! suffices (see `all_reduce` for the hazards). Each value is summed once, in member order,
//! and copied everywhere else: every rank ends with identical bits.
//!
//! A synchronisation is a counter per member in the control area: bump your own, then wait
//! for everyone's. Waiting spins briefly, then sleeps on a futex (an oversubscribed host —
//! 4 ranks on 2 cores — must not spin away the core of the rank it waits for), waking every
//! few milliseconds to check the abort word, whether the awaited process still lives
//! (pidfd) and the timeout.

mod handshake;
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
    for q in 0..seg.geometry.world {
        futex_wake_all(seg.progress(q));
    }
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
            handshake::serve(&spec.secret, &spec.group, world, &seg.file, deadline)?;
            seg
        } else {
            Segment::open(handshake::join(&spec.secret, &spec.group, spec.member, deadline)?, geometry)?
        };
        seg.pid(spec.member).store(std::process::id(), Ordering::SeqCst);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let spin = if world <= cores { Duration::from_micros(50) } else { Duration::from_micros(2) };
        let env_us = |k: &str, d: Duration| std::env::var(k).ok().and_then(|v| v.parse().ok()).map_or(d, Duration::from_micros);
        let spin = env_us("LOCKSTEP_SHM_SPIN_US", spin);
        let yield_for = env_us("LOCKSTEP_SHM_YIELD_US", Duration::from_micros(0));
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

    /// Bump this member's counter and wait until every member has reached it.
    fn sync(&mut self) -> Result<()> {
        self.epoch = self.epoch.wrapping_add(1);
        let mine = self.seg.progress(self.member);
        mine.store(self.epoch, Ordering::SeqCst);
        if self.seg.sleepers(self.member).load(Ordering::SeqCst) > 0 {
            futex_wake_all(mine);
        }
        for q in (0..self.world()).filter(|&q| q != self.member) {
            self.wait_for(q)?;
        }
        Ok(())
    }

    fn wait_for(&self, q: usize) -> Result<()> {
        let word = self.seg.progress(q);
        let started = Instant::now();
        // (value, when it last changed) of q's heartbeat.
        let mut beat = (self.seg.heartbeat(q).load(Ordering::Relaxed), started);
        let mut spins = 0u32;
        loop {
            let seen = word.load(Ordering::Acquire);
            if reached(seen, self.epoch) {
                return Ok(());
            }
            spins = spins.wrapping_add(1);
            if spins % 64 != 0 || started.elapsed() < self.spin {
                std::hint::spin_loop();
                continue;
            }
            if started.elapsed() < self.spin + self.yield_for {
                std::thread::yield_now();
                continue;
            }
            let sleepers = self.seg.sleepers(q);
            sleepers.fetch_add(1, Ordering::SeqCst);
            let seen = word.load(Ordering::SeqCst);
            if !reached(seen, self.epoch) {
                futex_wait(word, seen, HEALTH_PERIOD);
            }
            sleepers.fetch_sub(1, Ordering::SeqCst);
            self.check_health(q, started, &mut beat)?;
        }
    }

    fn check_health(&self, q: usize, started: Instant, beat: &mut (u32, Instant)) -> Result<()> {
        let now_beat = self.seg.heartbeat(q).load(Ordering::Relaxed);
        if now_beat != beat.0 {
            *beat = (now_beat, Instant::now());
        }
        let rank = self.ranks[q];
        let failure = match self.seg.abort_word().load(Ordering::SeqCst) {
            0 => None,
            m => Some(format!("aborted by rank {}", self.ranks.get(m as usize - 1).copied().unwrap_or(usize::MAX))),
        };
        let failure = failure.or_else(|| {
            self.peers[q].as_ref().filter(|fd| has_exited(fd)).map(|_| {
                format!("rank {rank} (pid {}) exited", self.seg.pid(q).load(Ordering::Relaxed))
            })
        });
        let failure = failure.or_else(|| {
            (beat.1.elapsed() > HEARTBEAT_TIMEOUT).then(|| {
                format!(
                    "rank {rank} (pid {}) stopped responding: no heartbeat for {:?}",
                    self.seg.pid(q).load(Ordering::Relaxed),
                    beat.1.elapsed()
                )
            })
        });
        let failure = failure.or_else(|| {
            (started.elapsed() > self.timeout).then(|| format!("timed out after {:?} waiting for rank {rank}", self.timeout))
        });
        match failure {
            None => Ok(()),
            Some(why) => {
                mark_aborted(&self.seg, self.member);
                Err(CollectiveError::Link(format!("shared-memory {} failed: {why}", self.op)))
            }
        }
    }

    /// Rounds needed for a buffer of `len` floats.
    fn rounds(&self, len: usize) -> usize {
        let longest = (0..self.world()).map(|l| chunk_range(len, self.world(), l).len()).max().unwrap_or(0);
        longest.div_ceil(self.seg.geometry.sub_len)
    }

    /// Round `k`'s region of member `l`'s slice.
    fn region(&self, len: usize, l: usize, k: usize) -> Range<usize> {
        let slice = chunk_range(len, self.world(), l);
        let sub = self.seg.geometry.sub_len;
        let start = (slice.start + k * sub).min(slice.end);
        start..(start + sub).min(slice.end)
    }

    /// Stage round `k`'s regions of the other members' slices (buffer k mod 2).
    fn stage_inputs(&self, buf: &[f32], k: usize) {
        for l in (0..self.world()).filter(|&l| l != self.member) {
            let r = self.region(buf.len(), l, k);
            self.seg.slot_mut(self.member, k % 2, l, r.len()).copy_from_slice(&buf[r]);
        }
    }

    /// Sum round `k`'s region of our slice over every member, in member order (our own
    /// input read in place), into `buf` and, if `publish`, into the shared result. Blocks
    /// of `BLOCK` floats keep the running sum in L1.
    fn reduce_region(&self, buf: &mut [f32], k: usize, publish: bool) {
        const BLOCK: usize = 1024;
        let (me, b) = (self.member, k % 2);
        let r = self.region(buf.len(), me, k);
        let n = r.len();
        let region = &mut buf[r];
        let inputs: Vec<Option<&[f32]>> =
            (0..self.world()).map(|q| (q != me).then(|| self.seg.slot(q, b, me, n))).collect();
        let result = publish.then(|| self.seg.result_mut(b, me, n));
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
        if let Some(result) = result {
            result.copy_from_slice(region);
        }
    }

    /// Copy round `k`'s published sums of the other members' slices into `buf`.
    fn gather_results(&self, buf: &mut [f32], k: usize) {
        for l in (0..self.world()).filter(|&l| l != self.member) {
            let r = self.region(buf.len(), l, k);
            let n = r.len();
            buf[r].copy_from_slice(self.seg.result(k % 2, l, n));
        }
    }

    /// Publish round `k`'s region of our slice of `buf` (all-gather).
    fn publish_region(&self, buf: &[f32], k: usize) {
        let r = self.region(buf.len(), self.member, k);
        self.seg.result_mut(k % 2, self.member, r.len()).copy_from_slice(&buf[r]);
    }

    fn run<T>(&mut self, op: &'static str, body: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.op = op;
        let out = body(self);
        // Quiescence: after this nobody reads the segment, so the next collective may
        // start on either staging buffer.
        out.and_then(|v| self.sync().map(|_| v))
    }

    /// All-reduce (sum) in place. Round k: S_k, then copy out round k−1's sums, sum round
    /// k's region, stage round k+1's inputs. Hazards, with one synchronisation per round:
    /// slot buffer k+1 (= k−1) is rewritten after S_k, and was read in round k−1's sum,
    /// before S_k; result buffer k (= k−2) is rewritten after S_k and was read in round
    /// k−2's copy-out, before S_k.
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
            for (k, values) in buf.chunks_mut(chunk).enumerate() {
                // The result regions of one buffer are contiguous: they hold one chunk.
                if c.member == root {
                    c.seg.result_mut_span(k % 2, values.len()).copy_from_slice(values);
                }
                c.sync()?;
                if c.member != root {
                    values.copy_from_slice(c.seg.result_span(k % 2, values.len()));
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
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.ranks.len() <= 1 {
            return Ok(());
        }
        self.all_reduce_in_place(buf)
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
        self.run("barrier", |_| Ok(()))
    }
}

#[cfg(test)]
mod tests;
