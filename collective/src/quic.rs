//! The QUIC ring link: a connection to the next rank (we are its client) and one from the
//! previous rank (we serve it), each carrying one unidirectional stream of raw little-endian
//! tensor bytes. Certificates are pinned both ways: we pin the next rank's fingerprint,
//! and our endpoint only admits the previous rank's.

use crate::ring::RingLink;
use crate::tls::{client_config, resolve, AllowedPeers, Identity};
use crate::{CollectiveError, Result};
use lockstep_proto::wire::PeerInfo;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use std::time::Duration;
use tokio::runtime::Handle;

const LINK_MAGIC: u32 = 0x4c53_5231; // "LSR1"

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
#[derive(Clone)]
pub struct LinkAbort {
    connections: [Connection; 2],
}

impl LinkAbort {
    pub fn abort(&self, reason: &str) {
        for c in &self.connections {
            c.close(3u32.into(), reason.as_bytes());
        }
    }
}

fn link_err(e: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Link(e.to_string())
}

impl QuicLink {
    pub fn abort_handle(&self) -> LinkAbort {
        LinkAbort { connections: [self._next.clone(), self._prev.clone()] }
    }

    /// Builds this rank's links. `endpoint` is this worker's data-plane endpoint, whose
    /// allowed-peer set is restricted here to the previous rank.
    pub async fn connect(
        endpoint: &Endpoint,
        allowed: &AllowedPeers,
        me: &Identity,
        rank: usize,
        peers: &[PeerInfo],
        timeout: Duration,
    ) -> Result<Self> {
        let world = peers.len();
        let next = &peers[(rank + 1) % world];
        let prev = &peers[(rank + world - 1) % world];
        allowed.write().map_err(|_| link_err("peer set poisoned"))?.insert(prev.fingerprint.clone());

        // Outgoing traffic gets its own endpoint (socket and driver task): encrypting what we
        // send and decrypting what we receive then run on two threads instead of one.
        let local_ip = endpoint.local_addr()?.ip();
        let dial_endpoint =
            crate::tls::endpoint(std::net::SocketAddr::new(local_ip, 0), crate::tls::server_config(me, None)?)?;
        let dial = async {
            let addr = resolve(&next.data_addr)?;
            let conn = dial_endpoint
                .connect_with(client_config(me, &next.fingerprint)?, addr, "lockstep")
                .map_err(link_err)?
                .await
                .map_err(|e| link_err(format!("connecting to rank {} at {}: {e}", next.rank, next.data_addr)))?;
            let mut stream = conn.open_uni().await.map_err(link_err)?;
            let mut hello = LINK_MAGIC.to_le_bytes().to_vec();
            hello.extend((rank as u32).to_le_bytes());
            stream.write_all(&hello).await.map_err(link_err)?;
            Ok::<_, CollectiveError>((conn, stream))
        };
        let accept = async {
            loop {
                let incoming = endpoint.accept().await.ok_or_else(|| link_err("data endpoint closed"))?;
                // The handshake fails for any certificate but the previous rank's.
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("refused a data-plane connection: {e}");
                        continue;
                    }
                };
                let mut stream = conn.accept_uni().await.map_err(link_err)?;
                let mut hello = [0u8; 8];
                stream.read_exact(&mut hello).await.map_err(link_err)?;
                let magic = u32::from_le_bytes([hello[0], hello[1], hello[2], hello[3]]);
                let from = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]) as usize;
                if magic != LINK_MAGIC || from != prev.rank {
                    return Err(CollectiveError::Protocol(format!(
                        "unexpected ring hello (magic {magic:#x}, rank {from}); expected rank {}",
                        prev.rank
                    )));
                }
                return Ok::<_, CollectiveError>((conn, stream));
            }
        };
        let both = async { tokio::try_join!(dial, accept) };
        let ((next_conn, to_next), (prev_conn, from_prev)) = tokio::time::timeout(timeout, both)
            .await
            .map_err(|_| link_err(format!("ring setup timed out after {timeout:?}")))??;
        Ok(Self {
            rt: Handle::current(),
            to_next,
            from_prev,
            _dial_endpoint: dial_endpoint,
            _next: next_conn,
            _prev: prev_conn,
            prev_rank: prev.rank,
            seq: 0,
            timeout,
        })
    }
}

impl RingLink for QuicLink {
    fn exchange_bytes(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let seq = self.seq;
        self.seq += 1;
        let mut header = seq.to_le_bytes().to_vec();
        header.extend((std::mem::size_of_val(send) as u64).to_le_bytes());
        let to_next = &mut self.to_next;
        let from_prev = &mut self.from_prev;
        let prev_rank = self.prev_rank;
        let timeout = self.timeout;
        self.rt.block_on(async move {
            let send_all = async {
                to_next.write_all(&header).await.map_err(link_err)?;
                to_next.write_all(send).await.map_err(link_err)
            };
            let recv_all = async {
                let mut h = [0u8; 16];
                from_prev.read_exact(&mut h).await.map_err(|e| link_err(format!("from rank {prev_rank}: {e}")))?;
                let got_seq = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
                let got_len = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
                let want_len = std::mem::size_of_val(recv) as u64;
                if got_seq != seq || got_len != want_len {
                    return Err(CollectiveError::Protocol(format!(
                        "rank {prev_rank} sent message {got_seq} of {got_len} bytes; expected message {seq} of {want_len} bytes"
                    )));
                }
                from_prev
                    .read_exact(recv)
                    .await
                    .map_err(|e| link_err(format!("from rank {prev_rank}: {e}")))
            };
            match tokio::time::timeout(timeout, async { tokio::try_join!(send_all, recv_all) }).await {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(CollectiveError::Link(format!(
                    "collective message {seq} timed out after {timeout:?} waiting for rank {prev_rank}"
                ))),
            }
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
