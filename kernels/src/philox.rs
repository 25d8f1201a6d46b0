//! Philox4x32-10 (Salmon et al., SC'11), the counter-based generator behind every random
//! stream (T40), one block at a time and many blocks at once. The batched form runs the
//! rounds of [`LANES`] consecutive counters side by side, so the compiler turns the 32×32→64
//! products into `vpmuludq` (4 per AVX2 instruction, 8 per AVX-512 one); it gives the same
//! bits as the one-block form on every ISA (integer arithmetic only).

use crate::multiversion;

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Counters run side by side by [`philox_blocks`].
pub const LANES: usize = 16;

/// One Philox4x32-10 block: four random words from a 128-bit counter and a 64-bit key.
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

/// The blocks with counters (`first_block + l`, `id`) for l in 0..LANES, word-interleaved
/// as the one-block form returns them: `out[4l..4l+4]` is block l.
#[inline(always)]
fn philox_lanes(first_block: u64, id: u64, mut key: [u32; 2], out: &mut [u32]) {
    let mut c0 = [0u32; LANES];
    let mut c1 = [0u32; LANES];
    let mut c2 = [id as u32; LANES];
    let mut c3 = [(id >> 32) as u32; LANES];
    for l in 0..LANES {
        let block = first_block.wrapping_add(l as u64);
        (c0[l], c1[l]) = (block as u32, (block >> 32) as u32);
    }
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(PHILOX_W0);
            key[1] = key[1].wrapping_add(PHILOX_W1);
        }
        for l in 0..LANES {
            let p0 = (PHILOX_M0 as u64) * (c0[l] as u64);
            let p1 = (PHILOX_M1 as u64) * (c2[l] as u64);
            let next = [((p1 >> 32) as u32) ^ c1[l] ^ key[0], p1 as u32, ((p0 >> 32) as u32) ^ c3[l] ^ key[1]];
            (c0[l], c1[l], c2[l], c3[l]) = (next[0], next[1], next[2], p0 as u32);
        }
    }
    for (l, block) in out.chunks_exact_mut(4).enumerate() {
        block.copy_from_slice(&[c0[l], c1[l], c2[l], c3[l]]);
    }
}

multiversion! {
    /// Fills `out` (a multiple of `4·LANES` words) with the blocks `first_block`,
    /// `first_block + 1`, … of stream `id`, each as [`philox4x32_10`] gives it.
    pub fn philox_blocks / philox_blocks_on(first_block: u64, id: u64, key: [u32; 2], out: &mut [u32]) {
        debug_assert_eq!(out.len() % (4 * LANES), 0);
        for (i, lanes) in out.chunks_exact_mut(4 * LANES).enumerate() {
            philox_lanes(first_block.wrapping_add((i * LANES) as u64), id, key, lanes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::supported;

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

    /// Every ISA's batched blocks equal the one-block form, including counters that carry
    /// into the high word.
    #[test]
    fn batched_blocks_equal_one_block_form_on_every_isa() {
        let (id, key) = (0x0123_4567_89ab_cdef_u64, [0xdead_beef, 0x1234_5678]);
        for first in [0u64, 5, u32::MAX as u64 - 7] {
            let want: Vec<u32> = (0..3 * LANES as u64)
                .flat_map(|b| {
                    let block = first + b;
                    philox4x32_10([block as u32, (block >> 32) as u32, id as u32, (id >> 32) as u32], key)
                })
                .collect();
            for &isa in supported() {
                let mut got = vec![0u32; want.len()];
                philox_blocks_on(isa, first, id, key, &mut got);
                assert_eq!(got, want, "{isa:?}, first block {first}");
            }
        }
    }
}
