use super::{cached, ForwardCtx, Layer, Linear, Param};
use crate::{shape_err, Result, Tensor};
use lockstep_kernels::{AttentionDims, Backend, Rotary};

/// Multi-head scaled dot-product self-attention on (N, T, D) (T15):
/// [Q K V] = x·W_qkvᵀ + b, per head softmax(Q Kᵀ/√d_k + mask)·V, heads concatenated, then
/// the output projection. The mask hides future positions (causal) and padding (positions
/// at or after `ForwardCtx::seq_lens[n]`); masked keys get probability exactly 0. The core
/// is one backend op over the whole batch (`Backend::attention_forward`). Cost per example: O(T²·D) for the scores and
/// O(T·D²) for the projections (see `flops_per_example`).
pub struct MultiHeadAttention<B: Backend> {
    name: String,
    pub dim: usize,
    pub heads: usize,
    pub causal: bool,
    pub max_len: usize,
    /// RoPE frequency base: Q and K are rotated by position (LLaMA); None leaves positions
    /// to an embedding before the blocks.
    pub rope: Option<f32>,
    pub qkv: Linear<B>, // D -> 3D
    pub out: Linear<B>, // D -> D
    cache: Option<AttentionCache<B>>,
    kv_cache: Option<KvCache<B>>,
}

/// What backward needs from a training forward.
struct AttentionCache<B: Backend> {
    dims: AttentionDims,
    /// Valid length of each example.
    lens: Vec<usize>,
    /// The projected [Q | K | V], (N, T, 3D), Q and K rotated under RoPE.
    qkv: B::Buf,
    /// The attention probabilities, (N, H, T, T).
    probs: B::Buf,
}

/// The [Q | K | V] rows of the positions decoded so far, (max_len, 3D), of which `len`
/// are filled (`ForwardCtx::decode_from`). Q is kept with K and V so a call appends its
/// rows with one contiguous copy.
struct KvCache<B: Backend> {
    rows: B::Buf,
    len: usize,
}

/// Width, heads, masking, longest sequence, and the options of LLaMA-style blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    pub dim: usize,
    pub heads: usize,
    pub causal: bool,
    pub max_len: usize,
    /// RoPE frequency base (10000 in LLaMA); None: no rotation.
    pub rope: Option<f32>,
    /// Biases in the Q/K/V and output projections.
    pub bias: bool,
}

impl AttentionConfig {
    /// GPT-2's attention: biases, no rotation.
    pub fn gpt(dim: usize, heads: usize, causal: bool, max_len: usize) -> Self {
        Self { dim, heads, causal, max_len, rope: None, bias: true }
    }
}

impl<B: Backend> MultiHeadAttention<B> {
    /// `w_qkv` is (3D, D), `w_out` (D, D), both row-major as in `Linear`.
    pub fn new(be: &B, name: &str, config: AttentionConfig, w_qkv: &[f32], w_out: &[f32]) -> Result<Self> {
        let AttentionConfig { dim, heads, causal, max_len, rope, bias } = config;
        Ok(Self {
            name: name.to_string(),
            dim,
            heads,
            causal,
            max_len,
            rope,
            qkv: Linear::with_bias(be, &format!("{name}.qkv"), dim, 3 * dim, w_qkv, bias)?,
            out: Linear::with_bias(be, &format!("{name}.out"), dim, dim, w_out, bias)?,
            cache: None,
            kv_cache: None,
        })
    }

    /// The rotation of `t` positions per sequence starting at `offset`, if RoPE is on.
    fn rotary(&self, t: usize, offset: usize) -> Option<Rotary> {
        let (heads, head_dim) = (self.heads, self.dim / self.heads);
        self.rope.map(|base| Rotary { t, offset, heads, head_dim, base })
    }

    /// Decoding with the KV cache: x (1, T, D) holds positions from..from+T; their rows join
    /// the cache and their queries attend to every cached key (`ForwardCtx::decode_from`).
    fn forward_cached(&mut self, be: &B, x: Tensor<B>, from: usize, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let (t, d) = (x.shape[1], self.dim);
        if x.shape[0] != 1 || ctx.train || from + t > self.max_len || t == 0 {
            return shape_err(
                "MultiHeadAttention::forward",
                format!("{}: cached decoding of {:?} from position {from} (one sequence, not training, at most {} positions)", self.name, x.shape, self.max_len),
            );
        }
        let rot = self.rotary(t, from);
        if from == 0 {
            self.kv_cache = Some(KvCache { rows: be.zeros(self.max_len * 3 * d)?, len: 0 });
        }
        let kv = match self.kv_cache.as_mut() {
            Some(kv) if kv.len == from => kv,
            other => {
                let held = other.map_or(0, |kv| kv.len);
                return shape_err(
                    "MultiHeadAttention::forward",
                    format!("{}: the KV cache holds {held} positions, the input starts at {from}", self.name),
                );
            }
        };
        let mut qkv = self.qkv.forward(be, x, ctx)?; // (1, T, 3D)
        if let Some(rot) = rot {
            be.rotary(&mut qkv.buf, &rot, false)?;
        }
        be.copy_range(&qkv.buf, 0, &mut kv.rows, from * 3 * d, t * 3 * d)?;
        kv.len = from + t;
        let mut o = Tensor::zeros(be, &[1, t, d])?;
        be.attention_cached(&kv.rows, kv.len, from, &mut o.buf, self.heads, d / self.heads)?;
        self.out.forward(be, o, ctx)
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
        let dims = AttentionDims { t, heads: self.heads, head_dim: d / self.heads, causal: self.causal };
        let lens: Vec<usize> =
            if ctx.seq_lens.is_empty() { vec![t; n] } else { ctx.seq_lens.iter().map(|&l| l.min(t)).collect() };
        if let Some(from) = ctx.decode_from {
            return self.forward_cached(be, x, from, ctx);
        }
        let mut qkv = self.qkv.forward(be, x, ctx)?; // (N, T, 3D)
        if let Some(rot) = self.rotary(t, 0) {
            be.rotary(&mut qkv.buf, &rot, false)?;
        }
        let mut o = Tensor::zeros(be, &[n, t, d])?; // heads concatenated
        let mut probs = be.zeros(n * self.heads * t * t)?; // (N, H, T, T)
        be.attention_forward(&qkv.buf, &mut o.buf, &mut probs, &dims, &lens)?;
        if ctx.train {
            self.cache = Some(AttentionCache { dims, lens, qkv: qkv.buf, probs });
        }
        self.out.forward(be, o, ctx)
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let AttentionCache { dims, lens, qkv, probs } = cached(&mut self.cache, &self.name)?;
        let d_o = self.out.backward(be, dy)?; // (N, T, D)
        let mut d_qkv = Tensor::zeros(be, &[lens.len(), dims.t, 3 * self.dim])?;
        be.attention_backward(&qkv, &probs, &d_o.buf, &mut d_qkv.buf, &dims, &lens)?;
        if let Some(rot) = self.rotary(dims.t, 0) {
            be.rotary(&mut d_qkv.buf, &rot, true)?; // d(rotated) → d(projected)
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

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer, test_input as input};
    use crate::layers::{AttentionConfig, MultiHeadAttention};

    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::CpuBackend;

    fn attention(causal: bool) -> MultiHeadAttention<CpuBackend> {
        attention_with(AttentionConfig::gpt(4, 2, causal, 8))
    }

    fn attention_with(config: AttentionConfig) -> MultiHeadAttention<CpuBackend> {
        let be = CpuBackend::new(1);
        let w_qkv: Vec<f32> = (0..12 * 4).map(|i| ((i as f32) * 0.37).sin() * 0.6).collect();
        let w_out: Vec<f32> = (0..4 * 4).map(|i| ((i as f32) * 0.53).cos() * 0.6).collect();
        let mut a = MultiHeadAttention::new(&be, "attn", config, &w_qkv, &w_out).unwrap();
        if let Some(bias) = a.qkv.bias.as_mut() {
            bias.value = (0..12).map(|i| i as f32 * 0.05).collect();
        }
        a
    }

    fn llama_attention() -> MultiHeadAttention<CpuBackend> {
        attention_with(AttentionConfig { rope: Some(10000.0), bias: false, ..AttentionConfig::gpt(4, 2, true, 8) })
    }

    #[test]
    fn rope_attention_without_biases_gradients() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let mut a = llama_attention();
        assert_eq!(a.params().len(), 2, "bias = false leaves the two weights only");
        check_layer(&be, &mut a, &[2, 3, 4], &input(24), &ctx);
        let padded = ForwardCtx { train: true, seq_lens: vec![3, 2], ..Default::default() };
        check_layer(&be, &mut llama_attention(), &[2, 3, 4], &input(24), &padded);
    }

    /// Decoding through the KV cache, a block of positions and then one at a time, gives
    /// the outputs of one full causal forward (with and without RoPE); a gap is refused.
    #[test]
    fn kv_cache_decoding_matches_the_full_forward() {
        let be = CpuBackend::new(1);
        let x = input(7 * 4);
        for mut a in [attention(true), llama_attention()] {
            let full =
                a.forward(&be, Tensor::from_slice(&be, &[1, 7, 4], &x).unwrap(), &ForwardCtx::default()).unwrap();
            let mut decoded = Vec::new();
            for (from, to) in [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)] {
                let ctx = ForwardCtx { decode_from: Some(from), ..Default::default() };
                let xt = Tensor::from_slice(&be, &[1, to - from, 4], &x[from * 4..to * 4]).unwrap();
                decoded.extend(a.forward(&be, xt, &ctx).unwrap().buf);
            }
            for (i, (p, q)) in decoded.iter().zip(&full.buf).enumerate() {
                assert!((p - q).abs() < 1e-5, "rope {:?}, element {i}: cached {p} vs full {q}", a.rope);
            }
            let gap = ForwardCtx { decode_from: Some(3), ..Default::default() };
            assert!(a.forward(&be, Tensor::from_slice(&be, &[1, 1, 4], &x[..4]).unwrap(), &gap).is_err());
        }
    }

    #[test]
    fn attention_gradients_causal_and_padded() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        check_layer(&be, &mut attention(false), &[2, 3, 4], &input(24), &ctx);
        check_layer(&be, &mut attention(true), &[2, 3, 4], &input(24), &ctx);
        let padded = ForwardCtx { train: true, seq_lens: vec![3, 2], ..Default::default() };
        check_layer(&be, &mut attention(true), &[2, 3, 4], &input(24), &padded);
    }

    #[test]
    fn causal_output_ignores_the_future() {
        let be = CpuBackend::new(1);
        let mut a = attention(true);
        let x = input(5 * 4);
        let y = a.forward(&be, Tensor::from_slice(&be, &[1, 5, 4], &x).unwrap(), &ForwardCtx::default()).unwrap();
        for t in 0..5 {
            // Change every token after t: outputs up to t are bitwise unchanged.
            let mut x2 = x.clone();
            x2[(t + 1) * 4..].iter_mut().for_each(|v| *v += 1.0);
            let y2 = a.forward(&be, Tensor::from_slice(&be, &[1, 5, 4], &x2).unwrap(), &ForwardCtx::default()).unwrap();
            assert_eq!(y.buf[..(t + 1) * 4], y2.buf[..(t + 1) * 4], "position {t} saw the future");
            if t < 4 {
                assert_ne!(y.buf[(t + 1) * 4..], y2.buf[(t + 1) * 4..]);
            }
        }
    }

    #[test]
    fn padding_changes_neither_valid_outputs_nor_gradients() {
        let be = CpuBackend::new(1);
        let mut a = attention(false);
        let ctx = ForwardCtx { train: true, seq_lens: vec![2], ..Default::default() };
        let x = input(3 * 4);
        let mut x_other = x.clone();
        x_other[8..].iter_mut().for_each(|v| *v = -*v * 3.0); // a different pad token
        let run = |a: &mut MultiHeadAttention<CpuBackend>, x: &[f32]| {
            let y = a.forward(&be, Tensor::from_slice(&be, &[1, 3, 4], x).unwrap(), &ctx).unwrap();
            for p in a.params_mut() {
                p.grad.fill(0.0);
            }
            // The loss sees valid positions only: dy is zero at the padded position.
            let mut dy = vec![1.0; 12];
            dy[8..].fill(0.0);
            let dx = a.backward(&be, Tensor::from_slice(&be, &[1, 3, 4], &dy).unwrap()).unwrap();
            let grads: Vec<Vec<f32>> = a.params().iter().map(|p| p.grad.clone()).collect();
            (y.buf, dx.buf, grads)
        };
        let (y1, dx1, g1) = run(&mut a, &x);
        let (y2, dx2, g2) = run(&mut a, &x_other);
        assert_eq!(y1[..8], y2[..8], "valid outputs depend on padding");
        assert_eq!(dx1[..8], dx2[..8], "valid input gradients depend on padding");
        assert!(dx1[8..].iter().all(|&v| v == 0.0), "padded positions got a gradient: {:?}", &dx1[8..]);
        assert_eq!(g1, g2, "parameter gradients depend on padding");
    }
}
