//! c (m×n) = a (m×k) · bᵀ for a few rows of a, or a few rows of b (b is n×k row-major, as a
//! `Linear` weight): dot products along k that stream b once, with no packing.
//!
//! `gemm` packs b on every call. With few rows of a (the micro-batches of gradient
//! accumulation, a pipeline's micro-batches, small per-rank batches) packing the whole
//! weight costs more than the product: at 16 rows y = x·Wᵀ ran at 48 GFLOP/s against 103 at
//! 64 rows. Here a block of `MB` rows of a against `NB` rows of b keeps MB·NB accumulators
//! in registers; b is read once from memory, a (a few rows) stays in cache. Each output is
//! one fixed sequence of lane sums and one fixed reduction, whatever the thread count.

use std::ops::Range;

/// Largest m for which `matmul` takes this path...
pub const MAX_ROWS: usize = 24;
/// ...and largest n, for any m.
pub const MAX_COLS: usize = 16;

use crate::isa::{self, Isa};

/// c (+)= a·bᵀ with `isa::current()`; false for `Isa::Scalar` (the caller runs `gemm`).
pub fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) -> bool {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n, "matmul_nt: short buffers");
    // SAFETY: `isa::current()` only picks ISAs whose CPU features are present.
    unsafe { run(isa::current(), a, b, c, (m, k, n), accumulate) }
}

/// `matmul_nt` with a given ISA, which must be one of `isa::supported()`: how the
/// tests run every kernel the CPU has.
pub fn matmul_nt_with(
    kernel: Isa,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    mkn: (usize, usize, usize),
    accumulate: bool,
) -> bool {
    let (m, k, n) = mkn;
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n, "matmul_nt: short buffers");
    assert!(isa::supported().contains(&kernel), "matmul_nt: {kernel:?} is not on this CPU");
    // SAFETY: the kernel's CPU features are present (asserted above).
    unsafe { run(kernel, a, b, c, mkn, accumulate) }
}

/// # Safety
/// `kernel`'s CPU features must be present, and the buffers hold the (m, k, n) shape.
unsafe fn run(kernel: Isa, a: &[f32], b: &[f32], c: &mut [f32], mkn: (usize, usize, usize), accumulate: bool) -> bool {
    let (m, k, n) = mkn;
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::matmul_nt(a, b, c, m, k, n, accumulate),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::matmul_nt(a, b, c, m, k, n, accumulate),
        _ => return false,
    }
    true
}

/// Runs `block(c, i, j)` on every whole `MB`×`NB` block of the (m, n) output, column
/// blocks outermost (a block of b stays in L1 while a's rows pass), and plain dot products
/// on the ragged edges.
#[cfg(target_arch = "x86_64")]
fn tiled<const MB: usize, const NB: usize>(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
    mut block: impl FnMut(&mut [f32], usize, usize),
) {
    let (mb, nb) = (m / MB * MB, n / NB * NB);
    for j in (0..nb).step_by(NB) {
        for i in (0..mb).step_by(MB) {
            block(c, i, j);
        }
    }
    edge(a, b, c, (k, n), 0..mb, nb..n, accumulate);
    edge(a, b, c, (k, n), mb..m, 0..n, accumulate);
}

/// The outputs a block kernel leaves: `rows` × `cols` of c (m×n) = a (m×k) · bᵀ, by dot
/// products in 16 fixed lanes; `ks` is (k, n). Inlined into each ISA's kernel, so the
/// lanes become that ISA's vectors; with one row of a (decoding a token) every output is
/// here, and a single running sum ran scalar at a twentieth of the speed.
#[inline(always)]
fn edge(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    ks: (usize, usize),
    rows: Range<usize>,
    cols: Range<usize>,
    accumulate: bool,
) {
    let (k, n) = ks;
    for i in rows {
        for j in cols.clone() {
            let dot = dot_lanes(&a[i * k..][..k], &b[j * k..][..k]);
            let out = &mut c[i * n + j];
            *out = if accumulate { *out + dot } else { dot };
        }
    }
}

/// Σ x·y in 16 independent lanes, then the tail, then the lanes in order: a fixed order
/// (the same bits on every ISA) that the compiler turns into vectors.
#[inline(always)]
fn dot_lanes(x: &[f32], y: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (x16, y16) = (x.chunks_exact(16), y.chunks_exact(16));
    let tail: f32 = x16.remainder().iter().zip(y16.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in x16.zip(y16) {
        for l in 0..16 {
            lanes[l] += a[l] * b[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    // 4 rows of a against 4 rows of b: 16 accumulators; 8 loads feed 16 FMAs. (4 × 6, with
    // 24 accumulators, measured slower: 60 against 81 GFLOP/s at (16, 784, 512).)
    const MB: usize = 4;
    const NB: usize = 4;

    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
        super::tiled::<MB, NB>(a, b, c, (m, k, n), accumulate, |c, i, j| {
            // SAFETY: the block (i, j) lies inside the checked shape; AVX-512 is present.
            unsafe {
                block(a.as_ptr().add(i * k), b.as_ptr().add(j * k), c.as_mut_ptr().add(i * n + j), k, n, accumulate)
            }
        });
    }

    /// MB rows of a (stride k) against NB rows of b (stride k) into c (stride n); the last
    /// k mod 16 values through a masked load.
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn block(a: *const f32, b: *const f32, c: *mut f32, k: usize, n: usize, accumulate: bool) {
        let mut acc = [[_mm512_setzero_ps(); NB]; MB];
        let tail = k % 16;
        let full = k - tail;
        let mut p = 0;
        while p < full {
            let w: [__m512; NB] = std::array::from_fn(|j| _mm512_loadu_ps(b.add(j * k + p)));
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_ps(a.add(i * k + p));
                for (j, lane) in row.iter_mut().enumerate() {
                    *lane = _mm512_fmadd_ps(x, w[j], *lane);
                }
            }
            p += 16;
        }
        if tail > 0 {
            let mask: __mmask16 = (1u16 << tail) - 1;
            let w: [__m512; NB] = std::array::from_fn(|j| _mm512_maskz_loadu_ps(mask, b.add(j * k + p)));
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm512_maskz_loadu_ps(mask, a.add(i * k + p));
                for (j, lane) in row.iter_mut().enumerate() {
                    *lane = _mm512_fmadd_ps(x, w[j], *lane);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let dots = reduce4(row);
            let out = c.add(i * n);
            let dots = if accumulate { _mm_add_ps(_mm_loadu_ps(out), dots) } else { dots };
            _mm_storeu_ps(out, dots);
        }
    }

    /// The lane sums of four vectors as one: halves added (512 → 256 bits), then two rounds
    /// of pairwise adds, then the 128-bit halves: 13 operations where four separate
    /// reductions take 32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn reduce4(v: &[__m512; 4]) -> __m128 {
        let y: [__m256; 4] =
            std::array::from_fn(|q| _mm256_add_ps(_mm512_castps512_ps256(v[q]), _mm512_extractf32x8_ps::<1>(v[q])));
        let h01 = _mm256_hadd_ps(y[0], y[1]);
        let h23 = _mm256_hadd_ps(y[2], y[3]);
        let h = _mm256_hadd_ps(h01, h23); // per 128-bit half: [s0, s1, s2, s3]
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    // 8 accumulators + 2 rows of a + 4 rows of b: 14 of the 16 ymm registers.
    const MB: usize = 2;
    const NB: usize = 4;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
        super::tiled::<MB, NB>(a, b, c, (m, k, n), accumulate, |c, i, j| {
            // SAFETY: the block (i, j) lies inside the checked shape; AVX2 and FMA are present.
            unsafe { block(a, b, c, i, j, k, n, accumulate) }
        });
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block(a: &[f32], b: &[f32], c: &mut [f32], i0: usize, j0: usize, k: usize, n: usize, accumulate: bool) {
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); NB]; MB];
        let full = k / 8 * 8;
        let mut p = 0;
        while p < full {
            let w: [__m256; NB] = std::array::from_fn(|j| _mm256_loadu_ps(bp.add((j0 + j) * k + p)));
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(ap.add((i0 + i) * k + p));
                for (j, lane) in row.iter_mut().enumerate() {
                    *lane = _mm256_fmadd_ps(x, w[j], *lane);
                }
            }
            p += 8;
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, lane) in row.iter().enumerate() {
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *lane);
                let mut dot = lanes.iter().sum::<f32>();
                for q in full..k {
                    dot += a[(i0 + i) * k + q] * b[(j0 + j) * k + q];
                }
                let out = &mut c[(i0 + i) * n + j0 + j];
                *out = if accumulate { *out + dot } else { dot };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[j * k + p] as f64).sum();
            }
        }
        c
    }

    #[test]
    fn skinny_products_match_f64_for_ragged_shapes_on_every_kernel() {
        let have = isa::supported();
        for name in [Isa::Avx512, Isa::Avx2].iter().filter(|k| !have.contains(k)) {
            println!("skipped the {name:?} kernel: this CPU lacks it");
        }
        for &kernel in have.iter().filter(|&&k| k != Isa::Scalar) {
            for (m, k, n) in
                [(16, 784, 512), (5, 33, 17), (1, 7, 3), (24, 64, 10), (3, 16, 4), (4, 1, 4), (130, 512, 10)]
            {
                let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
                let b: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
                let want = naive(&a, &b, m, k, n);
                let mut c = vec![0.5; m * n];
                assert!(matmul_nt_with(kernel, &a, &b, &mut c, (m, k, n), false));
                for (x, y) in c.iter().zip(&want) {
                    assert!((*x as f64 - y).abs() < 1e-3 * (1.0 + y.abs()), "{kernel:?} ({m},{k},{n}): {x} vs {y}");
                }
                assert!(matmul_nt_with(kernel, &a, &b, &mut c, (m, k, n), true));
                for (x, y) in c.iter().zip(&want) {
                    assert!(
                        (*x as f64 - 2.0 * y).abs() < 2e-3 * (1.0 + y.abs()),
                        "{kernel:?} ({m},{k},{n}) accumulated"
                    );
                }
            }
        }
    }
}
