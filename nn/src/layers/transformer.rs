use super::{Act, AttentionShape, ForwardCtx, Layer, LayerNorm, Linear, MultiHeadAttention, Param};
use crate::{ops, Result, Tensor};
use lockstep_kernels::{Activation, Backend};

/// Where the LayerNorms sit in a transformer block (T16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormOrder {
    /// x + Attn(LN(x)), then h + MLP(LN(h)) (GPT-2).
    PreLn,
    /// LN(x + Attn(x)), then LN(h + MLP(h)) (the original transformer).
    PostLn,
}

/// A transformer block on (N, T, D): self-attention and a GELU MLP (D → 4D → D), each
/// wrapped in a residual connection (T12): y = F(x) + x, so dL/dx = dL/dy·(dF/dx + I).
pub struct TransformerBlock<B: Backend> {
    name: String,
    pub order: NormOrder,
    pub ln1: LayerNorm<B>,
    pub attn: MultiHeadAttention<B>,
    pub ln2: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub act: Act<B>,
    pub fc2: Linear<B>,
}

/// Initial weights of one block, row-major as each `Linear` stores them.
pub struct BlockWeights<'a> {
    pub qkv: &'a [f32],
    pub attn_out: &'a [f32],
    pub fc1: &'a [f32],
    pub fc2: &'a [f32],
}

impl<B: Backend> TransformerBlock<B> {
    pub fn new(be: &B, name: &str, shape: AttentionShape, order: NormOrder, w: BlockWeights<'_>) -> Result<Self> {
        let d = shape.dim;
        Ok(Self {
            name: name.to_string(),
            order,
            ln1: LayerNorm::new(be, &format!("{name}.ln1"), d)?,
            attn: MultiHeadAttention::new(be, &format!("{name}.attn"), shape, w.qkv, w.attn_out)?,
            ln2: LayerNorm::new(be, &format!("{name}.ln2"), d)?,
            fc1: Linear::new(be, &format!("{name}.fc1"), d, 4 * d, w.fc1)?,
            act: Act::new(&format!("{name}.gelu"), Activation::Gelu, 4 * d),
            fc2: Linear::new(be, &format!("{name}.fc2"), 4 * d, d, w.fc2)?,
        })
    }

    fn mlp_forward(&mut self, be: &B, x: Tensor<B>, ctx: &ForwardCtx) -> Result<Tensor<B>> {
        let h = self.fc1.forward(be, x, ctx)?;
        let h = self.act.forward(be, h, ctx)?;
        self.fc2.forward(be, h, ctx)
    }

    fn mlp_backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        let d = self.fc2.backward(be, dy)?;
        let d = self.act.backward(be, d)?;
        self.fc1.backward(be, d)
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
                let m = self.mlp_forward(be, m, ctx)?;
                ops::add(be, &h, &m) // y = h + MLP(LN2(h))
            }
            NormOrder::PostLn => {
                let a = self.attn.forward(be, x.duplicate(be)?, ctx)?;
                let h = self.ln1.forward(be, ops::add(be, &x, &a)?, ctx)?; // h = LN1(x + Attn(x))
                let m = self.mlp_forward(be, h.duplicate(be)?, ctx)?;
                self.ln2.forward(be, ops::add(be, &h, &m)?, ctx) // y = LN2(h + MLP(h))
            }
        }
    }

    fn backward(&mut self, be: &B, dy: Tensor<B>) -> Result<Tensor<B>> {
        match self.order {
            NormOrder::PreLn => {
                // dh = dy + LN2ᵀ MLPᵀ dy; dx = dh + LN1ᵀ Attnᵀ dh
                let d_m = self.mlp_backward(be, dy.duplicate(be)?)?;
                let dh = ops::add(be, &dy, &self.ln2.backward(be, d_m)?)?;
                let d_a = self.attn.backward(be, dh.duplicate(be)?)?;
                ops::add(be, &dh, &self.ln1.backward(be, d_a)?)
            }
            NormOrder::PostLn => {
                // du = LN2ᵀ dy; dh = du + MLPᵀ du; dv = LN1ᵀ dh; dx = dv + Attnᵀ dv
                let du = self.ln2.backward(be, dy)?;
                let dh = ops::add(be, &du, &self.mlp_backward(be, du.duplicate(be)?)?)?;
                let dv = self.ln1.backward(be, dh)?;
                ops::add(be, &dv, &self.attn.backward(be, dv.duplicate(be)?)?)
            }
        }
    }

    fn params(&self) -> Vec<&Param<B>> {
        let mut p = self.ln1.params();
        p.extend(self.attn.params());
        p.extend(self.ln2.params());
        p.extend(self.fc1.params());
        p.extend(self.fc2.params());
        p
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut p = self.ln1.params_mut();
        p.extend(self.attn.params_mut());
        p.extend(self.ln2.params_mut());
        p.extend(self.fc1.params_mut());
        p.extend(self.fc2.params_mut());
        p
    }
    fn flops_per_example(&self) -> u64 {
        let t = self.attn.max_len as u64;
        self.attn.flops_per_example()
            + t * (self.fc1.flops_per_example() + self.fc2.flops_per_example() + self.act.flops_per_example())
            + t * (self.ln1.flops_per_example() + self.ln2.flops_per_example())
    }
}

/// Gradient checks against finite differences, and known values (the checker is
/// `crate::gradcheck`).
#[cfg(test)]
mod gradient_tests {
    use crate::gradcheck::{check_layer_step, test_input as input};
    use crate::layers::{AttentionShape, BlockWeights, NormOrder, TransformerBlock};

    use crate::{ForwardCtx, Layer, Tensor};
    use lockstep_kernels::CpuBackend;

    fn block(order: NormOrder) -> TransformerBlock<CpuBackend> {
        let be = CpuBackend::new(1);
        let w = |n: usize, salt: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32) * salt).sin() * 0.4).collect() };
        let (qkv, attn_out, fc1, fc2) = (w(12 * 4, 0.37), w(16, 0.53), w(16 * 4, 0.29), w(4 * 16, 0.61));
        let shape = AttentionShape { dim: 4, heads: 2, causal: true, max_len: 8 };
        TransformerBlock::new(
            &be,
            "block",
            shape,
            order,
            BlockWeights { qkv: &qkv, attn_out: &attn_out, fc1: &fc1, fc2: &fc2 },
        )
        .unwrap()
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
        for order in [NormOrder::PreLn, NormOrder::PostLn] {
            let mut b = block(order);
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
