//! The QUIC ring over loopback: real endpoints, real TLS, one OS thread per rank.

use lockstep_collective::quic::QuicLink;
use lockstep_collective::tls::{client_config, endpoint, server_config, AllowedPeers, Identity};
use lockstep_collective::{Communicator, RingComm};
use lockstep_proto::wire::PeerInfo;
use std::time::Duration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn quic_group(rt: &tokio::runtime::Runtime, world: usize) -> Vec<RingComm<QuicLink>> {
    rt.block_on(async {
        let mut setups = Vec::new();
        for _ in 0..world {
            let id = Identity::generate().unwrap();
            let allowed = AllowedPeers::default();
            let ep =
                endpoint("127.0.0.1:0".parse().unwrap(), server_config(&id, Some(allowed.clone())).unwrap()).unwrap();
            setups.push((id, allowed, ep));
        }
        let peers: Vec<PeerInfo> = setups
            .iter()
            .enumerate()
            .map(|(rank, (id, _, ep))| PeerInfo {
                rank,
                data_addr: ep.local_addr().unwrap().to_string(),
                fingerprint: id.fingerprint.clone(),
                host_id: format!("test-host-{rank}"),
            })
            .collect();
        let tasks: Vec<_> = setups
            .into_iter()
            .enumerate()
            .map(|(rank, (id, allowed, ep))| {
                let peers = peers.clone();
                tokio::spawn(async move {
                    let link =
                        QuicLink::connect(&ep, &allowed, &id, rank, &peers, Duration::from_secs(20)).await.unwrap();
                    (RingComm { link, rank, world }, ep)
                })
            })
            .collect();
        let mut comms = Vec::new();
        for t in tasks {
            let (comm, ep) = t.await.unwrap();
            std::mem::forget(ep); // keep the endpoint alive for the test's duration
            comms.push(comm);
        }
        comms
    })
}

fn on_ranks<T: Send + 'static>(comms: Vec<RingComm<QuicLink>>, f: fn(&mut dyn Communicator) -> T) -> Vec<T> {
    let handles: Vec<_> = comms.into_iter().map(|mut c| std::thread::spawn(move || f(&mut c))).collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn quic_all_reduce_small_odd_and_empty() {
    let rt = runtime();
    for world in [2usize, 3, 4, 5] {
        let comms = quic_group(&rt, world);
        let results = on_ranks(comms, |c| {
            let mut out = Vec::new();
            for len in [0usize, 1, 2, 7, 1001] {
                let mut buf: Vec<f32> = (0..len).map(|i| (i + c.rank() * 1000) as f32).collect();
                c.all_reduce_sum(&mut buf).unwrap();
                out.push(buf);
            }
            let mut b = vec![c.rank() as f32; 3];
            c.broadcast(&mut b, 1).unwrap();
            out.push(b);
            out
        });
        for (len_idx, len) in [0usize, 1, 2, 7, 1001].iter().enumerate() {
            for r in &results {
                let want: Vec<f32> = (0..*len).map(|i| (0..world).map(|k| (i + k * 1000) as f32).sum()).collect();
                assert_eq!(r[len_idx], want, "world {world} len {len}");
            }
        }
        assert!(results.iter().all(|r| r[5] == vec![1.0; 3]));
    }
}

#[test]
fn quic_all_reduce_64_mib() {
    let rt = runtime();
    let comms = quic_group(&rt, 2);
    let results = on_ranks(comms, |c| {
        let mut buf: Vec<f32> = (0..16usize << 20).map(|i| (i % 1000) as f32 + c.rank() as f32).collect();
        c.all_reduce_sum(&mut buf).unwrap();
        buf.iter().enumerate().all(|(i, &v)| v == 2.0 * (i % 1000) as f32 + 1.0)
    });
    assert_eq!(results, vec![true, true]);
}

#[test]
fn wrong_fingerprint_is_refused() {
    let rt = runtime();
    rt.block_on(async {
        let server_id = Identity::generate().unwrap();
        let server = endpoint("127.0.0.1:0".parse().unwrap(), server_config(&server_id, None).unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        });
        let client_id = Identity::generate().unwrap();
        let client = endpoint("127.0.0.1:0".parse().unwrap(), server_config(&client_id, None).unwrap()).unwrap();
        let wrong = "0".repeat(64);
        let err = client
            .connect_with(client_config(&client_id, &wrong).unwrap(), addr, "lockstep")
            .unwrap()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("fingerprint mismatch"), "{err}");
        let ok = client
            .connect_with(client_config(&client_id, &server_id.fingerprint).unwrap(), addr, "lockstep")
            .unwrap()
            .await;
        assert!(ok.is_ok());
    });
}
