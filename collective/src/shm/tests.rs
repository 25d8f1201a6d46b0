//! Shared-memory collectives between threads of one process (each with its own mapping
//! of the segment, as separate processes would have). Process-level tests (kill -9, no
//! segment left behind) are in tests/shm.rs of the workspace.

use super::*;

fn spec(secret: &[u8], group: &str, member: usize, world: usize, sub_len: usize) -> ShmGroupSpec {
    ShmGroupSpec {
        secret: secret.to_vec(),
        group: format!("{group}-{}", std::process::id()),
        member,
        ranks: (0..world).collect(),
        timeout: Duration::from_secs(30),
        sub_len,
    }
}

/// Runs `body` on `world` members of one group, each in its own thread.
fn on_group<T: Send + 'static>(
    group: &str,
    world: usize,
    sub_len: usize,
    body: impl Fn(usize, &mut ShmComm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let body = Arc::new(body);
    let threads: Vec<_> = (0..world)
        .map(|m| {
            let (body, spec) = (body.clone(), spec(b"test secret", group, m, world, sub_len));
            std::thread::spawn(move || {
                let mut comm = ShmComm::connect(&spec).expect("join the group");
                body(m, &mut comm)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().expect("member thread")).collect()
}

/// Values whose sum depends on the order of addition.
fn input(member: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919 + member * 104729) % 1000) as f32 * 1e-3 + 1e4 * (member % 2) as f32 - 0.3).collect()
}

/// Σ over members in member order, as f32: what every member must hold, bit for bit.
fn member_order_sum(world: usize, len: usize) -> Vec<u32> {
    let mut acc = input(0, len);
    for m in 1..world {
        acc.iter_mut().zip(input(m, len)).for_each(|(a, v)| *a += v);
    }
    acc.iter().map(|v| v.to_bits()).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn check_all_reduce(world: usize, len: usize, sub_len: usize) {
    let got = on_group(&format!("ar{world}-{len}-{sub_len}"), world, sub_len, move |m, c| {
        let mut buf = input(m, len);
        c.all_reduce_sum(&mut buf).expect("all-reduce");
        // A second collective on the same segment: staging buffers are reused safely.
        let mut again = input(m, len);
        c.all_reduce_sum(&mut again).expect("all-reduce");
        assert_eq!(bits(&buf), bits(&again));
        bits(&buf)
    });
    let want = member_order_sum(world, len);
    for (m, g) in got.iter().enumerate() {
        assert!(g == &want, "world {world}, len {len}, sub_len {sub_len}: member {m} differs");
    }
}

#[test]
fn all_reduce_is_exact_with_identical_bits_on_every_member() {
    for world in 1..=5 {
        for len in [0, 1, 7, 3 * world + 1, 1000] {
            // sub_len 16: many rounds, both staging buffers, ragged and empty regions.
            check_all_reduce(world, len, 16);
            check_all_reduce(world, len, DEFAULT_SUB_LEN);
        }
    }
}

#[test]
fn all_reduce_of_64_mib_is_exact() {
    for world in [2, 3, 5] {
        check_all_reduce(world, 16 << 20, sub_len_for(world));
    }
}

/// The staging the daemon gives a group (`sub_len_for`): one round while every slice fits
/// it, L2-sized rounds past it; exact on both sides of the switch.
#[test]
fn one_round_and_many_round_buffers_are_exact_at_the_switch() {
    for world in [2, 3] {
        let staging = sub_len_for(world);
        for len in [world * staging - 1, world * staging, world * staging + 1, 3 * world * staging + 5] {
            check_all_reduce(world, len, staging);
        }
    }
}

#[test]
fn reduce_scatter_then_all_gather_equals_all_reduce() {
    for world in 1..=4 {
        let len = 1000 + world;
        let got = on_group(&format!("rs{world}"), world, 32, move |m, c| {
            let mut buf = input(m, len);
            c.reduce_scatter(&mut buf).expect("reduce-scatter");
            let owned = bits(&buf[c.slice(len)]);
            c.all_gather(&mut buf).expect("all-gather");
            (owned, bits(&buf), c.slice(len))
        });
        let want = member_order_sum(world, len);
        for (owned, all, slice) in got {
            assert_eq!(owned, want[slice].to_vec());
            assert_eq!(all, want);
        }
    }
}

#[test]
fn broadcast_and_barrier() {
    for world in 1..=4 {
        let got = on_group(&format!("bc{world}"), world, 8, move |m, c| {
            let mut buf = input(m, 333);
            c.broadcast(&mut buf, world - 1).expect("broadcast");
            c.barrier().expect("barrier");
            assert!(c.broadcast(&mut buf, world).is_err(), "root out of range");
            bits(&buf)
        });
        for g in got {
            assert_eq!(g, bits(&input(world - 1, 333)));
        }
    }
}

#[test]
fn a_caller_without_the_secret_is_refused_and_the_group_still_forms() {
    let world = 3;
    let member = |m: usize| {
        std::thread::spawn(move || {
            let mut comm = ShmComm::connect(&spec(b"test secret", "intrude", m, world, 16)).expect("join");
            let mut buf = vec![m as f32 + 1.0; 10];
            comm.all_reduce_sum(&mut buf).expect("all-reduce");
            buf[0]
        })
    };
    let first = member(0);
    // The intruder knows the socket name (as a same-user process listing /proc/net/unix
    // would), but not the secret; it comes while the first member is waiting.
    let group = spec(b"", "intrude", 0, world, 16).group;
    let addr = handshake::address(b"test secret", &group).expect("address");
    let refused = handshake::join_at(&addr, b"wrong secret", 1, Instant::now() + Duration::from_secs(10))
        .expect_err("the intruder is refused")
        .to_string();
    assert!(refused.contains("secret"), "{refused}");
    let others = [member(1), member(2)];
    let sums: Vec<f32> = std::iter::once(first).chain(others).map(|t| t.join().expect("member")).collect();
    assert_eq!(sums, vec![6.0; 3]);
}

#[test]
fn a_member_that_never_comes_is_named_after_the_timeout() {
    let mut lonely = spec(b"s", "lonely", 0, 2, 16);
    lonely.ranks = vec![4, 9];
    lonely.timeout = Duration::from_millis(300);
    let err = ShmComm::connect(&lonely).err().expect("fails").to_string();
    assert!(err.contains("[1]") && err.contains("did not join"), "{err}");
}

#[test]
fn an_abort_fails_a_waiting_member_at_once() {
    let waiting = std::thread::spawn(|| {
        let mut comm = ShmComm::connect(&spec(b"s", "abort", 0, 2, 16)).expect("join");
        let started = Instant::now();
        let err = comm.all_reduce_sum(&mut [1.0; 4]).expect_err("aborted");
        (err.to_string(), started.elapsed())
    });
    let comm = ShmComm::connect(&spec(b"s", "abort", 1, 2, 16)).expect("join");
    std::thread::sleep(Duration::from_millis(200));
    comm.abort_handle().abort();
    let (err, waited) = waiting.join().expect("thread");
    assert!(err.contains("aborted by rank 1"), "{err}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

/// Collectives of every kind back to back, with no closing synchronisation between them:
/// the staging parity rule must hold across them (a race here shows as wrong sums).
#[test]
fn mixed_collectives_back_to_back_stay_exact() {
    for world in [2, 3, 4] {
        let got = on_group(&format!("mixed{world}"), world, 8, move |m, c| {
            let mut out = Vec::new();
            for round in 0..200 {
                let len = 1 + (round * 37) % 300;
                let mut buf = input(m + round, len);
                match round % 4 {
                    0 => c.all_reduce_sum(&mut buf).expect("all-reduce"),
                    1 => {
                        c.reduce_scatter(&mut buf).expect("reduce-scatter");
                        c.all_gather(&mut buf).expect("all-gather");
                    }
                    2 => c.broadcast(&mut buf, round % world).expect("broadcast"),
                    _ => c.barrier().expect("barrier"),
                }
                out.push(bits(&buf));
            }
            out
        });
        for round in 0..200 {
            let len = 1 + (round * 37) % 300;
            let want = match round % 4 {
                0 | 1 => {
                    let mut acc = input(round, len);
                    for m in 1..world {
                        acc.iter_mut().zip(input(m + round, len)).for_each(|(a, v)| *a += v);
                    }
                    Some(bits(&acc))
                }
                2 => Some(bits(&input(round % world + round, len))),
                _ => None,
            };
            for (m, g) in got.iter().enumerate() {
                if let Some(want) = &want {
                    assert!(&g[round] == want, "world {world}, round {round}, member {m}");
                }
            }
        }
    }
}

/// Beside compute a waiter spins briefly and then sleeps, never yields; a member that
/// arrives 30 ms late still meets the others, and the sums are exact.
#[test]
fn waits_beside_compute_sleep_and_still_sum_exactly() {
    let len = 3 * 1000 + 1;
    let got = on_group("beside", 3, 64, move |m, c| {
        c.set_beside_compute(true);
        assert_eq!(c.yield_for, Duration::ZERO, "no yielding beside a trainer thread");
        if m == 2 {
            std::thread::sleep(Duration::from_millis(30));
        }
        let mut buf = input(m, len);
        c.all_reduce_sum(&mut buf).expect("all-reduce");
        bits(&buf)
    });
    let want = member_order_sum(3, len);
    assert!(got.iter().all(|g| g == &want));
}
