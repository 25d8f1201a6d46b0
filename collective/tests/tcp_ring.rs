//! The TLS-over-TCP ring over loopback: real sockets, real TLS, one OS thread per rank.

use lockstep_collective::tcp::{listen, TcpLink};
use lockstep_collective::tls::Identity;
use lockstep_collective::{Communicator, RingComm};
use lockstep_proto::wire::PeerInfo;
use std::net::TcpListener;
use std::time::Duration;

struct Member {
    id: Identity,
    listener: TcpListener,
}

fn members(world: usize) -> (Vec<Member>, Vec<PeerInfo>) {
    let members: Vec<Member> = (0..world)
        .map(|_| Member {
            id: Identity::generate().unwrap(),
            listener: listen("127.0.0.1:0".parse().unwrap()).unwrap(),
        })
        .collect();
    let peers = members
        .iter()
        .enumerate()
        .map(|(rank, m)| PeerInfo {
            rank,
            data_addr: m.listener.local_addr().unwrap().to_string(),
            fingerprint: m.id.fingerprint.clone(),
            host_id: format!("test-host-{rank}"),
        })
        .collect();
    (members, peers)
}

/// Every member forms its link on its own thread and runs `f` on it.
fn on_ranks<T: Send + 'static>(
    world: usize,
    secret: &'static [u8],
    f: fn(&mut dyn Communicator) -> T,
) -> Vec<lockstep_collective::Result<T>> {
    let (members, peers) = members(world);
    let handles: Vec<_> = members
        .into_iter()
        .enumerate()
        .map(|(rank, m)| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                let link = TcpLink::connect(&m.listener, &m.id, secret, rank, &peers, Duration::from_secs(20))?;
                let mut comm = RingComm { link, rank, world };
                Ok(f(&mut comm))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn tcp_all_reduce_is_exact_and_identical_on_every_rank() {
    const LENS: [usize; 6] = [0, 1, 7, 1001, 200_003, 3 << 20];
    for world in [2usize, 3, 4] {
        let results = on_ranks(world, b"job secret", |c| {
            let mut out = Vec::new();
            for len in LENS {
                // Small integers: every order of summation gives the same exact sum.
                let mut buf: Vec<f32> = (0..len).map(|i| ((i * 7 + c.rank() * 13) % 1000) as f32).collect();
                c.all_reduce_sum(&mut buf).unwrap();
                out.push(buf);
            }
            let mut b = vec![c.rank() as f32; 5];
            c.broadcast(&mut b, 1).unwrap();
            out.push(b);
            out
        });
        let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
        for (i, len) in LENS.iter().enumerate() {
            let want: Vec<f32> =
                (0..*len).map(|j| (0..world).map(|r| ((j * 7 + r * 13) % 1000) as f32).sum()).collect();
            for r in &results {
                assert!(r[i] == want, "world {world} len {len}: wrong sum");
            }
        }
        assert!(results.iter().all(|r| r[LENS.len()] == vec![1.0; 5]), "broadcast from rank 1");
    }
}

#[test]
fn tcp_ring_sums_random_values_with_identical_bits() {
    let results = on_ranks(3, b"job secret", |c| {
        let mut state = 0x9E37_79B9u32.wrapping_mul(c.rank() as u32 + 1);
        let mut buf: Vec<f32> = (0..1_000_003)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) - 0.5
            })
            .collect();
        c.all_reduce_sum(&mut buf).unwrap();
        buf.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    });
    let bits: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    assert!(bits.windows(2).all(|w| w[0] == w[1]), "ranks disagree in the bits");
}

/// Forms a 2-ring whose members see `peers_of(rank)` and use `secret_of(rank)`.
fn pair(peers_of: impl Fn(usize, &[PeerInfo]) -> Vec<PeerInfo>, secret_of: fn(usize) -> &'static [u8]) -> Vec<String> {
    let (members, peers) = members(2);
    let handles: Vec<_> = members
        .into_iter()
        .enumerate()
        .map(|(rank, m)| {
            let seen = peers_of(rank, &peers);
            std::thread::spawn(move || {
                TcpLink::connect(&m.listener, &m.id, secret_of(rank), rank, &seen, Duration::from_secs(2))
                    .map(|_| ())
                    .unwrap_err()
                    .to_string()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn a_dialer_of_another_group_formation_is_dropped() {
    let errors = pair(|_, peers| peers.to_vec(), |rank| if rank == 0 { b"formation A" } else { b"formation B" });
    assert!(errors[0].contains("rank 1 did not connect in time"), "{}", errors[0]);
    assert!(errors[1].contains("rank 0 did not connect in time"), "{}", errors[1]);
}

#[test]
fn a_peer_with_another_certificate_is_named() {
    let stranger = Identity::generate().unwrap().fingerprint;
    let errors = pair(
        |rank, peers| {
            let mut seen = peers.to_vec();
            if rank == 0 {
                seen[1].fingerprint = stranger.clone();
            }
            seen
        },
        |_| b"one formation",
    );
    assert!(errors[0].contains(&format!("not the pinned {stranger}")), "{}", errors[0]);
}
