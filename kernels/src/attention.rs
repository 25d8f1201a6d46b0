//! Reference loops of the scaled dot-product attention core (T15), one example at a time,
//! in the style of llm.c's `attention_forward`/`attention_backward`. The projections
//! around it are GEMMs done by the layer; this is only softmax(Q Kᵀ/√d_k + mask)·V.
//!
//! Layout: qkv (T, 3D) holds [Q | K | V] per position, head h in columns h·d_k..(h+1)·d_k
//! of each third; out (T, D) has the heads concatenated; probs (H, T, T).

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

/// Dot product in 8 independent lanes (a fixed order, so deterministic) that the compiler
/// turns into SIMD; a single running sum cannot be vectorized without reassociation.
#[inline(always)]
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

/// One example: out (T, D) and probs (H, T, T) from qkv (T, 3D). `len` is the number of
/// valid (unpadded) positions; keys at or after it are masked for every query.
pub fn attention_forward(qkv: &[f32], out: &mut [f32], probs: &mut [f32], dims: &AttentionDims, len: usize) {
    let AttentionDims { t, heads, head_dim: dk, .. } = *dims;
    let d = dims.dim();
    let scale = 1.0 / (dk as f32).sqrt();
    probs.fill(0.0);
    out.fill(0.0);
    for h in 0..heads {
        for i in 0..t {
            let q = &qkv[i * 3 * d + h * dk..][..dk];
            let p = &mut probs[(h * t + i) * t..][..t];
            let visible = dims.visible(i, len);
            if visible == 0 {
                continue; // nothing to attend to: output 0
            }
            let mut max = f32::NEG_INFINITY;
            for (j, pj) in p[..visible].iter_mut().enumerate() {
                *pj = dot(q, &qkv[j * 3 * d + d + h * dk..][..dk]) * scale;
                max = max.max(*pj);
            }
            let mut sum = 0.0;
            for pj in &mut p[..visible] {
                *pj = crate::fast_math::exp(*pj - max);
                sum += *pj;
            }
            let inv = 1.0 / sum;
            let o = &mut out[i * d + h * dk..][..dk];
            for (j, pj) in p[..visible].iter_mut().enumerate() {
                *pj *= inv;
                let v = &qkv[j * 3 * d + 2 * d + h * dk..][..dk];
                for (oc, vc) in o.iter_mut().zip(v) {
                    *oc += *pj * vc;
                }
            }
        }
    }
}

/// One example: dqkv (T, 3D) from dout (T, D), with the qkv and probs of the forward.
/// dV_j = Σ_i p_ij dO_i; dP_ij = dO_i·V_j; dS_ij = p_ij (dP_ij − Σ_k p_ik dP_ik);
/// dQ_i = Σ_j dS_ij K_j /√d_k; dK_j = Σ_i dS_ij Q_i /√d_k.
pub fn attention_backward(
    qkv: &[f32],
    probs: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
    dims: &AttentionDims,
    len: usize,
) {
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

    #[test]
    fn forward_matches_the_definition_with_causal_and_padding_masks() {
        for causal in [false, true] {
            let dims = AttentionDims { t: 5, heads: 2, head_dim: 3, causal };
            let (nq, no, np) = dims.per_example();
            let qkv: Vec<f32> = (0..nq).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
            let (mut out, mut probs) = (vec![0.0; no], vec![0.0; np]);
            let len = 4;
            attention_forward(&qkv, &mut out, &mut probs, &dims, len);
            for h in 0..2 {
                let want = reference(&qkv, &dims, len, h);
                for i in 0..5 {
                    for c in 0..3 {
                        let got = out[i * 6 + h * 3 + c];
                        assert!((got - want[i * 3 + c]).abs() < 1e-5, "causal {causal} h{h} i{i} c{c}");
                    }
                    // masked keys get exactly zero probability
                    for j in dims.visible(i, len)..5 {
                        assert_eq!(probs[(h * 5 + i) * 5 + j], 0.0);
                    }
                }
            }
        }
    }
}
