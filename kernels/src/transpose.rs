//! Out-of-place transpose of a row-major (rows, cols) f32 matrix, in 8×8 register tiles.
//!
//! `gemm` runs c = a·bᵀ with b a (n, k) weight far below its a·b speed when k is a power of
//! two (measured, 128×512×512 on AVX-512: 53–80 GFLOP/s against 160–200 for the same product
//! with b stored (k, n)): it packs b by gathering down columns 2 KiB apart, which share
//! cache sets. Transposing b first with these tiles and running the a·b kernel gave the
//! same bits (b is packed into the same panels and summed alike) in less time: 630–800 µs
//! against 1,120–1,170 at 128×512×512, 2 threads.

/// out (cols, rows) = inᵀ for `input` (rows, cols), both row-major; on up to `threads`
/// threads, each writing a band of out's rows (a band of input's columns).
pub fn transpose(input: &[f32], out: &mut [f32], rows: usize, cols: usize, threads: usize) {
    use rayon::prelude::*;
    assert!(input.len() >= rows * cols && out.len() >= rows * cols, "transpose: short buffers");
    if rows == 0 || cols == 0 {
        return;
    }
    // Bands of whole tiles, at least 64 columns (below that the fork costs more).
    let band = cols.div_ceil(threads.max(1)).max(64).div_ceil(8) * 8;
    out[..rows * cols].par_chunks_mut(band * rows).enumerate().for_each(|(i, out_band)| {
        let c0 = i * band;
        transpose_band(input, out_band, (rows, cols), c0..(c0 + band).min(cols));
    });
}

/// Columns `cs` of `input` (rows, cols) into `out`, their rows of the transpose.
fn transpose_band(input: &[f32], out: &mut [f32], shape: (usize, usize), cs: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present; `transpose` checked the lengths and `out` holds the band.
        unsafe { avx::transpose_band(input, out, shape, cs) };
        return;
    }
    transpose_block(input, out, shape, cs.start, (0..shape.0, cs));
}

/// The (row, col) range `rs` × `cs` of `input` into `out`, the band of out's rows that
/// starts at row `c0`, one value at a time.
#[inline(always)]
fn transpose_block(
    input: &[f32],
    out: &mut [f32],
    (rows, cols): (usize, usize),
    c0: usize,
    (rs, cs): (std::ops::Range<usize>, std::ops::Range<usize>),
) {
    for r in rs {
        for c in cs.clone() {
            out[(c - c0) * rows + r] = input[r * cols + c];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// 8×8 tiles through registers (unpack, shuffle, then swap 128-bit halves); the ragged
    /// right and bottom edges one value at a time.
    #[target_feature(enable = "avx")]
    pub unsafe fn transpose_band(
        input: &[f32],
        out: &mut [f32],
        (rows, cols): (usize, usize),
        cs: std::ops::Range<usize>,
    ) {
        let r8 = rows / 8 * 8;
        let c8 = cs.start + (cs.len() / 8 * 8);
        assert!(input.len() >= rows * cols && out.len() >= cs.len() * rows, "transpose: short band");
        for r in (0..r8).step_by(8) {
            for c in (cs.start..c8).step_by(8) {
                // SAFETY: rows r..r+8 and cols c..c+8 lie inside input and the band of out.
                unsafe {
                    tile(input.as_ptr().add(r * cols + c), cols, out.as_mut_ptr().add((c - cs.start) * rows + r), rows)
                };
            }
        }
        super::transpose_block(input, out, (rows, cols), cs.start, (0..r8, c8..cs.end));
        super::transpose_block(input, out, (rows, cols), cs.start, (r8..rows, cs));
    }

    /// One 8×8 tile: `src` with row stride `src_stride` into `dst` with `dst_stride`.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn tile(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // t0 = r0,r1 lo; t1 = r0,r1 hi; t2 = r2,r3 lo; ... (lanes interleaved pairwise)
        let s: [__m256; 8] = std::array::from_fn(|i| {
            let base = i / 4 * 4; // 0 or 4
            let (a, b) = (t[base + (i % 4) / 2], t[base + (i % 4) / 2 + 2]);
            if i % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xEE>(a, b)
            }
        });
        // s0..s3: columns 0..3 (and 4..7 in the high half) of rows 0..3; s4..s7 of rows 4..7.
        for i in 0..4 {
            _mm256_storeu_ps(dst.add(i * dst_stride), _mm256_permute2f128_ps::<0x20>(s[i], s[i + 4]));
            _mm256_storeu_ps(dst.add((i + 4) * dst_stride), _mm256_permute2f128_ps::<0x31>(s[i], s[i + 4]));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_moves_every_value_for_ragged_shapes() {
        for (rows, cols) in [(1, 1), (8, 8), (16, 24), (13, 29), (512, 784), (7, 3), (14, 300)] {
            let input: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
            let mut out = vec![-1.0; rows * cols];
            super::transpose(&input, &mut out, rows, cols, 1 + rows % 3);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(out[c * rows + r], input[r * cols + c], "({rows}, {cols}) at ({r}, {c})");
                }
            }
        }
    }
}
