//! The CPU backend: GEMM through the `gemm` crate, everything else as plain loops.
//! This is the reference implementation; keep it obvious.

use crate::isa::Bf16Unit;
use crate::{
    attention, check_row_range, need_len, norm, recurrent, rotary, window, Activation, AttentionDims, Backend, Gemm,
    KernelError, MatmulPrecision, Result, Rotary, UpdateRule, Window, IGNORE_TARGET,
};
use gemm::Parallelism;
use rayon::prelude::*;
use std::ops::Range;

/// Element-wise work is split into chunks of this many elements; buffers smaller than one
/// chunk run on the calling thread. Fixed chunks keep reductions deterministic: partial
/// sums are combined in chunk order whatever the thread count.
const CHUNK: usize = 1 << 15;
/// Rows per parallel task of LayerNorm.
const LN_ROWS: usize = 64;

thread_local! {
    /// The transposed right operand of an a·bᵀ product, kept per thread between calls: a
    /// fresh vector of a weight's size would be a fresh mmap, page-faulted in every time.
    static TRANSPOSED_B: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// CPU backend. `threads` bounds the GEMM parallelism (rayon's global pool is sized by the
/// binary from `--threads`).
#[derive(Debug, Clone)]
pub struct CpuBackend {
    pub threads: usize,
    /// Format of matmul operands and outputs (T25).
    pub precision: MatmulPrecision,
    /// Where bf16 products run: a matrix unit, or (`None`) the rounded-operand emulation
    /// that is the unit's reference (jobs never get it: bf16 without a unit computes fp32).
    pub bf16_unit: Option<Bf16Unit>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new(rayon::current_num_threads())
    }
}

impl CpuBackend {
    pub fn new(threads: usize) -> Self {
        Self { threads: threads.max(1), precision: MatmulPrecision::Fp32, bf16_unit: crate::isa::bf16_unit() }
    }

    fn parallelism(&self, m: usize, k: usize, n: usize) -> Parallelism {
        // Below 2 Mi multiply-adds the fork/join costs more than it saves (measured on the
        // MLP's 10-class layer, 128×512×10: dW 42 → 13 µs, dx 28 → 15 µs run serially).
        if self.threads <= 1 || m * k * n < (1 << 21) {
            Parallelism::None
        } else {
            Parallelism::Rayon(self.threads)
        }
    }
}

/// ds = p ⊙ (dp − Σ_j dp_j p_j) for each row of (rows, cols).
pub fn softmax_backward_rows(p: &[f32], dp: &[f32], ds: &mut [f32], rows: usize, cols: usize) {
    for r in 0..rows {
        let (pr, dpr) = (&p[r * cols..(r + 1) * cols], &dp[r * cols..(r + 1) * cols]);
        let dot: f64 = pr.iter().zip(dpr).map(|(&a, &b)| a as f64 * b as f64).sum();
        for ((d, &a), &b) in ds[r * cols..(r + 1) * cols].iter_mut().zip(pr).zip(dpr) {
            *d = a * (b - dot as f32);
        }
    }
}

use crate::fast_math::{sigmoid, tanh};
use crate::skinny;

use crate::vector::{self, gelu, gelu_derivative};

#[inline]
fn act_forward(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Identity => x,
        Activation::Sigmoid => sigmoid(x),
        Activation::Tanh => tanh(x),
        Activation::Relu => x.max(0.0),
        Activation::LeakyRelu { slope } => {
            if x > 0.0 {
                x
            } else {
                slope * x
            }
        }
        Activation::Swish { beta } => x * sigmoid(beta * x),
        Activation::Gelu => gelu(x),
    }
}

/// (d act/dx, d act/d beta) at x.
#[inline]
fn act_derivative(act: Activation, x: f32) -> (f32, f32) {
    match act {
        Activation::Identity => (1.0, 0.0),
        Activation::Sigmoid => {
            let s = sigmoid(x);
            (s * (1.0 - s), 0.0)
        }
        Activation::Tanh => {
            let t = tanh(x);
            (1.0 - t * t, 0.0)
        }
        Activation::Relu => (if x > 0.0 { 1.0 } else { 0.0 }, 0.0),
        Activation::LeakyRelu { slope } => (if x > 0.0 { 1.0 } else { slope }, 0.0),
        Activation::Swish { beta } => {
            let s = sigmoid(beta * x);
            let ds = s * (1.0 - s);
            (s + beta * x * ds, x * x * ds)
        }
        Activation::Gelu => (gelu_derivative(x), 0.0),
    }
}

/// Runs a row-wise norm's forward over blocks of [`LN_ROWS`] rows in parallel. Rows are
/// independent: any split gives the same bits.
fn row_norm_forward(
    x: &[f32],
    rows: usize,
    cols: usize,
    y: &mut Vec<f32>,
    xhat: &mut Vec<f32>,
    rstd: &mut Vec<f32>,
    kernel: impl Fn(&[f32], &mut [f32], &mut [f32], &mut [f32]) + Sync,
) {
    y.resize(rows * cols, 0.0);
    xhat.resize(rows * cols, 0.0);
    rstd.resize(rows, 0.0);
    if cols == 0 {
        return;
    }
    let block = LN_ROWS * cols;
    y[..rows * cols]
        .par_chunks_mut(block)
        .zip(xhat[..rows * cols].par_chunks_mut(block))
        .zip(x[..rows * cols].par_chunks(block))
        .zip(rstd[..rows].par_chunks_mut(LN_ROWS))
        .for_each(|(((y, xhat), x), rstd)| kernel(x, y, xhat, rstd));
}

/// Runs a row-wise norm's backward over blocks of [`LN_ROWS`] rows in parallel; returns the
/// `vectors` parameter-gradient sums (each `cols` long, concatenated). Each block sums into
/// its own partial and the partials are added in block order, so the bits do not depend
/// on the thread count.
#[allow(clippy::too_many_arguments)]
fn row_norm_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut Vec<f32>,
    vectors: usize,
    kernel: impl Fn(&[f32], &[f32], &[f32], &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    dx.resize(rows * cols, 0.0);
    let mut total = vec![0.0f32; vectors * cols];
    if cols == 0 {
        return total;
    }
    let block = LN_ROWS * cols;
    let partials: Vec<Vec<f32>> = dx[..rows * cols]
        .par_chunks_mut(block)
        .zip(dy[..rows * cols].par_chunks(block))
        .zip(xhat[..rows * cols].par_chunks(block))
        .zip(rstd[..rows].par_chunks(LN_ROWS))
        .map(|(((dx, dy), xhat), rstd)| {
            let mut sums = vec![0.0f32; vectors * cols];
            kernel(dy, xhat, rstd, dx, &mut sums);
            sums
        })
        .collect();
    for sums in partials {
        total.iter_mut().zip(&sums).for_each(|(t, s)| *t += s);
    }
    total
}

impl CpuBackend {
    /// `Backend::matmul` on slices (a piece of a product writes into part of `c`).
    fn matmul_slices(&self, a: &[f32], b: &[f32], c: &mut [f32], g: Gemm) -> Result<()> {
        let Gemm { m, k, n, trans_a, trans_b, accumulate, precision } = g;
        need_len("matmul", "a", a.len(), m * k)?;
        need_len("matmul", "b", b.len(), k * n)?;
        need_len("matmul", "c", c.len(), m * n)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            if !accumulate {
                c[..m * n].fill(0.0);
            }
            return Ok(());
        }
        let precision = precision.unwrap_or(self.precision);
        #[cfg(target_arch = "x86_64")]
        if let (MatmulPrecision::Bf16, Some(unit)) = (precision, self.bf16_unit) {
            let (a, b) = ((&a[..m * k], trans_a), (&b[..k * n], trans_b));
            crate::bf16_gemm::matmul(unit, a, b, &mut c[..m * n], (m, k, n), accumulate, self.threads);
            return Ok(());
        }
        if precision != MatmulPrecision::Fp32 {
            return self.matmul_rounded(a, b, c, g, precision);
        }
        if trans_b && !trans_a {
            return self.matmul_nt(a, b, c, g);
        }
        self.gemm_fp32(a, b, c, g);
        Ok(())
    }

    /// Mixed precision (T25) as tensor cores do it: operands rounded to bf16/fp16, exact
    /// products (a half mantissa squared fits in fp32's), fp32 sums, the result rounded to
    /// the half format (activations and input gradients live in it; an fp16 overflow becomes
    /// inf). An accumulating matmul (weight gradients) adds its rounded result to the fp32
    /// master gradient.
    fn matmul_rounded(&self, a: &[f32], b: &[f32], c: &mut [f32], g: Gemm, p: MatmulPrecision) -> Result<()> {
        let Gemm { m, k, n, accumulate, .. } = g;
        let a_half: Vec<f32> = a[..m * k].iter().map(|&x| p.round(x)).collect();
        let b_half: Vec<f32> = b[..k * n].iter().map(|&x| p.round(x)).collect();
        let mut product = vec![0.0f32; m * n];
        let fp32 = Gemm { accumulate: false, ..g }.in_precision(MatmulPrecision::Fp32);
        self.matmul_slices(&a_half, &b_half, &mut product, fp32)?;
        for (out, v) in c[..m * n].iter_mut().zip(product) {
            *out = if accumulate { *out + p.round(v) } else { p.round(v) };
        }
        Ok(())
    }

    /// fp32 c (+)= a·bᵀ, b a (n, k) weight.
    fn matmul_nt(&self, a: &[f32], b: &[f32], c: &mut [f32], g: Gemm) -> Result<()> {
        let Gemm { m, k, n, accumulate, .. } = g;
        // A few rows against the weight, or any rows against a weight of a few rows (an
        // output layer of ten classes: 61–65 → 22–30 µs at 128×512×10): dot products that
        // stream the weight once instead of `gemm` repacking it (see `skinny`).
        let skinny_shape = m <= skinny::MAX_ROWS || n <= skinny::MAX_COLS;
        if skinny_shape && skinny::matmul_nt(a, b, c, m, k, n, accumulate) {
            return Ok(());
        }
        // a·(bᵀ stored): the same bits, without `gemm`'s slow gather of b's columns (see
        // `transpose`; `bench mlp` 12–14% faster, `bench gpt` unchanged). Measured on
        // AVX-512 only, so other ISAs keep the direct call.
        if crate::isa::current() != crate::isa::Isa::Avx512 {
            self.gemm_fp32(a, b, c, g);
            return Ok(());
        }
        let mut b_t = TRANSPOSED_B.take();
        if b_t.len() < k * n {
            b_t.resize(k * n, 0.0);
        }
        crate::transpose::transpose(&b[..n * k], &mut b_t, n, k, self.threads);
        let outcome = self.matmul_slices(a, &b_t[..k * n], c, Gemm { trans_b: false, ..g });
        TRANSPOSED_B.set(b_t);
        outcome
    }

    /// fp32 `gemm` (c (+)= op(a)·op(b)).
    fn gemm_fp32(&self, a: &[f32], b: &[f32], c: &mut [f32], g: Gemm) {
        let Gemm { m, k, n, trans_a, trans_b, accumulate, .. } = g;
        // Strides of op(a) (m,k): row-major (k,1); stored transposed (k,m) -> (1,m).
        let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
        assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm_fp32: short buffers");
        // SAFETY: the lengths asserted above bound every index gemm touches by the strides
        // given.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                a.as_ptr(),
                a_cs,
                a_rs,
                b.as_ptr(),
                b_cs,
                b_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                self.parallelism(m, k, n),
            );
        }
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn check(&self) -> Result<()> {
        Ok(()) // every op has finished when it returns
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn upload_vec(&self, data: Vec<f32>) -> Result<Vec<f32>> {
        Ok(data)
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn upload_into(&self, data: &[f32], buf: &mut Vec<f32>, offset: usize) -> Result<()> {
        need_len("upload_into", "the buffer", buf.len(), offset + data.len())?;
        buf[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn download_into(&self, buf: &Vec<f32>, offset: usize, out: &mut [f32]) -> Result<()> {
        need_len("download_into", "the buffer", buf.len(), offset + out.len())?;
        out.copy_from_slice(&buf[offset..offset + out.len()]);
        Ok(())
    }
    fn duplicate(&self, src: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(src.clone())
    }
    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>) -> Result<()> {
        dst.copy_from_slice(src);
        Ok(())
    }
    fn fill(&self, buf: &mut Vec<f32>, value: f32) -> Result<()> {
        buf.fill(value);
        Ok(())
    }
    fn copy_range(&self, src: &Vec<f32>, src_off: usize, dst: &mut Vec<f32>, dst_off: usize, len: usize) -> Result<()> {
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
        Ok(())
    }

    fn matmul(&self, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>, g: Gemm) -> Result<()> {
        self.matmul_slices(a, b, c, g)
    }
    fn matmul_rows(&self, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>, g: Gemm, rows: Range<usize>) -> Result<()> {
        let Gemm { m, k, n, trans_a, .. } = g;
        check_row_range(rows.clone(), m)?;
        need_len("matmul_rows", "a", a.len(), m * k)?;
        need_len("matmul_rows", "c", c.len(), m * n)?;
        let piece = Gemm { m: rows.len(), ..g };
        let c_rows = &mut c[rows.start * n..rows.end * n];
        if trans_a {
            // op(a)'s rows are columns of the stored (k, m) a: gathered into a (k, rows) block.
            let a_rows: Vec<f32> = a[..m * k].chunks_exact(m).flat_map(|row| &row[rows.clone()]).copied().collect();
            self.matmul_slices(&a_rows, b, c_rows, piece)
        } else {
            self.matmul_slices(&a[rows.start * k..rows.end * k], b, c_rows, piece)
        }
    }
    fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<()> {
        self.precision = precision;
        if precision == MatmulPrecision::Bf16 {
            match self.bf16_unit {
                Some(unit) => tracing::info!(unit = unit.name(), "bf16 GEMMs on the CPU's matrix unit"),
                None => {
                    // The emulation would be slower than fp32 and no more accurate.
                    tracing::warn!(
                        "bf16 asked for, but no bf16 unit is in use (the CPU lacks AMX and AVX512-BF16, or \
                         LOCKSTEP_CPU_KERNEL chose a path without one): computing in fp32"
                    );
                    self.precision = MatmulPrecision::Fp32;
                }
            }
        }
        Ok(())
    }

    fn repeat_rows(&self, row: &Vec<f32>, rows: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(rows * row.len());
        (0..rows).for_each(|_| out.extend_from_slice(row));
        Ok(out)
    }

    fn add_row_vector(&self, x: &mut Vec<f32>, bias: &Vec<f32>, rows: usize, cols: usize) -> Result<()> {
        for row in x[..rows * cols].chunks_exact_mut(cols) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
        Ok(())
    }

    fn sum_rows(&self, x: &Vec<f32>, out: &mut Vec<f32>, rows: usize, cols: usize, accumulate: bool) -> Result<()> {
        if !accumulate {
            out[..cols].fill(0.0);
        }
        for row in x[..rows * cols].chunks_exact(cols) {
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        Ok(())
    }

    fn activation_forward(&self, act: Activation, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        // GELU gets its own kernel, vectorized per ISA (a `match` per element is not).
        let chunks = y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK));
        match act {
            Activation::Gelu => chunks.for_each(|(y, x)| vector::gelu_forward(x, y)),
            Activation::Swish { beta } => chunks.for_each(|(y, x)| vector::swish_forward(x, y, beta)),
            other => chunks.for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = act_forward(other, x);
                }
            }),
        }
        Ok(())
    }

    fn activation_backward(
        &self,
        act: Activation,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<f32> {
        if act == Activation::Gelu {
            // Its own vectorizable loop, as in forward; GELU has no dbeta.
            dx.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK))
                .for_each(|((dx, x), dy)| vector::gelu_backward(x, dy, dx, accumulate));
            return Ok(0.0);
        }
        // Partial dbeta sums per chunk, added in chunk order: deterministic.
        if let Activation::Swish { beta } = act {
            let partial: Vec<f64> = dx
                .par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK))
                .map(|((dx, x), dy)| vector::swish_backward(x, dy, dx, beta, accumulate))
                .collect();
            return Ok(partial.iter().sum::<f64>() as f32);
        }
        let partial: Vec<f64> = dx
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .zip(dy.par_chunks(CHUNK))
            .map(|((dx, x), dy)| {
                let mut dbeta = 0.0f64;
                for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                    let (d, db) = act_derivative(act, x);
                    if accumulate {
                        *dx += d * dy;
                    } else {
                        *dx = d * dy;
                    }
                    dbeta += (db * dy) as f64;
                }
                dbeta
            })
            .collect();
        Ok(partial.iter().sum::<f64>() as f32)
    }

    fn axpy(&self, alpha: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        for (y, x) in y.iter_mut().zip(x) {
            *y += alpha * x;
        }
        Ok(())
    }
    fn scale(&self, x: &mut Vec<f32>, alpha: f32) -> Result<()> {
        x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= alpha));
        Ok(())
    }
    fn mul(&self, a: &Vec<f32>, b: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
            *o = a * b;
        }
        Ok(())
    }
    fn mul_acc(&self, a: &Vec<f32>, b: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
            *o += a * b;
        }
        Ok(())
    }
    fn sum_squares(&self, x: &Vec<f32>) -> Result<f64> {
        let partial: Vec<f64> = x.par_chunks(CHUNK).map(crate::vector::sum_squares).collect();
        Ok(partial.iter().sum())
    }
    fn add_sign(&self, alpha: f32, src: &Vec<f32>, dst: &mut Vec<f32>) -> Result<()> {
        for (d, &s) in dst.iter_mut().zip(src) {
            if s > 0.0 {
                *d += alpha;
            } else if s < 0.0 {
                *d -= alpha;
            }
        }
        Ok(())
    }

    fn softmax_cross_entropy(
        &self,
        logits: &Vec<f32>,
        targets: &[u32],
        class_weights: Option<&[f32]>,
        dlogits: &mut Vec<f32>,
        rows: usize,
        classes: usize,
        grad_scale: f32,
    ) -> Result<(f64, usize)> {
        let mut loss = 0.0f64;
        let mut correct = 0;
        for (i, (row, drow)) in logits[..rows * classes]
            .chunks_exact(classes)
            .zip(dlogits[..rows * classes].chunks_exact_mut(classes))
            .enumerate()
        {
            if targets[i] == IGNORE_TARGET {
                drow.fill(0.0); // padding: no loss, no gradient
                continue;
            }
            let t = targets[i] as usize;
            let w = class_weights.map_or(1.0, |cw| cw[t]);
            let (argmax, max) =
                row.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |(bi, bv), (j, &v)| if v > bv { (j, v) } else { (bi, bv) });
            let mut sum = 0.0f32;
            for (d, &v) in drow.iter_mut().zip(row) {
                *d = crate::fast_math::exp(v - max);
                sum += *d;
            }
            let inv = 1.0 / sum;
            // -log p_t = log(sum) - (z_t - max), no division before the log.
            loss += (w * (sum.ln() - (row[t] - max))) as f64;
            for d in drow.iter_mut() {
                *d *= inv * w * grad_scale;
            }
            drow[t] -= w * grad_scale;
            if argmax == t {
                correct += 1;
            }
        }
        Ok((loss, correct))
    }

    fn softmax(&self, logits: &Vec<f32>, probs: &mut Vec<f32>, rows: usize, classes: usize) -> Result<()> {
        for (row, prow) in
            logits[..rows * classes].chunks_exact(classes).zip(probs[..rows * classes].chunks_exact_mut(classes))
        {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for (p, &v) in prow.iter_mut().zip(row) {
                *p = crate::fast_math::exp(v - max);
                sum += *p;
            }
            for p in prow.iter_mut() {
                *p /= sum;
            }
        }
        Ok(())
    }

    // Sliding-window ops run one image per task: images never share output elements, so
    // the result is the same whatever the thread count.
    fn im2col(&self, x: &Vec<f32>, win: &Window, n: usize, c0: usize, cg: usize, cols: &mut Vec<f32>) -> Result<()> {
        let per_image_out = win.out_h() * win.out_w() * win.kh * win.kw * cg;
        let per_image_in = win.h * win.w * win.c;
        cols.resize(n * per_image_out, 0.0);
        cols.par_chunks_mut(per_image_out.max(1))
            .zip(x.par_chunks(per_image_in.max(1)))
            .for_each(|(out, img)| window::im2col(img, win, 1, c0, cg, out));
        Ok(())
    }
    fn col2im(&self, dcols: &Vec<f32>, win: &Window, n: usize, c0: usize, cg: usize, dx: &mut Vec<f32>) -> Result<()> {
        let per_image_cols = win.out_h() * win.out_w() * win.kh * win.kw * cg;
        let per_image_in = win.h * win.w * win.c;
        debug_assert_eq!(dx.len(), n * per_image_in, "col2im: dx does not hold n images");
        dx.par_chunks_mut(per_image_in.max(1))
            .zip(dcols.par_chunks(per_image_cols.max(1)))
            .for_each(|(img, cols)| window::col2im(cols, win, 1, c0, cg, img));
        Ok(())
    }
    fn max_pool_forward(
        &self,
        x: &Vec<f32>,
        win: &Window,
        n: usize,
        y: &mut Vec<f32>,
        argmax: &mut Vec<f32>,
    ) -> Result<()> {
        let per_out = win.out_h() * win.out_w() * win.c;
        let per_in = win.h * win.w * win.c;
        let mut idx = vec![0u32; n * per_out];
        y.resize(n * per_out, 0.0);
        y.par_chunks_mut(per_out.max(1))
            .zip(idx.par_chunks_mut(per_out.max(1)))
            .zip(x.par_chunks(per_in.max(1)))
            .enumerate()
            .for_each(|(i, ((y, idx), img))| {
                window::max_pool_forward(img, win, 1, y, idx);
                // Indices are into the whole batch.
                idx.iter_mut().for_each(|j| *j += (i * per_in) as u32);
            });
        *argmax = idx.into_iter().map(f32::from_bits).collect();
        Ok(())
    }
    fn max_pool_backward(&self, dy: &Vec<f32>, argmax: &Vec<f32>, dx: &mut Vec<f32>) -> Result<()> {
        for (&g, &i) in dy.iter().zip(argmax) {
            let i = i.to_bits();
            if i != u32::MAX {
                dx[i as usize] += g;
            }
        }
        Ok(())
    }
    fn avg_pool_forward(&self, x: &Vec<f32>, win: &Window, n: usize, y: &mut Vec<f32>) -> Result<()> {
        y.resize(n * win.out_h() * win.out_w() * win.c, 0.0);
        window::avg_pool_forward(x, win, n, y);
        Ok(())
    }
    fn avg_pool_backward(&self, dy: &Vec<f32>, win: &Window, n: usize, dx: &mut Vec<f32>) -> Result<()> {
        window::avg_pool_backward(dy, win, n, dx);
        Ok(())
    }
    fn copy_columns(
        &self,
        src: &Vec<f32>,
        src_w: usize,
        s0: usize,
        dst: &mut Vec<f32>,
        dst_w: usize,
        d0: usize,
        k: usize,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        window::copy_columns(src, src_w, s0, dst, dst_w, d0, k, rows, accumulate);
        Ok(())
    }

    fn layer_norm_forward(
        &self,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
        y: &mut Vec<f32>,
        xhat: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        need_len("layer_norm_forward", "x", x.len(), rows * cols)?;
        row_norm_forward(x, rows, cols, y, xhat, rstd, |x, y, h, r| {
            norm::layer_norm_forward(x, gamma, beta, cols, eps, y, h, r)
        });
        Ok(())
    }
    fn layer_norm_backward(
        &self,
        dy: &Vec<f32>,
        xhat: &Vec<f32>,
        rstd: &Vec<f32>,
        gamma: &Vec<f32>,
        rows: usize,
        cols: usize,
        dx: &mut Vec<f32>,
        dgamma: &mut Vec<f32>,
        dbeta: &mut Vec<f32>,
    ) -> Result<()> {
        need_len("layer_norm_backward", "dy", dy.len(), rows * cols)?;
        need_len("layer_norm_backward", "xhat", xhat.len(), rows * cols)?;
        let sums = row_norm_backward(dy, xhat, rstd, rows, cols, dx, 2, |dy, h, r, dx, sums| {
            let (dg, db) = sums.split_at_mut(cols);
            norm::layer_norm_backward(dy, h, r, gamma, cols, dx, dg, db)
        });
        dgamma.iter_mut().zip(&sums[..cols]).for_each(|(g, s)| *g += s);
        dbeta.iter_mut().zip(&sums[cols..]).for_each(|(b, s)| *b += s);
        Ok(())
    }
    fn rms_norm_forward(
        &self,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
        y: &mut Vec<f32>,
        xhat: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        need_len("rms_norm_forward", "x", x.len(), rows * cols)?;
        row_norm_forward(x, rows, cols, y, xhat, rstd, |x, y, h, r| {
            norm::rms_norm_forward(x, gamma, cols, eps, y, h, r)
        });
        Ok(())
    }
    fn rms_norm_backward(
        &self,
        dy: &Vec<f32>,
        xhat: &Vec<f32>,
        rstd: &Vec<f32>,
        gamma: &Vec<f32>,
        rows: usize,
        cols: usize,
        dx: &mut Vec<f32>,
        dgamma: &mut Vec<f32>,
    ) -> Result<()> {
        need_len("rms_norm_backward", "dy", dy.len(), rows * cols)?;
        need_len("rms_norm_backward", "xhat", xhat.len(), rows * cols)?;
        let sums = row_norm_backward(dy, xhat, rstd, rows, cols, dx, 1, |dy, h, r, dx, dg| {
            norm::rms_norm_backward(dy, h, r, gamma, cols, dx, dg)
        });
        dgamma.iter_mut().zip(&sums).for_each(|(g, s)| *g += s);
        Ok(())
    }
    fn column_stats(&self, x: &Vec<f32>, rows: usize, cols: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        Ok(norm::column_stats(x, rows, cols))
    }
    fn batch_norm_apply(
        &self,
        x: &Vec<f32>,
        mean: &[f64],
        var: &[f64],
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
        y: &mut Vec<f32>,
        xhat: &mut Vec<f32>,
    ) -> Result<()> {
        y.resize(rows * cols, 0.0);
        xhat.resize(rows * cols, 0.0);
        norm::batch_norm_apply(x, mean, var, gamma, beta, rows, cols, eps, y, xhat);
        Ok(())
    }
    fn batch_norm_backward_sums(
        &self,
        dy: &Vec<f32>,
        xhat: &Vec<f32>,
        gamma: &Vec<f32>,
        rows: usize,
        cols: usize,
        dgamma: &mut Vec<f32>,
        dbeta: &mut Vec<f32>,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        Ok(norm::batch_norm_backward_sums(dy, xhat, gamma, rows, cols, dgamma, dbeta))
    }
    fn batch_norm_backward_dx(
        &self,
        dy: &Vec<f32>,
        xhat: &Vec<f32>,
        var: &[f64],
        gamma: &Vec<f32>,
        means: (&[f64], &[f64]),
        rows: usize,
        cols: usize,
        eps: f32,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        dx.resize(rows * cols, 0.0);
        norm::batch_norm_backward_dx(dy, xhat, var, gamma, means.0, means.1, rows, cols, eps, dx);
        Ok(())
    }

    fn softmax_backward(&self, p: &Vec<f32>, dp: &Vec<f32>, ds: &mut Vec<f32>, rows: usize, cols: usize) -> Result<()> {
        ds.resize(rows * cols, 0.0);
        softmax_backward_rows(p, dp, ds, rows, cols);
        Ok(())
    }

    // One example per task: examples never share output elements.
    fn attention_forward(
        &self,
        qkv: &Vec<f32>,
        out: &mut Vec<f32>,
        probs: &mut Vec<f32>,
        dims: &AttentionDims,
        lens: &[usize],
    ) -> Result<()> {
        let (nq, no, np) = dims.per_example();
        out.resize(lens.len() * no, 0.0);
        probs.resize(lens.len() * np, 0.0);
        out.par_chunks_mut(no)
            .zip(probs.par_chunks_mut(np))
            .zip(qkv.par_chunks(nq))
            .zip(lens.par_iter())
            .for_each(|(((o, p), q), &len)| attention::attention_forward(q, o, p, dims, len));
        Ok(())
    }

    fn attention_backward(
        &self,
        qkv: &Vec<f32>,
        probs: &Vec<f32>,
        dout: &Vec<f32>,
        dqkv: &mut Vec<f32>,
        dims: &AttentionDims,
        lens: &[usize],
    ) -> Result<()> {
        let (nq, no, np) = dims.per_example();
        dqkv.resize(lens.len() * nq, 0.0);
        dqkv.par_chunks_mut(nq)
            .zip(qkv.par_chunks(nq))
            .zip(probs.par_chunks(np))
            .zip(dout.par_chunks(no))
            .zip(lens.par_iter())
            .for_each(|((((dq, q), p), d_o), &len)| attention::attention_backward(q, p, d_o, dq, dims, len));
        Ok(())
    }

    fn rotary(&self, qkv: &mut Vec<f32>, rot: &Rotary, inverse: bool) -> Result<()> {
        let width = 3 * rot.heads * rot.head_dim;
        let whole = width > 0 && qkv.len().is_multiple_of(width) && (qkv.len() / width).is_multiple_of(rot.t.max(1));
        if !rot.head_dim.is_multiple_of(2) || !whole {
            return Err(KernelError::Shape {
                op: "rotary",
                detail: format!("qkv of {} floats, {rot:?}: rows of 3D with an even head width expected", qkv.len()),
            });
        }
        // Blocks of whole sequences, so each block's row 0 is at position `offset`.
        let block = rot.t.max(1) * width * LN_ROWS.div_ceil(rot.t.max(1));
        let table = rot.table();
        qkv.par_chunks_mut(block).for_each(|rows| rotary::rotate_with(rows, rot, &table, inverse));
        Ok(())
    }
    fn attention_cached(
        &self,
        cache: &Vec<f32>,
        len: usize,
        start: usize,
        out: &mut Vec<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let d = heads * head_dim;
        need_len("attention_cached", "cache", cache.len(), len * 3 * d)?;
        if start >= len {
            return Err(KernelError::Shape { op: "attention_cached", detail: format!("new rows {start}..{len}") });
        }
        out.resize((len - start) * d, 0.0);
        attention::attention_cached(&cache[..len * 3 * d], len, start, out, heads, head_dim);
        Ok(())
    }

    fn lstm_forward(
        &self,
        pre: &Vec<f32>,
        c_prev: &Vec<f32>,
        gates: &mut Vec<f32>,
        c: &mut Vec<f32>,
        h: &mut Vec<f32>,
        hidden: usize,
    ) -> Result<()> {
        gates.resize(pre.len(), 0.0);
        c.resize(c_prev.len(), 0.0);
        h.resize(c_prev.len(), 0.0);
        recurrent::lstm_forward(pre, c_prev, gates, c, h, hidden);
        Ok(())
    }
    fn lstm_backward(
        &self,
        gates: &Vec<f32>,
        c_prev: &Vec<f32>,
        c: &Vec<f32>,
        dh: &Vec<f32>,
        dc: &mut Vec<f32>,
        dpre: &mut Vec<f32>,
        hidden: usize,
    ) -> Result<()> {
        dpre.resize(gates.len(), 0.0);
        recurrent::lstm_backward(gates, c_prev, c, dh, dc, dpre, hidden);
        Ok(())
    }
    fn gru_forward(
        &self,
        xp: &Vec<f32>,
        hp: &Vec<f32>,
        h_prev: &Vec<f32>,
        gates: &mut Vec<f32>,
        h: &mut Vec<f32>,
        hidden: usize,
    ) -> Result<()> {
        gates.resize(xp.len(), 0.0);
        h.resize(h_prev.len(), 0.0);
        recurrent::gru_forward(xp, hp, h_prev, gates, h, hidden);
        Ok(())
    }
    fn gru_backward(
        &self,
        gates: &Vec<f32>,
        hp: &Vec<f32>,
        h_prev: &Vec<f32>,
        dh: &Vec<f32>,
        dxp: &mut Vec<f32>,
        dhp: &mut Vec<f32>,
        dh_prev: &mut Vec<f32>,
        hidden: usize,
    ) -> Result<()> {
        dxp.resize(gates.len(), 0.0);
        dhp.resize(gates.len(), 0.0);
        dh_prev.resize(dh.len(), 0.0);
        recurrent::gru_backward(gates, hp, h_prev, dh, dxp, dhp, dh_prev, hidden);
        Ok(())
    }

    fn embedding_forward(&self, table: &Vec<f32>, ids: &[u32], dim: usize, out: &mut Vec<f32>) -> Result<()> {
        out.resize(ids.len() * dim, 0.0);
        for (row, &id) in out.chunks_exact_mut(dim).zip(ids) {
            row.copy_from_slice(&table[id as usize * dim..(id as usize + 1) * dim]);
        }
        Ok(())
    }
    fn embedding_backward(&self, dy: &Vec<f32>, ids: &[u32], dim: usize, dtable: &mut Vec<f32>) -> Result<()> {
        for (row, &id) in dy.chunks_exact(dim).zip(ids) {
            for (t, g) in dtable[id as usize * dim..(id as usize + 1) * dim].iter_mut().zip(row) {
                *t += g;
            }
        }
        Ok(())
    }

    fn optimizer_step(
        &self,
        rule: UpdateRule,
        lr: f32,
        grad_scale: f32,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        state1: &mut Vec<f32>,
        state2: &mut Vec<f32>,
    ) -> Result<()> {
        let params = param.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK));
        match rule {
            UpdateRule::Sgd => params.for_each(|(w, g)| {
                for (w, g) in w.iter_mut().zip(g) {
                    *w -= lr * (grad_scale * g);
                }
            }),
            UpdateRule::Momentum { mu, nesterov } => {
                params.zip(state1.par_chunks_mut(CHUNK)).for_each(|((w, g), v)| {
                    for ((w, g), v) in w.iter_mut().zip(g).zip(v.iter_mut()) {
                        let g = grad_scale * g;
                        *v = mu * *v + g;
                        *w -= if nesterov { lr * (g + mu * *v) } else { lr * *v };
                    }
                })
            }
            UpdateRule::Adam { beta1, beta2, eps, step, decoupled_decay } => {
                // PyTorch's form: w -= lr·(m/(1−β1ᵗ)) / (sqrt(v)/sqrt(1−β2ᵗ) + eps) + lr·wd·w
                let k = vector::AdamStep {
                    beta1,
                    beta2,
                    eps,
                    step_size: lr / (1.0 - beta1.powi(step as i32)),
                    inv_sqrt_bc2: 1.0 / (1.0 - beta2.powi(step as i32)).sqrt(),
                    decay: lr * decoupled_decay,
                    grad_scale,
                };
                params
                    .zip(state1.par_chunks_mut(CHUNK))
                    .zip(state2.par_chunks_mut(CHUNK))
                    .for_each(|(((w, g), m), v)| vector::adam_update(w, g, m, v, k))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_for_all_transposes() {
        let be = CpuBackend::new(2);
        let (m, k, n) = (37, 53, 29);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let want = naive_matmul(&a, &b, m, k, n, ta, tb);
                let mut c = vec![1.0; m * n];
                be.matmul(&a, &b, &mut c, Gemm { trans_a: ta, trans_b: tb, ..Gemm::nn(m, k, n) }).unwrap();
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-4, "ta={ta} tb={tb}: {x} vs {y}");
                }
                // accumulate adds onto what is there
                be.matmul(&a, &b, &mut c, Gemm { trans_a: ta, trans_b: tb, ..Gemm::nn(m, k, n) }.accumulate()).unwrap();
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - 2.0 * y).abs() < 1e-3);
                }
            }
        }
    }

    /// Rows of a product alone equal those rows of the whole product, in every layout and
    /// precision; the other rows of c stay untouched.
    #[test]
    fn matmul_rows_equals_those_rows_of_the_whole_product() {
        let (m, k, n) = (37, 53, 29);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
        let units = std::iter::once(None).chain(crate::isa::bf16_units().iter().copied().map(Some));
        for (unit, precision) in units.flat_map(|u| [(u, MatmulPrecision::Fp32), (u, MatmulPrecision::Bf16)]) {
            let be = CpuBackend { precision, bf16_unit: unit, ..CpuBackend::new(2) };
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let g = Gemm { trans_a: ta, trans_b: tb, ..Gemm::nn(m, k, n) }.accumulate();
                let mut whole = vec![0.5; m * n];
                be.matmul(&a, &b, &mut whole, g).unwrap();
                let mut pieces = vec![0.5; m * n];
                be.matmul_rows(&a, &b, &mut pieces, g, 5..20).unwrap();
                let (rows, rest) =
                    (5 * n..20 * n, pieces.iter().enumerate().filter(|(i, _)| !(5 * n..20 * n).contains(i)));
                for (x, y) in pieces[rows.clone()].iter().zip(&whole[rows]) {
                    assert!(
                        (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                        "{unit:?} {precision:?} ta={ta} tb={tb}: {x} vs {y}"
                    );
                }
                assert!(rest.into_iter().all(|(_, &v)| v == 0.5), "rows outside the range are left alone");
            }
        }
        let be = CpuBackend::new(1);
        let err = be.matmul_rows(&a, &b, &mut vec![0.0; m * n], Gemm::nn(m, k, n), 30..40).unwrap_err();
        assert_eq!(err.to_string(), "matmul_rows: rows 30..40 of a product with 37");
    }

    #[test]
    fn a_matmul_on_short_buffers_is_a_shape_error_naming_the_operand() {
        let be = CpuBackend::new(1);
        let mut c = vec![0.0; 6];
        let err = be.matmul(&vec![1.0; 5], &vec![1.0; 12], &mut c, Gemm::nn(2, 3, 4)).unwrap_err();
        assert_eq!(err.to_string(), "matmul: a holds 5 values, the shape needs 6");
        let err = be.matmul(&vec![1.0; 6], &vec![1.0; 12], &mut c, Gemm::nn(2, 3, 4)).unwrap_err();
        assert_eq!(err.to_string(), "matmul: c holds 6 values, the shape needs 8");
        assert_eq!(c, vec![0.0; 6], "nothing written");
    }

    #[test]
    fn bf16_runs_on_a_matrix_unit_or_falls_back_to_fp32() {
        let mut emulated = CpuBackend { bf16_unit: None, ..CpuBackend::new(1) };
        emulated.set_matmul_precision(MatmulPrecision::Bf16).unwrap();
        assert_eq!(emulated.precision, MatmulPrecision::Fp32, "no unit: fp32, not the slower emulation");
        for &unit in crate::isa::bf16_units() {
            let mut be = CpuBackend { bf16_unit: Some(unit), ..CpuBackend::new(1) };
            be.set_matmul_precision(MatmulPrecision::Bf16).unwrap();
            let mut c = vec![0.0; 1];
            be.matmul(&vec![300.0], &vec![300.0], &mut c, Gemm::nn(1, 1, 1)).unwrap();
            assert_eq!(c[0], 90112.0, "{unit:?}: 90000 rounded to bf16");
        }
    }

    #[test]
    fn half_precision_matmul_rounds_operands_and_outputs_and_overflows_fp16() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| 1.0 + (i as f32) * 0.001_3).collect();
        let b: Vec<f32> = (0..k * n).map(|i| 0.5 - (i as f32) * 0.000_7).collect();
        for p in [MatmulPrecision::Bf16, MatmulPrecision::Fp16] {
            let be = CpuBackend { precision: p, bf16_unit: None, ..CpuBackend::new(1) };
            let ra: Vec<f32> = a.iter().map(|&x| p.round(x)).collect();
            let rb: Vec<f32> = b.iter().map(|&x| p.round(x)).collect();
            let want: Vec<f32> = naive_matmul(&ra, &rb, m, k, n, false, false).iter().map(|&x| p.round(x)).collect();
            let mut c = vec![0.0; m * n];
            be.matmul(&a, &b, &mut c, Gemm::nn(m, k, n)).unwrap();
            assert_eq!(c, want, "{p:?}");
            assert_ne!(ra, a, "{p:?} really rounds the operands");
            // Accumulating: the rounded product is added to the fp32 values already there.
            let mut acc = vec![0.25; m * n];
            be.matmul(&a, &b, &mut acc, Gemm::nn(m, k, n).accumulate()).unwrap();
            for (x, w) in acc.iter().zip(&want) {
                assert_eq!(*x, 0.25 + w);
            }
        }
        // A product's own precision wins over the backend's, both ways.
        let mut exact = vec![0.0; m * n];
        CpuBackend::new(1).matmul(&a, &b, &mut exact, Gemm::nn(m, k, n)).unwrap();
        let bf16_backend = CpuBackend { precision: MatmulPrecision::Bf16, bf16_unit: None, ..CpuBackend::new(1) };
        let mut c = vec![0.0; m * n];
        bf16_backend.matmul(&a, &b, &mut c, Gemm::nn(m, k, n).in_precision(MatmulPrecision::Fp32)).unwrap();
        assert_eq!(c, exact);
        let bf16_product = Gemm::nn(m, k, n).in_precision(MatmulPrecision::Bf16);
        CpuBackend { bf16_unit: None, ..CpuBackend::new(1) }.matmul(&a, &b, &mut c, bf16_product).unwrap();
        let mut via_backend = vec![0.0; m * n];
        bf16_backend.matmul(&a, &b, &mut via_backend, Gemm::nn(m, k, n)).unwrap();
        assert_eq!(c, via_backend);
        assert_ne!(c, exact);
        let fp16 = CpuBackend { precision: MatmulPrecision::Fp16, ..CpuBackend::new(1) };
        let mut c = vec![0.0; 1];
        fp16.matmul(&vec![300.0], &vec![300.0], &mut c, Gemm::nn(1, 1, 1)).unwrap();
        assert_eq!(c[0], f32::INFINITY, "90000 > 65504 overflows fp16");
        let bf16 = CpuBackend { precision: MatmulPrecision::Bf16, bf16_unit: None, ..CpuBackend::new(1) };
        bf16.matmul(&vec![300.0], &vec![300.0], &mut c, Gemm::nn(1, 1, 1)).unwrap();
        assert_eq!(c[0], 90112.0, "bf16 keeps the range, 8 significant bits");
    }

    #[test]
    fn softmax_ce_is_stable_and_known() {
        let be = CpuBackend::new(1);
        // Huge logits would overflow exp() without max-subtraction. Values are exact in f32.
        let logits = vec![1000.0, 1000.0, 1001.0, 0.0, 0.0, 0.0];
        let mut d = vec![0.0; 6];
        let (loss, correct) = be.softmax_cross_entropy(&logits, &[2, 0], None, &mut d, 2, 3, 1.0).unwrap();
        // row 0: p = (1/e, 1/e, 1)/(1 + 2/e), target 2 -> ln(1 + 2/e); row 1: uniform -> ln 3
        let e = std::f64::consts::E;
        let want = (1.0 + 2.0 / e).ln() + 3f64.ln();
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        assert_eq!(correct, 2); // row 1 ties -> argmax is index 0
        let p_other = (1.0 / e) / (1.0 + 2.0 / e);
        assert!((d[0] as f64 - p_other).abs() < 1e-6 && (d[2] as f64 - (1.0 / (1.0 + 2.0 / e) - 1.0)).abs() < 1e-6);
        assert!((d[3] + 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn activation_values_known() {
        let x = [-2.0f32, -0.5, 0.0, 0.5, 2.0];
        let check = |act, f: &dyn Fn(f32) -> f32| {
            for &v in &x {
                assert!((act_forward(act, v) - f(v)).abs() < 1e-6, "{act:?} at {v}");
            }
        };
        check(Activation::Relu, &|v| v.max(0.0));
        check(Activation::Sigmoid, &|v| 1.0 / (1.0 + (-v).exp()));
        check(Activation::LeakyRelu { slope: 0.1 }, &|v| if v > 0.0 { v } else { 0.1 * v });
        check(Activation::Swish { beta: 1.0 }, &|v| v / (1.0 + (-v).exp()));
        // GELU(1) (tanh form) = 0.841192
        assert!((act_forward(Activation::Gelu, 1.0) - 0.841_192).abs() < 1e-5);
        // s' = s(1-s) at 0 is 1/4; tanh' at 0 is 1
        assert!((act_derivative(Activation::Sigmoid, 0.0).0 - 0.25).abs() < 1e-7);
        assert!((act_derivative(Activation::Tanh, 0.0).0 - 1.0).abs() < 1e-7);
    }
}
