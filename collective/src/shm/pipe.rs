//! Pipeline stage links between stages on one host (T42): for each edge s → s+1 a segment
//! with one byte FIFO per direction, carrying the frames of the QUIC pipe (sequence, shape,
//! values), so a stage cannot misread one. Stage s makes the segment of its edge to s+1 and
//! joins the one from s−1, through the same handshake as the all-reduce segments.

use super::handshake;
use super::segment::{futex_wait, futex_wake_all, has_exited, pidfd_open, Mapping};
use crate::pipe::{check_header, encode, parse_head, parse_shape, Neighbour, PipeLink};
use crate::ring::RingLink;
use crate::{CollectiveError, Result};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes in flight per direction: a QUIC stream's receive window, so a schedule blocks
/// where it would over QUIC. A power of two, so wrapping u32 counters index it.
pub const FIFO_BYTES: usize = 64 << 20;
const LINE: usize = 128;
const HEADER: usize = 4096;
const EDGE_BYTES: usize = HEADER + 2 * FIFO_BYTES;
const SLEEP: Duration = Duration::from_millis(5);

// Header lines: 0/1 head/tail of FIFO 0 (member 0 → 1), 2/3 of FIFO 1 (1 → 0), 4 the
// abort word and both members' pids. Each counter's line also holds its waiter's flag.
const ABORT: usize = 4 * LINE;
const PID: usize = 4 * LINE + 4;

/// One direction of an edge.
struct Fifo {
    map: Arc<Mapping>,
    index: usize,
}

impl Fifo {
    fn head(&self) -> &AtomicU32 {
        self.map.word(2 * self.index * LINE)
    }
    fn reader_sleeping(&self) -> &AtomicU32 {
        self.map.word(2 * self.index * LINE + 4)
    }
    fn tail(&self) -> &AtomicU32 {
        self.map.word((2 * self.index + 1) * LINE)
    }
    fn writer_sleeping(&self) -> &AtomicU32 {
        self.map.word((2 * self.index + 1) * LINE + 4)
    }
    fn data(&self) -> usize {
        HEADER + self.index * FIFO_BYTES
    }

    /// Copies what fits of `bytes` in; how many went.
    fn write_some(&self, bytes: &[u8]) -> usize {
        let (head, tail) = (self.head().load(Ordering::Relaxed), self.tail().load(Ordering::Acquire));
        let free = FIFO_BYTES - head.wrapping_sub(tail) as usize;
        let n = free.min(bytes.len());
        let at = head as usize % FIFO_BYTES;
        let first = n.min(FIFO_BYTES - at);
        self.map.bytes_mut(self.data() + at, first).copy_from_slice(&bytes[..first]);
        self.map.bytes_mut(self.data(), n - first).copy_from_slice(&bytes[first..n]);
        self.head().store(head.wrapping_add(n as u32), Ordering::SeqCst);
        if n > 0 && self.reader_sleeping().load(Ordering::SeqCst) != 0 {
            futex_wake_all(self.head());
        }
        n
    }

    /// Copies what has arrived into `out`; how much.
    fn read_some(&self, out: &mut [u8]) -> usize {
        let (head, tail) = (self.head().load(Ordering::Acquire), self.tail().load(Ordering::Relaxed));
        let n = (head.wrapping_sub(tail) as usize).min(out.len());
        let at = tail as usize % FIFO_BYTES;
        let first = n.min(FIFO_BYTES - at);
        out[..first].copy_from_slice(self.map.bytes_mut(self.data() + at, first));
        out[first..n].copy_from_slice(self.map.bytes_mut(self.data(), n - first));
        self.tail().store(tail.wrapping_add(n as u32), Ordering::SeqCst);
        if n > 0 && self.writer_sleeping().load(Ordering::SeqCst) != 0 {
            futex_wake_all(self.tail());
        }
        n
    }

    /// Sleeps (briefly) until `word` moves from `seen`, flagging the sleep in `flag`.
    fn sleep_on(word: &AtomicU32, flag: &AtomicU32, seen: u32) {
        flag.store(1, Ordering::SeqCst);
        if word.load(Ordering::SeqCst) == seen {
            futex_wait(word, seen, SLEEP);
        }
        flag.store(0, Ordering::SeqCst);
    }
}

/// The far end of an edge: who it is and whether it still lives.
struct Peer {
    rank: usize,
    pidfd: Option<OwnedFd>,
}

pub struct ShmPipe {
    /// Edge to the next stage (we are its member 0) and from the previous one (member 1).
    next: Arc<Mapping>,
    prev: Arc<Mapping>,
    next_peer: Peer,
    prev_peer: Peer,
    sent: [u64; 2],
    received: [u64; 2],
    timeout: Duration,
}

/// Fails a pipe's waits from another thread.
#[derive(Clone)]
pub struct ShmPipeAbort {
    edges: [Arc<Mapping>; 2],
}

impl ShmPipeAbort {
    pub fn abort(&self) {
        for edge in &self.edges {
            edge.word(ABORT).store(1, Ordering::SeqCst);
            for line in 0..4 {
                futex_wake_all(edge.word(line * LINE));
            }
        }
    }
}

fn err(what: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Link(format!("shared-memory pipe: {what}"))
}

impl ShmPipe {
    /// Links stage rank `me` to `next` and `prev` (global ranks; equal with 2 stages).
    pub fn connect(secret: &[u8], me: usize, next: usize, prev: usize, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let out = Arc::new(Mapping::create(c"lockstep-pipe", EDGE_BYTES)?);
        // Serve our edge while joining the previous stage's: every stage does both, so
        // neither may wait for the other first.
        let incoming = std::thread::scope(|scope| {
            let serving =
                scope.spawn(|| handshake::serve(secret, &format!("pipe-{me}-{next}"), 2, &out.file, deadline));
            let joined = handshake::join(secret, &format!("pipe-{prev}-{me}"), 1, deadline);
            let served = serving.join().map_err(|_| err("handshake thread panicked"))?;
            served.and(joined)
        })?;
        let incoming = Arc::new(Mapping::open(incoming, EDGE_BYTES)?);
        out.word(PID).store(std::process::id(), Ordering::SeqCst);
        incoming.word(PID + 4).store(std::process::id(), Ordering::SeqCst);
        let next_peer = Peer { rank: next, pidfd: await_pid(out.word(PID + 4), deadline)?.and_then(pidfd_open) };
        let prev_peer = Peer { rank: prev, pidfd: await_pid(incoming.word(PID), deadline)?.and_then(pidfd_open) };
        Ok(Self { next: out, prev: incoming, next_peer, prev_peer, sent: [0; 2], received: [0; 2], timeout })
    }

    pub fn abort_handle(&self) -> ShmPipeAbort {
        ShmPipeAbort { edges: [self.next.clone(), self.prev.clone()] }
    }

    /// (FIFO we write towards `n`, FIFO we read from `n`, who `n` is).
    fn ends(&self, n: Neighbour) -> (Fifo, Fifo, &Peer) {
        match n {
            Neighbour::Next => {
                (Fifo { map: self.next.clone(), index: 0 }, Fifo { map: self.next.clone(), index: 1 }, &self.next_peer)
            }
            Neighbour::Prev => {
                (Fifo { map: self.prev.clone(), index: 1 }, Fifo { map: self.prev.clone(), index: 0 }, &self.prev_peer)
            }
        }
    }

    fn check(&self, fifo: &Fifo, peer: &Peer, started: Instant, what: &str) -> Result<()> {
        if fifo.map.word(ABORT).load(Ordering::SeqCst) != 0 {
            return Err(err(format!("{what} rank {}: aborted", peer.rank)));
        }
        if peer.pidfd.as_ref().is_some_and(has_exited) {
            return Err(err(format!("{what} rank {}: it exited", peer.rank)));
        }
        if started.elapsed() > self.timeout {
            return Err(err(format!("{what} rank {} timed out after {:?}", peer.rank, self.timeout)));
        }
        Ok(())
    }

    fn write_all(&self, fifo: &Fifo, peer: &Peer, mut bytes: &[u8]) -> Result<()> {
        let started = Instant::now();
        while !bytes.is_empty() {
            let n = fifo.write_some(bytes);
            bytes = &bytes[n..];
            if n == 0 {
                Fifo::sleep_on(fifo.tail(), fifo.writer_sleeping(), fifo.tail().load(Ordering::SeqCst));
                self.check(fifo, peer, started, "sending to")?;
            }
        }
        Ok(())
    }

    fn read_exact(&self, fifo: &Fifo, peer: &Peer, mut out: &mut [u8]) -> Result<()> {
        let started = Instant::now();
        while !out.is_empty() {
            let n = fifo.read_some(out);
            out = &mut out[n..];
            if n == 0 {
                Fifo::sleep_on(fifo.head(), fifo.reader_sleeping(), fifo.head().load(Ordering::SeqCst));
                self.check(fifo, peer, started, "waiting for")?;
            }
        }
        Ok(())
    }

    /// One frame from `fifo`: its shape and values, checked against sequence `seq`.
    fn read_frame(&self, fifo: &Fifo, peer: &Peer, seq: u64) -> Result<(Vec<usize>, Vec<f32>)> {
        let from = format!("rank {}", peer.rank);
        let mut head = [0u8; 12];
        self.read_exact(fifo, peer, &mut head)?;
        let (got_seq, dims) = parse_head(&head, &from)?;
        let mut raw = vec![0u8; 8 * dims];
        self.read_exact(fifo, peer, &mut raw)?;
        let shape = parse_shape(&raw);
        let n = check_header(got_seq, seq, &shape, &from)?;
        // The header only claims a size: memory grows with the bytes that really arrive.
        const CHUNK_VALUES: usize = 1 << 18;
        let mut values: Vec<f32> = Vec::with_capacity(n.min(CHUNK_VALUES));
        let mut chunk = vec![0.0f32; n.min(CHUNK_VALUES)];
        while values.len() < n {
            let take = (n - values.len()).min(CHUNK_VALUES);
            self.read_exact(fifo, peer, bytemuck::cast_slice_mut(&mut chunk[..take]))?;
            values.extend_from_slice(&chunk[..take]);
        }
        Ok((shape, values))
    }
}

/// The pid the other member writes into `word`, once it has (None: it never did).
fn await_pid(word: &AtomicU32, deadline: Instant) -> Result<Option<u32>> {
    loop {
        match word.load(Ordering::SeqCst) {
            0 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            0 => return Err(err("the neighbour stage mapped the link but never started")),
            pid => return Ok(Some(pid)),
        }
    }
}

fn slot(n: Neighbour) -> usize {
    match n {
        Neighbour::Next => 0,
        Neighbour::Prev => 1,
    }
}

impl PipeLink for ShmPipe {
    fn send_tensor(&mut self, to: Neighbour, shape: &[usize], values: &[f32]) -> Result<()> {
        let seq = self.sent[slot(to)];
        self.sent[slot(to)] += 1;
        let (out, _, peer) = self.ends(to);
        self.write_all(&out, peer, &encode(seq, shape, values))
    }

    fn recv_tensor(&mut self, from: Neighbour) -> Result<(Vec<usize>, Vec<f32>)> {
        let seq = self.received[slot(from)];
        self.received[slot(from)] += 1;
        let (_, inbox, peer) = self.ends(from);
        self.read_frame(&inbox, peer, seq)
    }
}

impl RingLink for ShmPipe {
    /// Send to the next stage while receiving from the previous one: the send runs on a
    /// scoped thread, so neither FIFO filling up can block the other.
    fn exchange_bytes(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let values: Vec<f32> = send.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let (seq_out, seq_in) = (self.sent[0], self.received[1]);
        self.sent[0] += 1;
        self.received[1] += 1;
        let frame = encode(seq_out, &[values.len()], &values);
        let (out, _, next_peer) = self.ends(Neighbour::Next);
        let (_, inbox, prev_peer) = self.ends(Neighbour::Prev);
        let this = &*self;
        let (sent, got) = std::thread::scope(|scope| {
            let sending = scope.spawn(|| this.write_all(&out, next_peer, &frame));
            let got = this.read_frame(&inbox, prev_peer, seq_in);
            (sending.join().map_err(|_| err("send thread panicked")), got)
        });
        sent??;
        let (_, got) = got?;
        if got.len() * 4 != recv.len() {
            return Err(CollectiveError::Protocol(format!(
                "rank {} sent {} values, expected {}",
                prev_peer.rank,
                got.len(),
                recv.len() / 4
            )));
        }
        recv.copy_from_slice(bytemuck::cast_slice(&got));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::ring_all_reduce;

    /// `stages` threads linked in a ring of shared-memory pipes.
    fn ring(stages: usize, tag: &str) -> Vec<ShmPipe> {
        let secret = format!("pipe test {tag} {}", std::process::id());
        let threads: Vec<_> = (0..stages)
            .map(|s| {
                let secret = secret.clone();
                // Global ranks 100 + s: the names must not collide with other tests'.
                let rank = |s: usize| 100 + s;
                std::thread::spawn(move || {
                    ShmPipe::connect(
                        secret.as_bytes(),
                        rank(s),
                        rank((s + 1) % stages),
                        rank((s + stages - 1) % stages),
                        Duration::from_secs(20),
                    )
                    .expect("pipe")
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("thread")).collect()
    }

    #[test]
    fn tensors_go_both_ways_in_order_and_sums_go_around_the_ring() {
        for stages in [2, 3] {
            let handles: Vec<_> = ring(stages, &format!("ways{stages}"))
                .into_iter()
                .enumerate()
                .map(|(s, mut pipe)| {
                    std::thread::spawn(move || {
                        // Larger than the FIFO: the writer must wait for the reader.
                        let big: Vec<f32> = (0..(FIFO_BYTES / 4 + 12345)).map(|i| (i % 977) as f32).collect();
                        if s + 1 < stages {
                            pipe.send_tensor(Neighbour::Next, &[big.len()], &big).expect("send");
                            pipe.send_tensor(Neighbour::Next, &[1, 2], &[s as f32, 1.0]).expect("send");
                        }
                        if s > 0 {
                            let (shape, values) = pipe.recv_tensor(Neighbour::Prev).expect("recv");
                            assert_eq!((shape, values), (vec![big.len()], big));
                            let (shape, values) = pipe.recv_tensor(Neighbour::Prev).expect("recv");
                            assert_eq!((shape, values), (vec![1, 2], vec![(s - 1) as f32, 1.0]));
                            pipe.send_tensor(Neighbour::Prev, &[1], &[10.0 * s as f32]).expect("send");
                        }
                        if s + 1 < stages {
                            let (_, values) = pipe.recv_tensor(Neighbour::Next).expect("recv");
                            assert_eq!(values, vec![10.0 * (s + 1) as f32]);
                        }
                        let mut total = [s as f32 + 1.0];
                        ring_all_reduce(&mut pipe, s, stages, &mut total).expect("ring");
                        total[0]
                    })
                })
                .collect();
            let want = (1..=stages).sum::<usize>() as f32;
            for h in handles {
                assert_eq!(h.join().expect("stage"), want);
            }
        }
    }

    #[test]
    fn a_stage_that_goes_away_is_named() {
        let mut pipes = ring(2, "gone");
        let second = pipes.pop().expect("stage 1");
        let mut first = pipes.pop().expect("stage 0");
        second.abort_handle().abort();
        let error = first.recv_tensor(Neighbour::Next).expect_err("aborted").to_string();
        assert!(error.contains("rank 101") && error.contains("aborted"), "{error}");
    }
}
