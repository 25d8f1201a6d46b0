//! The machine's peak fp32 FLOP/s, measured: independent FMA chains on the widest vectors
//! the CPU has, on every thread at once. The benches divide by it, so a training step's
//! FLOP/s reads as a fraction of what this machine can do at all, in the same run.

use crate::isa::{supported, Isa};
use rayon::prelude::*;
use std::time::Instant;

/// FMA rounds per thread per measurement.
const ROUNDS: usize = 1 << 21;

/// Independent FMA chains in flight: enough to cover the FMA latency on every port
/// (4–5 cycles × 2 ports), few enough to stay in registers.
const CHAINS: usize = 12;

/// `rounds` of [`CHAINS`] independent FMA chains, each x ← 0.999x + 0.001 (it converges:
/// no overflow, no denormals), on one ISA's widest vectors; returns (their sum, lanes).
fn fma_chains(isa: Isa, rounds: usize) -> (f32, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa` is in `supported()`, so the CPU has the features each path enables.
        match isa {
            Isa::Avx512 => return (unsafe { x86::chains_avx512(rounds) }, 16),
            Isa::Avx2 => return (unsafe { x86::chains_avx2(rounds) }, 8),
            Isa::Scalar => {}
        }
    }
    let mut acc = [1.0f32; CHAINS];
    for _ in 0..rounds {
        acc.iter_mut().for_each(|a| *a = *a * std::hint::black_box(0.999) + 1e-3);
    }
    (acc.iter().sum(), 1)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) fn chains_avx512(rounds: usize) -> f32 {
        let (m, c) = (_mm512_set1_ps(std::hint::black_box(0.999)), _mm512_set1_ps(1e-3));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..rounds {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn chains_avx2(rounds: usize) -> f32 {
        let (m, c) = (_mm256_set1_ps(std::hint::black_box(0.999)), _mm256_set1_ps(1e-3));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..rounds {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        let mut lanes = [0.0f32; 8];
        acc.iter()
            .map(|&a| {
                // SAFETY: `lanes` holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), a) };
                lanes.iter().sum::<f32>()
            })
            .sum()
    }
}

/// Peak fp32 FLOP/s of `threads` threads on the widest ISA this CPU has (not the one
/// `LOCKSTEP_CPU_KERNEL` forces), and that ISA: the best of 3 runs.
pub fn peak_flops(threads: usize) -> (f64, Isa) {
    let (isa, threads) = (supported()[0], threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let runs: Vec<(f32, usize)> =
            (0..threads).into_par_iter().map(|_| fma_chains(isa, std::hint::black_box(ROUNDS))).collect();
        let secs = start.elapsed().as_secs_f64();
        let lanes = std::hint::black_box(runs)[0].1;
        best = best.max(2.0 * (threads * ROUNDS * CHAINS * lanes) as f64 / secs);
    }
    (best, isa)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path computes the same chains (x ← 0.999x + 0.001 from 1, lane by lane) and
    /// the peak is a positive, finite rate.
    #[test]
    fn the_fma_loop_measures_and_converges() {
        let x = (0..100).fold(1.0f32, |x, _| x * 0.999 + 1e-3);
        for &isa in supported() {
            let (sum, lanes) = fma_chains(isa, 100);
            let want = x * (CHAINS * lanes) as f32;
            assert!((sum - want).abs() < 1e-3 * want, "{isa:?}: {sum} vs {want}");
        }
        let (flops, isa) = peak_flops(1);
        println!("peak {:.1} GFLOP/s per thread on {}", flops / 1e9, isa.name());
        assert!(flops.is_finite() && flops > 1e8, "{flops}");
    }
}
