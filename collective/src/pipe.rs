//! Point-to-point messages between neighbouring pipeline stages (T42). Stage s holds one
//! bidirectional stream to stage s+1 (it dialed) and one to stage s−1 (it accepted); the
//! last stage dials stage 0, closing a ring, so small sums over the stages (the global
//! gradient norm) run as a ring all-reduce on the same link. Every message is framed with
//! a per-direction sequence number and its tensor shape, so a stage never misreads one.

use crate::mesh::{link_err, MeshConn};
use crate::ring::RingLink;
use crate::{CollectiveError, Result};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;
use tokio::runtime::Handle;

/// Which neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Neighbour {
    Next,
    Prev,
}

/// A stage's links to its neighbours: tensors with their shapes.
pub trait PipeLink: RingLink {
    fn send_tensor(&mut self, to: Neighbour, shape: &[usize], values: &[f32]) -> Result<()>;
    /// The next message from `from`: its shape and values.
    fn recv_tensor(&mut self, from: Neighbour) -> Result<(Vec<usize>, Vec<f32>)>;
}

/// Frame: sequence (u64), number of dims (u32), dims (u64 each), values (f32 LE).
pub fn encode(seq: u64, shape: &[usize], values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + 8 * shape.len() + 4 * values.len());
    out.extend(seq.to_le_bytes());
    out.extend((shape.len() as u32).to_le_bytes());
    for &d in shape {
        out.extend((d as u64).to_le_bytes());
    }
    out.extend_from_slice(bytemuck::cast_slice(values));
    out
}

/// Little-endian f32 values from bytes of any alignment.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

pub(crate) const MAX_DIMS: usize = 8;
const MAX_VALUES: usize = 1 << 30;

/// The fixed 12-byte start of a frame: its sequence number and number of dims (checked).
pub(crate) fn parse_head(head: &[u8; 12], from: &str) -> Result<(u64, usize)> {
    let seq = u64::from_le_bytes([head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7]]);
    let dims = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
    if dims > MAX_DIMS {
        return Err(CollectiveError::Protocol(format!("{from} sent a tensor of {dims} dims")));
    }
    Ok((seq, dims))
}

/// The shape that follows the head: `dims` little-endian u64s.
pub(crate) fn parse_shape(raw: &[u8]) -> Vec<usize> {
    raw.chunks_exact(8).map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as usize).collect()
}

/// A whole frame held in memory, as the links read it from a stream: sequence `want_seq`,
/// its header checked before anything of the claimed size is allocated. (The fuzz target
/// `pipe` runs this on arbitrary bytes.)
pub fn decode_frame(bytes: &[u8], want_seq: u64) -> Result<(Vec<usize>, Vec<f32>)> {
    let short = || CollectiveError::Protocol(format!("a frame of {} bytes is cut short", bytes.len()));
    let head: &[u8; 12] = bytes.get(..12).and_then(|h| h.try_into().ok()).ok_or_else(short)?;
    let (seq, dims) = parse_head(head, "the peer")?;
    let shape = parse_shape(bytes.get(12..12 + 8 * dims).ok_or_else(short)?);
    let n = check_header(seq, want_seq, &shape, "the peer")?;
    let body = &bytes[12 + 8 * dims..];
    if body.len() != 4 * n {
        return Err(CollectiveError::Protocol(format!(
            "shape {shape:?} needs {} bytes, the frame has {}",
            4 * n,
            body.len()
        )));
    }
    Ok((shape, f32s(body)))
}

pub(crate) fn check_header(seq: u64, want_seq: u64, shape: &[usize], from: &str) -> Result<usize> {
    let n: usize = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX);
    if seq != want_seq || n > MAX_VALUES {
        return Err(CollectiveError::Protocol(format!(
            "{from} sent message {seq} of shape {shape:?}; expected message {want_seq} of at most {MAX_VALUES} values"
        )));
    }
    Ok(n)
}

/// Sequence counters of the four directions.
#[derive(Default)]
struct Seqs {
    sent: [u64; 2],
    received: [u64; 2],
}

fn slot(n: Neighbour) -> usize {
    match n {
        Neighbour::Next => 0,
        Neighbour::Prev => 1,
    }
}

/// The QUIC pipe link.
pub struct QuicPipe {
    rt: Handle,
    next: (SendStream, RecvStream),
    prev: (SendStream, RecvStream),
    next_rank: usize,
    prev_rank: usize,
    seqs: Seqs,
    timeout: Duration,
    _dial_endpoint: Endpoint,
    _connections: [Connection; 2],
}

impl QuicPipe {
    /// From the mesh: `next` dialed to stage s+1 (mod P), `prev` accepted from stage s−1.
    pub fn from_mesh(next: MeshConn, prev: MeshConn, dial_endpoint: Endpoint, timeout: Duration) -> Self {
        Self {
            rt: Handle::current(),
            next_rank: next.peer,
            prev_rank: prev.peer,
            _connections: [next.conn, prev.conn],
            next: (next.send, next.recv),
            prev: (prev.send, prev.recv),
            seqs: Seqs::default(),
            timeout,
            _dial_endpoint: dial_endpoint,
        }
    }

    pub fn connections(&self) -> [Connection; 2] {
        self._connections.clone()
    }

    fn ends(&mut self, n: Neighbour) -> (&mut SendStream, &mut RecvStream, usize) {
        match n {
            Neighbour::Next => (&mut self.next.0, &mut self.next.1, self.next_rank),
            Neighbour::Prev => (&mut self.prev.0, &mut self.prev.1, self.prev_rank),
        }
    }
}

async fn read_frame(recv: &mut RecvStream, want_seq: u64, from: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let mut head = [0u8; 12];
    recv.read_exact(&mut head).await.map_err(|e| link_err(format!("from {from}: {e}")))?;
    let (seq, dims) = parse_head(&head, from)?;
    let mut raw = vec![0u8; 8 * dims];
    recv.read_exact(&mut raw).await.map_err(|e| link_err(format!("from {from}: {e}")))?;
    let shape = parse_shape(&raw);
    let n = check_header(seq, want_seq, &shape, from)?;
    // The header only claims a size: memory grows with the bytes that really arrive, so a
    // bad header costs at most one chunk before the stream ends.
    const CHUNK_VALUES: usize = 1 << 18;
    let mut values: Vec<f32> = Vec::with_capacity(n.min(CHUNK_VALUES));
    let mut chunk = vec![0u8; 4 * n.min(CHUNK_VALUES)];
    while values.len() < n {
        let take = (n - values.len()).min(CHUNK_VALUES);
        recv.read_exact(&mut chunk[..4 * take]).await.map_err(|e| link_err(format!("from {from}: {e}")))?;
        values.extend(chunk[..4 * take].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    }
    Ok((shape, values))
}

impl PipeLink for QuicPipe {
    fn send_tensor(&mut self, to: Neighbour, shape: &[usize], values: &[f32]) -> Result<()> {
        let seq = self.seqs.sent[slot(to)];
        self.seqs.sent[slot(to)] += 1;
        let frame = encode(seq, shape, values);
        let (timeout, rt) = (self.timeout, self.rt.clone());
        let (send, _, rank) = self.ends(to);
        rt.block_on(async {
            match tokio::time::timeout(timeout, send.write_all(&frame)).await {
                Ok(r) => r.map_err(|e| link_err(format!("to stage rank {rank}: {e}"))),
                Err(_) => Err(link_err(format!("sending to rank {rank} timed out after {timeout:?}"))),
            }
        })
    }

    fn recv_tensor(&mut self, from: Neighbour) -> Result<(Vec<usize>, Vec<f32>)> {
        let seq = self.seqs.received[slot(from)];
        self.seqs.received[slot(from)] += 1;
        let (timeout, rt) = (self.timeout, self.rt.clone());
        let (_, recv, rank) = self.ends(from);
        let who = format!("rank {rank}");
        rt.block_on(async {
            match tokio::time::timeout(timeout, read_frame(recv, seq, &who)).await {
                Ok(r) => r,
                Err(_) => Err(link_err(format!("waiting for {who} timed out after {timeout:?}"))),
            }
        })
    }
}

impl RingLink for QuicPipe {
    /// Ring exchange over the stage ring: send to the next stage while receiving from the
    /// previous one (concurrently, so neither can block the other).
    fn exchange_bytes(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let values = f32s(send);
        let (seq_out, seq_in) = (self.seqs.sent[0], self.seqs.received[1]);
        self.seqs.sent[0] += 1;
        self.seqs.received[1] += 1;
        let frame = encode(seq_out, &[values.len()], &values);
        let (timeout, prev_rank) = (self.timeout, self.prev_rank);
        let who = format!("rank {prev_rank}");
        let (to_next, from_prev) = (&mut self.next.0, &mut self.prev.1);
        let got = self.rt.block_on(async {
            let both = async {
                tokio::try_join!(
                    async { to_next.write_all(&frame).await.map_err(link_err) },
                    read_frame(from_prev, seq_in, &who)
                )
            };
            match tokio::time::timeout(timeout, both).await {
                Ok(r) => r.map(|(_, got)| got),
                Err(_) => Err(link_err(format!("pipe ring exchange with {who} timed out after {timeout:?}"))),
            }
        })?;
        if got.1.len() * 4 != recv.len() {
            return Err(CollectiveError::Protocol(format!(
                "{who} sent {} values, expected {}",
                got.1.len(),
                recv.len() / 4
            )));
        }
        recv.copy_from_slice(bytemuck::cast_slice(&got.1));
        Ok(())
    }
}

impl Drop for QuicPipe {
    /// Graceful close, as the ring link does: stop reading both neighbours, finish both
    /// streams and wait until each neighbour has stopped reading them, so the last message
    /// (the evaluation totals, say) is not cut off by the connection closing.
    fn drop(&mut self) {
        let _ = self.next.1.stop(0u32.into());
        let _ = self.prev.1.stop(0u32.into());
        let _ = self.next.0.finish();
        let _ = self.prev.0.finish();
        if Handle::try_current().is_err() {
            let (to_next, to_prev) = (&mut self.next.0, &mut self.prev.0);
            let _ = self.rt.block_on(async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    let _ = to_next.stopped().await;
                    let _ = to_prev.stopped().await;
                })
                .await
            });
        }
    }
}

/// An in-process pipe link over channels (tests).
pub struct ThreadPipe {
    to: [Sender<(Vec<usize>, Vec<f32>)>; 2],
    from: [Receiver<(Vec<usize>, Vec<f32>)>; 2],
}

/// Pipe links for stages 0..stages in a ring, to be moved into one thread each.
pub fn thread_pipes(stages: usize) -> Vec<ThreadPipe> {
    // forward[s]: s → s+1; backward[s]: s+1 → s (indices mod stages).
    let (fwd_tx, mut fwd_rx): (Vec<_>, Vec<_>) = (0..stages).map(|_| channel()).map(|(t, r)| (t, Some(r))).unzip();
    let (bwd_tx, mut bwd_rx): (Vec<_>, Vec<_>) = (0..stages).map(|_| channel()).map(|(t, r)| (t, Some(r))).unzip();
    (0..stages)
        .map(|s| {
            let prev = (s + stages - 1) % stages;
            ThreadPipe {
                to: [fwd_tx[s].clone(), bwd_tx[prev].clone()],
                from: [bwd_rx[s].take().expect("taken once"), fwd_rx[prev].take().expect("taken once")],
            }
        })
        .collect()
}

impl PipeLink for ThreadPipe {
    fn send_tensor(&mut self, to: Neighbour, shape: &[usize], values: &[f32]) -> Result<()> {
        self.to[slot(to)].send((shape.to_vec(), values.to_vec())).map_err(|_| link_err("neighbour stage hung up"))
    }
    fn recv_tensor(&mut self, from: Neighbour) -> Result<(Vec<usize>, Vec<f32>)> {
        self.from[slot(from)].recv().map_err(|_| link_err("neighbour stage hung up"))
    }
}

impl RingLink for ThreadPipe {
    fn exchange_bytes(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let values = f32s(send);
        self.send_tensor(Neighbour::Next, &[values.len()], &values)?;
        let (_, got) = self.recv_tensor(Neighbour::Prev)?;
        if got.len() * 4 != recv.len() {
            return Err(CollectiveError::Protocol("pipe ring exchange: length mismatch".into()));
        }
        recv.copy_from_slice(bytemuck::cast_slice(&got));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::ring_all_reduce;

    #[test]
    fn thread_pipes_carry_tensors_both_ways_and_sum_around_the_ring() {
        let stages = 3;
        let handles: Vec<_> = thread_pipes(stages)
            .into_iter()
            .enumerate()
            .map(|(s, mut pipe)| {
                std::thread::spawn(move || {
                    if s + 1 < stages {
                        pipe.send_tensor(Neighbour::Next, &[1, 2], &[s as f32, 1.0]).unwrap();
                    }
                    let from_prev = if s > 0 { Some(pipe.recv_tensor(Neighbour::Prev).unwrap()) } else { None };
                    if s > 0 {
                        pipe.send_tensor(Neighbour::Prev, &[1], &[10.0 * s as f32]).unwrap();
                    }
                    let from_next =
                        if s + 1 < stages { Some(pipe.recv_tensor(Neighbour::Next).unwrap()) } else { None };
                    let mut total = [s as f32 + 1.0];
                    ring_all_reduce(&mut pipe, s, stages, &mut total).unwrap();
                    (from_prev, from_next, total[0])
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results[1].0, Some((vec![1, 2], vec![0.0, 1.0])));
        assert_eq!(results[0].1, Some((vec![1], vec![10.0])));
        assert!(results.iter().all(|r| r.2 == 6.0));
    }
}
