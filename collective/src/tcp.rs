//! The TLS-over-TCP ring link: a TLS 1.3 connection to the next rank (we are its client)
//! and one from the previous rank (we serve it), with the same pinned certificates as the
//! QUIC links. Between hosts on a clean network it moves tensors several times faster than
//! QUIC (the kernel's TCP stack segments and acknowledges; quinn does both in user space,
//! packet by packet); QUIC stays the choice where packets are lost.
//!
//! Each worker listens on TCP at the port number of its QUIC data-plane endpoint (TCP and
//! UDP ports are separate spaces), so the address peers already know is enough. A dialer
//! proves which group formation it belongs to with a tag derived from the group's secret,
//! so a connection left over from an earlier formation is told apart and dropped.
//!
//! An exchange sends on one thread while the calling thread receives in slices of
//! [`SLICE_BYTES`], handing each slice to the caller as soon as it is in: the ring reduces
//! slice k while k+1 is still on the wire.

use crate::mesh::link_err;
use crate::ring::RingLink;
use crate::tls::{pinned_rustls_client, rustls_server, AllowedPeers, Identity};
use crate::{CollectiveError, Result};
use lockstep_proto::wire::PeerInfo;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes received before the caller is handed them: large enough that the per-slice
/// work is negligible, small enough that reducing one overlaps the next.
pub const SLICE_BYTES: usize = 512 << 10;
/// Plaintext handed to TLS per write: encryption and the socket write interleave, and
/// rustls never buffers a whole chunk.
const WRITE_BYTES: usize = 256 << 10;
const HELLO_MAGIC: u32 = 0x4c53_5431; // "LST1"

pub struct TcpLink {
    to_next: StreamOwned<ClientConnection, TcpStream>,
    from_prev: StreamOwned<ServerConnection, TcpStream>,
    prev_rank: usize,
    next_rank: usize,
    seq: u64,
}

/// Shuts a link's sockets from another thread, failing a blocked exchange at once.
#[derive(Clone)]
pub struct TcpAbort(Arc<Vec<TcpStream>>);

impl TcpAbort {
    pub fn abort(&self) {
        for s in self.0.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// The tag a dialer of this formation sends: SHA-256 of the group secret, domain-separated.
fn formation_tag(secret: &[u8]) -> [u8; 32] {
    Sha256::new().chain_update(b"lockstep tcp ring v1").chain_update(secret).finalize().into()
}

/// The TCP listener of a worker, on `addr`'s port (the QUIC data-plane port's number).
pub fn listen(addr: SocketAddr) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(64)?;
    Ok(socket.into())
}

/// No delay for the small headers; socket buffers left to the kernel's autotuning, which
/// grows them to net.ipv4.tcp_{r,w}mem's maximum as the path needs (setting SO_RCVBUF
/// would turn autotuning off and cap the buffer at net.core.rmem_max).
fn tune(stream: &TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    Ok(())
}

/// What is left until `deadline`, at least 1 ms (a zero socket timeout means none).
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

impl TcpLink {
    /// Builds this rank's ring over `peers` (this rank is `peers[index]`), accepting the
    /// previous rank on `listener` and dialing the next one, until `timeout`.
    pub fn connect(
        listener: &TcpListener,
        me: &Identity,
        secret: &[u8],
        index: usize,
        peers: &[PeerInfo],
        timeout: Duration,
    ) -> Result<Self> {
        let world = peers.len();
        let (next, prev) = (&peers[(index + 1) % world], &peers[(index + world - 1) % world]);
        let deadline = Instant::now() + timeout;
        let tag = formation_tag(secret);
        let (to_next, from_prev) = std::thread::scope(|s| {
            let dialer = s.spawn(|| dial(me, next, peers[index].rank, &tag, deadline));
            let accepted = accept(listener, me, prev, &tag, deadline);
            let dialed = dialer.join().map_err(|_| link_err("tcp ring: the dialing thread panicked"))?;
            Ok::<_, CollectiveError>((dialed?, accepted?))
        })?;
        for s in [to_next.get_ref(), from_prev.get_ref()] {
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
        }
        Ok(Self { to_next, from_prev, prev_rank: prev.rank, next_rank: next.rank, seq: 0 })
    }

    pub fn abort_handle(&self) -> Result<TcpAbort> {
        Ok(TcpAbort(Arc::new(vec![self.to_next.get_ref().try_clone()?, self.from_prev.get_ref().try_clone()?])))
    }
}

/// Connects to `next` (retrying while it is not yet listening), completes TLS with its
/// pinned certificate and sends our hello: magic, our rank, the formation tag.
fn dial(
    me: &Identity,
    next: &PeerInfo,
    my_rank: usize,
    tag: &[u8; 32],
    deadline: Instant,
) -> Result<StreamOwned<ClientConnection, TcpStream>> {
    let addr = crate::tls::resolve(&next.data_addr)?;
    let stream = loop {
        match TcpStream::connect_timeout(&addr, left(deadline)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::trace!("tcp ring: dialing rank {} at {addr}: {e}; retrying", next.rank);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(link_err(format!("tcp ring: dialing rank {} at {addr}: {e}", next.rank))),
        }
    };
    tune(&stream)?;
    stream.set_read_timeout(Some(left(deadline)))?;
    let (config, mismatch) = pinned_rustls_client(me, &next.fingerprint)?;
    let name = ServerName::try_from("lockstep").map_err(link_err)?;
    let conn = ClientConnection::new(Arc::new(config), name).map_err(link_err)?;
    let mut tls = StreamOwned::new(conn, stream);
    let mut hello = HELLO_MAGIC.to_le_bytes().to_vec();
    hello.extend((my_rank as u64).to_le_bytes());
    hello.extend(tag);
    let sent = tls.write_all(&hello).and_then(|_| tls.flush());
    // Complete the handshake now, so a wrong certificate is reported here.
    let done = sent.and_then(|_| {
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(())
    });
    done.map_err(|e| match mismatch.presented() {
        Some(got) => link_err(format!(
            "tcp ring: rank {} at {addr} presented certificate {got}, not the pinned {}",
            next.rank, next.fingerprint
        )),
        None => link_err(format!("tcp ring: TLS with rank {} at {addr}: {e}", next.rank)),
    })?;
    Ok(tls)
}

/// Accepts connections until one completes TLS with `prev`'s certificate and sends a
/// hello naming `prev` with this formation's tag; strangers and stale dialers are dropped.
fn accept(
    listener: &TcpListener,
    me: &Identity,
    prev: &PeerInfo,
    tag: &[u8; 32],
    deadline: Instant,
) -> Result<StreamOwned<ServerConnection, TcpStream>> {
    let allowed = AllowedPeers::default();
    allowed.write().map_err(|_| link_err("peer set poisoned"))?.insert(prev.fingerprint.to_ascii_lowercase());
    let mut config = rustls_server(me, Some(allowed))?;
    // No session tickets: the dialer never reads its connection, so tickets would sit
    // unread there, and closing a socket with unread data sends a reset that can destroy
    // our last message still queued on the other side (seen as ECONNRESET in a test).
    config.send_tls13_tickets = 0;
    let config = Arc::new(config);
    listener.set_nonblocking(true)?;
    loop {
        if Instant::now() >= deadline {
            return Err(link_err(format!("tcp ring: rank {} did not connect in time", prev.rank)));
        }
        let (stream, from) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match admit(stream, &config, prev, tag, deadline) {
            Ok(tls) => return Ok(tls),
            Err(e) => tracing::warn!("tcp ring: dropped a connection from {from}: {e}"),
        }
    }
}

/// TLS with a pinned client and its hello, checked.
fn admit(
    stream: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    prev: &PeerInfo,
    tag: &[u8; 32],
    deadline: Instant,
) -> Result<StreamOwned<ServerConnection, TcpStream>> {
    stream.set_nonblocking(false)?;
    tune(&stream)?;
    // A caller that never speaks must not hold the setup past the deadline.
    stream.set_read_timeout(Some(left(deadline)))?;
    let conn = ServerConnection::new(config.clone()).map_err(link_err)?;
    let mut tls = StreamOwned::new(conn, stream);
    let mut hello = [0u8; 44];
    tls.read_exact(&mut hello).map_err(link_err)?;
    let magic = u32::from_le_bytes([hello[0], hello[1], hello[2], hello[3]]);
    let rank = u64::from_le_bytes(hello[4..12].try_into().map_err(link_err)?);
    if magic != HELLO_MAGIC || rank != prev.rank as u64 {
        return Err(CollectiveError::Protocol(format!(
            "hello {magic:#x} from rank {rank}; expected {HELLO_MAGIC:#x} from rank {}",
            prev.rank
        )));
    }
    if hello[12..] != tag[..] {
        return Err(CollectiveError::Protocol(format!("rank {rank} dialed for another group formation")));
    }
    Ok(tls)
}

/// Receives message `seq` of exactly `recv.len()` bytes from `from_prev`, calling
/// `arrived` after each slice.
fn receive_message(
    from_prev: &mut StreamOwned<ServerConnection, TcpStream>,
    prev_rank: usize,
    seq: u64,
    recv: &mut [u8],
    arrived: &mut dyn FnMut(&[u8], Range<usize>),
) -> Result<()> {
    let from = |e: std::io::Error| link_err(format!("tcp ring: from rank {prev_rank}: {e}"));
    let mut header = [0u8; 16];
    from_prev.read_exact(&mut header).map_err(from)?;
    crate::ring::check_message_header(header, seq, recv.len(), prev_rank)?;
    let mut at = 0;
    while at < recv.len() {
        let end = (at + SLICE_BYTES).min(recv.len());
        from_prev.read_exact(&mut recv[at..end]).map_err(from)?;
        arrived(&recv[..end], at..end);
        at = end;
    }
    Ok(())
}

impl RingLink for TcpLink {
    fn exchange_bytes(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.exchange_sliced(send, recv, &mut |_, _| {})
    }

    fn exchange_sliced(
        &mut self,
        send: &[u8],
        recv: &mut [u8],
        arrived: &mut dyn FnMut(&[u8], Range<usize>),
    ) -> Result<()> {
        let seq = self.seq;
        self.seq += 1;
        let (prev_rank, next_rank) = (self.prev_rank, self.next_rank);
        let Self { to_next, from_prev, .. } = self;
        std::thread::scope(|s| {
            let sender = s.spawn(move || {
                send_message(to_next, seq, send).map_err(|e| link_err(format!("tcp ring: to rank {next_rank}: {e}")))
            });
            let received = receive_message(from_prev, prev_rank, seq, recv, arrived);
            let sent = sender.join().map_err(|_| link_err("tcp ring: the sending thread panicked"))?;
            received.and(sent)
        })
    }
}

/// Sends message `seq` to the next rank (on its own thread during an exchange).
fn send_message(to_next: &mut StreamOwned<ClientConnection, TcpStream>, seq: u64, send: &[u8]) -> std::io::Result<()> {
    to_next.write_all(&crate::ring::message_header(seq, send.len()))?;
    for piece in send.chunks(WRITE_BYTES) {
        to_next.write_all(piece)?;
    }
    to_next.flush()
}

impl Drop for TcpLink {
    /// Tell the next rank we are done (TLS close_notify, then FIN after all our data).
    fn drop(&mut self) {
        self.to_next.conn.send_close_notify();
        let _ = self.to_next.flush();
        let _ = self.to_next.sock.shutdown(Shutdown::Write);
    }
}
