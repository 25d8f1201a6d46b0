//! Connections to several chosen peers, set up together on one data-plane endpoint: the
//! ring of a data-parallel group and the chain of a pipeline share one accept queue, so
//! every accepted connection says who it is from and which channel it is for, and is
//! dispatched by that. Each connection carries one bidirectional stream.

use crate::tls::{client_config, resolve, AllowedPeers, Identity};
use crate::{CollectiveError, Result};
use lockstep_proto::wire::PeerInfo;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use std::time::Duration;

const MESH_MAGIC: u32 = 0x4c53_4d31; // "LSM1"

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    /// The data-parallel ring (gradient all-reduce).
    Ring = 1,
    /// The pipeline chain (activations forward, gradients backward).
    Pipe = 2,
}

/// Whom a rank dials and whom it accepts, with the channel of each connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshPlan {
    pub dial: Vec<(usize, Channel)>,
    pub expect: Vec<(usize, Channel)>,
}

/// One established connection and its stream.
pub struct MeshConn {
    pub peer: usize,
    pub channel: Channel,
    pub conn: Connection,
    pub send: SendStream,
    pub recv: RecvStream,
}

pub(crate) fn link_err(e: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Link(e.to_string())
}

/// Dials `plan.dial` (peer rank, channel) and accepts `plan.expect` on `endpoint`; returns the
/// dialed connections (in `dial` order), the accepted ones (in `expect` order) and the endpoint
/// the dials went out on, which must live as long as they do. Only the expected peers'
/// certificates are admitted.
pub async fn connect_mesh(
    endpoint: &Endpoint,
    allowed: &AllowedPeers,
    me: &Identity,
    my_rank: usize,
    peers: &[PeerInfo],
    plan: &MeshPlan,
    timeout: Duration,
) -> Result<(Vec<MeshConn>, Vec<MeshConn>, Endpoint)> {
    {
        let mut allowed = allowed.write().map_err(|_| link_err("peer set poisoned"))?;
        for &(rank, _) in &plan.expect {
            allowed.insert(peer(peers, rank)?.fingerprint.clone());
        }
    }
    // Outgoing traffic gets its own endpoint (socket and driver task): encrypting what we
    // send and decrypting what we receive then run on two threads instead of one.
    let local_ip = endpoint.local_addr()?.ip();
    let dial_endpoint =
        crate::tls::endpoint(std::net::SocketAddr::new(local_ip, 0), crate::tls::server_config(me, None)?)?;
    let dials = async {
        let mut out = Vec::new();
        for &(rank, channel) in &plan.dial {
            out.push(dial(&dial_endpoint, me, my_rank, peer(peers, rank)?, channel).await?);
        }
        Ok::<_, CollectiveError>(out)
    };
    let both = async { tokio::try_join!(dials, accept_expected(endpoint, peers, &plan.expect)) };
    let (dialed, accepted) = tokio::time::timeout(timeout, both)
        .await
        .map_err(|_| link_err(format!("data-plane setup timed out after {timeout:?}")))??;
    Ok((dialed, accepted, dial_endpoint))
}

fn peer(peers: &[PeerInfo], rank: usize) -> Result<&PeerInfo> {
    peers.iter().find(|p| p.rank == rank).ok_or_else(|| link_err(format!("no peer with rank {rank}")))
}

/// Connects to `target` (pinning its certificate) and says who we are and what for.
async fn dial(
    dial_endpoint: &Endpoint,
    me: &Identity,
    my_rank: usize,
    target: &PeerInfo,
    channel: Channel,
) -> Result<MeshConn> {
    let addr = resolve(&target.data_addr)?;
    let rank = target.rank;
    let conn = dial_endpoint
        .connect_with(client_config(me, &target.fingerprint)?, addr, "lockstep")
        .map_err(link_err)?
        .await
        .map_err(|e| link_err(format!("connecting to rank {rank} at {}: {e}", target.data_addr)))?;
    let (mut send, recv) = conn.open_bi().await.map_err(link_err)?;
    let mut hello = MESH_MAGIC.to_le_bytes().to_vec();
    hello.extend((my_rank as u32).to_le_bytes());
    hello.push(channel as u8);
    send.write_all(&hello).await.map_err(link_err)?;
    Ok(MeshConn { peer: rank, channel, conn, send, recv })
}

/// Accepts one connection for each of `expect` (rank, channel), in that order.
async fn accept_expected(
    endpoint: &Endpoint,
    peers: &[PeerInfo],
    expect: &[(usize, Channel)],
) -> Result<Vec<MeshConn>> {
    let mut slots: Vec<Option<MeshConn>> = expect.iter().map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        let incoming = endpoint.accept().await.ok_or_else(|| link_err("data endpoint closed"))?;
        // The handshake fails for any certificate but an expected peer's.
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("refused a data-plane connection: {e}");
                continue;
            }
        };
        let accepted = accept_hello(conn, peers).await?;
        let slot = expect.iter().position(|&(r, c)| r == accepted.peer && c == accepted.channel);
        match slot {
            Some(i) if slots[i].is_none() => slots[i] = Some(accepted),
            _ => {
                return Err(CollectiveError::Protocol(format!(
                    "unexpected data-plane hello (rank {}, {:?}); expected {expect:?}",
                    accepted.peer, accepted.channel
                )))
            }
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Reads the hello of an accepted connection. Its rank is the one its pinned certificate
/// belongs to; the hello only names the channel, and a peer claiming another rank is refused.
async fn accept_hello(conn: Connection, peers: &[PeerInfo]) -> Result<MeshConn> {
    let (send, mut recv) = conn.accept_bi().await.map_err(link_err)?;
    let mut hello = [0u8; 9];
    recv.read_exact(&mut hello).await.map_err(link_err)?;
    let magic = u32::from_le_bytes([hello[0], hello[1], hello[2], hello[3]]);
    let from = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]) as usize;
    if magic != MESH_MAGIC {
        return Err(CollectiveError::Protocol(format!("data-plane hello with magic {magic:#x} from rank {from}")));
    }
    let channel = match hello[8] {
        1 => Channel::Ring,
        2 => Channel::Pipe,
        other => return Err(CollectiveError::Protocol(format!("unknown channel {other} from rank {from}"))),
    };
    let certified = certified_rank(&conn, peers);
    if certified != Some(from) {
        return Err(CollectiveError::Protocol(format!(
            "a data-plane peer with the certificate of rank {certified:?} claimed rank {from}"
        )));
    }
    Ok(MeshConn { peer: from, channel, conn, send, recv })
}

/// The rank whose certificate `conn`'s peer presented, if any of `peers`.
fn certified_rank(conn: &quinn::Connection, peers: &[PeerInfo]) -> Option<usize> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast_ref::<Vec<rustls::pki_types::CertificateDer<'static>>>()?;
    let fp = crate::tls::fingerprint(certs.first()?);
    peers.iter().find(|p| p.fingerprint == fp).map(|p| p.rank)
}
