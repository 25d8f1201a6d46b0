//! bf16 GEMM on the CPU's matrix hardware (T25): AMX tiles (`tdpbf16ps`) or AVX512-BF16
//! (`vdpbf16ps`). The numerics are `MatmulPrecision::Bf16`'s everywhere: operands rounded to
//! bf16 (nearest even, as `half`) while they are packed, exact products summed in fp32, each
//! output rounded to bf16 when it is stored (added to the fp32 value there when accumulating).
//!
//! Both units read the same packing: op(a) as rows of bf16 pairs along k, and op(b) in panels
//! of 16 columns, each k-pair of a column one u32 (`[k/2][16]`, the "VNNI" order both
//! instructions expect); k is zero-padded to 32 (one 64-byte tile row), m and n to 16. The
//! output is computed in blocks of up to 2×2 tiles of 16×16; one thread does a block's whole
//! k-sum in a fixed order, so the result does not depend on the thread count.

use crate::isa::Bf16Unit;
use rayon::prelude::*;

/// Rows, and fp32 columns, of one output tile.
const TILE: usize = 16;
/// bf16 pairs along k in one 64-byte tile row.
const PAIRS_PER_ROW: usize = 16;

/// `x` rounded to bf16 (nearest even; NaN stays a quiet NaN): the bits `half` gives.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    // A select, not a branch, so packing loops vectorise.
    let nan_mask = 0u32.wrapping_sub(x.is_nan() as u32);
    rounded ^ ((rounded ^ quiet_nan) & nan_mask)
}

/// c (+)= op(a)·op(b) with bf16 operands on `unit`; op(a) is (m,k), op(b) (k,n), c (m,n)
/// row-major, `trans_*` meaning the operand is stored transposed. The caller checks lengths
/// and that the CPU has `unit` (one of [`crate::isa::bf16_units`]).
///
/// One parallel region per product: the longer side of the output is cut into one part per
/// thread, and each thread packs what its part reads (its share of that side's operand, all
/// of the other) before computing it. Three regions (pack a, pack b, compute) cost three
/// thread wake-ups per GEMM, which on the GPT's ~50 small GEMMs a step was more than the
/// packing the threads now repeat.
pub fn matmul(
    unit: Bf16Unit,
    (a, trans_a): (&[f32], bool),
    (b, trans_b): (&[f32], bool),
    c: &mut [f32],
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
    threads: usize,
) {
    assert!(crate::isa::bf16_units().contains(&unit), "{unit:?} is not on this CPU");
    let pairs = k.div_ceil(2 * PAIRS_PER_ROW) * PAIRS_PER_ROW;
    let blocks = Blocks { m, n, mp: m.next_multiple_of(TILE), np: n.next_multiple_of(TILE) };
    // Below ~1 MFLOP the fork/join costs more than it saves.
    let threads = if m * k * n >= (1 << 20) { threads.max(1) } else { 1 };
    let parts = blocks.parts(threads);
    let work = Work { unit, a: (a, trans_a), b: (b, trans_b), k, pairs, accumulate };
    let out = SharedOut { ptr: c.as_mut_ptr(), n };
    // SAFETY: the unit is on this CPU (asserted above); parts are disjoint blocks of `c`,
    // which holds m·n values (checked by the caller).
    let run = |part: &Part| unsafe { run_part(&work, &blocks, part, &out) };
    if parts.len() == 1 {
        run(&parts[0]);
    } else {
        parts.par_iter().for_each(run);
    }
}

thread_local! {
    /// (packed op(a), packed op(b)) of this thread's last GEMM, reused: fresh buffers would
    /// be zeroed (or page-faulted in) on every call, which costs as much as the products.
    static PACKING: std::cell::Cell<(Vec<u32>, Vec<u32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

fn grow(buf: &mut Vec<u32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

/// What every part of one product shares.
struct Work<'a> {
    unit: Bf16Unit,
    a: (&'a [f32], bool),
    b: (&'a [f32], bool),
    k: usize,
    pairs: usize,
    accumulate: bool,
}

/// The output's blocks of up to 32×32.
struct Blocks {
    m: usize,
    n: usize,
    mp: usize,
    np: usize,
}

/// A thread's share of the output: padded rows `rows` × padded columns `cols` (multiples of
/// a block's side, clipped to the padded output).
struct Part {
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl Blocks {
    const SIDE: usize = 2 * TILE;

    /// Up to `threads` parts, cut along the longer side in whole blocks.
    fn parts(&self, threads: usize) -> Vec<Part> {
        let cut = |len: usize| -> Vec<std::ops::Range<usize>> {
            let per = len.div_ceil(Self::SIDE).div_ceil(threads) * Self::SIDE;
            (0..len).step_by(per.max(Self::SIDE)).map(|s| s..(s + per).min(len)).collect()
        };
        if self.np >= self.mp {
            cut(self.np).into_iter().map(|cols| Part { rows: 0..self.mp, cols }).collect()
        } else {
            cut(self.mp).into_iter().map(|rows| Part { rows, cols: 0..self.np }).collect()
        }
    }

    /// Tiles (1 or 2) of the block starting at `start` on a side of padded length `len`.
    fn tiles(start: usize, len: usize) -> usize {
        ((len - start) / TILE).min(2)
    }
}

/// The output, written by several threads at disjoint blocks.
struct SharedOut {
    ptr: *mut f32,
    n: usize,
}
// SAFETY: threads write disjoint parts (see `matmul`).
unsafe impl Sync for SharedOut {}

/// A block's 2×2 tiles of fp32 before they are rounded into c: tile (r, c) at row r·16,
/// column c·16 of a 32×32 row-major square.
#[repr(C, align(64))]
struct Staging([f32; 4 * TILE * TILE]);

/// Packs what `part` reads into this thread's buffers and computes its blocks, column
/// blocks outer (consecutive blocks share b's panels).
unsafe fn run_part(work: &Work, blocks: &Blocks, part: &Part, out: &SharedOut) {
    let pairs = work.pairs;
    let (mut a_rows, mut b_panels) = PACKING.take();
    grow(&mut a_rows, part.rows.len() * pairs);
    grow(&mut b_panels, part.cols.len() * pairs);
    let (a, trans_a) = work.a;
    let (b, trans_b) = work.b;
    // SAFETY (both): the CPU has AVX-512 (every bf16 unit implies it).
    x86::pack_rows(a, trans_a, (blocks.m, work.k), pairs, &mut a_rows[..part.rows.len() * pairs], part.rows.start);
    let first_panel = part.cols.start / TILE;
    x86::pack_panels(b, trans_b, (work.k, blocks.n), pairs, &mut b_panels[..part.cols.len() * pairs], first_panel);
    let mut staging = Staging([0.0; 4 * TILE * TILE]);
    if work.unit == Bf16Unit::Amx {
        x86::amx::configure();
    }
    for col0 in part.cols.clone().step_by(Blocks::SIDE) {
        for row0 in part.rows.clone().step_by(Blocks::SIDE) {
            let (rt, ct) = (Blocks::tiles(row0, blocks.mp), Blocks::tiles(col0, blocks.np));
            let a_block = a_rows.as_ptr().add((row0 - part.rows.start) * pairs);
            let b_block = b_panels.as_ptr().add((col0 - part.cols.start) * pairs);
            let block_out = x86::BlockOut {
                c: out.ptr.add(row0 * out.n + col0),
                n: out.n,
                rows: (blocks.m - row0).min(rt * TILE),
                cols: (blocks.n - col0).min(ct * TILE),
                accumulate: work.accumulate,
            };
            match work.unit {
                Bf16Unit::Amx => {
                    x86::amx::block(a_block, b_block, pairs, (rt, ct), &mut staging);
                    x86::store(&staging, &block_out);
                }
                Bf16Unit::Avx512Bf16 => x86::dpbf16::block(a_block, b_block, pairs, (rt, ct), &block_out),
            }
        }
    }
    if work.unit == Bf16Unit::Amx {
        x86::amx::release();
    }
    PACKING.set((a_rows, b_panels));
}

mod x86 {
    use super::{Staging, TILE};

    use std::arch::x86_64::*;

    /// Each lane rounded to bf16 (the bits of [`bf16_bits`]) in the low half of a u32 lane.
    #[inline(always)]
    unsafe fn bf16_lanes(x: __m512) -> __m512i {
        let bits = _mm512_castps_si512(x);
        let high = _mm512_srli_epi32::<16>(bits);
        let bias = _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(high, _mm512_set1_epi32(0x40)))
    }

    /// Lanes `0..len` of `ptr` (zeros beyond).
    #[inline(always)]
    unsafe fn load(ptr: *const f32, len: usize) -> __m512 {
        if len >= TILE {
            _mm512_loadu_ps(ptr)
        } else {
            _mm512_maskz_loadu_ps(((1u32 << len) - 1) as u16, ptr)
        }
    }

    /// 32 consecutive values along k (`len` of them real) as 16 bf16 pairs.
    #[inline(always)]
    unsafe fn pairs_along(ptr: *const f32, len: usize) -> __m512i {
        let lo = _mm512_cvtepi32_epi16(bf16_lanes(load(ptr, len)));
        let hi = _mm512_cvtepi32_epi16(bf16_lanes(load(ptr.add(TILE), len.saturating_sub(TILE))));
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }

    /// 16 values of an even-k row and of the odd-k row after it as 16 bf16 pairs.
    #[inline(always)]
    unsafe fn pairs_across(even: __m512, odd: __m512) -> __m512i {
        _mm512_or_si512(bf16_lanes(even), _mm512_slli_epi32::<16>(bf16_lanes(odd)))
    }

    /// 16 vectors of 16 u32 transposed, stored to `out(i)` (a pointer per result row).
    #[inline(always)]
    unsafe fn store_transposed(rows: &[__m512i; TILE], out: impl Fn(usize) -> *mut u32) {
        #[repr(align(64))]
        struct Square([u32; TILE * TILE]);
        let mut square = Square([0; TILE * TILE]);
        for (i, row) in rows.iter().enumerate() {
            _mm512_store_si512(square.0.as_mut_ptr().add(i * TILE).cast(), *row);
        }
        let column = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(TILE as i32),
        );
        for j in 0..TILE {
            let v = _mm512_i32gather_epi32::<4>(column, square.0.as_ptr().add(j).cast());
            _mm512_storeu_si512(out(j).cast(), v);
        }
    }

    /// op(a) (`rows`×`cols`; `trans`: a stored (cols, rows)) as rows of bf16 pairs along k:
    /// row r, pair p at `out[(r − first)·pairs + p]` for the rows from `first` that `out`
    /// holds (a multiple of 16), zeros beyond the matrix.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn pack_rows(
        a: &[f32],
        trans: bool,
        (rows, cols): (usize, usize),
        pairs: usize,
        out: &mut [u32],
        first: usize,
    ) {
        let o = out.as_mut_ptr();
        let end = first + out.len() / pairs;
        out[(rows.clamp(first, end) - first) * pairs..].fill(0);
        if !trans {
            for r in first..rows.min(end) {
                for q in (0..pairs).step_by(TILE) {
                    let v = pairs_along(a.as_ptr().add(r * cols + 2 * q), cols.saturating_sub(2 * q));
                    _mm512_storeu_si512(o.add((r - first) * pairs + q).cast(), v);
                }
            }
            return;
        }
        // Element (r, kk) at a[kk·rows + r]: 16 pairs of 16 rows at a time, transposed.
        let row = |kk: usize, r0: usize| {
            if kk < cols {
                load(a.as_ptr().add(kk * rows + r0), rows - r0)
            } else {
                _mm512_setzero_ps()
            }
        };
        for r0 in (first..rows.min(end)).step_by(TILE) {
            for q in (0..pairs).step_by(TILE) {
                let by_pair: [__m512i; TILE] =
                    std::array::from_fn(|i| pairs_across(row(2 * (q + i), r0), row(2 * (q + i) + 1, r0)));
                store_transposed(&by_pair, |j| o.add((r0 - first + j) * pairs + q));
            }
        }
    }

    /// op(b) (`k`×`n`; `trans`: b stored (n, k)) in 16-column panels of bf16 pairs: panel j,
    /// pair p, column c at `out[((j − first)·pairs + p)·16 + c]` for the panels from `first`
    /// that `out` holds, zeros beyond the matrix.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn pack_panels(
        b: &[f32],
        trans: bool,
        (k, n): (usize, usize),
        pairs: usize,
        out: &mut [u32],
        first: usize,
    ) {
        let o = out.as_mut_ptr();
        let panels = first..first + out.len() / (pairs * TILE);
        let at = |j: usize, p: usize| o.add(((j - first) * pairs + p) * TILE);
        if trans {
            // Column `col` of op(b) is row `col` of b: 16 columns' pairs, transposed.
            for j in panels {
                for q in (0..pairs).step_by(TILE) {
                    let by_col: [__m512i; TILE] = std::array::from_fn(|c| {
                        let col = j * TILE + c;
                        if col < n {
                            pairs_along(b.as_ptr().add(col * k + 2 * q), k.saturating_sub(2 * q))
                        } else {
                            _mm512_setzero_si512()
                        }
                    });
                    store_transposed(&by_col, |i| at(j, q + i));
                }
            }
            return;
        }
        // Rows 2p and 2p+1 of b give pair p of 16 columns at once.
        let row = |kk: usize, col: usize| {
            if kk < k {
                load(b.as_ptr().add(kk * n + col), n - col)
            } else {
                _mm512_setzero_ps()
            }
        };
        for p in 0..pairs {
            for j in panels.clone() {
                let col = j * TILE;
                let v =
                    if col < n { pairs_across(row(2 * p, col), row(2 * p + 1, col)) } else { _mm512_setzero_si512() };
                _mm512_storeu_si512(at(j, p).cast(), v);
            }
        }
    }

    /// Where a block's results go: c at its first element, c's row stride `n`, the block's
    /// `rows`×`cols` inside the matrix, and whether to add to c.
    pub struct BlockOut {
        pub c: *mut f32,
        pub n: usize,
        pub rows: usize,
        pub cols: usize,
        pub accumulate: bool,
    }

    impl BlockOut {
        /// Columns `c0..c0+16` of row `r`, rounded to bf16, into c (masked at the edge).
        #[inline(always)]
        unsafe fn put(&self, r: usize, c0: usize, x: __m512) {
            let mask = if self.cols - c0 >= TILE { u16::MAX } else { ((1u32 << (self.cols - c0)) - 1) as u16 };
            let mut v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bf16_lanes(x)));
            let to = self.c.add(r * self.n + c0);
            if self.accumulate {
                v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, to), v);
            }
            _mm512_mask_storeu_ps(to, mask, v);
        }
    }

    /// c (+)= the block's staged fp32, rounded to bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn store(staging: &Staging, out: &BlockOut) {
        for r in 0..out.rows {
            for c0 in (0..out.cols).step_by(TILE) {
                out.put(r, c0, _mm512_load_ps(staging.0.as_ptr().add(r * 2 * TILE + c0)));
            }
        }
    }

    /// AVX512-BF16: eight rows at a time, 16 fp32 accumulators (8 rows × 2 panels), rounded
    /// and stored straight from the registers.
    pub mod dpbf16 {
        use super::super::TILE;
        use super::BlockOut;
        use std::arch::x86_64::*;

        pub unsafe fn block(a: *const u32, b: *const u32, pairs: usize, (rt, ct): (usize, usize), out: &BlockOut) {
            match ct {
                1 => rows::<1>(a, b, pairs, rt * TILE, out),
                _ => rows::<2>(a, b, pairs, rt * TILE, out),
            }
        }

        /// 32 bf16 values packed in an integer vector, as the type `vdpbf16ps` takes.
        #[inline(always)]
        fn as_bf16(v: __m512i) -> __m512bh {
            // SAFETY: both are 64 bytes of plain bits.
            unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
        }

        #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx2,fma")]
        unsafe fn rows<const CT: usize>(a: *const u32, b: *const u32, pairs: usize, rows: usize, out: &BlockOut) {
            for group in 0..rows / 8 {
                let first = group * 8;
                if first >= out.rows {
                    return;
                }
                let a = a.add(first * pairs);
                let mut acc = [[_mm512_setzero_ps(); CT]; 8];
                for p in 0..pairs {
                    let mut panel = [_mm512_setzero_si512(); CT];
                    for (j, v) in panel.iter_mut().enumerate() {
                        *v = _mm512_loadu_si512(b.add((j * pairs + p) * TILE).cast());
                    }
                    for (r, acc_row) in acc.iter_mut().enumerate() {
                        let pair = _mm512_set1_epi32(*a.add(r * pairs + p) as i32);
                        for (sum, &panel_j) in acc_row.iter_mut().zip(&panel) {
                            *sum = _mm512_dpbf16_ps(*sum, as_bf16(pair), as_bf16(panel_j));
                        }
                    }
                }
                for (r, acc_row) in acc.iter().enumerate().take(out.rows - first) {
                    for (j, sum) in acc_row.iter().enumerate().filter(|(j, _)| j * TILE < out.cols) {
                        out.put(first + r, j * TILE, *sum);
                    }
                }
            }
        }
    }

    /// AMX: accumulator tiles 0–3 (block tile (r, c) in tile 2r + c), a's tiles 4–5, b's 6–7.
    pub mod amx {
        use super::super::{Staging, PAIRS_PER_ROW, TILE};
        use std::arch::asm;

        /// Palette 1, every tile 16 rows of 64 bytes (the layout `ldtilecfg` reads).
        #[repr(C, align(64))]
        struct TileConfig {
            palette: u8,
            start_row: u8,
            reserved: [u8; 14],
            bytes_per_row: [u16; 16],
            rows: [u8; 16],
        }

        /// Sets this thread's tile shapes (tile state is per thread).
        pub unsafe fn configure() {
            let mut config =
                TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
            config.bytes_per_row[..8].fill(64);
            config.rows[..8].fill(16);
            asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly, preserves_flags));
        }

        /// Returns the tile state to its initial one (cheaper context switches).
        pub unsafe fn release() {
            asm!("tilerelease", options(nostack, nomem, preserves_flags));
        }

        macro_rules! tile_load {
            ($t:literal, $ptr:expr, $stride:expr) => {
                asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $ptr, s = in(reg) $stride,
                    options(nostack, readonly, preserves_flags))
            };
        }
        macro_rules! tile_store {
            ($t:literal, $ptr:expr, $stride:expr) => {
                asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $ptr, s = in(reg) $stride,
                    options(nostack, preserves_flags))
            };
        }
        macro_rules! tile_dot {
            ($c:literal, $a:literal, $b:literal) => {
                asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem, preserves_flags))
            };
        }

        pub unsafe fn block(a: *const u32, b: *const u32, pairs: usize, (rt, ct): (usize, usize), out: &mut Staging) {
            match (rt, ct) {
                (1, 1) => tiles::<false, false>(a, b, pairs, out),
                (1, _) => tiles::<false, true>(a, b, pairs, out),
                (_, 1) => tiles::<true, false>(a, b, pairs, out),
                _ => tiles::<true, true>(a, b, pairs, out),
            }
        }

        /// One block: 1–2 tile rows (`TWO_ROWS`) × 1–2 tile columns (`TWO_COLS`).
        #[inline(always)]
        unsafe fn tiles<const TWO_ROWS: bool, const TWO_COLS: bool>(
            a: *const u32,
            b: *const u32,
            pairs: usize,
            out: &mut Staging,
        ) {
            let (a_stride, b_stride) = (pairs * 4, TILE * 4);
            let (a_second, b_second) = (a.add(TILE * pairs), b.add(TILE * pairs));
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            for step in 0..pairs / PAIRS_PER_ROW {
                let (a_off, b_off) = (step * PAIRS_PER_ROW, step * PAIRS_PER_ROW * TILE);
                tile_load!("4", a.add(a_off), a_stride);
                tile_load!("6", b.add(b_off), b_stride);
                tile_dot!("0", "4", "6");
                if TWO_COLS {
                    tile_load!("7", b_second.add(b_off), b_stride);
                    tile_dot!("1", "4", "7");
                }
                if TWO_ROWS {
                    tile_load!("5", a_second.add(a_off), a_stride);
                    tile_dot!("2", "5", "6");
                    if TWO_COLS {
                        tile_dot!("3", "5", "7");
                    }
                }
            }
            let (o, stride) = (out.0.as_mut_ptr(), 2 * TILE * 4);
            tile_store!("0", o, stride);
            tile_store!("1", o.add(TILE), stride);
            tile_store!("2", o.add(TILE * 2 * TILE), stride);
            tile_store!("3", o.add(TILE * 2 * TILE + TILE), stride);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::bf16_units;

    fn round_to_bf16(x: f32) -> f32 {
        f32::from_bits(bf16_bits(x) << 16)
    }

    /// A small deterministic bit source (xorshift64).
    fn bits(seed: u64) -> impl FnMut() -> u32 {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u32
        }
    }

    #[test]
    fn bf16_bits_are_halfs_rounding() {
        let specials = [0.0f32, -0.0, 1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, f32::MIN_POSITIVE];
        let denormals = [1e-40f32, -3e-39];
        let ties = [f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000), f32::from_bits(0x3f80_8001)];
        let mut rng = bits(7);
        let random = (0..10_000).map(|_| f32::from_bits(rng()));
        for x in specials.into_iter().chain(denormals).chain(ties).chain(random) {
            let want = half::bf16::from_f32(x).to_bits() as u32;
            assert_eq!(bf16_bits(x), want, "{x:e} ({:#x})", x.to_bits());
        }
    }

    /// The emulation's numbers: operands rounded, f64 sums, the sum rounded to bf16.
    fn reference(a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize), ta: bool, tb: bool) -> Vec<f32> {
        let r = |x: f32| round_to_bf16(x) as f64;
        let at = |i: usize, kk: usize| if ta { a[kk * m + i] } else { a[i * k + kk] };
        let bt = |kk: usize, j: usize| if tb { b[j * k + kk] } else { b[kk * n + j] };
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|kk| r(at(i, kk)) * r(bt(kk, j))).sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn every_unit_matches_rounded_operands_for_every_shape_and_transpose() {
        // The last two are past the parallel threshold: cut by rows, then by columns.
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (16, 32, 16),
            (33, 65, 17),
            (40, 100, 70),
            (128, 96, 10),
            (200, 90, 70),
            (70, 90, 200),
        ];
        for &unit in bf16_units() {
            for &(m, k, n) in &shapes {
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    let mut rng = bits((m * k * n) as u64);
                    let mut sample =
                        |len: usize| -> Vec<f32> { (0..len).map(|_| (rng() % 2001) as f32 / 1000.0 - 1.0).collect() };
                    let (a, b) = (sample(m * k), sample(k * n));
                    let want = reference(&a, &b, (m, k, n), ta, tb);
                    for threads in [1, 2] {
                        let mut c = vec![0.5; m * n];
                        matmul(unit, (&a, ta), (&b, tb), &mut c, (m, k, n), true, threads);
                        for (i, (&got, &w)) in c.iter().zip(&want).enumerate() {
                            // fp32 sums in another order than f64: within one bf16 step of the sum.
                            let tol = 1e-5 * k as f32 + (w.abs() + 0.5) / 128.0;
                            assert!(
                                (got - 0.5 - w).abs() <= tol,
                                "{unit:?} {m}x{k}x{n} ta={ta} tb={tb} [{i}]: {got} vs 0.5+{w}"
                            );
                        }
                    }
                }
            }
        }
        for unit in [Bf16Unit::Amx, Bf16Unit::Avx512Bf16].iter().filter(|u| !bf16_units().contains(u)) {
            println!("skipping the {} bf16 GEMM: this CPU lacks it", unit.name());
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, k, n) = (300, 256, 200);
        let mut rng = bits(3);
        let a: Vec<f32> = (0..m * k).map(|_| (rng() % 1000) as f32 / 500.0 - 1.0).collect();
        let b: Vec<f32> = (0..k * n).map(|_| (rng() % 1000) as f32 / 500.0 - 1.0).collect();
        for &unit in bf16_units() {
            let run = |threads| {
                let mut c = vec![0.0; m * n];
                matmul(unit, (&a, false), (&b, true), &mut c, (m, k, n), false, threads);
                c
            };
            let one = run(1);
            assert!(one.iter().all(|&x| x == round_to_bf16(x)), "outputs are bf16 values");
            assert_eq!(one, run(2), "{unit:?}");
            assert_eq!(one, run(3), "{unit:?}");
        }
    }
}
