//! Ring collectives over any `RingLink`.
//!
//! All-reduce = reduce-scatter then all-gather (Patarasuk & Yuan). The buffer is cut into
//! `world` chunks. In reduce-scatter step s, rank r sends chunk (r−s) mod W to r+1 and adds
//! the chunk (r−s−1) mod W it receives from r−1; after W−1 steps rank r owns the full sum
//! of chunk (r+1) mod W. All-gather then passes the owned chunks around the ring. Each chunk
//! is summed at exactly one place and copied everywhere else, so every rank ends with
//! identical bits. Each rank sends 2(W−1)/W of the buffer: bandwidth-optimal.

use crate::{Communicator, Result};

/// A rank's two ring neighbours.
pub trait RingLink: Send {
    /// Sends `send` to the next rank while receiving exactly `recv.len()` values from the
    /// previous rank (concurrently, so large messages cannot deadlock the ring).
    fn exchange(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()>;
}

/// [start, end) of chunk `c` when `len` values are cut into `world` near-equal chunks.
pub fn chunk_range(len: usize, world: usize, c: usize) -> std::ops::Range<usize> {
    (c * len / world)..((c + 1) * len / world)
}

pub fn ring_all_reduce(link: &mut dyn RingLink, rank: usize, world: usize, buf: &mut [f32]) -> Result<()> {
    if world <= 1 {
        return Ok(());
    }
    let len = buf.len();
    let max_chunk = (0..world).map(|c| chunk_range(len, world, c).len()).max().unwrap_or(0);
    let mut incoming = vec![0.0f32; max_chunk];
    // Reduce-scatter.
    for s in 0..world - 1 {
        let send = chunk_range(len, world, (rank + world - s) % world);
        let recv = chunk_range(len, world, (rank + 2 * world - s - 1) % world);
        let n = recv.len();
        link.exchange(&buf[send], &mut incoming[..n])?;
        for (b, x) in buf[recv].iter_mut().zip(&incoming[..n]) {
            *b += x;
        }
    }
    // All-gather.
    for s in 0..world - 1 {
        let send = chunk_range(len, world, (rank + 1 + world - s) % world);
        let recv = chunk_range(len, world, (rank + world - s) % world);
        let n = recv.len();
        link.exchange(&buf[send], &mut incoming[..n])?;
        buf[recv].copy_from_slice(&incoming[..n]);
    }
    Ok(())
}

/// Root's buffer to every rank, passed along the ring (W−1 hops, one message each).
pub fn ring_broadcast(link: &mut dyn RingLink, rank: usize, world: usize, buf: &mut [f32], root: usize) -> Result<()> {
    if world <= 1 {
        return Ok(());
    }
    // Hop h carries root's buffer from rank root+h to root+h+1. Every rank takes part in
    // every hop (exchange is symmetric), sending its current buffer and keeping what it
    // receives only on the hop that reaches it.
    let distance = (rank + world - root) % world; // hops from root to me
    let mut incoming = vec![0.0f32; buf.len()];
    for hop in 1..world {
        link.exchange(buf, &mut incoming)?;
        if hop == distance {
            buf.copy_from_slice(&incoming);
        }
    }
    Ok(())
}

/// A `Communicator` running the ring algorithms over a link.
pub struct RingComm<L: RingLink> {
    pub link: L,
    pub rank: usize,
    pub world: usize,
}

impl<L: RingLink> Communicator for RingComm<L> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        ring_all_reduce(&mut self.link, self.rank, self.world, buf)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        ring_broadcast(&mut self.link, self.rank, self.world, buf, root)
    }
}

/// A link for world size 1 (nothing to exchange).
pub struct SoloLink;

impl RingLink for SoloLink {
    fn exchange(&mut self, _: &[f32], _: &mut [f32]) -> Result<()> {
        Ok(())
    }
}
