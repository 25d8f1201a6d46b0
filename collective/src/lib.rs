//! lockstep-collective: the `Communicator` trait and its implementations.
//!
//! The ring algorithms (`ring`) are written once against a `RingLink` (send to the next
//! rank, receive from the previous one). Links: `thread` (in-process channels, for tests)
//! `quic` (QUIC connections between processes, certificates pinned both ways) and `tcp`
//! (TLS 1.3 over TCP with the same pinned certificates).

#[cfg(target_endian = "big")]
compile_error!("lockstep sends tensors as raw little-endian bytes");

pub mod hier;
pub mod mesh;
pub mod pipe;
pub mod quic;
pub mod ring;
pub mod sched;
pub mod shm;
pub mod tcp;
pub mod thread;
pub mod tls;
pub mod topology;

pub use ring::{ring_all_reduce, ring_all_reduce_as, ring_broadcast, RingComm, RingLink, WireFormat};

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("peer link: {0}")]
    Link(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

/// Collective operations of one rank in a group. Every rank of the group must make the same
/// calls in the same order; after an all-reduce every rank holds identical bits.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Whether every rank of the group is on this host, in shared memory: a collective then
    /// costs microseconds, not round trips, so a reducer can afford small buckets.
    fn on_one_host(&self) -> bool {
        false
    }
    /// Tells the communicator that the threads calling it share their cores with busy
    /// compute threads (a training step), so a wait should sleep rather than poll: a
    /// poller that yields its core to the trainer gets it back only when the trainer's
    /// time slice ends, milliseconds later. Default: nothing to change.
    fn set_beside_compute(&mut self, beside: bool) {
        let _ = beside;
    }
    /// In place: buf ← Σ over ranks of buf.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// `all_reduce_sum` with `buf[..half_len]` travelling in a 16-bit `format` (T25). A
    /// communicator without compression sends f32.
    fn all_reduce_sum_as(&mut self, buf: &mut [f32], format: ring::WireFormat, half_len: usize) -> Result<()> {
        let _ = (format, half_len);
        self.all_reduce_sum(buf)
    }
    /// In place: every rank's buf ← root's buf.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// The range of a `len`-value buffer that `rank` holds summed after
    /// [`reduce_scatter_sum`](Self::reduce_scatter_sum). The ranges of all ranks partition
    /// the buffer; each implementation picks the one its algorithm produces.
    fn shard_of(&self, len: usize, rank: usize) -> std::ops::Range<usize> {
        ring::chunk_range(len, self.world(), rank)
    }
    /// In place: this rank's shard (`shard_of(buf.len(), rank)`) of `buf` ← Σ over ranks;
    /// the rest of `buf` is left unspecified. Each shard gets the very bits
    /// `all_reduce_sum` would give it (ZeRO depends on that). The default all-reduces.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)
    }
    /// In place: every rank's shard of `buf` to every rank. The default all-reduces with
    /// the other shards set to −0.0, the exact identity of IEEE addition (x + −0 = x for
    /// every x, +0 included), so every value arrives with its bits.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        let mine = self.shard_of(buf.len(), self.rank());
        buf[..mine.start].fill(-0.0);
        buf[mine.end..].fill(-0.0);
        self.all_reduce_sum(buf)
    }
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()> {
        let mut token = [0.0f32];
        self.all_reduce_sum(&mut token)
    }
}

/// f64 values as (high, low) f32 pairs for an f32 collective to sum: losses, target counts
/// and votes travel this way. Each rank's value is kept to ~48 bits, but the high parts'
/// sum is rounded to f32, so the total is good to ~2^-24 of itself: fine for reports,
/// exact for integers below 2^24, not for anything an update depends on.
pub fn split_f64(values: &[f64]) -> Vec<f32> {
    values
        .iter()
        .flat_map(|&v| {
            let hi = v as f32;
            [hi, (v - hi as f64) as f32]
        })
        .collect()
}

/// The inverse of [`split_f64`]: each (high, low) pair of `parts` back into `values`.
pub fn join_f64(parts: &[f32], values: &mut [f64]) {
    for (v, pair) in values.iter_mut().zip(parts.chunks_exact(2)) {
        *v = pair[0] as f64 + pair[1] as f64;
    }
}
