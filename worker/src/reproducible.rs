//! `train.reproducible = "any-world-size"`: the same seed and global batch give the same
//! weights, bit for bit, on 1, 2, 4 or 8 workers.
//!
//! Two things make a default data-parallel sum depend on the world size: the kernel shapes
//! (a rank's batch is B/W rows) and the order of the additions (the ring's). Here
//! - the unit of computation is fixed: the global batch is cut into `train.micro_shards`
//!   shards whatever the world size, and each shard's forward and backward run alone, so
//!   every shard gradient is the same bits on any world size;
//! - the sum is exact: shard gradients are added as 61-bit fixed-point integers, block-scaled
//!   per tensor by the largest binary exponent any shard has, and integer addition does not
//!   care about order. Across ranks the integers travel as four 16-bit limbs in f32, whose
//!   sums stay exact up to 256 ranks; the largest exponent travels as a one-hot histogram.
//!
//! The cost: 4× the all-reduce bytes, the histogram round trip, and shard-sized kernels.

use crate::{Result, WorkerError};
use lockstep_nn::data::rank_slice;
use rayon::prelude::*;

/// Histogram bins: f32 exponents -150..=127 (`exponent + 150`), then "not finite".
const EXP_BINS: usize = 279;
const NOT_FINITE: usize = EXP_BINS - 1;
/// Bits of a limb: W limbs of 2^16 sum exactly in f32 (24-bit mantissa) for W ≤ 256.
const LIMB_BITS: u32 = 16;
const LIMBS: usize = 4;

/// Shards `[r·S/W, (r+1)·S/W)` of the `shards` fixed slices of `batch`: rank `rank`'s.
pub fn my_shards(batch: &[u32], shards: usize, rank: usize, world: usize) -> Vec<&[u32]> {
    let (first, last) = (rank * shards / world, (rank + 1) * shards / world);
    (first..last).map(|j| rank_slice(batch, j, shards)).filter(|s| !s.is_empty()).collect()
}

/// The exponent bin of the largest magnitude among `values`: floor(log2 max|v|) + 150,
/// `NOT_FINITE` if one is not finite, None if all are zero.
fn exponent_bin(shards: &[Vec<f32>]) -> Option<usize> {
    // |v|'s bits order like |v|, and inf and NaN are above every finite value: one integer
    // max (which vectorizes) finds both the largest magnitude and a non-finite value.
    let top_bits = shards.iter().flat_map(|s| s.iter().map(|v| v.to_bits() & 0x7fff_ffff)).max().unwrap_or(0);
    if top_bits > f32::MAX.to_bits() {
        return Some(NOT_FINITE);
    }
    let largest = f32::from_bits(top_bits);
    if largest == 0.0 {
        return None;
    }
    // The binary exponent from the bits, as f64 holds it (f32 subnormals are normal there).
    let e = ((f64::from(largest).to_bits() >> 52) & 0x7ff) as i64 - 1023;
    Some((e.clamp(-150, 127) + 150) as usize)
}

/// Values per parallel task of the conversions (fixed: the result does not depend on it).
const CHUNK: usize = 1 << 14;

/// Sums `tensors[t][shard][i]` over this rank's shards and all ranks exactly, into
/// `out[t][i]`; tensor t has `lens[t]` values and `total_shards` is the number of shards
/// over all ranks. Every rank calls it with the same `lens`, in step (a rank without
/// shards passes none).
pub fn exact_sum(
    tensors: &[Vec<Vec<f32>>],
    lens: &[usize],
    total_shards: usize,
    reducer: &mut dyn SumF32,
) -> Result<Vec<Vec<f64>>> {
    let shifts = block_shifts(tensors, total_shards, reducer)?;
    let mut limbs = vec![0.0f32; lens.iter().sum::<usize>() * LIMBS];
    let mut rest = limbs.as_mut_slice();
    for ((shards, shift), &len) in tensors.iter().zip(&shifts).zip(lens) {
        let (mine, after) = rest.split_at_mut(len * LIMBS);
        rest = after;
        let scale = shift.map_or(0.0, f64::exp2);
        mine.par_chunks_mut(CHUNK * LIMBS).enumerate().for_each(|(c, chunk)| {
            // Shard by shard over a contiguous run: integer sums, in any order the same.
            let range = c * CHUNK..(c * CHUNK + chunk.len() / LIMBS);
            let mut sum = vec![0i64; range.len()];
            // An all-zero or non-finite tensor sends zeros (its shift says which it is).
            for shard in shards.iter().filter(|_| scale > 0.0) {
                for (s, &v) in sum.iter_mut().zip(&shard[range.clone()]) {
                    *s += to_fixed(v, scale);
                }
            }
            for (q, out) in sum.into_iter().zip(chunk.chunks_exact_mut(LIMBS)) {
                write_limbs(q, out);
            }
        });
    }
    reducer.sum_f32(&mut limbs)?;
    let mut at = 0;
    let mut out = Vec::with_capacity(tensors.len());
    for (shift, &len) in shifts.iter().zip(lens) {
        let unit = shift.map(|s| (-s).exp2());
        let mine = &limbs[at * LIMBS..(at + len) * LIMBS];
        out.push(mine.par_chunks(LIMBS).map(|l| from_limbs(l, unit)).collect());
        at += len;
    }
    Ok(out)
}

/// The fixed-point shift of each tensor (None: every value is zero; NaN: one is not
/// finite), from the largest exponent any rank's shard has.
fn block_shifts(tensors: &[Vec<Vec<f32>>], total_shards: usize, reducer: &mut dyn SumF32) -> Result<Vec<Option<f64>>> {
    let mut hist = vec![0.0f32; tensors.len() * EXP_BINS];
    for (t, shards) in tensors.iter().enumerate() {
        if let Some(bin) = exponent_bin(shards) {
            hist[t * EXP_BINS + bin] = 1.0;
        }
    }
    reducer.sum_f32(&mut hist)?;
    let shard_count_bits = total_shards.max(1).next_power_of_two().ilog2();
    let shifts = hist
        .chunks_exact(EXP_BINS)
        .map(|bins| match bins.iter().rposition(|&c| c > 0.0) {
            None => None,
            Some(NOT_FINITE) => Some(f64::NAN),
            // |v| < 2^(e+1): a shard value scales below 2^(60 − bits(shards)), their sum below 2^60.
            Some(bin) => Some(60.0 - shard_count_bits as f64 - (bin as f64 - 150.0 + 1.0)),
        })
        .collect();
    Ok(shifts)
}

/// v in units of 1/scale, rounded.
fn to_fixed(v: f32, scale: f64) -> i64 {
    // Half away from zero; `as` truncates in one instruction, `f64::round` is a libm call
    // on baseline x86-64.
    let x = f64::from(v) * scale;
    (x + 0.5f64.copysign(x)) as i64
}

/// q as limbs l0 + l1·2^16 + l2·2^32 + l3·2^48: the low three in [0, 2^16), the top signed.
fn write_limbs(q: i64, out: &mut [f32]) {
    let mask = (1i64 << LIMB_BITS) - 1;
    for (k, limb) in out.iter_mut().enumerate() {
        let part = q >> (k as u32 * LIMB_BITS);
        *limb = if k + 1 < LIMBS { (part & mask) as f32 } else { part as f32 };
    }
}

/// The value the summed limbs stand for, in units of `unit` (None: zero; NaN: not finite).
/// The true sum fits in i64, so wrapping arithmetic gives it exactly.
fn from_limbs(limbs: &[f32], unit: Option<f64>) -> f64 {
    let Some(unit) = unit else { return 0.0 };
    let q =
        limbs.iter().enumerate().fold(0i64, |q, (k, &l)| q.wrapping_add((l as i64).wrapping_shl(k as u32 * LIMB_BITS)));
    q as f64 * unit
}

/// The collective `exact_sum` needs: f32 sums across the data-parallel ranks, uncompressed.
pub trait SumF32 {
    fn sum_f32(&mut self, values: &mut [f32]) -> Result<()>;
}

/// A world of one: sums are the values.
impl SumF32 for () {
    fn sum_f32(&mut self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// `Err` unless every limb sum stayed exact (a check on the invariant, not on input).
pub fn check_world(world: usize) -> Result<()> {
    if world > 1 << (24 - LIMB_BITS) {
        return Err(WorkerError::Config(format!(
            "train.reproducible = \"any-world-size\" sums exactly on at most {} workers, not {world}",
            1 << (24 - LIMB_BITS)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// W ranks in one process, each with its own shards; the collective's f32 sums are
    /// done by hand, as a ring would (in another order: they are exact).
    fn sum_over_ranks(per_rank: &[Vec<Vec<Vec<f32>>>]) -> Vec<Vec<f64>> {
        let total: usize = per_rank.iter().map(|t| t[0].len()).sum();
        let lens: Vec<usize> = (0..per_rank[0].len())
            .map(|t| per_rank.iter().filter_map(|r| r[t].first().map(Vec::len)).max().unwrap_or(0))
            .collect();
        // What every rank sends in call `n`, given the summed replies to the calls before.
        let sent = |n: usize, replies: &[Vec<f32>]| -> Vec<f32> {
            let mut summed: Vec<f32> = Vec::new();
            for tensors in per_rank {
                let mut rec = Recorder { calls: Vec::new(), replies: replies.to_vec() };
                let _ = exact_sum(tensors, &lens, total, &mut rec);
                let mine = &rec.calls[n];
                summed.resize(mine.len(), 0.0);
                summed.iter_mut().zip(mine).for_each(|(a, b)| *a += b);
            }
            summed
        };
        let hist = sent(0, &[]);
        let limbs = sent(1, std::slice::from_ref(&hist));
        let mut rec = Recorder { calls: Vec::new(), replies: vec![hist, limbs] };
        exact_sum(&per_rank[0], &lens, total, &mut rec).unwrap()
    }

    /// Records what it is asked to sum and answers with the prepared replies.
    struct Recorder {
        calls: Vec<Vec<f32>>,
        replies: Vec<Vec<f32>>,
    }
    impl SumF32 for Recorder {
        fn sum_f32(&mut self, values: &mut [f32]) -> Result<()> {
            self.calls.push(values.to_vec());
            if let Some(reply) = self.replies.get(self.calls.len() - 1) {
                values.copy_from_slice(reply);
            }
            Ok(())
        }
    }

    fn shard(seed: u64, len: usize) -> Vec<f32> {
        let mut s = lockstep_nn::rng::Stream::new(seed, "shard", &[]);
        (0..len).map(|i| s.normal() * 10f32.powi((i % 7) as i32 - 3)).collect()
    }

    #[test]
    fn the_sum_is_the_same_bits_however_the_shards_are_spread() {
        let shards: Vec<Vec<f32>> = (0..8).map(|j| shard(j, 50)).collect();
        let one_rank = sum_over_ranks(&[vec![shards.clone()]]);
        let two = sum_over_ranks(&[vec![shards[..4].to_vec()], vec![shards[4..].to_vec()]]);
        let four: Vec<_> = shards.chunks(2).map(|c| vec![c.to_vec()]).collect();
        let uneven =
            sum_over_ranks(&[vec![shards[..1].to_vec()], vec![shards[1..6].to_vec()], vec![shards[6..].to_vec()]]);
        assert_eq!(one_rank, two);
        assert_eq!(one_rank, sum_over_ranks(&four));
        assert_eq!(one_rank, uneven);
        // And it is the sum: to the block's fixed-point resolution, 2^-52 of the largest value.
        let largest = shards.iter().flatten().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
        for i in 0..50 {
            let exact: f64 = shards.iter().map(|s| f64::from(s[i])).sum();
            assert!((one_rank[0][i] - exact).abs() <= largest * 2f64.powi(-50), "{i}: {} vs {exact}", one_rank[0][i]);
        }
    }

    #[test]
    fn zeros_and_non_finite_values_survive() {
        let zeros = vec![vec![0.0; 3], vec![0.0; 3]];
        let nan = vec![vec![1.0, f32::INFINITY, 2.0], vec![1.0; 3]];
        let out = sum_over_ranks(&[vec![zeros, nan]]);
        assert_eq!(out[0], vec![0.0; 3]);
        assert!(out[1].iter().all(|v| v.is_nan()), "a non-finite gradient poisons its tensor: {:?}", out[1]);
    }

    #[test]
    fn every_rank_takes_its_block_of_the_fixed_shards() {
        let batch: Vec<u32> = (0..16).collect();
        let all: Vec<u32> = (0..4).flat_map(|r| my_shards(&batch, 8, r, 4).concat()).collect();
        assert_eq!(all, batch);
        assert_eq!(my_shards(&batch, 8, 1, 4), vec![&[4, 5][..], &[6, 7][..]]);
        assert_eq!(my_shards(&batch, 8, 0, 1).len(), 8);
        assert_eq!(my_shards(&batch, 2, 0, 3), Vec::<&[u32]>::new(), "more ranks than shards: some get none");
        assert_eq!(my_shards(&batch, 2, 2, 3).concat(), (8..16).collect::<Vec<u32>>());
    }
}
