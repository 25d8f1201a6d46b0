//! Counter-based randomness (T40). Every random number is Philox4x32-10 applied to a
//! counter, under a key made from the run seed. A *stream* is named by a purpose and ids
//! (parameter name, epoch, step, global example index) and owns a disjoint counter range,
//! so no stream ever depends on the rank or the device that draws it, nor on draw order
//! across streams.

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds (Salmon et al., SC'11).
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(PHILOX_W0);
            key[1] = key[1].wrapping_add(PHILOX_W1);
        }
        let p0 = (PHILOX_M0 as u64) * (ctr[0] as u64);
        let p1 = (PHILOX_M1 as u64) * (ctr[2] as u64);
        ctr = [((p1 >> 32) as u32) ^ ctr[1] ^ key[0], p1 as u32, ((p0 >> 32) as u32) ^ ctr[3] ^ key[1], p0 as u32];
    }
    ctr
}

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

    pub fn next_u64(&mut self) -> u64 {
        (self.next_u32() as u64) << 32 | self.next_u32() as u64
    }

    /// Uniform in [0, 1) with 24 bits of precision.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
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
    fn philox_known_answers() {
        // Known-answer vectors of Random123 (kat_vectors, philox4x32_10).
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
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
