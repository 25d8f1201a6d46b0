//! An in-process ring over channels: one thread per rank, for unit tests of everything
//! above the transport.

use crate::ring::{RingComm, RingLink};
use crate::{CollectiveError, Result};
use std::sync::mpsc::{channel, Receiver, Sender};

pub struct ThreadLink {
    to_next: Sender<Vec<u8>>,
    from_prev: Receiver<Vec<u8>>,
}

impl RingLink for ThreadLink {
    fn exchange_bytes(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        // The channel is unbounded, so sending first cannot deadlock.
        self.to_next.send(send.to_vec()).map_err(|_| CollectiveError::Link("next rank hung up".into()))?;
        let got = self.from_prev.recv().map_err(|_| CollectiveError::Link("previous rank hung up".into()))?;
        if got.len() != recv.len() {
            return Err(CollectiveError::Protocol(format!("expected {} bytes, got {}", recv.len(), got.len())));
        }
        recv.copy_from_slice(&got);
        Ok(())
    }
}

/// Communicators for ranks 0..world, to be moved into one thread each.
pub fn thread_group(world: usize) -> Vec<RingComm<ThreadLink>> {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..world).map(|_| channel()).unzip();
    // Rank r sends on channel r+1 (received by rank r+1) and receives on channel r.
    let mut receivers: Vec<Option<Receiver<Vec<u8>>>> = receivers.into_iter().map(Some).collect();
    (0..world)
        .map(|rank| RingComm {
            link: ThreadLink {
                to_next: senders[(rank + 1) % world].clone(),
                from_prev: receivers[rank].take().expect("each receiver taken once"),
            },
            rank,
            world,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Communicator;

    /// Runs `f` on every rank of a thread group and returns each rank's result.
    fn on_group<T: Send + 'static>(
        world: usize,
        f: impl Fn(&mut dyn Communicator) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        on_group_as(world, false, f)
    }

    /// `on_group`, with `defaults`: through [`DefaultsOnly`].
    fn on_group_as<T: Send + 'static>(
        world: usize,
        defaults: bool,
        f: impl Fn(&mut dyn Communicator) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = std::sync::Arc::new(f);
        let handles: Vec<_> = thread_group(world)
            .into_iter()
            .map(|mut comm| {
                let f = f.clone();
                std::thread::spawn(move || if defaults { f(&mut DefaultsOnly(comm)) } else { f(&mut comm) })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    }

    fn input(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 31 + rank * 17) % 97) as f32 * 0.01 + rank as f32).collect()
    }

    #[test]
    fn all_reduce_is_exact_and_identical_on_every_rank() {
        for world in 1..=5 {
            for len in [0usize, 1, 2, 7, world * 3 + 1, 1000] {
                let results = on_group(world, move |c| {
                    let mut buf = input(c.rank(), len);
                    c.all_reduce_sum(&mut buf).unwrap();
                    buf
                });
                let want: Vec<f64> = (0..len).map(|i| (0..world).map(|r| input(r, len)[i] as f64).sum()).collect();
                for (r, got) in results.iter().enumerate() {
                    assert_eq!(got.len(), len);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((*g as f64 - w).abs() < 1e-3, "world {world} len {len} rank {r}: {g} vs {w}");
                    }
                    // identical bits everywhere
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        results[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    /// A communicator with only the required methods: the trait's default
    /// reduce-scatter and all-gather (the ones `HierComm` uses) run on it.
    struct DefaultsOnly(RingComm<ThreadLink>);

    impl Communicator for DefaultsOnly {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world(&self) -> usize {
            self.0.world()
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> crate::Result<()> {
            self.0.all_reduce_sum(buf)
        }
        fn broadcast(&mut self, buf: &mut [f32], root: usize) -> crate::Result<()> {
            self.0.broadcast(buf, root)
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// ZeRO's contract: the shards partition the buffer, each holds the all-reduce's bits,
    /// and an all-gather of the shards rebuilds the all-reduced buffer bit for bit.
    fn check_reduce_scatter_and_all_gather(defaults: bool) {
        for world in 1..=5 {
            for len in [0usize, 1, 2, 7, world * 3 + 1, 1000] {
                let results = on_group_as(world, defaults, move |c| {
                    let mut reduced = input(c.rank(), len);
                    c.all_reduce_sum(&mut reduced).unwrap();
                    let mut scattered = input(c.rank(), len);
                    c.reduce_scatter_sum(&mut scattered).unwrap();
                    let mine = c.shard_of(len, c.rank());
                    assert_eq!(bits(&scattered[mine.clone()]), bits(&reduced[mine.clone()]), "world {world} len {len}");
                    let shards: Vec<_> = (0..c.world()).map(|r| c.shard_of(len, r)).collect();
                    let mut gathered = vec![f32::NAN; len];
                    gathered[mine.clone()].copy_from_slice(&scattered[mine]);
                    c.all_gather(&mut gathered).unwrap();
                    assert_eq!(bits(&gathered), bits(&reduced), "world {world} len {len}: all-gather");
                    shards
                });
                let mut covered: Vec<usize> = results[0].iter().flat_map(|r| r.clone()).collect();
                covered.sort_unstable();
                assert_eq!(covered, (0..len).collect::<Vec<_>>(), "world {world} len {len}: shards partition");
            }
        }
    }

    #[test]
    fn ring_reduce_scatter_holds_the_all_reduce_bits_and_all_gather_rebuilds_it() {
        check_reduce_scatter_and_all_gather(false);
    }

    #[test]
    fn default_reduce_scatter_and_all_gather_are_exact_too() {
        check_reduce_scatter_and_all_gather(true);
    }

    #[test]
    fn all_gather_keeps_negative_zero_and_infinity() {
        let results = on_group(3, |c| {
            let mut buf = vec![0.0f32; 6];
            let mine = c.shard_of(6, c.rank());
            for v in &mut buf[mine] {
                *v = [-0.0, 0.0, f32::INFINITY][c.rank()];
            }
            c.all_gather(&mut buf).unwrap();
            bits(&buf)
        });
        assert!(results.iter().all(|r| r == &results[0]));
        assert_eq!(results[0].iter().filter(|&&b| b == (-0.0f32).to_bits()).count(), 2);
    }

    #[test]
    fn half_precision_all_reduce_is_close_identical_and_keeps_the_f32_tail() {
        use crate::WireFormat;
        for format in [WireFormat::Bf16, WireFormat::F16] {
            for world in 2..=4 {
                let len = 1001;
                let half_len = len - 3; // the last 3 values stay f32 (loss, target count)
                let results = on_group(world, move |c| {
                    let mut buf = input(c.rank(), len);
                    buf[len - 1] = 123_456.79 + c.rank() as f32; // needs f32's 24 bits
                    c.all_reduce_sum_as(&mut buf, format, half_len).unwrap();
                    buf
                });
                let want = |i: usize| -> f64 {
                    (0..world)
                        .map(|r| if i == len - 1 { 123_456.79f32 as f64 + r as f64 } else { input(r, len)[i] as f64 })
                        .sum()
                };
                // bf16 keeps 8 significant bits, fp16 11; up to world−1 roundings on the way.
                let tolerance = if format == WireFormat::Bf16 { 2e-2 } else { 4e-3 };
                for got in &results {
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        results[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "identical bits on every rank"
                    );
                    for (i, g) in got.iter().enumerate().take(half_len) {
                        let w = want(i);
                        assert!((*g as f64 - w).abs() <= tolerance * w.abs().max(1.0), "{format:?} [{i}] {g} vs {w}");
                    }
                    assert_eq!(
                        got[len - 1],
                        (0..world).map(|r| 123_456.79f32 + r as f32).sum::<f32>(),
                        "f32 tail exact"
                    );
                }
            }
        }
    }

    #[test]
    fn all_reduce_64_mib() {
        let len = 16 << 20; // 64 MiB of f32
        let results = on_group(4, move |c| {
            let mut buf = vec![c.rank() as f32 + 1.0; len];
            c.all_reduce_sum(&mut buf).unwrap();
            (buf.iter().all(|&v| v == 10.0), buf.len())
        });
        assert!(results.iter().all(|&(ok, n)| ok && n == len));
    }

    #[test]
    fn broadcast_and_barrier() {
        for world in 1..=5 {
            for root in 0..world {
                let results = on_group(world, move |c| {
                    let mut buf = input(c.rank(), 9);
                    c.broadcast(&mut buf, root).unwrap();
                    c.barrier().unwrap();
                    buf
                });
                assert!(results.iter().all(|b| *b == input(root, 9)), "world {world} root {root}");
            }
        }
    }
}
