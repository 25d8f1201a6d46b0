//! lockstep-kernels: the `Backend` trait (the narrow set of ops the layers need) and its
//! CPU implementation, which is the reference every other backend is tested against.
//!
//! Buffers are flat `f32` arrays; shapes live one level up, in `lockstep-nn`'s `Tensor`.
//! Matrices are row-major. Every op documents the shapes it expects in `// (rows, cols)`.

pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod bf16_gemm;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod fast_math;
pub mod isa;
pub mod norm;
pub mod peak;
pub mod philox;
pub mod recurrent;
pub mod rotary;
pub mod skinny;
pub mod transpose;
pub mod vector;
pub mod window;

pub use attention::AttentionDims;
pub use cpu::CpuBackend;
pub use error::{check_row_range, need_len, KernelError, Result};
pub use rotary::Rotary;
use std::ops::Range;

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
    /// Operand and output format of this product; None: the backend's
    /// (`Backend::set_matmul_precision`, the job's `precision.compute`).
    pub precision: Option<MatmulPrecision>,
}

impl Gemm {
    /// a·b.
    pub fn nn(m: usize, k: usize, n: usize) -> Self {
        Self { m, k, n, trans_a: false, trans_b: false, accumulate: false, precision: None }
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
    /// This product in `precision`, whatever the backend's setting.
    pub fn in_precision(self, precision: MatmulPrecision) -> Self {
        Self { precision: Some(precision), ..self }
    }
}

/// The ops every backend provides. `Buf` is a device buffer of `f32`.
///
/// The trait is deliberately narrow: layers compose these ops; a new backend implements
/// every one (or answers [`KernelError::Unsupported`] with the op's name) and is checked op
/// by op against [`CpuBackend`]. No op has a default body: nothing moves through the host
/// unless a backend says so in its own code.
pub trait Backend: Send + Sync + 'static {
    type Buf: Send + Sync;

    fn name(&self) -> String;
    /// Number of `f32`s in `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;

    /// Waits for the queued ops and reports an asynchronous device fault (a kernel that
    /// failed after its launch returned).
    fn check(&self) -> Result<()>;

    // ---- memory ----
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// As `upload`, taking the host vector: a host backend keeps it without a copy.
    fn upload_vec(&self, data: Vec<f32>) -> Result<Self::Buf> {
        self.upload(&data)
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// buf[offset..offset + data.len()] = data: into an existing buffer, no allocation.
    fn upload_into(&self, data: &[f32], buf: &mut Self::Buf, offset: usize) -> Result<()>;
    /// out = buf[offset..offset + out.len()], into an existing host slice.
    fn download_into(&self, buf: &Self::Buf, offset: usize, out: &mut [f32]) -> Result<()>;
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf) -> Result<()>;
    /// A new buffer with `src`'s contents (one pass: no zero-fill, then copy).
    fn duplicate(&self, src: &Self::Buf) -> Result<Self::Buf>;
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()>;
    /// dst[dst_off..dst_off+len] = src[src_off..src_off+len]
    fn copy_range(
        &self,
        src: &Self::Buf,
        src_off: usize,
        dst: &mut Self::Buf,
        dst_off: usize,
        len: usize,
    ) -> Result<()>;

    /// Sets the format of matmul operands and outputs (T25); accumulation stays fp32.
    fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<()>;

    // ---- linear algebra ----
    /// c = op(a)·op(b) (+ c if `g.accumulate`), shaped by `g` (see [`Gemm`]); the operand
    /// precision is the backend's (`set_matmul_precision`).
    fn matmul(&self, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf, g: Gemm) -> Result<()>;
    /// Rows `rows` of that product alone, `g` shaped for the whole of it; the other rows of
    /// c are left as they are. A weight gradient in pieces (`Linear::backward_in_pieces`).
    fn matmul_rows(&self, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf, g: Gemm, rows: Range<usize>) -> Result<()>;
    /// A new buffer (rows, cols) whose every row is `row` (cols): a layer's output that a GEMM
    /// then accumulates into (bias + x·Wᵀ), with no zero-fill first.
    fn repeat_rows(&self, row: &Self::Buf, rows: usize) -> Result<Self::Buf>;
    /// x (rows,cols) += bias (cols) broadcast over rows.
    fn add_row_vector(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize) -> Result<()>;
    /// out (cols) (+)= sum over rows of x (rows,cols). The bias gradient.
    fn sum_rows(&self, x: &Self::Buf, out: &mut Self::Buf, rows: usize, cols: usize, accumulate: bool) -> Result<()>;

    // ---- element-wise ----
    /// y = act(x)
    fn activation_forward(&self, act: Activation, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// dx (+)= act'(x)·dy. Returns d(loss)/d(beta) for Swish (0 otherwise).
    fn activation_backward(
        &self,
        act: Activation,
        x: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<f32>;
    /// y += alpha·x
    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// x *= alpha
    fn scale(&self, x: &mut Self::Buf, alpha: f32) -> Result<()>;
    /// out = a ⊙ b (Hadamard)
    fn mul(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf) -> Result<()>;
    /// out (+)= a ⊙ b
    fn mul_acc(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf) -> Result<()>;
    /// Σ x², accumulated in f64.
    fn sum_squares(&self, x: &Self::Buf) -> Result<f64>;
    /// dst += alpha·sign(src) (0 at 0). The L1 sub-gradient.
    fn add_sign(&self, alpha: f32, src: &Self::Buf, dst: &mut Self::Buf) -> Result<()>;

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
    ) -> Result<(f64, usize)>;
    /// Row-wise softmax (rows,classes) -> probabilities.
    fn softmax(&self, logits: &Self::Buf, probs: &mut Self::Buf, rows: usize, classes: usize) -> Result<()>;
    /// Softmax backward per row: ds = p ⊙ (dp − Σ_j dp_j p_j).
    fn softmax_backward(
        &self,
        p: &Self::Buf,
        dp: &Self::Buf,
        ds: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    // ---- sliding windows (NHWC); `argmax` holds u32 indices stored as f32 bits ----

    /// cols (N·OH·OW, KH·KW·cg) ← patches of channels [c0, c0+cg) of x (N, H, W, C).
    fn im2col(&self, x: &Self::Buf, win: &Window, n: usize, c0: usize, cg: usize, cols: &mut Self::Buf) -> Result<()>;
    /// dx channels [c0, c0+cg) += col2im(dcols).
    fn col2im(&self, dcols: &Self::Buf, win: &Window, n: usize, c0: usize, cg: usize, dx: &mut Self::Buf)
        -> Result<()>;
    fn max_pool_forward(
        &self,
        x: &Self::Buf,
        win: &Window,
        n: usize,
        y: &mut Self::Buf,
        argmax: &mut Self::Buf,
    ) -> Result<()>;
    fn max_pool_backward(&self, dy: &Self::Buf, argmax: &Self::Buf, dx: &mut Self::Buf) -> Result<()>;
    fn avg_pool_forward(&self, x: &Self::Buf, win: &Window, n: usize, y: &mut Self::Buf) -> Result<()>;
    fn avg_pool_backward(&self, dy: &Self::Buf, win: &Window, n: usize, dx: &mut Self::Buf) -> Result<()>;
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
    ) -> Result<()>;

    // ---- normalisation (T10, T11) ----

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
    ) -> Result<()>;
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
    ) -> Result<()>;
    /// Row-wise RMSNorm of x (rows, cols): y = gamma·x/rms(x); writes y, x̂ and rstd (rows).
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_forward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
        eps: f32,
        y: &mut Self::Buf,
        xhat: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Result<()>;
    /// dx (rows, cols); dgamma (cols) accumulated.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward(
        &self,
        dy: &Self::Buf,
        xhat: &Self::Buf,
        rstd: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
    ) -> Result<()>;
    /// Per-column mean and biased variance of x (rows, cols), in f64 on the host.
    fn column_stats(&self, x: &Self::Buf, rows: usize, cols: usize) -> Result<(Vec<f64>, Vec<f64>)>;
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
    ) -> Result<()>;
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
    ) -> Result<(Vec<f64>, Vec<f64>)>;
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
    ) -> Result<()>;

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
    ) -> Result<()>;
    /// dqkv (N, T, 3D) from dout (N, T, D) and the forward's qkv and probs.
    fn attention_backward(
        &self,
        qkv: &Self::Buf,
        probs: &Self::Buf,
        dout: &Self::Buf,
        dqkv: &mut Self::Buf,
        dims: &AttentionDims,
        lens: &[usize],
    ) -> Result<()>;

    /// Rotates Q and K of qkv (rows, 3D) in place by their positions (RoPE, see
    /// [`rotary::rotate`]); `inverse` turns gradients back.
    fn rotary(&self, qkv: &mut Self::Buf, rot: &Rotary, inverse: bool) -> Result<()>;
    /// Causal attention of positions start..len of one sequence against the keys and values
    /// of positions 0..len, all in `cache` (len, 3D); out (len − start, D). See
    /// [`attention::attention_cached`].
    fn attention_cached(
        &self,
        cache: &Self::Buf,
        len: usize,
        start: usize,
        out: &mut Self::Buf,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    // ---- recurrent cells (T17) ----

    /// LSTM step: gates (N, 4H), c and h (N, H) from pre-activations and c_prev.
    fn lstm_forward(
        &self,
        pre: &Self::Buf,
        c_prev: &Self::Buf,
        gates: &mut Self::Buf,
        c: &mut Self::Buf,
        h: &mut Self::Buf,
        hidden: usize,
    ) -> Result<()>;
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
    ) -> Result<()>;
    /// GRU step: gates [r z n] (N, 3H) and h (N, H).
    fn gru_forward(
        &self,
        xp: &Self::Buf,
        hp: &Self::Buf,
        h_prev: &Self::Buf,
        gates: &mut Self::Buf,
        h: &mut Self::Buf,
        hidden: usize,
    ) -> Result<()>;
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
    ) -> Result<()>;

    // ---- embedding (T13) ----

    /// out (len(ids), dim) ← rows `ids` of table (vocab, dim).
    fn embedding_forward(&self, table: &Self::Buf, ids: &[u32], dim: usize, out: &mut Self::Buf) -> Result<()>;
    /// dtable rows `ids` += dy rows: a sparse gradient, accumulated in id order.
    fn embedding_backward(&self, dy: &Self::Buf, ids: &[u32], dim: usize, dtable: &mut Self::Buf) -> Result<()>;

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
    ) -> Result<()>;
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
