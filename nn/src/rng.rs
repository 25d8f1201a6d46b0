//! Counter-based randomness (T40). Every random number is Philox4x32-10 applied to a
//! counter, under a key made from the run seed. A *stream* is named by a purpose and ids
//! (parameter name, epoch, step, global example index) and owns a disjoint counter range,
//! so no stream ever depends on the rank or the device that draws it, nor on draw order
//! across streams.

pub use lockstep_kernels::philox::philox4x32_10;
use lockstep_kernels::philox::{philox_blocks, LANES};

/// FNV-1a then a SplitMix64 finaliser: a stable 64-bit name for a stream.
fn stream_id(purpose: &str, ids: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    for b in purpose.bytes() {
        eat(b);
    }
    eat(0xff);
    for id in ids {
        for b in id.to_le_bytes() {
            eat(b);
        }
    }
    let mut z = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stable 64-bit hash of a string id (a parameter name) for use in `ids`.
pub fn name_id(name: &str) -> u64 {
    stream_id(name, &[])
}

/// One random stream: key = run seed, counter = (block index, stream id).
#[derive(Debug, Clone)]
pub struct Stream {
    key: [u32; 2],
    id: u64,
    block: u64,
    buf: [u32; 4],
    used: usize,
}

impl Stream {
    pub fn new(seed: u64, purpose: &str, ids: &[u64]) -> Self {
        Self { key: [seed as u32, (seed >> 32) as u32], id: stream_id(purpose, ids), block: 0, buf: [0; 4], used: 4 }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            let ctr = [self.block as u32, (self.block >> 32) as u32, self.id as u32, (self.id >> 32) as u32];
            self.buf = philox4x32_10(ctr, self.key);
            self.block += 1;
            self.used = 0;
        }
        self.used += 1;
        self.buf[self.used - 1]
    }

    /// The next `out.len()` words, as that many `next_u32` calls would give them; whole
    /// runs of blocks are computed side by side (`philox_blocks`).
    pub fn fill_u32(&mut self, out: &mut [u32]) {
        let mut at = 0;
        while self.used < 4 && at < out.len() {
            out[at] = self.next_u32();
            at += 1;
        }
        let bulk = (out.len() - at) / (4 * LANES) * (4 * LANES);
        if bulk > 0 {
            philox_blocks(self.block, self.id, self.key, &mut out[at..at + bulk]);
            self.block += (bulk / 4) as u64;
            at += bulk;
        }
        for word in &mut out[at..] {
            *word = self.next_u32();
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        (self.next_u32() as u64) << 32 | self.next_u32() as u64
    }

    /// Uniform in [0, 1) with 24 bits of precision.
    pub fn uniform(&mut self) -> f32 {
        uniform_of(self.next_u32())
    }

    /// Standard normal by Box-Muller (one value per call, in f64 for accuracy).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Uniform integer in [0, n), unbiased (rejection sampling).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let r = self.next_u64();
            if r < zone {
                return r % n;
            }
        }
    }
}

/// A random word as a uniform in [0, 1) with 24 bits of precision.
#[inline(always)]
pub fn uniform_of(word: u32) -> f32 {
    (word >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// Fisher-Yates permutation of 0..n from the (seed, "shuffle", epoch) stream.
pub fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    shuffle(&mut Stream::new(seed, "shuffle", &[epoch]), &mut order);
    order
}

/// Fisher-Yates shuffle of `items` in place, drawing from `stream`.
pub fn shuffle<T>(stream: &mut Stream, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = stream.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_words_equal_one_at_a_time_from_any_position() {
        for (skip, len) in [(0, 0), (0, 64), (0, 1000), (1, 63), (3, 129), (6, 640), (2, 7)] {
            let mut one = Stream::new(9, "dropout", &[4, skip as u64]);
            let mut filled = one.clone();
            (0..skip).for_each(|_| {
                one.next_u32();
                filled.next_u32();
            });
            let want: Vec<u32> = (0..len + 5).map(|_| one.next_u32()).collect();
            let mut got = vec![0u32; len];
            filled.fill_u32(&mut got);
            got.extend((0..5).map(|_| filled.next_u32()));
            assert_eq!(got, want, "skip {skip}, len {len}");
        }
    }

    #[test]
    fn streams_are_independent_of_draw_order() {
        let mut a = Stream::new(5, "dropout", &[1, 2]);
        let first: Vec<u32> = (0..10).map(|_| a.next_u32()).collect();
        let mut b = Stream::new(5, "dropout", &[1, 2]);
        let mut other = Stream::new(5, "dropout", &[1, 3]);
        other.next_u32();
        let again: Vec<u32> = (0..10).map(|_| b.next_u32()).collect();
        assert_eq!(first, again);
        let mut c = Stream::new(5, "dropout", &[1, 3]);
        assert_ne!(first[0..4], (0..4).map(|_| c.next_u32()).collect::<Vec<_>>()[..]);
        let mut d = Stream::new(6, "dropout", &[1, 2]);
        assert_ne!(first[0], d.next_u32());
    }

    #[test]
    fn uniform_and_normal_moments() {
        let mut s = Stream::new(1, "test", &[]);
        let n = 200_000;
        let u: Vec<f64> = (0..n).map(|_| s.uniform() as f64).collect();
        let mean = u.iter().sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let z: Vec<f64> = (0..n).map(|_| s.normal() as f64).collect();
        let m = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.01 && (var - 1.0).abs() < 0.02, "{m} {var}");
    }

    #[test]
    fn permutation_is_a_permutation_and_seeded() {
        let p = permutation(3, 0, 1000);
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
        assert_eq!(p, permutation(3, 0, 1000));
        assert_ne!(p, permutation(3, 1, 1000));
        assert_ne!(p, permutation(4, 0, 1000));
    }
}
