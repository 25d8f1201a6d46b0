//! Hierarchical all-reduce (shared memory inside a host, a ring between hosts) against the
//! flat ring: the same sums within float rounding, identical bits on every rank.

use lockstep_collective::hier::HierComm;
use lockstep_collective::shm::{ShmComm, ShmGroupSpec};
use lockstep_collective::thread::thread_group;
use lockstep_collective::{Communicator, WireFormat};
use std::time::Duration;

/// `hosts` × `per_host` ranks; rank r is on host r mod hosts (interleaved, as the netns
/// test places them), local index r div hosts.
fn hierarchical_group(hosts: usize, per_host: usize, tag: &str) -> Vec<HierComm> {
    let world = hosts * per_host;
    let locations: Vec<(usize, usize)> = (0..world).map(|r| (r % hosts, r / hosts)).collect();
    // One thread ring between hosts per local index.
    let mut rings: Vec<Vec<_>> = (0..per_host).map(|_| thread_group(hosts).into_iter().map(Some).collect()).collect();
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let (host, local) = locations[rank];
            let spec = ShmGroupSpec {
                secret: b"hier test".to_vec(),
                group: format!("{tag}-host{host}-{}", std::process::id()),
                member: local,
                ranks: (0..per_host).map(|l| l * hosts + host).collect(),
                timeout: Duration::from_secs(30),
                sub_len: 64,
            };
            std::thread::spawn(move || ShmComm::connect(&spec).expect("shm group"))
        })
        .collect();
    threads
        .into_iter()
        .enumerate()
        .map(|(rank, t)| {
            let (host, local) = locations[rank];
            let inter = rings[local][host].take().expect("ring member");
            HierComm::new(t.join().expect("thread"), Some(Box::new(inter)), locations.clone(), rank)
        })
        .collect()
}

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 31 + rank * 17) % 101) as f32 * 0.013 - 0.5 + rank as f32).collect()
}

fn run_all<C: Communicator + Send + 'static>(
    comms: Vec<C>,
    body: impl Fn(usize, &mut C) -> Vec<f32> + Send + Sync + Clone + 'static,
) -> Vec<Vec<f32>> {
    let threads: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(rank, mut c)| {
            let body = body.clone();
            std::thread::spawn(move || body(rank, &mut c))
        })
        .collect();
    threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
}

#[test]
fn hierarchical_equals_flat_within_rounding_with_identical_bits_everywhere() {
    for (hosts, per_host) in [(2, 2), (3, 2), (2, 3)] {
        let world = hosts * per_host;
        for len in [1, 7, 3 * world + 1, 5000] {
            let hier =
                run_all(hierarchical_group(hosts, per_host, &format!("h{hosts}{per_host}-{len}")), move |r, c| {
                    let mut buf = input(r, len);
                    c.all_reduce_sum(&mut buf).expect("hierarchical all-reduce");
                    buf
                });
            let flat = run_all(thread_group(world), move |r, c| {
                let mut buf = input(r, len);
                c.all_reduce_sum(&mut buf).expect("ring all-reduce");
                buf
            });
            for (r, h) in hier.iter().enumerate() {
                assert_eq!(
                    h.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    hier[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{hosts}x{per_host}, len {len}: rank {r} differs from rank 0"
                );
            }
            for (i, (h, f)) in hier[0].iter().zip(&flat[0]).enumerate() {
                assert!((h - f).abs() <= 1e-6 * f.abs().max(1.0), "{hosts}x{per_host}, len {len}, [{i}]: {h} vs {f}");
            }
        }
    }
}

#[test]
fn hierarchical_broadcast_and_16_bit_wire() {
    let (hosts, per_host) = (2, 2);
    for root in 0..4 {
        let got = run_all(hierarchical_group(hosts, per_host, &format!("bc{root}")), move |r, c| {
            let mut buf = input(r, 100);
            c.broadcast(&mut buf, root).expect("broadcast");
            buf
        });
        assert!(got.iter().all(|g| g == &input(root, 100)), "root {root}");
    }
    let got = run_all(hierarchical_group(hosts, per_host, "bf16"), |r, c| {
        let mut buf = input(r, 1000);
        c.all_reduce_sum_as(&mut buf, WireFormat::Bf16, 900).expect("bf16 all-reduce");
        buf
    });
    assert!(got.iter().all(|g| g == &got[0]), "identical bits with a 16-bit wire");
    let exact: Vec<f32> = (0..1000).map(|i| (0..4).map(|r| input(r, 1000)[i]).sum()).collect();
    for (i, (g, e)) in got[0].iter().zip(&exact).enumerate() {
        let tol = if i < 900 { 2e-2 * e.abs().max(1.0) } else { 1e-5 * e.abs().max(1.0) };
        assert!((g - e).abs() <= tol, "[{i}] {g} vs {e}");
    }
}
