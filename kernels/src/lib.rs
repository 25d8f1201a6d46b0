//! lockstep-kernels: the `Backend` trait (the narrow set of ops the layers need) and its
//! CPU implementation, which is the reference every other backend is tested against.
//!
//! Buffers are flat `f32` arrays; shapes live one level up, in `lockstep-nn`'s `Tensor`.
//! Matrices are row-major. Every op documents the shapes it expects in `// (rows, cols)`.

pub mod attention;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fast_math;
pub mod norm;
pub mod recurrent;
pub mod window;

pub use attention::AttentionDims;
pub use cpu::CpuBackend;

/// A target with this value is padding (T29): it adds nothing to the loss, to the count of
/// correct predictions or to any gradient.
pub const IGNORE_TARGET: u32 = u32::MAX;
pub use window::Window;

/// Element-wise activation functions (T2). Parameters that are fixed live in the variant;
/// a learnable Swish beta is passed to the ops by the layer that owns it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Identity,
    Sigmoid,
    Tanh,
    Relu,
    /// max(x, slope·x)
    LeakyRelu {
        slope: f32,
    },
    /// x·sigmoid(beta·x); beta = 1 is SiLU.
    Swish {
        beta: f32,
    },
    /// tanh approximation (GPT-2's).
    Gelu,
}

/// Which parameter update rule `Backend::optimizer_step` applies (T19).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpdateRule {
    /// w -= lr·g (weight decay, if any, already folded into g by the caller as L2).
    Sgd,
    /// v = mu·v + g; w -= lr·v   (or lr·(g + mu·v) with Nesterov).
    Momentum { mu: f32, nesterov: bool },
    /// Adam / AdamW; `decoupled_decay` is AdamW's w -= lr·wd·w.
    Adam { beta1: f32, beta2: f32, eps: f32, step: u64, decoupled_decay: f32 },
}

/// One matrix product c = op(a)·op(b) (+ c): op(a) is (m, k), op(b) is (k, n), c is
/// (m, n), all row-major. `trans_a`: a is stored (k, m); `trans_b`: b is stored (n, k).
/// Built by name: `Gemm::nt(rows, in, out)` is y = x·Wᵀ, `Gemm::tn(out, rows, in)
/// .accumulate()` is dW += dyᵀ·x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Add to c instead of overwriting it.
    pub accumulate: bool,
}

impl Gemm {
    /// a·b.
    pub fn nn(m: usize, k: usize, n: usize) -> Self {
        Self { m, k, n, trans_a: false, trans_b: false, accumulate: false }
    }
    /// a·bᵀ.
    pub fn nt(m: usize, k: usize, n: usize) -> Self {
        Self { trans_b: true, ..Self::nn(m, k, n) }
    }
    /// aᵀ·b.
    pub fn tn(m: usize, k: usize, n: usize) -> Self {
        Self { trans_a: true, ..Self::nn(m, k, n) }
    }
    /// c += the product.
    pub fn accumulate(self) -> Self {
        self.accumulate_if(true)
    }
    pub fn accumulate_if(self, accumulate: bool) -> Self {
        Self { accumulate, ..self }
    }
}

/// The ops every backend provides. `Buf` is a device buffer of `f32`.
///
/// The trait is deliberately narrow: layers compose these ops; a new backend implements
/// only this list and is checked op by op against [`CpuBackend`].
pub trait Backend: Send + Sync + 'static {
    type Buf: Send + Sync;

    fn name(&self) -> String;

    /// Reports (and clears) an asynchronous device error recorded by any op since the last
    /// call. The CPU backend has none.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    // ---- memory ----
    fn zeros(&self, len: usize) -> Self::Buf;
    fn upload(&self, data: &[f32]) -> Self::Buf;
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf);
    fn fill(&self, buf: &mut Self::Buf, value: f32);
    /// dst[dst_off..dst_off+len] = src[src_off..src_off+len]
    fn copy_range(&self, src: &Self::Buf, src_off: usize, dst: &mut Self::Buf, dst_off: usize, len: usize);

    /// Sets the format of matmul operands and outputs (T25); accumulation stays fp32. A
    /// backend without it refuses anything but fp32.
    fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<(), String> {
        match precision {
            MatmulPrecision::Fp32 => Ok(()),
            other => Err(format!("{other:?} matmuls are not implemented on this backend")),
        }
    }

    // ---- linear algebra ----
    /// c = op(a)·op(b) (+ c if `g.accumulate`), shaped by `g` (see [`Gemm`]); the operand
    /// precision is the backend's (`set_matmul_precision`).
    fn matmul(&self, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf, g: Gemm);
    /// x (rows,cols) += bias (cols) broadcast over rows.
    fn add_row_vector(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize);
    /// out (cols) (+)= sum over rows of x (rows,cols). The bias gradient.
    fn sum_rows(&self, x: &Self::Buf, out: &mut Self::Buf, rows: usize, cols: usize, accumulate: bool);

    // ---- element-wise ----
    /// y = act(x)
    fn activation_forward(&self, act: Activation, x: &Self::Buf, y: &mut Self::Buf);
    /// dx (+)= act'(x)·dy. Returns d(loss)/d(beta) for Swish (0 otherwise).
    fn activation_backward(
        &self,
        act: Activation,
        x: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> f32;
    /// y += alpha·x
    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf);
    /// x *= alpha
    fn scale(&self, x: &mut Self::Buf, alpha: f32);
    /// out = a ⊙ b (Hadamard)
    fn mul(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf);
    /// out (+)= a ⊙ b
    fn mul_acc(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf);
    /// Σ x², accumulated in f64.
    fn sum_squares(&self, x: &Self::Buf) -> f64;
    /// dst = sign(src) (0 at 0), scaled: dst += alpha·sign(src). The L1 sub-gradient.
    fn add_sign(&self, alpha: f32, src: &Self::Buf, dst: &mut Self::Buf);

    // ---- losses ----
    /// Fused, max-subtracted softmax cross-entropy over rows of `logits` (rows,classes).
    /// Writes d(loss)/d(logits) into `dlogits`, where loss = Σ_i w(t_i)·(-log p_i[t_i]) · grad_scale.
    /// Returns (Σ_i w(t_i)·(-log p_i[t_i]), number of rows whose argmax == target).
    #[allow(clippy::too_many_arguments)]
    fn softmax_cross_entropy(
        &self,
        logits: &Self::Buf,
        targets: &[u32],
        class_weights: Option<&[f32]>,
        dlogits: &mut Self::Buf,
        rows: usize,
        classes: usize,
        grad_scale: f32,
    ) -> (f64, usize);
    /// Row-wise softmax (rows,classes) -> probabilities.
    fn softmax(&self, logits: &Self::Buf, probs: &mut Self::Buf, rows: usize, classes: usize);

    // ---- sliding windows (NHWC) ----
    // Defaults go through the host with the reference loops of `window`; a backend
    // overrides them with its own kernels. `argmax` holds u32 indices stored as f32 bits.

    /// cols (N·OH·OW, KH·KW·cg) ← patches of channels [c0, c0+cg) of x (N, H, W, C).
    fn im2col(&self, x: &Self::Buf, win: &Window, n: usize, c0: usize, cg: usize, cols: &mut Self::Buf) {
        let mut host = vec![0.0; n * win.out_h() * win.out_w() * win.kh * win.kw * cg];
        window::im2col(&self.download(x), win, n, c0, cg, &mut host);
        *cols = self.upload(&host);
    }
    /// dx channels [c0, c0+cg) += col2im(dcols).
    fn col2im(&self, dcols: &Self::Buf, win: &Window, n: usize, c0: usize, cg: usize, dx: &mut Self::Buf) {
        let mut host = self.download(dx);
        window::col2im(&self.download(dcols), win, n, c0, cg, &mut host);
        *dx = self.upload(&host);
    }
    fn max_pool_forward(&self, x: &Self::Buf, win: &Window, n: usize, y: &mut Self::Buf, argmax: &mut Self::Buf) {
        let outs = n * win.out_h() * win.out_w() * win.c;
        let (mut hy, mut ha) = (vec![0.0; outs], vec![0u32; outs]);
        window::max_pool_forward(&self.download(x), win, n, &mut hy, &mut ha);
        *y = self.upload(&hy);
        *argmax = self.upload(&ha.iter().map(|&i| f32::from_bits(i)).collect::<Vec<_>>());
    }
    fn max_pool_backward(&self, dy: &Self::Buf, argmax: &Self::Buf, dx: &mut Self::Buf) {
        let idx: Vec<u32> = self.download(argmax).iter().map(|v| v.to_bits()).collect();
        let mut host = self.download(dx);
        window::max_pool_backward(&self.download(dy), &idx, &mut host);
        *dx = self.upload(&host);
    }
    fn avg_pool_forward(&self, x: &Self::Buf, win: &Window, n: usize, y: &mut Self::Buf) {
        let mut hy = vec![0.0; n * win.out_h() * win.out_w() * win.c];
        window::avg_pool_forward(&self.download(x), win, n, &mut hy);
        *y = self.upload(&hy);
    }
    fn avg_pool_backward(&self, dy: &Self::Buf, win: &Window, n: usize, dx: &mut Self::Buf) {
        let mut host = self.download(dx);
        window::avg_pool_backward(&self.download(dy), win, n, &mut host);
        *dx = self.upload(&host);
    }
    /// dst[r, d0..d0+k] (+)= src[r, s0..s0+k] for `rows` rows.
    #[allow(clippy::too_many_arguments)]
    fn copy_columns(
        &self,
        src: &Self::Buf,
        src_w: usize,
        s0: usize,
        dst: &mut Self::Buf,
        dst_w: usize,
        d0: usize,
        k: usize,
        rows: usize,
        accumulate: bool,
    ) {
        let mut host = self.download(dst);
        window::copy_columns(&self.download(src), src_w, s0, &mut host, dst_w, d0, k, rows, accumulate);
        *dst = self.upload(&host);
    }

    // ---- normalisation (T10, T11); defaults go through the host like the window ops ----

    /// Row-wise LayerNorm of x (rows, cols); writes y, x̂ (rows, cols) and rstd (rows).
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_forward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        rows: usize,
        cols: usize,
        eps: f32,
        y: &mut Self::Buf,
        xhat: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) {
        let (mut hy, mut hh, mut hr) = (vec![0.0; rows * cols], vec![0.0; rows * cols], vec![0.0; rows]);
        let (hg, hb) = (self.download(gamma), self.download(beta));
        norm::layer_norm_forward(&self.download(x), &hg, &hb, rows, cols, eps, &mut hy, &mut hh, &mut hr);
        (*y, *xhat, *rstd) = (self.upload(&hy), self.upload(&hh), self.upload(&hr));
    }
    /// dx (rows, cols); dgamma, dbeta (cols) accumulated.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        dy: &Self::Buf,
        xhat: &Self::Buf,
        rstd: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
    ) {
        let (mut hdx, mut hdg, mut hdb) = (vec![0.0; rows * cols], self.download(dgamma), self.download(dbeta));
        let (hdy, hh, hr, hg) = (self.download(dy), self.download(xhat), self.download(rstd), self.download(gamma));
        norm::layer_norm_backward(&hdy, &hh, &hr, &hg, rows, cols, &mut hdx, &mut hdg, &mut hdb);
        (*dx, *dgamma, *dbeta) = (self.upload(&hdx), self.upload(&hdg), self.upload(&hdb));
    }
    /// Per-column mean and biased variance of x (rows, cols), in f64 on the host.
    fn column_stats(&self, x: &Self::Buf, rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
        norm::column_stats(&self.download(x), rows, cols)
    }
    /// BatchNorm with the given per-column statistics; writes y and x̂.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_apply(
        &self,
        x: &Self::Buf,
        mean: &[f64],
        var: &[f64],
        gamma: &Self::Buf,
        beta: &Self::Buf,
        rows: usize,
        cols: usize,
        eps: f32,
        y: &mut Self::Buf,
        xhat: &mut Self::Buf,
    ) {
        let (mut hy, mut hh) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
        let (hg, hb) = (self.download(gamma), self.download(beta));
        norm::batch_norm_apply(&self.download(x), mean, var, &hg, &hb, rows, cols, eps, &mut hy, &mut hh);
        (*y, *xhat) = (self.upload(&hy), self.upload(&hh));
    }
    /// Training-mode BatchNorm backward, first half: returns per channel (Σ γ·dy, Σ γ·dy·x̂)
    /// and accumulates dgamma, dbeta. A synchronised BatchNorm sums the two across workers
    /// before the second half.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward_sums(
        &self,
        dy: &Self::Buf,
        xhat: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut hdg, mut hdb) = (self.download(dgamma), self.download(dbeta));
        let (hdy, hh, hg) = (self.download(dy), self.download(xhat), self.download(gamma));
        let sums = norm::batch_norm_backward_sums(&hdy, &hh, &hg, rows, cols, &mut hdg, &mut hdb);
        (*dgamma, *dbeta) = (self.upload(&hdg), self.upload(&hdb));
        sums
    }
    /// Second half: dx from the batch means of γ·dy and γ·dy·x̂.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward_dx(
        &self,
        dy: &Self::Buf,
        xhat: &Self::Buf,
        var: &[f64],
        gamma: &Self::Buf,
        means: (&[f64], &[f64]),
        rows: usize,
        cols: usize,
        eps: f32,
        dx: &mut Self::Buf,
    ) {
        let mut hdx = vec![0.0; rows * cols];
        let (hdy, hh, hg) = (self.download(dy), self.download(xhat), self.download(gamma));
        norm::batch_norm_backward_dx(&hdy, &hh, var, &hg, means.0, means.1, rows, cols, eps, &mut hdx);
        *dx = self.upload(&hdx);
    }

    /// Softmax backward per row: ds = p ⊙ (dp − Σ_j dp_j p_j).
    fn softmax_backward(&self, p: &Self::Buf, dp: &Self::Buf, ds: &mut Self::Buf, rows: usize, cols: usize) {
        let (hp, hdp) = (self.download(p), self.download(dp));
        let mut out = vec![0.0; rows * cols];
        cpu::softmax_backward_rows(&hp, &hdp, &mut out, rows, cols);
        *ds = self.upload(&out);
    }

    // ---- attention core (T15) ----

    /// For each of the `n` examples: out (T, D) and probs (H, T, T) from qkv (T, 3D), see
    /// [`attention::attention_forward`]. `lens[i]` is example i's valid length.
    fn attention_forward(
        &self,
        qkv: &Self::Buf,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        dims: &AttentionDims,
        lens: &[usize],
    ) {
        let (nq, no, np) = dims.per_example();
        let hq = self.download(qkv);
        let (mut ho, mut hp) = (vec![0.0; lens.len() * no], vec![0.0; lens.len() * np]);
        for (i, &len) in lens.iter().enumerate() {
            let (o, p) = (&mut ho[i * no..(i + 1) * no], &mut hp[i * np..(i + 1) * np]);
            attention::attention_forward(&hq[i * nq..(i + 1) * nq], o, p, dims, len);
        }
        (*out, *probs) = (self.upload(&ho), self.upload(&hp));
    }
    /// dqkv (N, T, 3D) from dout (N, T, D) and the forward's qkv and probs.
    fn attention_backward(
        &self,
        qkv: &Self::Buf,
        probs: &Self::Buf,
        dout: &Self::Buf,
        dqkv: &mut Self::Buf,
        dims: &AttentionDims,
        lens: &[usize],
    ) {
        let (nq, no, np) = dims.per_example();
        let (hq, hp, hdo) = (self.download(qkv), self.download(probs), self.download(dout));
        let mut hdq = vec![0.0; lens.len() * nq];
        for (i, &len) in lens.iter().enumerate() {
            let (q, p, d_o) = (&hq[i * nq..(i + 1) * nq], &hp[i * np..(i + 1) * np], &hdo[i * no..(i + 1) * no]);
            attention::attention_backward(q, p, d_o, &mut hdq[i * nq..(i + 1) * nq], dims, len);
        }
        *dqkv = self.upload(&hdq);
    }

    // ---- recurrent cells (T17); defaults go through the host with `recurrent`'s loops ----

    /// LSTM step: gates (N, 4H), c and h (N, H) from pre-activations and c_prev.
    fn lstm_forward(
        &self,
        pre: &Self::Buf,
        c_prev: &Self::Buf,
        gates: &mut Self::Buf,
        c: &mut Self::Buf,
        h: &mut Self::Buf,
        hidden: usize,
    ) {
        let (hp, hc) = (self.download(pre), self.download(c_prev));
        let (mut hg, mut hcn, mut hh) = (vec![0.0; hp.len()], vec![0.0; hc.len()], vec![0.0; hc.len()]);
        recurrent::lstm_forward(&hp, &hc, &mut hg, &mut hcn, &mut hh, hidden);
        (*gates, *c, *h) = (self.upload(&hg), self.upload(&hcn), self.upload(&hh));
    }
    /// LSTM step backward: dpre (N, 4H); `dc` is dL/dc on entry, dL/dc_prev on exit.
    #[allow(clippy::too_many_arguments)]
    fn lstm_backward(
        &self,
        gates: &Self::Buf,
        c_prev: &Self::Buf,
        c: &Self::Buf,
        dh: &Self::Buf,
        dc: &mut Self::Buf,
        dpre: &mut Self::Buf,
        hidden: usize,
    ) {
        let (hg, hcp, hc, hdh) = (self.download(gates), self.download(c_prev), self.download(c), self.download(dh));
        let (mut hdc, mut hdp) = (self.download(dc), vec![0.0; hg.len()]);
        recurrent::lstm_backward(&hg, &hcp, &hc, &hdh, &mut hdc, &mut hdp, hidden);
        (*dc, *dpre) = (self.upload(&hdc), self.upload(&hdp));
    }
    /// GRU step: gates [r z n] (N, 3H) and h (N, H).
    fn gru_forward(
        &self,
        xp: &Self::Buf,
        hp: &Self::Buf,
        h_prev: &Self::Buf,
        gates: &mut Self::Buf,
        h: &mut Self::Buf,
        hidden: usize,
    ) {
        let (hx, hh, hpr) = (self.download(xp), self.download(hp), self.download(h_prev));
        let (mut hg, mut ho) = (vec![0.0; hx.len()], vec![0.0; hpr.len()]);
        recurrent::gru_forward(&hx, &hh, &hpr, &mut hg, &mut ho, hidden);
        (*gates, *h) = (self.upload(&hg), self.upload(&ho));
    }
    /// GRU step backward: dxp, dhp (N, 3H) and the direct part of dh_prev (N, H).
    #[allow(clippy::too_many_arguments)]
    fn gru_backward(
        &self,
        gates: &Self::Buf,
        hp: &Self::Buf,
        h_prev: &Self::Buf,
        dh: &Self::Buf,
        dxp: &mut Self::Buf,
        dhp: &mut Self::Buf,
        dh_prev: &mut Self::Buf,
        hidden: usize,
    ) {
        let (hg, hh, hpr, hdh) = (self.download(gates), self.download(hp), self.download(h_prev), self.download(dh));
        let (mut a, mut b, mut c) = (vec![0.0; hg.len()], vec![0.0; hg.len()], vec![0.0; hdh.len()]);
        recurrent::gru_backward(&hg, &hh, &hpr, &hdh, &mut a, &mut b, &mut c, hidden);
        (*dxp, *dhp, *dh_prev) = (self.upload(&a), self.upload(&b), self.upload(&c));
    }

    // ---- embedding (T13) ----

    /// out (len(ids), dim) ← rows `ids` of table (vocab, dim).
    fn embedding_forward(&self, table: &Self::Buf, ids: &[u32], dim: usize, out: &mut Self::Buf) {
        let t = self.download(table);
        let mut host = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            host.extend_from_slice(&t[id as usize * dim..(id as usize + 1) * dim]);
        }
        *out = self.upload(&host);
    }
    /// dtable rows `ids` += dy rows: a sparse gradient, accumulated in id order.
    fn embedding_backward(&self, dy: &Self::Buf, ids: &[u32], dim: usize, dtable: &mut Self::Buf) {
        let d = self.download(dy);
        let mut host = self.download(dtable);
        for (i, &id) in ids.iter().enumerate() {
            for (t, g) in host[id as usize * dim..(id as usize + 1) * dim].iter_mut().zip(&d[i * dim..(i + 1) * dim]) {
                *t += g;
            }
        }
        *dtable = self.upload(&host);
    }

    // ---- optimizer ----
    /// One update of `param` from `grad_scale·grad` with learning rate `lr`; `state1`/`state2`
    /// are the rule's moment buffers (unused ones may be empty). Folding the scale (1/batch,
    /// clipping) in here saves a full pass over the gradients.
    #[allow(clippy::too_many_arguments)]
    fn optimizer_step(
        &self,
        rule: UpdateRule,
        lr: f32,
        grad_scale: f32,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        state1: &mut Self::Buf,
        state2: &mut Self::Buf,
    );
}

/// Number format of matmul operands and outputs (T25).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl MatmulPrecision {
    /// `x` rounded (to nearest even) to this format and back: fp16 overflows to ±inf above
    /// 65504, bf16 keeps fp32's range with 8 significant bits.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            Self::Fp32 => x,
            Self::Bf16 => half::bf16::from_f32(x).to_f32(),
            Self::Fp16 => half::f16::from_f32(x).to_f32(),
        }
    }
}
