use super::{AttentionConfig, ForwardCtx, GeluMlp, Layer, LayerNorm, MultiHeadAttention, Param, SwiGlu};
use crate::{ops, Result, Tensor};
use lockstep_kernels::Backend;

/// Where the LayerNorms sit in a transformer block (T16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormOrder {
    /// x + Attn(LN(x)), then h + MLP(LN(h)) (GPT-2).
    PreLn,
    /// LN(x + Attn(x)), then LN(h + MLP(h)) (the original transformer).
    PostLn,
}

/// The normalisation of a block's sub-layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    LayerNorm,
    /// LLaMA's: no centring, no bias.
    RmsNorm,
}

/// The block's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// GPT-2: fc2(GELU(fc1(x))).
    Gelu,
    /// LLaMA: down(SiLU(gate(x)) ⊙ up(x)).
    SwiGlu,
}

/// Everything that shapes one block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockConfig {
    /// Width, heads, RoPE and biases (the MLP follows `attention.bias` too).
    pub attention: AttentionConfig,
    pub order: NormOrder,
    pub norm: NormKind,
    pub mlp: MlpKind,
    /// Width of the MLP's hidden layer.
    pub hidden: usize,
}

impl BlockConfig {
    /// GPT-2's block: LayerNorm, GELU MLP of width 4D, biases.
    pub fn gpt(attention: AttentionConfig, order: NormOrder) -> Self {
        Self { attention, order, norm: NormKind::LayerNorm, mlp: MlpKind::Gelu, hidden: 4 * attention.dim }
    }
}

/// A transformer block on (N, T, D): self-attention and an MLP, each wrapped in a residual
/// connection (T12): y = F(x) + x, so dL/dx = dL/dy·(dF/dx + I).
pub struct TransformerBlock<B: Backend> {
    name: String,
    pub order: NormOrder,
    pub ln1: Box<dyn Layer<B>>,
    pub attn: MultiHeadAttention<B>,
    pub ln2: Box<dyn Layer<B>>,
    pub mlp: Box<dyn Layer<B>>,
}

/// Initial weights of one block, row-major as each `Linear` stores them. `fc1` is the MLP's
/// first matrix (SwiGLU: `up`), `fc2` its last (`down`); `gate` is SwiGLU's only.
pub struct BlockWeights<'a> {
    pub qkv: &'a [f32],
    pub attn_out: &'a [f32],
    pub fc1: &'a [f32],
    pub fc2: &'a [f32],
    pub gate: &'a [f32],
}

impl<B: Backend> TransformerBlock<B> {
    pub fn new(be: &B, name: &str, config: BlockConfig, w: BlockWeights<'_>) -> Result<Self> {
        let (d, h, bias) = (config.attention.dim, config.hidden, config.attention.bias);
        let norm = |part: &str| -> Result<Box<dyn Layer<B>>> {
            let name = format!("{name}.{part}");
            Ok(match config.norm {
                NormKind::LayerNorm => Box::new(LayerNorm::new(be, &name, d)?),
                NormKind::RmsNorm => Box::new(LayerNorm::rms(be, &name, d)?),
            })
        };
        let mlp: Box<dyn Layer<B>> = match config.mlp {
            // Named after the block, so GPT checkpoints keep `h0.fc1.weight`.
            MlpKind::Gelu => Box::new(GeluMlp::new(be, name, d, h, w.fc1, w.fc2, bias)?),
            MlpKind::SwiGlu => Box::new(SwiGlu::new(be, &format!("{name}.mlp"), d, h, w.gate, w.fc1, w.fc2, bias)?),
        };
        Ok(Self {
            name: name.to_string(),
            order: config.order,
            ln1: norm("ln1")?,
            attn: MultiHeadAttention::new(be, &format!("{name}.attn"), config.attention, w.qkv, w.attn_out)?,
            ln2: norm("ln2")?,
            mlp,
        })
    }
}

impl<B: Backend> Layer<B> for TransformerBlock<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        match self.order {
            NormOrder::PreLn => {
                let a = self.ln1.forward(be, x.duplicate(be)?, ctx)?;
                let a = self.attn.forward(be, a, ctx)?;
                let h = ops::add(be, &x, &a)?; // h = x + Attn(LN1(x))
                let m = self.ln2.forward(be, h.duplicate(be)?, ctx)?;
                let m = self.mlp.forward(be, m, ctx)?;
                ops::add(be, &h, &m) // y = h + MLP(LN2(h))
            }
            NormOrder::PostLn => {
                let a = self.attn.forward(be, x.duplicate(be)?, ctx)?;
                let h = self.ln1.forward(be, ops::add(be, &x, &a)?, ctx)?; // h = LN1(x + Attn(x))
                let m = self.mlp.forward(be, h.duplicate(be)?, ctx)?;
                self.ln2.forward(be, ops::add(be, &h, &m)?, ctx) // y = LN2(h + MLP(h))
            }
        }
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        match self.order {
            NormOrder::PreLn => {
                // dh = dy + LN2ᵀ MLPᵀ dy; dx = dh + LN1ᵀ Attnᵀ dh
                let d_m = self.mlp.backward(be, dy.duplicate(be)?)?;
                let dh = ops::add(be, &dy, &self.ln2.backward(be, d_m)?)?;
                let d_a = self.attn.backward(be, dh.duplicate(be)?)?;
                ops::add(be, &dh, &self.ln1.backward(be, d_a)?)
            }
            NormOrder::PostLn => {
                // du = LN2ᵀ dy; dh = du + MLPᵀ du; dv = LN1ᵀ dh; dx = dv + Attnᵀ dv
                let du = self.ln2.backward(be, dy)?;
                let dh = ops::add(be, &du, &self.mlp.backward(be, du.duplicate(be)?)?)?;
                let dv = self.ln1.backward(be, dh)?;
                ops::add(be, &dv, &self.attn.backward(be, dv.duplicate(be)?)?)
            }
        }
    }

    fn params(&self) -> Vec<&Param<B>> {
        let mut p = self.ln1.params();
        p.extend(self.attn.params());
        p.extend(self.ln2.params());
        p.extend(self.mlp.params());
        p
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut p = self.ln1.params_mut();
        p.extend(self.attn.params_mut());
        p.extend(self.ln2.params_mut());
        p.extend(self.mlp.params_mut());
        p
    }
    fn flops_per_example(&self) -> u64 {
        let t = self.attn.max_len as u64;
        self.attn.flops_per_example()
            + t * self.mlp.flops_per_example()
            + t * (self.ln1.flops_per_example() + self.ln2.flops_per_example())
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer_step, test_input as input};
    use crate::layers::{AttentionConfig, BlockConfig, BlockWeights, MlpKind, NormKind, NormOrder, TransformerBlock};

    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::CpuBackend;

    fn block(order: NormOrder) -> TransformerBlock<CpuBackend> {
        block_with(BlockConfig::gpt(AttentionConfig::gpt(4, 2, true, 8), order))
    }

    fn block_with(config: BlockConfig) -> TransformerBlock<CpuBackend> {
        let be = CpuBackend::new(1);
        let w = |n: usize, salt: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32) * salt).sin() * 0.4).collect() };
        let h = config.hidden;
        let (qkv, attn_out, fc1, fc2, gate) =
            (w(12 * 4, 0.37), w(16, 0.53), w(h * 4, 0.29), w(4 * h, 0.61), w(h * 4, 0.43));
        let weights = BlockWeights { qkv: &qkv, attn_out: &attn_out, fc1: &fc1, fc2: &fc2, gate: &gate };
        TransformerBlock::new(&be, "block", config, weights).unwrap()
    }

    /// LLaMA's block: RMSNorm, RoPE, SwiGLU, no biases.
    fn llama_block() -> TransformerBlock<CpuBackend> {
        let attention = AttentionConfig { rope: Some(10000.0), bias: false, ..AttentionConfig::gpt(4, 2, true, 8) };
        block_with(BlockConfig {
            norm: NormKind::RmsNorm,
            mlp: MlpKind::SwiGlu,
            hidden: 12,
            ..BlockConfig::gpt(attention, NormOrder::PreLn)
        })
    }

    #[test]
    fn llama_block_gradients() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let mut b = llama_block();
        let names: Vec<String> = b.params().iter().map(|p| p.name.clone()).collect();
        let want = ["block.ln1.weight", "block.attn.qkv.weight", "block.attn.out.weight", "block.ln2.weight"];
        assert_eq!(names[..4], want);
        assert_eq!(names[4..], ["block.mlp.gate.weight", "block.mlp.up.weight", "block.mlp.down.weight"]);
        check_layer_step(&be, &mut b, &[2, 3, 4], &input(24), &ctx, true, 3e-2);
    }

    #[test]
    fn transformer_block_gradients_pre_and_post_ln() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        for order in [NormOrder::PreLn, NormOrder::PostLn] {
            // LayerNorm, softmax and GELU are smooth: a larger step keeps f32 noise down.
            check_layer_step(&be, &mut block(order), &[2, 3, 4], &input(24), &ctx, true, 3e-2);
        }
    }

    /// Pre-LN and post-LN both train: Adam on a fixed regression task cuts the loss 5x.
    #[test]
    fn pre_ln_and_post_ln_both_train() {
        use crate::loss::mse;
        use crate::optim::{Optimizer, OptimizerConfig, Rule};
        let be = CpuBackend::new(1);
        let x = Tensor::from_slice(&be, &[4, 5, 4], &input(80)).unwrap();
        let target =
            Tensor::from_slice(&be, &[4, 5, 4], &(0..80).map(|i| ((i as f32) * 0.77).cos() * 0.5).collect::<Vec<_>>())
                .unwrap();
        for mut b in [block(NormOrder::PreLn), block(NormOrder::PostLn), llama_block()] {
            let order = (b.order, b.attn.rope.is_some());
            let cfg = OptimizerConfig {
                rule: Rule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
                l1: 0.0,
                l2: 0.0,
                decay_biases: false,
            };
            let mut opt = Optimizer::new(&be, cfg, &b.params()).unwrap();
            let ctx = ForwardCtx { train: true, ..Default::default() };
            let mut losses = Vec::new();
            for _ in 0..150 {
                for p in b.params_mut() {
                    p.grad.fill(0.0);
                }
                let y = b.forward(&be, x.duplicate(&be).unwrap(), &ctx).unwrap();
                let out = mse(&be, &y, &target, 1.0).unwrap();
                losses.push(out.loss_sum);
                b.backward(&be, out.grad).unwrap();
                opt.step(&be, &mut b.params_mut(), 0.01).unwrap();
            }
            let (first, last) = (losses[0], *losses.last().unwrap());
            println!("{order:?}: loss {first:.3} -> {last:.3}");
            assert!(last < first / 5.0, "{order:?}: loss {first} -> {last}");
        }
    }
}
