//! Ring collectives over any `RingLink`.
//!
//! All-reduce = reduce-scatter then all-gather (Patarasuk & Yuan). The buffer is cut into
//! `world` chunks. In reduce-scatter step s, rank r sends chunk (r−s) mod W to r+1 and adds
//! the chunk (r−s−1) mod W it receives from r−1; after W−1 steps rank r owns the full sum
//! of chunk (r+1) mod W. All-gather then passes the owned chunks around the ring. Each chunk
//! is summed at exactly one place and copied everywhere else, so every rank ends with
//! identical bits. Each rank sends 2(W−1)/W of the buffer: bandwidth-optimal. Links that
//! deliver in slices (`RingLink::exchange_sliced`) let a rank add slice k while k+1 moves.

use crate::{Communicator, Result};

/// A rank's two ring neighbours.
pub trait RingLink: Send {
    /// Sends `send` to the next rank while receiving exactly `recv.len()` bytes from the
    /// previous rank (concurrently, so large messages cannot deadlock the ring).
    fn exchange_bytes(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()>;

    /// `exchange_bytes`, calling `arrived(received, range)` as parts of `recv` come in
    /// (`received` is `recv` up to `range.end`), so the caller can work on one part while
    /// the next is on the wire. The default hands over everything at the end.
    fn exchange_sliced(
        &mut self,
        send: &[u8],
        recv: &mut [u8],
        arrived: &mut dyn FnMut(&[u8], std::ops::Range<usize>),
    ) -> Result<()> {
        self.exchange_bytes(send, recv)?;
        arrived(recv, 0..recv.len());
        Ok(())
    }

    /// Sends `send` to the next rank while adding the f32 values received from the
    /// previous rank, `sums.len()` of them, into `sums` (a reduce-scatter step). The default
    /// receives into a buffer kept per thread and adds each slice as it arrives; a link
    /// that hands out its own receive buffers adds straight from them.
    fn exchange_add(&mut self, send: &[u8], sums: &mut [f32]) -> Result<()> {
        // A fresh vector per call would be a fresh mmap of up to 1/W of the largest bucket,
        // page-faulted in on every collective (measured: ~10% of a 64 MiB QUIC all-reduce).
        let mut incoming = INCOMING.take();
        incoming.resize(sums.len(), 0.0);
        // Add each slice as it arrives (slice boundaries are multiples of 4 bytes).
        let mut add = |received: &[u8], bytes: std::ops::Range<usize>| {
            let values: &[f32] = bytemuck::cast_slice(received);
            let part = bytes.start / 4..bytes.end / 4;
            sums[part.clone()].iter_mut().zip(&values[part]).for_each(|(s, x)| *s += x);
        };
        let outcome = self.exchange_sliced(send, bytemuck::cast_slice_mut(&mut incoming[..]), &mut add);
        INCOMING.set(incoming);
        outcome
    }

    /// `exchange_bytes` of f32 values.
    fn exchange(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.exchange_bytes(bytemuck::cast_slice(send), bytemuck::cast_slice_mut(recv))
    }
}

/// The header a network link puts before each ring message: its sequence number and length.
pub(crate) fn message_header(seq: u64, len: usize) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&seq.to_le_bytes());
    header[8..].copy_from_slice(&(len as u64).to_le_bytes());
    header
}

/// Checks a received header against the message the ring expects next from `prev_rank`.
pub(crate) fn check_message_header(header: [u8; 16], seq: u64, want_len: usize, prev_rank: usize) -> Result<()> {
    let [got_seq, got_len] = [&header[..8], &header[8..]].map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    if got_seq != seq || got_len != want_len as u64 {
        return Err(crate::CollectiveError::Protocol(format!(
            "rank {prev_rank} sent message {got_seq} of {got_len} bytes; expected message {seq} of {want_len} bytes"
        )));
    }
    Ok(())
}

/// `send` and `recv`, two disjoint ranges of `buf`, borrowed together.
fn send_and_recv(buf: &mut [f32], send: std::ops::Range<usize>, recv: std::ops::Range<usize>) -> (&[f32], &mut [f32]) {
    debug_assert!(send.end <= recv.start || recv.end <= send.start || send.is_empty() || recv.is_empty());
    if recv.start >= send.end {
        let (low, high) = buf.split_at_mut(recv.start);
        (&low[send], &mut high[..recv.len()])
    } else {
        let (low, high) = buf.split_at_mut(send.start);
        (&high[..send.len()], &mut low[recv])
    }
}

/// [start, end) of chunk `c` when `len` values are cut into `world` near-equal chunks.
pub fn chunk_range(len: usize, world: usize, c: usize) -> std::ops::Range<usize> {
    (c * len / world)..((c + 1) * len / world)
}

pub fn ring_all_reduce(link: &mut dyn RingLink, rank: usize, world: usize, buf: &mut [f32]) -> Result<()> {
    ring_reduce_scatter(link, rank, world, buf)?;
    ring_all_gather(link, rank, world, buf)
}

/// The chunk rank `rank` owns summed after `ring_reduce_scatter`: (rank + 1) mod W.
pub fn ring_shard(len: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    chunk_range(len, world, (rank + 1) % world)
}

/// The reduce-scatter half of the ring: afterwards `buf[ring_shard(..)]` holds the sum.
pub fn ring_reduce_scatter(link: &mut dyn RingLink, rank: usize, world: usize, buf: &mut [f32]) -> Result<()> {
    if world <= 1 {
        return Ok(());
    }
    let len = buf.len();
    for s in 0..world - 1 {
        let send = chunk_range(len, world, (rank + world - s) % world);
        let recv = chunk_range(len, world, (rank + 2 * world - s - 1) % world);
        let (outgoing, sums) = send_and_recv(buf, send, recv);
        link.exchange_add(bytemuck::cast_slice(outgoing), sums)?;
    }
    Ok(())
}

thread_local! {
    /// The receive buffer of `RingLink::exchange_add`, kept per thread between calls.
    static INCOMING: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Adds little-endian f32 values arriving as byte runs of any length and alignment (a
/// network stream's own buffers) into `sums`, in order; a value split between two runs
/// waits in `carry`.
pub(crate) struct ByteAdder<'a> {
    sums: &'a mut [f32],
    /// Bytes added so far.
    at: usize,
    carry: [u8; 4],
}

impl<'a> ByteAdder<'a> {
    pub(crate) fn new(sums: &'a mut [f32]) -> Self {
        Self { sums, at: 0, carry: [0; 4] }
    }

    /// Bytes still expected.
    pub(crate) fn remaining(&self) -> usize {
        4 * self.sums.len() - self.at
    }

    /// Adds the next run of bytes (at most `remaining()`).
    pub(crate) fn add(&mut self, mut bytes: &[u8]) {
        let partial = self.at % 4;
        if partial != 0 {
            let take = (4 - partial).min(bytes.len());
            self.carry[partial..partial + take].copy_from_slice(&bytes[..take]);
            (self.at, bytes) = (self.at + take, &bytes[take..]);
            if self.at.is_multiple_of(4) {
                self.sums[self.at / 4 - 1] += f32::from_le_bytes(self.carry);
            }
        }
        let whole = bytes.len() / 4 * 4;
        let start = self.at / 4;
        for (s, v) in self.sums[start..start + whole / 4].iter_mut().zip(bytes.chunks_exact(4)) {
            *s += f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
        }
        let rest = &bytes[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.at += bytes.len();
    }
}

/// The all-gather half of the ring: each rank's `ring_shard` passed around to every rank.
pub fn ring_all_gather(link: &mut dyn RingLink, rank: usize, world: usize, buf: &mut [f32]) -> Result<()> {
    if world <= 1 {
        return Ok(());
    }
    let len = buf.len();
    for s in 0..world - 1 {
        let send = chunk_range(len, world, (rank + 1 + world - s) % world);
        let recv = chunk_range(len, world, (rank + world - s) % world);
        // Received straight into place: a chunk is never sent and received in one step.
        let (outgoing, place) = send_and_recv(buf, send, recv);
        link.exchange(outgoing, place)?;
    }
    Ok(())
}

/// Number format of values on the wire (T25): 16-bit formats halve the bytes; sums are
/// still formed in f32 at each hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    F32,
    Bf16,
    F16,
}

impl WireFormat {
    fn round(self, x: f32) -> f32 {
        match self {
            Self::F32 => x,
            Self::Bf16 => half::bf16::from_f32(x).to_f32(),
            Self::F16 => half::f16::from_f32(x).to_f32(),
        }
    }

    fn encode(self, x: f32) -> [u8; 2] {
        match self {
            Self::Bf16 => half::bf16::from_f32(x).to_le_bytes(),
            _ => half::f16::from_f32(x).to_le_bytes(),
        }
    }

    fn decode(self, b: [u8; 2]) -> f32 {
        match self {
            Self::Bf16 => half::bf16::from_le_bytes(b).to_f32(),
            _ => half::f16::from_le_bytes(b).to_f32(),
        }
    }
}

/// `buf[range]` as wire bytes: indices below `half_len` in 2 bytes, the rest as f32.
fn encode_chunk(buf: &[f32], range: std::ops::Range<usize>, format: WireFormat, half_len: usize, out: &mut Vec<u8>) {
    out.clear();
    for i in range {
        if i < half_len {
            out.extend(format.encode(buf[i]));
        } else {
            out.extend(buf[i].to_le_bytes());
        }
    }
}

fn wire_len(range: &std::ops::Range<usize>, half_len: usize) -> usize {
    let halves = range.end.min(half_len).saturating_sub(range.start);
    2 * halves + 4 * (range.len() - halves)
}

/// Decodes wire bytes for `range` and adds them to (or, with `add` false, stores them in)
/// `buf[range]`.
fn decode_chunk(
    bytes: &[u8],
    buf: &mut [f32],
    range: std::ops::Range<usize>,
    format: WireFormat,
    half_len: usize,
    add: bool,
) {
    let mut at = 0;
    for i in range {
        let v = if i < half_len {
            at += 2;
            format.decode([bytes[at - 2], bytes[at - 1]])
        } else {
            at += 4;
            f32::from_le_bytes([bytes[at - 4], bytes[at - 3], bytes[at - 2], bytes[at - 1]])
        };
        buf[i] = if add { buf[i] + v } else { v };
    }
}

/// `ring_all_reduce` with the values `buf[..half_len]` sent in a 16-bit `format` (the rest,
/// such as the loss and target count riding on the last bucket, stay f32). Partial sums are
/// rounded to the format at every hop; the owner of each reduced chunk rounds it before the
/// all-gather, so every rank still ends with identical bits.
pub fn ring_all_reduce_as(
    link: &mut dyn RingLink,
    rank: usize,
    world: usize,
    buf: &mut [f32],
    format: WireFormat,
    half_len: usize,
) -> Result<()> {
    if format == WireFormat::F32 {
        return ring_all_reduce(link, rank, world, buf);
    }
    if world <= 1 {
        return Ok(());
    }
    let len = buf.len();
    let (mut outgoing, mut incoming) = (Vec::new(), Vec::new());
    for s in 0..world - 1 {
        let send = chunk_range(len, world, (rank + world - s) % world);
        let recv = chunk_range(len, world, (rank + 2 * world - s - 1) % world);
        encode_chunk(buf, send, format, half_len, &mut outgoing);
        incoming.resize(wire_len(&recv, half_len), 0);
        link.exchange_bytes(&outgoing, &mut incoming)?;
        decode_chunk(&incoming, buf, recv, format, half_len, true);
    }
    // Rank r owns chunk r+1: round it as the others will receive it.
    let owned = chunk_range(len, world, (rank + 1) % world);
    let rounded_end = owned.end.min(half_len).max(owned.start);
    for v in &mut buf[owned.start..rounded_end] {
        *v = format.round(*v);
    }
    for s in 0..world - 1 {
        let send = chunk_range(len, world, (rank + 1 + world - s) % world);
        let recv = chunk_range(len, world, (rank + world - s) % world);
        encode_chunk(buf, send, format, half_len, &mut outgoing);
        incoming.resize(wire_len(&recv, half_len), 0);
        link.exchange_bytes(&outgoing, &mut incoming)?;
        decode_chunk(&incoming, buf, recv, format, half_len, false);
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
    fn all_reduce_sum_as(&mut self, buf: &mut [f32], format: WireFormat, half_len: usize) -> Result<()> {
        ring_all_reduce_as(&mut self.link, self.rank, self.world, buf, format, half_len)
    }
    fn shard_of(&self, len: usize, rank: usize) -> std::ops::Range<usize> {
        ring_shard(len, self.world, rank)
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        ring_reduce_scatter(&mut self.link, self.rank, self.world, buf)
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        ring_all_gather(&mut self.link, self.rank, self.world, buf)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        ring_broadcast(&mut self.link, self.rank, self.world, buf, root)
    }
}

/// A link for world size 1 (nothing to exchange).
pub struct SoloLink;

impl RingLink for SoloLink {
    fn exchange_bytes(&mut self, _: &[u8], _: &mut [u8]) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ByteAdder;

    /// Byte runs cut anywhere (mid-value, one byte long, starting at odd addresses) add the
    /// very values a whole-buffer add gives.
    #[test]
    fn byte_runs_of_any_length_and_alignment_add_exactly() {
        let n = 1001;
        let incoming: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let start: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: Vec<u32> = start.iter().zip(&incoming).map(|(s, x)| (s + x).to_bits()).collect();
        // One byte of padding in front, so every run starts misaligned.
        let mut wire = vec![0u8];
        wire.extend(incoming.iter().flat_map(|v| v.to_le_bytes()));
        for cuts in [vec![1, 2, 3, 4, 5], vec![4003], vec![7, 1, 1, 1, 4096], vec![3]] {
            let mut sums = start.clone();
            let mut adder = ByteAdder::new(&mut sums);
            let (mut at, mut next) = (1, 0);
            while adder.remaining() > 0 {
                let len = cuts[next % cuts.len()].min(adder.remaining());
                adder.add(&wire[at..at + len]);
                (at, next) = (at + len, next + 1);
            }
            assert_eq!(sums.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "cuts {cuts:?}");
        }
    }
}
