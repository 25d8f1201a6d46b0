//! The QUIC ring link: a connection to the next rank (we are its client) and one from the
//! previous rank (we serve it), each carrying one unidirectional stream of raw little-endian
//! tensor bytes. Certificates are pinned both ways: we pin the next rank's fingerprint,
//! and our endpoint only admits the previous rank's.

use crate::mesh::{connect_mesh, Channel, MeshConn, MeshPlan};
use crate::ring::RingLink;
use crate::tls::{AllowedPeers, Identity};
use crate::{CollectiveError, Result};
use lockstep_proto::wire::PeerInfo;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use std::time::Duration;
use tokio::runtime::Handle;

pub struct QuicLink {
    rt: Handle,
    to_next: SendStream,
    from_prev: RecvStream,
    // Held so the connections stay open as long as the link.
    _dial_endpoint: Endpoint,
    _next: Connection,
    _prev: Connection,
    prev_rank: usize,
    seq: u64,
    /// How long one exchange may wait before the link reports the previous rank as stuck.
    pub timeout: Duration,
}

/// Closes a link's connections from another thread, so that a collective blocked on a
/// dead or aborted peer fails at once instead of waiting for its timeout.
#[derive(Clone, Default)]
pub struct LinkAbort {
    connections: Vec<Connection>,
    shared_memory: Vec<crate::shm::ShmAbort>,
    pipes: Vec<crate::shm::pipe::ShmPipeAbort>,
    tcp: Vec<crate::tcp::TcpAbort>,
}

impl LinkAbort {
    pub fn new(connections: Vec<Connection>) -> Self {
        Self { connections, ..Self::default() }
    }

    /// Also close these connections.
    pub fn with_connections(mut self, connections: Vec<Connection>) -> Self {
        self.connections.extend(connections);
        self
    }

    /// Also fail the collectives of a shared-memory group.
    pub fn with_shm(mut self, shm: crate::shm::ShmAbort) -> Self {
        self.shared_memory.push(shm);
        self
    }

    /// Also shut the sockets of a TCP ring link.
    pub fn with_tcp(mut self, tcp: crate::tcp::TcpAbort) -> Self {
        self.tcp.push(tcp);
        self
    }

    /// Also fail the waits of a shared-memory pipeline link.
    pub fn with_shm_pipe(mut self, pipe: crate::shm::pipe::ShmPipeAbort) -> Self {
        self.pipes.push(pipe);
        self
    }

    pub fn abort(&self, reason: &str) {
        for c in &self.connections {
            c.close(3u32.into(), reason.as_bytes());
        }
        for shm in &self.shared_memory {
            shm.abort();
        }
        for pipe in &self.pipes {
            pipe.abort();
        }
        for tcp in &self.tcp {
            tcp.abort();
        }
    }
}

use crate::mesh::link_err;

impl QuicLink {
    pub fn connections(&self) -> [Connection; 2] {
        [self._next.clone(), self._prev.clone()]
    }

    pub fn abort_handle(&self) -> LinkAbort {
        LinkAbort::new(vec![self._next.clone(), self._prev.clone()])
    }

    /// Builds this rank's ring over `peers` (this rank is `peers[rank]`). `endpoint` is this
    /// worker's data-plane endpoint, whose allowed-peer set is restricted here to the
    /// previous rank.
    pub async fn connect(
        endpoint: &Endpoint,
        allowed: &AllowedPeers,
        me: &Identity,
        rank: usize,
        peers: &[PeerInfo],
        timeout: Duration,
    ) -> Result<Self> {
        let world = peers.len();
        let (next, prev) = (peers[(rank + 1) % world].rank, peers[(rank + world - 1) % world].rank);
        let (mut dialed, mut accepted, dial_endpoint) = connect_mesh(
            endpoint,
            allowed,
            me,
            peers[rank].rank,
            peers,
            &MeshPlan { dial: vec![(next, Channel::Ring)], expect: vec![(prev, Channel::Ring)] },
            timeout,
        )
        .await?;
        match (dialed.pop(), accepted.pop()) {
            (Some(next), Some(prev)) => Ok(Self::from_mesh(next, prev, dial_endpoint, timeout)),
            _ => Err(link_err("ring setup returned no connections")),
        }
    }

    /// A ring link from mesh connections: `next` dialed, `prev` accepted.
    pub fn from_mesh(next: MeshConn, prev: MeshConn, dial_endpoint: Endpoint, timeout: Duration) -> Self {
        Self {
            rt: Handle::current(),
            to_next: next.send,
            from_prev: prev.recv,
            _dial_endpoint: dial_endpoint,
            _next: next.conn,
            _prev: prev.conn,
            prev_rank: prev.peer,
            seq: 0,
            timeout,
        }
    }
}

/// Writes one ring message: its header, then `send` in 1 MiB pieces (quinn copies what it is
/// given into one buffer, and a whole chunk, 32 MiB of a 64 MiB all-reduce, would be a fresh
/// mmap, page-faulted in and unmapped on every exchange).
async fn send_message(to_next: &mut SendStream, header: [u8; 16], send: &[u8]) -> Result<()> {
    to_next.write_all(&header).await.map_err(link_err)?;
    for piece in send.chunks(1 << 20) {
        to_next.write_all(piece).await.map_err(link_err)?;
    }
    Ok(())
}

impl QuicLink {
    /// Runs one exchange: `send` to the next rank, `receive` on the stream from the previous
    /// one (after its header is checked against `recv_len`), both under the link's timeout.
    fn exchange_with<F>(&mut self, send: &[u8], recv_len: usize, receive: F) -> Result<()>
    where
        F: AsyncFnOnce(&mut RecvStream, usize) -> Result<()>,
    {
        let seq = self.seq;
        self.seq += 1;
        let header = crate::ring::message_header(seq, send.len());
        let (to_next, from_prev) = (&mut self.to_next, &mut self.from_prev);
        let (prev_rank, timeout) = (self.prev_rank, self.timeout);
        self.rt.block_on(async move {
            let recv_all = async {
                let mut h = [0u8; 16];
                from_prev.read_exact(&mut h).await.map_err(|e| link_err(format!("from rank {prev_rank}: {e}")))?;
                crate::ring::check_message_header(h, seq, recv_len, prev_rank)?;
                receive(from_prev, prev_rank).await
            };
            match tokio::time::timeout(timeout, async {
                tokio::try_join!(send_message(to_next, header, send), recv_all)
            })
            .await
            {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(CollectiveError::Link(format!(
                    "collective message {seq} timed out after {timeout:?} waiting for rank {prev_rank}"
                ))),
            }
        })
    }
}

impl RingLink for QuicLink {
    fn exchange_bytes(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.exchange_sliced(send, recv, &mut |_, _| {})
    }

    /// Adds straight from quinn's receive buffers: no copy of the message into ours first
    /// (measured: that copy was 5% of the CPU of a 16 MiB all-reduce).
    fn exchange_add(&mut self, send: &[u8], sums: &mut [f32]) -> Result<()> {
        let recv_len = 4 * sums.len();
        self.exchange_with(send, recv_len, async |from_prev: &mut RecvStream, prev_rank: usize| {
            let mut adder = crate::ring::ByteAdder::new(sums);
            while adder.remaining() > 0 {
                match from_prev.read_chunk(adder.remaining(), true).await {
                    Ok(Some(chunk)) => adder.add(&chunk.bytes),
                    Ok(None) => return Err(link_err(format!("rank {prev_rank} closed its stream mid-message"))),
                    Err(e) => return Err(link_err(format!("from rank {prev_rank}: {e}"))),
                }
            }
            Ok(())
        })
    }

    fn exchange_sliced(
        &mut self,
        send: &[u8],
        recv: &mut [u8],
        arrived: &mut dyn FnMut(&[u8], std::ops::Range<usize>),
    ) -> Result<()> {
        let recv_len = recv.len();
        self.exchange_with(send, recv_len, async |from_prev: &mut RecvStream, prev_rank: usize| {
            let mut at = 0;
            while at < recv.len() {
                let end = (at + crate::tcp::SLICE_BYTES).min(recv.len());
                from_prev
                    .read_exact(&mut recv[at..end])
                    .await
                    .map_err(|e| link_err(format!("from rank {prev_rank}: {e}")))?;
                arrived(&recv[..end], at..end);
                at = end;
            }
            Ok(())
        })
    }
}

impl Drop for QuicLink {
    /// Graceful close: stop reading (this rank needs nothing more), finish our stream and
    /// wait until the next rank has stopped reading it, so a message still in flight is not
    /// cut off by the connection closing. Stopping first breaks the wait cycle of the ring.
    fn drop(&mut self) {
        let stats = self._next.stats();
        tracing::debug!(
            mtu = stats.path.current_mtu,
            sent_packets = stats.path.sent_packets,
            lost = stats.path.lost_packets,
            "ring link to next rank closing"
        );
        let _ = self.from_prev.stop(0u32.into());
        let _ = self.to_next.finish();
        if Handle::try_current().is_err() {
            let to_next = &mut self.to_next;
            let _ =
                self.rt.block_on(async move { tokio::time::timeout(Duration::from_secs(10), to_next.stopped()).await });
        }
    }
}
