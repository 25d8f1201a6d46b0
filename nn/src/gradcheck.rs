//! Central finite-difference checks (T1). The scalar is L = Σ r ⊙ y for a fixed
//! pseudo-random r (or the loss itself), summed in f64 on the host. Each entry must satisfy
//! |analytic − numeric| / max(|analytic|, |numeric|, 2e-2) < 1e-3. The numeric derivative
//! uses the 5-point stencil (8(L(x+h) − L(x−h)) − (L(x+2h) − L(x−2h)))/12h, whose O(h⁴)
//! truncation lets h = 1e-2 stay large enough for f32 rounding to be negligible.

use crate::{ForwardCtx, Layer, Result, Tensor};
use lockstep_kernels::Backend;

pub const F32_REL_TOL: f64 = 1e-3;
const H: f32 = 1e-2;

/// Relative error with a floor on the denominator: the forward runs in f32, so the
/// numeric estimate itself carries an absolute noise of about ε_f32·|L|/h ≈ 1e-5; gradients
/// smaller than 2e-2 are therefore held to an absolute 2e-5 instead of a relative 1e-3.
fn rel_err(a: f64, n: f64) -> f64 {
    (a - n).abs() / a.abs().max(n.abs()).max(2e-2)
}

/// The 5-point central difference of `f` at offset 0 with step `h`.
fn five_point(h: f32, mut f: impl FnMut(f32) -> f64) -> f64 {
    (8.0 * (f(h) - f(-h)) - (f(2.0 * h) - f(-2.0 * h))) / (12.0 * h as f64)
}

fn projection(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i as f32 * 0.618 + 0.1).fract() - 0.5) * 2.0).collect()
}

fn project(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(&y, &r)| y as f64 * r as f64).sum()
}

/// Checks a scalar function's input gradient: `f` returns (L, dL/dx).
pub fn check_input_gradient<B: Backend>(
    be: &B,
    shape: &[usize],
    x: &[f32],
    f: impl Fn(&B, &Tensor<B>) -> Result<(f64, Tensor<B>)>,
) {
    let input = Tensor::from_slice(be, shape, x);
    let (_, grad) = f(be, &input).expect("forward");
    let grad = grad.to_vec(be);
    for i in 0..x.len() {
        let numeric = five_point(H, |d| {
            let mut xd = x.to_vec();
            xd[i] += d;
            f(be, &Tensor::from_slice(be, shape, &xd)).expect("forward").0
        });
        let e = rel_err(grad[i] as f64, numeric);
        assert!(e < F32_REL_TOL, "dL/dx[{i}]: analytic {} numeric {numeric} rel err {e:.2e}", grad[i]);
    }
}

/// Checks a layer's dL/dx and every parameter gradient against central differences.
pub fn check_layer<B: Backend>(be: &B, layer: &mut dyn Layer<B>, shape: &[usize], x: &[f32], ctx: &ForwardCtx) {
    check_layer_step(be, layer, shape, x, ctx, true, H);
}

/// As `check_layer`, with step `h`; `check_input = false` checks parameter gradients only
/// (for inputs that are not differentiable, such as token ids). Deep stacks of smooth
/// layers (no kinks within ±2h) use a larger h: the f32 rounding noise of the numeric
/// estimate falls as 1/h.
pub fn check_layer_step<B: Backend>(
    be: &B,
    layer: &mut dyn Layer<B>,
    shape: &[usize],
    x: &[f32],
    ctx: &ForwardCtx,
    check_input: bool,
    h: f32,
) {
    let input = Tensor::from_slice(be, shape, x);
    let y = layer.forward(be, input, ctx).expect("forward");
    let r = projection(y.numel());
    for p in layer.params_mut() {
        be.fill(&mut p.grad, 0.0);
    }
    let dx = layer.backward(be, Tensor::from_slice(be, &y.shape, &r)).expect("backward").to_vec(be);
    let eval = |layer: &mut dyn Layer<B>, x: &[f32]| -> f64 {
        let y = layer.forward(be, Tensor::from_slice(be, shape, x), ctx).expect("forward");
        project(&y.to_vec(be), &r)
    };
    for i in (0..x.len()).filter(|_| check_input) {
        let numeric = five_point(h, |d| {
            let mut xd = x.to_vec();
            xd[i] += d;
            eval(layer, &xd)
        });
        let e = rel_err(dx[i] as f64, numeric);
        assert!(e < F32_REL_TOL, "{}: dL/dx[{i}] analytic {} numeric {numeric} rel err {e:.2e}", layer.name(), dx[i]);
    }
    let n_params = layer.params().len();
    for pi in 0..n_params {
        let (name, analytic, value, trainable) = {
            let p = &layer.params()[pi];
            (p.name.clone(), be.download(&p.grad), be.download(&p.value), p.trainable)
        };
        if !trainable {
            assert!(analytic.iter().all(|&g| g == 0.0), "{name} is frozen but got a gradient");
            continue;
        }
        for i in 0..value.len() {
            let numeric = five_point(h, |d| {
                let mut v = value.clone();
                v[i] += d;
                layer.params_mut()[pi].value = be.upload(&v);
                eval(layer, x)
            });
            layer.params_mut()[pi].value = be.upload(&value);
            let e = rel_err(analytic[i] as f64, numeric);
            assert!(e < F32_REL_TOL, "{name}[{i}]: analytic {} numeric {numeric} rel err {e:.2e}", analytic[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{
        sinusoid_table, Act, AttentionShape, BatchNorm, BlockWeights, Conv2d, Dropout, Embedding, Flatten, LayerNorm,
        Linear, LoraLinear, MultiHeadAttention, NormOrder, Pool2d, PoolKind, PositionalEncoding, TransformerBlock,
    };
    use crate::layers::{Cell, Conv1d, ConvTranspose2d, Recurrent};
    use lockstep_kernels::{Activation, CpuBackend, Window};

    /// Inputs kept at least 0.05 away from 0 so ReLU-family kinks are never straddled by ±h.
    fn input(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 3.0;
                if v.abs() < 0.05 {
                    v + 0.1
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn linear_gradients() {
        let be = CpuBackend::new(1);
        let w: Vec<f32> = (0..12).map(|i| ((i as f32) * 0.77).sin()).collect();
        let mut layer = Linear::new(&be, "fc", 4, 3, &w);
        layer.bias.value = vec![0.1, -0.2, 0.3];
        check_layer(&be, &mut layer, &[5, 4], &input(20), &ForwardCtx { train: true, ..Default::default() });
    }

    #[test]
    fn lora_gradients_and_merge() {
        let be = CpuBackend::new(1);
        let (i, o, r) = (4, 3, 2);
        let w: Vec<f32> = (0..12).map(|k| ((k as f32) * 0.77).sin()).collect();
        let mut base = Linear::new(&be, "fc", i, o, &w);
        base.bias.value = vec![0.1, -0.2, 0.3];
        let a: Vec<f32> = (0..r * i).map(|k| ((k as f32) * 1.3).cos() * 0.5).collect();
        let mut lora = LoraLinear::new(&be, Box::new(base), r, 4.0, &a).unwrap();
        let ctx = ForwardCtx { train: true, ..Default::default() };
        // B starts at zero: the adapted layer is exactly the base layer.
        let y0 = lora.forward(&be, Tensor::from_slice(&be, &[5, i], &input(20)), &ctx).unwrap().to_vec(&be);
        let plain = Linear::new(&be, "fc", i, o, &w).forward(&be, Tensor::from_slice(&be, &[5, i], &input(20)), &ctx);
        let mut plain_y = plain.unwrap().to_vec(&be);
        for (v, b) in plain_y.iter_mut().zip([0.1, -0.2, 0.3].iter().cycle()) {
            *v += b;
        }
        assert_eq!(y0, plain_y);
        lora.b.value = (0..o * r).map(|k| ((k as f32) * 0.41).sin()).collect();
        check_layer(&be, &mut lora, &[5, i], &input(20), &ctx);
        // Folding W + s·B·A gives the same outputs.
        let y = lora.forward(&be, Tensor::from_slice(&be, &[5, i], &input(20)), &ctx).unwrap().to_vec(&be);
        let mut merged_w = w.clone();
        for out in 0..o {
            for inp in 0..i {
                let ba: f32 = (0..r).map(|k| lora.b.value[out * r + k] * a[k * i + inp]).sum();
                merged_w[out * i + inp] += lora.scaling * ba;
            }
        }
        let mut merged = Linear::new(&be, "fc", i, o, &merged_w);
        merged.bias.value = vec![0.1, -0.2, 0.3];
        let ym = merged.forward(&be, Tensor::from_slice(&be, &[5, i], &input(20)), &ctx).unwrap().to_vec(&be);
        for (a, b) in y.iter().zip(&ym) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn activation_gradients() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        for act in [
            Activation::Sigmoid,
            Activation::Tanh,
            Activation::Relu,
            Activation::LeakyRelu { slope: 0.1 },
            Activation::Swish { beta: 1.0 },
            Activation::Swish { beta: 1.7 },
            Activation::Gelu,
        ] {
            check_layer(&be, &mut Act::new("act", act, 6), &[4, 6], &input(24), &ctx);
        }
        // Learnable beta: its gradient is checked as a parameter.
        check_layer(&be, &mut Act::learnable_swish(&be, "swish", 0.8, 6), &[4, 6], &input(24), &ctx);
    }

    #[test]
    fn conv2d_gradients_stride_padding_groups() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        for (stride, pad, groups, oc) in [(1, 0, 1, 3), (2, 1, 1, 2), (1, 1, 2, 4)] {
            let win = Window { h: 5, w: 4, c: 2, kh: 3, kw: 2, stride, pad };
            let n_w = oc * 3 * 2 * (2 / groups);
            let w: Vec<f32> = (0..n_w).map(|i| ((i as f32) * 0.71).sin() * 0.5).collect();
            let mut conv = Conv2d::new(&be, "conv", win, oc, groups, &w);
            conv.bias.value = (0..oc).map(|i| i as f32 * 0.1).collect();
            check_layer(&be, &mut conv, &[2, 5, 4, 2], &input(2 * 5 * 4 * 2), &ctx);
        }
    }

    #[test]
    fn conv2d_matches_a_direct_convolution() {
        // 1 image 4x4x1, 3x3 kernel of ones, pad 1: each output is the sum of its neighbourhood.
        let be = CpuBackend::new(1);
        let win = Window { h: 4, w: 4, c: 1, kh: 3, kw: 3, stride: 1, pad: 1 };
        let mut conv = Conv2d::new(&be, "conv", win, 1, 1, &[1.0; 9]);
        let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let y = conv.forward(&be, Tensor::from_slice(&be, &[1, 4, 4, 1], &x), &ForwardCtx::default()).unwrap();
        assert_eq!(y.shape, vec![1, 4, 4, 1]);
        assert_eq!(y.buf[0], 0. + 1. + 4. + 5.);
        assert_eq!(y.buf[5], (0..3).flat_map(|r| (0..3).map(move |c| (r * 4 + c) as f32)).sum::<f32>());
    }

    #[test]
    fn pooling_and_flatten_gradients() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let win = Window { h: 4, w: 4, c: 3, kh: 2, kw: 2, stride: 2, pad: 0 };
        check_layer(&be, &mut Pool2d::new("max", PoolKind::Max, win), &[2, 4, 4, 3], &input(96), &ctx);
        check_layer(&be, &mut Pool2d::new("avg", PoolKind::Average, win), &[2, 4, 4, 3], &input(96), &ctx);
        let overlapping = Window { kh: 3, kw: 3, stride: 1, pad: 1, ..win };
        check_layer(&be, &mut Pool2d::new("avg", PoolKind::Average, overlapping), &[2, 4, 4, 3], &input(96), &ctx);
        check_layer(&be, &mut Flatten::new("flat"), &[2, 2, 2, 3], &input(24), &ctx);
    }

    #[test]
    fn layer_norm_and_batch_norm_gradients() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let mut ln = LayerNorm::new(&be, "ln", 6);
        ln.gamma.value = (0..6).map(|i| 0.5 + i as f32 * 0.2).collect();
        ln.beta.value = (0..6).map(|i| i as f32 * 0.1).collect();
        check_layer(&be, &mut ln, &[4, 6], &input(24), &ctx);
        let mut bn = BatchNorm::new(&be, "bn", 3);
        bn.gamma.value = vec![0.7, 1.3, -0.4];
        bn.beta.value = vec![0.1, 0.0, -0.2];
        check_layer(&be, &mut bn, &[2, 2, 2, 3], &input(24), &ctx);
    }

    #[test]
    fn batch_norm_statistics_train_and_eval() {
        let be = CpuBackend::new(1);
        let mut bn = BatchNorm::new(&be, "bn", 2);
        let x = Tensor::from_slice(&be, &[4, 2], &[1., 10., 2., 20., 3., 30., 4., 40.]);
        let y = bn.forward(&be, x.duplicate(&be), &ForwardCtx { train: true, ..Default::default() }).unwrap();
        // Column 0 is 1..4: mean 2.5, biased var 1.25.
        assert!((y.buf[0] - (-1.5 / (1.25f32 + 1e-5).sqrt())).abs() < 1e-5);
        let mean: f32 = y.buf.iter().step_by(2).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6);
        // Running stats move 10% toward the batch (unbiased variance 5/3 for column 0).
        assert!((bn.running_mean[0] - 0.25).abs() < 1e-12);
        assert!((bn.running_var[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-12);
        // Eval uses the running statistics.
        let y = bn.forward(&be, x, &ForwardCtx::default()).unwrap();
        let want = (1.0 - 0.25) / (bn.running_var[0] + 1e-5).sqrt();
        assert!((y.buf[0] as f64 - want).abs() < 1e-5);
    }

    #[test]
    fn embedding_and_positional_encoding_gradients() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        let table: Vec<f32> = (0..5 * 3).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut emb = Embedding::new(&be, "emb", 5, 3, &table);
        // Repeated ids: their gradients must add up in the same row.
        check_layer_step(&be, &mut emb, &[2, 3], &[0., 4., 4., 1., 0., 4.], &ctx, false, H);
        let y = emb.forward(&be, Tensor::from_slice(&be, &[1, 2], &[2., 0.]), &ForwardCtx::default()).unwrap();
        assert_eq!(y.shape, vec![1, 2, 3]);
        assert_eq!(y.buf, [&table[6..9], &table[0..3]].concat());
        assert!(emb.forward(&be, Tensor::from_slice(&be, &[1], &[5.]), &ctx).unwrap_err().to_string().contains("id 5"));

        let init: Vec<f32> = (0..4 * 3).map(|i| (i as f32 * 0.9).cos() * 0.1).collect();
        check_layer(&be, &mut PositionalEncoding::learned(&be, "pos", 4, 3, &init), &[2, 3, 3], &input(18), &ctx);
        check_layer(&be, &mut PositionalEncoding::sinusoidal("pos", 4, 3), &[2, 3, 3], &input(18), &ctx);
        // PE[t, 2i] = sin(t/10000^(2i/D)), PE[t, 2i+1] = cos(...): known values at D = 4.
        let pe = sinusoid_table(3, 4);
        assert_eq!(&pe[..4], &[0.0, 1.0, 0.0, 1.0]);
        assert!((pe[4] - 1f32.sin()).abs() < 1e-7 && (pe[5] - 1f32.cos()).abs() < 1e-7);
        assert!((pe[6] - 0.01f32.sin()).abs() < 1e-7 && (pe[7] - 0.01f32.cos()).abs() < 1e-7);
    }

    fn attention(causal: bool) -> MultiHeadAttention<CpuBackend> {
        let be = CpuBackend::new(1);
        let w_qkv: Vec<f32> = (0..12 * 4).map(|i| ((i as f32) * 0.37).sin() * 0.6).collect();
        let w_out: Vec<f32> = (0..4 * 4).map(|i| ((i as f32) * 0.53).cos() * 0.6).collect();
        let shape = AttentionShape { dim: 4, heads: 2, causal, max_len: 8 };
        let mut a = MultiHeadAttention::new(&be, "attn", shape, &w_qkv, &w_out);
        a.qkv.bias.value = (0..12).map(|i| i as f32 * 0.05).collect();
        a
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
        let y = a.forward(&be, Tensor::from_slice(&be, &[1, 5, 4], &x), &ForwardCtx::default()).unwrap();
        for t in 0..5 {
            // Change every token after t: outputs up to t are bitwise unchanged.
            let mut x2 = x.clone();
            x2[(t + 1) * 4..].iter_mut().for_each(|v| *v += 1.0);
            let y2 = a.forward(&be, Tensor::from_slice(&be, &[1, 5, 4], &x2), &ForwardCtx::default()).unwrap();
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
            let y = a.forward(&be, Tensor::from_slice(&be, &[1, 3, 4], x), &ctx).unwrap();
            for p in a.params_mut() {
                p.grad.fill(0.0);
            }
            // The loss sees valid positions only: dy is zero at the padded position.
            let mut dy = vec![1.0; 12];
            dy[8..].fill(0.0);
            let dx = a.backward(&be, Tensor::from_slice(&be, &[1, 3, 4], &dy)).unwrap();
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
        let x = Tensor::from_slice(&be, &[4, 5, 4], &input(80));
        let target =
            Tensor::from_slice(&be, &[4, 5, 4], &(0..80).map(|i| ((i as f32) * 0.77).cos() * 0.5).collect::<Vec<_>>());
        for order in [NormOrder::PreLn, NormOrder::PostLn] {
            let mut b = block(order);
            let cfg = OptimizerConfig {
                rule: Rule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
                l1: 0.0,
                l2: 0.0,
                decay_biases: false,
            };
            let mut opt = Optimizer::new(&be, cfg, &b.params());
            let ctx = ForwardCtx { train: true, ..Default::default() };
            let mut losses = Vec::new();
            for _ in 0..150 {
                for p in b.params_mut() {
                    p.grad.fill(0.0);
                }
                let y = b.forward(&be, x.duplicate(&be), &ctx).unwrap();
                let out = mse(&be, &y, &target, 1.0).unwrap();
                losses.push(out.loss_sum);
                b.backward(&be, out.grad).unwrap();
                opt.step(&be, &mut b.params_mut(), 0.01);
            }
            let (first, last) = (losses[0], *losses.last().unwrap());
            println!("{order:?}: loss {first:.3} -> {last:.3}");
            assert!(last < first / 5.0, "{order:?}: loss {first} -> {last}");
        }
    }

    #[test]
    fn dropout_gradient_and_scaling() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, seed: 3, step: 5, example_ids: vec![10, 11, 12, 13], ..Default::default() };
        check_layer(&be, &mut Dropout::new("drop", 0.3, 0), &[4, 6], &input(24), &ctx);

        // Inverted scaling: kept units are x/(1−p), dropped are 0, the mean is preserved.
        let mut drop = Dropout::new("drop", 0.25, 0);
        let rows = 2000;
        let ids: Vec<u64> = (0..rows as u64).collect();
        let x = Tensor::from_slice(&be, &[rows, 50], &vec![1.0; rows * 50]);
        let y = drop
            .forward(
                &be,
                x.duplicate(&be),
                &ForwardCtx { train: true, seed: 1, step: 0, example_ids: ids, ..Default::default() },
            )
            .unwrap();
        assert!(y.buf.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let kept = y.buf.iter().filter(|&&v| v > 0.0).count() as f64 / y.buf.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
        let mean = y.buf.iter().map(|&v| v as f64).sum::<f64>() / y.buf.len() as f64;
        assert!((mean - 1.0).abs() < 0.015, "{mean}");
        // Eval mode is the identity.
        let y = drop.forward(&be, x.duplicate(&be), &ForwardCtx::default()).unwrap();
        assert_eq!(y.buf, x.buf);
        // The same example at the same step gets the same mask wherever it is in the batch.
        let a = drop
            .forward(
                &be,
                x.duplicate(&be),
                &ForwardCtx { train: true, seed: 1, step: 0, example_ids: (0..2000).collect(), ..Default::default() },
            )
            .unwrap();
        let b = drop
            .forward(
                &be,
                x.duplicate(&be),
                &ForwardCtx {
                    train: true,
                    seed: 1,
                    step: 0,
                    example_ids: (0..2000).rev().collect(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(a.buf[..50], b.buf[1999 * 50..]);
    }

    fn recurrent(cell: Cell) -> Recurrent<CpuBackend> {
        let be = CpuBackend::new(1);
        let g = cell.gates();
        let w_ih: Vec<f32> = (0..g * 3 * 2).map(|i| ((i as f32) * 0.41).sin() * 0.7).collect();
        let w_hh: Vec<f32> = (0..g * 3 * 3).map(|i| ((i as f32) * 0.23).cos() * 0.6).collect();
        let mut r = Recurrent::new(&be, "rnn", cell, 2, 3, 4, &w_ih, &w_hh);
        r.bias_hh.value = (0..g * 3).map(|i| (i as f32 * 0.7).sin() * 0.2).collect();
        r
    }

    #[test]
    fn lstm_and_gru_gradients_through_time() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        for cell in [Cell::Lstm, Cell::Gru] {
            // (N=2, T=4, In=2): dx, dW_ih, dW_hh and both biases through four steps of BPTT.
            check_layer(&be, &mut recurrent(cell), &[2, 4, 2], &input(16), &ctx);
        }
    }

    #[test]
    fn recurrent_outputs_are_causal_and_match_a_hand_step() {
        let be = CpuBackend::new(1);
        // One GRU step by hand: h = (1−z)·n with h_prev = 0.
        let mut gru = Recurrent::new(&be, "gru", Cell::Gru, 1, 1, 2, &[0.5, -0.3, 0.8], &[0.2, 0.1, -0.4]);
        let y = gru.forward(&be, Tensor::from_slice(&be, &[1, 2, 1], &[1.0, -2.0]), &ForwardCtx::default()).unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let (r, z) = (sig(0.5), sig(-0.3));
        let n = (0.8 + r * 0.0f32).tanh();
        assert!((y.buf[0] - (1.0 - z) * n).abs() < 1e-6, "{} vs {}", y.buf[0], (1.0 - z) * n);
        for cell in [Cell::Lstm, Cell::Gru] {
            let mut rnn = recurrent(cell);
            let x = input(8);
            let y = rnn.forward(&be, Tensor::from_slice(&be, &[1, 4, 2], &x), &ForwardCtx::default()).unwrap();
            let mut later = x.clone();
            later[4..].iter_mut().for_each(|v| *v += 1.0); // change steps 2 and 3
            let y2 = rnn.forward(&be, Tensor::from_slice(&be, &[1, 4, 2], &later), &ForwardCtx::default()).unwrap();
            assert_eq!(y.buf[..6], y2.buf[..6], "{cell:?}: steps 0-1 saw the future");
            assert_ne!(y.buf[6..], y2.buf[6..]);
        }
    }

    #[test]
    fn transposed_conv_gradients_and_adjointness() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        // (N=2, 3x3, Cin=2) -> stride 2, kernel 3, pad 1: (2, 5x5, OC=3).
        let w: Vec<f32> = (0..2 * 3 * 3 * 3).map(|i| ((i as f32) * 0.31).sin() * 0.5).collect();
        let mut up = ConvTranspose2d::new(&be, "up", (3, 3, 2), 3, 3, 2, 1, &w);
        assert_eq!((up.out_win.h, up.out_win.w), (5, 5));
        assert_eq!(ConvTranspose2d::<CpuBackend>::output_size(3, 3, 2, 1), Some(5));
        check_layer(&be, &mut up, &[2, 3, 3, 2], &input(36), &ctx);
        // A transposed conv is the adjoint of the conv with the same weights:
        // <convT(x), y> = <x, conv(y)> for the bias-free layers.
        let conv_w: Vec<f32> = {
            // conv weight (OC=2, KH, KW, Cg=3) from the transposed one (Cin=2, KH, KW, OC=3)
            w.clone()
        };
        let mut conv = Conv2d::new(&be, "down", up.out_win, 2, 1, &conv_w);
        let x = input(18); // (1, 3, 3, 2)
        let y: Vec<f32> = (0..75).map(|i| ((i as f32) * 0.77).cos()).collect(); // (1, 5, 5, 3)
        let t = up.forward(&be, Tensor::from_slice(&be, &[1, 3, 3, 2], &x), &ForwardCtx::default()).unwrap();
        let c = conv.forward(&be, Tensor::from_slice(&be, &[1, 5, 5, 3], &y), &ForwardCtx::default()).unwrap();
        let lhs: f64 = t.buf.iter().zip(&y).map(|(a, b)| (a * b) as f64).sum();
        let rhs: f64 = x.iter().zip(&c.buf).map(|(a, b)| (a * b) as f64).sum();
        assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    }

    #[test]
    fn conv1d_gradients_and_known_values() {
        let be = CpuBackend::new(1);
        let ctx = ForwardCtx { train: true, ..Default::default() };
        // (N=2, L=5, C=2) -> kernel 3, stride 2, pad 1, 2 groups: (2, 3, 4).
        let w: Vec<f32> = (0..4 * 3).map(|i| ((i as f32) * 0.43).sin() * 0.5).collect();
        let mut conv = Conv1d::new(&be, "c1", (5, 2), 4, 3, 2, 1, 2, &w);
        assert_eq!(conv.out_length(), 3);
        check_layer(&be, &mut conv, &[2, 5, 2], &input(20), &ctx);
        // A moving sum: kernel [1, 1, 1], pad 1 over [1, 2, 3, 4] gives [3, 6, 9, 7].
        let mut sum = Conv1d::new(&be, "sum", (4, 1), 1, 3, 1, 1, 1, &[1.0, 1.0, 1.0]);
        let y =
            sum.forward(&be, Tensor::from_slice(&be, &[1, 4, 1], &[1., 2., 3., 4.]), &ForwardCtx::default()).unwrap();
        assert_eq!(y.shape, vec![1, 4, 1]);
        assert_eq!(y.buf, vec![3., 6., 9., 7.]);
    }
}
