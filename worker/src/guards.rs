//! Step guards: dynamic loss scaling for fp16 (T25), loss blow-up detection (T36) and the
//! EMA of the weights (T23). Each sees only all-reduced values, so every rank decides alike.

use lockstep_kernels::Backend;
use lockstep_nn::Param;
use lockstep_proto::toolbox::BlowupSpec;
use std::collections::VecDeque;

/// Dynamic loss scaling: the loss gradient is multiplied by `scale` so small fp16 gradients
/// do not flush to zero. A step whose gradients overflow (inf/NaN) is skipped and the scale
/// halved; after `growth_interval` good steps in a row it is doubled.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    pub scale: f32,
    pub growth_interval: u64,
    pub good_steps: u64,
}

impl LossScaler {
    pub fn new(scale: f32, growth_interval: u64) -> Self {
        Self { scale, growth_interval, good_steps: 0 }
    }

    /// Records a step's outcome; false means skip its update. At scale 1 there is nothing
    /// left to lower: the step is applied (and the blow-up guard judges it).
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if !grads_finite && self.scale > 1.0 {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale = (self.scale * 2.0).min(f32::MAX / 4.0);
            self.good_steps = 0;
        }
        true
    }
}

/// Watches the loss and gradient norm of every step before its update is applied.
#[derive(Debug, Clone)]
pub struct BlowupGuard {
    spec: BlowupSpec,
    losses: VecDeque<f64>,
    grad_norms: VecDeque<f64>,
    /// The lowest windowed mean loss seen.
    lowest_mean: f64,
}

/// Steps of history before a single-step spike can be called.
const MIN_SPIKE_HISTORY: usize = 5;

fn mean(v: &VecDeque<f64>) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

impl BlowupGuard {
    pub fn new(spec: BlowupSpec) -> Self {
        Self { spec, losses: VecDeque::new(), grad_norms: VecDeque::new(), lowest_mean: f64::INFINITY }
    }

    /// None if the step looks healthy (and it joins the window); otherwise why it does
    /// not, with the likely cause. A blown-up step stays out of the window.
    pub fn check(&mut self, loss: f64, grad_norm: f64, lr: f32) -> Option<String> {
        if self.spec.action == lockstep_proto::toolbox::BlowupAction::Off {
            return None;
        }
        let (w, factor) = (self.spec.window, self.spec.factor);
        let full = self.losses.len() >= w;
        // A spike needs a little history to compare with; a trend a whole window.
        let some_history = self.losses.len() >= w.min(MIN_SPIKE_HISTORY);
        let what = if !loss.is_finite() || !grad_norm.is_finite() {
            Some(format!("the loss is {loss} (gradient norm {grad_norm:.3e})"))
        } else if some_history && loss > factor * self.losses.iter().copied().fold(0.0, f64::max) {
            Some(format!(
                "the loss jumped to {loss:.4}, over {factor}× the largest of the last {} steps (mean {:.4})",
                self.losses.len(),
                mean(&self.losses)
            ))
        } else {
            let window_mean = mean(&self.losses);
            (full && window_mean > factor * self.lowest_mean).then(|| {
                format!(
                    "the loss is rising: its mean over the last {w} steps is {window_mean:.4}, {:.1}× its lowest ({:.4})",
                    window_mean / self.lowest_mean,
                    self.lowest_mean
                )
            })
        };
        if let Some(what) = what {
            return Some(format!("{what}; likely cause: {}", self.cause(grad_norm, lr)));
        }
        self.losses.push_back(loss);
        self.grad_norms.push_back(grad_norm);
        if self.losses.len() > w {
            self.losses.pop_front();
            self.grad_norms.pop_front();
        }
        if self.losses.len() >= w {
            self.lowest_mean = self.lowest_mean.min(mean(&self.losses));
        }
        None
    }

    fn cause(&self, grad_norm: f64, lr: f32) -> String {
        let typical = mean(&self.grad_norms);
        if !grad_norm.is_finite() || (!self.grad_norms.is_empty() && grad_norm > self.spec.factor * typical) {
            format!(
                "exploding gradients (norm {grad_norm:.3e}, typically {typical:.3e}): set optim.clip_norm, lower optim.lr or add warmup"
            )
        } else {
            format!("the learning rate ({lr:e}) is too high: lower optim.lr or add schedule.warmup_steps")
        }
    }
}

/// EMA of the weights (T23): v_t = β·v_{t−1} + (1 − β)·θ_t from v_0 = 0, read with the bias
/// correction v_t / (1 − β^t). Kept on the backend, one buffer per parameter.
pub struct Ema<B: Backend> {
    pub decay: f64,
    pub updates: u64,
    pub shadow: Vec<B::Buf>,
}

impl<B: Backend> Ema<B> {
    pub fn new(be: &B, decay: f64, params: &[&Param<B>]) -> Self {
        Self { decay, updates: 0, shadow: params.iter().map(|p| be.zeros(p.numel())).collect() }
    }

    pub fn update(&mut self, be: &B, params: &[&mut Param<B>]) {
        for (v, p) in self.shadow.iter_mut().zip(params) {
            be.scale(v, self.decay as f32);
            be.axpy((1.0 - self.decay) as f32, &p.value, v);
        }
        self.updates += 1;
    }

    /// The bias-corrected averages, v_t / (1 − β^t), in parameter order.
    pub fn corrected(&self, be: &B) -> Vec<B::Buf> {
        let correction = 1.0 - self.decay.powi(self.updates.min(i32::MAX as u64) as i32);
        self.shadow
            .iter()
            .map(|v| {
                let mut out = be.zeros(be.len(v));
                be.copy(v, &mut out);
                if correction > 0.0 {
                    be.scale(&mut out, (1.0 / correction) as f32);
                }
                out
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_kernels::CpuBackend;
    use lockstep_proto::toolbox::BlowupAction;

    #[test]
    fn loss_scale_halves_on_overflow_and_doubles_after_good_steps() {
        let mut s = LossScaler::new(1024.0, 3);
        assert!(!s.update(false));
        assert_eq!(s.scale, 512.0);
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 512.0);
        assert!(s.update(true));
        assert_eq!(s.scale, 1024.0, "doubled after 3 good steps");
        let mut floor = LossScaler::new(1.0, 100);
        assert!(floor.update(false), "at scale 1 the step goes to the blow-up guard");
    }

    fn guard(action: BlowupAction) -> BlowupGuard {
        BlowupGuard::new(BlowupSpec { action, window: 5, factor: 4.0, max_skips: 3 })
    }

    #[test]
    fn nan_spike_and_rise_are_caught_with_a_cause() {
        let mut g = guard(BlowupAction::Stop);
        for l in [1.0, 0.9, 0.8, 0.7, 0.6] {
            assert_eq!(g.check(l, 1.0, 0.1), None);
        }
        let nan = g.check(f64::NAN, f64::NAN, 0.1).unwrap();
        assert!(nan.contains("NaN") && nan.contains("exploding gradients"), "{nan}");
        let spike = g.check(5.0, 1.1, 0.1).unwrap();
        assert!(spike.contains("jumped") && spike.contains("learning rate"), "{spike}");
        let spike_big_grad = g.check(5.0, 50.0, 0.1).unwrap();
        assert!(spike_big_grad.contains("exploding"), "{spike_big_grad}");
        // A slow climb: each step under 4x the window max, but the mean ends 4x its lowest.
        let mut caught = None;
        let mut loss = 0.6;
        for _ in 0..60 {
            loss *= 1.1;
            if let Some(why) = g.check(loss, 1.0, 0.1) {
                caught = Some(why);
                break;
            }
        }
        let why = caught.expect("a 4-fold rise is caught");
        assert!(why.contains("rising"), "{why}");
        assert!(guard(BlowupAction::Off).check(f64::NAN, 0.0, 0.1).is_none());
    }

    #[test]
    fn noisy_but_healthy_losses_pass() {
        let mut g = BlowupGuard::new(BlowupSpec::default());
        for step in 0..2000 {
            let noise = ((step as f64 * 0.37).sin() + 1.0) * 0.5; // 0..1
            let loss = 2.3 * (-(step as f64) / 300.0).exp() + 0.02 + 0.1 * noise;
            assert_eq!(g.check(loss, 1.0 + noise, 1e-3), None, "step {step}");
        }
    }

    #[test]
    fn ema_matches_the_closed_form_with_bias_correction() {
        let be = CpuBackend::new(1);
        let mut p = Param::new(&be, "w", &[2], &[0.0, 0.0], true);
        let mut ema = Ema::new(&be, 0.9, &[&p]);
        let thetas = [[1.0f32, -2.0], [3.0, 0.5], [2.0, 4.0]];
        for t in &thetas {
            p.value = t.to_vec();
            ema.update(&be, &[&mut p]);
        }
        // v3 = 0.1·(0.81·θ1 + 0.9·θ2 + θ3); corrected by 1/(1 − 0.9³).
        for i in 0..2 {
            let v = 0.1 * (0.81 * thetas[0][i] as f64 + 0.9 * thetas[1][i] as f64 + thetas[2][i] as f64);
            let want = v / (1.0 - 0.9f64.powi(3));
            let got = ema.corrected(&be)[0][i] as f64;
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        // Constant weights: the corrected EMA is those weights from the first step on.
        let mut c = Param::new(&be, "c", &[1], &[5.0], true);
        let mut ema = Ema::new(&be, 0.999, &[&c]);
        for _ in 0..3 {
            ema.update(&be, &[&mut c]);
            assert!((ema.corrected(&be)[0][0] - 5.0).abs() < 1e-4);
        }
    }
}
