use super::{cached, ForwardCtx, Layer, Linear, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::Backend;

/// Masked score: exp(MASKED − max) is exactly 0 in f32, without the inf − inf of −∞.
const MASKED: f32 = -1e30;

/// Multi-head scaled dot-product self-attention on (N, T, D) (T15):
/// [Q K V] = x·W_qkvᵀ + b, per head softmax(Q Kᵀ/√d_k + mask)·V, heads concatenated, then
/// the output projection. The mask hides future positions (causal) and padding (positions
/// at or after `ForwardCtx::seq_lens[n]`). Cost per example: O(T²·D) for the scores and
/// O(T·D²) for the projections (see `flops_per_example`).
pub struct MultiHeadAttention<B: Backend> {
    name: String,
    pub dim: usize,
    pub heads: usize,
    pub causal: bool,
    pub max_len: usize,
    pub qkv: Linear<B>, // D -> 3D
    pub out: Linear<B>, // D -> D
    cache: Option<AttentionCache<B>>,
}

/// What backward needs from a training forward.
struct AttentionCache<B: Backend> {
    n: usize,
    t: usize,
    /// Per (example, head): Q, K, V (T, d_k) and the attention probabilities P (T, T).
    heads: Vec<[B::Buf; 4]>,
}

/// Model width, number of heads, causal masking and the longest sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub dim: usize,
    pub heads: usize,
    pub causal: bool,
    pub max_len: usize,
}

impl<B: Backend> MultiHeadAttention<B> {
    /// `w_qkv` is (3D, D), `w_out` (D, D), both row-major as in `Linear`.
    pub fn new(be: &B, name: &str, shape: AttentionShape, w_qkv: &[f32], w_out: &[f32]) -> Self {
        let AttentionShape { dim, heads, causal, max_len } = shape;
        Self {
            name: name.to_string(),
            dim,
            heads,
            causal,
            max_len,
            qkv: Linear::new(be, &format!("{name}.qkv"), dim, 3 * dim, w_qkv),
            out: Linear::new(be, &format!("{name}.out"), dim, dim, w_out),
            cache: None,
        }
    }

    /// The additive mask of example n: (T, T), 0 where query i may attend to key j.
    fn mask(&self, t: usize, len: usize) -> Vec<f32> {
        let mut m = vec![0.0; t * t];
        for i in 0..t {
            for j in 0..t {
                if (self.causal && j > i) || j >= len {
                    m[i * t + j] = MASKED;
                }
            }
        }
        m
    }
}

impl<B: Backend> Layer<B> for MultiHeadAttention<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let [n, t, d] = x.shape[..] else {
            return shape_err(
                "MultiHeadAttention::forward",
                format!("{}: input {:?}, expected [N, T, D]", self.name, x.shape),
            );
        };
        if d != self.dim || d % self.heads != 0 || t > self.max_len {
            return shape_err(
                "MultiHeadAttention::forward",
                format!("{}: input {:?}, dim {} heads {}", self.name, x.shape, self.dim, self.heads),
            );
        }
        if !ctx.seq_lens.is_empty() && ctx.seq_lens.len() != n {
            return shape_err(
                "MultiHeadAttention::forward",
                format!("{} sequences but {} lengths", n, ctx.seq_lens.len()),
            );
        }
        let (h_n, dk) = (self.heads, d / self.heads);
        let scale = 1.0 / (dk as f32).sqrt();
        let qkv = self.qkv.forward(be, x, ctx)?; // (N, T, 3D)
        let mut o = Tensor::zeros(be, &[n, t, d]); // heads concatenated
        let mut cache = Vec::with_capacity(if ctx.train { n * h_n } else { 0 });
        for ex in 0..n {
            let len = ctx.seq_lens.get(ex).copied().unwrap_or(t);
            let mask = be.upload(&self.mask(t, len));
            let mut block = be.zeros(t * 3 * d); // this example's (T, 3D)
            be.copy_range(&qkv.buf, ex * t * 3 * d, &mut block, 0, t * 3 * d);
            let mut o_ex = be.zeros(t * d);
            for h in 0..h_n {
                let head = |offset: usize| {
                    let mut m = be.zeros(t * dk);
                    be.copy_columns(&block, 3 * d, offset + h * dk, &mut m, dk, 0, dk, t, false);
                    m
                };
                let (q, k, v) = (head(0), head(d), head(2 * d)); // (T, d_k) each
                let mut scores = be.zeros(t * t); // S = Q Kᵀ/√d_k + mask
                be.matmul(&q, &k, &mut scores, t, dk, t, false, true, false);
                be.scale(&mut scores, scale);
                be.axpy(1.0, &mask, &mut scores);
                let mut p = be.zeros(t * t);
                be.softmax(&scores, &mut p, t, t);
                let mut o_h = be.zeros(t * dk); // P V
                be.matmul(&p, &v, &mut o_h, t, t, dk, false, false, false);
                be.copy_columns(&o_h, dk, 0, &mut o_ex, d, h * dk, dk, t, false);
                if ctx.train {
                    cache.push([q, k, v, p]);
                }
            }
            be.copy_range(&o_ex, 0, &mut o.buf, ex * t * d, t * d);
        }
        if ctx.train {
            self.cache = Some(AttentionCache { n, t, heads: cache });
        }
        self.out.forward(be, o, ctx)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let AttentionCache { n, t, heads } = cached(&mut self.cache, &self.name)?;
        let d = self.dim;
        let dk = d / self.heads;
        let scale = 1.0 / (dk as f32).sqrt();
        let d_o = self.out.backward(be, dy)?; // (N, T, D)
        let mut d_qkv = Tensor::zeros(be, &[n, t, 3 * d]);
        for ex in 0..n {
            let mut d_o_ex = be.zeros(t * d);
            be.copy_range(&d_o.buf, ex * t * d, &mut d_o_ex, 0, t * d);
            let mut d_block = be.zeros(t * 3 * d);
            for h in 0..self.heads {
                let [q, k, v, p] = &heads[ex * self.heads + h];
                let mut d_oh = be.zeros(t * dk);
                be.copy_columns(&d_o_ex, d, h * dk, &mut d_oh, dk, 0, dk, t, false);
                let mut d_v = be.zeros(t * dk); // dV = Pᵀ dO
                be.matmul(p, &d_oh, &mut d_v, t, t, dk, true, false, false);
                let mut d_p = be.zeros(t * t); // dP = dO Vᵀ
                be.matmul(&d_oh, v, &mut d_p, t, dk, t, false, true, false);
                let mut d_s = be.zeros(t * t); // dS = softmax' · dP, then the 1/√d_k
                be.softmax_backward(p, &d_p, &mut d_s, t, t);
                be.scale(&mut d_s, scale);
                let mut d_q = be.zeros(t * dk); // dQ = dS K
                be.matmul(&d_s, k, &mut d_q, t, t, dk, false, false, false);
                let mut d_k = be.zeros(t * dk); // dK = dSᵀ Q
                be.matmul(&d_s, q, &mut d_k, t, t, dk, true, false, false);
                for (grad, offset) in [(&d_q, 0), (&d_k, d), (&d_v, 2 * d)] {
                    be.copy_columns(grad, dk, 0, &mut d_block, 3 * d, offset + h * dk, dk, t, false);
                }
            }
            be.copy_range(&d_block, 0, &mut d_qkv.buf, ex * t * 3 * d, t * 3 * d);
        }
        self.qkv.backward(be, d_qkv)
    }

    fn params(&self) -> Vec<&Param<B>> {
        let mut p = self.qkv.params();
        p.extend(self.out.params());
        p
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut p = self.qkv.params_mut();
        p.extend(self.out.params_mut());
        p
    }
    /// Projections (4·T·D² multiply-adds ≈ 8·T·D² FLOPs) plus scores and P·V
    /// (2·T²·D multiply-adds ≈ 4·T²·D FLOPs): the O(n² d) of T15.
    fn flops_per_example(&self) -> u64 {
        let (t, d) = (self.max_len as u64, self.dim as u64);
        self.qkv.flops_per_example() * t + self.out.flops_per_example() * t + 4 * t * t * d
    }
}
