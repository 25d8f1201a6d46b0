//! Optimizers (T19), L1/L2 penalties (T20) and global-norm clipping (T21).
//!
//! Order within a step (after the gradients have been all-reduced and divided by the
//! global batch): clip by global norm → add L2 (λ·w) and L1 (λ·sign w) to decay-eligible
//! gradients → the update rule. Biases and norm parameters are excluded from decay unless
//! asked for.

use crate::{Param, Result};
use lockstep_kernels::{Backend, UpdateRule};
use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    Sgd,
    Momentum {
        mu: f32,
    },
    Nesterov {
        mu: f32,
    },
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
    /// Decoupled weight decay: w ← w − lr·(adam_update + weight_decay·w).
    AdamW {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerConfig {
    pub rule: Rule,
    /// grad += l2·w  (≡ w ← (1 − lr·l2)·w − lr·g for SGD)
    pub l2: f32,
    /// grad += l1·sign(w); a weight the step carries across zero is set to exactly 0
    /// (clipped/truncated L1), which is what makes L1 produce real sparsity.
    pub l1: f32,
    pub decay_biases: bool,
}

pub struct Optimizer<B: Backend> {
    pub config: OptimizerConfig,
    /// Per parameter: (first moment / velocity, second moment). Empty for frozen params.
    pub state: Vec<(B::Buf, B::Buf)>,
    /// Updates taken so far (Adam's bias correction uses step+1).
    pub step: u64,
    /// Per-parameter learning-rate multipliers (T37 parameter groups); missing = 1.
    pub lr_scale: Vec<f32>,
    /// ZeRO: the range of each parameter whose state this rank holds (the state is sized to
    /// it) and whose values it updates. None: the whole of every parameter.
    pub shards: Option<Vec<Range<usize>>>,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(be: &B, config: OptimizerConfig, params: &[&Param<B>]) -> Result<Self> {
        let state = params
            .iter()
            .map(|p| {
                let n = if p.trainable { p.numel() } else { 0 };
                Ok(match config.rule {
                    Rule::Sgd => (be.zeros(0)?, be.zeros(0)?),
                    Rule::Momentum { .. } | Rule::Nesterov { .. } => (be.zeros(n)?, be.zeros(0)?),
                    Rule::Adam { .. } | Rule::AdamW { .. } => (be.zeros(n)?, be.zeros(n)?),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, state, step: 0, lr_scale: Vec::new(), shards: None })
    }

    /// Applies one update with learning rate `lr` to every trainable parameter.
    pub fn step(&mut self, be: &B, params: &mut [&mut Param<B>], lr: f32) -> Result<()> {
        self.step_scaled(be, params, lr, 1.0)
    }

    /// As `step`, with the gradients taken as `grad_scale·grad` (batch mean and clipping
    /// folded into the update instead of a separate pass).
    pub fn step_scaled(&mut self, be: &B, params: &mut [&mut Param<B>], lr: f32, grad_scale: f32) -> Result<()> {
        self.update_range(be, params, 0..params.len(), lr, grad_scale)?;
        self.step += 1;
        Ok(())
    }

    /// The update of `step_scaled` for `params[range]` only, without counting a step: a GAN
    /// updates its two networks in turn within one step (Adam's bias correction counts
    /// steps, and each network takes one per step).
    pub fn update_range(
        &mut self,
        be: &B,
        params: &mut [&mut Param<B>],
        range: Range<usize>,
        lr: f32,
        grad_scale: f32,
    ) -> Result<()> {
        if self.shards.is_some() {
            return Err(crate::NnError::Invalid("a sharded optimizer updates with step_shards".into()));
        }
        let step = self.step + 1;
        let rows = params.iter_mut().zip(self.state.iter_mut()).enumerate().skip(range.start).take(range.len());
        for (index, (p, (s1, s2))) in rows {
            if !p.trainable {
                continue;
            }
            let lr = lr * self.lr_scale.get(index).copied().unwrap_or(1.0);
            let update = Update { config: self.config, step, lr, grad_scale, decays: p.decay };
            update.apply(be, &mut p.value, &mut p.grad, s1, s2)?;
        }
        Ok(())
    }

    /// Keeps only each parameter's range `shards[i]` of the state (ZeRO, T41): called once
    /// the whole state exists (fresh or restored); afterwards the optimizer updates those
    /// ranges only, with `step_shards`.
    pub fn shard(&mut self, be: &B, shards: Vec<Range<usize>>) -> Result<()> {
        if shards.len() != self.state.len() {
            return Err(crate::NnError::Invalid(format!(
                "{} shard ranges for {} parameters",
                shards.len(),
                self.state.len()
            )));
        }
        for ((s1, s2), range) in self.state.iter_mut().zip(&shards) {
            for buf in [s1, s2].into_iter().filter(|b| be.len(b) > 0) {
                let mut part = be.zeros(range.len())?;
                be.copy_range(buf, range.start, &mut part, 0, range.len())?;
                *buf = part;
            }
        }
        self.shards = Some(shards);
        Ok(())
    }

    /// `step_scaled` of this rank's shards (ZeRO): `grad_shards[i]` holds the summed
    /// gradient of parameter i's range `shards[i]`, and only that range of its value moves.
    /// Every update rule is elementwise, so each element gets the bits the unsharded step
    /// gives it.
    pub fn step_shards(
        &mut self,
        be: &B,
        params: &mut [&mut Param<B>],
        mut grad_shards: Vec<B::Buf>,
        lr: f32,
        grad_scale: f32,
    ) -> Result<()> {
        let Some(shards) = &self.shards else {
            return Err(crate::NnError::Invalid("step_shards on an unsharded optimizer".into()));
        };
        self.step += 1;
        let rows = params.iter_mut().zip(self.state.iter_mut()).zip(shards).zip(grad_shards.iter_mut());
        for (index, (((p, (s1, s2)), range), grad)) in rows.enumerate() {
            if !p.trainable || range.is_empty() {
                continue;
            }
            let lr = lr * self.lr_scale.get(index).copied().unwrap_or(1.0);
            let update = Update { config: self.config, step: self.step, lr, grad_scale, decays: p.decay };
            let mut value = be.zeros(range.len())?;
            be.copy_range(&p.value, range.start, &mut value, 0, range.len())?;
            update.apply(be, &mut value, grad, s1, s2)?;
            be.copy_range(&value, 0, &mut p.value, range.start, range.len())?;
        }
        Ok(())
    }

    /// State buffers the rule keeps per parameter: 0 (SGD), 1 (momentum), 2 (Adam).
    pub fn slots_used(&self) -> usize {
        match self.config.rule {
            Rule::Sgd => 0,
            Rule::Momentum { .. } | Rule::Nesterov { .. } => 1,
            Rule::Adam { .. } | Rule::AdamW { .. } => 2,
        }
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self, be: &B) -> u64 {
        self.state.iter().map(|(s1, s2)| (be.len(s1) + be.len(s2)) as u64 * 4).sum()
    }
}

/// One parameter's update: penalties, then the rule.
struct Update {
    config: OptimizerConfig,
    step: u64,
    lr: f32,
    grad_scale: f32,
    decays: bool,
}

impl Update {
    fn rule(&self, decays: bool) -> UpdateRule {
        match self.config.rule {
            Rule::Sgd => UpdateRule::Sgd,
            Rule::Momentum { mu } => UpdateRule::Momentum { mu, nesterov: false },
            Rule::Nesterov { mu } => UpdateRule::Momentum { mu, nesterov: true },
            Rule::Adam { beta1, beta2, eps } => {
                UpdateRule::Adam { beta1, beta2, eps, step: self.step, decoupled_decay: 0.0 }
            }
            Rule::AdamW { beta1, beta2, eps, weight_decay } => UpdateRule::Adam {
                beta1,
                beta2,
                eps,
                step: self.step,
                decoupled_decay: if decays { weight_decay } else { 0.0 },
            },
        }
    }

    /// `value` and `grad` are one parameter (or one range of it) and its state `s1`, `s2`.
    fn apply<B: Backend>(
        &self,
        be: &B,
        value: &mut B::Buf,
        grad: &mut B::Buf,
        s1: &mut B::Buf,
        s2: &mut B::Buf,
    ) -> Result<()> {
        let OptimizerConfig { l1, l2, decay_biases, .. } = self.config;
        let (lr, grad_scale) = (self.lr, self.grad_scale);
        let decays = self.decays || decay_biases;
        // Penalties are added to the scaled gradient, hence divided by the scale here.
        if decays && l2 > 0.0 {
            be.axpy(l2 / grad_scale, value, grad)?;
        }
        let before_l1 = if decays && l1 > 0.0 {
            be.add_sign(l1 / grad_scale, value, grad)?;
            Some(be.download(value)?)
        } else {
            None
        };
        be.optimizer_step(self.rule(decays), lr, grad_scale, value, grad, s1, s2)?;
        if let Some(before) = before_l1 {
            let mut after = be.download(value)?;
            for (a, b) in after.iter_mut().zip(&before) {
                if *a * *b < 0.0 {
                    *a = 0.0;
                }
            }
            *value = be.upload(&after)?;
        }
        Ok(())
    }
}

/// ‖g‖₂ over all trainable parameters, accumulated in f64.
pub fn global_grad_norm<B: Backend>(be: &B, params: &[&mut Param<B>]) -> Result<f64> {
    Ok(grad_sum_squares(be, params)?.sqrt())
}

/// ‖g‖₂² over all trainable parameters, accumulated in f64 (sums of squares add up across
/// pipeline stages; norms do not).
pub fn grad_sum_squares<B: Backend>(be: &B, params: &[&mut Param<B>]) -> Result<f64> {
    let mut total = 0.0;
    for p in params.iter().filter(|p| p.trainable) {
        total += be.sum_squares(&p.grad)?;
    }
    Ok(total)
}

/// The factor that clips a gradient of norm `norm` to at most `max_norm` (1 if it is
/// under the bound or clipping is off): c/‖g‖ when ‖g‖ > c.
pub fn clip_factor(norm: f64, max_norm: f32) -> f64 {
    if max_norm > 0.0 && norm > max_norm as f64 {
        max_norm as f64 / norm
    } else {
        1.0
    }
}

/// Scales all gradients by c/‖g‖ when ‖g‖ > c. Returns the norm before clipping.
pub fn clip_grad_norm<B: Backend>(be: &B, params: &mut [&mut Param<B>], max_norm: f32) -> Result<f64> {
    let norm = global_grad_norm(be, params)?;
    let factor = clip_factor(norm, max_norm);
    if factor != 1.0 {
        for p in params.iter_mut().filter(|p| p.trainable) {
            be.scale(&mut p.grad, factor as f32)?;
        }
    }
    Ok(norm)
}

/// Fraction of decay-eligible weights that are exactly zero (the L1 sparsity report).
pub fn sparsity<B: Backend>(be: &B, params: &[&Param<B>]) -> Result<f64> {
    let (mut zeros, mut total) = (0usize, 0usize);
    for p in params.iter().filter(|p| p.decay) {
        let v = be.download(&p.value)?;
        zeros += v.iter().filter(|&&x| x == 0.0).count();
        total += v.len();
    }
    Ok(if total == 0 { 0.0 } else { zeros as f64 / total as f64 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_kernels::CpuBackend;

    fn param(be: &CpuBackend, w: &[f32], g: &[f32], decay: bool) -> Param<CpuBackend> {
        let mut p = Param::new(be, "w", &[w.len()], w, decay).unwrap();
        p.grad = g.to_vec();
        p
    }

    fn run(rule: Rule, l1: f32, l2: f32, w: &[f32], grads: &[&[f32]], lr: f32) -> Vec<f32> {
        let be = CpuBackend::new(1);
        let mut p = param(&be, w, grads[0], true);
        let mut opt = Optimizer::new(&be, OptimizerConfig { rule, l1, l2, decay_biases: false }, &[&p]).unwrap();
        for g in grads {
            p.grad = g.to_vec();
            opt.step(&be, &mut [&mut p], lr).unwrap();
        }
        p.value
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn sgd_and_momentum_by_hand() {
        close(&run(Rule::Sgd, 0.0, 0.0, &[1.0, -2.0], &[&[0.5, -1.0]], 0.1), &[0.95, -1.9], 1e-7);
        // v1 = g1 = 1; w = 1 - 0.1 = 0.9. v2 = 0.9·1 + 2 = 2.9; w = 0.9 - 0.29 = 0.61.
        close(&run(Rule::Momentum { mu: 0.9 }, 0.0, 0.0, &[1.0], &[&[1.0], &[2.0]], 0.1), &[0.61], 1e-6);
        // Nesterov: v1 = 1, w = 1 - 0.1(1 + 0.9) = 0.81; v2 = 2.9, w = 0.81 - 0.1(2 + 2.61) = 0.349.
        close(&run(Rule::Nesterov { mu: 0.9 }, 0.0, 0.0, &[1.0], &[&[1.0], &[2.0]], 0.1), &[0.349], 1e-6);
    }

    #[test]
    fn adam_first_step_is_lr_sign_g() {
        let adam = Rule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let w = run(adam, 0.0, 0.0, &[1.0, 1.0, 1.0], &[&[3.0, -0.001, 250.0]], 0.01);
        close(&w, &[0.99, 1.01, 0.99], 1e-6);
        // Second step with the same gradient: m̂ = g, v̂ = g², update lr again.
        let w = run(adam, 0.0, 0.0, &[1.0], &[&[2.0], &[2.0]], 0.01);
        close(&w, &[0.98], 1e-6);
    }

    #[test]
    fn adamw_decay_is_decoupled_and_skips_biases() {
        let rule = Rule::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        // w = 2 - 0.01·(sign(1) + 0.1·2) = 1.988
        close(&run(rule, 0.0, 0.0, &[2.0], &[&[1.0]], 0.01), &[1.988], 1e-6);
        let be = CpuBackend::new(1);
        let mut bias = param(&be, &[2.0], &[1.0], false);
        let mut opt =
            Optimizer::new(&be, OptimizerConfig { rule, l1: 0.0, l2: 0.0, decay_biases: false }, &[&bias]).unwrap();
        opt.step(&be, &mut [&mut bias], 0.01).unwrap();
        close(&bias.value, &[1.99], 1e-6);
    }

    #[test]
    fn l2_equals_shrink_then_step() {
        // w ← (1 − ηλ)w − ηg = (1 − 0.1·0.5)·2 − 0.1·1 = 1.8
        close(&run(Rule::Sgd, 0.0, 0.5, &[2.0], &[&[1.0]], 0.1), &[1.8], 1e-6);
    }

    #[test]
    fn l1_drives_weights_to_exact_zero() {
        // 0.5 → 0.5 − 0.1·0.1 = 0.49; 0.004 would cross zero → exactly 0; -0.3 → -0.29.
        let w = run(Rule::Sgd, 0.1, 0.0, &[0.5, 0.004, -0.3], &[&[0.0, 0.0, 0.0]], 0.1);
        assert_eq!(w[1], 0.0);
        close(&w, &[0.49, 0.0, -0.29], 1e-6);
        let be = CpuBackend::new(1);
        let p = param(&be, &w, &[0.0; 3], true);
        assert!((sparsity(&be, &[&p]).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        // Many steps of pure L1 zero every weight and keep them there.
        let w = run(Rule::Sgd, 0.1, 0.0, &[0.05, -0.07], &vec![&[0.0f32, 0.0][..]; 20], 0.1);
        assert_eq!(w, vec![0.0, 0.0]);
    }

    #[test]
    fn clipping_scales_to_exact_norm() {
        let be = CpuBackend::new(1);
        let mut a = param(&be, &[0.0; 2], &[3.0, 0.0], true);
        let mut b = param(&be, &[0.0; 1], &[4.0], false);
        let norm = clip_grad_norm(&be, &mut [&mut a, &mut b], 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        close(&a.grad, &[0.6, 0.0], 1e-7);
        close(&b.grad, &[0.8], 1e-7);
        // Under the bound nothing changes.
        let norm = clip_grad_norm(&be, &mut [&mut a, &mut b], 2.0).unwrap();
        assert!((norm - 1.0).abs() < 1e-6);
        close(&b.grad, &[0.8], 1e-7);
    }

    #[test]
    fn scaled_step_equals_scaling_first() {
        let be = CpuBackend::new(1);
        for rule in [
            Rule::Sgd,
            Rule::Nesterov { mu: 0.9 },
            Rule::AdamW { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 },
        ] {
            let cfg = OptimizerConfig { rule, l1: 0.01, l2: 0.02, decay_biases: false };
            let mut a = param(&be, &[0.3, -0.2, 0.0005], &[4.0, 2.0, -1.0], true);
            let mut b = param(&be, &[0.3, -0.2, 0.0005], &[1.0, 0.5, -0.25], true);
            let (mut oa, mut ob) = (Optimizer::new(&be, cfg, &[&a]).unwrap(), Optimizer::new(&be, cfg, &[&b]).unwrap());
            oa.step_scaled(&be, &mut [&mut a], 0.1, 0.25).unwrap();
            ob.step(&be, &mut [&mut b], 0.1).unwrap();
            close(&a.value, &b.value, 1e-6);
        }
    }

    #[test]
    fn sharded_steps_give_every_element_the_unsharded_bits() {
        let be = CpuBackend::new(1);
        let n = 37;
        let init: Vec<f32> = (0..n).map(|i| ((i * 7) % 11) as f32 * 0.03 - 0.15).collect();
        let grads: Vec<Vec<f32>> =
            (0..4).map(|s| (0..n).map(|i| ((i * 13 + s * 5) % 17) as f32 * 0.1 - 0.8).collect()).collect();
        for rule in [Rule::Nesterov { mu: 0.9 }, Rule::AdamW { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 }]
        {
            let cfg = OptimizerConfig { rule, l1: 0.01, l2: 0.02, decay_biases: false };
            let mut whole = param(&be, &init, &grads[0], true);
            let mut opt = Optimizer::new(&be, cfg, &[&whole]).unwrap();
            // Three ranks' shards of the one parameter, one of them empty.
            let cuts = [0..10, 10..10, 10..n];
            let mut ranks: Vec<_> = cuts
                .iter()
                .map(|range| {
                    let p = param(&be, &init, &grads[0], true);
                    let mut o = Optimizer::new(&be, cfg, &[&p]).unwrap();
                    o.shard(&be, vec![range.clone()]).unwrap();
                    (p, o, range.clone())
                })
                .collect();
            for g in &grads {
                whole.grad = g.clone();
                opt.step_scaled(&be, &mut [&mut whole], 0.05, 0.5).unwrap();
                let mut gathered = vec![0.0; n];
                for (p, o, range) in &mut ranks {
                    o.step_shards(&be, &mut [p], vec![g[range.clone()].to_vec()], 0.05, 0.5).unwrap();
                    gathered[range.clone()].copy_from_slice(&p.value[range.clone()]);
                }
                // The all-gather: every rank continues from the whole updated parameter.
                for (p, _, _) in &mut ranks {
                    p.value = gathered.clone();
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&gathered), bits(&whole.value), "{rule:?}");
            }
            assert_eq!(ranks[0].1.state_bytes(&be) + ranks[2].1.state_bytes(&be), opt.state_bytes(&be));
            assert_eq!(ranks[1].1.state_bytes(&be), 0);
        }
    }

    #[test]
    fn frozen_params_are_untouched_and_stateless() {
        let be = CpuBackend::new(1);
        let mut p = param(&be, &[1.0, 2.0], &[1.0, 1.0], true);
        p.trainable = false;
        let mut opt = Optimizer::new(
            &be,
            OptimizerConfig {
                rule: Rule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
                l1: 0.0,
                l2: 0.0,
                decay_biases: false,
            },
            &[&p],
        )
        .unwrap();
        assert!(opt.state[0].0.is_empty() && opt.state[0].1.is_empty());
        opt.step(&be, &mut [&mut p], 0.1).unwrap();
        assert_eq!(p.value, vec![1.0, 2.0]);
    }
}
