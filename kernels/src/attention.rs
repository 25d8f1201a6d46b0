//! The scaled dot-product attention core (T15), one example at a time: the masked
//! softmax(Q Kᵀ/√d_k)·V and its backward, as per-head GEMMs (the `gemm` crate, one thread: examples
//! are the parallel unit). The projections around it are GEMMs done by the layer.
//!
//! Layout: qkv (T, 3D) holds [Q | K | V] per position, head h in columns h·d_k..(h+1)·d_k
//! of each third; out (T, D) has the heads concatenated; probs (H, T, T).
//!
//! Causal attention works in blocks of [`ROW_BLOCK`] query rows: rows r0..r1 only need keys
//! 0..r1, so the masked upper triangle costs one diagonal block per row block, not half the
//! matrix (at T = 64, 62.5% of the full products' FLOPs).

/// Shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Sequence length of the batch (padded).
    pub t: usize,
    pub heads: usize,
    /// Width of one head; D = heads · head_dim.
    pub head_dim: usize,
    /// Query i may not attend to keys j > i.
    pub causal: bool,
}

impl AttentionDims {
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Floats of qkv, out and probs for one example.
    pub fn per_example(&self) -> (usize, usize, usize) {
        (self.t * 3 * self.dim(), self.t * self.dim(), self.heads * self.t * self.t)
    }
    /// Keys query `i` sees in a sequence of valid length `len`: 0..visible(i, len).
    /// Masked keys get probability exactly 0 (never a large negative that could leak).
    pub fn visible(&self, i: usize, len: usize) -> usize {
        if self.causal {
            (i + 1).min(len)
        } else {
            len
        }
    }
}

/// Query rows (and key rows, in the backward) per block.
const ROW_BLOCK: usize = 16;

/// A strided matrix inside a flat buffer: element (r, c) is at `off + r·rs + c·cs`.
#[derive(Debug, Clone, Copy)]
struct View {
    off: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl View {
    /// Rows `r0..r1` and columns `c0..c1`.
    fn block(self, (r0, r1): (usize, usize), (c0, c1): (usize, usize)) -> View {
        debug_assert!(r0 <= r1 && r1 <= self.rows && c0 <= c1 && c1 <= self.cols);
        View { off: self.off + r0 * self.rs + c0 * self.cs, rows: r1 - r0, cols: c1 - c0, ..self }
    }
    fn rows(self, r0: usize, r1: usize) -> View {
        self.block((r0, r1), (0, self.cols))
    }
    fn t(self) -> View {
        View { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, off: self.off }
    }
    /// True if every element lies inside a buffer of `len` floats.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0 || self.cols == 0 || self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < len
    }
}

/// c = beta·a·b, single-threaded.
fn product(c: &mut [f32], cv: View, a: &[f32], av: View, b: &[f32], bv: View, beta: f32) {
    assert!(av.cols == bv.rows && cv.rows == av.rows && cv.cols == bv.cols, "attention product shapes");
    assert!(cv.fits(c.len()) && av.fits(a.len()) && bv.fits(b.len()), "attention product bounds");
    if cv.rows == 0 || cv.cols == 0 {
        return;
    }
    if av.cols == 0 {
        (0..cv.rows).for_each(|r| (0..cv.cols).for_each(|j| c[cv.off + r * cv.rs + j * cv.cs] = 0.0));
        return;
    }
    // SAFETY: `fits` bounds every element each view addresses; c does not alias a or b.
    unsafe {
        gemm::gemm(
            cv.rows,
            cv.cols,
            av.cols,
            c.as_mut_ptr().add(cv.off),
            cv.cs as isize,
            cv.rs as isize,
            false,
            a.as_ptr().add(av.off),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr().add(bv.off),
            bv.cs as isize,
            bv.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The views of one head: Q, K, V (T, d_k) in qkv, its output (T, d_k) in out and its
/// probabilities (T, T).
struct Head {
    q: View,
    k: View,
    v: View,
    o: View,
    p: View,
}

impl Head {
    fn new(dims: &AttentionDims, h: usize) -> Self {
        let (t, dk, d) = (dims.t, dims.head_dim, dims.dim());
        let part = |third: usize| View { off: third * d + h * dk, rows: t, cols: dk, rs: 3 * d, cs: 1 };
        Head {
            q: part(0),
            k: part(1),
            v: part(2),
            o: View { off: h * dk, rows: t, cols: dk, rs: d, cs: 1 },
            p: View { off: h * t * t, rows: t, cols: t, rs: t, cs: 1 },
        }
    }
}

impl AttentionDims {
    /// Blocks of query rows (r0, r1) and the keys 0..keys any row of the block sees.
    fn row_blocks(&self, len: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let block = if self.causal { ROW_BLOCK } else { self.t.max(1) };
        (0..self.t).step_by(block).map(move |r0| {
            let r1 = (r0 + block).min(self.t);
            (r0, r1, self.visible(r1 - 1, len))
        })
    }
    /// Blocks of key rows (j0, j1) below `len`, and the first query that sees them.
    fn key_blocks(&self, len: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let block = if self.causal { ROW_BLOCK } else { len.max(1) };
        (0..len).step_by(block).map(move |j0| (j0, (j0 + block).min(len), if self.causal { j0 } else { 0 }))
    }
}

/// One example: out (T, D) and probs (H, T, T) from qkv (T, 3D). `len` is the number of
/// valid (unpadded) positions; keys at or after it are masked for every query.
pub fn attention_forward(qkv: &[f32], out: &mut [f32], probs: &mut [f32], dims: &AttentionDims, len: usize) {
    let t = dims.t;
    let scale = 1.0 / (dims.head_dim as f32).sqrt();
    if len == 0 {
        out.fill(0.0); // nothing to attend to: output 0
        probs.fill(0.0);
        return;
    }
    for h in 0..dims.heads {
        let head = Head::new(dims, h);
        for (r0, r1, keys) in dims.row_blocks(len) {
            let s = head.p.block((r0, r1), (0, keys)); // (rows, keys) = Q Kᵀ/√d_k
            product(probs, s, qkv, head.q.rows(r0, r1), qkv, head.k.rows(0, keys).t(), scale);
            for i in r0..r1 {
                crate::vector::softmax_row(&mut probs[head.p.off + i * t..][..t], dims.visible(i, len));
            }
            product(out, head.o.rows(r0, r1), probs, s, qkv, head.v.rows(0, keys), 1.0);
            // P·V
        }
    }
}

/// One example: dqkv (T, 3D) from dout (T, D), with the qkv and probs of the forward.
/// dV = Pᵀ dO; dP = dO Vᵀ; dS_ij = p_ij (dP_ij − Σ_k p_ik dP_ik) / √d_k; dQ = dS K; dK = dSᵀ Q.
pub fn attention_backward(
    qkv: &[f32],
    probs: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
    dims: &AttentionDims,
    len: usize,
) {
    let t = dims.t;
    let scale = 1.0 / (dims.head_dim as f32).sqrt();
    if len == 0 {
        dqkv.fill(0.0);
        return;
    }
    let d = dims.dim();
    for row in dqkv.chunks_exact_mut(3 * d).take(t).skip(len) {
        row[d..].fill(0.0); // padded keys get no gradient; every other element is written below
    }
    let mut ds = vec![0.0f32; t * t]; // dP, then dS, of one head
    let ds_view = View { off: 0, rows: t, cols: t, rs: t, cs: 1 };
    for h in 0..dims.heads {
        let head = Head::new(dims, h);
        let p = |i: usize| &probs[head.p.off + i * t..][..t];
        for (r0, r1, keys) in dims.row_blocks(len) {
            let dp = ds_view.block((r0, r1), (0, keys)); // dO Vᵀ
            product(&mut ds, dp, dout, head.o.rows(r0, r1), qkv, head.v.rows(0, keys).t(), 1.0);
            for i in r0..r1 {
                crate::vector::softmax_backward_row(p(i), &mut ds[i * t..][..t], dims.visible(i, len), scale);
            }
            product(dqkv, head.q.rows(r0, r1), &ds, dp, qkv, head.k.rows(0, keys), 1.0);
            // dS K
        }
        for (j0, j1, q0) in dims.key_blocks(len) {
            let (cols, rows) = ((j0, j1), (q0, t));
            let dv = head.v.rows(j0, j1);
            product(dqkv, dv, probs, head.p.block(rows, cols).t(), dout, head.o.rows(q0, t), 1.0); // Pᵀ dO
            let dk = head.k.rows(j0, j1);
            let ds_t = ds_view.block(rows, cols).t();
            product(dqkv, dk, &ds, ds_t, qkv, head.q.rows(q0, t), 1.0); // dSᵀ Q
        }
    }
}

/// Causal attention of the new positions of one sequence against its cached keys (sampling
/// with a KV cache): `cache` holds the [Q | K | V] rows (3D wide) of positions 0..`len`, of
/// which `start..len` are new; out (len − start, D) gets their outputs. Query i sees keys
/// 0..=i, as in [`attention_forward`] with `causal`, at O(new · len · D) instead of O(len² · D).
pub fn attention_cached(cache: &[f32], len: usize, start: usize, out: &mut [f32], heads: usize, head_dim: usize) {
    let rows = len - start;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let dims = AttentionDims { t: len, heads, head_dim, causal: true };
    let mut scores = vec![0.0f32; rows * len]; // one head's (new, len) probabilities
    let s = View { off: 0, rows, cols: len, rs: len, cs: 1 };
    for h in 0..heads {
        let head = Head::new(&dims, h);
        let o = View { rows, ..head.o };
        product(&mut scores, s, cache, head.q.rows(start, len), cache, head.k.t(), scale);
        for (r, row) in scores.chunks_exact_mut(len).enumerate() {
            crate::vector::softmax_row(row, start + r + 1);
        }
        product(out, o, &scores, s, cache, head.v, 1.0); // P·V
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct evaluation of softmax(QKᵀ/√d + mask)·V for one head, from the definition.
    fn reference(qkv: &[f32], dims: &AttentionDims, len: usize, h: usize) -> Vec<f32> {
        let (t, dk, d) = (dims.t, dims.head_dim, dims.dim());
        let mut out = vec![0.0; t * dk];
        for i in 0..t {
            let mut s: Vec<f64> = (0..t)
                .map(|j| {
                    if j >= dims.visible(i, len) {
                        return f64::NEG_INFINITY;
                    }
                    (0..dk).map(|c| (qkv[i * 3 * d + h * dk + c] * qkv[j * 3 * d + d + h * dk + c]) as f64).sum::<f64>()
                        / (dk as f64).sqrt()
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            s.iter_mut().for_each(|v| *v = (*v - max).exp());
            let z: f64 = s.iter().sum();
            for c in 0..dk {
                out[i * dk + c] =
                    (0..t).map(|j| s[j] / z * qkv[j * 3 * d + 2 * d + h * dk + c] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    /// The loops this file held before the GEMM form (llm.c's `attention_backward`), kept
    /// as the backward's reference: one query row at a time, every visible key.
    /// Dot product in 8 independent lanes (a fixed order, so deterministic) that the compiler
    /// turns into SIMD; a single running sum cannot be vectorized without reassociation.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0.0f32; 8];
        let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
        for (ca, cb) in a8.zip(b8) {
            for k in 0..8 {
                lanes[k] += ca[k] * cb[k];
            }
        }
        lanes.iter().sum::<f32>() + tail
    }

    fn loop_backward(qkv: &[f32], probs: &[f32], dout: &[f32], dqkv: &mut [f32], dims: &AttentionDims, len: usize) {
        let AttentionDims { t, heads, head_dim: dk, .. } = *dims;
        let d = dims.dim();
        let scale = 1.0 / (dk as f32).sqrt();
        dqkv.fill(0.0);
        let mut dp = vec![0.0f32; t]; // dP of one query row
        let mut dq = vec![0.0f32; dk]; // dQ of one query row
        for h in 0..heads {
            for i in 0..t {
                let visible = dims.visible(i, len);
                let p = &probs[(h * t + i) * t..][..visible];
                let d_o = &dout[i * d + h * dk..][..dk];
                let mut weighted = 0.0f32; // Σ_k p_ik dP_ik
                for (j, (dpj, &pj)) in dp.iter_mut().zip(p).enumerate() {
                    *dpj = dot(d_o, &qkv[j * 3 * d + 2 * d + h * dk..][..dk]);
                    weighted += pj * *dpj;
                    let dv = &mut dqkv[j * 3 * d + 2 * d + h * dk..][..dk];
                    for (g, &o) in dv.iter_mut().zip(d_o) {
                        *g += pj * o;
                    }
                }
                dq.fill(0.0);
                let q = &qkv[i * 3 * d + h * dk..][..dk];
                for (j, &pj) in p.iter().enumerate() {
                    let ds = pj * (dp[j] - weighted) * scale;
                    let k = &qkv[j * 3 * d + d + h * dk..][..dk];
                    for (g, &kc) in dq.iter_mut().zip(k) {
                        *g += ds * kc; // dQ_i += dS_ij K_j
                    }
                    let dk_j = &mut dqkv[j * 3 * d + d + h * dk..][..dk];
                    for (g, &qc) in dk_j.iter_mut().zip(q) {
                        *g += ds * qc; // dK_j += dS_ij Q_i
                    }
                }
                for (g, &v) in dqkv[i * 3 * d + h * dk..][..dk].iter_mut().zip(dq.iter()) {
                    *g += v;
                }
            }
        }
    }

    /// Shapes around the row block: shorter than one block, several blocks and a ragged
    /// last one, with full, padded, single-token and empty sequences.
    const SHAPES: [(usize, usize, usize); 3] = [(5, 2, 3), (37, 3, 8), (64, 2, 16)];

    fn inputs(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 37 + salt) % 23) as f32 - 11.0) / 7.0).collect()
    }

    #[test]
    fn forward_matches_the_definition_with_causal_and_padding_masks() {
        for causal in [false, true] {
            for (t, heads, head_dim) in SHAPES {
                let dims = AttentionDims { t, heads, head_dim, causal };
                let (nq, no, np) = dims.per_example();
                let d = dims.dim();
                let qkv = inputs(nq, 0);
                for len in [t, t - 1, 17.min(t), 1, 0] {
                    let (mut out, mut probs) = (vec![f32::NAN; no], vec![f32::NAN; np]);
                    attention_forward(&qkv, &mut out, &mut probs, &dims, len);
                    for h in 0..heads {
                        let want = if len == 0 { vec![0.0; t * head_dim] } else { reference(&qkv, &dims, len, h) };
                        for i in 0..t {
                            for c in 0..head_dim {
                                let got = out[i * d + h * head_dim + c];
                                let close = (got - want[i * head_dim + c]).abs() < 1e-5;
                                assert!(close, "causal {causal} t{t} len{len} h{h} i{i} c{c}: {got}");
                            }
                            // masked keys get exactly zero probability
                            for j in dims.visible(i, len)..t {
                                assert_eq!(probs[(h * t + i) * t + j], 0.0);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn backward_matches_the_loops_it_replaced() {
        for causal in [false, true] {
            for (t, heads, head_dim) in SHAPES {
                let dims = AttentionDims { t, heads, head_dim, causal };
                let (nq, no, np) = dims.per_example();
                let (qkv, dout) = (inputs(nq, 0), inputs(no, 5));
                for len in [t, t - 1, 17.min(t), 1, 0] {
                    let (mut out, mut probs) = (vec![0.0; no], vec![0.0; np]);
                    attention_forward(&qkv, &mut out, &mut probs, &dims, len);
                    let (mut got, mut want) = (vec![f32::NAN; nq], vec![0.0; nq]);
                    attention_backward(&qkv, &probs, &dout, &mut got, &dims, len);
                    loop_backward(&qkv, &probs, &dout, &mut want, &dims, len);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "causal {causal} t{t} len{len} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// Attending from cached keys gives what the full causal forward gives at the same
    /// positions, whether the new rows come one at a time or as a block.
    #[test]
    fn cached_attention_matches_the_full_causal_forward() {
        let dims = AttentionDims { t: 21, heads: 3, head_dim: 4, causal: true };
        let d = dims.dim();
        let qkv: Vec<f32> = (0..dims.t * 3 * d).map(|i| ((i as f32) * 0.37).sin()).collect();
        let (mut full, mut probs) = (vec![0.0; dims.t * d], vec![0.0; dims.heads * dims.t * dims.t]);
        attention_forward(&qkv, &mut full, &mut probs, &dims, dims.t);
        for (start, len) in [(0, 9), (9, 10), (10, 21), (20, 21)] {
            let mut out = vec![f32::NAN; (len - start) * d];
            attention_cached(&qkv[..len * 3 * d], len, start, &mut out, dims.heads, dims.head_dim);
            for (i, (a, b)) in out.iter().zip(&full[start * d..len * d]).enumerate() {
                assert!((a - b).abs() < 1e-5, "rows {start}..{len}, element {i}: {a} vs {b}");
            }
        }
    }
}
